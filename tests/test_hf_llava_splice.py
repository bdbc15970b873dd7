"""Hugging Face LLaVA before transformers 4.44 (CI's oldest pins: 4.37.2): its forward splices
one ``<image>`` token per image into the image features, as the original LLaVA codebase does,
so ``llava_mask_fn(tokens_per_image, image_token_index=config.image_token_index)`` gives the
masks, and MIRProbe finds the same masks itself (``hf_llava_splice``); both = the float64
reference on the spliced tokens. ``mir-lightning evaluate``'s Python API on a saved checkpoint of
that stack (``LlavaProcessor``, chat template on the tokenizer) = the same reference.

The reference masks come from transformers' own splice (``_merge_input_ids_with_image_features``
given a distinct label per position: image features get ``ignore_index``), not from
``llava_masks``. Skipped where the installed HF LLaVA expects expanded image tokens (4.44+, where
the main suite's HF-family tests cover it).

Tolerance: the probe folds float32 hidden states into float64 state, the reference is float64
on the same float32 tokens; measured (torch 2.1.2, transformers 4.37.2) MIR differs by 8e-17,
per-layer FD by 5e-16 relative (80 vision / 158 text tokens per layer, more than the hidden
size 64: full-rank covariances; with fewer text tokens than 64 the two differed by 1e-9). 1e-9
keeps a margin of over 1e6, while masks off by one feature per image give NaN (shape mismatch).
``evaluate`` (12 paper-probe samples, exact medians): MIR 4e-16, per-layer FD 1.5e-15 relative.
"""

from __future__ import annotations

import pytest
import torch

from reference import reference_mir
from vlm_factory import IMAGE_TOKEN_ID, PAD_ID, hf_llava_splices, make_tiny_config

tf = pytest.importorskip("transformers")
if not hf_llava_splices():
    pytest.skip(f"transformers {tf.__version__}: HF LLaVA expects expanded image tokens", allow_module_level=True)

from mir_lightning import MIRProbe, paper_probe  # noqa: E402
from mir_lightning.evaluate import evaluate_checkpoint  # noqa: E402
from mir_lightning.models.llava import llava_mask_fn  # noqa: E402
from vlm_factory import chat_template_for, make_tiny_tokenizer  # noqa: E402

TOKENS_PER_IMAGE = 16  # (32 / 8) ** 2 CLIP patches, CLS dropped ("default" feature selection)
TOL = 1e-9


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = make_tiny_config("llava")
    config.pad_token_id = PAD_ID  # how the splice tells right padding from left
    # no zero padding embedding: 4.37's splice finds the image slots as the all-zero rows, so a
    # zero pad embedding (padding_idx) would count as an image slot and break padded batches
    config.text_config.pad_token_id = None
    config.vision_feature_select_strategy = "default"
    return tf.LlavaForConditionalGeneration(config).eval()


def batch(lengths: list[int], image_at: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Right-padded rows with one ``<image>`` token each, at ``image_at``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (n, at) in enumerate(zip(lengths, image_at)):
        ids[row, :n] = torch.randint(PAD_ID + 3, IMAGE_TOKEN_ID, (n,), generator=gen)
        ids[row, at] = IMAGE_TOKEN_ID
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(len(lengths), 3, 32, 32, generator=gen)}


def spliced_masks(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision / text-after-image masks read off transformers' own splice."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = model.get_input_embeddings()(ids)
    vision_out = model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    features = model.multi_modal_projector(vision_out.hidden_states[model.config.vision_feature_layer][:, 1:])
    tags = torch.arange(1, ids.numel() + 1).view_as(ids)
    _, attended, labels, _ = model._merge_input_ids_with_image_features(features, embeds, ids, mask, tags)
    vision = attended.bool() & (labels == model.config.ignore_index)
    text = attended.bool() & ~vision & (torch.cumsum(vision.long(), dim=1) > 0)
    return vision, text


def spliced_reference(model, batches) -> tuple[float, list[float]]:
    """Float64 reference (tests/reference.py) of MIR and per-layer FD on the spliced tokens."""
    vision, text = [], []
    with torch.no_grad():
        for inputs in batches:
            hidden = model(**inputs, output_hidden_states=True).hidden_states[1:]
            v, t = spliced_masks(model, inputs)
            assert hidden[0].shape[:2] == v.shape  # the decoder saw the spliced sequence
            assert int(v.sum()) == TOKENS_PER_IMAGE * (inputs["input_ids"] == IMAGE_TOKEN_ID).sum()
            vision.append([h[v].double() for h in hidden])
            text.append([h[t].double() for h in hidden])
    mir, fds, _ = reference_mir([torch.cat(x) for x in zip(*vision)], [torch.cat(x) for x in zip(*text)])
    return mir, fds


def test_hf_llava_splice_with_llava_mask_fn_or_automatic_masks_equals_the_reference():
    model = make_model()
    batches = [batch([40, 36, 30], [2, 5, 1], seed=1), batch([44, 30], [3, 6], seed=2)]  # text > hidden 64: full rank
    mir, fds = spliced_reference(model, batches)
    masks = llava_mask_fn(TOKENS_PER_IMAGE, padding_side="right", image_token_index=IMAGE_TOKEN_ID)
    wrapped = torch.nn.ModuleDict({"vlm": model})  # found through a wrapper, as in a LightningModule
    wrapped.forward = lambda **batch: model(**batch)
    results = [MIRProbe(batches, masks=masks).run(model), MIRProbe(batches).run(model), MIRProbe(batches).run(wrapped)]
    for result in results:  # masks given, automatic, automatic through a wrapper
        assert result.error is None, result.error
        assert abs(result.mir - mir) < TOL * max(abs(mir), 1.0)
        for got, want in zip(result.per_layer_fd.tolist(), fds):
            assert abs(got - want) < TOL * max(want, 1.0)


def test_evaluate_on_the_old_stack_equals_the_reference(tmp_path):
    """``evaluate_checkpoint`` on a saved HF LLaVA + LlavaProcessor of transformers 4.37 (no
    processor chat template there: the tokenizer's), the paper's probe of 12 samples, exact
    medians: = the float64 reference on the spliced tokens of the same encoded batches."""
    model = make_model()
    model.save_pretrained(tmp_path)
    fast = make_tiny_tokenizer("llava")
    tokenizer = tf.LlamaTokenizerFast(tokenizer_object=fast._tokenizer, bos_token="<bos>", eos_token="<eos>",
                                      unk_token="<unk>", pad_token="<pad>")
    tokenizer.chat_template = chat_template_for("llava")
    images = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = tf.LlavaProcessor(image_processor=images, tokenizer=tokenizer)
    processor.save_pretrained(tmp_path)
    result = evaluate_checkpoint(tmp_path, num_samples=12, batch_size=4, median_buffer=8192, progress=False)
    batches = list(paper_probe(processor, num_samples=12, batch_size=4))
    assert all(int((b["input_ids"] == IMAGE_TOKEN_ID).sum(1).max()) == 1 for b in batches)  # one <image> per row
    mir, fds = spliced_reference(model, batches)
    assert result.vision_tokens == 12 * TOKENS_PER_IMAGE
    assert abs(result.mir - mir) < TOL * max(abs(mir), 1.0)
    for got, want in zip(result.per_layer["fd"], fds):
        assert abs(got - want) < TOL * max(want, 1.0)
