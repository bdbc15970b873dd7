"""MIRCallback and MIREarlyStopping with a real Trainer on CPU; values read back from TensorBoard files."""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from mir_lightning import MIRCallback, MIREarlyStopping
from lightning_helpers import EndProcessGroup, TinyLlava, loader, make_batches, official_masks, read_image_tags, read_scalars, reference_for

TRAINER = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)


def fit(tmp_path, module, callbacks, max_steps=6, val_every=2, version=0, ckpt_path=None, **kwargs):
    batches = make_batches()
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=version)
    options = dict(TRAINER, max_steps=max_steps, val_check_interval=val_every, check_val_every_n_epoch=None,
                   logger=logger, num_sanity_val_steps=2, enable_checkpointing=False)
    options.update(kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.fit(module, loader(batches), loader(batches), ckpt_path=ckpt_path)
    return trainer, batches, os.path.join(str(tmp_path), "tb", f"version_{version}")


def capture_hooks(module):
    """Forward hooks of mir_lightning's LayerCapture left on ``module`` (transformers adds its own)."""
    return [h for m in module.modules() for h in m._forward_hooks.values() if "LayerCapture" in h.__qualname__]


def test_logged_mir_equals_reference_and_sanity_check_logs_nothing(tmp_path):
    module = TinyLlava(lr=0.05)
    cb = MIRCallback()
    trainer, batches, log_dir = fit(tmp_path, module, [cb], max_steps=6, val_every=3)
    scalars = read_scalars(log_dir)
    # two real validation runs, after optimizer steps 3 and 6, logged at trainer.global_step
    # (3 and 6; Lightning's own validation logging would use 2 and 5); the sanity check logged nothing
    assert [s for s, _ in scalars["mir"]] == [3, 6]
    assert len(cb.history) == 2
    ref_mir, ref_fd, _ = reference_for(module, batches)  # weights after the last step = weights at step 6
    assert abs(scalars["mir"][-1][1] - ref_mir) < 1e-5  # TensorBoard stores float32
    assert abs(cb.history[-1]["mir"] - ref_mir) < 1e-6
    layer_tags = sorted(t for t in scalars if t.startswith("mir_fd/layer_"))
    assert len(layer_tags) == len(ref_fd)
    for k, tag in enumerate(layer_tags):
        assert math.isclose(scalars[tag][-1][1], ref_fd[k], rel_tol=1e-5)
    assert scalars["mir"][0][1] != scalars["mir"][1][1]  # the model trained in between
    images = read_image_tags(log_dir)
    assert images["mir/per_layer"] == [3, 6] and images["mir/history"] == [3, 6]
    assert [h["step"] for h in cb.history] == [3, 6]
    # training forwards were never captured: hooks are gone after validation
    assert not capture_hooks(module)


def test_explicit_layers_masks_and_layer_subset(tmp_path):
    module = TinyLlava()
    from mir_lightning.integrations.transformers import find_hidden_state_modules

    cb = MIRCallback(layers=lambda m: find_hidden_state_modules(m.model), masks=official_masks, layer_indices=[0, 2])
    batches = make_batches(n_batches=2)
    trainer = pl.Trainer(logger=False, callbacks=[cb], **TRAINER)
    trainer.validate(module, loader(batches), verbose=False)
    ref_mir, _, _ = reference_for(module, batches, layers=[0, 2])
    assert abs(float(trainer.callback_metrics["mir"]) - ref_mir) < 1e-6  # works with logger=False
    assert "mir_fd/layer_02" in trainer.callback_metrics and "mir_fd/layer_01" not in trainer.callback_metrics


def test_probe_dataloader_and_step_output(tmp_path):
    module = TinyLlava()
    probe = make_batches(n_batches=2, seed=50)
    cb = MIRCallback(probe_dataloader=loader(probe), name="mir_probe")
    trainer = pl.Trainer(logger=False, callbacks=[cb], **TRAINER)
    trainer.validate(module, loader(make_batches(n_batches=1)), verbose=False)
    ref_mir, _, _ = reference_for(module, probe)
    assert abs(float(trainer.callback_metrics["mir_probe"]) - ref_mir) < 1e-6

    class StepOutput(TinyLlava):
        def validation_step(self, batch, batch_idx):
            out = self.model(**batch, output_hidden_states=True)
            vision, text = official_masks(batch)
            return {"hidden_states": out.hidden_states[1:], "vision_mask": vision, "text_mask": text}

    module2 = StepOutput()
    batches = make_batches(n_batches=2)
    ref_mir, _, _ = reference_for(module2, batches)
    cb2 = MIRCallback(source="step_output")
    trainer = pl.Trainer(logger=False, callbacks=[cb2], **TRAINER)
    trainer.validate(module2, loader(batches), verbose=False)
    assert abs(float(trainer.callback_metrics["mir"]) - ref_mir) < 1e-6
    # a layer subset keeps the model's layer ids in the logged keys (was layer_00, layer_01)
    cb3 = MIRCallback(source="step_output", layer_indices=[0, 2])
    trainer = pl.Trainer(logger=False, callbacks=[cb3], **TRAINER)
    trainer.validate(module2, loader(batches), verbose=False)
    ref_mir, _, _ = reference_for(module2, batches, layers=[0, 2])
    assert abs(float(trainer.callback_metrics["mir"]) - ref_mir) < 1e-6
    assert "mir_fd/layer_02" in trainer.callback_metrics and "mir_fd/layer_01" not in trainer.callback_metrics
    assert cb3.history[-1]["layers"] == [0, 2]


class ModeRecorder(TinyLlava):
    """Records, at each training step, whether every module is in training mode."""

    def training_step(self, batch, batch_idx):
        self.modes = getattr(self, "modes", []) + [all(m.training for m in self.modules())]
        return super().training_step(batch, batch_idx)


def test_every_n_train_steps_without_validation(tmp_path):
    module = ModeRecorder(lr=0.0).train()  # fixed weights: every probe equals the reference
    probe = make_batches(n_batches=3, seed=50)
    cb = MIRCallback(probe_dataloader=loader(probe), every_n_train_steps=2)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = pl.Trainer(callbacks=[cb], logger=logger, max_steps=5, accumulate_grad_batches=2,
                         enable_checkpointing=False, log_every_n_steps=1, **TRAINER)
    trainer.fit(module, loader(make_batches()))  # no validation dataloader at all
    ref_mir, ref_fd, _ = reference_for(module, probe)
    scalars = read_scalars(os.path.join(str(tmp_path), "tb", "version_0"))
    # once per probe, at its optimizer step (not at every micro-batch of the accumulation)
    assert [s for s, _ in scalars["mir"]] == [2, 4]
    assert all(abs(v - ref_mir) < 1e-6 for _, v in scalars["mir"])  # TensorBoard stores float32
    assert [s for s, _ in scalars["mir_fd/layer_02"]] == [2, 4]
    assert math.isclose(scalars["mir_fd/layer_02"][-1][1], ref_fd[2], rel_tol=1e-6)
    assert [h["step"] for h in cb.history] == [2, 4]
    assert all(math.isclose(h["mir"], ref_mir, rel_tol=1e-9) for h in cb.history)  # measured 1e-15
    assert math.isclose(float(trainer.callback_metrics["mir"]), ref_mir, rel_tol=1e-9)
    assert not capture_hooks(module)
    assert len(module.modes) == 10 and all(module.modes)  # the probe's eval() was undone every time


def test_refuses_unknown_keywords_and_inconsistent_options():
    with pytest.raises(TypeError, match="every_n_train_stepz"):
        MIRCallback(every_n_train_stepz=2)
    with pytest.raises(ValueError, match="probe_dataloader"):
        MIRCallback(every_n_train_steps=2)


def test_failure_is_a_warning_and_nan(tmp_path):
    def broken_masks(batch):
        raise RuntimeError("boom")

    module = TinyLlava(lr=0.01)
    cb = MIRCallback(masks=broken_masks)
    with pytest.warns(UserWarning, match="boom"):
        trainer, _, log_dir = fit(tmp_path, module, [cb], max_steps=4, val_every=2)
    assert trainer.global_step == 4  # training went on
    values = read_scalars(log_dir)["mir"]
    assert len(values) == 2 and all(math.isnan(v) for _, v in values)


def test_plateau_rule_unit():
    stopper = MIREarlyStopping(min_delta=0.05, patience=2)
    decisions = [stopper._evaluate_stopping_criteria(torch.tensor(v))[0] for v in (3.0, 2.0, 2.5, 2.52, 2.49)]
    assert decisions == [False, False, False, False, True]
    stopper = MIREarlyStopping(min_delta=0.05, patience=2)
    rising = [stopper._evaluate_stopping_criteria(torch.tensor(v))[0] for v in (1.0, 1.2, 1.4, 1.6, 1.8)]
    assert not any(rising)  # MIR that keeps moving (even upward) is no plateau
    assert not stopper._evaluate_stopping_criteria(torch.tensor(float("nan")))[0]
    classic = MIREarlyStopping(min_delta=0.05, patience=2, mode="min")
    assert [classic._evaluate_stopping_criteria(torch.tensor(v))[0] for v in (1.0, 1.2, 1.4)] == [False, False, True]


def test_early_stopping_fires_on_plateau_and_not_before(tmp_path):
    module = TinyLlava(lr=0.0)  # frozen: MIR is the same at every validation
    stopper = MIREarlyStopping(monitor="mir", min_delta=1e-6, patience=2)
    trainer, _, log_dir = fit(tmp_path, module, [MIRCallback(), stopper], max_steps=40, val_every=2)
    # validations after steps 2, 4, 6: the third value completes the plateau
    assert trainer.global_step == 6
    assert [s for s, _ in read_scalars(log_dir)["mir"]] == [2, 4, 6]
    assert "plateaued" in stopper.stopping_reason_message


def test_early_stopping_follows_step_time_mir(tmp_path):
    """With every_n_train_steps (no validation loop) the plateau rule is checked after each
    probe, once: a frozen model's MIR is flat, so patience 2 stops at the third probe (step 6),
    not at the epoch's end (step 20) and not after counting one value twice."""
    module = TinyLlava(lr=0.0)
    stopper = MIREarlyStopping(monitor="mir", min_delta=1e-6, patience=2)
    probe = MIRCallback(probe_dataloader=loader(make_batches(n_batches=2, seed=7)), every_n_train_steps=2)
    trainer = pl.Trainer(callbacks=[stopper, probe], logger=False, max_steps=40, enable_checkpointing=False, **TRAINER)
    trainer.fit(module, loader(make_batches(n_batches=20)))
    assert trainer.global_step == 6
    assert [h["step"] for h in probe.history] == [2, 4, 6]
    assert len(stopper.recent) == 3 and "plateaued" in stopper.stopping_reason_message


def test_resume_continues_curves_and_patience(tmp_path):
    ckpt_dir = tmp_path / "ckpt"

    def callbacks():
        return [MIRCallback(), MIREarlyStopping(monitor="mir", min_delta=10.0, patience=50),
                ModelCheckpoint(dirpath=str(ckpt_dir), monitor="mir", save_last=True, save_top_k=-1)]
        # monitor= makes ModelCheckpoint save after each validation, with its MIR in the callback state

    first = callbacks()
    fit(tmp_path, TinyLlava(lr=0.05), first, max_steps=4, val_every=2, enable_checkpointing=True)
    assert first[1].wait_count == 1
    second = callbacks()
    trainer, batches, log_dir = fit(tmp_path, TinyLlava(lr=0.05), second, max_steps=8, val_every=2,
                                    enable_checkpointing=True, ckpt_path=str(ckpt_dir / "last.ckpt"))
    steps = [s for s, _ in read_scalars(log_dir)["mir"]]
    assert steps == [2, 4, 6, 8]  # no gap, no duplicate, no shift at the resume: trainer.global_step throughout
    assert [h["step"] for h in second[0].history] == [2, 4, 6, 8]
    assert second[1].wait_count == 3 and len(second[1].recent) == 4  # the count went on


def test_bf16_precision_keeps_float64_state(tmp_path):
    module = TinyLlava()
    cb = MIRCallback()
    batches = make_batches(n_batches=2)
    trainer = pl.Trainer(logger=False, precision="bf16-mixed", callbacks=[cb], **TRAINER)
    trainer.validate(module, loader(batches), verbose=False)
    assert cb.metric.vision_m2.dtype == torch.float64
    # the reference on the same bf16-autocast hidden states (measured: 8e-17 on MIR, 1e-15 per
    # layer); the float32 forward's reference differs by ~3e-5, so this tells bf16 from fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_mir, ref_fd, _ = reference_for(module, batches)
    assert abs(cb.history[-1]["mir"] - ref_mir) < 1e-10
    np.testing.assert_allclose(cb.metric.per_layer_fd().numpy(), ref_fd, rtol=1e-10)


class LazyTinyLlava(TinyLlava):
    """Builds its model in configure_model (inside each spawned process): transformers 5
    models do not survive pickling into ddp_spawn workers with their output recorders."""

    def __init__(self):
        pl.LightningModule.__init__(self)
        self.model = None
        self.lr = 0.0

    def configure_model(self):
        if self.model is None:
            from vlm_factory import make_tiny_vlm

            self.model, _ = make_tiny_vlm("llava", seed=0)


def _spawn_strategy(find_unused_parameters: bool = False):
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    # a hang becomes a failure after 60 s instead of the default 30 minutes
    return DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60),
                       find_unused_parameters=find_unused_parameters)


def _ddp_fit(tmp):
    module = LazyTinyLlava()
    cb = MIRCallback()
    trainer = pl.Trainer(strategy=_spawn_strategy(), accelerator="cpu", devices=2, logger=False,
                         callbacks=[cb, EndProcessGroup()],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, loader(make_batches(n_batches=4)), verbose=False)
    return float(trainer.callback_metrics["mir"])


def _ddp_probe_fit(tmp):
    """Probe of 3 batches on 2 ranks during training (no validation): 2 forwards each, one a padding."""
    cb = MIRCallback(probe_dataloader=loader(make_batches(n_batches=3, seed=50)), every_n_train_steps=2)
    trainer = pl.Trainer(strategy=_spawn_strategy(find_unused_parameters=True), accelerator="cpu", devices=2,
                         logger=False, callbacks=[cb, EndProcessGroup()], max_steps=2, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LazyTinyLlava(), loader(make_batches(n_batches=4)))
    return float(trainer.callback_metrics["mir"])


def _masks_failing_on_rank_one(batch):
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("rank one fails")
    from lightning_helpers import official_masks

    return official_masks(batch)


def _ddp_one_rank_fails():
    cb = MIRCallback(masks=_masks_failing_on_rank_one)
    trainer = pl.Trainer(strategy=_spawn_strategy(), accelerator="cpu", devices=2, logger=False,
                         callbacks=[cb, EndProcessGroup()],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(LazyTinyLlava(), loader(make_batches(n_batches=4)), verbose=False)
    return float(trainer.callback_metrics["mir"])


def test_ddp_spawn_two_processes_equal_one(tmp_path):
    module = TinyLlava()
    batches = make_batches(n_batches=4)
    ref_mir, _, _ = reference_for(module, batches)
    mir = _ddp_fit(tmp_path)
    assert abs(mir - ref_mir) < 1e-5
    # a failure on one rank: every rank logs NaN, nobody hangs in the merge
    assert math.isnan(_ddp_one_rank_fails())
    # the probe path during training (lr 0: the weights of the reference)
    ref_mir, _, _ = reference_for(TinyLlava(), make_batches(n_batches=3, seed=50))
    assert abs(_ddp_probe_fit(tmp_path) - ref_mir) < 1e-9


class NoForward(TinyLlava):
    """A LightningModule that runs its model in its steps only (no forward of its own)."""

    forward = pl.LightningModule.forward


def test_module_without_forward_is_told_about_probe_step(tmp_path):
    # before: "NotImplementedError: Module [NoForward] is missing the required "forward" function"
    module = NoForward()
    cb = MIRCallback(probe_dataloader=loader(make_batches(n_batches=2, seed=50)))
    trainer = pl.Trainer(logger=False, callbacks=[cb], **TRAINER)
    with pytest.warns(UserWarning, match=r"probe_step="):
        trainer.validate(module, loader(make_batches(n_batches=1)), verbose=False)
    assert math.isnan(float(trainer.callback_metrics["mir"]))
    # the fix the message names works
    cb = MIRCallback(probe_dataloader=loader(make_batches(n_batches=2, seed=50)),
                     probe_step=lambda m, batch: m.model(**batch))
    trainer = pl.Trainer(logger=False, callbacks=[cb], **TRAINER)
    trainer.validate(module, loader(make_batches(n_batches=1)), verbose=False)
    ref_mir, _, _ = reference_for(module, make_batches(n_batches=2, seed=50))
    assert abs(float(trainer.callback_metrics["mir"]) - ref_mir) < 1e-6


def test_early_stopping_argument_stops_at_the_plateau(tmp_path):
    """MIRCallback(early_stopping=MIRPlateau(...)): the rule after each step-time probe, the
    decision through the strategy; a frozen model's flat MIR stops at the third probe."""
    from mir_lightning import MIRPlateau

    module = TinyLlava(lr=0.0)
    cb = MIRCallback(probe_dataloader=loader(make_batches(n_batches=2, seed=7)), every_n_steps=2,
                     early_stopping=MIRPlateau(patience=2, min_delta=1e-6), log_figures=False)
    trainer = pl.Trainer(callbacks=[cb], logger=False, max_steps=40, enable_checkpointing=False, **TRAINER)
    trainer.fit(module, loader(make_batches(n_batches=20)))
    assert trainer.global_step == 6
    assert [h.step for h in cb.history] == [2, 4, 6]
    assert cb.early_stopping.stopped and len(cb.early_stopping.recent) == 3


def _warn_once_per_location():
    import warnings

    warnings.warn("a warning Python shows once per location", UserWarning)


class WarnsAtStep(pl.Callback):
    """Warns (always from the same line) at one global step."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            _warn_once_per_location()


def test_measurement_with_figures_does_not_reset_the_warnings_registry(tmp_path):
    """A warning shown once (Python's default action) before a measurement with TensorBoard
    figures stays silent after it. Before: the figures (matplotlib's set_ticklabels) and the
    callback's own warnings.catch_warnings() reset the registry, so it was shown again."""
    import warnings

    cb = MIRCallback(probe_dataloader=loader(make_batches(n_batches=2, seed=7)), every_n_steps=2)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = pl.Trainer(callbacks=[WarnsAtStep(2), cb, WarnsAtStep(2)], logger=logger, max_steps=2,
                         enable_checkpointing=False, **TRAINER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        trainer.fit(TinyLlava(lr=0.0), loader(make_batches(n_batches=2)))
    assert read_image_tags(os.path.join(str(tmp_path), "tb", "version_0"))["mir/per_layer"] == [2]
    assert sum("shows once per location" in str(w.message) for w in caught) == 1


class RecordStop(pl.Callback):
    """Writes each rank's final global step to ``folder/rank{r}.txt`` at teardown."""

    def __init__(self, folder):
        self.folder = folder

    def teardown(self, trainer, pl_module, stage):
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.txt"), "w") as f:
            f.write(str(trainer.global_step))


def _ddp_plateau_fit(folder):
    """Step-time probe on 2 ranks with MIRCallback(early_stopping=...): lr 0, flat MIR."""
    from mir_lightning import MIRPlateau

    cb = MIRCallback(probe_dataloader=loader(make_batches(n_batches=3, seed=50)), every_n_steps=1, log_figures=False,
                     early_stopping=MIRPlateau(patience=2, min_delta=1e-6))
    trainer = pl.Trainer(strategy=_spawn_strategy(find_unused_parameters=True), accelerator="cpu", devices=2,
                         logger=False, callbacks=[cb, RecordStop(folder), EndProcessGroup()], max_steps=10,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LazyTinyLlava(), loader(make_batches(n_batches=10)))


def test_ddp_spawn_early_stopping_argument_stops_every_rank_at_one_step(tmp_path):
    # the decision goes through trainer.strategy.reduce_boolean_decision: a rank that went on
    # alone would hang in DDP's next all-reduce (60 s process-group timeout: a failure)
    _ddp_plateau_fit(str(tmp_path))
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["3", "3"]
