"""One institution's upload: every chunk checked as it arrives, spooled to disk.

The spool lets the round's sum be rebuilt without this upload if it fails after
some of its chunks were folded in (see _round_sum.py). Under compression the stream,
its size, hashes and spool are the encoded ones; decoding happens chunk by chunk,
here and again when the spool is read back.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc

from fedcollab.compression import EncodingError, UpdateDecoder, check_encoding, encoded_nbytes, update_decoder
from fedcollab.config import ACCOUNTANTS, CompressionConfig
from fedcollab.errors import Rejected
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import TensorPiece

MAX_METRICS = 32
MAX_METRIC_KEY = 64
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_UNCOMPRESSED = CompressionConfig()


def _reject(reason: str, message: str, code: grpc.StatusCode = _INVALID, **meta: object) -> Rejected:
    return Rejected(code=code, reason=reason, message=message, metadata=meta)


def _dtype_name(value: int) -> str:
    """Proto3 enums are open: a client can send any int32, named or not."""
    try:
        return tensor_pb2.TensorDtype.Name(value)
    except ValueError:
        return f"unknown dtype {value}"


def check_manifest(*, got: tensor_pb2.ModelManifest, expected: tensor_pb2.ModelManifest) -> None:
    """Names, dtypes and shapes must be exactly the model's, in the model's order."""
    want = {s.name: s for s in expected.tensors}
    have_names = [s.name for s in got.tensors]
    missing = [n for n in want if n not in set(have_names)]
    if missing:
        raise _reject("TENSOR_MISSING", f"update lacks tensors {missing[:5]}", tensors=",".join(missing[:20]))
    extra = [n for n in have_names if n not in want]
    if extra:
        raise _reject("TENSOR_UNEXPECTED", f"update has tensors the model does not: {extra[:5]}",
                      tensors=",".join(extra[:20]))
    if len(set(have_names)) != len(have_names):
        raise _reject("TENSOR_DUPLICATED", "update names a tensor twice")
    if have_names != [s.name for s in expected.tensors]:
        raise _reject("TENSOR_ORDER", "tensors must come in the order of the task's manifest")
    for s in got.tensors:
        w = want[s.name]
        if s.dtype != w.dtype:
            raise _reject(
                "DTYPE_MISMATCH",
                f"tensor {s.name!r} has dtype {_dtype_name(s.dtype)}, the model has {_dtype_name(w.dtype)}",
                tensor=s.name,
            )
        if list(s.shape) != list(w.shape):
            raise _reject(
                "SHAPE_MISMATCH",
                f"tensor {s.name!r} has shape {list(s.shape)}, the model has {list(w.shape)}",
                tensor=s.name,
            )


def check_privacy_spend(spend: pb.PrivacySpend) -> None:
    """An institution's reported spend is recorded as it says, but only if it is a
    well-formed figure: finite, non-negative, with a delta in (0, 1)."""
    numbers = (spend.epsilon, spend.delta, spend.budget_epsilon, spend.noise_multiplier, spend.sample_rate,
               spend.max_grad_norm)
    if any(not math.isfinite(v) or v < 0 for v in numbers) or spend.steps < 0:
        raise _reject("INVALID_PRIVACY_SPEND", "privacy spend figures must be finite and non-negative")
    if not 0 < spend.delta < 1 or spend.sample_rate > 1:
        raise _reject("INVALID_PRIVACY_SPEND", "privacy.delta must be in (0, 1) and sample_rate at most 1")
    if spend.accountant not in ACCOUNTANTS:
        raise _reject("INVALID_PRIVACY_SPEND", f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}")


def spend_dict(spend: pb.PrivacySpend) -> dict[str, object]:
    return {
        "epsilon": spend.epsilon, "delta": spend.delta, "budget_epsilon": spend.budget_epsilon,
        "noise_multiplier": spend.noise_multiplier, "sample_rate": spend.sample_rate, "steps": spend.steps,
        "accountant": spend.accountant, "max_grad_norm": spend.max_grad_norm,
    }


def check_header_values(header: pb.UpdateHeader, *, max_examples: int = 10**12) -> None:
    if not 0 < header.num_examples <= max_examples:
        raise _reject("INVALID_EXAMPLE_COUNT", f"num_examples must be in 1..{max_examples}, got {header.num_examples}")
    if len(header.sha256) != 32:
        raise _reject("INVALID_HEADER", "header.sha256 must be the 32-byte SHA-256 of the tensor stream")
    if len(header.metrics) > MAX_METRICS or any(len(k) > MAX_METRIC_KEY for k in header.metrics):
        raise _reject("METADATA_TOO_LARGE",
                      f"at most {MAX_METRICS} metrics with keys up to {MAX_METRIC_KEY} characters")
    if any(k.startswith("fedcollab.") for k in header.metrics):  # the coordinator's own (_bounds.py)
        raise _reject("METADATA_TOO_LARGE", "metric names starting with 'fedcollab.' are the coordinator's")
    if any(not math.isfinite(v) for v in header.metrics.values()):
        raise _reject("NON_FINITE_VALUES", "metrics must be finite numbers")
    if header.HasField("privacy"):
        check_privacy_spend(header.privacy)


def _rejected(error: EncodingError) -> Rejected:
    return _reject(error.reason, error.message, **error.metadata)


class UploadReceiver:
    """`compression` is the study's: the header must declare exactly it (ENCODING_MISMATCH)."""

    def __init__(
        self, *, header: pb.UpdateHeader, manifest: tensor_pb2.ModelManifest, max_chunk_bytes: int, spool: Path,
        compression: CompressionConfig = _UNCOMPRESSED,
    ) -> None:
        check_manifest(got=header.manifest, expected=manifest)
        check_header_values(header)
        try:
            check_encoding(header.encoding, expected=compression)
        except EncodingError as e:
            raise _rejected(e) from None
        total = encoded_nbytes(manifest, compression=compression)
        if header.total_bytes != total:
            encoded = "" if compression.method == "none" else f" encoded as {compression.method}"
            raise _reject("SIZE_MISMATCH", f"total_bytes is {header.total_bytes}, the model needs {total}{encoded}",
                          expected=total)
        self.header = header
        self._manifest = manifest
        self._compression = compression
        self._max_chunk = max_chunk_bytes
        self._decoder: UpdateDecoder = update_decoder(manifest, compression=compression)
        self._digest = hashlib.sha256()
        self.spool = spool
        spool.parent.mkdir(parents=True, exist_ok=True)
        self._file = spool.open("wb")

    @property
    def received(self) -> int:
        return self._decoder.received

    def accept(self, chunk: tensor_pb2.Chunk) -> Iterable[TensorPiece]:
        """Checks a chunk, spools it, and returns its decoded pieces to fold (under top-k
        a lazy iterable: iterate it once)."""
        if len(chunk.data) > self._max_chunk:
            raise _reject("CHUNK_TOO_LARGE", f"chunk of {len(chunk.data)} bytes exceeds the limit of {self._max_chunk}",
                          grpc.StatusCode.RESOURCE_EXHAUSTED, limit=self._max_chunk)
        if chunk.offset != self._decoder.received:
            raise _reject("CHUNK_OUT_OF_ORDER", f"chunk at offset {chunk.offset}, expected {self._decoder.received}",
                          expected=self._decoder.received)
        if not chunk.data:
            raise _reject("CHUNK_EMPTY", "empty chunk")
        if hashlib.sha256(chunk.data).digest() != chunk.sha256:
            raise _reject("CHUNK_HASH_MISMATCH", f"chunk at offset {chunk.offset} does not match its SHA-256",
                          grpc.StatusCode.DATA_LOSS, offset=chunk.offset)
        try:
            pieces = self._decoder.feed(chunk.data)  # every value checked here, NaN/Inf included
        except EncodingError as e:
            raise _rejected(e) from None
        self._digest.update(chunk.data)
        self._file.write(chunk.data)
        self._file.flush()  # a rebuild may read it back before the upload ends
        return pieces

    def finish(self) -> None:
        """Everything arrived and matches the header's hash; the spool is on disk."""
        if not self._decoder.complete:
            raise _reject("UPDATE_INCOMPLETE", f"stream ended after {self._decoder.received} of "
                          f"{self._decoder.total} bytes", received=self._decoder.received)
        if self._digest.digest() != self.header.sha256:
            raise _reject("UPDATE_HASH_MISMATCH", "the update does not match the SHA-256 in its header",
                          grpc.StatusCode.DATA_LOSS)
        self._file.close()

    def pieces(self, *, piece_bytes: int, limit: int) -> Iterator[TensorPiece]:
        """The first `limit` bytes of the update, read back from the spool."""
        decoder = update_decoder(self._manifest, compression=self._compression)
        left = limit
        with self.spool.open("rb") as f:
            while left > 0 and (block := f.read(min(piece_bytes, left))):
                left -= len(block)
                yield from decoder.feed(block)

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self.spool)
        except FileNotFoundError:
            pass


