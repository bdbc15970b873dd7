"""MIR under tensor and sequence parallelism: 4 gloo ranks as a 2 x 2 (dp, tp) mesh, no mocks.

``tests/tensor_parallel_script.py`` shards a tiny float64 Llama with ``parallelize_module``
(plain TP; TP + SequenceParallel with ``Shard(1)`` DTensor layer outputs and a ``Replicate()``
LM head) and runs ``MIRProbe(..., process_group=<dp group>)`` on probe batches of odd lengths
(uneven sequence shards); the reference is tests/reference.py on the unsharded model's tokens.

Tolerances: the sharded probes agree with the one-process probe to 1e-14 relative per layer;
against the reference the metric's float32 median buffer (see ModalityIntegrationRate) costs up
to 9e-11 relative (the LM-head layer here, also in one process); 1e-9 leaves a 10x margin, and a
token counted twice or missed moves an FD by > 1e-3. Token counts must be equal.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mir_lightning.capture import OutputLayout, local_tokens
from mir_lightning.measurement import FailureKind
from mir_lightning.probe import MIRProbe

HERE = Path(__file__).resolve().parent
RTOL = 1e-9
WORLD = 4
TIMEOUT_S = 60  # process-group timeout of the script: a hang becomes a failure


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory) -> tuple[list[dict], dict]:
    out = tmp_path_factory.mktemp("tp")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(HERE.parent), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, str(HERE / "tensor_parallel_script.py"), "--out", str(out),
                           "--timeout", str(TIMEOUT_S)], capture_output=True, text=True, env=env,
                          cwd=HERE.parent, timeout=10 * TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return records, json.loads((out / "reference.json").read_text())


def test_the_plans_give_the_layouts_under_test(mesh_run):
    records, _ = mesh_run
    for rank, record in enumerate(records):
        tp, sp = record["layouts"]["tp"], record["layouts"]["sp"]
        assert [kind for kind, _, _ in tp] == ["Tensor"] * 4  # plain, replicated over the tp peers
        assert [placement for _, placement, _ in sp] == ["(Shard(dim=1),)"] * 3 + ["(Replicate(),)"]
        # the first batch has 7 positions: shards of 4 and 3 (uneven)
        assert sp[0][2] == [4, 4 if rank % 2 == 0 else 3, 32]
        assert sp[3][2] == [4, 7, 32]


@pytest.mark.parametrize("run", ["tp", "sp", "sp_explicit", "sp_feed"])
def test_mesh_equals_the_reference_with_its_token_counts(mesh_run, run):
    records, references = mesh_run
    ref = references["sp" if run == "sp_feed" else run]  # fed: hidden_states[1:], the default layers
    for record in (r[run] for r in records):
        assert record["error"] is None, record["error"]
        assert (record["n_vision"], record["n_text"]) == (ref["n_vision"], ref["n_text"])
        assert math.isclose(record["mir"], ref["mir"], rel_tol=RTOL)
        assert len(record["per_layer_fd"]) == len(ref["per_layer_fd"])
        for got, want in zip(record["per_layer_fd"], ref["per_layer_fd"]):
            assert math.isclose(got, want, rel_tol=RTOL), (got, want)
        if run != "sp_feed":
            assert record["forwards"] == 3  # ceil(5 batches / 2 data-parallel replicas), padding included
    assert len({r[run]["mir"] for r in records}) == 1  # every rank returns the same result


def test_a_failure_on_one_tensor_parallel_rank_reaches_every_rank(mesh_run):
    records, _ = mesh_run
    for rank, record in enumerate(r["sp_fail"] for r in records):
        assert math.isnan(record["mir"]) and record["error_kind"] == FailureKind.MASKS.value
        assert ("masks fail on rank 1" if rank == 1 else "another rank") in record["error"]


# ---------------------------------------------------------------------------- one process
def test_plain_tensors_are_measured_whole():
    hidden = torch.randn(2, 5, 8)
    tokens = local_tokens(hidden)
    assert tokens.hidden is hidden and tokens.counted and tokens.mesh_size == 0
    assert (tokens.rows, tokens.positions) == ((0, 2), (0, 5))


# [B, T / TP, D] against masks [B, T]; Megatron's sequence-first [S / TP, B, H] against [S, B]
@pytest.mark.parametrize("shape, batch_shape", [((2, 3, 8), (2, 6)), ((3, 2, 8), (6, 2))])
def test_a_plain_sequence_shard_is_refused(shape, batch_shape):
    tokens = local_tokens(torch.randn(*shape))
    with pytest.raises(ValueError, match="sequence-parallel shard as a plain tensor"):
        OutputLayout().add(tokens, layer_id=4, batch_shape=batch_shape)


class _HalfSequence(torch.nn.Module):
    """A layer returning the first half of the positions, as a sequence-parallel rank's plain local shard."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, : hidden.shape[1] // 2]


def test_probe_reports_a_plain_sequence_shard_as_a_layout_failure():
    layer = _HalfSequence()
    vision = torch.zeros(2, 8, dtype=torch.bool)
    vision[:, :3] = True
    batches = [{"hidden": torch.randn(2, 8, 4), "vision_mask": vision, "text_mask": ~vision}]
    probe = MIRProbe(batches, step=lambda model, batch: model(batch["hidden"]), layers=[layer], hidden_size=4)
    result = probe.run(layer)
    assert math.isnan(result.mir) and result.error_kind is FailureKind.LAYOUT
    assert "(2, 4) where the masks are (2, 8)" in result.error
