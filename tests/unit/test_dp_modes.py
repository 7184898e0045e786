"""Choosing Opacus' grad_sample_mode by measurement, and caching the choice."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from fedcollab.models import build_model
from fedcollab.privacy import _modes
from fedcollab.privacy._modes import CACHE_FILE, ModeChoice, cache_key, choose_grad_sample_mode, measure_modes
from fedcollab.privacy._opacus import GRAD_SAMPLE_MODES, PrivacyError

TINY_MLP = {"in_features": 12, "hidden": [16], "num_classes": 3}


def tiny_mlp(seed: int = 0) -> nn.Module:
    return build_model(kind="mlp", params=TINY_MLP, seed=seed)


def test_measures_every_working_mode() -> None:
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = measure_modes(model=model, example_x=torch.zeros(1, 12), num_classes=3, batch_size=8, steps=2)
    assert set(seconds) == set(GRAD_SAMPLE_MODES)
    assert all(0 < s < 5 for s in seconds.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # measured on a copy


def test_only_shape_and_dtype_of_the_example_are_used() -> None:
    """Measuring never trains on (or reads) the real inputs: NaNs in them change nothing."""
    model = tiny_mlp()
    seconds = measure_modes(model=model, example_x=torch.full((1, 12), float("nan")), num_classes=3,
                            batch_size=4, modes=("ghost",), steps=1)
    assert set(seconds) == {"ghost"}


def test_token_ids_are_drawn_within_the_vocabulary() -> None:
    model = build_model(kind="transformer",
                        params={"vocab_size": 5, "seq_len": 4, "d_model": 8, "heads": 2, "layers": 1})
    # An out-of-range id would make every mode fail with an IndexError.
    seconds = measure_modes(model=model, example_x=torch.tensor([[10_000, 0, 0, 0]]), num_classes=10,
                            batch_size=4, modes=("hooks",), steps=1)
    assert set(seconds) == {"hooks"}


def test_a_mode_that_fails_is_left_out(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real = _modes.train_private

    def no_functorch(**kwargs: object) -> object:
        if kwargs["mode"] == "functorch":
            raise RuntimeError("vmap: data-dependent control flow")  # what an unsupported layer gives
        return real(**kwargs)

    monkeypatch.setattr(_modes, "train_private", no_functorch)
    with caplog.at_level(logging.DEBUG, logger="fedcollab.privacy"):
        seconds = measure_modes(model=tiny_mlp(), example_x=torch.zeros(1, 12), num_classes=3, batch_size=4, steps=1)
    assert set(seconds) == {"hooks", "ghost"}
    assert "'functorch' does not work on MLP: vmap: data-dependent control flow" in caplog.text


def test_every_mode_is_timed_twice_and_keeps_its_best(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second pass in reverse order; each mode keeps its lower figure, so one run slowed
    down by other load (hooks' 0.9 here) does not decide the choice."""
    script = {"hooks": [0.90, 0.10], "ghost": [0.12, 0.11], "functorch": [None]}
    calls: list[str] = []

    def fake(*, mode: str, **_: object) -> float | None:
        calls.append(mode)
        return script[mode].pop(0)

    monkeypatch.setattr(_modes, "_time_mode", fake)
    seconds = measure_modes(model=tiny_mlp(), example_x=torch.zeros(1, 12), num_classes=3, batch_size=4)
    assert calls == ["hooks", "ghost", "functorch", "ghost", "hooks"]  # functorch failed: not retried
    assert seconds == {"hooks": 0.10, "ghost": 0.11}


def test_no_working_mode_is_an_error() -> None:
    with pytest.raises(PrivacyError, match="none of Opacus' grad_sample_modes"):
        choose_grad_sample_mode(model=nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)),
                                example_x=torch.zeros(1, 4), num_classes=3, batch_size=4)


def fake_timer(monkeypatch: pytest.MonkeyPatch, seconds: dict[str, float]) -> list[int]:
    """Replaces the measurement with fixed figures; returns the list of calls' batch sizes."""
    calls: list[int] = []

    def fake(*, model: nn.Module, example_x: torch.Tensor, num_classes: int, batch_size: int) -> dict[str, float]:
        calls.append(batch_size)
        return dict(seconds)

    monkeypatch.setattr(_modes, "measure_modes", fake)
    return calls


def test_choice_is_the_argmin(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timer(monkeypatch, {"hooks": 0.09, "ghost": 0.024, "functorch": 0.05})
    choice = choose_grad_sample_mode(model=tiny_mlp(), example_x=torch.zeros(1, 12), num_classes=3, batch_size=8)
    assert choice == ModeChoice(mode="ghost", seconds_per_step={"hooks": 0.09, "ghost": 0.024, "functorch": 0.05},
                                cached=False)


def test_real_measurement_choice_is_the_argmin() -> None:
    choice = choose_grad_sample_mode(model=tiny_mlp(), example_x=torch.zeros(1, 12), num_classes=3, batch_size=8)
    assert choice.mode == min(choice.seconds_per_step, key=choice.seconds_per_step.__getitem__)
    assert not choice.cached


def test_second_call_uses_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = fake_timer(monkeypatch, {"hooks": 0.015, "ghost": 0.017})
    kwargs = dict(example_x=torch.zeros(1, 12), num_classes=3, batch_size=8, cache_dir=tmp_path)
    first = choose_grad_sample_mode(model=tiny_mlp(seed=0), **kwargs)
    # Other weights, same architecture: the same key (a new round's model).
    second = choose_grad_sample_mode(model=tiny_mlp(seed=1), **kwargs)
    assert calls == [8]
    assert (first.mode, first.cached) == ("hooks", False)
    assert second == ModeChoice(mode="hooks", seconds_per_step={"hooks": 0.015, "ghost": 0.017}, cached=True)
    assert [p.name for p in tmp_path.iterdir()] == [CACHE_FILE]  # no temporary files left behind
    stored = json.loads((tmp_path / CACHE_FILE).read_text())
    assert [e["mode"] for e in stored["entries"].values()] == ["hooks"]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 1, "entries": []}', "",
                                     '{"format": 1, "entries": {"KEY": {"mode": "warp"}}}'],
                         ids=["bad-json", "list", "entries-list", "empty", "bad-entry"])
def test_corrupt_cache_is_measured_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    calls = fake_timer(monkeypatch, {"hooks": 0.02, "ghost": 0.01})
    model, x = tiny_mlp(), torch.zeros(1, 12)
    key = cache_key(model=model, example_x=x, batch_size=8, device=torch.device("cpu"))
    (tmp_path / CACHE_FILE).write_text(content.replace("KEY", key))
    with caplog.at_level(logging.WARNING, logger="fedcollab.privacy"):
        choice = choose_grad_sample_mode(model=model, example_x=x, num_classes=3, batch_size=8, cache_dir=tmp_path)
    assert (choice.mode, choice.cached, calls) == ("ghost", False, [8])
    if content != '{"format": 1, "entries": {"KEY": {"mode": "warp"}}}':  # a bad entry in a good file is quiet
        assert "corrupt grad_sample_mode cache" in caplog.text
    # Rewritten, and good from then on.
    again = choose_grad_sample_mode(model=model, example_x=x, num_classes=3, batch_size=8, cache_dir=tmp_path)
    assert (again.mode, again.cached, calls) == ("ghost", True, [8])


def test_cache_key_depends_on_what_the_timing_depends_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = fake_timer(monkeypatch, {"hooks": 0.02, "ghost": 0.01})
    x = torch.zeros(1, 12)
    for batch_size in (8, 16, 8, 16):
        choose_grad_sample_mode(model=tiny_mlp(), example_x=x, num_classes=3, batch_size=batch_size, cache_dir=tmp_path)
    assert calls == [8, 16]  # a different batch size is a different key; each measured once

    cpu = torch.device("cpu")
    base = cache_key(model=tiny_mlp(), example_x=x, batch_size=8, device=cpu)
    assert cache_key(model=tiny_mlp(seed=5), example_x=x, batch_size=8, device=cpu) == base  # weights don't matter
    assert cache_key(model=tiny_mlp(), example_x=torch.zeros(7, 12), batch_size=8, device=cpu) == base  # nor batch
    different = [
        cache_key(model=tiny_mlp(), example_x=x, batch_size=9, device=cpu),
        cache_key(model=build_model(kind="mlp", params={**TINY_MLP, "hidden": [17]}), example_x=x, batch_size=8,
                  device=cpu),
        cache_key(model=tiny_mlp(), example_x=x.double(), batch_size=8, device=cpu),
        cache_key(model=tiny_mlp(), example_x=x, batch_size=8, device=torch.device("cuda")),
    ]
    frozen = tiny_mlp()
    frozen.hidden[0].weight.requires_grad_(False)  # e.g. LoRA: fewer per-sample gradients
    different.append(cache_key(model=frozen, example_x=x, batch_size=8, device=cpu))
    assert len({base, *different}) == 1 + len(different)


def test_unwritable_cache_still_chooses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    fake_timer(monkeypatch, {"hooks": 0.02, "ghost": 0.01})
    blocker = tmp_path / "file"
    blocker.write_text("")  # cache_dir is a file: mkdir fails
    with caplog.at_level(logging.WARNING, logger="fedcollab.privacy"):
        choice = choose_grad_sample_mode(model=tiny_mlp(), example_x=torch.zeros(1, 12), num_classes=3,
                                         batch_size=8, cache_dir=blocker)
    assert choice.mode == "ghost"
    assert "cannot" in caplog.text
