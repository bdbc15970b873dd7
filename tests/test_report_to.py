"""``report_to`` beyond TensorBoard, read back from disk: MLflow and Weights & Biases (offline).

A real HF Trainer (tests/hf_trainer_script.py: tiny LLaVA, learning rate 0, MIRTrainerCallback
every 2 steps for 4 steps) reports through transformers' own ``MLflowCallback`` /
``WandbCallback``; the stores are then read with the libraries' readers (MLflow's client; the
W&B run file's records parsed with its protobuf schema) and must hold ``mir`` and every
per-layer value at steps 2 and 4, equal to the float64 reference (tests/reference.py).

Tolerance: the stores keep the float64 values the callback logs (MLflow as a double, W&B as
JSON): measured difference to the reference 1.8e-15, as in tests/test_hf_trainer.py; 1e-9
keeps that file's margin.

MLflow's file store (``file:``) keeps each metric as a file named by its key, so no key may be
a folder of another (``mir`` next to ``mir/fd/layer_00`` lost the per-layer values there with
``[Errno 20] Not a directory``): the per-layer tags are ``mir_fd/layer_00``..., and both stores
(file and SQLite) must hold every value.
"""

from __future__ import annotations

import glob
import json
import struct
import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_trainer_script import SEED, make_trainer, probe_batches  # noqa: E402
from lightning_helpers import reference_on  # noqa: E402
from vlm_factory import make_tiny_vlm  # noqa: E402

TOL = 1e-9
STEPS = [2, 4]


@pytest.fixture(scope="module")
def reference() -> dict[str, float]:
    """Every logged key (``mir``, ``mir_{stat}/layer_{k:02d}``) -> its float64 reference value."""
    model, _ = make_tiny_vlm("llava", seed=SEED)
    mir, fds, layers = reference_on(model, probe_batches())
    values = {"mir": mir}
    for k, (fd, layer) in enumerate(zip(fds, layers)):
        values[f"mir_fd/layer_{k:02d}"] = fd
        values[f"mir_norm_ratio/layer_{k:02d}"] = layer["norm_ratio"]
    return values


def _train(tmp_path, report_to: str) -> None:
    trainer, _ = make_trainer(str(tmp_path / "out"), max_steps=4, every_n_steps=2, report_to=report_to)
    trainer.train()


def _assert_history(history: dict[str, list[tuple[int, float]]], reference: dict[str, float], keys) -> None:
    for key in keys:
        assert [step for step, _ in history[key]] == STEPS, key
        assert all(abs(value - reference[key]) < TOL * max(1.0, abs(reference[key])) for _, value in history[key]), key


# ----------------------------------------------------------------------------- MLflow
def _mlflow_history(uri: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}


@pytest.fixture
def mlflow_run(monkeypatch, tmp_path):
    pytest.importorskip("mlflow")
    import mlflow

    def run(uri: str) -> dict[str, list[tuple[int, float]]]:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file: stores without it
        monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "false")
        try:
            _train(tmp_path, "mlflow")
        finally:
            mlflow.end_run()
        return _mlflow_history(uri)

    return run


def test_mlflow_sqlite_store_holds_mir_and_per_layer_values(mlflow_run, reference, tmp_path):
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("alembic")
    history = mlflow_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert set(reference) <= set(history)
    _assert_history(history, reference, reference)


def test_mlflow_file_store_holds_mir_and_per_layer_values(mlflow_run, reference, tmp_path):
    history = mlflow_run(f"file:{tmp_path / 'mlruns'}")
    assert set(reference) <= set(history)
    _assert_history(history, reference, reference)


# ----------------------------------------------------------------------------- W&B
def wandb_run_records(path: str) -> list[bytes]:
    """The records of a W&B run file (``run-*.wandb``): a 7-byte header (``:W&B``, magic,
    version), then LevelDB-log blocks of 32 KiB, each record split into chunks with a 7-byte
    header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    return records


def _wandb_history(run_file: str) -> dict[str, list[tuple[int, float]]]:
    """``key -> [(Trainer step, value)]`` of the run's history records (keys as the Trainer
    logged them, less WandbCallback's ``train/`` prefix)."""
    from wandb.proto import wandb_internal_pb2

    history: dict[str, list[tuple[int, float]]] = {}
    for raw in wandb_run_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = items.get("train/global_step")
        for key, value in items.items():
            if key.startswith("train/mir"):
                history.setdefault(key[len("train/"):], []).append((int(step), float(value)))
    return history


def _record_kinds(run_file: str) -> list[str]:
    from wandb.proto import wandb_internal_pb2

    kinds = []
    for raw in wandb_run_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kinds.append(str(record.WhichOneof("record_type")))
    return kinds


def _finished(run_file: str) -> bool:
    """True once the run file holds its exit record (False while a record is half written)."""
    try:
        return "exit" in _record_kinds(run_file)
    except Exception:  # noqa: BLE001 - a truncated last record does not parse yet
        return False


def test_wandb_offline_run_file_holds_mir_and_per_layer_values(monkeypatch, reference, tmp_path):
    pytest.importorskip("wandb")
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "mir-test")
    try:
        _train(tmp_path, "wandb")
    finally:
        wandb.finish()
    run_files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_files) == 1
    # wandb's service writes the run file after finish() returns: read it once its exit record is in
    deadline = time.monotonic() + 120
    while not _finished(run_files[0]):
        assert time.monotonic() < deadline, "the W&B run file got no exit record within 120 s"
        time.sleep(0.5)
    history = _wandb_history(run_files[0])
    assert set(reference) <= set(history), _record_kinds(run_files[0])
    _assert_history(history, reference, reference)
