"""Capture targets through training wrappers, and masks of packed rows (per sample, not per row)."""

from __future__ import annotations

import pytest
import torch

from vlm_factory import IMAGE_TOKEN_ID, make_tiny_vlm
from mir_lightning.capture import LayerCapture, MaskRule, resolve_targets
from mir_lightning.integrations.transformers import build_masks, find_hidden_state_modules, sample_starts

PAD = 0


def _sample(prefix: int, images: int, text: int, gap: int = 0) -> list[int]:
    """Token ids: ``prefix`` text tokens, an image span (after ``gap`` more text tokens), then text."""
    words = list(range(10, 10 + prefix))
    image = [IMAGE_TOKEN_ID] * images
    return words + list(range(40, 40 + gap)) + image + list(range(60, 60 + text))


SAMPLES = [_sample(3, 4, 5), _sample(0, 2, 7), _sample(4, 0, 6), _sample(2, 3, 1, gap=2), _sample(1, 5, 0)]


def _per_sample_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """The rule on each sample alone (one row each), concatenated: the expected masks of a packed row."""
    vision, text = [], []
    for ids in SAMPLES:
        v, t = build_masks(torch.tensor([ids]), IMAGE_TOKEN_ID)
        vision.append(v[0])
        text.append(t[0])
    return torch.cat(vision), torch.cat(text)


def _packed(pad: int = 3) -> dict[str, torch.Tensor]:
    ids = [t for s in SAMPLES for t in s] + [PAD] * pad
    pos = [p for s in SAMPLES for p in range(len(s))] + [0] * pad
    lengths = [len(s) for s in SAMPLES]
    cu = torch.cumsum(torch.tensor([0, *lengths]), 0)
    att = [1] * (len(ids) - pad) + [0] * pad
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]), "cu_seqlens": cu,
            "attention_mask": torch.tensor([att])}


def test_packed_row_masks_follow_each_sample():
    batch = _packed()
    vision, text = _per_sample_masks()
    n = vision.shape[0]
    for bounds in ({"position_ids": batch["position_ids"]}, {"cu_seqlens": batch["cu_seqlens"]},
                   {"position_ids": batch["position_ids"][None]}):  # multimodal rotary ids [R, B, T]
        v, t = build_masks(batch["input_ids"], IMAGE_TOKEN_ID, batch["attention_mask"], **bounds)
        assert torch.equal(v[0, :n], vision) and torch.equal(t[0, :n], text)
        assert not (v[0, n:].any() or t[0, n:].any())  # padding is in neither mask
    # the row rule (no boundaries) counts the later samples' prompts as text: the defect fixed here
    _, row_text = build_masks(batch["input_ids"], IMAGE_TOKEN_ID, batch["attention_mask"])
    assert int(row_text.sum()) > int(text.sum())
    # the auto masks read the boundaries from the batch
    v, t = MaskRule(image_token_id=IMAGE_TOKEN_ID)({k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")})
    assert torch.equal(t[0, :n], text)


def test_padded_rows_with_position_ids_keep_the_row_rule():
    """Hugging Face's position ids of a left-padded batch (padding at 1) change nothing."""
    ids = torch.tensor([[PAD, PAD, *_sample(2, 3, 4)], [*_sample(1, 3, 5), PAD, PAD]])  # left and right padding
    att = (ids != PAD).long()
    pos = (att.cumsum(1) - 1).masked_fill(att == 0, 1)
    assert torch.equal(torch.stack(build_masks(ids, IMAGE_TOKEN_ID, att, position_ids=pos)),
                       torch.stack(build_masks(ids, IMAGE_TOKEN_ID, att)))


def test_sample_boundaries_are_checked():
    assert sample_starts((2, 5)) is None
    with pytest.raises(ValueError, match="position_ids"):
        sample_starts((2, 5), position_ids=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        sample_starts((1, 5), cu_seqlens=torch.tensor([0, 3, 2]))


def test_layers_found_through_wrappers():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model, _ = make_tiny_vlm("llava")
    real = find_hidden_state_modules(model)
    compiled = torch.compile(model)  # OptimizedModule: the model sits at ``_orig_mod``
    assert [a is b for a, b in zip(find_hidden_state_modules(compiled), real)] == [True] * len(real)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    names = [n for n, _ in model.named_modules()]
    assert any("_checkpoint_wrapped_module" in n for n in names)
    # the hooks go on the real layers, not on their CheckpointWrapper
    assert [a is b for a, b in zip(find_hidden_state_modules(model), real)] == [True] * len(real)
    targets = resolve_targets(compiled, layer_indices=[1, 2])
    assert targets.layer_ids == [1, 2] and targets.modules == real[1:] and targets.image_token_id == IMAGE_TOKEN_ID


def test_layer_capture_counts_and_mask_rule_order():
    layers = [torch.nn.Identity(), torch.nn.Identity()]
    seen = []
    capture = LayerCapture(layers)
    capture.attach(lambda i, h: seen.append(i))
    layers[0](torch.zeros(1, 2, 3))  # inactive: nothing handed over
    capture.activate()
    layers[1](torch.zeros(1, 2, 3))
    layers[1](torch.zeros(1, 2, 3))
    assert seen == [1, 1] and capture.calls == [0, 2]
    capture.detach()
    assert not any(m._forward_hooks for m in layers)
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, 6]])
    given = (torch.tensor([[True, False, False]]), torch.tensor([[False, False, True]]))
    batch = {"input_ids": ids, "vision_mask": given[0], "text_mask": given[1]}
    assert MaskRule(image_token_id=IMAGE_TOKEN_ID)(batch) == given  # the batch's own masks first
    fn = (given[1], given[0])
    assert MaskRule(masks=lambda b: fn, image_token_id=IMAGE_TOKEN_ID)(batch) == fn  # then masks=
    with pytest.raises(ValueError, match="masks="):
        MaskRule()({"input_ids": ids})
