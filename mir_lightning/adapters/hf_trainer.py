"""``MIRTrainerCallback``: MIR during Hugging Face ``Trainer`` runs, with evaluation on or off.

Usage is one line, nothing else to call::

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[MIRTrainerCallback(probe_loader, every_n_steps=500)])

The callback runs :class:`~mir_lightning.probe.MIRProbe` on a fixed probe set every
``every_n_steps`` optimizer steps (whatever ``eval_strategy`` is, ``"no"`` included) and
after each evaluation, and logs through the Trainer's own ``log`` so that ``mir`` and the
per-layer values reach ``trainer.state.log_history`` and every ``report_to`` integration
(TensorBoard stores them as ``train/mir``, ``train/mir_fd/layer_00``...).

Callbacks are not handed the Trainer: at ``on_train_begin`` (or the first probe) the callback
finds the Trainer that holds it on the call stack. Should that ever fail, it still appends its
values to ``state.log_history``, writes TensorBoard itself on rank zero (when ``report_to``
includes it) and warns once.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
import weakref
from typing import Any, Iterable, Literal, Sequence

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging as hf_logging

from mir_lightning.capture import LayersArg, MaskFn
from mir_lightning.plateau import MIRPlateau
from mir_lightning.probe import MIRProbe, StepFn, renamed_argument
from mir_lightning.publish import MIRHistoryEntry, MIRPublisher

__all__ = ["MIRTrainerCallback"]

# the Trainer's own logger: its warnings are shown at transformers' default verbosity
trainer_log = hf_logging.get_logger("transformers.trainer")

TRAIN_PREFIX = "train/"  # what the Trainer's TensorBoard integration puts before training-time logs
STATE_FILE = "mir_state.json"  # the callback's history, in each checkpoint folder


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


def _resumed_checkpoint(trainer: Any) -> str | None:
    """The checkpoint folder ``trainer`` resumes from, read from its training loop's
    ``resume_from_checkpoint`` argument on the call stack (``on_train_begin`` is called from
    that loop); None for a fresh run."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_locals.get("self") is trainer:
                folder = frame.f_locals.get("resume_from_checkpoint")
                if isinstance(folder, (str, os.PathLike)):
                    return os.fspath(folder)
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

    * ``{name}`` (default ``mir``): log10 of the per-layer Fréchet distances' sum (NaN when
      the probe failed);
    * ``{name}_{stat}/layer_{k:02d}`` for each ``stat`` in ``log_layer_stats``;
    * on TensorBoard also the figures ``train/{name}/per_layer`` and ``train/{name}/history``
      (layer x step), next to the scalars (``train/{name}``...).

    With ``early_stopping=MIRPlateau(patience, min_delta)`` training stops
    (``control.should_training_stop``) once the last ``patience + 1`` values lie within
    ``min_delta``; every rank decides alike, from the merged MIR it holds. The stop and its
    reason are announced on rank zero through the Trainer's logger (a warning, shown at
    transformers' default verbosity) and ``warnings.warn``.

    Resume: each checkpoint folder gets the callback's typed history (``mir_state.json``);
    ``trainer.train(resume_from_checkpoint=...)`` restores it at ``on_train_begin`` and replays
    the plateau rule over it, so curves and patience continue without gaps or duplicates (no
    setting needed). A checkpoint without that file (written by an older version) gives the
    MIR values of ``state.log_history`` instead.

    Args:
        probe_dataloader: the fixed probe set (an iterable of batches; mapping batches go to
            ``model(**batch)`` unless ``probe_step=`` is given). Sharded over ranks by the probe.
        every_n_steps: run every this many optimizer steps (``state.global_step``); None: only
            after evaluations.
        on_evaluate: also run after each evaluation (at most once per step).
        early_stopping: a :class:`~mir_lightning.MIRPlateau`, or None.
        name: logged key of MIR.
        log_layer_stats: per-layer statistics to log (keys of
            ``ModalityIntegrationRate.per_layer_stats()``); ``()`` for none.
        log_figures: write the figures to TensorBoard (rank zero).
        probe_step, layers, masks, image_token_id, layer_indices, text_tokens, process_group,
            hidden_size, max_state_bytes, metric_kwargs: as in :class:`~mir_lightning.probe.MIRProbe`
            (``step=`` is ``probe_step``'s former, deprecated name).

    Attributes:
        history: one :class:`~mir_lightning.publish.MIRHistoryEntry` per probe, in step order.
    """

    def __init__(
        self,
        probe_dataloader: Iterable[Any],
        every_n_steps: int | None = None,
        *,
        on_evaluate: bool = True,
        early_stopping: MIRPlateau | None = None,
        name: str = "mir",
        log_layer_stats: Sequence[str] = ("fd", "norm_ratio"),
        log_figures: bool = True,
        probe_step: StepFn | None = None,
        layers: LayersArg = None,
        masks: MaskFn | None = None,
        image_token_id: int | None = None,
        layer_indices: Sequence[int] | slice | None = None,
        text_tokens: Literal["after_image", "all"] = "after_image",
        process_group: Any = None,
        hidden_size: int | None = None,
        max_state_bytes: int | None = None,
        **metric_kwargs: Any,
    ) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or int(every_n_steps) != every_n_steps
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
        if every_n_steps is None and not on_evaluate:
            raise ValueError("MIRTrainerCallback would never run: give every_n_steps= or keep on_evaluate=True")
        self.publisher = MIRPublisher(name, log_layer_stats, log_figures=log_figures, early_stopping=early_stopping,
                                      owner="MIRTrainerCallback")
        probe_step = renamed_argument(metric_kwargs, "step", "probe_step", probe_step, "MIRTrainerCallback")
        self.probe = MIRProbe(probe_dataloader, probe_step=probe_step, layers=layers, masks=masks,
                              image_token_id=image_token_id, layer_indices=layer_indices, text_tokens=text_tokens,
                              process_group=process_group, hidden_size=hidden_size,
                              max_state_bytes=max_state_bytes, **metric_kwargs)
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.run_on_evaluate = bool(on_evaluate)
        self._trainer: weakref.ReferenceType | None = None
        self._own_writer: Any = None
        self._warned: set[str] = set()

    @property
    def name(self) -> str:
        return self.publisher.tags.name

    @property
    def early_stopping(self) -> MIRPlateau | None:
        return self.publisher.early_stopping

    @property
    def history(self) -> list[MIRHistoryEntry]:
        return self.publisher.history

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        trainer = self._attach_trainer()
        self._restore(state, _resumed_checkpoint(trainer) if trainer is not None else None)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            self.measure(args, state, control, kwargs.get("model"))

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.run_on_evaluate:
            self.measure(args, state, control, kwargs.get("model"))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            with open(os.path.join(folder, self._state_file), "w") as handle:
                json.dump(self.publisher.state_dict(), handle)

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
        if self.publisher.last_step == step:
            return self.history[-1].mir
        trainer = self.trainer or self._attach_trainer()
        target = getattr(trainer, "model_wrapped", None) if trainer is not None else None
        target = target if target is not None else (model if model is not None else getattr(trainer, "model", None))
        if target is None:
            raise RuntimeError("MIRTrainerCallback: the Trainer handed no model to the callback")
        published = self.publisher.publish(step, self.probe.run(target))
        entry = published.entry
        if entry.error is not None and state.is_world_process_zero:
            warnings.warn(self.publisher.failure_message(entry), stacklevel=2)
        self._log(args, state, control, published.scalars)
        if state.is_world_process_zero:
            writer = self._tensorboard_writer()
            self.publisher.write_figures(entry, [writer] if writer is not None else [], prefix=TRAIN_PREFIX)
        if published.stop:
            control.should_training_stop = True
            if state.is_world_process_zero:
                trainer_log.warning(published.stop_reason)
                warnings.warn(published.stop_reason, stacklevel=2)
        return entry.mir

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
                    writer.add_scalar(TRAIN_PREFIX + key, value, state.global_step)
                writer.flush()

    def _fallback_writer(self, args: TrainingArguments) -> Any | None:
        if self._own_writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return None
            # the folder the Trainer's TensorBoardCallback writes to: 4.x uses ``args.logging_dir``
            # (set by default there), transformers 5 (no such argument) TENSORBOARD_LOGGING_DIR
            log_dir = getattr(args, "logging_dir", None) or os.getenv("TENSORBOARD_LOGGING_DIR")
            if not log_dir:
                from transformers.integrations.integration_utils import default_logdir

                log_dir = os.path.join(args.output_dir, default_logdir())
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

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------ resume
    @property
    def _state_file(self) -> str:
        return STATE_FILE if self.name == "mir" else f"{self.name.replace('/', '_')}_state.json"

    def _restore(self, state: TrainerState, checkpoint: str | None) -> None:
        """History and plateau state of a resumed run: the typed entries saved in the checkpoint
        folder, else the MIR values of the restored ``log_history`` (empty on a fresh run)."""
        saved = os.path.join(checkpoint, self._state_file) if checkpoint else None
        if saved is not None and os.path.isfile(saved):
            with open(saved) as handle:
                self.publisher.load_state_dict(json.load(handle))
            return
        name = self.name
        self.publisher.restore([MIRHistoryEntry(int(logged["step"]), float(logged[name]), [])
                                for logged in state.log_history if name in logged and "step" in logged])
