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
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mir_lightning import _distributed as D
from mir_lightning.capture import LayersArg, MaskFn
from mir_lightning.measurement import Measurement, MIRResult, _model_device, check_metric_kwargs
from mir_lightning.metric import ModalityIntegrationRate
from mir_lightning.models.transformers import unwrap_module

__all__ = ["MIRProbe", "MIRResult", "Measurement", "check_metric_kwargs"]

StepFn = Callable[[nn.Module, Any], Any]


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
        longest, negated_shortest = D.all_max([float(length), -float(length)], self.measurement.process_group)
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
        rank, world = D.rank_world(measurement.process_group)
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
            measurement.fail(_loader_failure(err, forwards))
        finally:
            measurement.detach()
            _restore_modes(modes)
        return measurement.finish(forwards)
