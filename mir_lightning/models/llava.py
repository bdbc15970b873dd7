"""Masks for the original LLaVA codebase (haotian-liu/LLaVA and its forks), which does not use
Hugging Face's LLaVA classes.

Its batches hold ``input_ids [B, T]`` with one placeholder id (``IMAGE_TOKEN_INDEX = -200``)
per image, ``attention_mask``, ``labels`` and ``images``. Inside ``forward``,
``prepare_inputs_labels_for_multimodal`` rebuilds the sequence the decoder layers see:

1. per sample, the positions with ``attention_mask == 0`` are dropped;
2. each placeholder is replaced by the image's ``N`` projected features (``N = 576`` for
   CLIP ViT-L/14-336);
3. each sample is cut to ``tokenizer_model_max_length`` tokens when the config sets it;
4. the samples are padded to the longest one, on the right (or on the left when
   ``tokenizer_padding_side == "left"``).

So the decoder's hidden states are ``[B, T', D]`` with ``T' != T``, and masks built on
``input_ids`` do not line up with them. :func:`llava_masks` replays steps 1-4 on the ids
alone (no model access, no extra forward; safe under ZeRO-3) and returns masks ``[B, T']``.
Images with a varying number of features (LLaVA-NeXT "anyres") are not covered: every
image has ``tokens_per_image`` features here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from mir_lightning.models.transformers import TEXT_MODES

__all__ = ["IMAGE_TOKEN_INDEX", "LLaVAMaskFn", "llava_mask_fn", "llava_masks"]

IMAGE_TOKEN_INDEX = -200
"""The LLaVA codebase's image placeholder id in ``input_ids``."""

PADDING_SIDES = ("right", "left")


def _check_options(tokens_per_image: Any, max_length: Any, padding_side: Any, text: Any) -> None:
    if isinstance(tokens_per_image, bool) or not isinstance(tokens_per_image, int) or tokens_per_image < 1:
        raise ValueError(f"tokens_per_image must be an int >= 1 (576 for CLIP ViT-L/14-336), got {tokens_per_image!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be None or an int >= 1 (tokenizer.model_max_length), got {max_length!r}")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES} (tokenizer.padding_side), got {padding_side!r}")
    if text not in TEXT_MODES:
        raise ValueError(f"text must be one of {TEXT_MODES}, got {text!r}")


def llava_masks(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    tokens_per_image: int = 576,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    max_length: int | None = None,
    padding_side: str = "right",
    text: str = "after_image",
) -> tuple[Tensor, Tensor]:
    """Vision and text masks aligned with the hidden states of the LLaVA codebase's decoder.

    Args:
        input_ids: integer ``[B, T]`` with one ``image_token_index`` per image. A row without
            a placeholder simply has no vision tokens (and, with ``text="after_image"``, no
            text tokens).
        attention_mask: optional ``[B, T]`` (bool or 0/1); 0 marks padding, dropped per sample
            as LLaVA does (placeholders in padding are dropped too). ``None``: all attended.
        tokens_per_image: features spliced in per placeholder (``N``, 576 for CLIP
            ViT-L/14-336, i.e. ``(336 / 14) ** 2``).
        image_token_index: the placeholder id (LLaVA's ``IMAGE_TOKEN_INDEX``, -200).
        max_length: the model config's ``tokenizer_model_max_length`` (LLaVA's train.py sets
            it to ``tokenizer.model_max_length``): each spliced sample is cut to this many
            tokens. ``None``: no cut.
        padding_side: the config's ``tokenizer_padding_side``: ``"right"`` (LLaVA's default)
            or ``"left"``.
        text: ``"after_image"`` (the MIR convention): non-image tokens after the sample's
            first image feature; ``"all"``: every non-image token.

    Returns:
        ``(vision_mask, text_mask)``, bool ``[B, T']`` on ``input_ids.device``, where ``T'`` is
        the longest spliced (and cut) sample; padding is False in both.
    """
    _check_options(tokens_per_image, max_length, padding_side, text)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, seq_len] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    device = input_ids.device
    if attention_mask is None:
        attended = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        attended = attention_mask.to(device) != 0
    batch = input_ids.shape[0]
    is_image = (input_ids == image_token_index) & attended

    # width of each input position in the spliced sequence: N per image, 1 per text token, 0 for padding
    widths = torch.where(is_image, tokens_per_image, attended.long()).flatten()
    rows = torch.arange(batch, device=device).repeat_interleave(input_ids.shape[1])
    lengths = widths.view(batch, -1).sum(1)  # spliced length per sample, before the cut
    # the spliced sequences of all samples, concatenated: row, position in the row, kind
    spliced_row = rows.repeat_interleave(widths)
    spliced_vision = is_image.flatten().repeat_interleave(widths)
    row_start = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(spliced_row.numel(), device=device) - row_start[spliced_row]
    spliced_text = ~spliced_vision
    if text == "after_image":
        seen = torch.cat([spliced_vision.new_zeros(1, dtype=torch.long), torch.cumsum(spliced_vision.long(), 0)])
        images_so_far = seen[1:] - seen[row_start][spliced_row]  # image features of the row up to here
        spliced_text &= images_so_far > 0

    if max_length is not None:
        lengths = lengths.clamp(max=max_length)
    keep = position < lengths[spliced_row]
    out_len = int(lengths.max()) if batch else 0
    column = position if padding_side == "right" else position + (out_len - lengths)[spliced_row]
    vision_mask = torch.zeros(batch, out_len, dtype=torch.bool, device=device)
    text_mask = torch.zeros_like(vision_mask)
    vision_mask[spliced_row[keep], column[keep]] = spliced_vision[keep]
    text_mask[spliced_row[keep], column[keep]] = spliced_text[keep]
    return vision_mask, text_mask


@dataclass(frozen=True)
class LLaVAMaskFn:
    """``masks(batch) -> (vision_mask, text_mask)`` for LLaVA-codebase batches (dicts with
    ``input_ids`` and optional ``attention_mask``): :func:`llava_masks` with fixed options.
    Built by :func:`llava_mask_fn`; picklable."""

    tokens_per_image: int = 576
    max_length: int | None = None
    padding_side: str = "right"
    text: str = "after_image"
    image_token_index: int = IMAGE_TOKEN_INDEX

    def __post_init__(self) -> None:
        _check_options(self.tokens_per_image, self.max_length, self.padding_side, self.text)

    def __call__(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Bool ``(vision_mask, text_mask)`` ``[B, T']`` for the decoder's hidden states."""
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError("LLaVA masks need a dict-like batch with 'input_ids' (and optionally 'attention_mask')")
        return llava_masks(
            batch["input_ids"], batch.get("attention_mask"), tokens_per_image=self.tokens_per_image,
            image_token_index=self.image_token_index, max_length=self.max_length,
            padding_side=self.padding_side, text=self.text,
        )


def llava_mask_fn(
    tokens_per_image: int = 576,
    max_length: int | None = None,
    padding_side: str = "right",
    text: str = "after_image",
    *,
    image_token_index: int = IMAGE_TOKEN_INDEX,
) -> LLaVAMaskFn:
    """The ``masks=`` argument of ``MIRProbe`` / ``MIRTrainerCallback`` / ``MIRCallback`` for a
    model of the LLaVA codebase; arguments as in :func:`llava_masks`. In LLaVA's train.py::

        masks = llava_mask_fn(576, tokenizer.model_max_length, tokenizer.padding_side)
    """
    return LLaVAMaskFn(tokens_per_image, max_length, padding_side, text, image_token_index)
