"""MIRTrainerCallback inside LLaMA-Factory's real SFT trainer (``run_exp(..., callbacks=[...])``).

LLaMA-Factory pins its own transformers/torch ranges, so it lives in its own environment:
the test runs tests/llamafactory_script.py with that environment's Python (``LLAMAFACTORY_PYTHON``,
default ``/work/venvs/llamafactory/bin/python``; skipped when it is absent or cannot import
``llamafactory``), with this checkout first on ``PYTHONPATH``. A tiny LLaVA (model, processor,
chat template) is saved to disk here and trained there for 4 steps at learning rate 0 with
LLaMA-Factory's ``llava`` template on a 8-sample ShareGPT image dataset; MIR is probed every
2 steps on ``paper_probe``. Its ``trainer_state.json`` (``log_history``) must hold ``mir`` at
steps 2 and 4, equal to the float64 reference (tests/reference.py) of the saved checkpoint on
the same probe, computed here in this environment (another transformers version).

torchaudio: LLaMA-Factory 0.9.5 imports it at module level (data/mm_plugin.py, for audio
inputs), and PyPI has no torchaudio build for torch 2.13 (the newest, 2.11.1, fails to load
its ``_torchaudio.so`` against torch 2.13). When it cannot be imported there, an empty
``torchaudio`` module goes first on that process's path; no audio is used.

Tolerance: both sides run the same float32 forwards of the same weights (transformers 5.6 there,
this environment's here); measured difference of MIR 3e-16. 1e-6 still fails for one sample or
token more or less. Runtime about 60 s (the Trainer's start dominates).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

from lightning_helpers import reference_on  # noqa: E402
from vlm_factory import save_tiny_vlm  # noqa: E402

import llamafactory_script as script  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYTHON = os.environ.get("LLAMAFACTORY_PYTHON", "/work/venvs/llamafactory/bin/python")
TOL = 1e-6


def _imports(python: str, module: str, env: dict[str, str]) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], env=env, capture_output=True, timeout=300).returncode == 0


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> dict[str, str]:
    if not Path(PYTHON).is_file():
        pytest.skip(f"no LLaMA-Factory environment at {PYTHON} (set LLAMAFACTORY_PYTHON)")
    path = [str(REPO)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_DISABLED="true")
    if not _imports(PYTHON, "torchaudio", env):
        stub = tmp_path_factory.mktemp("stub") / "torchaudio"
        stub.mkdir()
        (stub / "__init__.py").write_text('"""Empty stand-in: no torchaudio build for this torch; audio unused."""\n')
        path.insert(0, str(stub.parent))
    env["PYTHONPATH"] = os.pathsep.join(path)
    if not _imports(PYTHON, "llamafactory.train.tuner", env):
        pytest.skip(f"{PYTHON} cannot import llamafactory")
    return env


def test_mir_in_llamafactory_log_history(environment, tmp_path):
    model_dir = save_tiny_vlm("llava", tmp_path / "model")
    work = tmp_path / "work"
    proc = subprocess.run([PYTHON, str(REPO / "tests" / "llamafactory_script.py"), str(model_dir), str(work)],
                          env=environment, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((work / "out" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "mir" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert [entry["step"] for entry in json.loads((work / "callback.json").read_text())] == [2, 4]

    from mir_lightning import paper_probe

    processor = transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True)
    batches = [dict(b) for b in paper_probe(processor, script.PROBE_SAMPLES, script.PROBE_BATCH)]
    mir, fds, _ = reference_on(model, batches, sigma=None)
    for entry in logged:
        assert entry["mir"] == pytest.approx(mir, rel=TOL)
        for k, fd in enumerate(fds):
            assert entry[f"mir_fd/layer_{k:02d}"] == pytest.approx(fd, rel=TOL)
    # LLaMA-Factory's own trainer_log.jsonl keeps a fixed set of keys (loss, lr, ...): MIR is
    # not there, only in log_history (trainer_state.json) and the Trainer's report_to loggers
    lines = [json.loads(line) for line in (work / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert lines and all("mir" not in line for line in lines)
