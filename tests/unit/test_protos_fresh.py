"""The committed generated code must match protos/: regenerate and compare."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_proto_files(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", REPO / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    sys.modules["generate"] = generate
    spec.loader.exec_module(generate)
    fresh = generate.generate(out=tmp_path)
    assert fresh, "protoc produced nothing"
    committed = REPO / "fedcollab" / "v1"
    names = {p.name for p in fresh}
    assert names == {p.name for p in committed.glob("*_pb2*.py*")}, "generated files differ in name"
    stale = [p.name for p in fresh if p.read_bytes() != (committed / p.name).read_bytes()]
    assert not stale, f"stale generated code {stale}: run `python protos/generate.py` and commit the result"
