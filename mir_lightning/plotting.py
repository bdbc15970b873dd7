"""Figures of per-layer MIR diagnostics (matplotlib, imported lazily)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("figures need matplotlib: pip install 'mir_lightning[viz]'") from err
    return plt


def per_layer_figure(stats: Mapping[str, Sequence[float]], title: str = "") -> Any:
    """Two panels over layer index: FD split into its terms (log scale), and the
    vision/text norm ratio. ``stats`` as returned by ``per_layer_stats()``."""
    plt = _pyplot()
    fd = np.asarray(stats["fd"], dtype=float)
    layers = np.arange(len(fd))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    ax1.plot(layers, fd, "o-", label="FD")
    ax1.plot(layers, np.asarray(stats["mean_term"], dtype=float), "s--", ms=3, label="mean term")
    covariance = np.asarray(stats["trace_vision"], float) + np.asarray(stats["trace_text"], float) - np.asarray(stats["cross_term"], float)
    ax1.plot(layers, covariance, "^--", ms=3, label="covariance terms")
    ax1.set_yscale("symlog", linthresh=1e-3)
    ax1.set_ylabel("text-normalised FD")
    ax1.legend(fontsize=8)
    ax1.set_title(title or f"MIR = log10(sum FD) = {np.log10(np.nansum(fd)):.3f}")
    ax2.plot(layers, np.asarray(stats["norm_ratio"], dtype=float), "o-", color="C3")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set_ylabel("vision / text norm")
    ax2.set_xlabel("LLM layer")
    fig.tight_layout()
    return fig


def history_heatmap(steps: Sequence[int], per_layer_fd: Sequence[Sequence[float]], title: str = "per-layer FD") -> Any:
    """Layer x step heatmap of log10 FD over the whole history."""
    plt = _pyplot()
    data = np.log10(np.clip(np.asarray(per_layer_fd, dtype=float).T, 1e-12, None))
    fig, ax = plt.subplots(figsize=(7, 4))
    image = ax.imshow(data, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(steps[i]) for i in ticks])
    ax.set_xlabel("step")
    ax.set_ylabel("LLM layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="log10 FD")
    fig.tight_layout()
    return fig
