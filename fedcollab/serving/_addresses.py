"""Where the model server listens: defaults and host:port parsing (no torch here, so
the command line can use it without loading a model)."""

from __future__ import annotations

from fedcollab.errors import ConfigError

DEFAULT_GRPC_ADDRESS = "127.0.0.1:8500"
DEFAULT_HTTP_ADDRESS = "127.0.0.1:8501"


def split_address(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ConfigError naming the address otherwise."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not host or not 0 <= number <= 65535:
        raise ConfigError(f"address {address!r} is not host:port (e.g. 127.0.0.1:8500, [::1]:8500, 0.0.0.0:8500)")
    return host, number


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
