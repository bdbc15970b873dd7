"""``MIRProbe``: measure MIR on a fixed probe set, from any training loop.

The one engine behind every adapter (Lightning's ``MIRCallback``, the Hugging Face Trainer
callback, the command line, a plain PyTorch loop)::

    probe = MIRProbe(probe_loader)            # layers, image token and masks found automatically
    result = probe.run(model)                 # eval + no_grad; hooks only for these forwards
    print(result.mir, result.per_layer_fd)

What ``run()`` guarantees:

* the model is switched to eval mode under ``torch.no_grad()``; every module's training flag
  is restored afterwards, and no hook is left behind, even when a forward raises;
* forward hooks on the LLM's layers are active only inside the probe's own forwards: no
  training or gradient-checkpointing recomputation is ever captured, and each hooked layer
  must run exactly once per probe batch (checked);
* ``torch.compile``d models are run eagerly for the probe (``torch.compiler.set_stance
  ("force_eager")``) so that the hooks fire;
* under ``torch.distributed`` every rank iterates the same loader and takes batches
  ``rank, rank + W, ...`` (no repeats), and every rank runs the same number of forwards,
  ``ceil(n / W)``: a rank short of a batch runs a padding forward (the loader's first batch)
  whose tokens are not counted. Sharded engines (FSDP, ZeRO-3) make each forward a
  collective, so unequal counts would hang;
* ranks agree on failure with one collective before the metric's merge: a failure on any
  rank (masks, the metric, a forward that raises) gives every rank a NaN result whose
  ``error`` says why, so a training loop can log it and go on. After a failure a rank still
  runs its remaining forwards (capturing nothing), so that engines whose forwards are
  collectives (FSDP, ZeRO-3, DDP's buffer broadcast) stay in step. Configuration errors
  found before any forward (layers that cannot be found) raise on every rank. A forward
  that raises on one rank only in the middle of a sharded engine's collective leaves the
  others waiting in it until the process group's timeout: that is the engine's limit.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

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
from mir_lightning.integrations.transformers import unwrap_module
from mir_lightning.metric import STAT_KEYS, ModalityIntegrationRate

__all__ = ["MIRProbe", "MIRResult", "Measurement", "check_metric_kwargs"]

StepFn = Callable[[nn.Module, Any], Any]


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


def _collective_device(group: Any) -> torch.device:
    backend = dist.get_backend(group)
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _distributed(group: Any) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_max(values: Sequence[float], group: Any) -> list[float]:
    """Element-wise maximum over the ranks of ``group`` (one collective)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.tolist()


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch moved to ``device``; mappings come back as dicts."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


MASK_KEYS = ("vision_mask", "text_mask")


def _named_inputs(model: nn.Module) -> set[str]:
    """Names of the explicit parameters of ``model.forward`` (empty when it has no signature)."""
    try:
        parameters = inspect.signature(unwrap_module(model).forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in parameters if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}


def default_step(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping batch, else ``model(batch)``. The batch's
    ``vision_mask`` / ``text_mask`` entries are the probe's: they are passed on only to a
    ``forward`` that names them as parameters."""
    if isinstance(batch, Mapping):
        named = _named_inputs(model)
        return model(**{key: value for key, value in batch.items() if key not in MASK_KEYS or key in named})
    return model(batch)


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """Run ``torch.compile``d code eagerly inside (forward hooks added after compilation
    would be skipped by the compiled graph)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # torch < 2.6: the fire-count check names the fix
        yield
        return
    with set_stance("force_eager"):
        yield


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
        if self.process_group is not None:
            kwargs["process_group"] = self.process_group
        self.metric = ModalityIntegrationRate(num_layers, hidden_size, **kwargs).to(device)

    def _reset_metric(self, device: torch.device) -> None:
        if self.metric is not None and (
            self.metric.num_layers != len(self.layer_ids) or self.metric.device != device
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
            if self.metric is None:
                self._new_metric(len(ids), hidden_states[0].shape[-1], hidden_states[0].device)
            self.layer_ids = ids
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
        rank, world = _distributed(self.process_group)
        local_size = float(self.metric.hidden_size) if self.metric is not None else 0.0
        failed, hidden_size = float(self._failure is not None), local_size
        if world > 1:  # before any collective of the metric: nobody may be left inside its merge
            failed, hidden_size = _all_max([failed, local_size], self.process_group)
        if failed and self._failure is None:
            self._failure = "the measurement failed on another rank"
        if not failed and self.metric is None:
            if hidden_size > 0 and self.layer_ids:  # tokens on other ranks only: join the merge
                self._new_metric(len(self.layer_ids), int(hidden_size), _collective_device(self.process_group)
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


def _training_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(module, module.training) for module in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


class MIRProbe:
    """MIR of a model on a fixed probe set, callable from any training loop.

    Args:
        probe_dataloader: the probe batches (any iterable; iterated once per :meth:`run`).
            Under torch.distributed give every rank the same, unsharded loader: the probe
            shards it itself (rank r takes batches r, r + W, ...).
        step: ``step(model, batch)`` runs one forward; default ``model(**batch)`` for
            mapping batches (less their ``vision_mask`` / ``text_mask`` entries), else
            ``model(batch)``. The batch is moved to the model's device first.
        layers: the modules whose outputs are the LLM's per-layer hidden states (a list, or
            a function of the model returning one). Default: found automatically for Hugging
            Face VLMs / causal LMs (also inside DDP, DeepSpeed, FSDP1/FSDP2, peft and
            ``torch.compile`` wrappers), i.e. ``hidden_states[1:]``.
        masks: ``masks(batch) -> (vision_mask, text_mask)``, bool ``[B, T]``. Default: the
            batch's ``vision_mask``/``text_mask`` entries, else masks built from
            ``input_ids`` and the image token (per sample in packed rows, when the batch holds
            ``position_ids`` or ``cu_seqlens``).
        image_token_id: overrides the id read from the model's config.
        layer_indices: measure only these layers (indices or a slice).
        text_tokens: ``"after_image"`` (official: text = tokens after the first image token
            of the sample) or ``"all"``, for id-built masks.
        process_group: the ranks that measure together (default: the whole world).
        hidden_size: width D; inferred when possible (ranks that capture nothing learn it
            from the others anyway).
        metric_kwargs: options of :class:`ModalityIntegrationRate` (``outlier_sigma``,
            ``sqrt_mode``, ``state_dtype``, ``max_outliers``...); unknown names are refused here.

    Example:
        >>> probe = MIRProbe(probe_loader)                        # doctest: +SKIP
        >>> for step, batch in enumerate(train_loader, 1):       # doctest: +SKIP
        ...     train_step(model, batch)
        ...     if step % 500 == 0:
        ...         result = probe.run(model)
        ...         writer.add_scalar("mir", result.mir, step)
    """

    def __init__(
        self,
        probe_dataloader: Iterable,
        *,
        step: StepFn | None = None,
        layers: LayersArg = None,
        masks: MaskFn | None = None,
        image_token_id: int | None = None,
        layer_indices: Sequence[int] | slice | None = None,
        text_tokens: str = "after_image",
        process_group: Any = None,
        hidden_size: int | None = None,
        **metric_kwargs: Any,
    ) -> None:
        if probe_dataloader is None:
            raise ValueError("MIRProbe needs a probe_dataloader (an iterable of batches)")
        self.probe_dataloader = probe_dataloader
        self.step = step or default_step
        self.measurement = Measurement(
            layers=layers, masks=masks, image_token_id=image_token_id, layer_indices=layer_indices,
            text_tokens=text_tokens, process_group=process_group, hidden_size=hidden_size,
            metric_kwargs=metric_kwargs,
        )

    @property
    def metric(self) -> ModalityIntegrationRate | None:
        """The metric of the last run (its state holds that run's summaries)."""
        return self.measurement.metric

    def _schedule(self, rank: int, world: int) -> Iterator[tuple[Any, bool]]:
        """``(batch, capture)`` pairs of this rank: its share of the loader, then padding
        forwards (``capture=False``) up to ``ceil(n / W)``, the same count on every rank."""
        loader = self.probe_dataloader
        if world == 1:
            for batch in loader:
                yield batch, True
            return
        length = _length(loader)
        indexed: Iterable[tuple[int, Any]]
        if length is None:  # the number of forwards must be agreed before any forward: count first
            indexed, length = [], 0
            for index, batch in enumerate(loader):
                length = index + 1
                if index == 0 or index % world == rank:
                    indexed.append((index, batch))
        else:
            indexed = enumerate(loader)
        longest, negated_shortest = _all_max([float(length), -float(length)], self.measurement.process_group)
        total = int(longest)
        if int(-negated_shortest) != total:
            self.measurement.fail(
                f"the probe loader yields {int(-negated_shortest)} to {total} batches on different ranks: give every "
                "rank the same, unsharded loader (the probe shards it itself)"
            )
        target = math.ceil(total / world)
        done, first = 0, None
        for index, batch in indexed:
            if index >= total or done >= target:
                break
            if first is None:
                first = batch
            if index % world == rank:
                done += 1
                yield batch, True
        while done < target and first is not None:
            done += 1
            yield first, False

    def run(self, model: nn.Module) -> MIRResult:
        """Measure MIR of ``model`` on the probe set (every rank must call it).

        ``model`` may be wrapped (DDP, DeepSpeed engine, FSDP1/FSDP2, peft, torch.compile):
        hooks go on its real layers, forwards go through the wrapper.

        Returns:
            :class:`MIRResult`; on failure its ``mir`` is NaN and ``error`` says why, on every rank.

        Raises:
            ValueError: when the layers cannot be found (before any forward, on every rank).
        """
        measurement = self.measurement
        measurement.resolve(model)
        rank, world = _distributed(measurement.process_group)
        device = _model_device(model)
        modes = _training_modes(model)
        forwards = 0
        measurement.begin(model)
        try:
            model.eval()
            with torch.no_grad(), _eager():
                for batch, capture in self._schedule(rank, world):
                    batch = _to_device(batch, device)
                    forwards += 1
                    try:
                        with measurement.batch(batch, capture):
                            self.step(model, batch)
                    except Exception as err:  # go on without capture: keep the forward count of the others
                        measurement.fail(err)
        except Exception as err:  # the loader itself failed
            measurement.fail(err)
        finally:
            measurement.detach()
            _restore_modes(modes)
        return measurement.finish(forwards)
