"""Channel and server credentials, message limits, and the loud plaintext warning."""

from __future__ import annotations

import ipaddress
import logging

import grpc

from fedcollab.config import TlsConfig
from fedcollab.errors import ConfigError

log = logging.getLogger("fedcollab.transport")

# Room for a chunk's protobuf framing (offset, hash, header fields) on top of its data.
_FRAMING_BYTES = 64 * 1024


def message_limit(chunk_bytes: int) -> int:
    """gRPC message size limit for a given chunk size: set explicitly on both sides."""
    return chunk_bytes + _FRAMING_BYTES


def _read(path: object, what: str) -> bytes:
    try:
        with open(path, "rb") as f:  # type: ignore[call-overload]
            return f.read()
    except OSError as e:
        raise ConfigError(f"tls.{what}: cannot read {path}: {e.strerror}") from None


def server_credentials_from(tls: TlsConfig) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(_read(tls.key, "key"), _read(tls.cert, "cert"))],
        root_certificates=_read(tls.ca_cert, "ca_cert"),
        require_client_auth=tls.require_client_auth,
    )


def channel_credentials_from(tls: TlsConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_cert, "ca_cert"),
        private_key=_read(tls.key, "key"),
        certificate_chain=_read(tls.cert, "cert"),
    )


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_warned: set[str] = set()


def warn_insecure(address: str, *, role: str) -> None:
    """Once per address and process: a simulation's daemons share their coordinator's."""
    if address in _warned:
        return
    _warned.add(address)
    where = "loopback only" if is_loopback(address) else "REACHABLE FROM THE NETWORK"
    log.warning(
        "%s on %s WITHOUT TLS (%s): traffic is unencrypted and identities are not verified; "
        "configure [tls] for anything but a local rehearsal", role, address, where,
    )


def create_channel(
    address: str, *, credentials: grpc.ChannelCredentials | None, chunk_bytes: int,
    max_reconnect_backoff_s: float = 30.0,
) -> grpc.Channel:
    """`max_reconnect_backoff_s` caps gRPC's own reconnect backoff (1 s x 1.6^n up to
    120 s by default), which sits under the daemon's: without it a daemon that started
    before its coordinator could wait two minutes after the coordinator came up."""
    limit = message_limit(chunk_bytes)
    backoff_ms = max(100, int(max_reconnect_backoff_s * 1000))
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # A ping every 30 s while calls are open (none without: keepalive_permit_without_calls
        # stays 0), so a dead coordinator is noticed mid-long-poll. The coordinator accepts
        # one every 10 s (fedcollab/coordinator/_server.py, server_options): keep this above
        # that, or the coordinator answers GOAWAY too_many_pings.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(1000, backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
    ]
    if credentials is None:
        warn_insecure(address, role="institution connecting")
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)
