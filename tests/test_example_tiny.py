"""examples/pretrain_lvlm.py --tiny (random tiny parts, no weight packages), end to end: the logged
MIR equals the float64 reference on the probe at the final weights; one step convention
(trainer.global_step) in the history, in TensorBoard and across a resume; progress lines when
the output is not a terminal; a summary JSON."""

from __future__ import annotations

import json

import pytest
import torch

from example_helpers import lvlm_reference
from lightning_helpers import read_scalars

import pretrain_lvlm  # noqa: E402  (examples/ is on sys.path through example_helpers)

# Measured: |MIRCallback's MIR - reference| = 7e-14 at the tiny example's final weights (both
# float64 over the same fp32 hidden states; the outlier rule's median is exact with median_buffer
# 1024 > 360 tokens). 1e-9 is 10^4 x that, far below any change of the spec's terms.
TOL = 1e-9


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    try:
        result = pretrain_lvlm.main(["--tiny", "--log-dir", str(log_dir), "--max-steps", "20", "--val-every", "10",
                                     "--summary-json", str(log_dir / "summary.json")])
    finally:
        torch.set_num_threads(threads)  # the script pins 1 thread
    return result, log_dir


def test_logged_mir_equals_reference_at_final_weights(tiny_run):
    result, _ = tiny_run
    assert [r["step"] for r in result.rows] == [0, 10, 20]
    mir, fd, _ = lvlm_reference(result.module.model, result.probe_loader)
    assert [h["step"] for h in result.mir_history] == [0, 10, 20]  # trainer.global_step, as the rows
    assert abs(result.rows[-1]["mir"] - mir) < TOL
    assert result.rows[-1]["fd"] == pytest.approx(fd, rel=1e-9, abs=1e-12)  # merged from the history by step
    assert all(len(r["fd"]) == 4 for r in result.rows)
    assert result.rows[-1]["caption_loss"] < result.rows[0]["caption_loss"]  # it trains
    assert abs(result.rows[0]["mir"] - mir) > 1e-3  # so the final weights differ from the initial ones


def test_tensorboard_steps_and_summary(tiny_run):
    result, log_dir = tiny_run
    scalars = read_scalars(str(log_dir))
    assert "epoch" not in scalars  # Lightning adds it only when no "step" is logged
    assert [s for s, _ in scalars["mir"]] == [0, 10, 20]
    assert [v for _, v in scalars["mir"]] == pytest.approx([r["mir"] for r in result.rows], rel=1e-6)  # float32
    assert [s for s, _ in scalars["val/digit_acc"]] == [0, 10, 20]
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["command"].startswith("python examples/pretrain_lvlm.py --tiny")
    assert {"torch", "lightning", "transformers", "mir_lightning"} <= set(summary["versions"])
    assert [r["step"] for r in summary["rows"]] == [0, 10, 20]
    assert summary["rows"][-1]["mir"] == result.rows[-1]["mir"]


def test_progress_lines_without_terminal_and_resume_keeps_steps(tiny_run, capsys):
    _, log_dir = tiny_run
    ckpt = log_dir / "pretrain_lvlm_tiny" / "version_0" / "checkpoints" / "last.ckpt"
    threads = torch.get_num_threads()
    try:
        resumed = pretrain_lvlm.main(["--tiny", "--log-dir", str(log_dir), "--max-steps", "30", "--val-every", "10",
                                      "--resume", str(ckpt)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "[val] step 30: MIR" in out  # pytest's captured stdout is not a terminal
    assert [r["step"] for r in resumed.rows] == [0, 10, 20, 30]
    scalars = read_scalars(str(log_dir / "pretrain_lvlm_tiny" / "version_0"))
    assert sorted(s for s, _ in scalars["mir"]) == [0, 10, 20, 30]
    assert "epoch" not in scalars
