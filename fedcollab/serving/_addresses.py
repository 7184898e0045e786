"""Where the model server listens: defaults and host:port parsing (no torch here, so
the command line can use it without loading a model)."""

from __future__ import annotations

from fedcollab._address import join_address, parse_address
from fedcollab.errors import ConfigError

__all__ = ["DEFAULT_GRPC_ADDRESS", "DEFAULT_HTTP_ADDRESS", "join_address", "split_address"]

DEFAULT_GRPC_ADDRESS = "127.0.0.1:8500"
DEFAULT_HTTP_ADDRESS = "127.0.0.1:8501"


def split_address(address: str, *, what: str = "address") -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ConfigError naming `what` (the
    option that gave it) otherwise."""
    try:
        return parse_address(address, listen=True)
    except ValueError as e:
        raise ConfigError(f"{what}: {address!r} is {e}") from None
