"""host:port, as every address in a config file or on a command line is written:
`127.0.0.1:50051`, `coordinator.example.org:50051`, `[::1]:50051`.

One parser for all of them, so that a port out of range or one with a typo is refused
when the file is read, naming its key, and never reaches gRPC: gRPC listens on a random
port for `127.0.0.1:99999`, and a client retries `localhost:50051x` forever.
"""

from __future__ import annotations

import ipaddress
import re

# A host name (RFC 1123 labels; "_" too, as container names have it) or an IPv4 address.
_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")
EXAMPLES = "e.g. 127.0.0.1:50051, coordinator.example.org:50051 or [::1]:50051"


def parse_address(address: str, *, listen: bool) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host without brackets, port). `listen`: an
    address to listen on, where port 0 picks a free port; an address to connect to
    needs a real one. ValueError saying what is wrong; the caller names the key and
    the value."""
    host, port, problem = _split(address)
    if problem:
        raise ValueError(f"not host:port: {problem} ({EXAMPLES})")
    if not _PORT.fullmatch(port):
        raise ValueError(f"not host:port: the port {port!r} is not a number ({EXAMPLES})")
    if int(port) > 65535 or (int(port) == 0 and not listen):
        allowed = "1 to 65535, or 0 for any free one" if listen else "1 to 65535"
        raise ValueError(f"not host:port: port {int(port)} is out of range ({allowed})")
    return host, int(port)


def _split(address: object) -> tuple[str, str, str]:
    """(host, port text, problem): problem is empty when the form is right."""
    if not isinstance(address, str) or not address:
        return "", "", "it is empty"
    if "/" in address or address != address.strip() or " " in address:
        return "", "", "write it without a scheme (http://, dns:///), a path or spaces"
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
        if not sep:
            return "", "", "an IPv6 address in brackets needs its port after them"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "", "", f"{host!r} is not an IPv6 address"
        return host, port, ""
    host, sep, port = address.rpartition(":")
    if not sep:
        return "", "", "it has no port"
    if ":" in host:
        return "", "", "an IPv6 address goes in brackets, as in [::1]:50051"
    if not _HOST.fullmatch(host):
        return "", "", f"{host!r} is not a host name or IP address"
    return host, port, ""


def join_address(host: str, port: int) -> str:
    """The inverse of parse_address: brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
