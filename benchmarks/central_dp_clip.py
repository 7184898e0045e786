#!/usr/bin/env python
"""The coordinator's cost of clipping whole updates under central DP (DP-FedAvg).

What it measures
----------------
One upload of a float32 update of N parameters (default 50M, 200 MB) goes through the
coordinator's real receive path in process, chunk by chunk (default 4 MiB, the server's
default chunk size): UploadReceiver.accept (size, order, SHA-256, NaN/Inf check, spool
write) and RoundSum.fold, then UploadReceiver.finish (the whole update's SHA-256) and
RoundSum.finish + complete. Two modes, interleaved, `--repeats` times each:

- fedavg: no clip norm; each chunk is folded into the sum as it arrives (as before).
- clipped: a clip norm; each chunk's squares are summed (float64) as it arrives, and
  RoundSum.finish folds the whole update from its spool, scaled to the clip norm.

Figures (best of the repeats, seconds):
- arrival: all chunks' accept + fold/measure (spread over the upload in a real round);
- at end: what runs after the last chunk (hash check, and under clipping the read-back
  and scaled fold of the whole update): the delay clipping adds to a round's close;
- cold at end: the same with the spool dropped from the page cache first (fsync +
  POSIX_FADV_DONTNEED), as when many large uploads outgrow memory;
- noise: drawing N(0, s^2) for every coordinate of the average at commit.

Memory: clipping holds no update; the sum stays one model. The figures exclude
producing the chunks (an institution's work).

    .venv/bin/python benchmarks/central_dp_clip.py               # 50M params
    .venv/bin/python benchmarks/central_dp_clip.py --params 1000000 --repeats 2   # quick check
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedcollab.aggregation import StreamingFedAvg
from fedcollab.coordinator._round_sum import RoundSum
from fedcollab.coordinator._upload import UploadReceiver
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.wire import iter_chunks, manifest_of, stream_sha256

MiB = 1024 * 1024


def _one(*, chunks: list, header: pb.UpdateHeader, manifest, spool: Path, chunk_bytes: int, clip: float | None,
         cold: bool) -> tuple[float, float]:
    total = RoundSum(manifest=manifest, piece_bytes=chunk_bytes, clip_norm=clip)
    receiver = UploadReceiver(header=header, manifest=manifest, max_chunk_bytes=chunk_bytes, spool=spool)
    total.add("a", receiver=receiver, weight=float(header.num_examples))
    t0 = time.perf_counter()
    for c in chunks:
        assert total.fold("a", receiver.accept(c), upto=receiver.received)
    t1 = time.perf_counter()
    if cold:  # not timed: push the spool to disk and out of the page cache
        with spool.open("rb+") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t1 = time.perf_counter()
    receiver.finish()
    assert total.finish("a") and total.complete("a")
    t2 = time.perf_counter()
    total.close()
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=50_000_000)
    ap.add_argument("--chunk-mib", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    chunk_bytes = int(args.chunk_mib * MiB)
    update = {"w": torch.randn(args.params) * 1e-3}
    manifest = manifest_of(update)
    chunks = list(iter_chunks(list(update.values()), chunk_bytes=chunk_bytes))
    header = pb.UpdateHeader(manifest=manifest, total_bytes=args.params * 4, sha256=stream_sha256(update.values()),
                             num_examples=100)
    norm = float(update["w"].double().norm())
    del update
    times: dict[str, list[tuple[float, float]]] = {"fedavg": [], "clipped": [], "clipped cold": []}
    with tempfile.TemporaryDirectory(prefix="fedcollab-clip-") as tmp:
        for i in range(args.repeats):
            for mode, clip, cold in (("fedavg", None, False), ("clipped", norm / 2, False),
                                     ("clipped cold", norm / 2, True)):
                times[mode].append(_one(chunks=chunks, header=header, manifest=manifest,
                                        spool=Path(tmp) / f"{i}-{mode}.upload", chunk_bytes=chunk_bytes,
                                        clip=clip, cold=cold))
    base = {"w": torch.zeros(args.params)}
    noise = []  # apply() with noise minus apply() without
    for _ in range(args.repeats):
        took = []
        for std in (1e-3, 0.0):
            agg = StreamingFedAvg(manifest=manifest)
            agg.count(weight=1.0)
            t = time.perf_counter()
            agg.apply(base, noise_std=std)
            took.append(time.perf_counter() - t)
        noise.append(took[0] - took[1])

    print(f"update: {args.params:,} float32 parameters ({args.params * 4 / MiB:.0f} MiB), "
          f"{len(chunks)} chunks of {args.chunk_mib:g} MiB, best of {args.repeats} (median in brackets)")
    print(f"{'mode':<14}{'arrival s':>16}{'at end s':>16}{'total s':>16}")
    for mode, ts in times.items():
        arrival = [a for a, _ in ts]
        end = [b for _, b in ts]
        tot = [a + b for a, b in ts]
        print(f"{mode:<14}" + "".join(f"{min(v):>9.3f} [{statistics.median(v):.3f}]" for v in (arrival, end, tot)))
    best = {m: min(a + b for a, b in ts) for m, ts in times.items()}
    end_f = min(b for _, b in times["fedavg"])
    end_c = min(b for _, b in times["clipped"])
    end_cold = min(b for _, b in times["clipped cold"])
    print(f"noise at commit: {min(noise):.3f} s for {args.params:,} coordinates")
    print(f"summary: clipping adds {best['clipped'] - best['fedavg']:+.3f} s per update in total "
          f"({best['clipped'] / best['fedavg']:.2f}x of {best['fedavg']:.3f} s); after the last chunk "
          f"{end_c:.3f} s instead of {end_f:.3f} s ({end_cold:.3f} s from a cold spool)")


if __name__ == "__main__":
    main()
