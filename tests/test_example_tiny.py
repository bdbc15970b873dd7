"""The README's example in --tiny mode (random parts, no weight packages): end to end."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from lightning_helpers import read_scalars

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pretrain_lvlm.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("pretrain_lvlm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_example_runs_and_logs_mir(tmp_path):
    example = _load_example()
    rows = example.main(["--tiny", "--log-dir", str(tmp_path), "--max-steps", "20", "--val-every", "10"])
    assert len(rows) == 3  # step 0, 10, 20
    assert all(math.isfinite(r["mir"]) for r in rows)
    assert rows[-1]["val/caption_loss"] < rows[0]["val/caption_loss"]  # it trains
    scalars = read_scalars(str(tmp_path))
    assert len(scalars["mir"]) == 3
    assert any(tag.startswith("mir/fd/layer_") for tag in scalars)
