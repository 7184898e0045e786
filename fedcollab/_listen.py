"""Listening on a configured address, and saying why it failed.

gRPC turns on SO_REUSEPORT by default: a second server on a taken port then starts
"listening" too and the kernel splits new connections between the two processes.
Every fedcollab server turns it off (LISTEN_OPTIONS), so a taken port fails to bind,
and gRPC's bare "Failed to bind" is turned into the reason, found by binding the same
address with a plain socket: in use, not this machine's address, or privileged.
"""

from __future__ import annotations

import errno
import socket

import grpc

from fedcollab._address import parse_address
from fedcollab.errors import ConfigError, InUseError

# A port already taken is an error, not shared with the process that holds it.
LISTEN_OPTIONS: list[tuple[str, int]] = [("grpc.so_reuseport", 0)]


def bind_grpc(server: grpc.Server, address: str, *, credentials: grpc.ServerCredentials | None, key: str,
              role: str) -> int:
    """Adds the listening port; returns it (port 0 resolved). InUseError when another
    process holds the port, ConfigError for an address that cannot be listened on, both
    naming `key` (the setting or option to change). Validate TLS files before: gRPC
    reports unusable credentials as the same bare bind failure."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port:
        return port
    raise listen_error(address, key=key, role=role)


def check_can_listen(address: str, *, key: str, role: str) -> None:
    """Raises listen_error's error when `address` cannot be listened on now: for a
    server bound later (the dashboard binds when the coordinator starts serving), so a
    taken port refuses the start before the state folder is touched."""
    try:
        host, port = parse_address(address, listen=True)
    except ValueError:
        raise listen_error(address, key=key, role=role) from None
    if port and _why_not(host, port):  # port 0: any free one, always there
        raise listen_error(address, key=key, role=role)


def listen_error(address: str, *, key: str, role: str) -> ConfigError | InUseError:
    """The error for an address the OS would not let this process listen on."""
    try:
        host, port = parse_address(address, listen=True)
    except ValueError as e:
        return ConfigError(f"{key}: {address!r} is {e}")
    problem = _why_not(host, port)
    if problem == errno.EADDRINUSE:
        return InUseError(f"{key}: cannot listen on {address}: the port is in use (another {role}, or another "
                          f"program; `ss -ltnp 'sport = :{port}'` shows which). Stop it, or change {key}")
    if problem == errno.EADDRNOTAVAIL:
        return ConfigError(f"{key}: cannot listen on {address}: {host} is not an address of this machine; use one "
                           "of its addresses, 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    if problem == errno.EACCES:
        return ConfigError(f"{key}: cannot listen on {address}: ports below 1024 need privileges; change {key} "
                           "to a port above 1023")
    why = problem if isinstance(problem, str) else "gRPC could not listen there"
    return ConfigError(f"{key}: cannot listen on {address}: {why}; change {key}")


def _why_not(host: str, port: int) -> int | str:
    """The errno of binding (host, port) with a plain socket, as gRPC binds it
    (SO_REUSEADDR on: a closed connection in TIME_WAIT is no conflict); 0 if it binds."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"{host!r} does not resolve ({e.strerror})"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as e:
                return e.errno or str(e)
    return 0
