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
* nothing of the metric's state outlives ``run()`` (each run allocates its own and frees it
  before returning), and with ``max_state_bytes`` no more than that much state exists at any
  time: the layers are measured in groups, the probe set running once per group;
* torch's CPU and CUDA generators, Python's ``random`` and NumPy's global state are left as
  found (iterating a ``DataLoader`` draws from torch's generator), so training with a probe
  takes the same random draws as training without it;
* under ``torch.distributed`` every rank iterates the same loader and takes batches
  ``rank, rank + W, ...`` (no repeats), and every rank runs the same number of forwards,
  ``ceil(n / W)``: a rank short of a batch runs a padding forward (the loader's first batch)
  whose tokens are not counted. Sharded engines (FSDP, ZeRO-3) make each forward a
  collective, so unequal counts would hang;
* ranks agree on failure with one collective before the metric's merge: a failure on any
  rank (masks, the metric, a forward that raises) gives every rank a NaN result whose
  ``error`` says why and ``error_kind`` (a :class:`FailureKind`) of what kind, so a training
  loop can log it and go on. After a failure a rank still
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
import random
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mir_lightning import _distributed as D
from mir_lightning.capture import LayersArg, MaskFn
from mir_lightning.measurement import FailureKind, Measurement, MIRResult, _model_device, check_metric_kwargs, combine_passes
from mir_lightning.metric import ModalityIntegrationRate
from mir_lightning.models.transformers import unwrap_module

__all__ = ["DEFAULT_CUDA_STATE_FRACTION", "FailureKind", "MIRProbe", "MIRResult", "Measurement", "StateBudgetError",
           "check_metric_kwargs", "default_state_budget", "layer_groups"]

StepFn = Callable[[nn.Module, Any], Any]

# The default budget on a CUDA device: this share of the memory free for tensors at probe start
# (the device's free memory plus the blocks torch's caching allocator holds unused); the rest is
# left to the probe's forwards and to compute()'s working memory (~0.13x the state).
DEFAULT_CUDA_STATE_FRACTION = 0.5


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


def renamed_argument(kwargs: dict[str, Any], old: str, new: str, value: Any, owner: str) -> Any:
    """``value`` of argument ``new``, or that of its deprecated former name ``old`` popped
    from ``kwargs`` (with a DeprecationWarning); both given is a TypeError."""
    if old not in kwargs:
        return value
    if value is not None:
        raise TypeError(f"{owner} got both {new}= and its former name {old}=; pass {new}= only")
    warnings.warn(f"{owner}({old}=...) is deprecated; pass {new}=...", DeprecationWarning, stacklevel=3)
    return kwargs.pop(old)


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


def _training_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(module, module.training) for module in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Restore torch's CPU and (initialised) CUDA generators, Python's ``random`` and NumPy's
    global state on exit: iterating a DataLoader draws its base seed (and a shuffled
    sampler's seed) from torch's generator."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    python = random.getstate()
    numpy = sys.modules.get("numpy")  # not imported yet: nothing of ours can have drawn from it
    numpy_state = numpy.random.get_state() if numpy is not None else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(python)
        if numpy_state is not None:
            numpy.random.set_state(numpy_state)


class StateBudgetError(ValueError):
    """``max_state_bytes`` cannot be met: below one layer's state, or the hidden size is unknown."""


def default_state_budget(device: torch.device) -> int | None:
    """The default ``max_state_bytes``: on CUDA :data:`DEFAULT_CUDA_STATE_FRACTION` of the
    memory free for tensors now (``torch.cuda.mem_get_info`` plus the caching allocator's
    reserved but unallocated bytes); ``None`` (no budget) elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(DEFAULT_CUDA_STATE_FRACTION * (free + unused))


def layer_groups(num_layers: int, layer_bytes: int, budget: int | None) -> list[list[int]]:
    """Consecutive groups of ``range(num_layers)``, as few as keep each group's state
    (``layer_bytes`` per layer) within ``budget`` bytes, of sizes differing by at most one.
    ``budget=None``: one group. Raises :class:`StateBudgetError` when one layer's state exceeds ``budget``."""
    if budget is None or num_layers * layer_bytes <= budget:
        return [list(range(num_layers))]
    per_pass = budget // layer_bytes
    if per_pass < 1:
        raise StateBudgetError(
            f"max_state_bytes={budget:,} is smaller than the metric state of one layer ({layer_bytes:,} bytes, "
            "ModalityIntegrationRate.state_nbytes_for): raise it, or shrink the state (state_dtype=torch.float32, "
            "a smaller norm_buffer / median_buffer / max_outliers)"
        )
    passes = math.ceil(num_layers / per_pass)
    bounds = [-(-i * num_layers // passes) for i in range(passes + 1)]  # ceil: the first groups are the larger
    return [list(range(start, stop)) for start, stop in zip(bounds, bounds[1:])]


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _loader_failure(err: Exception, batches_read: int) -> str:
    """Why the probe loader stopped, with the usual cause of an ``IndexError``."""
    message = f"the probe loader failed after {batches_read} batches ({type(err).__name__}: {err})"
    if isinstance(err, IndexError):
        message += (
            "; a probe of more samples than its dataset holds does this, e.g. Subset(dataset, range(100)) on "
            "fewer than 100 samples: use range(min(100, len(dataset)))"
        )
    return message


class MIRProbe:
    """MIR of a model on a fixed probe set, callable from any training loop.

    Args:
        probe_dataloader: the probe batches (any iterable; iterated once per :meth:`run`).
            Under torch.distributed give every rank the same, unsharded loader: the probe
            shards it itself (rank r takes batches r, r + W, ...).
        probe_step: ``probe_step(model, batch)`` runs one forward; default ``model(**batch)``
            for mapping batches (less their ``vision_mask`` / ``text_mask`` entries), else
            ``model(batch)``. The batch is moved to the model's device first. (``step=`` is
            its former, deprecated name.)
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
        process_group: the ranks that share out the probe batches (default: the whole world).
            Under tensor parallelism pass the data-parallel group: tensor-parallel peers then
            run the same batches. Plain layer outputs merge over this group; ``DTensor`` ones
            (sequence parallelism) are measured from their local shards and merge over the
            whole job, which must be this group x their mesh (README, "Tensor and sequence
            parallelism").
        hidden_size: width D; inferred when possible (ranks that capture nothing learn it
            from the others anyway).
        max_state_bytes: the most metric state (bytes, as
            ``ModalityIntegrationRate.state_nbytes_for`` counts it) allowed to exist at once.
            When all layers' state would exceed it, :meth:`run` measures the layers in
            groups that fit, running the probe set once per group (``MIRResult.passes``);
            the result equals the one-pass one. Under torch.distributed the ranks agree on
            the smallest budget, so all run the same groups. Default: on a CUDA model
            :data:`DEFAULT_CUDA_STATE_FRACTION` of the memory free at probe start (at least
            one layer per pass), no budget elsewhere. An explicit budget needs the hidden
            size (inferred, or ``hidden_size=``) and at least one layer's state.
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
        probe_step: StepFn | None = None,
        layers: LayersArg = None,
        masks: MaskFn | None = None,
        image_token_id: int | None = None,
        layer_indices: Sequence[int] | slice | None = None,
        text_tokens: str = "after_image",
        process_group: Any = None,
        hidden_size: int | None = None,
        max_state_bytes: int | None = None,
        **metric_kwargs: Any,
    ) -> None:
        if probe_dataloader is None:
            raise ValueError("MIRProbe needs a probe_dataloader (an iterable of batches)")
        probe_step = renamed_argument(metric_kwargs, "step", "probe_step", probe_step, "MIRProbe")
        if max_state_bytes is not None and not int(max_state_bytes) > 0:
            raise ValueError(f"max_state_bytes must be a positive number of bytes or None, got {max_state_bytes!r}")
        self.probe_dataloader = probe_dataloader
        self.probe_step = probe_step or default_step
        self.max_state_bytes = None if max_state_bytes is None else int(max_state_bytes)
        self.measurement = Measurement(
            layers=layers, masks=masks, image_token_id=image_token_id, layer_indices=layer_indices,
            text_tokens=text_tokens, process_group=process_group, hidden_size=hidden_size,
            metric_kwargs=metric_kwargs,
        )

    @property
    def metric(self) -> ModalityIntegrationRate | None:
        """The metric of the last run's last pass, its state already released (empty
        placeholders, no memory held): its ``per_layer_stats()`` / ``per_layer_fd()`` give
        that pass's layers (all layers when ``passes == 1``). ``None`` before any run and
        after a failed one. Read results from the :class:`MIRResult` that :meth:`run` returns."""
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
        longest, negated_shortest = D.all_max([float(length), -float(length)], self.measurement.process_group)
        total = int(longest)
        if int(-negated_shortest) != total:
            self.measurement.fail(
                f"the probe loader yields {int(-negated_shortest)} to {total} batches on different ranks: give every "
                "rank the same, unsharded loader (the probe shards it itself)",
                FailureKind.LOADER,
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
        hooks go on its real layers, forwards go through the wrapper. With a state budget
        (``max_state_bytes``) the probe set runs once per group of layers.

        Returns:
            :class:`MIRResult`; on failure its ``mir`` is NaN and ``error`` says why, on every rank.

        Raises:
            ValueError: when the layers cannot be found; :class:`StateBudgetError` (a
                ValueError) when an explicit ``max_state_bytes`` is below one layer's state or
                needs an unknown hidden size. Both before any forward, on every rank.
        """
        start = time.perf_counter()
        measurement = self.measurement
        targets = measurement.resolve(model)
        rank, world = D.rank_world(measurement.process_group)
        device = _model_device(model)
        parts: list[MIRResult] = []
        with _rng_preserved():
            for positions in self._groups(len(targets.modules), device, world):
                parts.append(self._pass(model, positions, rank, world, device))
                if parts[-1].error is not None:  # agreed by every rank: all stop here
                    break
        return combine_passes(parts, targets.layer_ids, time.perf_counter() - start)

    def _groups(self, num_layers: int, device: torch.device, world: int) -> list[list[int]]:
        """Positions of the layers measured by each pass (one pass without a budget). Under
        torch.distributed the ranks agree on the smallest budget and the largest known width."""
        explicit = self.max_state_bytes is not None
        budget = self.max_state_bytes if explicit else default_state_budget(device)
        hidden_size = self.measurement.hidden_size
        if world > 1:
            agreed = D.all_max([-math.inf if budget is None else -float(budget), float(hidden_size or 0)],
                               self.measurement.process_group)
            budget = None if agreed[0] == -math.inf else int(-agreed[0])
            hidden_size = int(agreed[1]) or None
        if budget is None:
            return [list(range(num_layers))]
        if hidden_size is None:
            if not explicit:  # the default budget never blocks a probe: one pass, as without it
                return [list(range(num_layers))]
            raise StateBudgetError("max_state_bytes needs the hidden size to size the groups of layers, and it could not be "
                             "inferred from the layers: pass hidden_size=")
        layer_bytes = self.measurement.state_nbytes(1, hidden_size)
        return layer_groups(num_layers, layer_bytes, budget if explicit else max(budget, layer_bytes))

    def _pass(self, model: nn.Module, positions: list[int], rank: int, world: int, device: torch.device) -> MIRResult:
        """One pass of the probe set with hooks on the layers at ``positions`` only."""
        measurement = self.measurement
        modes = _training_modes(model)
        forwards = 0
        measurement.begin(model, positions)
        try:
            model.eval()
            with torch.no_grad(), _eager(), contextlib.closing(self._schedule(rank, world)) as schedule:
                for batch, capture in schedule:
                    batch = _to_device(batch, device)
                    forwards += 1
                    try:
                        with measurement.batch(batch, capture):
                            self.probe_step(model, batch)
                    except Exception as err:  # go on without capture: keep the forward count of the others
                        measurement.fail(err, FailureKind.FORWARD)
                    del batch
        except Exception as err:  # the loader itself failed
            measurement.fail(_loader_failure(err, forwards), FailureKind.LOADER)
        except BaseException:  # KeyboardInterrupt...: no state left behind either
            measurement.release()
            raise
        finally:
            measurement.detach()
            _restore_modes(modes)
        return measurement.finish(forwards)
