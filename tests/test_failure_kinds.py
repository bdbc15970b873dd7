"""Failures travel as a typed kind (``MIRResult.error_kind``) next to the message, set where
they arise, and ``evaluate`` re-raises by kind (one process; the agreement of kinds across
ranks is in tests/test_tensor_parallel.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mir_lightning import FailureKind, MIRProbe
from mir_lightning.evaluate import _raise_failure
from mir_lightning.measurement import MIRResult
from mir_lightning.probe_data import InputError

D = 4


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, D), nn.Linear(D, D)).double()


def _batches(n: int = 2, nonfinite: bool = False) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    vision = torch.zeros(2, 8, dtype=torch.bool)
    vision[:, :3] = True
    batches = [{"x": torch.randn(2, 8, D, generator=generator, dtype=torch.float64),
                "vision_mask": vision, "text_mask": ~vision} for _ in range(n)]
    if nonfinite:
        batches[0]["x"][0, 5, 0] = math.nan
    return batches


def _forward(model, batch):
    return model(batch["x"])


class _RaisingLoader:
    def __iter__(self):
        yield from _batches(1)
        raise OSError("disk gone")


def _probe(loader, **options) -> MIRResult:
    model = _model()
    options.setdefault("step", _forward)
    return MIRProbe(loader, layers=list(model), hidden_size=D, **options).run(model)


def _masks_raise(batch):
    raise KeyError("no masks here")


@pytest.mark.parametrize("kind, make", [
    (FailureKind.LOADER, lambda: _probe(_RaisingLoader())),
    (FailureKind.FORWARD, lambda: _probe(_batches(), step=lambda m, b: 1 / 0)),
    (FailureKind.MASKS, lambda: _probe(_batches(), masks=_masks_raise)),
    (FailureKind.LAYER_CALLS, lambda: _probe(_batches(), step=lambda m, b: (m(b["x"]), m(b["x"])))),
    (FailureKind.METRIC, lambda: _probe(_batches(nonfinite=True))),
    (FailureKind.NO_TOKENS, lambda: _probe([])),
])
def test_each_failure_has_its_kind(kind, make):
    result = make()
    assert math.isnan(result.mir) and result.error and result.error_kind is kind


def test_a_measurement_that_works_has_no_kind():
    result = _probe(_batches())
    assert result.error is None and result.error_kind is None and math.isfinite(result.mir)


def _failed(kind: FailureKind | None, error: str | None) -> MIRResult:
    nan = torch.full((2,), math.nan, dtype=torch.float64)
    return MIRResult(mir=math.nan, per_layer_fd=nan, stats={}, layers=[0, 1], n_vision=0, n_text=0,
                     forwards=1, seconds=0.0, error=error, error_kind=kind)


@pytest.mark.parametrize("kind", [FailureKind.LOADER, FailureKind.FORWARD])
def test_evaluate_raises_input_errors_for_its_batches_and_forwards(kind):
    with pytest.raises(InputError, match="^the processor failed on a batch$"):
        _raise_failure(_failed(kind, "InputError: the processor failed on a batch"))
    with pytest.raises(InputError, match=r"another rank \("):  # the same kind on a rank that did not fail
        _raise_failure(_failed(kind, f"the measurement failed on another rank ({kind.value})"))


@pytest.mark.parametrize("kind", sorted(set(FailureKind) - {FailureKind.LOADER, FailureKind.FORWARD}, key=str))
def test_evaluate_raises_runtime_errors_for_the_rest(kind):
    with pytest.raises(RuntimeError, match="the MIR measurement failed: ValueError: x") as caught:
        _raise_failure(_failed(kind, "ValueError: x"))
    assert not isinstance(caught.value, InputError)
    _raise_failure(_failed(None, None))  # no failure: nothing raised
