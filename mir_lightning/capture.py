"""Where hidden states come from: which modules to hook, forward hooks on them, and batch masks.

Shared by every path that measures MIR on a model's own forwards (``MIRProbe``, and
``MIRCallback`` on validation batches): layers and masks are resolved here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mir_lightning.models.transformers import (
    TEXT_MODES,
    find_hidden_state_modules,
    find_image_token_id,
    masks_from_batch,
    unwrap_module,
)

MaskFn = Callable[[Any], "tuple[Tensor, Tensor]"]
LayersArg = Sequence[nn.Module] | Callable[[nn.Module], Sequence[nn.Module]] | None


def hidden_from_output(output: Any) -> Tensor:
    """The hidden-state tensor ``[B, T, D]`` of a decoder layer's (or norm's) output."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise TypeError(f"cannot read hidden states from a module output of type {type(output).__name__}")


class LayerCapture:
    """Forward hooks on ``modules`` that hand each output to ``sink(layer_index, hidden)``.

    Hooks are registered by :meth:`attach` and removed by :meth:`detach`; while attached
    they do nothing unless :attr:`active` is True, so the model's own forwards (training,
    or validation batches when a probe set is used) are untouched. :attr:`calls` counts, per
    module, the outputs handed to the sink since the last :meth:`activate`.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        if not modules:
            raise ValueError("no layers to capture")
        self.modules = list(modules)
        self.active = False
        self.calls = [0] * len(self.modules)
        self._handles: list[Any] = []

    def attach(self, sink: Callable[[int, Tensor], None]) -> None:
        self.detach()
        for index, module in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._hook(index, sink)))

    def _hook(self, index: int, sink: Callable[[int, Tensor], None]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.active:
                self.calls[index] += 1
                sink(index, hidden_from_output(output).detach())

        return hook

    def activate(self, active: bool = True) -> None:
        """Start (or stop) handing outputs to the sink; starting resets :attr:`calls`."""
        if active:
            self.calls = [0] * len(self.modules)
        self.active = active

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.active = False


def select_layers(modules: Sequence[Any], which: Sequence[int] | slice | None) -> list[Any]:
    """Subset of ``modules`` by indices or a slice (e.g. ``slice(None, None, 2)`` for every other layer)."""
    modules = list(modules)
    if which is None:
        return modules
    if isinstance(which, slice):
        return modules[which]
    try:
        return [modules[i] for i in which]
    except IndexError as err:
        raise IndexError(f"layer index out of range for {len(modules)} layers: {list(which)}") from err


def infer_hidden_size(modules: Sequence[nn.Module]) -> int | None:
    """Hidden size from the last module's weight or a config, when it can be read."""
    for module in reversed(list(modules)):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 1 and weight.shape[0] > 0:
            return int(weight.shape[0])
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "hidden_size", None):
            return int(config.hidden_size)
    return None


# ---------------------------------------------------------------------------- layers
@dataclass
class CaptureTargets:
    """What to hook in a model.

    Attributes:
        modules: one module per measured layer, whose forward output is that layer's
            hidden states ``[B, T, D]`` (the real layers, not their training wrappers).
        layer_ids: index of each among all the model's hidden-state layers.
        image_token_id: id of the image placeholder token (``None`` when not found).
    """

    modules: list[nn.Module]
    layer_ids: list[int]
    image_token_id: int | None


def _candidate_models(model: nn.Module) -> Iterable[nn.Module]:
    yield model
    for module in model.modules():
        if module is not model and hasattr(module, "config"):
            yield unwrap_module(module)


def _auto_image_token(model: nn.Module) -> int | None:
    for candidate in _candidate_models(model):
        try:
            return find_image_token_id(candidate)
        except (ValueError, TypeError, AttributeError):
            continue
    return None


def resolve_targets(
    model: nn.Module,
    layers: LayersArg = None,
    layer_indices: Sequence[int] | slice | None = None,
    image_token_id: int | None = None,
    find_image_token: bool = True,
) -> CaptureTargets:
    """Find the modules to hook in ``model`` (a HF model, a LightningModule or any wrapper).

    Args:
        layers: the modules whose outputs are the per-layer hidden states (a list, or a
            function of ``model`` returning one). Default: found automatically for Hugging
            Face VLMs / causal LMs held by ``model``, through DDP, DeepSpeed, FSDP1/FSDP2,
            peft and ``torch.compile`` wrappers (``hidden_states[1:]`` of the LLM).
        layer_indices: keep only these of them (indices or a slice).
        image_token_id: the image token; when ``None`` and ``find_image_token``, read from
            the model's config (``None`` when it has none).

    Raises:
        ValueError: when the layers cannot be found (the message says what to pass).
    """
    if layers is not None:
        found = layers(model) if callable(layers) and not isinstance(layers, nn.Module) else layers
        found = list(found)
        if not found or not all(isinstance(m, nn.Module) for m in found):
            raise ValueError("layers= must give a non-empty list of torch.nn.Module")
        modules = [unwrap_module(m) for m in found]
    else:
        modules = None
        for candidate in _candidate_models(model):
            try:
                modules = find_hidden_state_modules(candidate)
                break
            except (ValueError, TypeError, AttributeError):
                continue
        if modules is None:
            raise ValueError(
                f"could not find the LLM's decoder layers in {type(model).__name__}: pass layers= (a list of "
                "modules, or a function of the model returning it) and, unless the batch holds "
                "'vision_mask'/'text_mask', masks= (a function of the batch returning (vision_mask, text_mask))"
            )
    ids = select_layers(range(len(modules)), layer_indices)
    if image_token_id is None and find_image_token:
        image_token_id = _auto_image_token(model)
    return CaptureTargets([modules[i] for i in ids], ids, image_token_id)


# ---------------------------------------------------------------------------- masks
def masks_in_batch(batch: Any) -> tuple[Tensor, Tensor] | None:
    """``(batch["vision_mask"], batch["text_mask"])`` when a dict-like batch holds both."""
    if isinstance(batch, Mapping) and "vision_mask" in batch and "text_mask" in batch:
        return batch["vision_mask"].bool(), batch["text_mask"].bool()
    return None


@dataclass
class MaskRule:
    """How to tell vision from text tokens in a batch, tried in this order:

    1. ``masks(batch) -> (vision_mask, text_mask)`` when given;
    2. the batch's ``vision_mask`` / ``text_mask`` entries;
    3. :func:`~mir_lightning.models.transformers.build_masks` on ``input_ids`` with
       ``image_token_id`` (and the batch's ``attention_mask``, and ``position_ids`` /
       ``cu_seqlens`` as sample boundaries of packed rows), text per ``text_tokens``.
    """

    masks: MaskFn | None = None
    image_token_id: int | None = None
    text_tokens: str = "after_image"

    def __call__(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(vision_mask, text_mask)``, bool ``[B, T]``."""
        if self.masks is not None:
            vision, text = self.masks(batch)
            return vision.bool(), text.bool()
        found = masks_in_batch(batch)
        if found is not None:
            return found
        if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
            _refuse_spliced_layout(batch["input_ids"])
        if isinstance(batch, Mapping) and "input_ids" in batch and self.image_token_id is not None:
            return masks_from_batch(batch, self.image_token_id, text=self.text_tokens)
        raise ValueError(
            "cannot tell vision from text tokens in this batch: give the batch 'vision_mask' and 'text_mask' "
            "entries, or 'input_ids' with a model whose config has an image token id (or pass "
            "image_token_id=), or pass masks= (a function of the batch returning (vision_mask, text_mask))"
        )


def _refuse_spliced_layout(input_ids: Tensor) -> None:
    """Negative ids are placeholders that ``forward`` replaces (the original LLaVA code's
    ``-200``, one per image, becomes that image's features): the layers then see longer rows
    than ``input_ids``, so no image token id can mark them. Raise the fix instead of masks of
    the wrong shape.

    Raises:
        ValueError: when ``input_ids`` holds a negative id.
    """
    negative = input_ids[input_ids < 0]
    if negative.numel():
        raise ValueError(
            f"input_ids hold the negative id {int(negative[0])}: the image placeholder of the original LLaVA "
            "code (IMAGE_TOKEN_INDEX = -200), whose forward splices each image's features in its place, so the "
            "layers see longer rows than input_ids and image_token_id= cannot mark them. Pass "
            "masks=llava_mask_fn(tokens_per_image, max_length, padding_side) "
            "(from mir_lightning.models.llava import llava_mask_fn): it repeats that splice on the ids"
        )
