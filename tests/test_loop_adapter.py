"""examples/loop_adapter.py, the 60-line adapter of README "Adding MIR to another trainer":
when it probes, what it logs (equal to the float64 reference), when it says stop, its resume."""

from __future__ import annotations

import math

import pytest

import example_helpers  # noqa: F401  (puts examples/ on sys.path)
from lightning_helpers import make_batches, reference_on
from mir_lightning import MIRPlateau
from vlm_factory import make_tiny_vlm

from loop_adapter import MIRLoopAdapter  # noqa: E402


class Writer:
    """A SummaryWriter stand-in that keeps what it is given."""

    def __init__(self):
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.figures: list[tuple[str, int]] = []

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def add_figure(self, tag, figure, global_step, close):
        self.figures.append((tag, global_step))


def test_probes_every_n_steps_logs_the_reference_and_stops_on_the_plateau():
    model, _ = make_tiny_vlm("llava", seed=0)  # never trained here: every probe sees the same weights
    probe = make_batches(n_batches=2, seed=50)
    writer = Writer()
    adapter = MIRLoopAdapter(probe, writer, every_n_steps=2, early_stopping=MIRPlateau(patience=2, min_delta=1e-6))
    stops = [adapter.on_step_end(model, step) for step in range(1, 8)]
    assert stops == [False, False, False, False, False, True, False]  # the third probe (step 6) completes it
    ref_mir, ref_fd, _ = reference_on(model, probe)
    # measured: 2e-15 between the package and the float64 reference here; 1e-9 keeps a margin
    assert [s for s, _ in writer.scalars["mir"]] == [2, 4, 6]
    assert all(abs(v - ref_mir) < 1e-9 for _, v in writer.scalars["mir"])
    for k, fd in enumerate(ref_fd):
        assert math.isclose(writer.scalars[f"mir_fd/layer_{k:02d}"][-1][1], fd, rel_tol=1e-9)
    assert ("mir/per_layer", 2) in writer.figures and ("mir/history", 6) in writer.figures
    assert [h.step for h in adapter.history] == [2, 4, 6]

    resumed = MIRLoopAdapter(probe, Writer(), every_n_steps=2, early_stopping=MIRPlateau(patience=2, min_delta=1e-6))
    resumed.load_state_dict(adapter.state_dict())
    assert resumed.history == adapter.history and resumed.publisher.early_stopping.stopped


def test_a_failed_probe_is_a_warning_and_nan():
    model, _ = make_tiny_vlm("llava", seed=0)

    def broken(batch):
        raise RuntimeError("boom")

    writer = Writer()
    adapter = MIRLoopAdapter(make_batches(n_batches=1), writer, every_n_steps=1, masks=broken)
    with pytest.warns(UserWarning, match="boom"):
        assert adapter.on_step_end(model, 1) is False
    assert math.isnan(writer.scalars["mir"][0][1]) and not writer.figures
    assert list(writer.scalars) == ["mir"]  # MIR alone


def test_readme_shows_the_adapter_as_it_is():
    """README "Adding MIR to another trainer" quotes the adapter: every line it shows (less its
    comments) is a line of examples/loop_adapter.py, which stays about 60 lines of code."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme[readme.index("### Adding MIR to another trainer"):], re.S).group(1)
    source = (root / "examples" / "loop_adapter.py").read_text()
    lines = {line.strip() for line in source.splitlines()}
    for shown in block.splitlines():
        code = re.sub(r"\s+#.*$", "", shown).strip()
        if code:
            assert code in lines, code
    after_module_docstring = source.split('"""\n', 1)[1]
    assert len([line for line in after_module_docstring.splitlines() if line.strip()]) <= 70
