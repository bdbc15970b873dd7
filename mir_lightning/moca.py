"""MoCa (modality calibration, Huang et al., arXiv 2410.07167) as a plug-in for Hugging Face VLMs.

MoCa is the MIR paper's companion module: a learnable affine map per decoder layer,
applied only at vision-token positions at the end of the layer,

    h <- (1 - m) * h + m * (scale[k] * h + shift[k]),    scale[k], shift[k] in R^D,

with ``m`` the vision-token mask, ``scale = 1`` and ``shift = 0`` at initialisation
(identity), computed in float32 and cast back to the hidden states' dtype. It is trained
together with the projector during pre-training.

:meth:`MoCa.attach` adds it to an unmodified model with hooks: the parameters live in a
sub-module ``model.moca`` (so ``model.parameters()``, optimizers built afterwards,
``state_dict()`` and checkpoints include them), a forward pre-hook on the model reads the
input ids of each forward and builds the vision mask, and a forward hook on every decoder
layer returns the calibrated output.

Hook order: the layer hooks are registered with ``prepend=True``, so they run before
every other forward hook on the layer, registered before or after MoCa (unless that
hook itself asks for ``prepend=True`` later). Forward hooks
that run later (MIR's :class:`~mir_lightning.capture.LayerCapture`, transformers'
``output_hidden_states`` recorder) receive the calibrated output, and the next layer and
the final norm receive it as their input. MIR measured with MoCa attached therefore sees
the calibrated hidden states, as the authors' model reports them.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mir_lightning.capture import infer_hidden_size
from mir_lightning.models.transformers import (
    build_masks,
    find_decoder_layers,
    find_final_norm,
    find_image_token_id,
    unwrap_hf_model,
    unwrap_module,
)

__all__ = ["PROJECTOR_NAMES", "MoCa", "VisionMaskFn", "load_moca_state", "multimodal_projector"]

VisionMaskFn = Callable[[dict[str, Any]], Tensor]
"""``fn(inputs) -> vision_mask``: ``inputs`` maps the names of the model's forward arguments
to the values of the current call; the result is bool ``[B, T]``."""

ATTRIBUTE = "moca"


class MoCa(nn.Module):
    """Per-layer scale and shift of vision-token hidden states (the MIR paper's MoCa).

    Parameters (float32): ``scale`` ``[L, D]`` (initialised to 1) and ``shift`` ``[L, D]``
    (initialised to 0), row ``k`` for the ``k``-th hooked decoder layer.

    Build it with :meth:`attach`; undo with :meth:`remove`. ``moca(layer, hidden,
    vision_mask)`` is the calibration itself, usable without hooks.
    """

    def __init__(self, num_layers: int, hidden_size: int) -> None:
        super().__init__()
        if int(num_layers) < 1 or int(hidden_size) < 1:
            raise ValueError(f"num_layers and hidden_size must be positive, got {num_layers}, {hidden_size}")
        self.scale = nn.Parameter(torch.ones(int(num_layers), int(hidden_size)))
        self.shift = nn.Parameter(torch.zeros(int(num_layers), int(hidden_size)))
        # Plain attributes (not sub-modules, not state): the model MoCa is attached to, the
        # hook handles, and the vision mask of the forward in progress.
        self._owner: nn.Module | None = None
        self._handles: list[Any] = []
        self._vision_mask: Tensor | None = None
        self._inputs_name = "the model"

    @property
    def num_layers(self) -> int:
        return self.scale.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.scale.shape[1]

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, hidden_size={self.hidden_size}"

    # ------------------------------------------------------------------ the map itself
    def forward(self, layer: int, hidden: Tensor, vision_mask: Tensor) -> Tensor:
        """Calibrate the output of decoder layer ``layer``.

        Args:
            layer: row of ``scale`` / ``shift`` to use.
            hidden: ``[B, T, D]``, any float dtype.
            vision_mask: bool ``[B, T]``; True at vision-token positions.

        Returns:
            ``[B, T, D]`` in ``hidden``'s dtype: ``scale[layer] * hidden + shift[layer]``
            (computed in float32, or float64 for float64 inputs) at vision positions,
            ``hidden`` unchanged (bit for bit) elsewhere.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MoCa expects hidden states [B, T, {self.hidden_size}], got shape {tuple(hidden.shape)}"
            )
        if vision_mask.dtype != torch.bool or tuple(vision_mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"the vision mask must be bool [B, T] = {list(hidden.shape[:2])} like the hidden states, "
                f"got {vision_mask.dtype} {list(vision_mask.shape)} (read from the inputs of {self._inputs_name})"
            )
        compute = torch.promote_types(hidden.dtype, torch.float32)
        scale = self.scale[layer].to(device=hidden.device, dtype=compute)
        shift = self.shift[layer].to(device=hidden.device, dtype=compute)
        calibrated = (hidden.to(compute) * scale + shift).to(hidden.dtype)
        return torch.where(vision_mask.to(hidden.device).unsqueeze(-1), calibrated, hidden)

    # ------------------------------------------------------------------ attach / remove
    @classmethod
    def attach(
        cls,
        model: nn.Module,
        *,
        layers: Sequence[nn.Module] | None = None,
        image_token_id: int | None = None,
        vision_mask: VisionMaskFn | None = None,
        hidden_size: int | None = None,
    ) -> MoCa:
        """Add MoCa to ``model`` as ``model.moca`` and hook it into the decoder layers.

        Attach before building the optimizer, so that it holds the new parameters. The
        parameters are float32 on the layers' device; ``model.to(dtype)`` afterwards converts
        them too (``model.moca.float()`` restores float32; the map is computed in float32
        either way).

        Args:
            model: a Hugging Face VLM (or a wrapper holding one: a LightningModule, a PEFT
                model), or any module when ``layers`` and the vision mask are given.
            layers: the decoder layers to calibrate, in order; default: every decoder layer
                of the language model (not the final norm). Each layer's output must be a
                ``[B, T, D]`` tensor or a tuple starting with one.
            image_token_id: id of the image placeholder token; default: read from the
                model's config. Vision positions are ``input_ids == image_token_id``
                (attended positions only when a 2-D ``attention_mask`` is passed).
            vision_mask: instead of ``image_token_id``, ``fn(inputs) -> bool [B, T]`` called
                at every forward with the forward's arguments by name.
            hidden_size: D; default: the language model's config ``hidden_size``.

        The forward whose inputs are read is the Hugging Face model's inside ``model`` when
        there is one, else ``model``'s own.

        Returns:
            The attached :class:`MoCa` (also ``model.moca``).

        Raises:
            RuntimeError: when ``model`` already holds a MoCa (attaching twice).
            ValueError: when the layers, the image token or the hidden size cannot be found.
        """
        if any(isinstance(m, MoCa) for m in model.modules()):
            raise RuntimeError(f"{type(model).__name__} already has MoCa attached; call model.moca.remove() first")
        if hasattr(model, ATTRIBUTE):
            raise RuntimeError(f"{type(model).__name__} already has an attribute {ATTRIBUTE!r}; cannot attach MoCa")
        try:
            hf_model: nn.Module | None = unwrap_hf_model(model)
        except ValueError as err:
            if layers is None:
                raise ValueError(
                    f"MoCa finds the decoder layers of Hugging Face models only ({err}). For other models pass "
                    "MoCa.attach(model, layers=[...], vision_mask=lambda inputs: <bool [B, T]>, hidden_size=D)"
                ) from err
            hf_model = None
        layers = list(find_decoder_layers(model) if layers is None else layers)
        if not layers or not all(isinstance(layer, nn.Module) for layer in layers):
            raise ValueError("layers must be a non-empty sequence of nn.Module")
        if any(_is_moca_hook(hook) for layer in layers for hook in layer._forward_hooks.values()):
            raise RuntimeError("these decoder layers are already calibrated by a MoCa attached to another module")
        if vision_mask is None and image_token_id is None:
            image_token_id = find_image_token_id(hf_model if hf_model is not None else model)
        if hidden_size is None:
            hidden_size = _hidden_size(model, hf_model, layers)
        inputs_module = hf_model if hf_model is not None else model

        moca = cls(len(layers), hidden_size)
        device = next((p.device for layer in layers for p in layer.parameters()), None)
        if device is not None:
            moca.to(device)
        model.add_module(ATTRIBUTE, moca)
        object.__setattr__(moca, "_owner", model)  # a plain reference, not a sub-module (no cycle)
        moca._inputs_name = f"{type(inputs_module).__name__}.forward"
        read = functools.partial(
            moca._read_vision_mask, inspect.signature(inputs_module.forward), image_token_id, vision_mask
        )
        moca._handles = [
            inputs_module.register_forward_pre_hook(read, with_kwargs=True),
            inputs_module.register_forward_hook(moca._forget_vision_mask, always_call=True),
            *(
                layer.register_forward_hook(functools.partial(moca._calibrate_output, k), prepend=True)
                for k, layer in enumerate(layers)
            ),
        ]
        return moca

    def remove(self) -> None:
        """Remove the hooks and ``model.moca``: the model computes exactly what it did before.

        Calling it again does nothing.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._vision_mask = None
        owner, self._owner = self._owner, None
        if owner is not None and owner._modules.get(ATTRIBUTE) is self:
            delattr(owner, ATTRIBUTE)

    # ------------------------------------------------------------------ hooks
    def _read_vision_mask(
        self,
        signature: inspect.Signature,
        image_token_id: int | None,
        mask_fn: VisionMaskFn | None,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Forward pre-hook on the model: the vision mask of this forward, from its inputs."""
        inputs = _inputs_by_name(signature, args, kwargs)
        if mask_fn is not None:
            mask = mask_fn(inputs)
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
                raise TypeError(f"MoCa's vision_mask function must return a bool tensor [B, T], got {_describe(mask)}")
        else:
            input_ids = inputs.get("input_ids")
            if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
                raise ValueError(
                    f"MoCa finds the image tokens in the input_ids of {type(module).__name__}.forward, but this "
                    f"call passed input_ids={_describe(input_ids)}; pass the token ids, or attach with "
                    "vision_mask=lambda inputs: <bool [B, T] tensor>"
                )
            attention_mask = inputs.get("attention_mask")
            if not (isinstance(attention_mask, Tensor) and attention_mask.shape == input_ids.shape):
                attention_mask = None
            mask = build_masks(input_ids, int(image_token_id), attention_mask)[0]
        self._vision_mask = mask

    def _forget_vision_mask(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook on the model (also run on errors): no mask outlives its forward."""
        self._vision_mask = None

    def _calibrate_output(self, layer: int, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook on decoder layer ``layer``: the same output with calibrated hidden states."""
        mask = self._vision_mask
        if mask is None:
            raise RuntimeError(
                f"MoCa: decoder layer {layer} ({type(module).__name__}) ran outside {self._inputs_name}, whose "
                "inputs give the vision mask; call the whole model, or attach MoCa to the module you call"
            )
        if isinstance(output, Tensor):
            return self(layer, output, mask)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            return type(output)([self(layer, output[0], mask), *output[1:]])
        raise TypeError(
            f"MoCa cannot calibrate decoder layer {layer}: its output is {type(output).__name__}, "
            "expected a [B, T, D] tensor or a tuple starting with one"
        )


def _inputs_by_name(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of one forward call by parameter name (``**kwargs`` flattened in)."""
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:  # arguments the forward itself will reject
        return dict(kwargs)
    inputs = dict(bound.arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in inputs:
            inputs.update(inputs.pop(name))
    return inputs


PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "visual.merger")
"""Where vision-language models keep the projector from vision features to the LLM's width:
LLaVA, LLaVA-NeXT, PaliGemma, Gemma 3 (``multi_modal_projector``), the original LLaVA code
(``mm_projector``), Idefics3/SmolVLM (``connector``), Qwen2-VL/Qwen2.5-VL (``visual.merger``)."""


def multimodal_projector(model: nn.Module) -> nn.Module:
    """The vision-to-language projector of ``model``, the module pre-training trains.

    transformers 5 moved it from the top-level model (``model.multi_modal_projector`` in 4.x)
    into the base model (``model.model.multi_modal_projector``); this finds it in either place
    (and inside training wrappers and peft): the shallowest sub-module whose name ends with one
    of :data:`PROJECTOR_NAMES`.

    Raises:
        ValueError: no such sub-module (then name it yourself, e.g. ``model.my_projector``).
    """
    try:
        root = unwrap_hf_model(model)
    except ValueError:  # not a Hugging Face model: look inside it as it is
        root = unwrap_module(model)
    names = [(name.count("."), name, module) for name, module in root.named_modules()
             if any(name == key or name.endswith("." + key) for key in PROJECTOR_NAMES)]
    if not names:
        raise ValueError(
            f"no projector in {type(model).__name__}: no sub-module named {' / '.join(PROJECTOR_NAMES)}; "
            "pass the projector's parameters yourself"
        )
    return min(names, key=lambda entry: entry[:2])[2]


def load_moca_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """MoCa's parameters from a checkpoint of a model trained with it, for ``moca.load_state_dict``.

    Args:
        path: a ``save_pretrained`` directory (``model.safetensors``, a sharded
            ``model.safetensors.index.json`` or ``pytorch_model.bin``), a ``.safetensors``
            file, or a ``torch.save`` file (a state dict, or a Lightning checkpoint with a
            ``"state_dict"`` entry).

    Returns:
        ``{"scale": [L, D], "shift": [L, D]}`` from the keys ``<prefix>moca.scale`` and
        ``<prefix>moca.shift`` (``model.moca`` of a LightningModule gives ``model.moca.``).

    Raises:
        FileNotFoundError: when ``path`` holds no checkpoint file.
        KeyError: when the checkpoint holds no MoCa parameters, or those of several models.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        names = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")
        found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"no {' / '.join(names)} in {path}")
        path = found[0]
    if path.endswith(".safetensors.index.json"):
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        folder = os.path.dirname(path)
        shards = {os.path.join(folder, shard) for key, shard in weight_map.items() if _moca_key(key)}
        tensors = {k: v for shard in sorted(shards) for k, v in _read_safetensors(shard).items()}
    elif path.endswith(".safetensors"):
        tensors = _read_safetensors(path)
    else:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
            tensors = tensors["state_dict"]
    matches = {key: value for key, value in tensors.items() if _moca_key(key)}
    prefixes = {key.rsplit(".", 1)[0] for key in matches}
    if len(prefixes) != 1 or len(matches) != 2:
        found = sorted(matches) or "none"
        raise KeyError(f"expected one pair of MoCa parameters (<prefix>moca.scale, <prefix>moca.shift) in {path}, "
                       f"found {found}")
    return {key.rsplit(".", 1)[1]: value for key, value in matches.items()}


def _moca_key(key: str) -> bool:
    return key.split(".")[-2:] in (["moca", "scale"], ["moca", "shift"])


def _read_safetensors(path: str) -> dict[str, Tensor]:
    """The MoCa tensors of one safetensors file (read without loading the others)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys() if _moca_key(key)}


def _is_moca_hook(hook: Any) -> bool:
    """True for a layer hook installed by :meth:`MoCa.attach`."""
    return isinstance(hook, functools.partial) and isinstance(getattr(hook.func, "__self__", None), MoCa)


def _hidden_size(model: nn.Module, hf_model: nn.Module | None, layers: Sequence[nn.Module]) -> int:
    """D from the language model's config, else from the final norm's weight or the layers."""
    if hf_model is not None:
        config = hf_model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for cfg in (text_config, config):
            size = getattr(cfg, "hidden_size", None)
            if isinstance(size, int) and size > 0:
                return size
        norm = find_final_norm(hf_model)
        size = infer_hidden_size([norm]) if norm is not None else None
        if size:
            return size
    size = infer_hidden_size(layers)
    if size:
        return size
    raise ValueError(
        f"cannot tell the hidden size of {type(model).__name__}'s decoder layers; pass MoCa.attach(..., hidden_size=D)"
    )


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__ if value is not None else "None"
