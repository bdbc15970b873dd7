"""What every trainer adapter publishes for one MIR measurement.

A trainer adapter decides *when* to run the probe and *where* to log; :class:`MIRPublisher`
turns each :class:`~mir_lightning.measurement.MIRResult` into the rest, the same for every
adapter (Lightning, Hugging Face Trainer, own loops):

* the tag dict (:class:`MIRTags`): ``name`` and ``{name}_{stat}/layer_{k:02d}`` scalars, and the
  figure tags ``{name}/per_layer`` and ``{name}/history``;
* a typed history entry (:class:`MIRHistoryEntry`), one per measured step;
* the figures (written to TensorBoard-style writers, errors turned into one warning);
* the plateau update (:class:`~mir_lightning.plateau.MIRPlateau`) and its state for resume
  (``state_dict`` / ``load_state_dict``: the history, from which the rule is replayed).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from mir_lightning.measurement import MIRResult
from mir_lightning.metric import STAT_KEYS
from mir_lightning.plateau import MIRPlateau

__all__ = ["MIRHistoryEntry", "MIRPublisher", "MIRTags", "Publication"]


@dataclass(frozen=True)
class MIRTags:
    """The names one adapter logs under: every tag of every adapter is built here.

    Args:
        name: tag of MIR itself. Per-layer scalars are ``{name}_{stat}/layer_{k:02d}``, beside
            it rather than under it: stores that keep a metric as a file named by its key
            (MLflow's file store) cannot hold ``mir`` and ``mir/...`` together. Figures
            (images, not metrics) are ``{name}/per_layer`` and ``{name}/history``.
        log_layer_stats: per-layer statistics logged as scalars (keys of
            ``ModalityIntegrationRate.per_layer_stats()``); ``()`` for none.
    """

    name: str = "mir"
    log_layer_stats: tuple[str, ...] = ("fd", "norm_ratio")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        stats = (self.log_layer_stats,) if isinstance(self.log_layer_stats, str) else tuple(self.log_layer_stats)
        unknown = [key for key in stats if key not in STAT_KEYS]
        if unknown:
            raise ValueError(f"unknown log_layer_stats {unknown}; known: {list(STAT_KEYS)}")
        object.__setattr__(self, "log_layer_stats", stats)

    def layer(self, stat: str, layer_id: int) -> str:
        """Tag of one per-layer scalar, e.g. ``mir_fd/layer_03`` (``layer_id``: the model's layer id)."""
        return f"{self.name}_{stat}/layer_{layer_id:02d}"

    @property
    def per_layer_figure(self) -> str:
        return f"{self.name}/per_layer"

    @property
    def history_figure(self) -> str:
        return f"{self.name}/history"

    def scalars(self, entry: "MIRHistoryEntry") -> dict[str, float]:
        """``{name: mir, name/stat/layer_kk: value...}`` of one entry (MIR alone, NaN, for a failure)."""
        values = {self.name: entry.mir}
        for stat in self.log_layer_stats:
            for layer_id, value in zip(entry.layers, entry.stats.get(stat, ())):
                values[self.layer(stat, layer_id)] = value
        return values


@dataclass(eq=True)
class MIRHistoryEntry(Mapping):
    """One measurement in an adapter's history.

    Also readable as the mapping the adapters' histories held before (``entry["step"]``,
    ``entry["mir"]``, ``entry["layers"]``, ``entry["fd"]``...: the keys are ``step``, ``mir``,
    ``layers`` and those of :attr:`stats`).

    Attributes:
        step: the training step of the measurement (the trainer's optimizer steps done).
        mir: ``log10(sum_k FD_k)``; NaN when the measurement failed.
        layers: the model's layer ids of the measured layers.
        stats: per-layer statistics (``per_layer_stats()`` keys), one float per layer each;
            empty for a failed measurement, and after a resume from a log that kept only MIR.
        error: why the measurement failed, else None.
    """

    step: int
    mir: float
    layers: list[int]
    stats: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def from_result(cls, step: int, result: MIRResult) -> "MIRHistoryEntry":
        stats = {} if result.error is not None else {
            key: [float(v) for v in value.tolist()] for key, value in result.stats.items()
        }
        return cls(int(step), float(result.mir), [int(k) for k in result.layers], stats, result.error)

    # ------------------------------------------------------------------ checkpoints
    def to_dict(self) -> dict[str, Any]:
        """Plain types only (checkpoints load with ``weights_only=True``)."""
        return {"step": self.step, "mir": self.mir, "layers": list(self.layers),
                "stats": {k: list(v) for k, v in self.stats.items()}, "error": self.error}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> "MIRHistoryEntry":
        """Inverse of :meth:`to_dict`; also reads the untyped entries of older checkpoints
        (statistics as top-level keys)."""
        stats = saved.get("stats")
        if stats is None:
            stats = {k: v for k, v in saved.items() if k in STAT_KEYS}
        return cls(int(saved["step"]), float(saved["mir"]), [int(k) for k in saved.get("layers", [])],
                   {k: [float(x) for x in v] for k, v in stats.items()}, saved.get("error"))

    # ------------------------------------------------------------------ mapping view
    def __getitem__(self, key: str) -> Any:
        if key in ("step", "mir", "layers"):
            return getattr(self, key)
        return self.stats[key]

    def __iter__(self) -> Iterator[str]:
        yield from ("step", "mir", "layers")
        yield from self.stats

    def __len__(self) -> int:
        return 3 + len(self.stats)


@dataclass(frozen=True)
class Publication:
    """What an adapter logs for one measurement.

    Attributes:
        entry: the history entry just recorded.
        scalars: tag -> value, to log at ``entry.step``.
        stop: the plateau rule fired at this measurement (False without ``early_stopping``).
        stop_reason: one line for the logs when ``stop``, else None.
    """

    entry: MIRHistoryEntry
    scalars: dict[str, float]
    stop: bool = False
    stop_reason: str | None = None


class MIRPublisher:
    """Tags, history, figures and plateau rule of one adapter (see the module docstring).

    Args:
        name, log_layer_stats: as in :class:`MIRTags` (validated here, at construction).
        log_figures: whether :meth:`write_figures` draws anything.
        early_stopping: a :class:`~mir_lightning.MIRPlateau` fed with every MIR, or None.
        owner: the adapter's class name, for its messages.
    """

    def __init__(self, name: str = "mir", log_layer_stats: Sequence[str] = ("fd", "norm_ratio"), *,
                 log_figures: bool = True, early_stopping: MIRPlateau | None = None, owner: str = "MIR") -> None:
        if early_stopping is not None and not isinstance(early_stopping, MIRPlateau):
            raise TypeError(f"early_stopping must be a mir_lightning.MIRPlateau or None, got {type(early_stopping).__name__}")
        self.tags = MIRTags(name, log_layer_stats)
        self.log_figures = bool(log_figures)
        self.early_stopping = early_stopping
        self.owner = owner
        self.history: list[MIRHistoryEntry] = []
        self._figures_failed = False

    @property
    def last_step(self) -> int:
        """Step of the newest entry, -1 when there is none."""
        return self.history[-1].step if self.history else -1

    def publish(self, step: int, result: MIRResult) -> Publication:
        """Record ``result`` at ``step`` (replacing any entries at or after it, as a resumed run
        measuring again does), feed the plateau rule and return what to log."""
        entry = MIRHistoryEntry.from_result(step, result)
        self.history = [h for h in self.history if h.step < entry.step] + [entry]
        stop = self.early_stopping is not None and self.early_stopping.update(entry.mir)
        reason = None
        if stop:
            reason = f"{self.owner}: {self.early_stopping.describe()}; stopping training at step {entry.step}"
        return Publication(entry, self.tags.scalars(entry), stop, reason)

    def failure_message(self, entry: MIRHistoryEntry) -> str:
        """The warning for a failed measurement (``entry.error`` set)."""
        return f"{self.owner}: MIR could not be computed at step {entry.step} ({entry.error}); {self.tags.name} is NaN"

    # ------------------------------------------------------------------ figures
    def write_figures(self, entry: MIRHistoryEntry, writers: Sequence[Any], prefix: str = "") -> None:
        """Draw the per-layer figure of ``entry`` and the layer x step heatmap of the history,
        and ``add_figure`` them to each writer (``SummaryWriter``-like) under ``prefix + tag``.

        Nothing when figures are off, ``entry`` failed or there is no writer; a missing
        matplotlib or any drawing error becomes one warning per publisher (figures never stop
        training).
        """
        if not (self.log_figures and writers and entry.stats):
            return
        from mir_lightning.plotting import close_figures, measurement_figures

        figures: dict[str, Any] = {}
        try:
            figures = measurement_figures(prefix + self.tags.name, entry.step, entry.stats, self.history,
                                          layers=entry.layers)
            for writer in writers:
                for tag, figure in figures.items():
                    writer.add_figure(tag, figure, global_step=entry.step, close=False)
                if callable(getattr(writer, "flush", None)):
                    writer.flush()
        except Exception as err:  # figures are a bonus
            if not self._figures_failed:
                self._figures_failed = True
                warnings.warn(f"{self.owner}: figures skipped ({type(err).__name__}: {err})", stacklevel=2)
        finally:
            if figures:
                close_figures(figures.values())

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"history": [h.to_dict() for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history and replay the plateau rule over it."""
        self.restore([MIRHistoryEntry.from_dict(h) for h in state.get("history", [])])

    def restore(self, history: Sequence[MIRHistoryEntry]) -> None:
        """Take ``history`` (one entry per step; sorted here) and replay the plateau rule over it."""
        by_step = {h.step: h for h in history}
        self.history = [by_step[s] for s in sorted(by_step)]
        if self.early_stopping is not None:
            self.early_stopping.reset()
            for entry in self.history:
                self.early_stopping.update(entry.mir)
