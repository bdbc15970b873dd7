"""One MIR measurement over forwards of a model: hooks, masks, metric, cross-rank agreement.

:class:`Measurement` is the engine's inner step (``begin`` / one ``batch`` per forward /
``finish``), shared by :class:`~mir_lightning.probe.MIRProbe` and Lightning's validation-time
capture; :class:`MIRResult` is what it returns.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mir_lightning import _distributed as D
from mir_lightning.capture import (
    TEXT_MODES,
    CaptureTargets,
    LayerCapture,
    LayersArg,
    MaskFn,
    MaskRule,
    infer_hidden_size,
    resolve_targets,
    select_layers,
)
from mir_lightning.metric import STAT_KEYS, ModalityIntegrationRate

__all__ = ["MIRResult", "Measurement", "check_metric_kwargs"]


@dataclass
class MIRResult:
    """One MIR measurement.

    Attributes:
        mir: ``log10(sum_k FD_k)`` (NaN on failure, or when the FD sum is not positive).
        per_layer_fd: ``[L]`` float64, FD of each measured layer (NaN on failure).
        stats: the metric's ``per_layer_stats()``, each ``[L]`` float64 (NaN-filled on failure).
        layers: ids of the measured layers among the model's hidden-state layers.
        n_vision, n_text: tokens per layer, summed over ranks (0 on failure).
        forwards: forwards this rank ran (padding forwards included).
        seconds: wall time of the measurement on this rank.
        error: why the measurement failed (the same failure on every rank), else ``None``.
    """

    mir: float
    per_layer_fd: Tensor
    stats: dict[str, Tensor]
    layers: list[int]
    n_vision: int
    n_text: int
    forwards: int
    seconds: float
    error: str | None = None


def check_metric_kwargs(kwargs: Mapping[str, Any], owner: str) -> None:
    """Refuse keywords that :class:`ModalityIntegrationRate` does not take (typos would
    otherwise fail only at the first measurement)."""
    params = inspect.signature(ModalityIntegrationRate.__init__).parameters
    known = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(
            f"{owner} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; its own arguments "
            f"are listed in its docstring, and the metric options it passes on are: {', '.join(sorted(known))}"
        )


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class Measurement:
    """One MIR measurement over forwards of a model: hooks, masks, metric, merge.

    The steps every path shares (``MIRProbe.run`` and ``MIRCallback``'s validation capture):
    :meth:`begin` resolves the layers (once per model) and attaches the hooks (inactive);
    ``with measurement.batch(batch): <one forward>`` captures one batch; :meth:`finish`
    removes the hooks, agrees on failure across ranks and merges the metric. Arguments as in
    :class:`MIRProbe`.
    """

    def __init__(
        self,
        *,
        layers: LayersArg = None,
        masks: MaskFn | None = None,
        image_token_id: int | None = None,
        layer_indices: Sequence[int] | slice | None = None,
        text_tokens: str = "after_image",
        process_group: Any = None,
        hidden_size: int | None = None,
        metric_kwargs: Mapping[str, Any] | None = None,
        owner: str = "MIRProbe",
    ) -> None:
        if text_tokens not in TEXT_MODES:
            raise ValueError(f"text_tokens must be one of {TEXT_MODES}, got {text_tokens!r}")
        metric_kwargs = dict(metric_kwargs or {})
        check_metric_kwargs(metric_kwargs, owner)
        self.layers = layers
        self.masks = masks
        self.image_token_id = image_token_id
        self.layer_indices = layer_indices
        self.text_tokens = text_tokens
        self.process_group = process_group
        self.hidden_size = hidden_size
        self.metric_kwargs = metric_kwargs
        self.metric: ModalityIntegrationRate | None = None
        self.targets: CaptureTargets | None = None
        self.layer_ids: list[int] = []
        self._model_id: int | None = None
        self._capture: LayerCapture | None = None
        self._rule: MaskRule | None = None
        self._masks: tuple[Tensor, Tensor] | None = None
        self._failure: str | None = None
        self._start = 0.0

    # ------------------------------------------------------------------ set-up
    def resolve(self, model: nn.Module) -> CaptureTargets:
        """Find (once per model) the modules to hook; raises ValueError when they cannot be found."""
        if self.targets is None or self._model_id != id(model):
            targets = resolve_targets(
                model, self.layers, self.layer_indices, self.image_token_id, find_image_token=self.masks is None
            )
            self.targets, self._model_id, self.layer_ids = targets, id(model), list(targets.layer_ids)
            self._capture = LayerCapture(targets.modules)
            self._rule = MaskRule(self.masks, targets.image_token_id, self.text_tokens)
            if self.hidden_size is None:
                self.hidden_size = infer_hidden_size(targets.modules)
        return self.targets

    def _new_metric(self, num_layers: int, hidden_size: int, device: torch.device) -> None:
        kwargs = dict(self.metric_kwargs)
        kwargs.setdefault("layer_ids", list(self.layer_ids) if len(self.layer_ids) == num_layers else None)
        if self.process_group is not None:
            kwargs["process_group"] = self.process_group
        self.metric = ModalityIntegrationRate(num_layers, hidden_size, **kwargs).to(device)

    def _reset_metric(self, device: torch.device) -> None:
        if self.metric is not None and (
            self.metric.layer_ids != self.layer_ids or self.metric.device != device
        ):
            self.metric = None
        if self.metric is not None:
            self.metric.reset()
        elif self.hidden_size is not None and self.layer_ids:
            self._new_metric(len(self.layer_ids), self.hidden_size, device)

    def begin(self, model: nn.Module | None = None) -> None:
        """Start a measurement: reset the metric and, given a model, attach the (inactive) hooks.

        Without a model only :meth:`feed` can add hidden states (``source="step_output"``).
        """
        self._start = time.perf_counter()
        self._failure = None
        self._masks = None
        device = torch.device("cpu")
        if model is not None:
            self.resolve(model)
            device = _model_device(model)
            self._capture.attach(self._sink)
        self._reset_metric(device)

    # ------------------------------------------------------------------ capture
    def fail(self, err: BaseException | str) -> None:
        """Record a failure (the first one is kept); the result will be NaN on every rank."""
        if self._failure is None:
            self._failure = err if isinstance(err, str) else _describe(err)

    @property
    def failure(self) -> str | None:
        return self._failure

    def _sink(self, index: int, hidden: Tensor) -> None:
        if self._failure is not None or self._masks is None:
            return
        try:
            if self.metric is None:
                self._new_metric(len(self.layer_ids), hidden.shape[-1], hidden.device)
            self.metric.update_layer(index, hidden, *self._masks)
        except Exception as err:  # reported by finish(), on every rank
            self.fail(err)

    def start_batch(self, batch: Any, capture: bool = True) -> None:
        """Capture the next forwards on ``batch`` (until :meth:`end_batch`); ``capture=False``
        (a padding forward) captures nothing. A mask failure is recorded, not raised."""
        masks = None
        if capture and self._failure is None and self._capture is not None:
            try:
                masks = self._rule(batch)
            except Exception as err:
                self.fail(err)
        self._masks = masks
        if self._capture is not None:
            self._capture.activate(masks is not None)

    def end_batch(self, check: bool = True) -> None:
        """Stop capturing; with ``check``, record a failure unless each hooked layer ran exactly once."""
        captured = self._masks is not None
        self._masks = None
        if self._capture is None:
            return
        self._capture.activate(False)
        if check and captured and self._failure is None:
            self._check_calls(self._capture.calls)

    @contextlib.contextmanager
    def batch(self, batch: Any, capture: bool = True) -> Iterator[None]:
        """``start_batch`` / ``end_batch`` around the block, which runs one forward on ``batch``.
        Exceptions of the block propagate; hooks are inactive again afterwards in every case."""
        self.start_batch(batch, capture)
        try:
            yield
        except BaseException:
            self.end_batch(check=False)
            raise
        self.end_batch()

    def _check_calls(self, calls: list[int]) -> None:
        if all(c == 1 for c in calls):
            return
        ran = ", ".join(f"layer {i}: {c}" for i, c in zip(self.layer_ids, calls))
        hint = (
            "is the model (or one of its layers) compiled with torch.compile? Compiled code skips hooks added after "
            "compilation: measure through MIRProbe (it runs compiled models eagerly, torch >= 2.6) or pass the "
            "uncompiled module (compiled._orig_mod)"
            if not any(calls)
            else "a step must run one forward of the model per batch"
        )
        self.fail(f"the hooked layers ran {ran} times in one batch's forward, expected once each: {hint}")

    def feed(self, hidden_states: Sequence[Tensor] | Tensor, vision_mask: Tensor, text_mask: Tensor) -> None:
        """Fold hidden states given by the caller (``[L_all, B, T, D]`` or a list of ``[B, T, D]``,
        before ``layer_indices`` selection), for models that return them instead of being hooked."""
        if self._failure is not None:
            return
        try:
            ids = select_layers(range(len(hidden_states)), self.layer_indices)
            self.layer_ids = ids
            if self.metric is None:
                self._new_metric(len(ids), hidden_states[0].shape[-1], hidden_states[0].device)
            self.metric.update([hidden_states[i] for i in ids], vision_mask.bool(), text_mask.bool())
        except Exception as err:
            self.fail(err)

    # ------------------------------------------------------------------ result
    def detach(self) -> None:
        """Remove the hooks (idempotent)."""
        if self._capture is not None:
            self._capture.detach()

    def finish(self, forwards: int = 0) -> MIRResult:
        """Remove the hooks, agree on failure across ranks, merge and compute. Every rank must call it."""
        self.detach()
        rank, world = D.rank_world(self.process_group)
        local_size = float(self.metric.hidden_size) if self.metric is not None else 0.0
        failed, hidden_size = float(self._failure is not None), local_size
        if world > 1:  # before any collective of the metric: nobody may be left inside its merge
            failed, hidden_size = D.all_max([failed, local_size], self.process_group)
        if failed and self._failure is None:
            self._failure = "the measurement failed on another rank"
        if not failed and self.metric is None:
            if hidden_size > 0 and self.layer_ids:  # tokens on other ranks only: join the merge
                self._new_metric(len(self.layer_ids), int(hidden_size), D.collective_device(self.process_group)
                                 if world > 1 else torch.device("cpu"))
            else:
                self._failure = "no hidden states were captured (no probe batch, or no layer ran)"
        seconds = time.perf_counter() - self._start
        if self._failure is not None:
            return self._failed(forwards, seconds)
        try:
            mir = float(self.metric.compute())
            stats = self.metric.per_layer_stats()
        except Exception as err:  # every rank reached compute(): no collective is left half-done
            self.fail(err)
            return self._failed(forwards, time.perf_counter() - self._start)
        return MIRResult(
            mir=mir,
            per_layer_fd=stats["fd"].clone(),
            stats=stats,
            layers=list(self.layer_ids),
            n_vision=int(stats["n_vision"][0]),
            n_text=int(stats["n_text"][0]),
            forwards=forwards,
            seconds=time.perf_counter() - self._start,
        )

    def _failed(self, forwards: int, seconds: float) -> MIRResult:
        nan = torch.full((len(self.layer_ids),), math.nan, dtype=torch.float64)
        return MIRResult(
            mir=math.nan,
            per_layer_fd=nan.clone(),
            stats={key: nan.clone() for key in STAT_KEYS},
            layers=list(self.layer_ids),
            n_vision=0,
            n_text=0,
            forwards=forwards,
            seconds=seconds,
            error=self._failure,
        )
