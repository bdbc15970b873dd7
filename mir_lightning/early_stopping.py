"""``MIREarlyStopping``: stop pre-training when MIR has converged (Lightning ``EarlyStopping``)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from torch import Tensor


class MIREarlyStopping(EarlyStopping):
    """Early stopping on a plateau of MIR (the paper's sense of saturated pre-training).

    ``mode="plateau"`` (default): stop when the last ``patience + 1`` finite values of
    ``monitor`` all lie within ``min_delta`` of each other (``max - min <= min_delta``, in
    MIR units, i.e. log10 of the FD sum), whichever direction MIR moved before. MIR can
    rise while a model is still learning (see the README), so this is not a "no improvement"
    rule. ``mode="min"``: Lightning's classic rule (stop after ``patience`` checks without a
    decrease of at least ``min_delta``).

    Non-finite values (a failed MIR computation is logged as NaN) are ignored unless
    ``check_finite=True``. State (recent values, patience count) is saved in checkpoints, so
    ``Trainer.fit(ckpt_path=...)`` continues the count. The decision is reduced across ranks
    by Lightning (any rank stopping stops all; every rank sees the same MIR anyway). Works
    with ``val_check_interval`` in steps as well as epochs: it checks after every validation.

    Args:
        monitor: logged key to watch (``MIRCallback``'s ``name``, default ``"mir"``).
        min_delta: plateau width (plateau mode) or minimal decrease (min mode).
        patience: plateau mode: number of further validations that must stay within the
            band; min mode: checks without improvement.
        mode: ``"plateau"`` or ``"min"``.
        kwargs: passed to ``EarlyStopping`` (``verbose``, ``strict``, ``check_on_train_epoch_end``...).

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
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        super().__init__(monitor=monitor, min_delta=min_delta, patience=patience, mode="min", check_finite=check_finite, **kwargs)
        self.plateau = mode == "plateau"
        self.band = float(min_delta)
        self.recent: list[float] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode="plateau" if self.plateau else "min")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "recent": list(self.recent)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.recent = list(state_dict.get("recent", []))

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, Optional[str]]:
        value = float(current)
        if not math.isfinite(value):
            if self.check_finite:
                return super()._evaluate_stopping_criteria(current)
            return False, f"{self.monitor} = {value} is not finite; ignored by MIREarlyStopping"
        if not self.plateau:
            self.recent.append(value)
            return super()._evaluate_stopping_criteria(current)
        self.recent.append(value)
        self.recent = self.recent[-(self.patience + 1):]
        if value < float(self.best_score):
            self.best_score = torch.tensor(value)
        # patience count: how many values after the first of the trailing run stay in the band
        run = 1
        for i in range(len(self.recent) - 2, -1, -1):
            window = self.recent[i:]
            if max(window) - min(window) > self.band:
                break
            run += 1
        self.wait_count = run - 1
        if self.wait_count >= self.patience:
            self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
            spread = max(self.recent) - min(self.recent)
            values = ", ".join(f"{v:.4f}" for v in self.recent)
            return True, (
                f"{self.monitor} has plateaued: the last {len(self.recent)} values ({values}) lie within "
                f"{spread:.4f} <= min_delta={self.band}. Signaling Trainer to stop."
            )
        return False, f"{self.monitor} = {value:.4f}; plateau count {self.wait_count}/{self.patience} (band {self.band})"
