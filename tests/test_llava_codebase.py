"""MIR inside the original LLaVA codebase (``llava-torch`` from PyPI, haotian-liu/LLaVA 1.2):
its ``LlavaLlamaForCausalLM``, its ``-200`` splicing (``prepare_inputs_labels_for_multimodal``)
and its ``LLaVATrainer``, with ``MIRTrainerCallback(..., masks=llava_mask_fn(...))``.

The model is tiny and random (2 Llama layers, hidden 64; a 2-layer CLIP vision tower saved
to a temporary folder, which LLaVA's ``CLIPVisionTower`` loads by path): nothing is
downloaded. LLaVA pins transformers 4.37.2, so this runs in CI's oldest-pins environment
(.ci/oldest-pins.txt, ``llava-torch`` installed with ``--no-deps``) and is skipped where
``llava`` is not importable.

The reference masks come from LLaVA's own splicing, not from ``llava_masks``: every text
position gets a distinct label, so after ``prepare_inputs_labels_for_multimodal`` the image
features are exactly the attended positions whose label is LLaVA's ``IGNORE_INDEX``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reference import reference_mir

llava_model = pytest.importorskip(
    "llava.model", reason="the LLaVA codebase (pip install --no-deps llava-torch) runs in CI's oldest-pins "
    "environment only (it needs transformers 4.37.x)",
)
pytest.importorskip("accelerate")

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from llava.train.llava_trainer import LLaVATrainer  # noqa: E402
from llava.train.train import TrainingArguments  # noqa: E402

from mir_lightning.adapters.hf_trainer import MIRTrainerCallback  # noqa: E402
from mir_lightning.models.llava import llava_mask_fn  # noqa: E402

IMAGE_SIZE, PATCH = 32, 8
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2  # CLIP patches, CLS dropped (mm_vision_select_feature="patch")
VOCAB, PAD_ID = 128, 0
MAX_LENGTH = 64  # tokenizer_model_max_length: cuts the longest spliced probe sample
SEED = 0
# Measured here (torch 2.1.2, transformers 4.37.2): the MIR that LLaVATrainer logs at step 4
# differs from the float64 reference by 2.2e-16, per-layer FD by 5e-16 relative (80 vision /
# 170+ text tokens per layer, more than the hidden size 64: full-rank covariances). 1e-9 keeps
# a margin of over 1e6;
# masks off by the cut or by one feature per image give NaN (shape mismatch) instead.
TOL = 1e-9


@pytest.fixture(scope="module")
def vision_tower_dir(tmp_path_factory):
    """A tiny random CLIP vision tower (and image processor) saved where LLaVA loads it by path."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(SEED)
    path = tmp_path_factory.mktemp("clip")
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    CLIPVisionModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(path)
    return str(path)


def make_llava(vision_tower_dir: str):
    """LLaVA's ``LlavaLlamaForCausalLM`` from its own ``LlavaConfig``, vision tower loaded, in train mode."""
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlavaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2,
        mm_vision_tower=vision_tower_dir, mm_hidden_size=32, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="flat",
        tokenizer_model_max_length=MAX_LENGTH, tokenizer_padding_side="right",
    )
    model = LlavaLlamaForCausalLM(config)
    model.get_vision_tower().load_model()  # what LLaVA's train.py does through initialize_vision_modules
    return model


def llava_batch(lengths: list[int], image_at: list[int | None], seed: int) -> dict[str, torch.Tensor]:
    """A right-padded LLaVA batch: row ``r`` has ``lengths[r]`` ids with the ``-200`` placeholder at
    ``image_at[r]`` (None: a text-only row), labels = input ids (-100 on padding and the placeholder)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (n, at) in enumerate(zip(lengths, image_at)):
        ids = torch.randint(3, VOCAB, (n,), generator=gen)
        ids[0] = 1
        if at is not None:
            ids[at] = IMAGE_TOKEN_INDEX
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == IMAGE_TOKEN_INDEX), IGNORE_INDEX)
    images = torch.randn(len(lengths), 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "images": images}


def probe_batches() -> list[dict[str, torch.Tensor]]:
    """Rows of different lengths, images at different places, one text-only row, one row cut
    by ``tokenizer_model_max_length``."""
    return [
        llava_batch([40, 36, 30], [2, 5, 1], seed=1),
        llava_batch([44, 9, 60], [3, None, 4], seed=2),  # row 2: 60 - 1 + 16 = 75 > MAX_LENGTH
    ]


def train_examples(n: int = 8) -> list[dict[str, torch.Tensor]]:
    batch = llava_batch([12] * n, [3] * n, seed=7)
    return [{key: value[i] for key, value in batch.items()} for i in range(n)]


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def spliced_masks(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision / text-after-image masks ``[B, T']`` read off LLaVA's own splicing: each attended
    position gets a distinct label (its index + 1), so after the splice a label of
    ``IGNORE_INDEX`` on an attended position is an image feature."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tags = torch.arange(1, ids.numel() + 1).view_as(ids)
    _, _, attended, _, _, labels = model.prepare_inputs_labels_for_multimodal(
        ids, None, mask, None, tags, batch["images"])
    vision = attended.bool() & (labels == IGNORE_INDEX)
    after_image = torch.cumsum(vision.long(), dim=1) > 0
    text = attended.bool() & ~vision & after_image
    return vision, text


def reference_on(model, batches) -> tuple[float, list[float]]:
    """Float64 reference (tests/reference.py) of MIR and per-layer FD on the spliced tokens."""
    vision, text = [], []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch, output_hidden_states=True).hidden_states[1:]
            v, t = spliced_masks(model, batch)
            assert hidden[0].shape[:2] == v.shape  # the decoder saw the spliced sequence
            vision.append([h[v].double() for h in hidden])
            text.append([h[t].double() for h in hidden])
    mir, fds, _ = reference_mir([torch.cat(x) for x in zip(*vision)], [torch.cat(x) for x in zip(*text)])
    return mir, fds


def test_spliced_masks_see_the_cut_and_the_text_only_row(vision_tower_dir):
    model = make_llava(vision_tower_dir)
    v, t = spliced_masks(model, probe_batches()[1])
    assert v.shape == (3, MAX_LENGTH)
    assert v.sum(1).tolist() == [TOKENS_PER_IMAGE, 0, TOKENS_PER_IMAGE]
    assert t[1].sum() == 0  # no image: no text "after the image" either
    # the independent masks agree with llava_mask_fn on this batch (the callback's masks)
    fn_v, fn_t = llava_mask_fn(TOKENS_PER_IMAGE, MAX_LENGTH, "right")(probe_batches()[1])
    assert torch.equal(fn_v, v) and torch.equal(fn_t, t)


def test_llava_trainer_logs_mir_equal_to_the_reference(tmp_path, vision_tower_dir):
    model = make_llava(vision_tower_dir)
    # LLaVA's stage-1 recipe: only the projector trains
    model.requires_grad_(False)
    for p in model.get_model().mm_projector.parameters():
        p.requires_grad_(True)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=2, report_to="none", save_strategy="no",
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=SEED,
        group_by_modality_length=False, use_cpu=True,
    )
    callback = MIRTrainerCallback(probe_batches(), every_n_steps=2,
                                  masks=llava_mask_fn(TOKENS_PER_IMAGE, MAX_LENGTH, "right"))
    trainer = LLaVATrainer(model=model, args=args, train_dataset=train_examples(), data_collator=collate,
                           callbacks=[callback])
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "mir" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert all(math.isfinite(entry["mir"]) for entry in logged)
    assert logged[0]["mir"] != logged[1]["mir"]  # the projector trained between the probes
    mir, fds = reference_on(trainer.model, probe_batches())
    assert abs(logged[1]["mir"] - mir) < TOL
    for k, fd in enumerate(fds):
        assert abs(logged[1][f"mir_fd/layer_{k:02d}"] - fd) < TOL * max(fd, 1.0)
    assert np.isfinite(mir)


def test_moca_calibrates_exactly_the_spliced_image_features(vision_tower_dir):
    """MoCa on LLaVA's model, its vision mask from ``llava_masks`` on the ``-200`` ids: after
    the first decoder layer the image features are ``scale * h + shift`` and every other
    position is untouched (positions from LLaVA's own splicing)."""
    from mir_lightning.models.llava import llava_masks
    from mir_lightning.moca import MoCa

    model = make_llava(vision_tower_dir).eval()
    batch = probe_batches()[1]  # a text-only row and a cut row
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True).hidden_states[1]
    moca = MoCa.attach(model, vision_mask=lambda inputs: llava_masks(
        inputs["input_ids"], inputs.get("attention_mask"), tokens_per_image=TOKENS_PER_IMAGE,
        max_length=MAX_LENGTH)[0])
    with torch.no_grad():
        moca.scale[0].fill_(2.0)
        moca.shift[0].fill_(0.5)
        calibrated = model(**batch, output_hidden_states=True).hidden_states[1]
    vision, _ = spliced_masks(model, batch)
    # float32: 2 * h + 0.5 is exact up to one rounding of the add (|h| < 10 here)
    torch.testing.assert_close(calibrated[vision], 2.0 * plain[vision] + 0.5, rtol=0, atol=1e-5)
    assert torch.equal(calibrated[~vision], plain[~vision])
    moca.remove()
