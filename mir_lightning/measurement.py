"""One MIR measurement over forwards of a model: hooks, masks, metric, cross-rank agreement.

:class:`Measurement` is the engine's inner step (``begin`` / one ``batch`` per forward /
``finish``), shared by :class:`~mir_lightning.probe.MIRProbe` and Lightning's validation-time
capture; :class:`MIRResult` is what it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mir_lightning import _distributed as D
from mir_lightning.capture import (
    CaptureTargets,
    LayerCapture,
    LocalTokens,
    LayersArg,
    MaskFn,
    MaskRule,
    OutputLayout,
    infer_hidden_size,
    is_dtensor,
    local_tokens,
    resolve_targets,
    select_layers,
)
from mir_lightning.metric import STAT_KEYS, ModalityIntegrationRate
from mir_lightning.models.transformers import TEXT_MODES

__all__ = ["FailureKind", "MIRResult", "Measurement", "check_metric_kwargs", "combine_passes"]


class FailureKind(enum.Enum):
    """Why a measurement failed (:attr:`MIRResult.error_kind`; ``error`` says more, for humans)."""

    LOADER = "loader"
    """Iterating the probe loader raised, or the ranks' loaders yield different numbers of batches."""
    MASKS = "masks"
    """The vision / text masks of a batch could not be built."""
    FORWARD = "forward"
    """A probe forward (the ``step``) raised."""
    LAYER_CALLS = "layer_calls"
    """A hooked layer did not run exactly once in a batch's forward (``torch.compile``, several forwards)."""
    STEP_OUTPUT = "step_output"
    """A validation step gave no hidden states (Lightning's ``source="step_output"``)."""
    LAYOUT = "layout"
    """Layer outputs whose placement over ranks cannot be measured once per token (tensor parallelism)."""
    METRIC = "metric"
    """The metric refused the hidden states (shape, dtype, non-finite values) or its computation failed."""
    NO_TOKENS = "no_tokens"
    """No hidden states were captured (no probe batch, or no layer ran)."""
    STATE_BUDGET = "state_budget"
    """The measured layers' state exceeds ``max_state_bytes`` where the batches cannot be
    run once per group of layers (Lightning's validation-time capture)."""


_KINDS = list(FailureKind)  # rank agreement sends the position + 1 (0: no failure)


@dataclass
class MIRResult:
    """One MIR measurement.

    Attributes:
        mir: ``log10(sum_k FD_k)`` (NaN on failure, or when the FD sum is not positive).
        per_layer_fd: ``[L]`` float64, FD of each measured layer (NaN on failure).
        stats: the metric's ``per_layer_stats()``, each ``[L]`` float64 (NaN-filled on failure).
        layers: ids of the measured layers among the model's hidden-state layers.
        n_vision, n_text: tokens per layer, summed over ranks (0 on failure).
        forwards: forwards this rank ran, over all passes (padding forwards included).
        seconds: wall time of the measurement on this rank.
        error: why the measurement failed, else ``None``; a rank whose own part went well
            says that another rank failed.
        error_kind: the kind of failure, else ``None``: this rank's own, or (when only other
            ranks failed) that of a failed rank, so that every rank sees a failure kind.
        passes: times the probe set was run: one per group of layers whose state fits the
            probe's ``max_state_bytes`` (1 without a budget).
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
    error_kind: FailureKind | None = None
    passes: int = 1


def combine_passes(parts: Sequence[MIRResult], layers: Sequence[int], seconds: float) -> MIRResult:
    """One result over ``layers`` from the passes of a budgeted probe, each over a group of
    them (in layer order): per-layer values concatenated, MIR from their FD sum (summed in
    layer order, as a one-pass ``compute()`` does), forwards summed. A failed pass (the last
    one run) fails the whole result."""
    failed = next((part for part in parts if part.error is not None), None)  # (its fields say why)
    if len(parts) == 1 and (failed is None or list(parts[0].layers) == list(layers)):
        return dataclasses.replace(parts[0], seconds=seconds)
    forwards = sum(part.forwards for part in parts)
    layers = list(layers)
    if failed is not None:
        nan = torch.full((len(layers),), math.nan, dtype=torch.float64)
        return dataclasses.replace(failed, per_layer_fd=nan.clone(), stats={key: nan.clone() for key in STAT_KEYS},
                                   layers=layers, forwards=forwards, seconds=seconds, passes=len(parts))
    stats = {key: torch.cat([part.stats[key] for part in parts]) for key in STAT_KEYS}
    total = sum(float(fd) for fd in stats["fd"].tolist())
    return MIRResult(
        mir=math.log10(total) if total > 0 else math.nan, per_layer_fd=stats["fd"].clone(), stats=stats,
        layers=layers, n_vision=parts[0].n_vision, n_text=parts[0].n_text, forwards=forwards, seconds=seconds,
        passes=len(parts),
    )


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
        self._failure_kind: FailureKind | None = None
        self._layout = OutputLayout()
        self._captured = False  # hidden states reached the metric (or a replica's peer) since begin()
        self._local_masks: dict[tuple[tuple[int, int], tuple[int, int]], tuple[Tensor, Tensor]] = {}
        self._start = 0.0

    # ------------------------------------------------------------------ set-up
    def resolve(self, model: nn.Module) -> CaptureTargets:
        """Find (once per model) the modules to hook; raises ValueError when they cannot be found."""
        if self.targets is None or self._model_id != id(model):
            targets = resolve_targets(
                model, self.layers, self.layer_indices, self.image_token_id, find_image_token=self.masks is None
            )
            self.targets, self._model_id, self.layer_ids = targets, id(model), list(targets.layer_ids)
            self._rule = MaskRule(self.masks, targets.image_token_id, self.text_tokens, targets.splice)
            if self.hidden_size is None:
                self.hidden_size = infer_hidden_size(targets.modules)
        return self.targets

    def state_nbytes(self, num_layers: int, hidden_size: int) -> int:
        """Bytes of the state of a metric over ``num_layers`` layers of width ``hidden_size``
        with this measurement's metric options (``ModalityIntegrationRate.state_nbytes_for``)."""
        params = inspect.signature(ModalityIntegrationRate.state_nbytes_for).parameters
        sizes = {name: self.metric_kwargs[name] for name in params if name in self.metric_kwargs}
        return ModalityIntegrationRate.state_nbytes_for(num_layers, hidden_size, **sizes)

    def _new_metric(self, num_layers: int, hidden_size: int, device: torch.device) -> None:
        kwargs = dict(self.metric_kwargs)
        kwargs.setdefault("layer_ids", list(self.layer_ids) if len(self.layer_ids) == num_layers else None)
        if self.process_group is not None:
            kwargs["process_group"] = self.process_group
        self.metric = ModalityIntegrationRate(num_layers, hidden_size, **kwargs).to(device)

    def begin(self, model: nn.Module | None = None, positions: Sequence[int] | None = None) -> None:
        """Start a measurement with a new metric and, given a model, attach the (inactive) hooks.

        ``positions``: which of the resolved layers to measure (indices into
        ``targets.modules``; default all): only they are hooked, and the metric holds only
        their state. Without a model only :meth:`feed` can add hidden states
        (``source="step_output"``).
        """
        self._start = time.perf_counter()
        self._failure = self._failure_kind = None
        self._layout = OutputLayout()
        self._captured = False
        self._masks = None
        self.metric = None
        device = torch.device("cpu")
        if model is not None:
            targets = self.resolve(model)
            positions = range(len(targets.modules)) if positions is None else positions
            self.layer_ids = [targets.layer_ids[i] for i in positions]
            self._capture = LayerCapture([targets.modules[i] for i in positions])
            device = _model_device(model)
            self._capture.attach(self._sink)
        if self.hidden_size is not None and self.layer_ids:
            self._new_metric(len(self.layer_ids), self.hidden_size, device)

    # ------------------------------------------------------------------ capture
    def fail(self, err: BaseException | str, kind: FailureKind) -> None:
        """Record a failure of ``kind`` (the first one is kept); the result will be NaN on every rank."""
        if self._failure is None:
            self._failure = err if isinstance(err, str) else _describe(err)
            self._failure_kind = kind

    @property
    def failure(self) -> str | None:
        """This rank's failure message so far (``None`` while all went well)."""
        return self._failure

    def _sink(self, index: int, hidden: Tensor) -> None:
        if self._failure is None and self._masks is not None:
            self._fold(index, hidden, self._masks)

    def _fold(self, index: int, hidden: Tensor, masks: tuple[Tensor, Tensor]) -> None:
        """Fold metric layer ``index``'s output ``[B, T, D]`` (plain, or a DTensor's local shard)
        of the current batch, whose masks are ``masks``; a failure is recorded, not raised."""
        try:
            tokens = local_tokens(hidden)
            self._layout.add(tokens, self.layer_ids[index], tuple(masks[0].shape))
        except Exception as err:  # never out of a forward hook: reported by finish(), on every rank
            self.fail(err, FailureKind.LAYOUT)
            return
        try:
            if self.metric is None:
                self._new_metric(len(self.layer_ids), hidden.shape[-1], tokens.hidden.device)
            if tokens.counted:
                self.metric.update_layer(index, tokens.hidden, *self._tokens_masks(tokens, masks))
            self._captured = True
        except Exception as err:  # reported by finish(), on every rank
            self.fail(err, FailureKind.METRIC)

    def _tokens_masks(self, tokens: LocalTokens, masks: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The masks' slices of a local shard, the same tensors for every layer of a batch (the
        metric then selects their positions once)."""
        if not tokens.mesh_size:  # a plain tensor: the whole batch
            return masks
        key = (tokens.rows, tokens.positions)
        if key not in self._local_masks:
            self._local_masks[key] = tokens.masks(*masks)
        return self._local_masks[key]

    def start_batch(self, batch: Any, capture: bool = True) -> None:
        """Capture the next forwards on ``batch`` (until :meth:`end_batch`); ``capture=False``
        (a padding forward) captures nothing. A mask failure is recorded, not raised."""
        masks = None
        if capture and self._failure is None and self._capture is not None:
            try:
                masks = self._rule(batch)
            except Exception as err:
                self.fail(err, FailureKind.MASKS)
        self._masks = masks
        self._local_masks = {}
        if self._capture is not None:
            self._capture.activate(masks is not None)

    def end_batch(self, check: bool = True) -> None:
        """Stop capturing; with ``check``, record a failure unless each hooked layer ran exactly once."""
        captured = self._masks is not None
        self._masks = None
        self._local_masks = {}
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
        self.fail(f"the hooked layers ran {ran} times in one batch's forward, expected once each: {hint}",
                  FailureKind.LAYER_CALLS)

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
            if is_dtensor(hidden_states[0]):  # tensor / sequence parallel: each layer's local shard
                self._local_masks, masks = {}, (vision_mask.bool(), text_mask.bool())
                for index, layer in enumerate(ids):
                    self._fold(index, hidden_states[layer], masks)
                self._local_masks = {}
                return
            self.metric.update([hidden_states[i] for i in ids], vision_mask.bool(), text_mask.bool())
            self._captured = True
        except Exception as err:
            self.fail(err, FailureKind.METRIC)

    # ------------------------------------------------------------------ result
    def detach(self) -> None:
        """Remove the hooks (idempotent)."""
        if self._capture is not None:
            self._capture.detach()

    def _agree(self) -> tuple[FailureKind | None, float, Any]:
        """``(failure kind, hidden size, merge group)`` agreed by the ranks that merge, before
        any collective of the metric (nobody may be left inside its merge).

        Plain layer outputs merge over ``process_group``. ``DTensor`` outputs (tensor / sequence
        parallelism) hold each token on one rank of the data-parallel group x their mesh, which
        must be the whole job: they merge over the default group (every rank sees DTensors too:
        tensor-parallel peers run the same batches through the same layers).
        """
        kind = self._failure_kind
        values = [float(_KINDS.index(kind) + 1 if kind else 0),
                  float(self.metric.hidden_size) if self.metric is not None else 0.0,
                  float(self._captured), float(self._layout.mesh_size)]
        group = self.process_group
        world = D.world_size(group)
        if world > 1:
            values = D.all_max(values, group)
        code, hidden_size, captured, mesh = values
        if mesh > 0:
            if D.world_size() != world * int(mesh):  # the same sizes on every rank: nobody goes on below
                self.fail(
                    f"the layer outputs are DTensors on a mesh of {int(mesh)} ranks, and process_group has {world} "
                    f"ranks, but the job has {D.world_size()}: pass process_group= the data-parallel group, whose "
                    "ranks times the tensor-parallel mesh are all ranks (pipeline parallelism is not covered)",
                    FailureKind.LAYOUT,
                )
                return self._failure_kind, hidden_size, group
            group = None
            code, hidden_size, captured = D.all_max([code, hidden_size, captured], group)
        if not code and not captured:  # e.g. an empty probe loader: NaN with a reason, not a silent NaN
            code = float(_KINDS.index(FailureKind.NO_TOKENS) + 1)
        return (_KINDS[int(code) - 1] if code else None), hidden_size, group

    def finish(self, forwards: int = 0) -> MIRResult:
        """Remove the hooks, agree on failure across ranks, merge and compute; then release the
        metric's state (see :meth:`release`). Every rank must call it."""
        try:
            return self._finish(forwards)
        finally:
            self.release()

    def release(self) -> None:
        """Free the metric's state: nothing of it stays allocated between measurements. A
        metric that computed keeps its results (its ``per_layer_stats()`` / ``per_layer_fd()``
        still answer, its state tensors are empty placeholders); a failed one is dropped."""
        metric, self.metric = self.metric, None
        self._masks = None
        results = getattr(metric, "_results", None) if self._failure is None else None
        if metric is None or results is None:
            return
        metric.release_state()  # empty placeholders; the computed per-layer results stay
        self.metric = metric

    def _finish(self, forwards: int) -> MIRResult:
        self.detach()
        kind, hidden_size, group = self._agree()
        if kind is FailureKind.NO_TOKENS:
            self.fail("no hidden states were captured (no probe batch, or no layer ran)", kind)
        elif kind is not None and self._failure is None:
            self.fail(f"the measurement failed on another rank ({kind.value})", kind)
        if kind is None and self.metric is None:  # tokens on other ranks only: join the merge
            self._new_metric(len(self.layer_ids), int(hidden_size), D.collective_device(group)
                             if D.world_size(group) > 1 else torch.device("cpu"))
        if self.metric is not None:
            self.metric.process_group = group
        seconds = time.perf_counter() - self._start
        if self._failure is not None:
            return self._failed(forwards, seconds)
        try:
            mir = float(self.metric.compute())
            stats = self.metric.per_layer_stats()
        except Exception as err:  # every rank reached compute(): no collective is left half-done
            self.fail(err, FailureKind.METRIC)
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
            error_kind=self._failure_kind,
        )
