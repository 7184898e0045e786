"""Atheris fuzz target over the coordinator's request handling.

One real RoundEngine + CoordinatorServicer is built in-process (tiny MLP study with a
million rounds, 2 s round and 0.1 s evaluation timeouts, 0.1 s leases, state in a
temporary folder, the round driver running in its thread, 16 honest sessions joined
and kept alive so that a round is open). Each input picks one RPC and either

* raw mode: fuzz bytes parsed as the request message (what gRPC would hand the
  servicer; a DecodeError is gRPC's to answer, so it is counted, and the handler is
  then called with whatever part of the message did parse, possibly an empty one), or
* structured mode: a request built field by field, where every field is either a
  value that is right for the current state (an honest session, the open round, its
  nonce, the model's manifest, a correctly hashed chunk) or a hostile one (unknown
  enum values, huge shapes, NaN/Inf metrics, int64 extremes, offsets past the end,
  oversized chunks, names of hundreds of kilobytes), so that deep validation is reachable.

UploadUpdate gets a stream of such messages; its iterator can also break off with a
grpc.RpcError, as a vanished client does.

Expected outcomes: a normal return, or an abort carrying a google.rpc.Status with one
fedcollab ErrorInfo (a plain abort only for CANCELLED after a broken stream). Anything
else is a finding and is raised, so atheris reports it with the input: an exception out
of a handler, an abort with INTERNAL (the servicer turns unexpected exceptions into
INTERNAL and logs them; the finding carries the original traceback), an error status
too large for a gRPC client to receive, a Join that accepted a malformed name, a round
driver that died, a committed model with NaN/Inf, or an honest session that no longer
works.

Run:  python fuzz/fuzz_coordinator.py -max_total_time=300 fuzz/corpus fuzz/seeds
      python fuzz/fuzz_coordinator.py CRASH_FILE          # replay one input
      python fuzz/fuzz_coordinator.py --write-seeds fuzz/seeds

The input is decoded by ByteReader below, not atheris.FuzzedDataProvider, so that
one_input() runs without atheris (tests/unit/test_fuzz_harness.py) and an input means
the same with and without it. Set FUZZ_LOG=1 to see the coordinator's log.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import logging
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# fedcollab is imported by _import_fedcollab(), so that main() can import it under
# atheris' instrumentation (coverage of fedcollab's own code only).
grpc: Any = None
pb: Any = None
tensor_pb2: Any = None
status_pb2: Any = None
error_details_pb2: Any = None
torch: Any = None
_fc: dict[str, Any] = {}
ClientGone: Any = None  # a grpc.RpcError, as a request iterator raises when the client goes away


def _import_fedcollab() -> None:
    global grpc, pb, tensor_pb2, status_pb2, error_details_pb2, torch, ClientGone
    if _fc:
        return
    import grpc as _grpc
    import torch as _torch
    from google.rpc import error_details_pb2 as _ed
    from google.rpc import status_pb2 as _st

    import fedcollab.coordinator._engine as engine_mod
    import fedcollab.coordinator._servicer as servicer_mod
    from fedcollab.config import FederationConfig, ModelConfig, ServerConfig, StudyConfig, TrainConfig
    from fedcollab.coordinator._store import Store
    from fedcollab.v1 import coordinator_service_pb2 as _pb
    from fedcollab.v1 import tensor_pb2 as _tpb
    from fedcollab.wire import manifest_nbytes, torch_dtype

    try:  # the mTLS identity (coordinator/_auth.py); older trees have none
        from fedcollab.coordinator._auth import Caller
    except ImportError:
        Caller = None

    grpc, pb, tensor_pb2, status_pb2, error_details_pb2, torch = _grpc, _pb, _tpb, _st, _ed, _torch
    ClientGone = type("ClientGone", (_grpc.RpcError,), {"__doc__": "The client went away mid-stream."})
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import secagg_stages  # the secure-aggregation stages (imported here: instrumented with fedcollab)

    _fc.update(
        secagg=secagg_stages,
        RoundEngine=engine_mod.RoundEngine, CoordinatorServicer=servicer_mod.CoordinatorServicer, Store=Store,
        FederationConfig=FederationConfig, ModelConfig=ModelConfig, ServerConfig=ServerConfig,
        StudyConfig=StudyConfig, TrainConfig=TrainConfig, manifest_nbytes=manifest_nbytes,
        torch_dtype=torch_dtype, Caller=Caller,
    )


# --------------------------------------------------------------------------- input


class ByteReader:
    """Consumes the input from the front; past its end every read is zeros, so index 0
    of every choice list is the default (and the "right" value where there is one)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def remaining(self) -> int:
        return max(len(self._data) - self._pos, 0)

    def take(self, n: int) -> bytes:
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "little")

    def int_in(self, lo: int, hi: int) -> int:
        span = hi - lo
        if span <= 0:
            return lo
        return lo + self.uint((span.bit_length() + 7) // 8) % (span + 1)

    def bool(self) -> bool:
        return bool(self.uint(1) & 1)

    def chance(self, per256: int) -> bool:
        """True with probability per256/256 (False once the input is used up)."""
        return self.uint(1) >= 256 - per256

    def pick(self, options: list[Any]) -> Any:
        return options[self.int_in(0, len(options) - 1)]

    def int64(self) -> int:
        return self.uint(8) - (1 << 63)

    def float64(self) -> float:
        return struct.unpack("<d", self.take(8).ljust(8, b"\0"))[0]

    def blob(self, max_len: int) -> bytes:
        return self.take(self.int_in(0, max_len))

    def text(self, max_len: int) -> str:
        # Protobuf strings are valid UTF-8: gRPC never hands the servicer a surrogate.
        return self.blob(max_len).decode("utf-8", "replace")


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_INT_EDGES = [0, 1, -1, 2, INT64_MAX, INT64_MIN, 2**31, 2**32, 10**12, 10**12 + 1]


def fuzz_int(r: ByteReader, good: int | None = None) -> int:
    """The right value first (when there is one), then neighbours, edges, anything."""
    options: list[Any] = ([good, good + 1, good - 1] if good is not None else []) + _INT_EDGES + ["any"]
    v = r.pick(options)
    v = r.int64() if v == "any" else v
    return max(INT64_MIN, min(INT64_MAX, v))


_FLOATS = [0.0, 1.0, 0.5, -1.0, -0.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 3.4e38, 3.5e38,
           1e-7, 0.999999, "any"]


def fuzz_float(r: ByteReader, good: float | None = None) -> float:
    v = r.pick(([good] if good is not None else []) + _FLOATS)
    return r.float64() if v == "any" else v


def fuzz_text(r: ByteReader, good: list[str], *, max_len: int = 64) -> str:
    """One of the known-good strings, a mangled one, or fuzz text (sometimes huge)."""
    kind = r.pick(["good", "good", "text", "mangled", "empty", "huge", "good"])
    if kind == "good" and good:
        return r.pick(good)
    if kind == "mangled" and good:
        s = r.pick(good)
        return r.pick([s + "\n", s + "\0", " " + s, s.upper(), s[:-1], s + "x", s * 2])
    if kind == "empty":
        return ""
    if kind == "huge":
        return r.pick(["A", "é", "\0", "🦀"]) * r.pick([65, 129, 1025, 10_000, 200_000])
    return r.text(max_len)


# --------------------------------------------------------------------------- context


class Aborted(Exception):
    """What the fake context raises for abort()/abort_with_status(), as gRPC does."""

    def __init__(self, *, code: Any, details: str, status: Any, cause: BaseException | None) -> None:
        super().__init__(f"{code} {details[:200]!r}")
        self.code, self.details, self.status, self.cause = code, details, status, cause


class Finding(AssertionError):
    """A broken expectation: atheris reports it with the input. atheris prints only the
    last traceback of a chain, so the cause's traceback is put in the message."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        if cause is not None:
            import traceback

            lines = traceback.format_exception(type(cause), cause, cause.__traceback__, chain=False)
            message += "\ncaused by:\n" + "".join(line if len(line) < 500 else line[:500] + "...\n" for line in lines)
        super().__init__(message)
        self.__cause__ = cause


class FakeContext:
    """Enough of grpc.ServicerContext for the servicer. `caller` is the mTLS identity
    the interceptor (coordinator/_auth.py) attaches; None is plaintext."""

    def __init__(self, *, caller: Any = None, active: bool = True, remaining: float | None = None,
                 auth: dict[str, list[bytes]] | None = None, peer: str = "ipv4:127.0.0.1:54321") -> None:
        if caller is not None:
            self.caller = caller
        self._active, self._remaining, self._auth, self._peer = active, remaining, auth or {}, peer
        self.trailing_metadata: Any = None
        self.code: Any = None
        self.details: str | None = None

    def abort(self, code: Any, details: str) -> None:
        raise Aborted(code=code, details=details, status=None, cause=sys.exc_info()[1])

    def abort_with_status(self, status: Any) -> None:
        raise Aborted(code=status.code, details=status.details, status=status, cause=sys.exc_info()[1])

    def is_active(self) -> bool:
        return self._active

    def time_remaining(self) -> float | None:
        return self._remaining

    def peer(self) -> str:
        return self._peer

    def peer_identities(self) -> list[bytes] | None:
        return None

    def peer_identity_key(self) -> str | None:
        return None

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def send_initial_metadata(self, metadata: Any) -> None:
        pass

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing_metadata = metadata

    def set_code(self, code: Any) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return True

    def cancel(self) -> None:
        pass

    def disable_next_message_compression(self) -> None:
        pass



# --------------------------------------------------------------------------- environment

# Honest institutions, all selected in every round: each is one chance per round for
# the fuzzer to get deep into upload validation with a right session, round and nonce
# (an institution's part in a round ends with its first rejected upload).
HONEST = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
          "nu", "xi", "omicron", "pi")
# Sessions that stop heartbeating are gone after 2 intervals: fuzz-joined institutions
# drop out of rounds quickly, so rounds (and fresh nonces) turn over fast. The honest
# ones heartbeat every interval. (Tests raise it: a loaded machine may stall 0.1 s.)
HEARTBEAT_S = 0.05
# What a client can receive: gRPC's default soft limit on received metadata is 8 KiB
# (grpc.max_metadata_size); above it calls fail at random with RESOURCE_EXHAUSTED and
# the status is lost. An error status (grpc-message + grpc-status-details-bin) must
# leave room for the rest of the trailers.
MAX_STATUS_BYTES = 8192 - 256
_REASON = re.compile(r"^[A-Z][A-Z0-9_]*\Z")
_INSTITUTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # what Join promises to accept


def _central_dp() -> Any:
    """FUZZ_CENTRAL_DP=1: institution-level DP at the coordinator (clipped, uniform,
    noised average with adaptive clipping), whose uploads take the other path of the
    round sum (measured as they arrive, folded from the spool when complete)."""
    if os.environ.get("FUZZ_CENTRAL_DP") != "1":
        return None
    from fedcollab.config import AdaptiveClippingConfig, CentralDPConfig

    return CentralDPConfig(clip_norm=1.0, noise_multiplier=1.0,
                           adaptive=AdaptiveClippingConfig(count_noise_multiplier=1.0))


def _remove_stale_state() -> None:
    """libFuzzer ends the process without Python's atexit: state folders of fuzzing
    processes that are gone are removed here."""
    for folder in Path(tempfile.gettempdir()).glob("fedcollab-fuzz-*-*"):
        pid = folder.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


class Env:
    """The coordinator under test: engine + servicer + round driver thread."""

    def __init__(self) -> None:
        _import_fedcollab()
        _remove_stale_state()
        self.dir = Path(tempfile.mkdtemp(prefix=f"fedcollab-fuzz-{os.getpid()}-"))
        f = _fc
        self.config = f["FederationConfig"](
            server=f["ServerConfig"](address="127.0.0.1:0", state_dir=self.dir, chunk_bytes=1024,
                                     heartbeat_interval_s=HEARTBEAT_S, lease_intervals=2,
                                     max_poll_wait_s=0.01),
            study=f["StudyConfig"](
                name="fuzz", rounds=1_000_000, min_institutions=2, round_timeout_s=2.0, evaluation_timeout_s=0.1,
                max_round_attempts=1_000_000_000,
                model=f["ModelConfig"](kind="mlp", params={"in_features": 8, "hidden": [4], "num_classes": 3}),
                train=f["TrainConfig"](local_epochs=1, batch_size=8, learning_rate=0.01),
                central_dp=_central_dp(),
                secure_aggregation=f["secagg"].secagg_config(),
            ),
        )
        self.store = f["Store"](self.dir / "coordinator.sqlite")
        self.engine = f["RoundEngine"](config=self.config, store=self.store, models_dir=self.dir / "models",
                                       spool_dir=self.dir / "spool")
        self.servicer = f["CoordinatorServicer"](engine=self.engine)
        self.manifest = self.engine.manifest
        self.total_bytes = f["manifest_nbytes"](self.manifest)
        self.honest: dict[str, str] = {}  # name -> session id
        self.honest_names = list(HONEST)
        self.renamed = 0
        for name in self.honest_names:
            self.rejoin(name)
        self.others: collections.deque[tuple[str, str]] = collections.deque(maxlen=4)  # fuzz-joined sessions
        self.checked_version = -1
        self.last_sweep = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.engine.run, args=(self.stop,), name="fuzz-round-driver",
                                       daemon=True)
        self.thread.start()
        # FUZZ_SECAGG=1: the honest institutions walk each round's secure-aggregation stages.
        self.walk = (f["secagg"].HonestWalk(self, context=FakeContext, aborted=Aborted)
                     if self.config.study.secure_aggregation is not None else None)
        deadline = time.monotonic() + 10
        while self.open_round() is None and time.monotonic() < deadline:
            time.sleep(0.005)

    def rejoin(self, name: str) -> None:
        self.honest[name] = self.engine.join(institution=name, num_train_examples=100)[0]

    def close(self) -> None:
        if self.walk is not None:
            self.walk.close()
        self.stop.set()
        self.thread.join(timeout=10)
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # State, read from the engine's private fields (best effort: the fuzzer only uses
    # them to offer the right values; nothing breaks if they are renamed).
    def open_round(self) -> Any:
        eng = self.engine
        with eng._cond:
            r = getattr(eng, "_round", None)
            if r is None or r.closed:
                return None
            return {
                "number": r.number, "base_version": r.base.version, "base_sha": r.base.sha256,
                "nonces": {n: p.nonce for n, p in r.participants.items()},
            }

    def open_eval(self) -> Any:
        eng = self.engine
        with eng._cond:
            e = getattr(eng, "_eval", None)
            if e is None or e.closed:
                return None
            return {"number": e.number, "nonces": dict(e.nonces), "sha": e.model.sha256}

    def sessions(self) -> list[str]:
        return list(self.honest.values()) + [s for _, s in self.others]

    def names(self) -> list[str]:
        return list(self.honest) + [n for n, _ in self.others]


# --------------------------------------------------------------------------- requests


def _session(r: ByteReader, env: Env) -> str:
    return fuzz_text(r, env.sessions(), max_len=40)


def _nonce(r: ByteReader, nonces: dict[str, str] | None, name: str | None) -> str:
    good = []
    if nonces:
        if name in nonces:
            good.append(nonces[name])
        good += list(nonces.values())
    return fuzz_text(r, good, max_len=40)


def _caller(r: ByteReader, env: Env) -> Any:
    """None (plaintext) most of the time, else a verified identity, right or wrong."""
    Caller = _fc["Caller"]
    if Caller is None or not r.chance(64):
        return None
    # Names come from certificates the federation CA issued: 1-64 characters of the
    # identity alphabet (fedcollab/pki), not arbitrary text.
    name = r.pick([n for n in env.names() if len(n) <= 64] + ["mallory", "x" * 64])
    return Caller(role=r.pick(["institution", "operator"]), name=name, serial=r.uint(4))


def _spend(r: ByteReader) -> Any:
    good = dict(epsilon=1.5, delta=1e-5, budget_epsilon=8.0, noise_multiplier=1.1, sample_rate=0.01,
                max_grad_norm=1.0)
    spend = pb.PrivacySpend(steps=fuzz_int(r, 10), accountant=fuzz_text(r, ["rdp", "prv", "gdp"], max_len=8))
    for key, value in good.items():
        setattr(spend, key, fuzz_float(r, value))
    return spend


def _metrics(r: ByteReader, target: Any) -> None:
    for _ in range(r.pick([0, 1, 2, 5, 33, 40])):
        key = fuzz_text(r, ["train_loss", "accuracy", "epsilon"], max_len=80)
        target[key] = fuzz_float(r, 0.5)


def _enum(r: ByteReader, good: int) -> int:
    # Proto3 enums are open: any int32 can arrive.
    return r.pick([good, 0, 1, 2, 3, 4, 5, 99, -1, 2**31 - 1, -(2**31)])


def _spec(r: ByteReader, good: Any) -> Any:
    s = tensor_pb2.TensorSpec()
    s.CopyFrom(good)
    what = r.pick(["dtype", "shape", "dim", "name", "rank", "empty-shape"])
    if what == "dtype":
        s.dtype = _enum(r, good.dtype)
    elif what == "shape" and len(s.shape):
        s.shape[r.int_in(0, len(s.shape) - 1)] = fuzz_int(r, s.shape[0])
    elif what == "dim":
        s.shape.append(fuzz_int(r, 1))
    elif what == "rank":
        s.shape.extend([r.pick([1, 0, -1, 2**40])] * r.pick([8, 100, 5000]))
    elif what == "empty-shape":
        del s.shape[:]
    else:
        s.name = fuzz_text(r, [good.name], max_len=64)
    return s


def _manifest(r: ByteReader, env: Env) -> Any:
    m = tensor_pb2.ModelManifest()
    m.CopyFrom(env.manifest)
    for _ in range(r.pick([1, 1, 2, 3])):
        specs = list(m.tensors)
        what = r.pick(["spec", "drop", "dup", "swap", "extra", "clear"])
        i = r.int_in(0, len(specs) - 1) if specs else 0
        if what == "spec" and specs:
            specs[i] = _spec(r, specs[i])
        elif what == "drop" and specs:
            specs.pop(i)
        elif what == "dup" and specs:
            specs.insert(i, specs[i])
        elif what == "swap" and len(specs) > 1:
            j = r.int_in(0, len(specs) - 1)
            specs[i], specs[j] = specs[j], specs[i]
        elif what == "extra":
            specs.append(tensor_pb2.TensorSpec(name=fuzz_text(r, ["extra"], max_len=64), dtype=_enum(r, 1),
                                               shape=[fuzz_int(r, 3)]))
        else:
            specs = []
        del m.tensors[:]
        m.tensors.extend(specs)
    return m


def _update_bytes(r: ByteReader, env: Env) -> bytes:
    """The tensor stream: a fill value, or raw fuzz bytes (any float32 bit pattern)."""
    n = env.total_bytes
    if r.bool():
        raw = r.take(n)
        return (raw * (n // max(len(raw), 1) + 1))[:n] if raw else bytes(n)
    import numpy as np

    with np.errstate(over="ignore"):  # 1e308 becomes Inf in float32, as a client's cast would make it
        return np.full(n // 4, fuzz_float(r, 0.01), dtype="<f4").tobytes()


def _upload_messages(r: ByteReader, env: Env) -> tuple[list[Any], int | None]:
    """A whole upload: header and chunks, right for the open round, then mutated.
    Returns the messages and where the stream breaks off (None: it does not)."""
    rnd = env.open_round()
    name = r.pick(env.names())
    session = env.honest.get(name) or dict(env.others).get(name, "")
    if r.chance(40):
        session = _session(r, env)
    data = _update_bytes(r, env)
    header = pb.UpdateHeader(
        session_id=session,
        round=rnd["number"] if rnd else 1,
        nonce=(rnd["nonces"].get(name, "") if rnd else ""),
        base_version=rnd["base_version"] if rnd else 0,
        total_bytes=len(data),
        sha256=hashlib.sha256(data).digest(),
        num_examples=10,
    )
    header.manifest.CopyFrom(env.manifest)
    if r.chance(64):
        header.metrics["train_loss"] = 0.5
    if r.chance(48):
        header.privacy.CopyFrom(pb.PrivacySpend(epsilon=1.0, delta=1e-5, budget_epsilon=8.0, noise_multiplier=1.0,
                                                sample_rate=0.01, steps=5, accountant="rdp", max_grad_norm=1.0))
    size = r.pick([1024, 256, 100, 7, 1, 1023, "any"])
    size = r.int_in(1, 1024) if size == "any" else size
    chunks = []
    for off in range(0, len(data), size):
        piece = data[off : off + size]
        chunks.append(tensor_pb2.Chunk(offset=off, data=piece, sha256=hashlib.sha256(piece).digest()))
    messages = [pb.UploadUpdateRequest(header=header)] + [pb.UploadUpdateRequest(chunk=c) for c in chunks]
    broken_at = None
    for _ in range(r.pick([0, 0, 1, 1, 2, 3])):
        _mutate_upload(r, env, messages, rnd)
    if r.chance(24):
        broken_at = r.int_in(0, len(messages))
    return messages, broken_at


def _mutate_upload(r: ByteReader, env: Env, messages: list[Any], rnd: Any) -> None:
    header = messages[0].header if messages and messages[0].HasField("header") else pb.UpdateHeader()
    what = r.pick(["session", "round", "nonce", "base", "manifest", "total", "sha", "examples", "metrics",
                   "privacy", "chunk-drop", "chunk-dup", "chunk-swap", "chunk-flip", "chunk-hash", "chunk-offset",
                   "chunk-big", "chunk-empty", "chunk-extra", "header-again", "no-part", "truncate", "no-header"])
    chunk_ix = [i for i, m in enumerate(messages) if m.HasField("chunk")]
    i = r.pick(chunk_ix) if chunk_ix else None
    if what == "session":
        header.session_id = _session(r, env)
    elif what == "round":
        header.round = fuzz_int(r, header.round)
    elif what == "nonce":
        header.nonce = _nonce(r, rnd["nonces"] if rnd else None, None)
    elif what == "base":
        header.base_version = fuzz_int(r, header.base_version)
    elif what == "manifest":
        header.manifest.CopyFrom(_manifest(r, env))
    elif what == "total":
        header.total_bytes = fuzz_int(r, header.total_bytes)
    elif what == "sha":
        header.sha256 = r.pick([b"", b"\0" * 32, header.sha256[:31], header.sha256 + b"\0", r.blob(64)])
    elif what == "examples":
        header.num_examples = fuzz_int(r, header.num_examples)
    elif what == "metrics":
        _metrics(r, header.metrics)
    elif what == "privacy":
        header.privacy.CopyFrom(_spend(r))
    elif i is None:
        pass
    elif what == "chunk-drop":
        messages.pop(i)
    elif what == "chunk-dup":
        messages.insert(i, messages[i])
    elif what == "chunk-swap":
        j = r.pick(chunk_ix)
        messages[i], messages[j] = messages[j], messages[i]
    elif what == "chunk-flip":
        c = messages[i].chunk
        pos = r.int_in(0, max(len(c.data) - 1, 0))
        data = bytearray(c.data)
        if data:
            data[pos] ^= r.int_in(1, 255)
        rehash = r.bool()  # a client that hashes its corrupt data (e.g. NaN put in on purpose)
        c.data = bytes(data)
        if rehash:
            c.sha256 = hashlib.sha256(c.data).digest()
    elif what == "chunk-hash":
        messages[i].chunk.sha256 = r.blob(40)
    elif what == "chunk-offset":
        messages[i].chunk.offset = fuzz_int(r, messages[i].chunk.offset)
    elif what == "chunk-big":
        data = bytes(r.pick([1025, 4096, 1 << 20]))
        messages[i].chunk.data, messages[i].chunk.sha256 = data, hashlib.sha256(data).digest()
    elif what == "chunk-empty":
        messages[i].chunk.data, messages[i].chunk.sha256 = b"", hashlib.sha256(b"").digest()
    elif what == "chunk-extra":
        data = r.blob(64) or b"\0\0\0\0"
        last = messages[chunk_ix[-1]].chunk
        messages.append(pb.UploadUpdateRequest(chunk=tensor_pb2.Chunk(
            offset=min(last.offset + len(last.data), INT64_MAX), data=data, sha256=hashlib.sha256(data).digest())))
    elif what == "header-again":
        messages.insert(i, pb.UploadUpdateRequest(header=header))
    elif what == "no-part":
        messages.insert(i, pb.UploadUpdateRequest())
    elif what == "truncate":
        del messages[i:]
    elif what == "no-header":
        messages.pop(0)


def _structured(r: ByteReader, env: Env, rpc: str) -> Any:
    """One request of `rpc` (UploadUpdate streams come from _upload_messages)."""
    if rpc == "Join":
        names = ["newcomer"] + env.names() + ["a" * 128, "a" * 129]
        return pb.JoinRequest(institution=fuzz_text(r, names, max_len=140),
                              num_train_examples=fuzz_int(r, 100), client_version=r.text(16))
    if rpc == "PollTask":
        return pb.PollTaskRequest(session_id=_session(r, env), wait_seconds=r.pick([0.001, 0.0, -1.0, math.nan,
                                                                                     math.inf, 0.005, 1e300]))
    if rpc == "DownloadModel":
        model = env.engine.current_model
        rnd = env.open_round()  # once: the round driver may close it at any moment
        sha = fuzz_text(r, [model.sha256, rnd["base_sha"] if rnd else model.sha256], max_len=70)
        return pb.DownloadModelRequest(session_id=_session(r, env), sha256=sha,
                                       offset=fuzz_int(r, r.pick([0, model.size_bytes, model.size_bytes // 2])))
    if rpc == "ReportEvaluation":
        e = env.open_eval()
        name = r.pick(env.names())
        session = env.honest.get(name) or dict(env.others).get(name, "")
        if r.chance(40):
            session = _session(r, env)
        return pb.ReportEvaluationRequest(
            session_id=session, round=fuzz_int(r, e["number"] if e else 1),
            nonce=_nonce(r, e["nonces"] if e else None, name),
            model_sha256=fuzz_text(r, [e["sha"]] if e else [env.engine.current_model.sha256], max_len=70),
            num_examples=fuzz_int(r, 5), loss=fuzz_float(r, 1.0), accuracy=fuzz_float(r, 0.5))
    if rpc == "DeclineTask":
        rnd = env.open_round()
        name = r.pick(env.names())
        session = env.honest.get(name) or dict(env.others).get(name, "")
        if r.chance(40):
            session = _session(r, env)
        request = pb.DeclineTaskRequest(
            session_id=session, round=fuzz_int(r, rnd["number"] if rnd else 1),
            nonce=_nonce(r, rnd["nonces"] if rnd else None, name),
            reason=fuzz_text(r, ["TRAINING_FAILED", "BUDGET_EXHAUSTED", "X" * 64, "X" * 65], max_len=70),
            message=fuzz_text(r, ["out of budget", "m" * 1024, "m" * 1025], max_len=100))
        if r.bool():
            request.privacy.CopyFrom(_spend(r))
        return request
    if rpc == "Heartbeat":
        return pb.HeartbeatRequest(session_id=_session(r, env))
    if rpc in ("SecAggPoll", "SecAggSubmit"):
        rnd = env.open_round()
        name = r.pick(env.names())
        session = env.honest.get(name) or dict(env.others).get(name, "")
        if r.chance(40):
            session = _session(r, env)
        where = dict(session=session, round=fuzz_int(r, rnd["number"] if rnd else 1),
                     nonce=_nonce(r, rnd["nonces"] if rnd else None, name))
        secagg = _fc["secagg"]
        if rpc == "SecAggPoll":
            return secagg.poll_request(r, env, session=where["session"], round_number=where["round"],
                                       nonce=where["nonce"])
        return secagg.submit_request(r, env, name=name, session=where["session"], round_number=where["round"],
                                     nonce=where["nonce"])
    raise AssertionError(rpc)


_REQUEST = {
    "Join": "JoinRequest", "PollTask": "PollTaskRequest", "DownloadModel": "DownloadModelRequest",
    "UploadUpdate": "UploadUpdateRequest", "ReportEvaluation": "ReportEvaluationRequest",
    "DeclineTask": "DeclineTaskRequest", "Heartbeat": "HeartbeatRequest",
    # Secure aggregation: every stage (CONSISTENCY_CHECK too) and payload; deep with FUZZ_SECAGG=1.
    "SecAggPoll": "SecAggPollRequest", "SecAggSubmit": "SecAggSubmitRequest",
}
RPCS = list(_REQUEST)


def _raw(r: ByteReader, rpc: str) -> Any:
    """Fuzz bytes as the request message. gRPC answers a DecodeError itself; counted,
    then the handler gets what parsed before the error."""
    from google.protobuf.message import DecodeError

    cls = getattr(pb, _REQUEST[rpc])
    message = cls()
    try:
        message.MergeFromString(r.blob(r.pick([64, 512, 4096])))
    except DecodeError:
        stats["decode_error"] += 1
    except Exception as e:  # noqa: BLE001 - parsing must only ever raise DecodeError
        raise Finding(f"{rpc}: parsing raised {type(e).__name__}, not DecodeError", e) from e
    return message


# --------------------------------------------------------------------------- checks


def _check_abort(rpc: str, a: Aborted, *, stream_broken: bool) -> None:
    code = a.code
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        raise Finding(f"{rpc}: aborted with {code.name} ({a.details!r}): an unexpected exception in the handler",
                      a.cause)
    if a.status is None:
        if stream_broken and code == grpc.StatusCode.CANCELLED:
            stats[f"{rpc}:CANCELLED"] += 1
            return
        raise Finding(f"{rpc}: plain abort {code} {a.details!r}, without a google.rpc.Status")
    md = dict(a.status.trailing_metadata or ())
    blob = md.get("grpc-status-details-bin")
    if blob is None:
        raise Finding(f"{rpc}: status without grpc-status-details-bin")
    st = status_pb2.Status.FromString(blob)
    if st.code != code.value[0] or code == grpc.StatusCode.OK:
        raise Finding(f"{rpc}: status code {st.code} does not match {code}")
    infos = []
    for detail in st.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    if len(infos) != 1 or infos[0].domain != "fedcollab.dev" or not _REASON.match(infos[0].reason):
        raise Finding(f"{rpc}: status needs one fedcollab.dev ErrorInfo with an UPPER_SNAKE reason, got {infos}")
    # As gRPC counts it: grpc-message percent-encoded, every entry + 32 bytes (HPACK).
    message = a.details.encode()
    size = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in message) + len(blob) + 2 * 32 + 35
    if size > MAX_STATUS_BYTES:
        raise Finding(f"{rpc}: error status {infos[0].reason} of {size} bytes (message {len(a.details)} chars): "
                      f"over gRPC's 8 KiB metadata limit, clients get RESOURCE_EXHAUSTED instead")
    stats[f"{rpc}:{infos[0].reason}"] += 1


def _check_ok(rpc: str, env: Env, request: Any, response: Any) -> None:
    stats[f"{rpc}:OK"] += 1
    if rpc == "UploadUpdate" and response.bytes_received != env.total_bytes:
        raise Finding(f"upload accepted with {response.bytes_received} of {env.total_bytes} bytes")
    if rpc == "DownloadModel":
        expect = request.offset
        for chunk in response:
            if chunk.chunk.offset != expect or hashlib.sha256(chunk.chunk.data).digest() != chunk.chunk.sha256:
                raise Finding("download chunk out of order or with a wrong hash")
            expect += len(chunk.chunk.data)


def _check_after(env: Env, joined: set[str]) -> None:
    """The federation still works: the round driver is alive and the honest
    institutions' sessions answer."""
    eng = env.engine
    if eng.failure is not None:
        if "internal error" in eng.failure:
            raise Finding(f"round driver died: {eng.failure}", _errors.last_exception())
        return  # a legitimate end (e.g. every institution's budget exhausted): rebuilt by one_input
    if not env.thread.is_alive() and not eng.finished:
        raise Finding("round driver thread ended without a failure or the end of the study")
    exhausted = getattr(eng, "_exhausted", set())
    # Every honest session heartbeats once per half lease; after each input, one of them
    # in turn, and any the input may have touched, must still answer.
    now = time.monotonic()
    names = list(env.honest)
    if now - env.last_sweep > HEARTBEAT_S:
        env.last_sweep = now
    else:
        names = [n for n in names if n in joined or n in exhausted] + [names[stats["inputs"] % len(names)]]
    for name in dict.fromkeys(names):
        if name in exhausted:  # declined for good: a fresh honest institution takes its place
            del env.honest[name]
            env.renamed += 1
            name = f"honest{env.renamed}"
            env.rejoin(name)
            continue
        context = FakeContext()
        try:
            lease = env.servicer.Heartbeat(pb.HeartbeatRequest(session_id=env.honest[name]), context)
        except Aborted as a:
            if name in joined:  # the input joined as this institution, replacing our session
                env.rejoin(name)
                continue
            raise Finding(f"honest {name}'s heartbeat failed: {a.code} {a.details!r}", a.cause) from a
        if not lease.lease_seconds > 0:
            raise Finding(f"honest heartbeat returned lease {lease.lease_seconds}")
    model = eng.current_model
    if model.version != env.checked_version:
        env.checked_version = model.version
        from safetensors.torch import load_file

        for key, t in load_file(str(model.path)).items():
            if not torch.isfinite(t).all():
                raise Finding(f"committed model v{model.version} holds NaN/Inf in {key!r}")


# --------------------------------------------------------------------------- the target

class _ErrorLog(logging.Handler):
    """Keeps the coordinator's logged exceptions (log.exception), to chain them to the
    finding they explain (the round driver logs its error and stops)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=20)

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.records.append(record)

    def last_exception(self) -> BaseException | None:
        for record in reversed(self.records):
            if record.exc_info and record.exc_info[1] is not None:
                return record.exc_info[1]
        return None


_errors = _ErrorLog()
stats: collections.Counter[str] = collections.Counter()
_last_report = time.monotonic()
_env: Env | None = None
_env_lock = threading.Lock()


def report(force: bool = False) -> None:
    """Every 60 s (and at the end of tests): outcomes so far, on stderr and as JSON in
    $FUZZ_STATS."""
    global _last_report
    now = time.monotonic()
    if not force and now - _last_report < 60:
        return
    _last_report = now
    ok = sum(v for k, v in stats.items() if k.endswith(":OK"))
    rejected = sum(v for k, v in stats.items() if ":" in k and not k.endswith(":OK"))
    print(f"\n[fuzz] {stats['inputs']} inputs: {ok} returned, {rejected} rejected, {stats['decode_error']} "
          f"decode errors, {len([k for k in stats if ':' in k])} distinct outcomes", file=sys.stderr)
    if os.environ.get("FUZZ_STATS"):
        import json

        Path(os.environ["FUZZ_STATS"]).write_text(json.dumps(dict(sorted(stats.items())), indent=1))


def env() -> Env:
    global _env
    with _env_lock:
        if _env is None:
            logger = logging.getLogger("fedcollab")
            _saved_logging[:] = [logger.level, logger.propagate]
            if os.environ.get("FUZZ_LOG") == "1":
                logging.basicConfig(level=logging.INFO, format="%(threadName)s %(name)s: %(message)s")
            else:
                logger.setLevel(logging.ERROR)
                logger.propagate = False
            logger.addHandler(_errors)
            _env = Env()
            atexit.register(shutdown)
        return _env


_saved_logging: list[Any] = []


def shutdown() -> None:
    global _env
    with _env_lock:
        if _env is not None:
            _env.close()
            _env = None
            logger = logging.getLogger("fedcollab")
            logger.removeHandler(_errors)
            if _saved_logging:
                logger.setLevel(_saved_logging[0])
                logger.propagate = _saved_logging[1]


def _call(env_: Env, rpc: str, request: Any, context: FakeContext, broken_at: int | None = None) -> Any:
    handler = getattr(env_.servicer, rpc)
    if rpc == "UploadUpdate":
        def stream() -> Iterator[Any]:
            for i, m in enumerate(request):
                if i == broken_at:
                    raise ClientGone("client went away")
                yield m
            if broken_at is not None and broken_at >= len(request):
                raise ClientGone("client went away")
        return handler(stream(), context)
    response = handler(request, context)
    if rpc == "DownloadModel":
        return list(response)  # a generator: the work happens as it is drained
    return response


def one_input(data: bytes) -> None:
    """One fuzz input: one RPC against the shared coordinator, then the invariants."""
    e = env()
    if e.engine.failure is not None and "internal error" not in e.engine.failure:
        shutdown()  # the study ended legitimately: start a fresh coordinator
        e = env()
    r = ByteReader(data)
    stats["inputs"] += 1
    report()
    rpc = RPCS[r.uint(1) % len(RPCS)]
    raw = r.chance(64)
    broken_at = None
    if rpc == "UploadUpdate":
        if raw:
            request = [_raw(r, rpc) for _ in range(r.int_in(1, 6))]
        else:
            request, broken_at = _upload_messages(r, e)
    else:
        request = _raw(r, rpc) if raw else _structured(r, e, rpc)
    context = FakeContext(caller=_caller(r, e), active=r.chance(16),
                          remaining=r.pick([None, None, 0.01, 0.6, 0.0, -1.0]))
    joined: set[str] = set()
    try:
        response = _call(e, rpc, request, context, broken_at)
    except Aborted as a:
        _check_abort(rpc, a, stream_broken=broken_at is not None)
    except Finding:
        raise
    except Exception as ex:
        raise Finding(f"{rpc} raised {type(ex).__name__}: {str(ex)[:500]}", ex) from ex
    else:
        _check_ok(rpc, e, request, response)
        if rpc == "Join":
            caller = getattr(context, "caller", None)
            name = caller.name if caller is not None else request.institution
            joined.add(name)
            if caller is None and not _INSTITUTION.fullmatch(name):
                raise Finding(f"Join accepted the institution name {name[:80]!r}, outside "
                              "[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
            if name not in e.honest:
                e.others.append((name, response.session_id))
    _check_after(e, joined)


# --------------------------------------------------------------------------- seeds


def write_seeds(folder: Path) -> None:
    """Inputs that take the "right value" branch everywhere: one valid request per RPC
    (an accepted upload for each honest institution), plus raw serialized requests."""
    _import_fedcollab()
    folder.mkdir(parents=True, exist_ok=True)
    for i, rpc in enumerate(RPCS):
        (folder / f"structured-{rpc}").write_bytes(bytes([i, 0]) + bytes(64))
    beta = RPCS.index("UploadUpdate")
    # names() lists alpha, beta: pick index 1 -> beta (first pick after rpc, raw and fill choice).
    (folder / "structured-UploadUpdate-beta").write_bytes(bytes([beta, 0, 1]) + bytes(64))
    raws = {
        "Join": pb.JoinRequest(institution="gamma", num_train_examples=5),
        "PollTask": pb.PollTaskRequest(session_id="x", wait_seconds=0.001),
        "DownloadModel": pb.DownloadModelRequest(session_id="x", sha256="00" * 32, offset=3),
        "UploadUpdate": pb.UploadUpdateRequest(header=pb.UpdateHeader(session_id="x", round=1, num_examples=3)),
        "ReportEvaluation": pb.ReportEvaluationRequest(session_id="x", round=1, loss=1.0, accuracy=0.5),
        "DeclineTask": pb.DeclineTaskRequest(session_id="x", round=1, reason="BUDGET_EXHAUSTED"),
        "Heartbeat": pb.HeartbeatRequest(session_id="x"),
        "SecAggPoll": pb.SecAggPollRequest(session_id="x", round=1, stage=pb.SEC_AGG_STAGE_CONSISTENCY_CHECK),
        "SecAggSubmit": pb.SecAggSubmitRequest(session_id="x", round=1, consistency=pb.ConsistencyPayload(
            certificate=b"-----BEGIN CERTIFICATE-----", signature=b"sig")),
    }
    for i, rpc in enumerate(RPCS):
        blob = raws[rpc].SerializeToString()
        # rpc, raw (>= 192), [UploadUpdate: 1 message], blob size choice 64 -> length byte, blob
        prefix = bytes([i, 255]) + (bytes([0]) if rpc == "UploadUpdate" else b"") + bytes([0])
        (folder / f"raw-{rpc}").write_bytes(prefix + bytes([len(blob)]) + blob)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        write_seeds(Path(sys.argv[2]))
        return
    import atheris

    with atheris.instrument_imports(include=["fedcollab"]):
        _import_fedcollab()
    env()  # build the coordinator before the clock starts
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
