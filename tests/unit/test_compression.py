"""Update compression: each codec's round trip and size, decoding chunk by chunk in any
split and again from the spool, the coordinator's refusal of malformed streams, and
error feedback at the institution."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from fedcollab.compression import (
    EncodingError,
    compression_from_proto,
    compression_to_proto,
    encode_update,
    encoded_nbytes,
    select_topk,
    topk_count,
    update_decoder,
)
from fedcollab.compression._topk import SPAN, TopkDecoder
from fedcollab.config import (
    CentralDPConfig,
    CompressionConfig,
    ModelConfig,
    SecureAggregationConfig,
    StudyConfig,
)
from fedcollab.coordinator._round_sum import RoundSum
from fedcollab.coordinator._upload import UploadReceiver
from fedcollab.errors import Rejected
from fedcollab.institution._error_feedback import residual_path, with_error_feedback
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import iter_chunks, iter_stream, manifest_of, stream_sha256

# A weight matrix, an empty tensor, a tensor of much smaller values (int8 blocks must
# not span tensors), a float64 one and one of odd length: 407 + 300 + 6 + 5 elements.
UPDATE = {
    "w": torch.randn(37, 11, generator=torch.Generator().manual_seed(0)),
    "empty": torch.zeros(0),
    "small": torch.randn(300, generator=torch.Generator().manual_seed(1)) * 1e-4,
    "h": torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
    "b": torch.randn(5, generator=torch.Generator().manual_seed(3)),
}
MANIFEST = manifest_of(UPDATE)
NUMEL = 718
NONE, FP16, BF16 = CompressionConfig(), CompressionConfig(method="fp16"), CompressionConfig(method="bf16")
INT8 = CompressionConfig(method="int8", block_elements=16)
TOPK = CompressionConfig(method="topk", topk_fraction=0.05)
ALL = [NONE, FP16, BF16, INT8, TOPK]


def _decode(compression: CompressionConfig, stream: list[torch.Tensor], *, piece: int,
            manifest: tensor_pb2.ModelManifest = MANIFEST) -> dict[str, torch.Tensor]:
    """Feeds the encoded stream in pieces of `piece` bytes and folds what comes out."""
    decoder = update_decoder(manifest, compression=compression)
    out = [torch.zeros(math.prod(s.shape), dtype=torch.float64) for s in manifest.tensors]
    for data in iter_stream(stream, piece_bytes=piece):
        for p in decoder.feed(bytes(data)):
            out[p.index][p.start : p.start + len(p.values)] += p.values.double()
    assert decoder.complete
    return {s.name: t for s, t in zip(manifest.tensors, out, strict=True)}


def _flat(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in update.values()])


# ------------------------------------------------------------------ config
def test_config_refuses_settings_of_another_method_and_out_of_range_values() -> None:
    with pytest.raises(ValidationError, match="topk_fraction applies only to method = 'topk'"):
        CompressionConfig(method="int8", topk_fraction=0.1)
    with pytest.raises(ValidationError, match="block_elements applies only to method = 'int8'"):
        CompressionConfig(method="fp16", block_elements=64)
    for bad in ({"method": "topk", "topk_fraction": 0.0}, {"method": "topk", "topk_fraction": 1.5},
                {"method": "int8", "block_elements": 4}, {"method": "zstd"}):
        with pytest.raises(ValidationError):
            CompressionConfig(**bad)
    assert CompressionConfig(method="topk", topk_fraction=1.0).topk_fraction == 1.0


def test_config_refuses_compression_with_secure_aggregation_but_allows_central_dp() -> None:
    model = ModelConfig(kind="mlp", params={})
    with pytest.raises(ValidationError, match="cannot run with secure_aggregation"):
        StudyConfig(model=model, min_institutions=3, secure_aggregation=SecureAggregationConfig(),
                    compression=CompressionConfig(method="int8"))
    StudyConfig(model=model, min_institutions=3, secure_aggregation=SecureAggregationConfig())  # none is fine
    study = StudyConfig(model=model, central_dp=CentralDPConfig(clip_norm=1.0, noise_multiplier=1.0),
                        compression=CompressionConfig(method="topk"))
    assert study.compression.topk_fraction == 0.01


def test_proto_round_trip_and_invalid_settings() -> None:
    for c in ALL:
        assert compression_from_proto(compression_to_proto(c)) == c
    assert compression_from_proto(pb.Compression()) == NONE  # unset: a peer that predates compression
    with pytest.raises(EncodingError, match="unknown compression method 42") as e:
        compression_from_proto(pb.Compression(method=42))
    assert e.value.reason == "ENCODING_INVALID"
    with pytest.raises(EncodingError, match="topk_fraction") as e:
        compression_from_proto(pb.Compression(method=pb.COMPRESSION_METHOD_TOPK, topk_fraction=2.0))
    assert e.value.reason == "ENCODING_INVALID"


# ------------------------------------------------------------------ codecs
@pytest.mark.parametrize("compression", ALL, ids=lambda c: c.method)
def test_decoding_is_the_same_whatever_the_chunk_split(compression: CompressionConfig) -> None:
    stream = encode_update(list(UPDATE.values()), compression=compression)
    assert sum(t.numel() * t.element_size() for t in stream) == encoded_nbytes(MANIFEST, compression=compression)
    whole = _decode(compression, stream, piece=1 << 20)
    for piece in (1, 3, 5, 8, 13, 100):  # splits records, scales, elements
        split = _decode(compression, stream, piece=piece)
        for name in UPDATE:
            assert torch.equal(split[name], whole[name]), (piece, name)


def test_encoded_sizes() -> None:
    assert encoded_nbytes(MANIFEST, compression=NONE) == 712 * 4 + 6 * 8
    assert encoded_nbytes(MANIFEST, compression=FP16) == NUMEL * 2
    assert encoded_nbytes(MANIFEST, compression=BF16) == NUMEL * 2
    blocks = math.ceil(407 / 16) + math.ceil(300 / 16) + 1 + 1  # per tensor: no block spans two
    assert encoded_nbytes(MANIFEST, compression=INT8) == NUMEL + 4 * blocks
    assert encoded_nbytes(MANIFEST, compression=TOPK) == math.ceil(0.05 * NUMEL) * 8
    assert topk_count(NUMEL, fraction=1e-9) == 1 and topk_count(NUMEL, fraction=1.0) == NUMEL


@pytest.mark.parametrize(("compression", "bound"), [(FP16, 2.0**-11), (BF16, 2.0**-8)], ids=["fp16", "bf16"])
def test_half_casts_are_within_half_an_ulp(compression: CompressionConfig, bound: float) -> None:
    decoded = _decode(compression, encode_update(list(UPDATE.values()), compression=compression), piece=64)
    for name, t in UPDATE.items():
        x = t.reshape(-1).double()
        # relative for normal numbers, half the smallest subnormal step below them
        assert bool(((decoded[name] - x).abs() <= bound * x.abs() + 2.0**-25).all()), name


def test_half_casts_saturate_instead_of_overflowing() -> None:
    big = {"x": torch.tensor([1e6, -1e6, 1.0])}
    decoded = _decode(FP16, encode_update(list(big.values()), compression=FP16), piece=4, manifest=manifest_of(big))
    assert decoded["x"].tolist() == [65504.0, -65504.0, 1.0]


def test_int8_error_is_at_most_half_a_step_of_each_blocks_scale() -> None:
    decoded = _decode(INT8, encode_update(list(UPDATE.values()), compression=INT8), piece=7)
    for name, t in UPDATE.items():
        x = t.reshape(-1).to(torch.float32)
        if not x.numel():
            continue
        blocks = torch.nn.functional.pad(x, (0, -x.numel() % 16)).reshape(-1, 16)
        scale = (blocks.abs().amax(dim=1) / 127).repeat_interleave(16)[: x.numel()].double()
        err = (decoded[name] - x.double()).abs()
        assert bool((err <= scale / 2 * (1 + 1e-5) + 1e-12).all()), name
        assert float(err.max()) > 0 or name == "empty"
    # a block never spans two tensors: the small tensor keeps its own precision
    assert float((decoded["small"] - UPDATE["small"].double()).abs().max()) < 1e-5


def test_int8_zero_block_and_exact_steps() -> None:
    x = {"z": torch.zeros(20), "s": torch.arange(-127, 128, dtype=torch.float32) * 0.5}  # scale 0.5 in one block
    one_block = CompressionConfig(method="int8", block_elements=256)
    decoded = _decode(one_block, encode_update(list(x.values()), compression=one_block), piece=9,
                      manifest=manifest_of(x))
    assert decoded["z"].abs().sum() == 0
    torch.testing.assert_close(decoded["s"], x["s"].double(), rtol=0, atol=1e-6)


def test_topk_sends_exactly_the_largest_entries() -> None:
    stream = encode_update(list(UPDATE.values()), compression=TOPK)
    decoded = _flat(_decode(TOPK, stream, piece=5))
    x = _flat(UPDATE).to(torch.float32).double()
    k = math.ceil(0.05 * NUMEL)
    kept = decoded.nonzero().reshape(-1)
    assert kept.numel() == k
    assert torch.equal(decoded[kept], x[kept]), "kept entries are exact"
    assert float(x[kept].abs().min()) >= float(x[decoded == 0].abs().max()), "and they are the largest"


def test_topk_encoding_of_an_already_sparse_update_is_lossless() -> None:
    """Error feedback hands the client deltas with at most k non-zeros: they must arrive as they are."""
    sparse = {k: torch.where(v.abs() > 2.0, v, torch.zeros_like(v)) for k, v in UPDATE.items()}
    assert int(_flat(sparse).count_nonzero()) <= math.ceil(0.05 * NUMEL)
    decoded = _decode(TOPK, encode_update(list(sparse.values()), compression=TOPK), piece=3)
    for name, t in sparse.items():
        assert torch.equal(decoded[name], t.reshape(-1).double())


def test_topk_pieces_stay_within_one_window_and_one_tensor() -> None:
    big = {"a": torch.zeros(3 * SPAN + 7), "b": torch.zeros(11)}
    big["a"][[0, 5, SPAN + 1, 3 * SPAN + 6]] = torch.tensor([1.0, -2.0, 3.0, 4.0])
    big["b"][[0, 10]] = torch.tensor([5.0, 6.0])
    compression = CompressionConfig(method="topk", topk_fraction=6 / (3 * SPAN + 18))
    manifest = manifest_of(big)
    decoder = update_decoder(manifest, compression=compression)
    pieces = list(decoder.feed(bytes(encode_update(list(big.values()), compression=compression)[0].numpy())))
    assert [(p.index, p.start, len(p.values)) for p in pieces] == [(0, 0, 6), (0, SPAN + 1, 1), (0, 3 * SPAN + 6, 1),
                                                                   (1, 0, 11)]
    assert all(len(p.values) <= SPAN for p in pieces)


def test_topk_indices_are_int64_beyond_four_billion_elements() -> None:
    manifest = tensor_pb2.ModelManifest(tensors=[
        tensor_pb2.TensorSpec(name="huge", dtype=tensor_pb2.TENSOR_DTYPE_FLOAT32, shape=[2**32 + 5]),
        tensor_pb2.TensorSpec(name="b", dtype=tensor_pb2.TENSOR_DTYPE_FLOAT32, shape=[3])])
    compression = CompressionConfig(method="topk", topk_fraction=1e-9)  # k = 5
    decoder = TopkDecoder(manifest=manifest, fraction=compression.topk_fraction)
    assert decoder.total == 5 * 12
    records = np.array([(0, 1.0), (2**32 + 4, 2.0), (2**32 + 5, 3.0), (2**32 + 6, 4.0), (2**32 + 7, 5.0)],
                       dtype=[("index", "<i8"), ("value", "<f4")])
    pieces = [p for data in (records.tobytes()[:17], records.tobytes()[17:]) for p in decoder.feed(data)]
    assert decoder.complete
    assert [(p.index, p.start, p.values.tolist()) for p in pieces] == [
        (0, 0, [1.0]), (0, 2**32 + 4, [2.0]), (1, 0, [3.0, 4.0, 5.0])]


# ------------------------------------------------------------------ the coordinator's checks
def _header(compression: CompressionConfig, stream: list[torch.Tensor], **overrides: object) -> pb.UpdateHeader:
    values: dict[str, object] = dict(
        manifest=MANIFEST, total_bytes=sum(t.numel() * t.element_size() for t in stream),
        sha256=stream_sha256(stream), num_examples=10, encoding=compression_to_proto(compression))
    values.update(overrides)
    return pb.UpdateHeader(**values)


def _receive(tmp: Path, compression: CompressionConfig, stream: list[torch.Tensor], *, chunk: int = 64,
             name: str = "x", **header: object) -> tuple[UploadReceiver, list[tensor_pb2.Chunk]]:
    receiver = UploadReceiver(header=_header(compression, stream, **header), manifest=MANIFEST, max_chunk_bytes=1024,
                              spool=tmp / f"{name}.upload", compression=compression)
    return receiver, list(iter_chunks(stream, chunk_bytes=chunk))


def _refusal(tmp: Path, compression: CompressionConfig, stream: list[torch.Tensor], **kw: object) -> Rejected:
    with pytest.raises(Rejected) as e:
        receiver, chunks = _receive(tmp, compression, stream, **kw)  # type: ignore[arg-type]
        for c in chunks:
            list(receiver.accept(c))
        receiver.finish()
    return e.value


def _topk_records(indices: list[int], values: list[float] | None = None) -> list[torch.Tensor]:
    records = np.zeros(len(indices), dtype=[("index", "<u4"), ("value", "<f4")])
    records["index"] = indices
    records["value"] = values if values is not None else [1.0] * len(indices)
    return [torch.from_numpy(records.view(np.uint8))]


def _int8_stream(edit) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    stream = [t.clone() for t in encode_update(list(UPDATE.values()), compression=INT8)]
    edit(stream[0])  # tensor "w": records of 4 + 16 bytes
    return stream


K = math.ceil(0.05 * NUMEL)  # 36 records


@pytest.mark.parametrize(("label", "study", "stream", "header", "reason", "code"), [
    ("fp16 to an int8 study", INT8, encode_update(list(UPDATE.values()), compression=FP16),
     {"encoding": compression_to_proto(FP16)}, "ENCODING_MISMATCH", grpc.StatusCode.INVALID_ARGUMENT),
    ("no encoding in a top-k study", TOPK, encode_update(list(UPDATE.values()), compression=TOPK),
     {"encoding": pb.Compression()}, "ENCODING_MISMATCH", grpc.StatusCode.INVALID_ARGUMENT),
    ("another top-k fraction", TOPK, encode_update(list(UPDATE.values()), compression=TOPK),
     {"encoding": pb.Compression(method=pb.COMPRESSION_METHOD_TOPK, topk_fraction=0.5)}, "ENCODING_MISMATCH",
     grpc.StatusCode.INVALID_ARGUMENT),
    ("raw total_bytes in an fp16 study", FP16, encode_update(list(UPDATE.values()), compression=FP16),
     {"total_bytes": 712 * 4 + 6 * 8}, "SIZE_MISMATCH", grpc.StatusCode.INVALID_ARGUMENT),
    ("more records than k", TOPK, _topk_records(list(range(K + 1))), {"total_bytes": K * 8}, "SIZE_MISMATCH",
     grpc.StatusCode.INVALID_ARGUMENT),
    ("fewer records than k", TOPK, _topk_records(list(range(K - 1))), {"total_bytes": K * 8}, "UPDATE_INCOMPLETE",
     grpc.StatusCode.INVALID_ARGUMENT),
    ("index past the update", TOPK, _topk_records([*range(K - 1), NUMEL]), {}, "INDEX_OUT_OF_RANGE",
     grpc.StatusCode.INVALID_ARGUMENT),
    ("duplicate index", TOPK, _topk_records([*range(K - 1), K - 2]), {}, "INDEX_NOT_INCREASING",
     grpc.StatusCode.INVALID_ARGUMENT),
    ("decreasing across chunks", TOPK, _topk_records([*range(10, 20), 3, *range(21, 21 + K - 11)]), {},
     "INDEX_NOT_INCREASING", grpc.StatusCode.INVALID_ARGUMENT),
    ("NaN top-k value", TOPK, _topk_records(list(range(K)), [1.0] * 30 + [math.nan] + [1.0] * (K - 31)), {},
     "NON_FINITE_VALUES", grpc.StatusCode.INVALID_ARGUMENT),
    ("Inf int8 scale", INT8, _int8_stream(lambda s: s[20:24].copy_(
        torch.tensor([math.inf]).view(torch.uint8))), {}, "NON_FINITE_VALUES", grpc.StatusCode.INVALID_ARGUMENT),
    ("negative int8 scale", INT8, _int8_stream(lambda s: s[40:44].copy_(
        torch.tensor([-0.5]).view(torch.uint8))), {}, "INVALID_SCALE", grpc.StatusCode.INVALID_ARGUMENT),
    ("int8 scale that overflows float32", INT8, _int8_stream(lambda s: s[0:4].copy_(
        torch.tensor([1e37]).view(torch.uint8))), {}, "INVALID_SCALE", grpc.StatusCode.INVALID_ARGUMENT),
    ("int8 value -128", INT8, _int8_stream(lambda s: s.__setitem__(30, 128)), {}, "VALUE_OUT_OF_RANGE",
     grpc.StatusCode.INVALID_ARGUMENT),
    ("Inf in fp16", FP16, [torch.cat([encode_update(list(UPDATE.values()), compression=FP16)[0][:-1],
                                      torch.tensor([math.inf], dtype=torch.float16)]),
                           *encode_update(list(UPDATE.values()), compression=FP16)[1:]], {},
     "NON_FINITE_VALUES", grpc.StatusCode.INVALID_ARGUMENT),
    ("bytes that are not the hashed ones", INT8, encode_update(list(UPDATE.values()), compression=INT8),
     {"sha256": bytes(32)}, "UPDATE_HASH_MISMATCH", grpc.StatusCode.DATA_LOSS),
])
def test_malformed_streams_are_refused_with_their_reason(tmp_path: Path, label: str, study: CompressionConfig,
                                                         stream: list[torch.Tensor], header: dict, reason: str,
                                                         code: grpc.StatusCode) -> None:
    refusal = _refusal(tmp_path, study, stream, **header)
    assert (refusal.reason, refusal.code) == (reason, code), f"{label}: {refusal}"


def test_a_stream_longer_than_its_encoding_is_refused_at_the_chunk(tmp_path: Path) -> None:
    stream = _topk_records(list(range(K + 1)))
    receiver, chunks = _receive(tmp_path, TOPK, stream, chunk=K * 8 - 4, total_bytes=K * 8)
    list(receiver.accept(chunks[0]))
    with pytest.raises(Rejected) as e:
        receiver.accept(chunks[1])
    assert e.value.reason == "SIZE_MISMATCH" and e.value.metadata["expected"] == str(K * 8)


# ------------------------------------------------------------------ folding, spools, central DP
def _arrive(total: RoundSum, name: str, receiver: UploadReceiver, chunks: list) -> None:
    for c in chunks:
        assert total.fold(name, receiver.accept(c), upto=receiver.received)


@pytest.mark.parametrize("compression", [INT8, TOPK, FP16], ids=lambda c: c.method)
def test_a_failed_upload_is_rebuilt_out_from_the_decoded_spools(tmp_path: Path, compression: CompressionConfig) -> None:
    torch.manual_seed(4)
    updates = {n: [torch.randn(t.shape, dtype=t.dtype) for t in UPDATE.values()] for n in "abc"}
    streams = {n: encode_update(u, compression=compression) for n, u in updates.items()}
    total = RoundSum(manifest=MANIFEST, piece_bytes=24)  # spools re-read in blocks that split records
    receivers = {}
    for weight, n in enumerate("abc", start=1):
        receivers[n], chunks = _receive(tmp_path, compression, streams[n], chunk=40, name=n)
        total.add(n, receiver=receivers[n], weight=float(weight))
        _arrive(total, n, receivers[n], chunks if n != "b" else chunks[: len(chunks) // 2])
    total.exclude("b")  # b broke off half-way: the sum is rebuilt from a's and c's spools
    assert total.rebuilds == 1
    for n in "ac":
        receivers[n].finish()
        assert total.complete(n)
    assert sorted(total.close()) == ["a", "c"]
    new = total.apply({k: torch.zeros_like(v) for k, v in UPDATE.items()})
    decoded = {n: _decode(compression, streams[n], piece=1 << 20) for n in "ac"}
    for name in UPDATE:
        expected = (1 * decoded["a"][name] + 3 * decoded["c"][name]) / 4
        torch.testing.assert_close(new[name].reshape(-1).double(), expected, rtol=0, atol=1e-6)


def test_central_dp_clips_the_decoded_topk_update(tmp_path: Path) -> None:
    """Central DP works on what the coordinator decodes: the norm of the sparse update."""
    update = [t * 10 for t in UPDATE.values()]
    stream = encode_update(update, compression=TOPK)
    decoded = _decode(TOPK, stream, piece=1 << 20)
    norm = float(_flat(decoded).norm())
    total = RoundSum(manifest=MANIFEST, piece_bytes=32, clip_norm=norm / 4)
    receiver, chunks = _receive(tmp_path, TOPK, stream, chunk=40)
    total.add("a", receiver=receiver, weight=10.0)
    _arrive(total, "a", receiver, chunks)
    receiver.finish()
    assert total.finish("a") and total.complete("a")
    assert total.update_norms() == pytest.approx([norm], rel=1e-6)
    total.close()
    new = total.apply({k: torch.zeros_like(v) for k, v in UPDATE.items()})
    for name in UPDATE:
        torch.testing.assert_close(new[name].reshape(-1).double(), decoded[name] / 4, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ error feedback
def _task(compression: CompressionConfig, round_number: int, manifest: tensor_pb2.ModelManifest = MANIFEST
          ) -> pb.Task:
    return pb.Task(kind=pb.TASK_KIND_TRAIN, round=round_number, manifest=manifest,
                   compression=compression_to_proto(compression))


def test_error_feedback_sends_and_keeps_everything_over_rounds(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    truth = torch.zeros(NUMEL, dtype=torch.float64)
    sent_total = torch.zeros(NUMEL, dtype=torch.float64)
    k = topk_count(NUMEL, fraction=TOPK.topk_fraction)
    for r in range(1, 9):
        deltas = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in UPDATE.values()]
        sent = with_error_feedback(state_dir=tmp_path, study="s", task=_task(TOPK, r), deltas=deltas)
        assert [(s.shape, s.dtype) for s in sent] == [(d.shape, d.dtype) for d in deltas]
        flat_sent = torch.cat([s.reshape(-1).double() for s in sent])
        assert int(flat_sent.count_nonzero()) == k
        # what travels is exactly what the top-k encoding delivers
        decoded = _flat(_decode(TOPK, encode_update(sent, compression=TOPK), piece=1 << 20))
        assert torch.equal(decoded, flat_sent)
        truth += torch.cat([d.reshape(-1).double() for d in deltas])
        sent_total += flat_sent
    kept = load_file(str(residual_path(tmp_path, "s")))
    residual = torch.cat([kept[n].reshape(-1).double() for n in UPDATE])
    torch.testing.assert_close(sent_total + residual, truth, rtol=0, atol=1e-5)
    assert float(residual.abs().sum()) > 0


def test_error_feedback_adds_the_residual_before_selecting(tmp_path: Path) -> None:
    one = {"x": torch.zeros(10)}
    manifest = manifest_of(one)
    topk = CompressionConfig(method="topk", topk_fraction=0.1)  # k = 1
    first = with_error_feedback(state_dir=tmp_path, study="s", task=_task(topk, 1, manifest),
                                deltas=[torch.tensor([0.0, 3.0, 2.9, 0, 0, 0, 0, 0, 0, 0])])
    assert first[0].tolist() == [0.0, 3.0, 0, 0, 0, 0, 0, 0, 0, 0]
    # 2.9 was kept: with a new 0.2 it now beats this round's 3.0
    second = with_error_feedback(state_dir=tmp_path, study="s", task=_task(topk, 2, manifest),
                                 deltas=[torch.tensor([3.0, 0.0, 0.2, 0, 0, 0, 0, 0, 0, 0])])
    assert second[0][2].item() == pytest.approx(3.1) and int(second[0].count_nonzero()) == 1


def test_error_feedback_leaves_other_tasks_and_bad_updates_alone(tmp_path: Path) -> None:
    deltas = [t.clone() for t in UPDATE.values()]
    assert with_error_feedback(state_dir=tmp_path, study="s", task=_task(INT8, 1), deltas=deltas) is deltas
    assert not residual_path(tmp_path, "s").exists()
    with_error_feedback(state_dir=tmp_path, study="s", task=_task(TOPK, 1), deltas=deltas)
    before = residual_path(tmp_path, "s").read_bytes()
    diverged = [t.clone() for t in deltas]
    diverged[0][0, 0] = math.nan
    assert with_error_feedback(state_dir=tmp_path, study="s", task=_task(TOPK, 2), deltas=diverged) is diverged
    assert residual_path(tmp_path, "s").read_bytes() == before, "one diverged round must not poison the residual"
    other = {"y": torch.ones(4)}  # another model: the kept residual does not fit and is not used
    sent = with_error_feedback(state_dir=tmp_path, study="s", task=_task(CompressionConfig(
        method="topk", topk_fraction=0.5), 3, manifest_of(other)), deltas=[torch.ones(4)])
    assert int(sent[0].count_nonzero()) == 2 and sorted(load_file(str(residual_path(tmp_path, "s")))) == ["y"]


def test_select_topk_is_sorted_and_exact() -> None:
    x = torch.tensor([0.1, -5.0, 3.0, 0.0, 4.0])
    assert select_topk(x, k=3).tolist() == [1, 2, 4]
    assert select_topk(x, k=0).tolist() == []
