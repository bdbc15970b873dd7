"""Where hidden states come from: which modules to hook, forward hooks on them, and batch masks.

Shared by every path that measures MIR on a model's own forwards (``MIRProbe``, and
``MIRCallback`` on validation batches): layers and masks are resolved here only.
"""

from __future__ import annotations

import sys

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mir_lightning.models.llava import llava_masks
from mir_lightning.models.transformers import (
    HFLlavaSplice,
    find_hidden_state_modules,
    find_image_token_id,
    hf_llava_splice,
    masks_from_batch,
    unwrap_module,
)

MaskFn = Callable[[Any], "tuple[Tensor, Tensor]"]
LayersArg = Sequence[nn.Module] | Callable[[nn.Module], Sequence[nn.Module]] | None


def hidden_from_output(output: Any) -> Tensor:
    """The hidden-state tensor ``[B, T, D]`` of a decoder layer's (or norm's) output (a
    ``DTensor`` under tensor / sequence parallelism: :func:`local_tokens` takes its local part)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise TypeError(f"cannot read hidden states from a module output of type {type(output).__name__}")


@dataclass(frozen=True)
class LocalTokens:
    """The tokens of one layer output ``[B, T, D]`` that this rank measures.

    Attributes:
        hidden: plain tensor ``[b, t, D]``: this rank's rows and positions of the output.
        rows: ``(start, stop)`` of those rows among the batch's ``B``.
        positions: ``(start, stop)`` of those positions among the batch's ``T``.
        counted: False on a replica whose tokens a peer measures (only mesh coordinate 0
            of each replicated mesh dimension counts them).
        mesh_size: ranks of the output's ``DTensor`` mesh (0 for a plain tensor).
    """

    hidden: Tensor
    rows: tuple[int, int]
    positions: tuple[int, int]
    counted: bool
    mesh_size: int

    def masks(self, vision_mask: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The slices of the batch's bool ``[B, T]`` masks that match :attr:`hidden`."""
        (r0, r1), (p0, p1) = self.rows, self.positions
        return vision_mask[r0:r1, p0:p1], text_mask[r0:r1, p0:p1]


_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")  # torch >= 2.4; 2.1-2.3


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor``. Nothing is imported: a DTensor exists only once its
    module is loaded (an import here would cost ~0.5 s, and fail under torch.compile on torch
    2.1, which has ``torch.distributed.tensor`` without ``DTensor``)."""
    for name in _DTENSOR_MODULES:
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None and isinstance(tensor, cls):
            return True
    return False


def local_tokens(hidden: Tensor) -> LocalTokens:
    """This rank's part of a layer output ``[B, T, D]``: a plain tensor is all of it; a
    ``DTensor`` (tensor / sequence parallelism) gives its local shard.

    A ``DTensor`` may be sharded along the batch (``Shard(0)``) or the sequence
    (``Shard(1)``) over any of its mesh dimensions, with ``torch.chunk``-style uneven shards
    (``ceil(T / n)`` positions each, the last ones shorter or empty), and replicated over the
    others (only coordinate 0 counts: each token is measured once over the mesh).

    Raises:
        ValueError: a placement that cannot be measured per token (sharded along the hidden
            dimension, a pending ``Partial`` sum, or a layout other than ``torch.chunk``'s).
    """
    if not is_dtensor(hidden):
        shape = (*hidden.shape, 0, 0)  # a malformed output is the metric's to refuse
        return LocalTokens(hidden, (0, shape[0]), (0, shape[1]), True, 0)
    from torch.distributed.tensor import Replicate, Shard

    if hidden.ndim != 3:
        raise ValueError(f"a layer output must be [B, T, D], got a DTensor of shape {tuple(hidden.shape)}")

    mesh = hidden.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError("a layer output is a DTensor on a device mesh this rank is not part of")
    spans = [[0, hidden.shape[0]], [0, hidden.shape[1]]]  # (start, length) of rows, positions
    counted = True
    for mesh_dim, (placement, coord) in enumerate(zip(hidden.placements, coordinate)):
        if isinstance(placement, Replicate):
            counted = counted and coord == 0
        elif type(placement) is Shard and placement.dim % hidden.ndim in (0, 1):
            span = spans[placement.dim % hidden.ndim]
            chunk = -(-span[1] // mesh.size(mesh_dim))
            offset = min(coord * chunk, span[1])
            span[0], span[1] = span[0] + offset, min(chunk, span[1] - offset)
        else:
            raise ValueError(
                f"a layer output is a DTensor placed as {placement} on mesh dimension {mesh_dim}: MIR needs whole "
                "tokens, so a layer output must be replicated or sharded along the batch or the sequence "
                "(Shard(0) / Shard(1)); redistribute it in the parallel plan (e.g. RowwiseParallel(output_layouts="
                "Shard(1)) or Replicate()) or hook other modules (layers=)"
            )
    local = hidden.to_local()
    if tuple(local.shape[:2]) != (spans[0][1], spans[1][1]):
        raise ValueError(
            f"a layer output DTensor {tuple(hidden.shape)} placed as {hidden.placements} has a local shard of "
            f"{tuple(local.shape)}, not the torch.chunk layout's {(spans[0][1], spans[1][1])}: its rows and "
            "positions cannot be matched with the masks"
        )
    return LocalTokens(local, (spans[0][0], sum(spans[0])), (spans[1][0], sum(spans[1])), counted, mesh.size())


class OutputLayout:
    """How one measurement's layer outputs were spread over ranks: plain tensors (each rank
    holds whole outputs) or DTensors on a mesh of :attr:`mesh_size` ranks (0: none seen).

    :meth:`add` refuses what cannot be counted once per token: a plain output shorter than the
    masks along one of their two dimensions (a sequence-parallel shard whose place is unknown),
    DTensors on meshes of different sizes, or plain tensors and DTensors in one measurement.
    """

    def __init__(self) -> None:
        self.mesh_size = 0
        self.plain = False

    def add(self, tokens: LocalTokens, layer_id: int, batch_shape: tuple[int, ...]) -> None:
        """Record layer ``layer_id``'s output; ``batch_shape``: the masks' ``(B, T)``. Raises ValueError."""
        if tokens.mesh_size == 0 and tokens.hidden.ndim == 3:
            shape = tuple(tokens.hidden.shape[:2])
            shorter = [n < m for n, m in zip(shape, batch_shape)]
            if sum(shorter) == 1 and all(n <= m for n, m in zip(shape, batch_shape)):
                raise ValueError(
                    f"layer {layer_id}'s output is {shape} where the masks are {batch_shape}: a sequence-parallel "
                    "shard as a plain tensor, whose place in the sequence is unknown; make the layer outputs "
                    "DTensors (use_local_output=False in the parallel styles that produce them) or hook modules "
                    "whose outputs hold the whole sequence (layers=)"
                )
        if tokens.mesh_size == 0:
            self.plain = True
        elif self.mesh_size not in (0, tokens.mesh_size):
            raise ValueError(
                f"layer outputs are DTensors on meshes of {self.mesh_size} and {tokens.mesh_size} ranks: "
                "the probe merges over one data-parallel x tensor-parallel mesh"
            )
        else:
            self.mesh_size = tokens.mesh_size
        if self.plain and self.mesh_size:
            raise ValueError(
                f"some hooked layers give plain tensors and others DTensors (layer {layer_id}): the probe cannot "
                "count each token once; hook layers whose outputs are all DTensors or all plain (layers=)"
            )


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

        # under torch.compile the hook runs eagerly (a graph break while the probe runs): the
        # metric is never traced into the model's graph (torch 2.1's dynamo failed on it). A
        # compiled model has loaded dynamo; without it nothing is imported (that costs ~1.7 s)
        dynamo = sys.modules.get("torch._dynamo")
        return dynamo.disable(hook) if dynamo is not None else hook

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
        splice: how the model splices image features into its decoder's input, when it
            does (a Hugging Face LLaVA of transformers < 4.44), else ``None``.
    """

    modules: list[nn.Module]
    layer_ids: list[int]
    image_token_id: int | None
    splice: HFLlavaSplice | None = None


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
    splice = hf_llava_splice(model) if find_image_token else None
    return CaptureTargets([modules[i] for i in ids], ids, image_token_id, splice)


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
    3. for a model that splices one ``<image>`` token per image into its features
       (``splice``, a Hugging Face LLaVA of transformers < 4.44):
       :func:`~mir_lightning.models.llava.llava_masks` on ``input_ids`` with its layout;
    4. :func:`~mir_lightning.models.transformers.build_masks` on ``input_ids`` with
       ``image_token_id`` (and the batch's ``attention_mask``, and ``position_ids`` /
       ``cu_seqlens`` as sample boundaries of packed rows), text per ``text_tokens``.
    """

    masks: MaskFn | None = None
    image_token_id: int | None = None
    text_tokens: str = "after_image"
    splice: HFLlavaSplice | None = None

    def __call__(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(vision_mask, text_mask)``, bool ``[B, T]``."""
        if self.masks is not None:
            vision, text = self.masks(batch)
            return vision.bool(), text.bool()
        found = masks_in_batch(batch)
        if found is not None:
            return found
        if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
            ids = batch["input_ids"]
            if self.splice is not None and self.splice.applies_to(ids):
                return llava_masks(ids, batch.get("attention_mask"), tokens_per_image=self.splice.tokens_per_image,
                                   image_token_index=self.splice.image_token_index,
                                   padding_side=self.splice.padding_side(ids), text=self.text_tokens)
            _refuse_spliced_layout(ids)
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
