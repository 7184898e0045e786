"""Signed lineage: every committed model version has a record of what it is made of,
signed with the coordinator's Ed25519 key. Institutions verify it before using a
model; `fedcollab lineage verify` checks a whole chain offline."""

from fedcollab.lineage._chain import ChainReport, verify_chain
from fedcollab.lineage._errors import LineageError
from fedcollab.lineage._files import (
    coordinator_state_dir,
    file_sha256,
    read_record_file,
    record_path,
    write_record_file,
)
from fedcollab.lineage._keys import (
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    key_fingerprint,
    load_or_create_signing_key,
    load_public_key,
    raw_public_key,
)
from fedcollab.lineage._record import (
    SCHEMA,
    build_record,
    canonical_bytes,
    check_model,
    parse_record,
    sign_record,
    verify_record,
)

__all__ = [
    "PUBLIC_KEY_FILE",
    "SCHEMA",
    "SIGNING_KEY_FILE",
    "ChainReport",
    "LineageError",
    "build_record",
    "canonical_bytes",
    "check_model",
    "coordinator_state_dir",
    "file_sha256",
    "key_fingerprint",
    "load_or_create_signing_key",
    "load_public_key",
    "parse_record",
    "raw_public_key",
    "read_record_file",
    "record_path",
    "sign_record",
    "verify_chain",
    "verify_record",
    "write_record_file",
]
