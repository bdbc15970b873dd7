"""Lightning pieces of the examples: the LightningModule around :class:`lvlm.LVLM`, and a callback
that keeps (and, without a terminal, prints) every validation's metrics.

Step convention: every scalar is logged at ``trainer.global_step`` (optimizer steps done), so
the validation after N steps is at N, before and after a resume, and Lightning adds no
``epoch`` scalar.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lvlm import LVLM, ProbeScores  # noqa: E402


class LVLMPretrainer(L.LightningModule):
    """Trains the projector of an :class:`LVLM` with AdamW; validation logs ``val/<ProbeScores field>``.

    Checkpoints hold only the trainable weights (the projector) and the optimizer state.
    """

    def __init__(self, model: LVLM, lr: float = 3e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.strict_loading = False  # checkpoints deliberately omit the frozen LLM

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**batch)

    def trainable_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = self.trainable_keys() - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint lacks trainable weights: {sorted(missing)}")

    def _log_step(self) -> None:
        # a logged "step" is the x-axis Lightning uses (and then it adds no "epoch" scalar)
        self.log("step", float(self.global_step), on_step=not self.trainer.validating,
                 on_epoch=self.trainer.validating, batch_size=1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self._log_step()
        self.log("train/caption_loss", loss, prog_bar=True, batch_size=len(batch["digit"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scores = self.model.score(batch)
        bs = len(batch["digit"])
        self._log_step()
        for name in ProbeScores.names():
            self.log(f"val/{name}", getattr(scores, name), prog_bar=name in ("caption_loss", "digit_acc"),
                     batch_size=bs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters; a parameter with an ``lr_scale`` attribute (e.g. an
        unlocked LLM weight) trains at ``lr * lr_scale``."""
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for p in self.parameters():
            if p.requires_grad:
                groups.setdefault(float(getattr(p, "lr_scale", 1.0)), []).append(p)
        return torch.optim.AdamW([{"params": ps, "lr": self.hparams.lr * scale} for scale, ps in groups.items()],
                                 lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class ValidationHistory(L.Callback):
    """One row per validation, ``{"step": trainer.global_step, <ProbeScores field>: ..., "mir": ...}``,
    kept in checkpoints so that a resumed run reports the whole curve.

    ``print_progress``: print one flushed line per validation (step, MIR, accuracy, caption
    loss, elapsed seconds), for runs whose output goes to a file (no progress bar there).
    """

    def __init__(self, print_progress: bool = False, mir_key: str = "mir") -> None:
        self.rows: list[dict[str, Any]] = []
        self.print_progress = print_progress
        self.mir_key = mir_key
        self._start = time.time()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row: dict[str, Any] = {"step": int(trainer.global_step)}
        metrics = trainer.callback_metrics
        for name in ProbeScores.names():
            if f"val/{name}" in metrics:
                row[name] = float(metrics[f"val/{name}"])
        if self.mir_key in metrics:
            row[self.mir_key] = float(metrics[self.mir_key])
        self.rows = [r for r in self.rows if r["step"] < row["step"]] + [row]  # a resume replaces later rows
        if self.print_progress:
            mir = f"{row[self.mir_key]:.3f}" if self.mir_key in row else "-"
            print(f"[val] step {row['step']}: MIR {mir}, digit acc {row.get('digit_acc', float('nan')):.2f}, "
                  f"caption loss {row.get('caption_loss', float('nan')):.3f}, "
                  f"elapsed {time.time() - self._start:.0f}s", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]


class StepTimer(L.Callback):
    """Wall seconds of every training step and of every validation run (the MIR of every
    ``MIRCallback`` included: they finish before ``on_validation_end``)."""

    def __init__(self) -> None:
        self.train_s: list[float] = []
        self.validation_s: list[float] = []
        self._t0 = self._v0 = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.train_s.append(time.perf_counter() - self._t0)

    def on_validation_epoch_start(self, *args: Any) -> None:
        self._v0 = time.perf_counter()

    def on_validation_end(self, *args: Any) -> None:
        self.validation_s.append(time.perf_counter() - self._v0)


class _NoLitLoggerTip(logging.Filter):
    """Drops Lightning's tip to install litlogger (printed at every Trainer start)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_known_noise() -> None:
    """Silence what the examples know to be harmless on every Lightning run (process-wide filters)."""
    # the frozen LLM is kept in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # Lightning 2.6 on torch >= 2.10: its own _pytree helper uses a deprecated torch class
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
                            category=FutureWarning)
    # one small in-memory dataset: worker processes would only cost start-up time
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")

    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoLitLoggerTip) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_NoLitLoggerTip())
