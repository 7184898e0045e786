"""A throwaway federation for `fedcollab simulate` and tests: a CA and every party's
certificate, each made by request + sign exactly as the real flow makes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcollab.errors import PkiError
from fedcollab.pki._ca import init_ca
from fedcollab.pki._request import request_certificate, split_hosts
from fedcollab.pki._sign import sign_request

COORDINATOR_NAME = "coordinator"


@dataclass(frozen=True)
class EphemeralPki:
    directory: Path
    ca_cert: Path
    ca_key: Path
    crl: Path
    coordinator: tuple[Path, Path]  # (cert, key)
    institutions: dict[str, tuple[Path, Path]]
    operators: dict[str, tuple[Path, Path]]


def issue_ephemeral(
    *,
    directory: Path,
    federation: str,
    institutions: Sequence[str],
    operators: Sequence[str] = (),
    coordinator_hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 2,
) -> EphemeralPki:
    """CA files at the top of `directory`; each party's `<name>.pem` and `<name>-key.pem`
    under `<role>/`. Milliseconds per party (ECDSA P-256)."""
    for role, names in (("institution", institutions), ("operator", operators)):
        duplicates = sorted({n for n in names if list(names).count(n) > 1})
        if duplicates:
            raise PkiError(f"{role} names {duplicates} are given more than once; each party needs its own name")
    directory = Path(directory)
    ca = init_ca(directory=directory, federation=federation, days=max(days, 1) + 1)

    def issue(role: str, name: str, hosts: Sequence[str] = ()) -> tuple[Path, Path]:
        dns, ips = split_hosts(hosts)
        request = request_certificate(directory=directory / role, role=role, name=name, dns_names=dns,
                                      ip_addresses=ips)
        cert = directory / role / f"{name}.pem"
        sign_request(ca_dir=directory, csr_pem=request.csr.read_bytes(), days=days, out=cert)
        return cert, request.key

    return EphemeralPki(
        directory=directory, ca_cert=ca.ca_cert, ca_key=ca.ca_key, crl=ca.crl,
        coordinator=issue("coordinator", COORDINATOR_NAME, coordinator_hosts),
        institutions={name: issue("institution", name) for name in institutions},
        operators={name: issue("operator", name) for name in operators},
    )
