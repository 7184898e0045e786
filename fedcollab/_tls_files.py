"""The PEM files of a [tls] table, checked when a process starts: gRPC reads them only
when it binds or connects, and reports a garbage certificate as "Failed to bind to
address", or (on a client) as a handshake that fails on every retry."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from fedcollab.config import TlsConfig
from fedcollab.errors import ConfigError


def check_tls_files(tls: TlsConfig, *, table: str) -> None:
    """ConfigError naming `table`.key (e.g. server.tls.cert) unless the CA and the
    certificate are PEM certificates and the key is the certificate's own, unencrypted."""
    _certificates(tls.ca_cert, f"{table}.ca_cert")
    leaf = _certificates(tls.cert, f"{table}.cert")[0]
    key_pem = _read(tls.key, f"{table}.key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"{table}.key: {tls.key} is encrypted; fedcollab needs the key unencrypted (keep it "
                          "mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"{table}.key: {tls.key} is not a PEM private key ({e})") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ConfigError(f"{table}.key: {tls.key} is not the key of the certificate {tls.cert} ({table}.cert); "
                          "give the key that was made with it")


def _certificates(path: Path, key: str) -> list[x509.Certificate]:
    data = _read(path, key)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"{key}: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None


def _read(path: Path, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from None
