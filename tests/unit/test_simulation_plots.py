"""The simulation's pictures on tiny results: privacy.png draws the global accuracy
once and one spend line per distinct curve; comparison.png keeps every label inside
the axes, a lone point's included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest

from fedcollab.simulation._compare import comparison_figure, plot_comparison
from fedcollab.simulation._results import plot_privacy, privacy_figure
from fedcollab.simulation._run import SimulationResult


def _results(spend: dict[str, list[float]]) -> dict[str, Any]:
    rounds = len(next(iter(spend.values())))
    return {
        "rounds": [{"round": r, "attempt": 1, "status": "committed", "metrics": {"central_accuracy": 0.5 + 0.1 * r}}
                   for r in range(1, rounds + 1)],
        "privacy": {
            "institutions": {n: {"budget_epsilon": 3.0} for n in spend},
            "per_round": [{"round": r, "institution": n, "epsilon": eps[r - 1]}
                          for n, eps in spend.items() for r in range(1, rounds + 1)],
        },
    }


def _labels(ax: Any) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_the_global_accuracy_is_drawn_once_and_equal_spends_share_a_line(tmp_path: Path) -> None:
    same = {f"institution-{i}": [1.0, 2.0, 3.0] for i in range(4)}  # IID, equal sizes: the same spend
    fig = privacy_figure(_results(same), title="t")
    try:
        ax_acc, ax_eps = fig.axes
        assert _labels(ax_acc) == ["global model (largest institution epsilon)"]
        assert not ax_acc.collections  # no range to shade: every institution spent the same
        [label] = _labels(ax_eps)
        assert "institution-0, institution-1, institution-2 and 1 more (4, same spend)" == label
    finally:
        plt.close(fig)

    differ = {"a": [1.0, 2.0, 3.0], "b": [0.5, 1.0, 1.5], "c": [0.5, 1.0, 1.5]}
    fig = privacy_figure(_results(differ), title="t")
    try:
        ax_acc, ax_eps = fig.axes
        [accuracy] = [line for line in ax_acc.get_lines() if line.get_label().startswith("global")]
        assert list(accuracy.get_xdata()) == [1.0, 2.0, 3.0]  # against the most any institution spent
        assert list(accuracy.get_ydata()) == pytest.approx([0.6, 0.7, 0.8])
        assert len(ax_acc.collections) == 1  # the range across institutions, shaded
        assert sorted(_labels(ax_eps)) == ["a", "b, c (2, same spend)"]
    finally:
        plt.close(fig)

    plot_privacy(_results(same), tmp_path / "privacy.png", title="t")
    assert (tmp_path / "privacy.png").stat().st_size > 5_000


def _inside(inner: Any, outer: Any) -> bool:
    return outer.x0 <= inner.x0 and inner.x1 <= outer.x1 and outer.y0 <= inner.y0 and inner.y1 <= outer.y1


@pytest.mark.parametrize("rows", [
    [{"name": "one", "epsilon": 2.0, "accuracy": 0.9}],
    [{"name": "one", "epsilon": 2.0, "accuracy": 0.8}, {"name": "base", "epsilon": None, "accuracy": 0.95}],
    [{"name": "one", "epsilon": 2.0, "accuracy": 0.97}, {"name": "base", "epsilon": None, "accuracy": 0.5}],
    [{"name": f"r{i}", "epsilon": e, "accuracy": a} for i, (e, a) in enumerate([(1, 0.7), (3, 0.85), (8, 0.93)])],
], ids=["lone-point", "under-a-reference", "over-a-reference", "three-points"])
def test_every_point_label_lies_inside_the_axes_and_the_figure(rows: list[dict[str, Any]]) -> None:
    fig = comparison_figure(rows)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        [ax] = fig.axes
        labels = [t for t in ax.texts if t.get_text().endswith("%")]
        assert len(labels) == sum(r["epsilon"] is not None for r in rows)
        for text in labels:
            box = text.get_window_extent(renderer)
            assert _inside(box, ax.get_window_extent(renderer)), (text.get_text(), box)
            assert _inside(box, fig.bbox), (text.get_text(), box)
    finally:
        plt.close(fig)


def test_plot_comparison_writes_the_picture_and_the_figures(tmp_path: Path) -> None:
    run = SimulationResult(run_dir=tmp_path / "run", results={
        "scenario": {"simulation": {"name": "dp"}}, "privacy": {"institutions": {"a": {"spent_epsilon": 2.5}}},
        "final": {"central_accuracy": 0.9}})
    png = plot_comparison([run], output_dir=tmp_path)
    assert png.name == "comparison.png" and png.stat().st_size > 5_000
    assert (png.parent / "comparison.json").read_text().count('"epsilon": 2.5') == 1
