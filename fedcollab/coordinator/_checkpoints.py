"""Committed global models: safetensors files named by version and content hash."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedcollab._fileio import file_sha256, fsync_dir

__all__ = ["ModelVersion", "StoredTensor", "StreamingWriter", "add_file_into", "file_sha256", "load_tensors",
           "read_pieces", "read_tensor", "remove_orphans", "stored_tensors", "write_atomic", "write_streaming"]


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


# safetensors' dtype names for the dtypes a model may hold (wire.py allows no others).
_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
_IO_BYTES = 4 * 1024 * 1024
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def stored_tensors(path: Path) -> list[StoredTensor]:
    """The tensors of a safetensors file, from its header alone (no data is read),
    sorted by name."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if not 0 < length <= _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header length {length})")
        header = json.loads(f.read(length))
    base = 8 + length
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        out.append(StoredTensor(name=name, dtype=_FROM_ST[meta["dtype"]], shape=tuple(meta["shape"]),
                                start=base + a, end=base + b))
    return sorted(out, key=lambda t: t.name)


def add_file_into(path: Path, targets: Mapping[str, torch.Tensor]) -> None:
    """targets[name] (flat) += the file's tensor `name`, read 4 MiB at a time: a commit
    adds the base model to the mean of the deltas without holding the base."""
    with path.open("rb") as f:
        for t in stored_tensors(path):
            acc = targets[t.name]
            if acc.numel() != t.numel:
                raise ValueError(f"{t.name}: {t.numel} elements in {path.name}, {acc.numel()} in the sum")
            item = t.dtype.itemsize
            step = max(item, _IO_BYTES - _IO_BYTES % item)
            f.seek(t.start)
            done = 0
            while done < t.end - t.start:
                block = bytearray(f.read(min(step, t.end - t.start - done)))
                values = torch.frombuffer(block, dtype=t.dtype)
                first = done // item
                acc[first:first + len(values)].add_(values.to(acc.dtype))
                done += len(block)


class StreamingWriter:
    """A safetensors file written tensor by tensor, in the order of `specs`, each from
    flat values converted to its dtype 4 MiB at a time, and hashed as it is written.
    The header comes first, so every name, dtype and shape is given up front; nothing
    is read back. finish() fsyncs and returns the SHA-256; the caller renames."""

    def __init__(self, path: Path, *, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        header: dict[str, object] = {}
        offset = 0
        self._order: list[tuple[str, torch.dtype, int]] = []
        for name, dtype, shape in specs:
            numel = 1
            for d in shape:
                numel *= d
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + numel * dtype.itemsize]}
            offset += numel * dtype.itemsize
            self._order.append((name, dtype, numel))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
        self._next = 0
        self._digest = hashlib.sha256()
        self._file = path.open("wb")
        for part in (struct.pack("<Q", len(raw)), raw):
            self._write(part)

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._digest.update(data)

    def write(self, name: str, flat: torch.Tensor) -> None:
        want, dtype, numel = self._order[self._next]
        if name != want or flat.numel() != numel:
            raise ValueError(f"StreamingWriter: got {name!r} ({flat.numel()} elements), expected {want!r} ({numel})")
        step = max(1, _IO_BYTES // dtype.itemsize)
        for a in range(0, numel, step):
            self._write(flat[a:a + step].to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
        self._next += 1

    def finish(self) -> str:
        if self._next != len(self._order):
            raise ValueError(f"StreamingWriter: {len(self._order) - self._next} tensors were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._digest.hexdigest()

    def abandon(self) -> None:
        self._file.close()


def write_streaming(tensors: Mapping[str, tuple[torch.Tensor, torch.dtype, tuple[int, ...]]], *, folder: Path,
                    version: int) -> ModelVersion:
    """A safetensors file written tensor by tensor and 4 MiB at a time from flat
    tensors (converted to each one's dtype on the way), hashed as it is written: a
    1-billion-parameter model is never held twice, nor read back for its SHA-256.
    `tensors[name] = (flat values, dtype to store, shape)`. Atomic like write_atomic."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    tmp = folder / f".v{version:06d}.tmp"
    writer = StreamingWriter(tmp, specs=[(n, tensors[n][1], tensors[n][2]) for n in names])
    try:
        for name in names:
            writer.write(name, tensors[name][0])
    except BaseException:
        writer.abandon()
        raise
    sha = writer.finish()
    final = folder / f"v{version:06d}-{sha[:16]}.safetensors"
    os.replace(tmp, final)
    fsync_dir(folder)
    return ModelVersion(version=version, sha256=sha, path=final, size_bytes=final.stat().st_size)


def read_tensor(path: Path, t: StoredTensor) -> torch.Tensor:
    """One tensor of a safetensors file, flat, read from its byte range alone."""
    with path.open("rb") as f:
        f.seek(t.start)
        data = bytearray(f.read(t.end - t.start))
    if len(data) != t.end - t.start:
        raise ValueError(f"{path}: truncated at tensor {t.name!r}")
    return torch.frombuffer(data, dtype=t.dtype) if data else torch.empty(0, dtype=t.dtype)


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
