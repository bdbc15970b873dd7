"""A trainer adapter in one file: MIR for a training loop that can call a hook after each step.

The template of README "Adding MIR to another trainer". The package does the rest:
:class:`~mir_lightning.MIRProbe` measures, :class:`~mir_lightning.publish.MIRPublisher` makes
the tags, the typed history, the figures and the plateau decision. An adapter decides only
*when* to probe (here: every N steps) and *where* to log (here: a ``SummaryWriter``-like
``writer``). ``examples/custom_loop.py`` and ``benchmarks/bench_adapters.py`` use it.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence

from torch import nn

from mir_lightning import MIRPlateau, MIRProbe
from mir_lightning._distributed import rank_world
from mir_lightning.measurement import MIRResult
from mir_lightning.publish import MIRHistoryEntry, MIRPublisher, Publication


class MIRLoopAdapter:
    """MIR every ``every_n_steps`` steps of a loop, logged to ``writer`` (rank zero).

    Args:
        probe_dataloader: the fixed probe set (every rank the same loader; the probe shards it).
        writer: has ``add_scalar(tag, value, step)`` and ``add_figure(tag, fig, global_step, close)``.
        every_n_steps: probe when ``step % every_n_steps == 0``.
        early_stopping, name, log_layer_stats, log_figures: as in the package's adapters.
        probe_kwargs: passed to :class:`~mir_lightning.MIRProbe` (``probe_step``, ``masks``...).
    """

    def __init__(self, probe_dataloader: Iterable[Any], writer: Any, every_n_steps: int = 100, *,
                 early_stopping: MIRPlateau | None = None, name: str = "mir",
                 log_layer_stats: Sequence[str] = ("fd", "norm_ratio"), log_figures: bool = True,
                 **probe_kwargs: Any) -> None:
        self.publisher = MIRPublisher(name, log_layer_stats, log_figures=log_figures,
                                      early_stopping=early_stopping, owner=type(self).__name__)
        self.probe = MIRProbe(probe_dataloader, **probe_kwargs)
        self.writer, self.every_n_steps = writer, int(every_n_steps)
        self.last_result: MIRResult | None = None

    @property
    def history(self) -> list[MIRHistoryEntry]:
        return self.publisher.history

    def on_step_end(self, model: nn.Module, step: int) -> bool:
        """Call after each optimizer step (every rank); True when training should stop."""
        return step % self.every_n_steps == 0 and self.measure(model, step).stop

    def measure(self, model: nn.Module, step: int) -> Publication:
        """Probe now, log at ``step`` and apply the plateau rule (every rank must call it)."""
        self.last_result = self.probe.run(model)
        published = self.publisher.publish(step, self.last_result)
        if published.entry.error is not None:
            warnings.warn(self.publisher.failure_message(published.entry), stacklevel=2)
        if rank_world()[0] == 0:
            for tag, value in published.scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.publisher.write_figures(published.entry, [self.writer])
            if published.stop:
                warnings.warn(published.stop_reason, stacklevel=2)
        return published

    def state_dict(self) -> dict[str, Any]:
        return self.publisher.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.publisher.load_state_dict(state)
