"""Mutual TLS from files, as a deployment configures it ([tls] sections): the
institutions' certificate and key files are also what they sign secure-aggregation
keys with."""

from __future__ import annotations

from pathlib import Path

from fedcollab.config import FederationConfig, InstitutionConfig, TlsConfig
from tests._pki import TestCA


def coordinator_tls(ca: TestCA, folder: Path, federation: FederationConfig) -> FederationConfig:
    ca_file, cert, key = ca.write(folder / "coordinator", "coordinator", ca.issue("coordinator", server=True))
    return federation.model_copy(update={"server": federation.server.model_copy(update={
        "tls": TlsConfig(ca_cert=ca_file, cert=cert, key=key)})})


def institution_tls(ca: TestCA, folder: Path, config: InstitutionConfig) -> InstitutionConfig:
    name = config.institution.name
    ca_file, cert, key = ca.write(folder / name, name, ca.issue(name, server=False))
    return config.model_copy(update={"tls": TlsConfig(ca_cert=ca_file, cert=cert, key=key)})
