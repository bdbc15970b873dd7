"""MoCa (mir_lightning.moca) with every MIR front end: MIRProbe, MIRTrainerCallback, MIRCallback
and ``mir-lightning evaluate --moca PATH``.

With MoCa attached the MIR must be the one of the *calibrated* hidden states: the float64
reference (tests/reference.py) is computed on what the next decoder layer and the final
norm receive as their input (transformers 5 records ``output_hidden_states`` before forward
hooks that modify a layer's output, so those are not used here), the last layer after the
final norm (the ``hidden_states[1:]`` convention). MoCa's scale and shift are far from the
identity, so the calibrated MIR differs clearly from the uncalibrated one (checked too).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from mir_lightning import MIRCallback  # noqa: E402
from mir_lightning.cli import main  # noqa: E402
from mir_lightning.integrations.transformers import find_final_norm  # noqa: E402
from mir_lightning.moca import MoCa  # noqa: E402
from mir_lightning.probe import MIRProbe  # noqa: E402

from hf_trainer_script import SEED, make_trainer, probe_batches  # noqa: E402
from lightning_helpers import TinyLlava, loader, make_batches, official_masks  # noqa: E402
from reference import reference_mir  # noqa: E402
from test_cli import command_batches, data_dir  # noqa: E402,F401  (data_dir: a module fixture)
from test_moca import _layer_inputs  # noqa: E402
from vlm_factory import make_tiny_processor, make_tiny_vlm  # noqa: E402

# Measured (this file's cases, 3 layers, 144-320 vision / 153-428 text tokens): MIR from the
# probe, the Trainer callback, the Lightning callback and the command vs the float64 reference
# on the calibrated tokens differ by at most 4.4e-16 absolute, per-layer FD by at most 1e-15
# relative; the command and MIRProbe agree exactly. 1e-9 keeps a margin of 1e6 and still fails
# on a spec violation (e.g. a midpoint median changes FD by 1e-6 .. 1e-4) and, by far, on
# measuring the uncalibrated states (see UNCALIBRATED_GAP).
TOL = 1e-9
# The uncalibrated MIR of the same model and data differs by more than this (measured: 2.97 to 3.04).
UNCALIBRATED_GAP = 0.5


def calibrate(moca: MoCa, seed: int = 1) -> None:
    """Set MoCa far from the identity: scale ~ U(0.5, 2), shift ~ N(0, 0.5), per layer and dimension."""
    with torch.no_grad():
        moca.scale.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(seed))
        moca.shift.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed + 1))


def reference_on_received(model: torch.nn.Module, batches: list[dict]) -> tuple[float, np.ndarray]:
    """(MIR, per-layer FD) in float64 from what each next layer / the final norm receives."""
    norm = find_final_norm(model)
    model.eval()
    vision: list[list[torch.Tensor]] = []
    text: list[list[torch.Tensor]] = []
    for batch in batches:
        received, _ = _layer_inputs(model, batch)
        with torch.no_grad():
            hidden = [*received[:-1], norm(received[-1])]
        v, t = official_masks(batch)
        vision.append([h[v].double() for h in hidden])
        text.append([h[t].double() for h in hidden])
    mir, fds, _ = reference_mir([torch.cat(x) for x in zip(*vision)], [torch.cat(x) for x in zip(*text)])
    return mir, fds


def assert_close(mir: float, fds, expected: tuple[float, np.ndarray]) -> None:
    ref_mir, ref_fds = expected
    assert abs(mir - ref_mir) < TOL, (mir, ref_mir)
    assert np.allclose(np.asarray(fds, dtype=np.float64), ref_fds, rtol=TOL, atol=0), (fds, ref_fds)


# ----------------------------------------------------------------------------- MIRProbe
def test_probe_measures_the_calibrated_states():
    model, _ = make_tiny_vlm("llava", seed=SEED)
    batches = probe_batches()
    uncalibrated = MIRProbe(batches).run(model)
    calibrate(MoCa.attach(model))
    result = MIRProbe(batches).run(model)
    assert result.error is None
    expected = reference_on_received(model, batches)
    assert_close(result.mir, result.per_layer_fd, expected)
    assert abs(result.mir - uncalibrated.mir) > UNCALIBRATED_GAP
    model.moca.remove()
    assert_close(uncalibrated.mir, uncalibrated.per_layer_fd, reference_on_received(model, batches))


# ----------------------------------------------------------------------------- HF Trainer
def test_trainer_callback_logs_the_calibrated_mir(tmp_path):
    """A Trainer run (learning rate 0, evaluation off, 2 steps) with MoCa attached before the
    optimizer exists: the MIR logged at step 2 is that of the calibrated states."""
    trainer, _ = make_trainer(str(tmp_path), max_steps=2, every_n_steps=2, report_to="none")
    calibrate(MoCa.attach(trainer.model))
    trainer.train()
    assert any(p is trainer.model.moca.scale for group in trainer.optimizer.param_groups for p in group["params"])
    logged = [entry for entry in trainer.state.log_history if "mir" in entry]
    assert [entry["step"] for entry in logged] == [2]

    reference_model, _ = make_tiny_vlm("llava", seed=SEED)
    calibrate(MoCa.attach(reference_model))
    expected = reference_on_received(reference_model, probe_batches())
    fds = [logged[0][f"mir_fd/layer_{k:02d}"] for k in range(len(expected[1]))]
    assert_close(logged[0]["mir"], fds, expected)
    reference_model.moca.remove()
    assert abs(logged[0]["mir"] - reference_on_received(reference_model, probe_batches())[0]) > UNCALIBRATED_GAP


# ----------------------------------------------------------------------------- Lightning
def test_lightning_callback_measures_the_calibrated_states():
    import lightning.pytorch as pl

    module = TinyLlava()
    calibrate(MoCa.attach(module))
    batches = make_batches()
    callback = MIRCallback()
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.validate(module, loader(batches), verbose=False)
    history = callback.history[-1]
    expected = reference_on_received(module.model, batches)
    assert abs(history["mir"] - expected[0]) < TOL, (history["mir"], expected[0])
    module.moca.remove()
    assert abs(history["mir"] - reference_on_received(module.model, batches)[0]) > UNCALIBRATED_GAP


# ----------------------------------------------------------------------------- command line
N_SAMPLES, BATCH_SIZE = 20, 6


@pytest.fixture(scope="module")
def moca_checkpoint(tmp_path_factory) -> dict[str, Path]:
    """A tiny LLaVA saved with MoCa attached (``save_pretrained`` writes ``moca.scale`` /
    ``moca.shift`` next to the model's weights), the same MoCa alone as a Lightning-style
    ``torch.save`` file, and a plain checkpoint without MoCa."""
    root = tmp_path_factory.mktemp("moca_ckpt")
    model, _ = make_tiny_vlm("llava")
    calibrate(MoCa.attach(model))
    model.save_pretrained(root / "with_moca")
    make_tiny_processor("llava").save_pretrained(root / "with_moca")
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items() if k.startswith("moca.")}},
               root / "moca.ckpt")
    model.moca.remove()
    model.save_pretrained(root / "plain")
    make_tiny_processor("llava").save_pretrained(root / "plain")
    return {"with_moca": root / "with_moca", "file": root / "moca.ckpt", "plain": root / "plain"}


def evaluate_command(model_dir: Path, data: Path, out: Path, *extra: str) -> dict:
    rc = main(["evaluate", str(model_dir), "--images", str(data / "images"), "--texts", str(data / "texts.txt"),
               "--num-samples", str(N_SAMPLES), "--batch-size", str(BATCH_SIZE), "--device", "cpu",
               "--out", str(out), "--no-progress", *extra])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("source", ["with_moca", "file"])
def test_evaluate_moca_equals_the_probe_with_moca(source, moca_checkpoint, data_dir, tmp_path, capsys):
    """``--moca`` from the checkpoint folder itself or from a separate Lightning-style file
    equals MIRProbe with MoCa attached on the command's batches, and the reference."""
    import transformers

    result = evaluate_command(moca_checkpoint["with_moca"], data_dir, tmp_path / "r.json",
                              "--moca", str(moca_checkpoint[source]))
    assert result["settings"]["moca"] == str(moca_checkpoint[source])
    assert "MoCa: attached" in capsys.readouterr().out

    model = transformers.AutoModelForImageTextToText.from_pretrained(moca_checkpoint["plain"], local_files_only=True)
    calibrate(MoCa.attach(model))
    batches = command_batches(moca_checkpoint["with_moca"], data_dir, N_SAMPLES, BATCH_SIZE)
    probed = MIRProbe(batches).run(model)
    # same model, same batches, same engine (measured: equal bit for bit)
    assert abs(result["mir"] - probed.mir) < TOL
    assert_close(result["mir"], result["per_layer"]["fd"], reference_on_received(model, batches))


def test_evaluate_warns_about_unused_moca_weights(moca_checkpoint, data_dir, tmp_path, capsys):
    """Without --moca the checkpoint is measured without MoCa (``from_pretrained`` drops it)
    and a warning line says so and names --moca."""
    import transformers

    result = evaluate_command(moca_checkpoint["with_moca"], data_dir, tmp_path / "r.json")
    err = capsys.readouterr().err
    assert "warning:" in err and f"--moca {moca_checkpoint['with_moca']}" in err
    assert result["settings"]["moca"] is None
    model = transformers.AutoModelForImageTextToText.from_pretrained(moca_checkpoint["plain"], local_files_only=True)
    batches = command_batches(moca_checkpoint["plain"], data_dir, N_SAMPLES, BATCH_SIZE)
    assert abs(result["mir"] - reference_on_received(model, batches)[0]) < TOL
    evaluate_command(moca_checkpoint["plain"], data_dir, tmp_path / "plain.json")
    assert "MoCa" not in capsys.readouterr().err


def test_evaluate_moca_errors(moca_checkpoint, tmp_path, capsys):
    model_dir = str(moca_checkpoint["with_moca"])

    def error(*args: str) -> str:
        assert main(["evaluate", model_dir, "--num-samples", "4", "--device", "cpu", "--no-progress", *args]) == 2
        return capsys.readouterr().err

    assert "holds no MoCa weights" in error("--moca", str(moca_checkpoint["plain"]))
    assert "no such checkpoint" in error("--moca", str(tmp_path / "missing.ckpt"))
    torch.save({"moca.scale": torch.ones(2, 64), "moca.shift": torch.zeros(2, 64)}, tmp_path / "other.pt")
    message = error("--moca", str(tmp_path / "other.pt"))
    assert "do not fit" in message and "[3, 64]" in message and "(2, 64)" in message
