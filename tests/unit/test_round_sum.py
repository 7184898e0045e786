"""A failed upload leaves no trace in the round's sum, however much of it was folded."""

from __future__ import annotations

from pathlib import Path

import torch

from fedcollab.coordinator._round_sum import RoundSum
from fedcollab.coordinator._upload import UploadReceiver
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.wire import iter_chunks, manifest_of, stream_sha256

BASE = {"b": torch.zeros(5), "w": torch.zeros(4, 6)}
MANIFEST = manifest_of(BASE)


def _upload(tmp: Path, name: str, value: float, weight: int) -> tuple[UploadReceiver, list]:
    deltas = [torch.full(t.shape, value) for t in BASE.values()]
    header = pb.UpdateHeader(manifest=MANIFEST, total_bytes=29 * 4, sha256=stream_sha256(deltas),
                             num_examples=weight)
    receiver = UploadReceiver(header=header, manifest=MANIFEST, max_chunk_bytes=1024, spool=tmp / f"{name}.upload")
    return receiver, list(iter_chunks(deltas, chunk_bytes=20))


def _feed(total: RoundSum, name: str, receiver: UploadReceiver, chunks: list) -> None:
    for c in chunks:
        assert total.fold(name, receiver.accept(c), upto=receiver.received)


def test_partly_folded_uploads_are_rebuilt_out(tmp_path: Path) -> None:
    total = RoundSum(manifest=MANIFEST, piece_bytes=12)
    a, a_chunks = _upload(tmp_path, "a", 1.0, 10)
    b, b_chunks = _upload(tmp_path, "b", 1e6, 1000)   # would dominate if any of it stayed
    c, c_chunks = _upload(tmp_path, "c", -2.0, 30)
    d, d_chunks = _upload(tmp_path, "d", 7.0, 500)
    for name, r in (("a", a), ("b", b), ("c", c), ("d", d)):
        total.add(name, receiver=r, weight=float(r.header.num_examples))
    _feed(total, "a", a, a_chunks[:3])
    _feed(total, "b", b, b_chunks[:4])      # b fails half-way ...
    _feed(total, "c", c, c_chunks)
    total.exclude("b")                      # ... and is taken out: one rebuild
    assert total.rebuilds == 1 and not total.fold("b", [], upto=0)
    _feed(total, "a", a, a_chunks[3:])
    a.finish(), c.finish()
    assert total.complete("a") and total.complete("c")
    _feed(total, "d", d, d_chunks[:2])      # d is still uploading when the round closes
    assert sorted(total.close()) == ["a", "c"]
    assert total.rebuilds == 2 and not total.complete("d")
    new = total.apply(BASE)
    expected = (10 * 1.0 + 30 * -2.0) / 40
    for name, value in new.items():
        torch.testing.assert_close(value, torch.full(BASE[name].shape, expected), rtol=0, atol=1e-7)
    assert list(tmp_path.glob("*.upload")) == [], "spools are removed when the round closes"


def test_no_rebuild_when_nothing_of_the_failed_upload_was_folded(tmp_path: Path) -> None:
    total = RoundSum(manifest=MANIFEST, piece_bytes=12)
    a, chunks = _upload(tmp_path, "a", 1.0, 10)
    total.add("a", receiver=a, weight=10.0)
    total.exclude("a")
    assert total.rebuilds == 0 and total.close() == []
