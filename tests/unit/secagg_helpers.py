"""Signing identities for secure-aggregation tests: certificates from one throwaway CA
(tests/_pki.py), in the federation's identity convention."""

from __future__ import annotations

from functools import cache
from typing import Any

from cryptography.hazmat.primitives import serialization

from fedcollab.secagg import PeerVerifier, SigningIdentity
from tests._pki import TestCA


@cache
def _ca() -> TestCA:
    return TestCA("secagg test CA")


@cache
def _identity(name: str, ca: TestCA) -> SigningIdentity:
    pem = ca.issue(name, server=False)
    key = serialization.load_pem_private_key(pem.key, password=None)
    return SigningIdentity(certificate_pem=pem.cert, key=key)  # type: ignore[arg-type]


def signing_identities(names: list[str], *, ca: TestCA | None = None) -> dict[str, dict[str, Any]]:
    """{name: {"identity": ..., "verifier": ...}}, keyword arguments of InstitutionSecAgg."""
    ca = ca or _ca()
    verifier = PeerVerifier(ca_pem=ca.pem)
    return {n: {"identity": _identity(n, ca), "verifier": verifier} for n in names}
