"""The site's data against the study's model, before training: every mismatch named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcollab.config import DataConfig
from fedcollab.data import ArrayDataset, load_dataset
from fedcollab.errors import ConfigError
from fedcollab.institution._data import load_local_data
from fedcollab.institution._data_check import MAX_MESSAGE, data_problems, decline_message, summarize

MLP = {"in_features": 64, "hidden": [16], "num_classes": 10}


def _data(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
    return ArrayDataset(x=x.astype(np.float32), y=y.astype(np.int64), num_classes=max(int(y.max()) + 1, 1))


def _problems(x: np.ndarray, y: np.ndarray, kind: str = "mlp", params: dict | None = None) -> list[str]:
    return data_problems(data=summarize(_data(x, y)), kind=kind, params=MLP if params is None else params)


RNG = np.random.default_rng(0)
GOOD_Y = np.arange(40) % 10

# (x, y, kind, params, the words of each expected problem); an empty list: it fits.
CASES = [
    pytest.param(RNG.random((40, 64)), GOOD_Y, "mlp", MLP, [], id="fits"),
    pytest.param(RNG.random((40, 8, 8)), GOOD_Y, "mlp", MLP, [], id="mlp flattens 8x8 images"),
    pytest.param(RNG.random((40, 10)), GOOD_Y, "mlp", MLP,
                 [["the site's data has 10 features; the study's model mlp takes 64"]], id="10 features"),
    pytest.param(RNG.random((40, 3, 5)), GOOD_Y, "mlp", MLP, [["15 features (3 x 5 per example)", "takes 64"]],
                 id="3x5 examples"),
    pytest.param(RNG.random(40), GOOD_Y, "mlp", MLP, [["x is 1-D", "(n, 64)"]], id="1-D x"),
    pytest.param(RNG.random((40, 64)), np.arange(40) % 13, "mlp", MLP,
                 [["labels are 0..12", "model mlp has 10 classes (labels 0..9)"]], id="labels past num_classes"),
    pytest.param(RNG.random((40, 64)), GOOD_Y - 1, "mlp", MLP, [["labels are -1..8"]], id="negative label"),
    pytest.param(np.where(np.arange(40 * 64).reshape(40, 64) % 97 == 0, np.nan, 1.0), GOOD_Y, "mlp", MLP,
                 [["of the site's 40 examples have NaN or infinite features"]], id="NaN features"),
    pytest.param(np.full((40, 64), np.inf), GOOD_Y, "mlp", MLP, [["40 of the site's 40 examples"]], id="inf"),
    pytest.param(RNG.random((40, 10)), np.arange(40) % 13, "mlp", MLP, [["10 features"], ["labels are 0..12"]],
                 id="every problem at once"),
    pytest.param(RNG.random((40, 1, 28, 28)), GOOD_Y, "cnn", {}, [], id="cnn fits"),
    pytest.param(RNG.random((40, 64)), GOOD_Y, "cnn", {},
                 [["examples have shape (64,)", "takes images of shape (1, 28, 28)"]], id="cnn given flat rows"),
    pytest.param(RNG.random((40, 64)), GOOD_Y, "transformer", {}, [], id="transformer flat 8x8"),
    pytest.param(RNG.random((40, 5, 8)), GOOD_Y, "transformer", {}, [], id="transformer 5 tokens"),
    pytest.param(RNG.random((40, 30)), GOOD_Y, "transformer", {},
                 [["shape (30,)", "takes (64,) flat features or (T, 8) tokens with T <= 8"]], id="transformer 30"),
    pytest.param(RNG.random((40, 8)), GOOD_Y, "transformer", {"vocab_size": 100},
                 [["takes integer token ids (vocab_size 100)", "float32"]], id="token ids"),
    pytest.param(RNG.random((40, 64)), GOOD_Y, "blob", {"num_parameters": 10}, [["no forward pass"]], id="blob"),
]


@pytest.mark.parametrize("x, y, kind, params, expected", CASES)
def test_each_mismatch_is_named(x: np.ndarray, y: np.ndarray, kind: str, params: dict,
                                expected: list[list[str]]) -> None:
    problems = _problems(x, y, kind, params)
    assert len(problems) == len(expected), problems
    for problem, words in zip(problems, expected, strict=True):
        for w in words:
            assert w in problem, f"{w!r} not in {problem!r}"


def test_a_model_that_does_not_build_is_left_to_the_build() -> None:
    # The build declines it with MODEL_BUILD_FAILED and the registry's own message.
    assert _problems(RNG.random((4, 3)), np.arange(4), "mlp", {"hiden": [3]}) == []
    assert _problems(RNG.random((4, 3)), np.arange(4), "nope", {}) == []


def test_the_shipped_datasets_fit_the_models_meant_for_them() -> None:
    digits, _ = load_dataset("digits", seed=0)
    cancer, _ = load_dataset("breast_cancer", seed=0)
    assert data_problems(data=summarize(digits), kind="mlp", params=MLP) == []
    assert data_problems(data=summarize(cancer), kind="mlp", params={"in_features": 30, "num_classes": 2}) == []
    assert data_problems(data=summarize(cancer), kind="mlp", params=MLP) == [
        "the site's data has 30 features; the study's model mlp takes 64"]


def test_train_and_held_out_splits_are_checked_together() -> None:
    train, val = _data(RNG.random((10, 64)), np.arange(10) % 3), _data(RNG.random((4, 64)), np.array([0, 1, 2, 11]))
    problems = data_problems(data=summarize(train, val), kind="mlp", params=MLP)
    assert problems == ["the site's labels are 0..11 but the study's model mlp has 10 classes (labels 0..9)"]


def test_the_decline_message_fits_what_the_coordinator_accepts() -> None:
    message = decline_message(["x" * 700, "y" * 700])
    assert len(message) == MAX_MESSAGE and message.endswith("...")
    assert decline_message(["a", "b"]) == "a; b"


def _npz(tmp_path: Path, **arrays: np.ndarray) -> DataConfig:
    path = tmp_path / "site.npz"
    np.savez(path, **arrays)
    return DataConfig(dataset="npz", path=path, val_fraction=0.0)


@pytest.mark.parametrize("x, y, words", [
    pytest.param(np.array([["a", "b"]] * 4), np.arange(4), ["x holds <U1 values", "must be numbers"], id="strings"),
    pytest.param(RNG.random((4, 2)), np.array([0.0, 1.5, 1.0, 2.0]), ["y must hold integer class labels",
                                                                       "not all whole numbers"], id="label 1.5"),
    pytest.param(RNG.random((4, 2)), np.array(["a", "b", "c", "d"]), ["y must hold integer class labels"],
                 id="string labels"),
    pytest.param(RNG.random((4, 2)), np.zeros((4, 2)), ["y must be 1-D"], id="2-D labels"),
    pytest.param(RNG.random((4, 2)), np.arange(3), ["x has 4, y has 3"], id="counts differ"),
])
def test_npz_arrays_that_are_not_features_and_labels_fail_at_load(
        tmp_path: Path, x: np.ndarray, y: np.ndarray, words: list[str]) -> None:
    # Not a cast that silently turns label 1.5 into 1: an error at start, naming the file.
    with pytest.raises(ConfigError) as e:
        load_local_data(_npz(tmp_path, x=x, y=y))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_whole_float_labels_load_as_ints(tmp_path: Path) -> None:
    train, _ = load_local_data(_npz(tmp_path, x=RNG.random((4, 2)), y=np.array([0.0, 1.0, 2.0, 1.0])))
    assert train.y.tolist() == [0, 1, 2, 1] and train.y.dtype == np.int64
