"""Figures of per-layer MIR diagnostics (matplotlib, imported lazily)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("figures need matplotlib: pip install 'mir_lightning[viz]'") from err
    return plt


def per_layer_figure(
    stats: Mapping[str, Sequence[float]], title: str = "", layers: Sequence[int] | None = None
) -> Any:
    """Two panels over the LLM layers: FD split into its terms (log scale), and the
    vision/text norm ratio.

    Args:
        stats: as returned by ``per_layer_stats()`` (tensors or lists, one value per layer).
        title: the figure title (default: the MIR).
        layers: the layer id of each entry (e.g. ``[0, 2, 4]`` for a subset); default
            ``0, 1, ...``. The x axis shows these ids as integer ticks.
    """
    plt = _pyplot()
    fd = np.asarray(stats["fd"], dtype=float)
    x = np.arange(len(fd)) if layers is None else np.asarray(layers, dtype=int)
    if x.shape != fd.shape:
        raise ValueError(f"layers has {x.size} ids but the stats have {fd.size} layers")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    ax1.plot(x, fd, "o-", label="FD")
    ax1.plot(x, np.asarray(stats["mean_term"], dtype=float), "s--", ms=3, label="mean term")
    covariance = np.asarray(stats["trace_vision"], float) + np.asarray(stats["trace_text"], float) - np.asarray(stats["cross_term"], float)
    ax1.plot(x, covariance, "^--", ms=3, label="covariance terms")
    ax1.set_yscale("symlog", linthresh=1e-3)
    ax1.set_ylabel("text-normalised FD")
    ax1.legend(fontsize=8)
    ax1.set_title(title or f"MIR = log10(sum FD) = {np.log10(np.nansum(fd)):.3f}")
    ax2.plot(x, np.asarray(stats["norm_ratio"], dtype=float), "o-", color="C3")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set_ylabel("vision / text norm")
    ax2.set_xlabel("LLM layer")
    _integer_layer_ticks(ax2, x)
    _at_least_two_ticks(ax1)
    fig.tight_layout()
    return fig


def _integer_layer_ticks(ax: Any, layers: np.ndarray, most: int = 16) -> None:
    """Ticks at the layer ids themselves (up to ``most``), else integer ticks chosen by matplotlib."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if len(layers) <= most:
        ax.xaxis.set_major_locator(FixedLocator(layers))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=most, integer=True))


def _at_least_two_ticks(ax: Any) -> None:
    """On a log-like y axis whose data spans less than a decade (a single decade tick, or
    none, in view), put ticks at 1-2-5 multiples, or at evenly spaced values, in view."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

    low, high = sorted(ax.get_ylim())
    in_view = [t for t in ax.yaxis.get_major_locator()() if low <= t <= high]
    if len(in_view) >= 2:
        return
    ticks: list[float] = []
    if low > 0:
        for exponent in range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1):
            ticks += [m * 10.0 ** exponent for m in (1, 2, 5) if low <= m * 10.0 ** exponent <= high]
    if len(ticks) < 2:
        ticks = [t for t in MaxNLocator(nbins=4).tick_values(low, high) if low <= t <= high]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))


def _index_labels(labels: Sequence[Any]) -> Any:
    """Formatter showing ``labels[i]`` at integer position ``i`` (no ``set_ticklabels``: it
    resets Python's warnings registry through ``warnings.catch_warnings``)."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _: Any) -> str:
        i = int(round(value))
        return str(labels[i]) if abs(value - i) < 1e-9 and 0 <= i < len(labels) else ""

    return FuncFormatter(label)


def history_heatmap(steps: Sequence[int], per_layer_fd: Sequence[Sequence[float]], title: str = "per-layer FD",
                    layers: Sequence[int] | None = None) -> Any:
    """Layer x step heatmap of log10 FD over the whole history.

    Args:
        steps: the step of each column.
        per_layer_fd: one list of per-layer FD per step (``[S][L]``).
        title: the figure title.
        layers: the layer id of each row (default ``0, 1, ...``), shown as integer ticks.
    """
    from matplotlib.ticker import FixedLocator, MaxNLocator

    plt = _pyplot()
    data = np.log10(np.clip(np.asarray(per_layer_fd, dtype=float).T, 1e-12, None))
    rows = data.shape[0]
    layers = list(range(rows)) if layers is None else [int(k) for k in layers]
    if len(layers) != rows:
        raise ValueError(f"layers has {len(layers)} ids but the history has {rows} layers")
    fig, ax = plt.subplots(figsize=(7, 4))
    image = ax.imshow(data, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
    columns = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
    ax.xaxis.set_major_locator(FixedLocator(columns))
    ax.xaxis.set_major_formatter(_index_labels([int(s) for s in steps]))
    if rows <= 16:
        ax.yaxis.set_major_locator(FixedLocator(np.arange(rows)))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    ax.yaxis.set_major_formatter(_index_labels(layers))
    ax.set_xlabel("step")
    ax.set_ylabel("LLM layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="log10 FD")
    fig.tight_layout()
    return fig


def measurement_figures(name: str, step: int, stats: Mapping[str, Sequence[float]],
                        history: Sequence[Mapping[str, Any]], layers: Sequence[int] | None = None) -> dict[str, Any]:
    """The figures the adapters write to TensorBoard for one measurement: ``{name}/per_layer``
    (:func:`per_layer_figure` of ``stats`` at ``step``) and ``{name}/history`` (the layer x step
    heatmap of the entries of ``history`` (mappings with ``step`` and per-layer ``fd``) that have as
    many layers as ``stats``), the latter only when there is such an entry. ``layers``: the
    layer ids of the ``stats`` entries (default ``0, 1, ...``)."""
    figures = {f"{name}/per_layer": per_layer_figure(stats, f"step {step}", layers=layers)}
    complete = [h for h in history if h.get("fd") and len(h["fd"]) == len(stats["fd"])]
    if complete:
        figures[f"{name}/history"] = history_heatmap([h["step"] for h in complete], [h["fd"] for h in complete],
                                                     layers=layers)
    return figures


def close_figures(figures: Iterable[Any]) -> None:
    """Close matplotlib figures (frees their memory; pyplot keeps every open figure)."""
    plt = _pyplot()
    for figure in figures:
        plt.close(figure)
