"""``MIREarlyStopping``: stop Lightning pre-training when MIR has converged, read from ``trainer.callback_metrics``."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mir_lightning.plateau import MIRPlateau


class MIREarlyStopping(Callback):
    """Early stopping on a plateau of MIR (the paper's sense of saturated pre-training).

    A reader of ``trainer.callback_metrics[monitor]``, whoever put the value there
    (``MIRCallback``, or ``self.log`` of the LightningModule). ``MIRCallback(early_stopping=
    MIRPlateau(...))`` applies the same rule without a second callback; this one adds
    Lightning ``EarlyStopping``'s options (thresholds, ``mode="min"``, ``strict``).

    ``mode="plateau"`` (default): stop when the last ``patience + 1`` finite values of
    ``monitor`` all lie within ``min_delta`` of each other (``max - min <= min_delta``, in
    MIR units, i.e. log10 of the FD sum), whichever direction MIR moved before: the rule of
    :class:`~mir_lightning.MIRPlateau`, shared with every adapter. MIR can rise while a model
    is still learning (see the README), so this is not a "no improvement" rule.
    ``mode="min"``: Lightning's classic rule (stop after ``patience`` checks without a
    decrease of at least ``min_delta``).

    In both modes ``stopping_threshold`` stops as soon as MIR falls below it and
    ``divergence_threshold`` as soon as MIR rises above it (Lightning's meaning for a
    quantity to minimise), checked before the plateau rule.

    When it checks: after every validation (or, with ``check_on_train_epoch_end``, at the end
    of each training epoch; default as Lightning's ``EarlyStopping``), and right after each
    step-time measurement of an ``MIRCallback`` (``every_n_steps``), which announces it through
    ``on_mir_measurement``. Each value is checked once, however many of these points see it.
    Non-finite values (a failed MIR computation is logged as NaN) are ignored unless
    ``check_finite=True``. The decision is reduced across ranks
    (``trainer.strategy.reduce_boolean_decision``: any rank stopping stops all). State (the
    last ``patience + 1`` values, the counts) is saved in checkpoints, so
    ``Trainer.fit(ckpt_path=...)`` continues the count.

    Args:
        monitor: logged key to watch (``MIRCallback``'s ``name``, default ``"mir"``).
        min_delta: plateau width (plateau mode) or minimal decrease (min mode), >= 0.
        patience: plateau mode: number of further values that must stay within the band;
            min mode: checks without improvement.
        mode: ``"plateau"`` or ``"min"``.
        check_finite: stop on a non-finite value (default False: such values are skipped).
        stopping_threshold, divergence_threshold: stop below / above these values.
        strict: raise when ``monitor`` is missing at a check (else warn once and skip).
        verbose: log the rule's state at every check (stops are always announced).
        check_on_train_epoch_end: check at training epoch ends instead of validation ends;
            None: when validation runs once per epoch (Lightning's default).
        log_rank_zero_only: accepted for Lightning ``EarlyStopping`` compatibility (messages
            are rank zero's anyway).

    Example:
        >>> stopper = MIREarlyStopping(monitor="mir", min_delta=0.02, patience=3)
        >>> [stopper.evaluate(v)[0] for v in (3.0, 2.5, 2.40, 2.41, 2.39, 2.40)]
        [False, False, False, False, False, True]
    """

    def __init__(
        self,
        monitor: str = "mir",
        min_delta: float = 0.01,
        patience: int = 3,
        mode: str = "plateau",
        check_finite: bool = False,
        *,
        stopping_threshold: Optional[float] = None,
        divergence_threshold: Optional[float] = None,
        strict: bool = True,
        verbose: bool = False,
        check_on_train_epoch_end: Optional[bool] = None,
        log_rank_zero_only: bool = False,
    ) -> None:
        if mode not in ("plateau", "min"):
            raise ValueError(f"mode must be 'plateau' or 'min', got {mode!r}")
        self.rule = MIRPlateau(patience=patience, min_delta=min_delta)  # validates both
        self.monitor = monitor
        self.patience = self.rule.patience
        self.plateau = mode == "plateau"
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.strict = strict
        self.verbose = verbose
        self.log_rank_zero_only = log_rank_zero_only
        self._check_on_train_epoch_end = check_on_train_epoch_end
        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = torch.tensor(math.inf)
        self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
        self.stopping_reason_message: Optional[str] = None
        self._last_checked: Any = None  # the callback_metrics value checked last (each value once)
        self._warned_missing = False

    @property
    def mode(self) -> str:
        return "plateau" if self.plateau else "min"

    @property
    def band(self) -> float:
        """Width of the plateau band (min mode: the minimal decrease), in MIR units."""
        return self.rule.min_delta

    min_delta = band

    @property
    def recent(self) -> list[float]:
        """The last values the plateau rule holds (at most ``patience + 1``; empty in min mode)."""
        return self.rule.recent

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def state_dict(self) -> dict[str, Any]:
        return {"wait_count": self.wait_count, "stopped_epoch": self.stopped_epoch, "best_score": self.best_score,
                "patience": self.patience, "recent": list(self.rule.recent)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = int(state_dict.get("wait_count", 0))
        self.stopped_epoch = int(state_dict.get("stopped_epoch", 0))
        self.best_score = torch.as_tensor(state_dict.get("best_score", math.inf))
        self.patience = int(state_dict.get("patience", self.patience))
        # a checkpoint written before ``recent`` was bounded is cut to the values the rule can use
        self.rule = MIRPlateau(self.patience, self.band, recent=list(state_dict.get("recent", [])) if self.plateau else [])

    # ------------------------------------------------------------------ when to check
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._check_on_train_epoch_end is None:  # Lightning EarlyStopping's rule
            self._check_on_train_epoch_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._check_on_train_epoch_end:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._check_on_train_epoch_end:
            self.check(trainer)

    def on_mir_measurement(self, trainer: "pl.Trainer", name: str) -> None:
        """Called by ``MIRCallback`` right after a step-time measurement it logged as ``name``."""
        if name == self.monitor:
            self.check(trainer)

    def check(self, trainer: "pl.Trainer") -> None:
        """Apply the rule to ``trainer.callback_metrics[monitor]`` unless that value was checked
        already; set ``trainer.should_stop`` when any rank decides to stop."""
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        current = trainer.callback_metrics.get(self.monitor)
        if current is None:
            message = (f"MIREarlyStopping: monitor={self.monitor!r} is not in trainer.callback_metrics (available: "
                       f"{', '.join(map(repr, trainer.callback_metrics)) or 'none'})")
            if self.strict:
                raise RuntimeError(message)
            if not self._warned_missing:
                self._warned_missing = True
                rank_zero_warn(message)
            return
        if current is self._last_checked:
            return
        self._last_checked = current
        stop, reason = self.evaluate(float(current))
        stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
            rank_zero_info(f"MIREarlyStopping: {reason}")
        elif self.verbose and reason:
            rank_zero_info(f"MIREarlyStopping: {reason}")

    # ------------------------------------------------------------------ the rule
    def evaluate(self, value: float) -> tuple[bool, Optional[str]]:
        """Feed one value; ``(stop, message)``."""
        value = float(value)
        if not math.isfinite(value):
            if self.check_finite:
                self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC
                return True, (f"Monitored metric {self.monitor} = {value} is not finite. Previous best value was "
                              f"{float(self.best_score):.3f}. Signaling Trainer to stop.")
            return False, f"{self.monitor} = {value} is not finite; ignored by MIREarlyStopping"
        reason = self._threshold_reached(value)
        if not self.plateau:
            if reason is not None:
                return True, reason
            return self._classic(value)
        stopped = self.rule.update(value)
        self.best_score = torch.tensor(min(value, float(self.best_score)))
        self.wait_count = self.rule.wait_count
        if reason is not None:
            return True, reason
        if stopped:
            self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
            return True, f"{self.monitor}: {self.rule.describe()}. Signaling Trainer to stop."
        return False, f"{self.monitor} = {value:.4f}; {self.rule.describe()}"

    _evaluate_stopping_criteria = evaluate  # the name of Lightning EarlyStopping's method (older callers)

    def _classic(self, value: float) -> tuple[bool, str]:
        """Lightning's "min" rule: an improvement is a decrease of more than ``min_delta``."""
        best = float(self.best_score)
        if value < best - self.band:
            self.best_score = torch.tensor(value)
            self.wait_count = 0
            return False, f"{self.monitor} improved to {value:.4f}"
        self.wait_count += 1
        if self.wait_count >= self.patience:
            self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
            return True, (f"Monitored metric {self.monitor} did not improve in the last {self.wait_count} records. "
                          f"Best score: {best:.4f}. Signaling Trainer to stop.")
        return False, f"{self.monitor} = {value:.4f}; no improvement for {self.wait_count}/{self.patience} checks"

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
