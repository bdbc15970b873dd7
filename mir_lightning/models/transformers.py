"""Locate MIR inputs inside Hugging Face ``transformers`` models.

MIR is measured on the outputs of the K decoder layers of the language model, in the
convention of ``outputs.hidden_states[1:]`` (the embedding output is excluded and the
last entry is taken *after* the final norm, as the official MIR code does). This module
finds the modules whose forward outputs reproduce exactly those tensors, so that a
forward hook can collect them without ``output_hidden_states=True``, and builds the
vision / text token masks from ``input_ids``.

Text tokens ("after_image", the official convention) are all attended non-image tokens
after the first image token of a row. With layouts that put structural tokens around or
between image tokens (Qwen2-VL ``<|vision_end|>``, Idefics3/SmolVLM
``<fake_token_around_image>`` and, with image splitting, row/column markers, Gemma 3
``<end_of_image>``), those count as text, like any non-image token after the first image
token. LLaVA-NeXT's image-newline features sit at image-token positions and count as vision.

Verified numerically (tests/test_integration_transformers.py) on tiny random models of
LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, PaliGemma and Gemma 3, and on
bare causal LMs (Llama).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "find_decoder_layers",
    "find_final_norm",
    "find_hidden_state_modules",
    "HFLlavaSplice",
    "find_image_token_id",
    "hf_llava_splice",
    "build_masks",
    "masks_from_batch",
    "sample_starts",
    "unwrap_hf_model",
    "unwrap_module",
    "TEXT_MODES",
]

TEXT_MODES = ("after_image", "all")

# Attribute names, tried in order, for the decoder-layer list and the final norm of a
# Hugging Face decoder stack (Llama/Qwen/Gemma/Mistral/Phi: ``layers`` + ``norm``;
# GPT-2/Bloom/Falcon: ``h`` + ``ln_f``; OPT: ``decoder.layers`` + ``final_layer_norm``).
_LAYER_ATTRS = ("layers", "h", "blocks")
_NORM_ATTRS = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm", "norm_f")
# Sub-module names that may hold the language model inside a multimodal wrapper.
_LM_ATTRS = ("language_model", "text_model", "llm", "decoder", "model", "transformer")
_IMAGE_TOKEN_ATTRS = ("image_token_id", "image_token_index", "image_token_ids")

_UNSUPPORTED_HINT = (
    "Pass the layers and masks explicitly instead (arguments of MIRProbe, MIRCallback and MIRTrainerCallback): "
    "layers=[module_1, ..., module_K] or layers=lambda model: [...], "
    "masks=lambda batch: (vision_mask, text_mask), where each module's forward output "
    "(or the first element of its output tuple) is a [B, T, D] hidden state and the masks "
    "are bool [B, T]; for the command line, load the model with a supported architecture "
    "or choose the hidden states to use with --layers."
)


# Attributes through which training wrappers hold the module they run: FSDP1
# (``FullyShardedDataParallel``), activation checkpointing (``CheckpointWrapper``),
# ``torch.compile`` (``OptimizedModule``). DDP and DeepSpeed hold it as ``module``.
_WRAPPED_ATTRS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_MODULE_HOLDERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module a training wrapper runs: through FSDP1, activation-checkpoint wrappers,
    ``torch.compile``, DDP and DeepSpeed engines (nested in any order); ``module`` itself when
    it is none of those. FSDP2 (``fully_shard``) keeps the module object, so nothing to unwrap.
    """
    for _ in range(16):
        inner = None
        for attr in _WRAPPED_ATTRS:
            candidate = module.__dict__.get("_modules", {}).get(attr)
            if isinstance(candidate, nn.Module):
                inner = candidate
                break
        if inner is None and type(module).__name__ in _MODULE_HOLDERS:
            candidate = module.__dict__.get("_modules", {}).get("module")
            inner = candidate if isinstance(candidate, nn.Module) else None
        if inner is None:
            return module
        module = inner
    return module


def _is_hf_model(module: Any) -> bool:
    """True for a ``transformers.PreTrainedModel`` (checked without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__) and hasattr(module, "config")


def unwrap_hf_model(model: nn.Module) -> nn.Module:
    """Return the outermost Hugging Face model inside ``model``.

    ``model`` may itself be a ``PreTrainedModel``, or a wrapper (a LightningModule, a PEFT
    model, a plain ``nn.Module``) that holds exactly one outermost ``PreTrainedModel``;
    when several are held, the one whose config names an image token is preferred.

    Training wrappers around it (DDP, DeepSpeed, FSDP1/FSDP2, activation checkpointing,
    ``torch.compile``, peft) are seen through.

    Raises:
        ValueError: when no (or an ambiguous set of) Hugging Face model is found.
    """
    model = unwrap_module(model)
    if _is_hf_model(model):
        return model
    outer: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if not name or not _is_hf_model(mod):
            continue
        mod = unwrap_module(mod)
        if any(name.startswith(prev + ".") for prev, _ in outer):
            continue
        outer.append((name, mod))
    if len(outer) == 1:
        return outer[0][1]
    if len(outer) > 1:
        with_image = [m for _, m in outer if _image_token_from_config(m.config) is not None]
        if len(with_image) == 1:
            return with_image[0]
        # e.g. a hand-built VLM: a Hugging Face LM next to a Hugging Face vision encoder
        with_decoder = [m for _, m in outer if _find_decoder_stack(m) is not None]
        if len(with_decoder) == 1:
            return with_decoder[0]
        names = ", ".join(n for n, _ in outer)
        raise ValueError(
            f"{type(model).__name__} holds several Hugging Face models ({names}); cannot tell which "
            f"one is the vision-language model. {_UNSUPPORTED_HINT}"
        )
    raise ValueError(
        f"{type(model).__name__} is not (and does not contain) a Hugging Face transformers model, "
        f"so its decoder layers cannot be found automatically. {_UNSUPPORTED_HINT}"
    )


def _layer_list(module: nn.Module) -> nn.ModuleList | None:
    for attr in _LAYER_ATTRS:
        layers = getattr(module, attr, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    return None


def _find_decoder_stack(model: nn.Module) -> nn.Module | None:
    """The module that owns the decoder layers (and the final norm) of the language model."""
    seen: set[int] = set()
    frontier: list[nn.Module] = []
    # 1. transformers' own lookup (``get_decoder``), followed while it moves.
    cur: Any = model
    for _ in range(6):
        get_decoder = getattr(cur, "get_decoder", None)
        if not callable(get_decoder):
            break
        try:
            nxt = get_decoder()
        except Exception:  # noqa: BLE001 - some models raise for a missing decoder
            break
        if not isinstance(nxt, nn.Module) or nxt is cur:
            break
        cur = nxt
        frontier.append(cur)
    frontier.append(model)
    # 2. Breadth-first walk through the usual language-model attribute names.
    while frontier:
        mod = frontier.pop(0)
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        if _layer_list(mod) is not None and not _looks_like_vision(mod):
            return mod
        for attr in _LM_ATTRS:
            child = getattr(mod, attr, None)
            if isinstance(child, nn.Module):
                frontier.append(child)
    return None


def _looks_like_vision(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return any(k in name for k in ("vision", "visual", "siglip", "clip", "vit", "encoder"))


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the decoder layers (``nn.ModuleList`` of K blocks) of the model's language model.

    Accepts a Hugging Face VLM (``...ForConditionalGeneration``), its base model, a bare
    causal LM (``LlamaForCausalLM``), a decoder stack (``LlamaModel``), or a wrapper holding one.

    Raises:
        ValueError: for an architecture whose decoder layers cannot be located; the
            message names the ``layers=`` / ``masks=`` arguments every adapter takes.
    """
    hf = unwrap_hf_model(model)
    stack = _find_decoder_stack(hf)
    layers = _layer_list(stack) if stack is not None else None
    if layers is None:
        raise ValueError(
            f"Unsupported architecture {type(hf).__name__}: could not find the decoder layers of "
            f"its language model (looked for get_decoder() and attributes {_LM_ATTRS} holding "
            f"a ModuleList named {_LAYER_ATTRS}). {_UNSUPPORTED_HINT}"
        )
    return layers


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """Return the final norm applied after the last decoder layer, or ``None`` if there is none."""
    hf = unwrap_hf_model(model)
    stack = _find_decoder_stack(hf)
    if stack is None:
        return None
    for attr in _NORM_ATTRS:
        norm = getattr(stack, attr, None)
        if isinstance(norm, nn.Module):
            return norm
    return None


def find_hidden_state_modules(model: nn.Module) -> list[nn.Module]:
    """Return K modules whose forward outputs equal ``outputs.hidden_states[1:]``.

    Through training wrappers: the modules returned are the real decoder layers (and norm),
    not their FSDP1 / activation-checkpoint / compile wrappers, so forward hooks on them see
    the layer's output however the model is wrapped.

    That is ``decoder_layers[:-1] + [final_norm]``: Hugging Face replaces the output of
    the last decoder layer by the final-norm output in ``hidden_states`` (the official
    MIR code keeps that). A decoder layer's output may be a tensor ``[B, T, D]`` or a
    tuple whose first element is that tensor; the norm returns a tensor ``[B, T, D]``.
    When the language model has no final norm, or its config sets
    ``tie_last_hidden_states=False``, the K decoder layers are returned as they are.

    Raises:
        ValueError: for an unsupported architecture (the message names the
            ``layers=`` / ``masks=`` arguments every adapter takes, and ``--layers``).
    """
    layers = find_decoder_layers(model)
    norm = find_final_norm(model)
    stack = _find_decoder_stack(unwrap_hf_model(model))
    tie_last = getattr(getattr(stack, "config", None), "tie_last_hidden_states", None)
    if norm is None or tie_last is False:
        return [unwrap_module(layer) for layer in layers]
    return [*(unwrap_module(layer) for layer in list(layers)[:-1]), unwrap_module(norm)]


def _image_token_from_config(config: Any) -> int | None:
    if config is None:
        return None
    for obj in (config, getattr(config, "text_config", None)):
        if obj is None:
            continue
        for attr in _IMAGE_TOKEN_ATTRS:
            try:
                value = getattr(obj, attr, None)
            except Exception:  # noqa: BLE001 - deprecated properties may raise
                value = None
            if isinstance(value, (list, tuple)):
                value = value[0] if len(value) == 1 else None
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = int(value.item())
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return int(value)
    return None


def _image_token_from_tokenizer(tokenizer: Any) -> int | None:
    """Id of ``tokenizer.image_token`` when the tokenizer names one and knows it, else ``None``."""
    name = getattr(tokenizer, "image_token", None) if tokenizer is not None else None
    if not isinstance(name, str) or not hasattr(tokenizer, "convert_tokens_to_ids"):
        return None
    try:
        token = tokenizer.convert_tokens_to_ids(name)
    except Exception:  # noqa: BLE001
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(token, int) and token >= 0 and token != unk:
        return token
    return None


def find_image_token_id(model_or_config: Any) -> int:
    """Return the id of the image placeholder token (the positions that hold image features).

    Accepts a model (or a wrapper holding one), a config, or a processor; reads
    ``image_token_id`` / ``image_token_index`` from the object, its ``config`` and its
    ``text_config``.

    Raises:
        ValueError: when no image token id is found; the message names ``image_token_id``.
    """
    obj = model_or_config
    if isinstance(obj, nn.Module):
        try:
            obj = unwrap_hf_model(obj)
        except ValueError:
            pass
    candidates = [getattr(obj, "config", None)]
    if not isinstance(obj, nn.Module):
        token = _image_token_from_tokenizer(getattr(obj, "tokenizer", None))
        if token is not None:  # a processor: its tokenizer's image token (Gemma 3's processor
            return token  # exposes the <start_of_image> id as ``image_token_id``)
        candidates.append(obj)  # a config, or a processor with ``image_token_id``
    for cand in candidates:
        token = _image_token_from_config(cand)
        if token is not None:
            return token
    raise ValueError(
        f"{type(obj).__name__} has no image token in its config (looked for "
        f"{', '.join(_IMAGE_TOKEN_ATTRS)}); MIR needs the positions of the image features. "
        "Pass image_token_id=... explicitly, or masks=lambda batch: (vision_mask, text_mask) "
        "(arguments of MIRProbe, MIRCallback and MIRTrainerCallback)."
    )


def sample_starts(
    shape: tuple[int, int],
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Where packed samples begin: bool ``[B, T]``, True at the first token of each sample.

    Args:
        shape: ``(B, T)`` of the batch.
        position_ids: ``[B, T]`` (or multimodal rotary ids ``[R, B, T]``, whose first row is
            read): a sample begins where the position does not grow (``p[t] <= p[t-1]``,
            e.g. a reset to 0), as in rows packed by ``DataCollatorWithFlattening``.
        cu_seqlens: ``[S + 1]`` cumulative sample lengths over the row-major flattened batch
            (flash-attention's varlen layout): samples begin at ``cu_seqlens[:-1]``.

    Returns:
        the start mask (every row's first token is a start), or ``None`` when neither is given.
    """
    batch, length = shape
    if position_ids is None and cu_seqlens is None:
        return None
    starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if position_ids is not None:
        pos = position_ids.to(device)
        if pos.dim() == 3:
            pos = pos[0]
        if tuple(pos.shape) != (batch, length):
            raise ValueError(f"position_ids must be [B, T] = {(batch, length)} (or [R, B, T]), got {tuple(position_ids.shape)}")
        starts[:, 1:] |= pos[:, 1:] <= pos[:, :-1]
    if cu_seqlens is not None:
        bounds = cu_seqlens.to(device=device, dtype=torch.long).flatten()
        if bounds.numel() < 1 or int(bounds[-1]) > batch * length or bool((bounds[1:] < bounds[:-1]).any()):
            raise ValueError(
                f"cu_seqlens must be non-decreasing offsets within the {batch * length} flattened tokens, got {bounds.tolist()}"
            )
        flat = starts.flatten()
        inside = bounds[:-1][bounds[:-1] < batch * length]
        flat[inside] = True
        starts = flat.view(batch, length)
    return starts


def build_masks(
    input_ids: torch.Tensor,
    image_token_id: int,
    attention_mask: torch.Tensor | None = None,
    text: str = "after_image",
    *,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision and text token masks from token ids.

    Args:
        input_ids: integer tensor ``[B, T]``.
        image_token_id: id of the image placeholder token.
        attention_mask: optional ``[B, T]`` (bool or 0/1 integers); 0 marks padding, which is
            never in either mask. Left and right padding both work.
        text: ``"after_image"`` (the official convention): the attended non-image tokens
            after the first image token of their sample (a sample without an image token has
            no text tokens); ``"all"``: every attended non-image token.
        position_ids, cu_seqlens: sample boundaries of packed rows (several samples in one
            row), see :func:`sample_starts`; the "after_image" rule then applies per sample.
            Without them each row is one sample.

    Returns:
        ``(vision_mask, text_mask)``, two bool tensors ``[B, T]`` on ``input_ids.device``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if text not in TEXT_MODES:
        raise ValueError(f"text must be one of {TEXT_MODES}, got {text!r}")
    if attention_mask is None:
        attended = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                f"{tuple(input_ids.shape)}; pass the 2-D padding mask"
            )
        attended = attention_mask.to(device=input_ids.device) != 0
    is_image = input_ids == image_token_id
    vision = is_image & attended
    text_mask = attended & ~is_image
    if text == "after_image":
        images_so_far = torch.cumsum(vision.to(torch.int64), dim=1)  # image tokens up to t, inclusive
        starts = sample_starts(tuple(input_ids.shape), position_ids, cu_seqlens, input_ids.device)
        if starts is not None:
            # image tokens before the sample that t belongs to: the count before its first token
            before = torch.where(starts, images_so_far - vision.to(torch.int64), 0)
            images_so_far = images_so_far - torch.cummax(before, dim=1).values
        text_mask = text_mask & (images_so_far > 0)
    return vision, text_mask


def masks_from_batch(
    batch: Mapping[str, Any], image_token_id: int, text: str = "after_image"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`build_masks` on a dict-like batch with ``input_ids`` and optional ``attention_mask``,
    ``position_ids`` and ``cu_seqlens`` (sample boundaries of packed rows).

    Returns:
        ``(vision_mask, text_mask)``, bool ``[B, T]``.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            "masks_from_batch needs a dict-like batch with 'input_ids' (and optionally "
            "'attention_mask'); for other batch layouts pass masks=lambda batch: "
            "(vision_mask, text_mask) (an argument of MIRProbe, MIRCallback and MIRTrainerCallback)."
        )
    return build_masks(
        batch["input_ids"], image_token_id, batch.get("attention_mask"), text=text,
        position_ids=batch.get("position_ids"), cu_seqlens=batch.get("cu_seqlens"),
    )


@dataclass(frozen=True)
class HFLlavaSplice:
    """How a Hugging Face LLaVA of transformers < 4.44 lays out its decoder's input: ``forward``
    replaces each single ``image_token_index`` token by ``tokens_per_image`` image features (the
    original LLaVA codebase's layout), padding on the left when no row ends with ``pad_token_id``
    (transformers' own rule), else on the right."""

    tokens_per_image: int
    image_token_index: int
    pad_token_id: int

    def padding_side(self, input_ids: torch.Tensor) -> str:
        """``"left"`` or ``"right"``, as transformers' splice decides for ``input_ids [B, T]``."""
        return "right" if bool((input_ids[:, -1] == self.pad_token_id).any()) else "left"

    def applies_to(self, input_ids: torch.Tensor) -> bool:
        """Whether ``forward`` splices this batch: fewer image tokens per row than one image's
        features (rows expanded by a newer processor are left as they are)."""
        per_row = (input_ids == self.image_token_index).sum(1)
        return bool(per_row.any()) and int(per_row.max()) < self.tokens_per_image


def hf_llava_splice(model: nn.Module) -> HFLlavaSplice | None:
    """The :class:`HFLlavaSplice` of a Hugging Face ``LlavaForConditionalGeneration`` whose
    ``forward`` splices one ``<image>`` token per image (transformers < 4.44, which have
    ``_merge_input_ids_with_image_features``), ``None`` for any other model."""
    try:
        hf = unwrap_hf_model(model)  # through wrappers (LightningModule, peft, DDP, ...)
    except ValueError:
        return None
    merge = getattr(type(hf), "_merge_input_ids_with_image_features", None)
    config = getattr(hf, "config", None)
    vision = getattr(config, "vision_config", None)
    if merge is None or type(hf).__name__ != "LlavaForConditionalGeneration" or vision is None:
        return None
    patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    pad = getattr(hf, "pad_token_id", None)
    if pad is None:
        pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else -1
    return HFLlavaSplice(patches + int(full), int(config.image_token_index), int(pad))
