"""``MIREarlyStopping``: stop pre-training when MIR has converged (Lightning ``EarlyStopping``)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from torch import Tensor

from mir_lightning.plateau import MIRPlateau


class MIREarlyStopping(EarlyStopping):
    """Early stopping on a plateau of MIR (the paper's sense of saturated pre-training).

    ``mode="plateau"`` (default): stop when the last ``patience + 1`` finite values of
    ``monitor`` all lie within ``min_delta`` of each other (``max - min <= min_delta``, in
    MIR units, i.e. log10 of the FD sum), whichever direction MIR moved before: the rule of
    :class:`~mir_lightning.MIRPlateau`, shared with the Hugging Face Trainer callback. MIR can
    rise while a model is still learning (see the README), so this is not a "no improvement"
    rule. ``mode="min"``: Lightning's classic rule (stop after ``patience`` checks without a
    decrease of at least ``min_delta``).

    In both modes ``stopping_threshold`` stops as soon as MIR falls below it and
    ``divergence_threshold`` as soon as MIR rises above it (Lightning's meaning for a
    quantity to minimise), checked before the plateau rule.

    Non-finite values (a failed MIR computation is logged as NaN) are ignored unless
    ``check_finite=True``. State (the last ``patience + 1`` values, the patience count) is
    saved in checkpoints, so ``Trainer.fit(ckpt_path=...)`` continues the count. The decision
    is reduced across ranks by Lightning (any rank stopping stops all; every rank sees the
    same MIR anyway). Works with ``val_check_interval`` in steps as well as epochs: it checks
    after every validation. When the monitored value comes from an ``MIRCallback`` that
    measures every N training steps (``every_n_train_steps``), it checks after each of those
    measurements instead (once per measurement, never again at epoch or validation ends).

    Args:
        monitor: logged key to watch (``MIRCallback``'s ``name``, default ``"mir"``).
        min_delta: plateau width (plateau mode) or minimal decrease (min mode), >= 0.
        patience: plateau mode: number of further validations that must stay within the
            band; min mode: checks without improvement.
        mode: ``"plateau"`` or ``"min"``.
        check_finite: stop on a non-finite value (default False: such values are skipped).
        kwargs: passed to ``EarlyStopping`` (``verbose``, ``strict``, ``stopping_threshold``,
            ``divergence_threshold``, ``check_on_train_epoch_end``...).

    Example:
        >>> from mir_lightning import MIREarlyStopping
        >>> stopper = MIREarlyStopping(monitor="mir", min_delta=0.02, patience=3)
        >>> [stopper._evaluate_stopping_criteria(torch.tensor(v))[0] for v in (3.0, 2.5, 2.40, 2.41, 2.39, 2.40)]
        [False, False, False, False, False, True]
    """

    def __init__(
        self,
        monitor: str = "mir",
        min_delta: float = 0.01,
        patience: int = 3,
        mode: str = "plateau",
        check_finite: bool = False,
        **kwargs: Any,
    ) -> None:
        if mode not in ("plateau", "min"):
            raise ValueError(f"mode must be 'plateau' or 'min', got {mode!r}")
        self.rule = MIRPlateau(patience=patience, min_delta=min_delta)  # validates both
        super().__init__(monitor=monitor, min_delta=min_delta, patience=patience, mode="min", check_finite=check_finite, **kwargs)
        self.plateau = mode == "plateau"
        self._checked_step = -1  # global step of the last step-time MIR measurement checked

    @property
    def band(self) -> float:
        """Width of the plateau band (MIR units)."""
        return self.rule.min_delta

    @property
    def recent(self) -> list[float]:
        """The last values the plateau rule holds (at most ``patience + 1``; empty in min mode)."""
        return self.rule.recent

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode="plateau" if self.plateau else "min")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "recent": list(self.rule.recent), "checked_step": self._checked_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # Lightning restores ``patience`` from the checkpoint: the rule follows it; a checkpoint
        # written before ``recent`` was bounded is cut to the values the rule can use
        self.rule = MIRPlateau(self.patience, self.band, recent=list(state_dict.get("recent", [])) if self.plateau else [])
        self._checked_step = int(state_dict.get("checked_step", -1))

    # ------------------------------------------------------------------ step-time MIR
    def _step_measurement(self, trainer: "pl.Trainer") -> int | None:
        """Global step of the newest measurement of an ``MIRCallback`` logging ``monitor`` every
        N training steps; None when the monitored value does not come from one."""
        from mir_lightning.adapters.lightning import MIRCallback

        sources = [cb for cb in trainer.callbacks
                   if isinstance(cb, MIRCallback) and cb.name == self.monitor and cb.every_n_train_steps is not None]
        if not sources:
            return None
        return max((cb.history[-1]["step"] for cb in sources if cb.history), default=-1)

    def check_step_measurement(self, trainer: "pl.Trainer") -> None:
        """Run the stopping check once per new step-time MIR measurement (``MIRCallback`` calls
        this right after it logs one, so the order of the two callbacks does not matter)."""
        step = self._step_measurement(trainer)
        if step is None or step <= self._checked_step:
            return
        self._checked_step = step
        self._run_early_stopping_check(trainer)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any, **kwargs: Any) -> None:
        self.check_step_measurement(trainer)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._step_measurement(trainer) is None:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._step_measurement(trainer) is None:
            super().on_validation_end(trainer, pl_module)

    def _threshold_reached(self, value: float) -> Optional[str]:
        """The stop message when ``value`` crosses ``stopping_threshold`` / ``divergence_threshold``."""
        if self.stopping_threshold is not None and value < self.stopping_threshold:
            self.stopping_reason = EarlyStoppingReason.STOPPING_THRESHOLD
            return (f"Stopping threshold reached: {self.monitor} = {value:.4f} < {self.stopping_threshold}. "
                    "Signaling Trainer to stop.")
        if self.divergence_threshold is not None and value > self.divergence_threshold:
            self.stopping_reason = EarlyStoppingReason.DIVERGENCE_THRESHOLD
            return (f"Divergence threshold reached: {self.monitor} = {value:.4f} > {self.divergence_threshold}. "
                    "Signaling Trainer to stop.")
        return None

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, Optional[str]]:
        value = float(current)
        if not math.isfinite(value):
            if self.check_finite:
                return super()._evaluate_stopping_criteria(current)
            return False, f"{self.monitor} = {value} is not finite; ignored by MIREarlyStopping"
        if not self.plateau:
            return super()._evaluate_stopping_criteria(current)
        stopped = self.rule.update(value)
        if value < float(self.best_score):
            self.best_score = torch.tensor(value)
        self.wait_count = self.rule.wait_count
        reason = self._threshold_reached(value)
        if reason is not None:
            return True, reason
        if stopped:
            self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
            return True, f"{self.monitor}: {self.rule.describe()}. Signaling Trainer to stop."
        return False, f"{self.monitor} = {value:.4f}; {self.rule.describe()}"
