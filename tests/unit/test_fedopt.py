"""Server optimizers against Flower 1.41's own strategies, driven as its ServerApp drives
them; chunked steps against whole-tensor ones; the settings' validation."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from collections.abc import Iterable, Iterator  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedcollab.aggregation import OPTIMIZERS, ServerOptimizer, ServerOptimizerSettings  # noqa: E402

SHAPES = {"conv.weight": (4, 3, 3), "conv.bias": (4,), "fc.weight": (33, 17), "fc.bias": (1,)}
NUM_EXAMPLES = [13, 100, 7, 250]
# Per round: the scale of the deltas. Rounds 1-2 keep every |delta_t| well above sqrt(v_t)
# and round 3 well below, so FedYogi's sign(v_t - delta_t^2) is -1, then +1, by a margin no
# rounding can flip.
ROUND_SCALES = [1.0, 1.0, 0.01]


class FakeGrid(Grid):
    """Just enough of a Grid for configure_train: the connected node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self._node_ids = node_ids

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError


@pytest.fixture
def flower_task(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's Message reads the run id of the process's task, set by its runtime."""
    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    yield


def _round_deltas(rng: np.random.Generator, scale: float) -> list[dict[str, np.ndarray]]:
    """Each institution's delta: a shared direction of magnitude in [0.5, 1] * scale plus
    a spread of at most 0.1 * scale, so the weighted mean's magnitude is in [0.4, 1.1] * scale."""
    common = {k: rng.choice([-1.0, 1.0], size=s) * rng.uniform(0.5, 1.0, size=s) for k, s in SHAPES.items()}
    return [{k: (scale * (common[k] + rng.uniform(-0.1, 0.1, size=s))).astype(np.float32) for k, s in SHAPES.items()}
            for _ in NUM_EXAMPLES]


def _mean_delta(deltas: list[dict[str, np.ndarray]], key: str) -> torch.Tensor:
    """The coordinator's part: the example-weighted mean of the deltas."""
    total = sum(NUM_EXAMPLES)
    mean = sum(n * d[key].astype(np.float64) for n, d in zip(NUM_EXAMPLES, deltas, strict=True)) / total
    return torch.from_numpy(np.asarray(mean, dtype=np.float32)).reshape(-1)


def _flower_round(strategy, arrays: ArrayRecord, server_round: int,
                  deltas: list[dict[str, np.ndarray]]) -> ArrayRecord:
    node_ids = list(range(1, len(NUM_EXAMPLES) + 1))
    messages = sorted(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(node_ids)),
                      key=lambda m: m.metadata.dst_node_id)
    replies = []
    for msg, delta, n in zip(messages, deltas, NUM_EXAMPLES, strict=True):
        # A PyTorch client: loads the model in float32, trains, sends float32 back.
        received = msg.content["arrays"]
        trained = {k: Array(received[k].numpy().astype(np.float32) + delta[k]) for k in SHAPES}
        content = RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-examples": n})})
        replies.append(Message(content, reply_to=msg))
    new, _ = strategy.aggregate_train(server_round, replies)
    assert new is not None
    return new


def _chunks(numel: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """An arbitrary split of [0, numel) into contiguous chunks (sizes 1..70: both the
    vectorized and the scalar paths of torch's kernels)."""
    bounds, at = [], 0
    while at < numel:
        size = int(rng.integers(1, 71))
        bounds.append((at, min(numel, at + size)))
        at += size
    return bounds


CASES = [
    ("fedavgm", {"server_momentum": 0.9, "server_learning_rate": 1.0}, lambda: FedAvgM(server_momentum=0.9)),
    ("fedavgm", {"server_momentum": 0.0, "server_learning_rate": 0.7},
     lambda: FedAvgM(server_momentum=0.0, server_learning_rate=0.7)),
    ("fedavgm", {}, lambda: FedAvgM()),  # momentum 0, lr 1: plain FedAvg
    ("fedavgm", {"server_momentum": 0.5, "server_learning_rate": 0.3},
     lambda: FedAvgM(server_momentum=0.5, server_learning_rate=0.3)),
    ("fedadam", {}, lambda: FedAdam()),
    ("fedadam", {"eta": 0.05, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-2},
     lambda: FedAdam(eta=0.05, beta_1=0.5, beta_2=0.9, tau=1e-2)),
    ("fedyogi", {}, lambda: FedYogi()),
    ("fedyogi", {"eta": 0.2, "beta_1": 0.0, "beta_2": 0.5, "tau": 1e-1},
     lambda: FedYogi(eta=0.2, beta_1=0.0, beta_2=0.5, tau=1e-1)),
    ("fedadagrad", {}, lambda: FedAdagrad()),
    ("fedadagrad", {"eta": 0.3, "tau": 1e-2}, lambda: FedAdagrad(eta=0.3, tau=1e-2)),
]


@pytest.mark.parametrize(("name", "overrides", "make_flower"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_three_rounds_match_flower(flower_task: None, name: str, overrides: dict[str, float], make_flower) -> None:
    rng = np.random.default_rng(sum(map(ord, name)) + len(overrides))
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    strategy = make_flower()
    flower = ArrayRecord({k: Array(v) for k, v in base.items()})

    optimizer = ServerOptimizer(settings=ServerOptimizerSettings.defaults(name, **overrides))
    whole = {k: torch.from_numpy(v.copy()).reshape(-1) for k, v in base.items()}
    whole_state: dict[str, dict[str, torch.Tensor] | None] = dict.fromkeys(SHAPES)
    chunked = {k: v.clone() for k, v in whole.items()}
    # The chunked run keeps its state in one flat buffer per name and steps views of it.
    chunked_state = {k: optimizer.new_state(like=v) for k, v in chunked.items()}

    for server_round, scale in enumerate(ROUND_SCALES, start=1):
        deltas = _round_deltas(rng, scale)
        flower = _flower_round(strategy, flower, server_round, deltas)
        for key in SHAPES:
            mean = _mean_delta(deltas, key)
            whole_state[key] = optimizer.step_(params=whole[key], mean_delta=mean, state=whole_state[key],
                                               server_round=server_round)
            assert set(whole_state[key] or {}) == set(optimizer.state_names)
            for lo, hi in _chunks(len(mean), rng):
                views = {n: t[lo:hi] for n, t in chunked_state[key].items()}
                out = optimizer.step_(params=chunked[key][lo:hi], mean_delta=mean[lo:hi], state=views,
                                      server_round=server_round)
                assert all(out[n] is views[n] for n in views)  # updated in place
            expected = flower[key].numpy()
            np.testing.assert_allclose(whole[key].reshape(expected.shape).numpy(), expected, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} round {server_round} tensor {key}")
            # Chunking changes nothing: bitwise equal where we ran it; 2 ulp leave room for a
            # CPU whose vectorized and scalar kernel paths round differently.
            torch.testing.assert_close(chunked[key], whole[key], rtol=2.4e-7, atol=0)
            for n in optimizer.state_names:
                torch.testing.assert_close(chunked_state[key][n], whole_state[key][n], rtol=2.4e-7, atol=0)

    # The state matches Flower's, too (FedAdagrad's m_t is delta_t: it keeps only v_t).
    for n in optimizer.state_names:
        theirs = {"m_t": "m_t", "v_t": "v_t", "momentum": "momentum_vector"}[n]
        flower_state = getattr(strategy, theirs)
        for i, key in enumerate(SHAPES):
            ref = flower_state[i] if isinstance(flower_state, list) else flower_state[key]
            np.testing.assert_allclose(whole_state[key][n].reshape(ref.shape).numpy(), ref, rtol=1e-4, atol=1e-7,
                                       err_msg=f"{name} state {n} tensor {key}")


def test_state_names_and_defaults() -> None:
    def names(name: str, **kw: float) -> tuple[str, ...]:
        return ServerOptimizer(settings=ServerOptimizerSettings.defaults(name, **kw)).state_names

    assert names("fedavg") == ()
    assert names("fedavgm") == ()
    assert names("fedavgm", server_momentum=0.9) == ("momentum",)
    assert names("fedadam") == names("fedyogi") == ("m_t", "v_t")
    assert names("fedadagrad") == ("v_t",)
    for name, flower in [("fedadam", FedAdam()), ("fedyogi", FedYogi()), ("fedadagrad", FedAdagrad())]:
        s = ServerOptimizerSettings.defaults(name)
        assert (s.eta, s.tau) == (flower.eta, flower.tau)
        if name != "fedadagrad":
            assert (s.beta_1, s.beta_2) == (flower.beta_1, flower.beta_2)
    s, flower_m = ServerOptimizerSettings.defaults("fedavgm"), FedAvgM()
    assert (s.server_learning_rate, s.server_momentum) == (flower_m.server_learning_rate, flower_m.server_momentum)
    assert ServerOptimizerSettings.defaults("fedadam", eta=0.5).as_dict() == {
        "name": "fedadam", "eta": 0.5, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    assert set(OPTIMIZERS) == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}


def test_fedavg_and_plain_fedavgm_add_the_mean() -> None:
    params, delta = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 0.25, -1.0])
    for settings in (ServerOptimizerSettings.defaults("fedavg"), ServerOptimizerSettings.defaults("fedavgm")):
        p = params.clone()
        assert ServerOptimizer(settings=settings).step_(params=p, mean_delta=delta, state=None, server_round=1) == {}
        assert torch.equal(p, params + delta)


def test_float64_params_step_in_float64() -> None:
    opt = ServerOptimizer(settings=ServerOptimizerSettings.defaults("fedadam"))
    p = torch.zeros(3, dtype=torch.float64)
    state = opt.step_(params=p, mean_delta=torch.ones(3), state=None, server_round=1)
    assert p.dtype == state["m_t"].dtype == torch.float64


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("fedsgd", {}, "unknown server optimizer 'fedsgd'"),
    ("fedadam", {"beta_1": 1.0}, r"beta_1 must be in \[0, 1\), got 1.0"),
    ("fedyogi", {"beta_2": -0.1}, r"beta_2 must be in \[0, 1\)"),
    ("fedadam", {"eta": 0.0}, "eta must be positive"),
    ("fedadagrad", {"tau": float("nan")}, "tau must be a finite number"),
    ("fedavgm", {"server_momentum": 1.5}, r"server_momentum must be in \[0, 1\)"),
    ("fedavgm", {"server_learning_rate": -1.0}, "server_learning_rate must be positive"),
    ("fedadagrad", {"beta_1": 0.9}, "beta_1 do not apply to server optimizer 'fedadagrad' .it uses eta, tau"),
    ("fedavg", {"eta": 0.1}, "eta do not apply to server optimizer 'fedavg' .it uses no settings"),
])
def test_bad_settings_say_why(name: str, kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServerOptimizerSettings.defaults(name, **kwargs)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError) as err:
        ServerOptimizerSettings(name="fedadam", eta=-1.0, beta_1=2.0, beta_2=0.5, server_momentum=0.1)
    text = str(err.value)
    assert "eta must be positive" in text and "beta_1 must be in [0, 1)" in text
    assert "tau is required" in text and "server_momentum does not apply" in text


def test_bad_step_arguments_say_why() -> None:
    opt = ServerOptimizer(settings=ServerOptimizerSettings.defaults("fedadam"))
    p = torch.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        opt.step_(params=p, mean_delta=torch.zeros(3), state=None, server_round=1)
    with pytest.raises(TypeError, match="float32 or float64"):
        opt.step_(params=p.to(torch.bfloat16), mean_delta=p, state=None, server_round=1)
    with pytest.raises(ValueError, match="server_round must be an int >= 1"):
        opt.step_(params=p, mean_delta=p, state=None, server_round=0)
    with pytest.raises(ValueError, match="lacks v_t"):
        opt.step_(params=p, mean_delta=p, state={"m_t": torch.zeros(4)}, server_round=1)
    with pytest.raises(ValueError, match="slice the state the same way"):
        opt.step_(params=p, mean_delta=p, state={"m_t": torch.zeros(4), "v_t": torch.zeros(5)}, server_round=1)
