"""Tests for mir_lightning.integrations.transformers on tiny random Hugging Face models."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mir_lightning.integrations.transformers import (  # noqa: E402
    build_masks,
    find_decoder_layers,
    find_hidden_state_modules,
    find_image_token_id,
    masks_from_batch,
    unwrap_hf_model,
)

from vlm_factory import (  # noqa: E402
    FAMILIES,
    IMAGE_TOKEN_ID,
    IMAGE_TOKENS,
    NUM_LAYERS,
    make_tiny_causal_lm,
    make_tiny_vlm,
)

# Non-image tokens that each family puts after its image tokens besides the text.
_TRAILING_MARKERS = {"qwen2_vl": 1, "qwen2_5_vl": 1, "gemma3": 1, "idefics3": 1, "smolvlm": 1}


def _hooked_forward(model: torch.nn.Module, modules: list[torch.nn.Module], batch: dict):
    """Run ``model(**batch, output_hidden_states=True)`` and return (hook outputs, outputs)."""
    caught: list[torch.Tensor] = []

    def hook(_mod, _inp, out):
        caught.append(out[0] if isinstance(out, (tuple, list)) else out)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.inference_mode():
            out = model(**batch, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return caught, out


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    family = request.param
    try:
        model, make_inputs = make_tiny_vlm(family)
    except (AttributeError, ImportError) as exc:  # family missing in this transformers
        pytest.skip(f"{family} unavailable: {exc}")
    return family, model, make_inputs


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_hidden_state_modules_match_hidden_states(family_model, padding_side):
    family, model, make_inputs = family_model
    modules = find_hidden_state_modules(model)
    assert len(modules) == NUM_LAYERS
    assert len(find_decoder_layers(model)) == NUM_LAYERS
    batch = make_inputs(3, 4, padding_side=padding_side)
    caught, out = _hooked_forward(model, modules, batch)
    reference = out.hidden_states[1:]
    assert len(caught) == len(reference) == NUM_LAYERS
    for got, ref in zip(caught, reference):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # The last module is the final norm: its output is the model's last hidden state.
    assert not isinstance(modules[-1], type(modules[0]))


def test_masks_on_family_batch(family_model):
    family, model, make_inputs = family_model
    image_token_id = find_image_token_id(model)
    assert image_token_id == IMAGE_TOKEN_ID
    assert find_image_token_id(model.config) == IMAGE_TOKEN_ID
    n_text = 4
    for side in ("right", "left"):
        batch = make_inputs(3, n_text, padding_side=side)
        vision, text = masks_from_batch(batch, image_token_id)
        attended = batch["attention_mask"].bool()
        assert vision.dtype == torch.bool and text.dtype == torch.bool
        assert not (vision & text).any()
        assert not ((vision | text) & ~attended).any()
        for row in range(3):
            assert int(vision[row].sum()) == IMAGE_TOKENS[family]
            expected_text = n_text + row + _TRAILING_MARKERS.get(family, 0)
            assert int(text[row].sum()) == expected_text
        # "all" adds the BOS + prefix (and any marker before the image) of every row.
        _, text_all = masks_from_batch(batch, image_token_id, text="all")
        assert (text_all & text).sum() == text.sum()
        assert int(text_all.sum()) == int((attended & ~vision).sum())


def test_bare_causal_lm_and_wrappers():
    lm = make_tiny_causal_lm()
    ids = torch.randint(8, 100, (2, 9))
    for target in (lm, lm.model):
        modules = find_hidden_state_modules(target)
        assert len(modules) == NUM_LAYERS
        caught, out = _hooked_forward(target, modules, {"input_ids": ids})
        for got, ref in zip(caught, out.hidden_states[1:]):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)

    class Wrapper(torch.nn.Module):  # e.g. a LightningModule holding the model
        def __init__(self, inner):
            super().__init__()
            self.net = inner
            self.head = torch.nn.Linear(4, 4)

    assert unwrap_hf_model(Wrapper(lm)) is lm
    assert find_hidden_state_modules(Wrapper(lm))[0] is lm.model.layers[0]


def test_wrapper_with_lm_and_hf_vision_encoder_picks_the_lm():
    lm = make_tiny_causal_lm()
    vision = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=8,
        )
    )

    class HandBuiltVLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = vision
            self.projector = torch.nn.Linear(16, 64)
            self.llm = lm

    assert unwrap_hf_model(HandBuiltVLM()) is lm
    with pytest.raises(ValueError, match="image_token_id"):
        find_image_token_id(HandBuiltVLM())


def test_other_decoder_layouts():
    ids = torch.randint(3, 100, (2, 6))
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, bos_token_id=1, eos_token_id=2)
    ).eval()
    opt = transformers.OPTForCausalLM(
        transformers.OPTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, vocab_size=128,
            word_embed_proj_dim=32,
        )
    ).eval()
    for model in (gpt2, opt):
        modules = find_hidden_state_modules(model)
        caught, out = _hooked_forward(model, modules, {"input_ids": ids})
        assert len(caught) == len(out.hidden_states) - 1 == 2
        for got, ref in zip(caught, out.hidden_states[1:]):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------- masks
I = 9  # image token id used in the hand-made examples


def test_build_masks_right_padding():
    ids = torch.tensor(
        [
            [1, 5, I, I, 6, 7, 0, 0],
            [1, I, I, 6, 7, 8, 4, 0],
            [1, 5, 6, 7, 0, 0, 0, 0],  # no image
        ]
    )
    att = (ids != 0).long()
    vision, text = build_masks(ids, I, att)
    assert vision.tolist() == [
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert text.int().tolist() == [
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
    _, text_all = build_masks(ids, I, att, text="all")
    assert text_all.int().tolist() == [
        [1, 1, 0, 0, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
    ]


def test_build_masks_left_padding_and_bool_mask():
    # The pad id equals the image id here: padding must still never count.
    ids = torch.tensor(
        [
            [I, I, 1, 5, I, I, 6, 7],
            [1, 5, I, 6, I, 7, 8, 4],  # two images: text between them counts ("after first")
        ]
    )
    att = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], dtype=torch.bool)
    vision, text = build_masks(ids, I, att)
    assert vision.int().tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 1, 0, 0, 0]]
    assert text.int().tolist() == [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 0, 1, 1, 1]]
    vision2, text2 = masks_from_batch({"input_ids": ids, "attention_mask": att.long()}, I)
    assert torch.equal(vision, vision2) and torch.equal(text, text2)


def test_build_masks_without_attention_mask():
    ids = torch.tensor([[3, I, 4, 5]])
    vision, text = masks_from_batch({"input_ids": ids}, I)
    assert vision.tolist() == [[False, True, False, False]]
    assert text.tolist() == [[False, False, True, True]]


def test_build_masks_bad_arguments():
    ids = torch.tensor([[3, I, 4]])
    with pytest.raises(ValueError, match="after_image"):
        build_masks(ids, I, text="before")
    with pytest.raises(ValueError, match="shape"):
        build_masks(ids, I, torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        build_masks(ids[0], I)
    with pytest.raises(ValueError, match="masks="):
        masks_from_batch((ids,), I)


# ----------------------------------------------------------------------------- errors
def _assert_names_arguments(message: str) -> None:
    assert "layers=" in message
    assert "masks=" in message
    assert "MIRCallback" in message
    assert "--layers" in message


def test_unknown_architecture_errors_name_the_arguments():
    with pytest.raises(ValueError) as info:
        find_hidden_state_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    _assert_names_arguments(str(info.value))

    bert = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64
        )
    )
    with pytest.raises(ValueError) as info:
        find_hidden_state_modules(bert)
    assert "BertModel" in str(info.value)
    _assert_names_arguments(str(info.value))
    with pytest.raises(ValueError) as info:
        find_decoder_layers(bert)
    _assert_names_arguments(str(info.value))


def test_missing_image_token_error():
    lm = make_tiny_causal_lm()
    with pytest.raises(ValueError, match="image_token_id"):
        find_image_token_id(lm)
    with pytest.raises(ValueError, match="image_token_id"):
        find_image_token_id(lm.config)


def test_image_token_from_processor_like_object():
    class FakeProcessor:
        image_token_id = 42

    assert find_image_token_id(FakeProcessor()) == 42


def test_image_token_from_gemma3_processor_is_the_soft_token():
    from vlm_factory import make_tiny_processor

    processor = make_tiny_processor("gemma3")
    # Gemma3Processor.image_token_id is the <start_of_image> id; the features sit elsewhere.
    assert find_image_token_id(processor) == IMAGE_TOKEN_ID
    assert find_image_token_id(make_tiny_processor("llava")) == IMAGE_TOKEN_ID
