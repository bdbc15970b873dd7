"""A monitor never changes the run it watches (issue 18, items 1-3).

* No footprint between probes: after ``MIRProbe.run()`` and in every adapter (MIRCallback at
  train steps and at validation, MIRTrainerCallback, ``evaluate_checkpoint``) no tensor of the
  metric state's size is alive, counted through ``gc`` (a control counts the state during a
  probe, so the counter does see it).
* The state budget: ``max_state_bytes`` measures the layers in passes; the result equals the
  one-pass result and the float64 reference; passes and forwards as stated; the state alive
  at any moment stays within the budget; 2 gloo ranks under FSDP2 and ZeRO-3 with 3 passes.
* RNG: ``run()`` leaves torch's, Python's and NumPy's generators as found, whatever the
  probe loader; training with MIR is bitwise identical to training without it (Lightning
  at train steps and at validation, the HF Trainer, the own-loop example). A control run with
  the RNG restoration switched off differs, so these comparisons can fail.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import mir_lightning.probe as probe_module
from lightning_helpers import TinyLlava, make_batches, reference_on
from vlm_factory import make_tiny_vlm
from mir_lightning import MIRCallback, MIRProbe, ModalityIntegrationRate
from mir_lightning.probe import StateBudgetError, layer_groups

HERE = Path(__file__).resolve().parent
D, LAYERS = 64, 3  # the tiny LLaVA: 2 decoder layers + the final norm, width 64
LAYER_STATE = ModalityIntegrationRate.state_nbytes_for(1, D)
# Tensors at least this large: the tiny models' largest parameter is 32 KiB, the metric's state
# holds tensors of 128 KiB (median rows) to 2 MiB (norm rows) per layer.
LARGE = 64 * 2**10
# Measured: the budgeted per-layer FD equals the one-pass FD bit for bit in one process (each
# layer is folded and solved alone); 1e-12 is the bound. The float64 reference agrees
# to ~1e-14 (tests/test_probe.py), bounded there by 1e-9.
PASS_RTOL = 1e-12
REF_RTOL = 1e-9


# ----------------------------------------------------------------------------- live memory
def _live_objects() -> list:
    """Every object gc tracks (deprecated torch.distributed aliases warn when type-checked)."""
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return [obj for obj in gc.get_objects() if isinstance(obj, (torch.Tensor, ModalityIntegrationRate))]


def large_storages() -> dict[tuple[str, int], int]:
    """(device, data pointer) -> bytes of every live tensor storage of at least LARGE bytes."""
    found = {}
    for obj in _live_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.is_meta:
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - objects gc holds half-built, fake tensors...
            continue
        if storage.nbytes() >= LARGE:
            found[(str(obj.device), storage.data_ptr())] = storage.nbytes()
    return found


def new_large_bytes(before: dict[tuple[str, int], int]) -> int:
    return sum(n for key, n in large_storages().items() if key not in before)


def live_metric_state_bytes() -> int:
    """Bytes of the state tensors of every live ModalityIntegrationRate."""
    total = 0
    for obj in _live_objects():
        if isinstance(obj, ModalityIntegrationRate):
            total += sum(getattr(obj, name).nbytes for name in obj._defaults)
    return total


class StateTracker:
    """A probe step that records the metric state alive after each forward."""

    def __init__(self) -> None:
        self.peaks: list[int] = []

    def __call__(self, model, batch):
        out = model(**{k: v for k, v in batch.items() if k not in ("vision_mask", "text_mask")})
        self.peaks.append(live_metric_state_bytes())
        return out


def assert_matches(result, expected, rtol=REF_RTOL):
    mir, fd, _ = expected
    assert result.error is None, result.error
    np.testing.assert_allclose(result.per_layer_fd.numpy(), fd, rtol=rtol, atol=0)
    assert math.isclose(result.mir, mir, rel_tol=rtol)


# ----------------------------------------------------------------------------- item 1
def test_probe_run_leaves_no_state_and_the_counter_sees_it_during_the_run():
    model, _ = make_tiny_vlm("llava")
    batches = make_batches(n_batches=3)
    with torch.no_grad():
        model(**batches[0])  # lazily built buffers of the model itself
    before = large_storages()
    tracker = StateTracker()
    result = MIRProbe(DataLoader(batches, batch_size=None), step=tracker).run(model)
    assert result.error is None
    # control: during the run the state of all 3 layers is alive and counted (all of the formula
    # but the histograms, allocated only beyond median_buffer / norm_buffer tokens: 87% here)
    assert max(tracker.peaks) >= ModalityIntegrationRate.state_nbytes_for(LAYERS, D) * 0.8
    assert new_large_bytes(before) == 0
    assert live_metric_state_bytes() == 0


def test_the_released_metric_still_answers_with_the_last_results():
    model, _ = make_tiny_vlm("llava")
    probe = MIRProbe(make_batches(n_batches=2))
    result = probe.run(model)
    assert probe.metric is not None and probe.metric.state_nbytes() > 0  # the formula, not what is held
    assert sum(getattr(probe.metric, name).nbytes for name in probe.metric._defaults) == 0
    assert torch.equal(probe.metric.per_layer_fd(), result.per_layer_fd)


def _trainer(tmp_path, callbacks, **kwargs):
    import lightning.pytorch as pl

    return pl.Trainer(default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                      num_sanity_val_steps=0, callbacks=callbacks, **kwargs)


@pytest.mark.parametrize("where", ["train_steps", "validation_hooks", "validation_probe"])
def test_lightning_callback_leaves_no_state(tmp_path, where):
    batches = make_batches(n_batches=3)
    module = TinyLlava(lr=0.01)
    if where == "train_steps":
        callback = MIRCallback(probe_dataloader=DataLoader(batches, batch_size=None), every_n_train_steps=2,
                               log_figures=False)
    elif where == "validation_hooks":
        callback = MIRCallback(log_figures=False)
    else:
        callback = MIRCallback(probe_dataloader=DataLoader(batches, batch_size=None), log_figures=False)
    before = large_storages()
    trainer = _trainer(tmp_path, [callback], max_steps=4, val_check_interval=2)
    trainer.fit(module, DataLoader(batches, batch_size=None), DataLoader(batches, batch_size=None))
    assert callback.history and all(math.isfinite(h["mir"]) for h in callback.history)
    assert new_large_bytes(before) == 0
    assert live_metric_state_bytes() == 0


def test_hf_trainer_callback_leaves_no_state(tmp_path):
    pytest.importorskip("accelerate")
    from hf_trainer_script import make_trainer

    trainer, callback = make_trainer(str(tmp_path), max_steps=4, every_n_steps=2, report_to="none")
    before = large_storages()  # (the training examples' pixel values are 384 KiB)
    trainer.train()
    assert callback.history and all(math.isfinite(h["mir"]) for h in callback.history)
    assert new_large_bytes(before) == 0
    assert live_metric_state_bytes() == 0


def test_evaluate_leaves_no_state_and_takes_a_budget(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    from mir_lightning.evaluate import evaluate_checkpoint
    from mir_lightning.probe_data import InputError
    from vlm_factory import save_tiny_vlm

    model_dir = save_tiny_vlm("llava", tmp_path / "llava")
    runs = []
    original = MIRProbe.run

    def recording_run(self, model):
        result = original(self, model)
        runs.append(result)
        return result

    monkeypatch.setattr(MIRProbe, "run", recording_run)
    common = dict(num_samples=4, batch_size=2, device="cpu", progress=False)
    before = large_storages()
    one = evaluate_checkpoint(model_dir, **common)
    assert new_large_bytes(before) == 0 and live_metric_state_bytes() == 0
    budgeted = evaluate_checkpoint(model_dir, max_state_bytes=LAYER_STATE, **common)
    assert [r.passes for r in runs] == [1, LAYERS]
    np.testing.assert_allclose(budgeted.per_layer["fd"], one.per_layer["fd"], rtol=PASS_RTOL, atol=0)
    with pytest.raises(InputError, match="smaller than the metric state of one layer"):
        evaluate_checkpoint(model_dir, max_state_bytes=LAYER_STATE // 2, **common)
    # the command line: --max-state-gib reaches the probe (2.5 layers' state: 2 passes, of 2 + 1 layers)
    from mir_lightning.cli import main

    gib = 2.5 * LAYER_STATE / 2**30
    assert main(["evaluate", str(model_dir), "--num-samples", "4", "--batch-size", "2", "--device", "cpu",
                 "--no-progress", "--max-state-gib", f"{gib:.6f}"]) == 0
    assert runs[-1].passes == 2 and runs[-1].error is None


# ----------------------------------------------------------------------------- item 2
def test_layer_groups():
    assert layer_groups(5, 10, None) == [[0, 1, 2, 3, 4]]
    assert layer_groups(5, 10, 50) == [[0, 1, 2, 3, 4]]
    assert layer_groups(5, 10, 49) == [[0, 1, 2], [3, 4]]  # 4 fit: 2 passes, balanced
    assert layer_groups(5, 10, 10) == [[k] for k in range(5)]
    groups = layer_groups(80, 7, 7 * 32)  # 80 layers, 32 per pass: 3 passes of 26-27
    assert len(groups) == 3 and [k for g in groups for k in g] == list(range(80))
    assert max(map(len, groups)) <= 32 and max(map(len, groups)) - min(map(len, groups)) <= 1
    with pytest.raises(StateBudgetError, match="smaller than the metric state of one layer"):
        layer_groups(5, 10, 9)


@pytest.mark.parametrize("layers_per_pass, passes", [(1, 3), (2, 2), (3, 1)])
def test_budgeted_probe_equals_one_pass_and_reference(layers_per_pass, passes):
    model, _ = make_tiny_vlm("llava")
    batches = make_batches(n_batches=3)
    expected = reference_on(model, batches)
    one = MIRProbe(batches).run(model)
    budget = ModalityIntegrationRate.state_nbytes_for(layers_per_pass, D) + 1
    tracker = StateTracker()
    result = MIRProbe(batches, max_state_bytes=budget, step=tracker).run(model)
    assert result.passes == passes and one.passes == 1
    assert result.forwards == passes * len(batches)
    assert result.layers == one.layers == list(range(LAYERS))
    np.testing.assert_allclose(result.per_layer_fd.numpy(), one.per_layer_fd.numpy(), rtol=PASS_RTOL, atol=0)
    for key in ("n_vision", "n_text", "norm_ratio", "mean_term", "cross_term"):
        np.testing.assert_allclose(result.stats[key].numpy(), one.stats[key].numpy(), rtol=PASS_RTOL, atol=0)
    assert math.isclose(result.mir, one.mir, rel_tol=PASS_RTOL)
    assert_matches(result, expected)
    # no more than the budget of state at any forward (the whole state of 3 layers when unbudgeted)
    assert 0 < max(tracker.peaks) <= budget
    assert len(tracker.peaks) == result.forwards


def test_budget_errors_and_failures():
    model, _ = make_tiny_vlm("llava")
    batches = make_batches(n_batches=2)
    with pytest.raises(StateBudgetError, match="smaller than the metric state of one layer"):
        MIRProbe(batches, max_state_bytes=LAYER_STATE - 1).run(model)
    with pytest.raises(ValueError, match="positive"):
        MIRProbe(batches, max_state_bytes=0)

    # the hidden size cannot be inferred from plain layers: an explicit budget asks for it
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    plain = Plain()
    masks = lambda b: (torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool))  # noqa: E731
    with pytest.raises(StateBudgetError, match="hidden_size="):
        MIRProbe([torch.zeros(1, 4, 8)], layers=list(plain.layers), masks=masks, max_state_bytes=10**9).run(plain)

    # a failing pass fails the whole result, over all layers, and the later passes do not run
    def failing_masks(batch):
        raise RuntimeError("no masks here")

    result = MIRProbe(batches, masks=failing_masks, max_state_bytes=LAYER_STATE).run(model)
    assert result.error and "no masks here" in result.error and math.isnan(result.mir)
    assert result.passes == 1 and result.forwards == len(batches) and result.layers == list(range(LAYERS))
    assert live_metric_state_bytes() == 0


def test_lightning_budget_in_passes_and_refused_at_validation(tmp_path):
    batches = make_batches(n_batches=3)
    expected = reference_on(make_tiny_vlm("llava")[0], batches)
    module = TinyLlava()
    probe_cb = MIRCallback(probe_dataloader=DataLoader(batches, batch_size=None), max_state_bytes=LAYER_STATE,
                           log_figures=False)
    trainer = _trainer(tmp_path, [probe_cb])
    trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)
    assert abs(probe_cb.history[-1]["mir"] - expected[0]) < 1e-9
    # validation batches run once: a budget below the state is a NaN measurement with a warning, not a crash
    val_cb = MIRCallback(max_state_bytes=LAYER_STATE, log_figures=False)
    trainer = _trainer(tmp_path, [val_cb])
    with pytest.warns(UserWarning, match="cannot be run once per group of layers"):
        trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)
    assert math.isnan(val_cb.history[-1]["mir"])
    assert live_metric_state_bytes() == 0


def _sharded_env() -> dict[str, str]:
    env = {}
    main_cache = HERE.parent.parent.parent / "main" / "tests" / ".cache" / "torch_extensions"
    if "TORCH_EXTENSIONS_DIR" not in os.environ and main_cache.is_dir():  # a checkout that built it already
        env["TORCH_EXTENSIONS_DIR"] = str(main_cache)
    return env


def test_budgeted_probe_on_two_ranks_fsdp2_and_zero3(tmp_path):
    """3 passes (one layer each) on 2 gloo ranks: every rank runs 3 x ceil(5 / 2) forwards, the
    same groups, and gets the single-process float64 reference."""
    from test_sharded import ENGINES, N_BATCHES, _assert_matches, _records, _run

    sys.path.insert(0, str(HERE))
    from sharded_common import reference_result

    engines = [e for e in ("fsdp2", "deepspeed") if e in ENGINES]
    proc, _ = _run("sharded_script.py", "--world", "2", "--engines", ",".join(engines), "--batches", str(N_BATCHES),
                   "--budget-layers", "1", "--out", str(tmp_path), env=_sharded_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    reference = reference_result("fsdp2", N_BATCHES)
    for engine in engines:
        records = _records(tmp_path, engine, 2)
        for record in records:
            _assert_matches(record, reference)
            assert record["passes"] == LAYERS
            assert record["forwards"] == LAYERS * -(-N_BATCHES // 2)
        assert len({r["mir"] for r in records}) == 1


# ----------------------------------------------------------------------------- item 3
def rng_states():
    return torch.random.get_rng_state(), random.getstate(), np.random.get_state()


def assert_same_rng(before, after):
    assert torch.equal(before[0], after[0])
    assert before[1] == after[1]
    assert before[2][0] == after[2][0] and np.array_equal(before[2][1], after[2][1]) and before[2][2:] == after[2][2:]


@pytest.mark.parametrize("shuffle, workers", [(False, 0), (True, 0), (True, 2)])
def test_probe_leaves_every_generator_as_found(shuffle, workers):
    model, _ = make_tiny_vlm("llava")
    batches = make_batches(n_batches=3)
    loader = DataLoader(batches, batch_size=None, shuffle=shuffle, num_workers=workers)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    before = rng_states()
    result = MIRProbe(loader).run(model)
    assert result.error is None
    assert_same_rng(before, rng_states())
    # control: iterating the loader itself draws from torch's generator
    list(loader)
    assert not torch.equal(before[0], torch.random.get_rng_state())


@contextlib.contextmanager
def rng_not_restored():
    """The probe without its RNG restoration (the control that the comparisons can fail)."""
    original = probe_module._rng_preserved
    probe_module._rng_preserved = contextlib.nullcontext
    try:
        yield
    finally:
        probe_module._rng_preserved = original


class DropoutLlava(TinyLlava):
    """TinyLlava with attention dropout in training: its masks come from torch's generator."""

    def __init__(self, lr: float):
        super().__init__(lr=lr)
        for module in self.model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.2


def _lightning_training(tmp_path, callback_kind: str | None):
    """Weights and losses after 2 epochs of shuffled data with dropout, seeded alike."""
    import lightning.pytorch as pl

    batches = make_batches(n_batches=4, batch_size=2)
    probe = DataLoader(make_batches(n_batches=2, seed=50), batch_size=None, shuffle=True)
    callbacks = {
        None: [],
        "train_steps": [MIRCallback(probe_dataloader=probe, every_n_train_steps=2, log_figures=False)],
        "validation_hooks": [MIRCallback(log_figures=False)],
        "validation_probe": [MIRCallback(probe_dataloader=probe, log_figures=False)],
    }[callback_kind]
    pl.seed_everything(0, verbose=False)
    module = DropoutLlava(lr=0.05)
    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = _trainer(tmp_path, [Losses(), *callbacks], max_epochs=2, val_check_interval=2, limit_val_batches=2)
    # validation on shuffled batches too (its sampler draws from the generator, with or without MIR)
    trainer.fit(module, DataLoader(batches, batch_size=None, shuffle=True),
                DataLoader(batches, batch_size=None, shuffle=True))
    if callbacks:
        assert len(callbacks[0].history) >= 2 and all(math.isfinite(h["mir"]) for h in callbacks[0].history)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, losses


def assert_bitwise(a, b):
    weights_a, losses_a = a
    weights_b, losses_b = b
    assert losses_a == losses_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def differs(a, b) -> bool:
    return a[1] != b[1] or any(not torch.equal(a[0][k], b[0][k]) for k in a[0])


@pytest.fixture(scope="module")
def lightning_without_mir(tmp_path_factory):
    return _lightning_training(tmp_path_factory.mktemp("plain"), None)


@pytest.mark.parametrize("kind", ["train_steps", "validation_hooks", "validation_probe"])
def test_lightning_training_is_bitwise_identical_with_mir(tmp_path, lightning_without_mir, kind):
    assert_bitwise(_lightning_training(tmp_path, kind), lightning_without_mir)


def test_lightning_control_without_rng_restoration_differs(tmp_path, lightning_without_mir):
    with rng_not_restored():
        assert differs(_lightning_training(tmp_path, "train_steps"), lightning_without_mir)


def _hf_training(tmp_path, with_mir: bool):
    """The HF Trainer, evaluation off, 2 epochs of shuffled examples, attention dropout."""
    from transformers import Trainer, TrainingArguments

    from hf_trainer_script import SEED, probe_batches, train_examples
    from mir_lightning.integrations.hf_trainer import MIRTrainerCallback

    model, _ = make_tiny_vlm("llava", seed=SEED)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.2
    model.train()
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_train_epochs=2,
        learning_rate=0.05, lr_scheduler_type="constant", logging_steps=1, report_to="none", eval_strategy="no",
        save_strategy="no", disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=SEED,
    )
    callbacks = []
    if with_mir:
        probe = DataLoader(probe_batches(), batch_size=None, shuffle=True)
        callbacks = [MIRTrainerCallback(probe, every_n_steps=2, log_layer_stats=())]
    trainer = Trainer(model=model, args=args, train_dataset=train_examples(16), callbacks=callbacks)
    trainer.train()
    if with_mir:
        assert len(callbacks[0].history) == 4 and all(math.isfinite(h["mir"]) for h in callbacks[0].history)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def test_hf_trainer_training_is_bitwise_identical_with_mir(tmp_path):
    pytest.importorskip("accelerate")
    without = _hf_training(tmp_path / "plain", with_mir=False)
    assert_bitwise(_hf_training(tmp_path / "mir", with_mir=True), without)
    with rng_not_restored():
        assert differs(_hf_training(tmp_path / "control", with_mir=True), without)


def test_own_loop_example_is_bitwise_identical_with_mir(tmp_path, monkeypatch):
    """examples/custom_loop.py --tiny with its training loader shuffled by torch's global generator
    (as most loops are), against the same loop whose probe never runs a forward."""
    import example_helpers  # noqa: F401  (puts examples/ on sys.path)
    import custom_loop
    import loop_adapter
    import lvlm

    import mir_lightning

    original_loaders = lvlm.Parts.loaders

    def global_generator_loaders(self, *args, **kwargs):
        train, probe = original_loaders(self, *args, **kwargs)
        train = DataLoader(train.dataset, batch_size=train.batch_size, shuffle=True, collate_fn=train.collate_fn,
                           drop_last=True)
        return train, probe

    monkeypatch.setattr(lvlm.Parts, "loaders", global_generator_loaders)
    argv = ["--tiny", "--max-steps", "6", "--probe-every", "2", "--log-dir", str(tmp_path / "a")]
    threads = torch.get_num_threads()
    recorded = []

    class RecordingProbe(MIRProbe):
        def run(self, model):
            recorded.append(super().run(model))
            return recorded[-1]

    def train(probe_class, log_dir):
        monkeypatch.setattr(mir_lightning, "MIRProbe", probe_class)
        monkeypatch.setattr(loop_adapter, "MIRProbe", probe_class)  # the example's adapter builds the probe
        try:
            run = custom_loop.main([*argv[:-1], str(log_dir)])
        finally:
            torch.set_num_threads(threads)
        rows = [{k: v for k, v in row.items() if k in ("step", "caption_loss", "digit_acc")} for row in run.rows]
        return {k: v.detach().clone() for k, v in run.model.state_dict().items()}, rows

    with_mir = train(RecordingProbe, tmp_path / "a")
    assert len(recorded) == 4 and all(r.error is None for r in recorded)

    class NoForwardProbe(MIRProbe):
        def run(self, model):
            return recorded[0]

    assert_bitwise(with_mir, train(NoForwardProbe, tmp_path / "b"))
    with rng_not_restored():
        assert differs(train(RecordingProbe, tmp_path / "c"), with_mir)
