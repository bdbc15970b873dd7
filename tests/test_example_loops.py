"""examples/custom_loop.py and examples/pretrain_hf_trainer.py --tiny: MIR at the probe steps,
equal to the float64 reference on the probe at the final weights, and in TensorBoard."""

from __future__ import annotations

import pytest
import torch

from example_helpers import lvlm_reference
from lightning_helpers import read_scalars

import custom_loop  # noqa: E402  (examples/ is on sys.path through example_helpers)
import pretrain_hf_trainer  # noqa: E402

# Measured: |MIR - reference| = 7e-14 on the tiny parts (both float64 over the same fp32 hidden
# states, exact outlier median: median_buffer 1024 > 360 tokens); 1e-9 is 10^4 x that.
TOL = 1e-9


def _run(main, argv):
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)  # the scripts pin 1 thread


def test_custom_loop_probe_equals_reference(tmp_path):
    result = _run(custom_loop.main, ["--tiny", "--max-steps", "4", "--probe-every", "2", "--log-dir", str(tmp_path)])
    assert [r["step"] for r in result.rows] == [0, 2, 4]
    mir, fd, _ = lvlm_reference(result.model, result.probe_loader)
    assert abs(result.rows[-1]["mir"] - mir) < TOL
    assert result.rows[-1]["fd"] == pytest.approx(fd, rel=1e-9, abs=1e-12)
    assert abs(result.rows[0]["mir"] - mir) > 1e-3  # trained: the final weights are not the initial ones
    scalars = read_scalars(str(tmp_path))
    assert [s for s, _ in scalars["mir"]] == [0, 2, 4]
    assert [v for _, v in scalars["mir"]] == pytest.approx([r["mir"] for r in result.rows], rel=1.2e-7)  # float32
    assert len([t for t in scalars if t.startswith("mir_fd/layer_")]) == 4


def test_hf_trainer_example_probe_equals_reference(tmp_path):
    pytest.importorskip("accelerate")
    result = _run(pretrain_hf_trainer.main, ["--tiny", "--max-steps", "4", "--probe-every", "2",
                                             "--output-dir", str(tmp_path)])
    assert [r["step"] for r in result.rows] == [2, 4]
    assert not any("eval_loss" in entry for entry in result.log_history)  # evaluation is off
    mir, fd, _ = lvlm_reference(result.model, result.probe_loader)
    assert abs(result.rows[-1]["mir"] - mir) < TOL
    assert [result.rows[-1][f"mir_fd/layer_{k:02d}"] for k in range(4)] == pytest.approx(fd, rel=1e-9)
    scalars = read_scalars(str(tmp_path))
    assert [s for s, _ in scalars["train/mir"]] == [2, 4]
