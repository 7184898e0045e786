#!/usr/bin/env python
"""The cost of secure aggregation in fedcollab, next to Flower 1.41's SecAgg+.

What it measures
----------------
1. fedcollab's SecAgg+ primitives, in process, on one vector of N float32 values
   (default 50M, 200 MB; drawn from a fixed seed, so Flower gets the same vector):
   - mask generation: `fedcollab.secagg.mask` over the N elements, 4 MiB (1M elements)
     per call as the upload does, in GB/s of 32-bit mask words produced;
   - masking: what one institution does before it uploads, with a neighbourhood of
     k = institutions - 1 (the complete graph fedcollab uses up to 20 institutions):
     k pairwise seeds (X25519 + HKDF) and `apply_masks` of k pairwise masks and the
     self mask, chunk by chunk, on the quantized vector; also per mask (total / (k + 1));
   - quantization: clip to [-8, 8] and `Quantizer.encode` (stochastic rounding to
     uint32), chunk by chunk, in GB/s of float32 input;
   - key agreement (X25519 + HKDF-SHA256, one pair), Shamir split of a 32-byte secret
     among n = institutions and combine from t of them (t = 66% of n, the default), in
     microseconds per call.
   Every timing is the best of --repeats.
2. The same operations with Flower 1.41's primitives, in a subprocess of the Python of
   a Flower virtual environment (--flower-python; it never imports fedcollab), done the
   way `flwr.client.mod.secure_aggregation.secaggplus_mod` does them: masks from
   `pseudo_rand_gen` (the seed folded to 32 bits, then numpy's Mersenne Twister, int64
   arrays over the whole vector), `quantize` to 2^22 levels, ECDH on SECP384R1 + HKDF
   with keys parsed from PEM as the mod does, Shamir via PyCryptodome on 16-byte
   chunks. Printed next to fedcollab's, with the ratio Flower time / fedcollab time,
   and the size of one institution's masked upload in both.
3. Rounds (unless --skip-rounds): like `round_overhead.py` (whose code this reuses), a
   coordinator and --institutions daemons started through the command line, plaintext
   gRPC on loopback, a "blob" model of N parameters, the synthetic trainer, one round;
   once plain and once with `[study.secure_aggregation] clipping_range = 8.0` (every
   other setting default). For each: the round's wall time (`rounds.opened_at ->
   closed_at` in the coordinator's SQLite store), bytes in and out of the coordinator
   (payload, its own counters), loopback traffic over the whole run, the coordinator's
   peak RSS, and how many institutions logged a masked update (all of them in the
   secure run, or the ratio is not given); then secure / plain, against the target: a
   secure round takes at most 1.5x a plain one. One round each, so on a small machine
   run it more than once before trusting the ratio. A run that fails or passes
   --timeout is reported with the process that failed and the tail of its log (and of
   the coordinator's); its folder (logs, state) is kept.

Run it one benchmark at a time on an otherwise idle machine. With the defaults the
round runs hold about 13 GB of memory at their peak (8 institutions of 1.4 GB and a
coordinator of 1.5 GB, measured) and write roughly 5 GB (estimated: models, spools,
the institutions' caches) to a temporary folder, removed after each run:

    .venv/bin/python benchmarks/secagg_overhead.py                       # 50M params, 8 institutions
    .venv/bin/python benchmarks/secagg_overhead.py --params 5000000 --skip-rounds   # primitives only
    .venv/bin/python benchmarks/secagg_overhead.py --params 2000000 --institutions 3 --repeats 1
    # options: --flower-python PATH, --skip-flower, --repeats R, --timeout S, --keep, --json out.json

Flower's side needs its own virtual environment with flwr 1.41 (see
/work/shared/peers/flower/README.md); --flower-python defaults to
/tmp/venv-flower/bin/python. Flower's whole SecAgg+ round (`SecAggPlusWorkflow`, four
stages through the SuperLink) is not run here: `bench_flower_large.py` next to that
README measures a plain Flower round of the same model for comparison with part 3.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import round_overhead as ro  # noqa: E402  (a sibling script, not a package)

from fedcollab.secagg import Quantizer, apply_masks, combine, degree_for, mask, pair_seed, split, threshold_for  # noqa: E402

console = ro.console
MiB = ro.MiB
GB = 1e9
CLIP = 8.0  # clipping_range: fedcollab's default, and Flower's
VECTOR_SEED = 20240601
TARGET_RATIO = 1.5
DEFAULT_FLOWER_PYTHON = Path("/tmp/venv-flower/bin/python")
SECAGG_TOML = "\n[study.secure_aggregation]\nclipping_range = 8.0\n"


@dataclass(frozen=True)
class Options:
    params: int
    institutions: int
    repeats: int
    chunk_mib: int
    flower_python: Path | None
    skip_flower: bool
    skip_rounds: bool
    timeout_s: float
    keep: bool
    json_path: Path | None

    @property
    def chunk_elems(self) -> int:
        return self.chunk_mib * MiB // 4

    @property
    def neighbours(self) -> int:
        return degree_for(self.institutions, "auto")

    @property
    def threshold(self) -> int:
        return threshold_for(self.institutions, 0.66)  # SecureAggregationConfig's default


# ---------------------------------------------------------------------------- timing
def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Shortest wall time of `repeats` calls: the least disturbed by other work."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def micros_per_call(fn: Callable[[], object], *, iters: int, repeats: int) -> float:
    def loop() -> None:
        for _ in range(iters):
            fn()

    return best_of(loop, repeats) / iters * 1e6


def make_vector(n: int) -> np.ndarray:
    """The update both sides mask: float32, small like a real delta. Flower's side draws
    it from the same seed; the SHA-256 of both is compared (numpy versions could differ)."""
    return np.random.default_rng(VECTOR_SEED).standard_normal(n, dtype=np.float32) * np.float32(0.05)


# ---------------------------------------------------------------------------- part 1: fedcollab
def time_mask_generation(n: int, *, chunk: int, repeats: int) -> dict[str, float]:
    seed = os.urandom(32)

    def generate() -> None:
        for start in range(0, n, chunk):
            mask(seed, start=start, count=min(chunk, n - start), bits=32)

    seconds = best_of(generate, repeats)
    return {"seconds": seconds, "gb_per_s": n * 4 / seconds / GB}


def quantize(values: np.ndarray, quantizer: Quantizer, *, chunk: int) -> np.ndarray:
    """As the upload does it (`encode_masked` without distributed DP): clip, then encode."""
    out = np.empty(len(values), dtype=np.uint32)
    rng = np.random.default_rng(0)
    for s in range(0, len(values), chunk):
        out[s:s + chunk] = quantizer.encode(np.clip(values[s:s + chunk], -CLIP, CLIP), rng=rng)
    return out


def time_quantize(values: np.ndarray, quantizer: Quantizer, *, chunk: int, repeats: int) -> dict[str, float]:
    seconds = best_of(lambda: quantize(values, quantizer, chunk=chunk), repeats)
    return {"seconds": seconds, "gb_per_s": values.nbytes / seconds / GB}


def mask_update(encoded: np.ndarray, *, own: X25519PrivateKey, peers: Sequence[bytes], chunk: int) -> np.ndarray:
    """One institution's masking stage: a seed per neighbour, then every mask added
    chunk by chunk (what `InstitutionSecAgg.receive_shares` and `.mask` do)."""
    add, subtract = [os.urandom(32)], []  # the self mask
    for i, peer in enumerate(peers):
        seed = pair_seed(private_key=own, peer_public_key=peer, context=b"bench|%d" % i)
        (add if i % 2 else subtract).append(seed)  # which end adds depends on the order of names
    out = np.empty_like(encoded)
    for s in range(0, len(encoded), chunk):
        out[s:s + chunk] = apply_masks(encoded[s:s + chunk], start=s, bits=32, add=add, subtract=subtract)
    return out


def time_masking(encoded: np.ndarray, *, neighbours: int, chunk: int, repeats: int) -> dict[str, Any]:
    own = X25519PrivateKey.generate()
    peers = [X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(neighbours)]
    seconds = best_of(lambda: mask_update(encoded, own=own, peers=peers, chunk=chunk), repeats)
    upload = mask_update(encoded, own=own, peers=peers, chunk=chunk)
    return {"seconds": seconds, "masks": neighbours + 1, "seconds_per_mask": seconds / (neighbours + 1),
            "upload_bytes": upload.nbytes}


def time_small_primitives(*, n: int, t: int, repeats: int) -> dict[str, float]:
    own, peer = X25519PrivateKey.generate(), X25519PrivateKey.generate().public_key().public_bytes_raw()
    secret = os.urandom(32)
    shares = split(secret, t=t, n=n)
    return {
        "key_agreement_us": micros_per_call(
            lambda: pair_seed(private_key=own, peer_public_key=peer, context=b"bench"), iters=200, repeats=repeats),
        "shamir_split_us": micros_per_call(lambda: split(secret, t=t, n=n), iters=200, repeats=repeats),
        "shamir_combine_us": micros_per_call(lambda: combine(shares[:t], t=t), iters=200, repeats=repeats),
    }


def fedcollab_primitives(opts: Options) -> dict[str, Any]:
    values = make_vector(opts.params)
    quantizer = Quantizer.for_range(clip=CLIP, bits=32, max_summands=opts.institutions)
    chunk, reps = opts.chunk_elems, opts.repeats
    with console.status("fedcollab: mask generation..."):
        res: dict[str, Any] = {"mask": time_mask_generation(opts.params, chunk=chunk, repeats=reps)}
    with console.status("fedcollab: quantization..."):
        res["quantize"] = time_quantize(values, quantizer, chunk=chunk, repeats=reps)
    encoded = quantize(values, quantizer, chunk=chunk)
    with console.status(f"fedcollab: masking with {opts.neighbours} neighbours..."):
        res["masking"] = time_masking(encoded, neighbours=opts.neighbours, chunk=chunk, repeats=reps)
    res.update(time_small_primitives(n=opts.institutions, t=opts.threshold, repeats=reps))
    res["vector_sha256"] = hashlib.sha256(values.tobytes()).hexdigest()
    return res


# ---------------------------------------------------------------------------- part 2: Flower
# Runs in Flower's virtual environment (python -I: nothing from this checkout on the path).
# Mirrors the functions above, with the calls secaggplus_mod makes.
FLOWER_SCRIPT = r'''
import hashlib, json, os, sys, time
import numpy as np
import flwr
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    parameters_addition, parameters_mod, parameters_subtraction)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key, bytes_to_public_key, generate_key_pairs, private_key_to_bytes, public_key_to_bytes)

cfg = json.loads(sys.argv[1])
n, reps, k, t, shares_n = cfg["params"], cfg["repeats"], cfg["neighbours"], cfg["threshold"], cfg["institutions"]
CLIP, TARGET, MOD = 8.0, 4194304, 4294967296  # SecAggPlusWorkflow's defaults

def best_of(fn):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t0)
    return best

def micros(fn, iters=200):
    return best_of(lambda: [fn() for _ in range(iters)]) / iters * 1e6

def keys():
    sk, pk = generate_key_pairs()
    return private_key_to_bytes(sk), public_key_to_bytes(pk)

values = np.random.default_rng(cfg["vector_seed"]).standard_normal(n, dtype=np.float32) * np.float32(0.05)
dims = [values.shape]
res = {"flwr": flwr.__version__, "numpy": np.__version__, "vector_sha256": hashlib.sha256(values.tobytes()).hexdigest()}

seed = os.urandom(32)
s = best_of(lambda: pseudo_rand_gen(seed, MOD, dims))
res["mask"] = {"seconds": s, "gb_per_s": n * 4 / s / 1e9}

s = best_of(lambda: quantize([values], CLIP, TARGET))
res["quantize"] = {"seconds": s, "gb_per_s": values.nbytes / s / 1e9}

sk1, _ = keys()
peer_pks = [keys()[1] for _ in range(k)]
quantized = quantize([values], CLIP, TARGET)

def mask_update():
    # secaggplus_mod._collect_masked_vectors, from the quantized vector on
    masked = parameters_addition(quantized, pseudo_rand_gen(os.urandom(32), MOD, dims))
    for i, pk in enumerate(peer_pks):
        shared = generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(pk))
        pairwise = pseudo_rand_gen(shared, MOD, dims)
        masked = (parameters_addition if i % 2 else parameters_subtraction)(masked, pairwise)
    return parameters_mod(masked, MOD)

s = best_of(mask_update)
upload = sum(len(ndarray_to_bytes(a)) for a in [np.array([1])] + mask_update())  # factor + vector
res["masking"] = {"seconds": s, "masks": k + 1, "seconds_per_mask": s / (k + 1), "upload_bytes": upload}

# as the mod calls it: both keys parsed from PEM for every pair
res["key_agreement_us"] = micros(
    lambda: generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(peer_pks[0])))
secret = os.urandom(32)
shares = create_shares(secret, t, shares_n)
assert combine_shares(shares[:t]) == secret
res["shamir_split_us"] = micros(lambda: create_shares(secret, t, shares_n))
res["shamir_combine_us"] = micros(lambda: combine_shares(shares[:t]))
print(json.dumps(res))
'''


def flower_setup_hint() -> str:
    return ("create it as /work/shared/peers/flower/README.md says: python3 -m venv /tmp/venv-flower && "
            "/tmp/venv-flower/bin/pip install -c /work/shared/peers/flower/constraints.txt 'flwr==1.41.0' "
            "(torch==2.13.0 first), "
            "then pass --flower-python /tmp/venv-flower/bin/python")


def flower_primitives(opts: Options) -> dict[str, Any]:
    """Flower's side as a dict, or {"error": why} (never raises: part 3 still runs)."""
    if opts.flower_python is None or not opts.flower_python.exists():
        return {"error": f"no Flower Python at {opts.flower_python}; {flower_setup_hint()}"}
    cfg = {"params": opts.params, "repeats": opts.repeats, "neighbours": opts.neighbours,
           "threshold": opts.threshold, "institutions": opts.institutions, "vector_seed": VECTOR_SEED}
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    env.pop("PYTHONPATH", None)
    with console.status(f"Flower ({opts.flower_python}): the same operations..."):
        try:
            done = subprocess.run([str(opts.flower_python), "-I", "-c", FLOWER_SCRIPT, json.dumps(cfg)],
                                  capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(),
                                  timeout=max(600.0, opts.timeout_s), check=False)
        except subprocess.TimeoutExpired as e:
            return {"error": f"Flower's side did not finish within {e.timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": f"Flower's side exited with code {done.returncode}:\n{done.stderr[-3000:]}"}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": f"Flower's side printed no JSON result:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"}


# ---------------------------------------------------------------------------- part 3: rounds
@contextmanager
def federation_toml_extra(text: str) -> Iterator[None]:
    """round_overhead.run_federation writes the federation file itself: wrap its writer
    for the duration of one run so the file gets our extra section."""
    original = ro.write_federation_toml

    def write(*, folder: Path, opts: ro.Options) -> Path:
        path = original(folder=folder, opts=opts)
        with path.open("a", encoding="utf-8") as f:
            f.write(text)
        return path

    ro.write_federation_toml = write
    try:
        yield
    finally:
        ro.write_federation_toml = original


def failure_report(error: str, folder: Path) -> str:
    """The error (it names the process and shows its log), plus the coordinator's view
    when another process failed: why the round did not commit is usually there."""
    if error.startswith("coordinator"):
        return error
    tail = ro.log_tail(folder / "coordinator.log", lines=25)
    return f"{error}\n--- last lines of {folder / 'coordinator.log'}:\n{tail}"


def masked_uploads(folder: Path, names: Sequence[str]) -> int:
    """Institutions whose log says they masked their update: proof that the secure
    round really was one (a setting ignored somewhere would make a plain round look good)."""
    return sum("masked update" in ro.log_tail(folder / f"{name}.log", lines=10**6) for name in names)


def run_round(*, label: str, slug: str, extra_toml: str, opts: Options, baseline: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"fedcollab-secagg-{slug}-"))
    ro_opts = ro.Options(params=opts.params, institutions=opts.institutions, rounds=1, chunk_mib=opts.chunk_mib,
                         timeout_s=opts.timeout_s, sample_s=0.025, json_path=None, workdir=None, keep=opts.keep)
    console.rule(f"round: {label}")
    try:
        with federation_toml_extra(extra_toml):
            run = ro.run_federation(opts=ro_opts, folder=folder, env=ro.child_env())
        state = ro.read_state(folder / "coordinator-state" / "coordinator.sqlite")
        res = ro.build_results(opts=ro_opts, run=run, state=state, baseline_bytes=baseline, folder=folder)
    except ro.BenchError as e:
        console.print(f"[red]{label} round failed[/]; logs and state kept in {folder}")
        return {"label": label, "ok": False, "error": failure_report(str(e), folder), "folder": str(folder)}
    r, c = res["rounds"][0], res["coordinator"]
    masked = masked_uploads(folder, [child.name for child in run.institutions])
    if not opts.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return {"label": label, "ok": True, "round_s": r["round_s"], "bytes_in": r["bytes_in"],
            "bytes_out": r["bytes_out"], "loopback_bytes": res["loopback_bytes_whole_run"],
            "coordinator_peak_rss_bytes": c["peak_rss_bytes"],
            "institution_peak_rss_bytes": max(p["peak_rss_bytes"] for p in res["institution_processes"].values()),
            "total_wall_s": res["total_wall_s"],
            "masked_uploads": masked, "institutions": len(run.institutions),
            "folder": str(folder) if opts.keep else None}


def rounds(opts: Options) -> list[dict[str, Any]]:
    baseline = ro.measure_import_baseline(env=ro.child_env())
    return [run_round(label=label, slug=slug, extra_toml=extra, opts=opts, baseline=baseline)
            for label, slug, extra in (("plain", "plain", ""), ("secure aggregation", "secure", SECAGG_TOML))]


# ---------------------------------------------------------------------------- output
def _s(x: float) -> str:
    return f"{x:.3f} s" if x >= 0.1 else f"{x * 1e3:.1f} ms"


def _us(x: float) -> str:
    return f"{x:,.0f} µs" if x >= 10 else f"{x:.1f} µs"


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


# (label, how to read the time in seconds or µs, how to show a result)
ROWS: list[tuple[str, Callable[[dict[str, Any]], float], Callable[[dict[str, Any]], str]]] = [
    ("mask generation, N elements", lambda p: p["mask"]["seconds"],
     lambda p: f"{_s(p['mask']['seconds'])} ({p['mask']['gb_per_s']:.2f} GB/s)"),
    ("quantize, N values", lambda p: p["quantize"]["seconds"],
     lambda p: f"{_s(p['quantize']['seconds'])} ({p['quantize']['gb_per_s']:.2f} GB/s)"),
    ("masking: k pair seeds + k + 1 masks", lambda p: p["masking"]["seconds"],
     lambda p: f"{_s(p['masking']['seconds'])} ({_s(p['masking']['seconds_per_mask'])} per mask)"),
    ("key agreement + HKDF, one pair", lambda p: p["key_agreement_us"], lambda p: _us(p["key_agreement_us"])),
    ("Shamir split, 32 bytes, t of n", lambda p: p["shamir_split_us"], lambda p: _us(p["shamir_split_us"])),
    ("Shamir combine from t", lambda p: p["shamir_combine_us"], lambda p: _us(p["shamir_combine_us"])),
]


def print_fedcollab(opts: Options, ours: dict[str, Any]) -> None:
    console.rule(f"1. fedcollab SecAgg+ primitives: N = {opts.params:,} float32 ({_mb(opts.params * 4)}), "
                 f"k = {opts.neighbours} neighbours, t = {opts.threshold} of n = {opts.institutions}")
    table = Table(title=f"best of {opts.repeats}; chunks of {opts.chunk_mib} MiB", title_justify="left")
    table.add_column("operation")
    table.add_column("fedcollab", justify="right")
    for label, _, show in ROWS:
        table.add_row(label, show(ours))
    table.add_row("masked upload, one institution", _mb(ours["masking"]["upload_bytes"]))
    console.print(table)
    console.print("  masks: ChaCha20 keystream as uint32 mod 2^32; quantize: clip to [-8, 8], scale to 2^31 "
                  f"levels shared by {opts.institutions}, stochastic rounding; key agreement: X25519; "
                  "Shamir: GF(2^521 - 1).", style="dim")


def print_side_by_side(opts: Options, ours: dict[str, Any], flower: dict[str, Any]) -> None:
    console.rule("2. the same operations with Flower 1.41's SecAgg+ primitives")
    if "error" in flower:
        console.print(f"[yellow]Flower skipped:[/] {flower['error']}", highlight=False)
        return
    same = "the same vector" if flower["vector_sha256"] == ours["vector_sha256"] else "[red]a different vector[/]"
    table = Table(title=f"{same} (sha256 {ours['vector_sha256'][:12]}); flwr {flower['flwr']}, best of "
                        f"{opts.repeats}", title_justify="left")
    table.add_column("operation")
    for col in ("fedcollab", "Flower 1.41", "Flower / fedcollab"):
        table.add_column(col, justify="right")
    for label, value, show in ROWS:
        table.add_row(label, show(ours), show(flower), f"{value(flower) / value(ours):.2f}x")
    up_ours, up_flower = ours["masking"]["upload_bytes"], flower["masking"]["upload_bytes"]
    table.add_row("masked upload, one institution", _mb(up_ours), _mb(up_flower), f"{up_flower / up_ours:.2f}x")
    console.print(table)
    console.print("  Flower: pseudo_rand_gen (seed XOR-folded to 32 bits -> numpy RandomState, int64 over the "
                  "whole vector); quantize to 2^22 levels; masking as secaggplus_mod does it (whole-vector int64 "
                  "adds, mod 2^32 at the end, ECDH SECP384R1 with PEM keys parsed per pair); Shamir: PyCryptodome "
                  "on 16-byte chunks of the padded secret; upload: np.save'd int64 arrays.", style="dim")


def print_rounds(opts: Options, runs: list[dict[str, Any]]) -> None:
    console.rule(f"3. one round, {opts.params:,} params x {opts.institutions} institutions, plain and secure")
    table = Table(title="round = rounds.opened_at -> closed_at; bytes = the coordinator's payload counters",
                  title_justify="left")
    for col in ("round", "wall", "bytes in", "bytes out", "loopback (whole run)", "coordinator peak RSS",
                "institution peak RSS", "masked uploads"):
        table.add_column(col, justify="right")
    for r in runs:
        if r["ok"]:
            table.add_row(r["label"], _s(r["round_s"]), _mb(r["bytes_in"]), _mb(r["bytes_out"]),
                          _mb(r["loopback_bytes"]), _mb(r["coordinator_peak_rss_bytes"]),
                          _mb(r["institution_peak_rss_bytes"]), f"{r['masked_uploads']}/{r['institutions']}")
        else:
            table.add_row(r["label"], "[red]failed[/]", *["-"] * 6)
    console.print(table)
    for r in runs:
        if not r["ok"]:
            console.print(f"[red]{r['label']} round failed:[/]")
            console.print(r["error"], markup=False, highlight=False)
    console.print(ratio_line(runs), highlight=False)


def ratio_line(runs: list[dict[str, Any]]) -> str:
    plain, secure = runs
    if not (plain["ok"] and secure["ok"]):
        return f"secure / plain: not measured ({', '.join(r['label'] for r in runs if not r['ok'])} failed)"
    if secure["masked_uploads"] < secure["institutions"]:
        return (f"[red]secure / plain: not measured[/]: only {secure['masked_uploads']} of {secure['institutions']} "
                "institutions logged a masked update in the secure run")
    ratio = secure["round_s"] / plain["round_s"]
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    return (f"secure / plain: round {ratio:.2f}x (target <= {TARGET_RATIO}x: {verdict}); bytes in "
            f"{secure['bytes_in'] / plain['bytes_in']:.2f}x, out {secure['bytes_out'] / plain['bytes_out']:.2f}x; "
            f"coordinator peak RSS {secure['coordinator_peak_rss_bytes'] / plain['coordinator_peak_rss_bytes']:.2f}x")


# ---------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=50_000_000, help="float32 values / model parameters (default 50M)")
    p.add_argument("--institutions", type=int, default=8, help="institutions (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timings per primitive, the best is kept (default 3)")
    p.add_argument("--chunk-mib", type=int, default=4, help="chunk size in MiB, masks and transfers (default 4)")
    p.add_argument("--flower-python", type=Path,
                   default=DEFAULT_FLOWER_PYTHON if DEFAULT_FLOWER_PYTHON.exists() else None,
                   help=f"Python of a virtual environment with flwr 1.41 (default {DEFAULT_FLOWER_PYTHON} if present)")
    p.add_argument("--skip-flower", action="store_true", help="do not run Flower's primitives")
    p.add_argument("--skip-rounds", action="store_true", help="primitives only, no coordinator and institutions")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="give up on a round run after this many seconds (default 900)")
    p.add_argument("--keep", action="store_true", help="keep the rounds' folders (logs, state, models)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    if a.params < 1 or a.repeats < 1 or a.institutions < 2:
        p.error("--params and --repeats must be at least 1, --institutions at least 2")
    if not 1 <= a.chunk_mib <= 64:
        p.error("--chunk-mib must be in 1..64 (the coordinator's chunk_bytes limit)")
    return Options(params=a.params, institutions=a.institutions, repeats=a.repeats, chunk_mib=a.chunk_mib,
                   flower_python=a.flower_python, skip_flower=a.skip_flower, skip_rounds=a.skip_rounds,
                   timeout_s=a.timeout, keep=a.keep, json_path=a.json)


def benchmark(opts: Options) -> dict[str, Any]:
    results: dict[str, Any] = {"benchmark": "fedcollab secagg_overhead", "params": opts.params,
                               "institutions": opts.institutions, "neighbours": opts.neighbours,
                               "threshold": opts.threshold, "repeats": opts.repeats,
                               "chunk_bytes": opts.chunk_mib * MiB}
    results["fedcollab"] = ours = fedcollab_primitives(opts)
    print_fedcollab(opts, ours)
    if not opts.skip_flower:
        results["flower"] = flower = flower_primitives(opts)
        print_side_by_side(opts, ours, flower)
    if not opts.skip_rounds:
        results["rounds"] = runs = rounds(opts)
        print_rounds(opts, runs)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    results, code = ro.run_cli(lambda: benchmark(opts), json_path=opts.json_path)
    if results is None:
        return code
    return 0 if all(r["ok"] for r in results.get("rounds", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
