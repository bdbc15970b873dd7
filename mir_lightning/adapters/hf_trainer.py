"""``MIRTrainerCallback``: MIR during Hugging Face ``Trainer`` runs, with evaluation on or off.

Usage is one line, nothing else to call::

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[MIRTrainerCallback(probe_loader, every_n_steps=500)])

The callback runs :class:`~mir_lightning.probe.MIRProbe` on a fixed probe set every
``every_n_steps`` optimizer steps (whatever ``eval_strategy`` is, ``"no"`` included) and
after each evaluation, and logs through the Trainer's own ``log`` so that ``mir`` and the
per-layer values reach ``trainer.state.log_history`` and every ``report_to`` integration
(TensorBoard stores them as ``train/mir``, ``train/mir/fd/layer_00``...).

Callbacks are not handed the Trainer: at ``on_train_begin`` (or the first probe) the callback
finds the Trainer that holds it on the call stack. Should that ever fail, it still appends its
values to ``state.log_history``, writes TensorBoard itself on rank zero (when ``report_to``
includes it) and warns once.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
import warnings
import weakref
from typing import Any, Iterable, Sequence

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from mir_lightning.metric import STAT_KEYS
from mir_lightning.plateau import MIRPlateau

__all__ = ["MIRTrainerCallback"]

log = logging.getLogger(__name__)

MIR_KEY = "mir"
_LAYER_KEY = re.compile(rf"^{MIR_KEY}/(?P<stat>[^/]+)/layer_(?P<layer>\d+)$")


def _find_trainer(callback: TrainerCallback) -> Any | None:
    """The Trainer whose callback handler holds ``callback``, found as ``self`` of a frame on
    the call stack (every callback event is called from a Trainer method); None if none is."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            handler = getattr(owner, "callback_handler", None)
            if handler is not None and callable(getattr(owner, "log", None)):
                if any(cb is callback for cb in getattr(handler, "callbacks", ())):
                    return owner
            frame = frame.f_back
        return None
    finally:
        del frame


class MIRTrainerCallback(TrainerCallback):
    """Measure the Modality Integration Rate (arXiv 2410.07167) during ``Trainer.train()``.

    Every ``every_n_steps`` optimizer steps (and, with ``on_evaluate=True``, after each
    evaluation) the probe set runs through the model (the Trainer's wrapped model: DDP,
    DeepSpeed engine or FSDP) in eval mode without gradients; MIR is merged across ranks, so
    every rank logs the same values. Logged at the step of the probe, once:

    * ``mir``: log10 of the per-layer Fréchet distances' sum (NaN when the probe failed);
    * ``mir/{stat}/layer_{k:02d}`` for each ``stat`` in ``log_layer_stats``;
    * on TensorBoard also the figures ``mir/per_layer`` and ``mir/history`` (layer x step).

    With ``early_stopping=MIRPlateau(patience, min_delta)`` training stops
    (``control.should_training_stop``) once the last ``patience + 1`` values lie within
    ``min_delta``; every rank decides alike, from the merged MIR it holds.

    Resume: ``trainer.train(resume_from_checkpoint=...)`` restores ``state.log_history``; at
    ``on_train_begin`` the callback rebuilds :attr:`history` and replays the plateau rule from
    its ``mir`` entries, so curves and patience continue without gaps or duplicates (no
    setting needed).

    Args:
        probe_dataloader: the fixed probe set (an iterable of batches; mapping batches go to
            ``model(**batch)`` unless ``step=`` is given). Sharded over ranks by the probe.
        every_n_steps: run every this many optimizer steps (``state.global_step``); None: only
            after evaluations.
        on_evaluate: also run after each evaluation (at most once per step).
        early_stopping: a :class:`~mir_lightning.MIRPlateau`, or None.
        log_layer_stats: per-layer statistics to log (keys of
            ``ModalityIntegrationRate.per_layer_stats()``); ``()`` for none.
        probe_kwargs: passed to :class:`~mir_lightning.probe.MIRProbe` (``step``, ``layers``,
            ``masks``, ``image_token_id``, ``layer_indices``, ``text_tokens``,
            ``hidden_size``, ``max_state_bytes`` (the state budget: layers measured in
            passes), metric settings such as ``outlier_sigma``).

    Attributes:
        history: one dict per probe, in step order: ``step``, ``mir``, ``layers`` (layer ids)
            and the per-layer lists of the probe's statistics (after a resume, those of the
            earlier probes come from ``log_history``: the logged ``log_layer_stats`` only).
    """

    def __init__(
        self,
        probe_dataloader: Iterable[Any],
        every_n_steps: int | None = None,
        *,
        on_evaluate: bool = True,
        early_stopping: MIRPlateau | None = None,
        log_layer_stats: Sequence[str] = ("fd", "norm_ratio"),
        **probe_kwargs: Any,
    ) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or int(every_n_steps) != every_n_steps
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
        if every_n_steps is None and not on_evaluate:
            raise ValueError("MIRTrainerCallback would never run: give every_n_steps= or keep on_evaluate=True")
        if early_stopping is not None and not isinstance(early_stopping, MIRPlateau):
            raise TypeError(f"early_stopping must be a mir_lightning.MIRPlateau or None, got {type(early_stopping).__name__}")
        if isinstance(log_layer_stats, str):
            log_layer_stats = (log_layer_stats,)
        unknown = [key for key in log_layer_stats if key not in STAT_KEYS]
        if unknown:
            raise ValueError(f"unknown log_layer_stats {unknown}; known: {list(STAT_KEYS)}")
        from mir_lightning.probe import MIRProbe

        self.probe = MIRProbe(probe_dataloader, **probe_kwargs)
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.run_on_evaluate = bool(on_evaluate)
        self.early_stopping = early_stopping
        self.log_layer_stats = tuple(log_layer_stats)
        self.history: list[dict[str, Any]] = []
        self._trainer: weakref.ReferenceType | None = None
        self._own_writer: Any = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._attach_trainer()
        self._rebuild(state.log_history)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            self.measure(args, state, control, kwargs.get("model"))

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.run_on_evaluate:
            self.measure(args, state, control, kwargs.get("model"))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None

    # ------------------------------------------------------------------ the probe
    def measure(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None) -> float:
        """Run the probe now, log and record its values at ``state.global_step`` and apply the
        plateau rule; returns MIR. Does nothing (returns the recorded MIR) when this step was
        already measured."""
        step = int(state.global_step)
        if self.history and self.history[-1]["step"] == step:
            return self.history[-1]["mir"]
        trainer = self.trainer or self._attach_trainer()
        target = getattr(trainer, "model_wrapped", None) if trainer is not None else None
        target = target if target is not None else (model if model is not None else getattr(trainer, "model", None))
        if target is None:
            raise RuntimeError("MIRTrainerCallback: the Trainer handed no model to the callback")
        result = self.probe.run(target)
        if result.error is not None and state.is_world_process_zero:
            warnings.warn(f"MIRTrainerCallback: MIR could not be computed at step {step} ({result.error}); logging NaN",
                          stacklevel=2)
        entry = {"step": step, "mir": float(result.mir), "layers": [int(k) for k in result.layers]}
        if result.error is None:
            entry.update({key: [float(v) for v in value.tolist()] for key, value in result.stats.items()})
        self.history.append(entry)
        self._log(args, state, control, self._scalars(entry))
        if state.is_world_process_zero and result.error is None:
            self._write_figures(step, entry)
        if self.early_stopping is not None and self.early_stopping.update(entry["mir"]):
            control.should_training_stop = True
            if state.is_world_process_zero:
                log.info("MIRTrainerCallback: %s; stopping training at step %d", self.early_stopping.describe(), step)
        return entry["mir"]

    def _scalars(self, entry: dict[str, Any]) -> dict[str, float]:
        values = {MIR_KEY: entry["mir"]}
        for key in self.log_layer_stats:
            for layer, value in zip(entry["layers"], entry.get(key, ())):
                values[f"{MIR_KEY}/{key}/layer_{layer:02d}"] = value
        return values

    # ------------------------------------------------------------------ logging
    @property
    def trainer(self) -> Any | None:
        """The Trainer this callback found (None before ``on_train_begin`` or if not found)."""
        return self._trainer() if self._trainer is not None else None

    def _attach_trainer(self) -> Any | None:
        trainer = _find_trainer(self)
        self._trainer = weakref.ref(trainer) if trainer is not None else None
        if trainer is None:
            self._warn_once(
                "no-trainer",
                "MIRTrainerCallback could not find the Trainer that runs it: MIR is appended to state.log_history "
                "and written to TensorBoard (rank zero) by the callback itself, but other report_to integrations "
                "will not see it",
            )
        return trainer

    def _log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, values: dict[str, float]) -> None:
        trainer = self.trainer
        if trainer is not None:
            # Trainer.log runs every callback's on_log, which clears should_log: keep the
            # Trainer's own logging of this step (its loss entry) alive
            should_log = control.should_log
            trainer.log(dict(values))
            control.should_log = should_log
            trainer.control.should_log = should_log
            return
        entry = dict(values)
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        state.log_history.append({**entry, "step": state.global_step})
        if state.is_world_process_zero and "tensorboard" in (args.report_to or ()):
            writer = self._fallback_writer(args)
            if writer is not None:
                for key, value in values.items():
                    writer.add_scalar(f"train/{key}", value, state.global_step)
                writer.flush()

    def _fallback_writer(self, args: TrainingArguments) -> Any | None:
        if self._own_writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                from transformers.integrations.integration_utils import default_logdir
            except ImportError:
                return None
            log_dir = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, default_logdir())
            self._own_writer = SummaryWriter(log_dir=os.path.expanduser(log_dir))
        return self._own_writer

    def _tensorboard_writer(self) -> Any | None:
        """The Trainer's TensorBoard writer (rank zero, while training), else the callback's own."""
        trainer = self.trainer
        if trainer is None:
            return self._own_writer
        from transformers.integrations import TensorBoardCallback

        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                return callback.tb_writer
        return None

    def _write_figures(self, step: int, entry: dict[str, Any]) -> None:
        writer = self._tensorboard_writer()
        if writer is None:
            return
        try:
            from mir_lightning.plotting import measurement_figures

            for tag, figure in measurement_figures(MIR_KEY, step, entry, self.history).items():
                writer.add_figure(tag, figure, global_step=step, close=True)
            writer.flush()
        except Exception as err:  # figures are a bonus: never stop training for them
            self._warn_once("figures", f"MIRTrainerCallback: TensorBoard figures skipped ({type(err).__name__}: {err})")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------ resume
    def _rebuild(self, log_history: Sequence[dict[str, Any]]) -> None:
        """History and plateau state from the ``mir`` entries of ``log_history`` (restored
        from the checkpoint on resume; empty on a fresh run), one entry per step."""
        by_step: dict[int, dict[str, Any]] = {}
        for logged in log_history:
            if MIR_KEY in logged and "step" in logged:
                by_step[int(logged["step"])] = self._entry_from_log(logged)
        self.history = [by_step[step] for step in sorted(by_step)]
        if self.early_stopping is not None:
            self.early_stopping.reset()
            for entry in self.history:
                self.early_stopping.update(entry["mir"])

    @staticmethod
    def _entry_from_log(logged: dict[str, Any]) -> dict[str, Any]:
        per_stat: dict[str, dict[int, float]] = {}
        for key, value in logged.items():
            match = _LAYER_KEY.match(key)
            if match:
                per_stat.setdefault(match["stat"], {})[int(match["layer"])] = float(value)
        layers = sorted({layer for values in per_stat.values() for layer in values})
        entry: dict[str, Any] = {"step": int(logged["step"]), "mir": float(logged[MIR_KEY]), "layers": layers}
        for stat, values in per_stat.items():
            entry[stat] = [values.get(layer, math.nan) for layer in layers]
        return entry
