"""Regenerate fedcollab/v1/*_pb2*.py from protos/fedcollab/v1/*.proto.

Usage: python protos/generate.py [--out DIR]   (default: the repository root)

The generated code is committed; tests/unit/test_protos_fresh.py regenerates into a
temporary folder and fails when the committed files differ. grpcio-tools is pinned in
pyproject.toml's test extra so the output is reproducible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent


def generate(*, out: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # test/dev dependency only

    protos = sorted(PROTO_ROOT.glob("fedcollab/v1/*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see its message above")
    return sorted((out / "fedcollab" / "v1").glob("*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT.parent)
    written = generate(out=parser.parse_args().out)
    print("\n".join(str(p) for p in written), file=sys.stderr)


if __name__ == "__main__":
    main()
