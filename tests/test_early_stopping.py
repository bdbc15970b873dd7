"""MIREarlyStopping: the shared plateau rule, the thresholds in plateau mode, bounded state.

A tiny LightningModule logs a scripted ``mir`` curve at each validation, so the stop step is
known in advance and each test runs a real Lightning Trainer in about a second.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from torch.utils.data import DataLoader

from mir_lightning import MIREarlyStopping
from mir_lightning.plateau import plateau_index


class ScriptedMIR(pl.LightningModule):
    """Logs ``curve[i]`` as ``mir`` at its i-th validation (one optimizer step between validations)."""

    def __init__(self, curve):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.curve = list(curve)
        self.validations = 0

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.log("mir", self.curve[self.validations])
            self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(tmp_path, curve, stopper, **extra):
    data = DataLoader(torch.zeros(len(curve), 2), batch_size=1)
    module = ScriptedMIR(curve)
    settings = dict(default_root_dir=tmp_path, max_steps=len(curve), val_check_interval=1, num_sanity_val_steps=0,
                    limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False)
    settings.update(extra, callbacks=[stopper, *extra.get("callbacks", [])])
    trainer = pl.Trainer(**settings)
    trainer.fit(module, data, data)
    return trainer


@pytest.mark.parametrize(
    "threshold, curve, stop_at, reason",
    [
        # MIR falls below the target at the 3rd validation, long before any plateau
        (dict(stopping_threshold=2.0), [3.0, 2.5, 1.9, 1.5, 1.0, 0.5], 3, EarlyStoppingReason.STOPPING_THRESHOLD),
        # MIR rises above the divergence bound at the 4th validation
        (dict(divergence_threshold=4.0), [3.0, 3.5, 3.9, 4.2, 4.8, 5.5], 4, EarlyStoppingReason.DIVERGENCE_THRESHOLD),
    ],
)
def test_plateau_mode_honours_thresholds(tmp_path, threshold, curve, stop_at, reason):
    # before: accepted and ignored in plateau mode (training ran all 6 steps)
    # check after each validation (Lightning would check at epoch end only, as val_check_interval == 1)
    stopper = MIREarlyStopping(monitor="mir", min_delta=0.01, patience=3, check_on_train_epoch_end=False, **threshold)
    trainer = fit(tmp_path, curve, stopper)
    assert trainer.global_step == stop_at
    assert stopper.stopping_reason == reason


def test_recent_is_bounded_in_min_mode_and_in_checkpoints(tmp_path):
    # before: mode="min" appended every value to `recent`, and every checkpoint carried all of them
    curve = [10.0 - 0.1 * i for i in range(30)]  # steadily improving: never stops
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    stopper = MIREarlyStopping(monitor="mir", min_delta=0.01, patience=3, mode="min", check_on_train_epoch_end=False)
    trainer = fit(tmp_path, curve, stopper, callbacks=[ckpt], enable_checkpointing=True)
    assert trainer.global_step == len(curve)
    assert len(stopper.recent) <= stopper.patience + 1
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][stopper.state_key]
    assert len(saved["recent"]) <= stopper.patience + 1


def test_old_checkpoint_with_long_recent_is_cut_to_the_rule():
    stopper = MIREarlyStopping(min_delta=0.05, patience=2)
    state = {**stopper.state_dict(), "recent": [5.0, 4.0, 3.0, 2.0, 2.01, 2.02]}
    stopper.load_state_dict(state)
    assert stopper.recent == pytest.approx([2.0, 2.01, 2.02], abs=1e-6)
    assert stopper._evaluate_stopping_criteria(torch.tensor(2.03))[0]  # 2.01..2.03 stay within 0.05


def test_live_rule_decides_as_the_replay_of_a_recorded_curve():
    """One plateau implementation: the Lightning stopper and ``plateau_index`` (used to replay
    recorded histories) stop at the same value, also at the edge of the band, where float64
    and the float32 precision of logged scalars disagree (1.02000001 - 1.0 > 0.02 in float64,
    == 0.01999998 in float32). Before: the stopper compared float64 values and never fired here."""
    curve = [1.5, 1.0, 1.0200000100, 1.0, 1.0200000100, 1.01]
    expected = plateau_index(curve, patience=3, min_delta=0.02)
    assert expected == 4
    stopper = MIREarlyStopping(min_delta=0.02, patience=3)
    decisions = [stopper._evaluate_stopping_criteria(torch.tensor(v, dtype=torch.float64))[0] for v in curve]
    assert decisions.index(True) == expected
    assert stopper.wait_count == 3


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="patience"):
        MIREarlyStopping(patience=0)
    with pytest.raises(ValueError, match="min_delta"):
        MIREarlyStopping(min_delta=-0.1)
    with pytest.raises(ValueError, match="mode"):
        MIREarlyStopping(mode="max")


def test_overrides_no_private_lightning_method():
    """A reader of callback_metrics on Lightning's public callback hooks: none of its methods
    replaces a private method of Lightning's Callback (before: it subclassed EarlyStopping and
    overrode _evaluate_stopping_criteria / _run_early_stopping_check)."""
    from lightning.pytorch.callbacks import Callback, EarlyStopping

    assert not issubclass(MIREarlyStopping, EarlyStopping)
    for cls in MIREarlyStopping.__mro__[1:]:
        if cls.__module__.startswith("lightning"):
            own = {n for n in vars(MIREarlyStopping) if n.startswith("_") and not n.startswith("__")}
            assert not own & set(vars(cls)), own & set(vars(cls))
    assert issubclass(MIREarlyStopping, Callback)


@pytest.mark.parametrize("stopper_first", [True, False])
def test_step_time_values_are_checked_once_in_either_callback_order(tmp_path, stopper_first):
    """A value a callback puts in callback_metrics during training (as MIRCallback does at a
    step-time probe, announcing it with on_mir_measurement) is checked at that step, once,
    whichever callback comes first."""

    class StepValues(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step % 2 == 0:
                trainer.callback_metrics["mir"] = torch.tensor(1.0)  # a new tensor: a new value
                for cb in trainer.callbacks:
                    if cb is not self and hasattr(cb, "on_mir_measurement"):
                        cb.on_mir_measurement(trainer, "mir")

    stopper = MIREarlyStopping(monitor="mir", min_delta=1e-6, patience=2)
    callbacks = [stopper, StepValues()] if stopper_first else [StepValues(), stopper]
    data = DataLoader(torch.zeros(40, 2), batch_size=1)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=40, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                         limit_val_batches=0)
    trainer.fit(ScriptedMIR([]), data)
    assert trainer.global_step == 6  # values at steps 2, 4, 6: the third completes the plateau
    assert len(stopper.recent) == 3
