"""Committed global models: safetensors files named by version and content hash."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedcollab._fileio import file_sha256, fsync_dir

__all__ = ["ModelVersion", "file_sha256", "load_tensors", "read_pieces", "remove_orphans", "write_atomic"]


@dataclass(frozen=True)
class ModelVersion:
    version: int
    sha256: str
    path: Path
    size_bytes: int


def write_atomic(tensors: Mapping[str, torch.Tensor], *, folder: Path, version: int) -> ModelVersion:
    """Temp file, fsync, rename, fsync the folder: a crash leaves either the old state
    or the whole new file, never a torn one."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".v{version:06d}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    sha = file_sha256(tmp)
    final = folder / f"v{version:06d}-{sha[:16]}.safetensors"
    os.replace(tmp, final)
    fsync_dir(folder)
    return ModelVersion(version=version, sha256=sha, path=final, size_bytes=final.stat().st_size)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def read_pieces(path: Path, *, offset: int, piece_bytes: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(offset)
        while block := f.read(piece_bytes):
            yield block


def remove_orphans(folder: Path, *, keep: set[Path]) -> list[Path]:
    """Files left by a crash between writing a model and committing its round."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.resolve() not in keep and (p.suffix == ".tmp" or p.suffix == ".safetensors"):
                p.unlink()
                removed.append(p)
    return removed
