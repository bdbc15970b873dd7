"""The plateau rule for stopping pre-training on MIR: pure functions and a small tracker.

MIR can rise while a model is still learning (see the README), so the rule is not "no
improvement": it fires when the last ``patience + 1`` finite values all lie within
``min_delta`` of each other (``max - min <= min_delta``, in MIR units), whichever way MIR
moved before. Values are compared at float32 precision, as loggers store them, so a live
run (which sees logged values) and a replay of a recorded float64 history decide alike.

One implementation serves :class:`~mir_lightning.MIREarlyStopping` (Lightning), the Hugging
Face Trainer callback and the studies' replays of recorded curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["MIRPlateau", "plateau_count", "plateau_index"]


def _as_logged(value: float) -> float:
    """``value`` rounded to float32, the precision a logged scalar keeps."""
    return float(np.float32(value))


def plateau_count(values: Sequence[float], min_delta: float) -> int:
    """How many values after the first of the longest trailing run that stays within
    ``min_delta`` (``max - min``): 0 when the last two values already differ by more.

    Non-finite values are not expected here (callers drop them).

    Example:
        >>> plateau_count([3.0, 2.5, 2.40, 2.41, 2.39], 0.02)
        2
    """
    kept = [_as_logged(v) for v in values]
    run = 0
    low = high = kept[-1] if kept else math.nan
    for value in reversed(kept[:-1]):
        low, high = min(low, value), max(high, value)
        if high - low > min_delta:
            break
        run += 1
    return run


def plateau_index(values: Sequence[float], patience: int, min_delta: float) -> int | None:
    """Index into ``values`` at which the plateau rule first fires (the last ``patience + 1``
    finite values within ``min_delta``), replayed on a recorded curve; None if it never does.
    Non-finite values are skipped, as the live rule skips them.

    Example:
        >>> plateau_index([3.0, 2.5, 2.40, 2.41, 2.39, 2.40], patience=3, min_delta=0.02)
        5
    """
    tracker = MIRPlateau(patience=patience, min_delta=min_delta)
    for index, value in enumerate(values):
        if tracker.update(value):
            return index
    return None


@dataclass
class MIRPlateau:
    """Stateful plateau rule: feed each new MIR with :meth:`update`; it returns True once the
    last ``patience + 1`` finite values lie within ``min_delta``.

    Keeps only those ``patience + 1`` values (``recent``); ``state_dict`` / ``load_state_dict``
    carry them across a resume.

    Args:
        patience: number of further values (after the first) that must stay in the band (>= 1).
        min_delta: width of the band in MIR units (log10 of the FD sum), >= 0.

    Example:
        >>> rule = MIRPlateau(patience=2, min_delta=0.05)
        >>> [rule.update(v) for v in (2.0, 1.5, 1.52, 1.49)]
        [False, False, False, True]
    """

    patience: int = 3
    min_delta: float = 0.02
    recent: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if int(self.patience) != self.patience or self.patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {self.patience!r}")
        if not self.min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta!r}")
        self.patience = int(self.patience)
        self.min_delta = float(self.min_delta)
        self.recent = [_as_logged(v) for v in self.recent][-(self.patience + 1):]

    @property
    def wait_count(self) -> int:
        """Values after the first of the trailing in-band run (the rule fires at ``patience``)."""
        return plateau_count(self.recent, self.min_delta) if self.recent else 0

    @property
    def stopped(self) -> bool:
        """Whether the last :meth:`update` (or a restored state) meets the rule."""
        return self.wait_count >= self.patience

    def update(self, value: float) -> bool:
        """Record ``value`` (non-finite values are ignored) and return :attr:`stopped`."""
        value = float(value)
        if math.isfinite(value):
            self.recent = (self.recent + [_as_logged(value)])[-(self.patience + 1):]
        return self.stopped

    def describe(self) -> str:
        """One line saying where the rule stands (for logs and stop messages)."""
        values = ", ".join(f"{v:.4f}" for v in self.recent)
        if self.stopped:
            spread = max(self.recent) - min(self.recent)
            return (f"MIR has plateaued: the last {len(self.recent)} values ({values}) lie within "
                    f"{spread:.4f} <= min_delta={self.min_delta}")
        return f"plateau count {self.wait_count}/{self.patience} (band {self.min_delta}; recent {values})"

    def reset(self) -> None:
        """Forget all values."""
        self.recent = []

    def state_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "min_delta": self.min_delta, "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = [_as_logged(v) for v in state.get("recent", [])][-(self.patience + 1):]
