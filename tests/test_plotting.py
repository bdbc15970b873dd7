"""Figures (mir_lightning/plotting.py): readable axes, and no change to Python's warning state."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mir_lightning.metric import STAT_KEYS  # noqa: E402
from mir_lightning.plotting import history_heatmap, measurement_figures, per_layer_figure  # noqa: E402


def stats(fd):
    out = {key: [0.1] * len(fd) for key in STAT_KEYS}
    out.update(fd=list(fd), mean_term=[0.5 * v for v in fd], trace_vision=list(fd), trace_text=list(fd),
               cross_term=[1.2 * v for v in fd], norm_ratio=[1.0 + 0.1 * i for i in range(len(fd))])
    return out


def visible_ticks(ax, which):
    """(position, label) of the major ticks inside the view limits, after a draw."""
    ax.figure.canvas.draw()
    axis = ax.yaxis if which == "y" else ax.xaxis
    low, high = sorted(ax.get_ylim() if which == "y" else ax.get_xlim())
    return [(t.get_loc(), t.label1.get_text()) for t in axis.get_major_ticks()
            if low <= t.get_loc() <= high and t.label1.get_visible()]


def noisy():
    warnings.warn("shown once per location by Python's default filter", UserWarning)


def test_drawing_figures_leaves_the_warnings_registry_alone():
    # a warning Python shows once (action "default": once per location) must not show again
    # after the figures were drawn: matplotlib's set_ticklabels entered warnings.catch_warnings(),
    # whose exit invalidates every module's __warningregistry__ (before: shown twice)
    history = [{"step": s, "fd": [0.5, 0.7, 0.9]} for s in (1, 2, 3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        noisy()
        figures = measurement_figures("mir", 3, stats([0.5, 0.7, 0.9]), history)
        for figure in figures.values():
            figure.canvas.draw()  # what TensorBoard's add_figure does
        noisy()
    for figure in figures.values():
        plt.close(figure)
    assert sum("shown once" in str(w.message) for w in caught) == 1


def test_history_heatmap_has_integer_layer_ticks_with_the_layer_ids():
    # 3 layers: matplotlib's default locator put ticks at -0.5, 0, 0.5, ... 2.5 (fractional layers)
    figure = history_heatmap([10, 20, 30], [[0.5, 0.7, 0.9]] * 3)
    ticks = visible_ticks(figure.axes[0], "y")
    plt.close(figure)
    assert [position for position, _ in ticks] == [0, 1, 2]
    figure = history_heatmap([10, 20, 30], [[0.5, 0.7, 0.9]] * 3, layers=[0, 4, 8])  # a layer subset
    ticks = visible_ticks(figure.axes[0], "y")
    plt.close(figure)
    assert [label for _, label in ticks] == ["0", "4", "8"]


def test_history_heatmap_labels_the_steps():
    figure = history_heatmap([10, 20, 30], [[0.5, 0.7, 0.9]] * 3)
    ticks = visible_ticks(figure.axes[0], "x")
    plt.close(figure)
    assert [label for _, label in ticks] == ["10", "20", "30"]


@pytest.mark.parametrize("fd", [[0.5, 0.7, 0.9], [2.0, 2.5, 3.0], [1.5, 4.0, 8.0], [20.0, 22.0, 25.0]])
def test_per_layer_fd_axis_shows_at_least_two_ticks(fd):
    # FD within one decade: the symlog axis showed a single decade tick, or none (before)
    figure = per_layer_figure(stats(fd), layers=[0, 1, 2])
    ticks = visible_ticks(figure.axes[0], "y")
    plt.close(figure)
    assert len(ticks) >= 2, ticks
    assert all(label for _, label in ticks)
    values = [float(label.replace("−", "-")) for _, label in ticks if "10^" not in label and "$" not in label]
    assert all(np.isfinite(values))


def test_per_layer_figure_layer_ticks_are_the_layer_ids():
    figure = per_layer_figure(stats([0.5, 0.7, 0.9]), layers=[2, 5, 9])
    ticks = visible_ticks(figure.axes[1], "x")
    plt.close(figure)
    assert [position for position, _ in ticks] == [2, 5, 9]
