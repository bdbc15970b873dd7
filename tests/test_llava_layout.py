"""llava_masks / llava_mask_fn: masks for the original LLaVA codebase's spliced sequences.

A stand-in LLaVA-codebase model (embedding, a projector giving N features per image, a tiny
Hugging Face LlamaModel) splices image features in ``forward`` the way
``prepare_inputs_labels_for_multimodal`` does (per-sample padding removal, splice, cut to
``max_length``, right or left padding) and records, independently of the package, which
positions hold image features and which hold text after the sample's first image. The
probe's MIR (masks from ``llava_mask_fn``) is compared with the float64 reference on tokens
materialised from ``output_hidden_states`` with the recorded masks.

Tolerance: probe and reference were measured to agree to <= 8e-16 relative on these
tokens (per-layer FD; MIR exactly); 1e-9 leaves a margin of > 1e6, while masks for the
other padding side move MIR by 2-46 % and masks without (or with a needless) cut fail
on the shape.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from reference import reference_mir
from mir_lightning.integrations.llava import IMAGE_TOKEN_INDEX, llava_mask_fn, llava_masks
from mir_lightning.integrations.transformers import find_hidden_state_modules
from mir_lightning.probe import MIRProbe

RTOL = 1e-9
N_IMG = 8  # features per image
FEAT = 6  # raw image feature width
HIDDEN = 16
PAD = 0


class StandInLLaVA(nn.Module):
    """A LLaVA-codebase-style model: ``forward(input_ids, attention_mask, images)`` with one
    ``IMAGE_TOKEN_INDEX`` per image in ``input_ids`` and ``images [n_images, N_IMG, FEAT]``
    in the order of the placeholders (row-major). Records, per forward, the hidden states
    ``[1:]`` and the masks of the spliced batch."""

    def __init__(self, max_length: int | None, padding_side: str) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                             pad_token_id=PAD)
        self.llm = LlamaModel(config)
        self.projector = nn.Sequential(nn.Linear(FEAT, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN))
        self.max_length, self.padding_side = max_length, padding_side
        self.records: list[tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]] = []

    def forward(self, input_ids, attention_mask, images):
        features = iter(self.projector(images))
        embeds, vision, text = [], [], []
        for ids, keep in zip(input_ids, attention_mask.bool()):
            row_embeds, row_vision, row_text, seen_image = [], [], [], False
            for token in ids[keep].tolist():  # padding dropped per sample
                if token == IMAGE_TOKEN_INDEX:
                    row_embeds.append(next(features))
                    row_vision += [True] * N_IMG
                    row_text += [False] * N_IMG
                    seen_image = True
                else:
                    row_embeds.append(self.llm.embed_tokens(torch.tensor([token])))
                    row_vision.append(False)
                    row_text.append(seen_image)
            cut = self.max_length
            embeds.append(torch.cat(row_embeds)[:cut])
            vision.append(row_vision[:cut])
            text.append(row_text[:cut])
        width = max(e.shape[0] for e in embeds)
        batch = len(embeds)
        padded = torch.zeros(batch, width, HIDDEN)
        new_mask = torch.zeros(batch, width, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        vision_mask = torch.zeros(batch, width, dtype=torch.bool)
        text_mask = torch.zeros(batch, width, dtype=torch.bool)
        for b, e in enumerate(embeds):
            n = e.shape[0]
            span = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            padded[b, span], new_mask[b, span], positions[b, span] = e, 1, torch.arange(n)
            vision_mask[b, span] = torch.tensor(vision[b])
            text_mask[b, span] = torch.tensor(text[b])
        out = self.llm(inputs_embeds=padded, attention_mask=new_mask, position_ids=positions,
                       output_hidden_states=True)
        self.records.append((out.hidden_states[1:], vision_mask, text_mask))
        return out


def make_batch(rows: list[list[int]], input_padding: str = "right", seed: int = 0) -> dict[str, torch.Tensor]:
    """A collated batch: rows of ids (``IMAGE_TOKEN_INDEX`` for images) padded with PAD."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(0, len(row)) if input_padding == "right" else slice(width - len(row), width)
        ids[b, span], mask[b, span] = torch.tensor(row), 1
    n_images = sum(row.count(IMAGE_TOKEN_INDEX) for row in rows)
    images = torch.randn(n_images, N_IMG, FEAT, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": mask, "images": images}


def words(n: int, start: int) -> list[int]:
    return [3 + (start + 7 * i) % 60 for i in range(n)]


I = IMAGE_TOKEN_INDEX
BATCHES = [
    make_batch([
        [1, *words(3, 0), I, *words(12, 1)],  # prefix, image, text
        [1, I, *words(5, 2), I, *words(9, 3)],  # two images
        [1, *words(2, 4), I, *words(20, 5)],  # the longest row
        [1, *words(7, 6)],  # no image: no vision and no text tokens
    ], seed=1),
    make_batch([  # padded on the left at input: LLaVA drops padding wherever it is
        [1, *words(4, 7), I, *words(15, 8)],
        [1, I, *words(6, 9)],
        [1, *words(2, 10), I, *words(3, 11), I, *words(11, 12)],
    ], input_padding="left", seed=2),
]
# spliced lengths: 24, 31, 31, 8 | 28, 15, 33. max_length=20 cuts rows 0.0, 0.2 and 1.0 in the
# text after their image, rows 0.1 and 1.2 inside their second image (6 of 8 features kept),
# and leaves rows 0.3 and 1.1 whole.
CUT = 20


def recorded_reference(model: StandInLLaVA):
    """Reference (MIR, per-layer FD, terms) on tokens picked by the stand-in's own masks."""
    layers = len(model.records[0][0])
    vision = [torch.cat([h[k][v] for h, v, _ in model.records]) for k in range(layers)]
    text = [torch.cat([h[k][t] for h, _, t in model.records]) for k in range(layers)]
    return reference_mir(vision, text)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("max_length", [None, CUT])
def test_probe_matches_reference_on_spliced_sequences(padding_side, max_length):
    model = StandInLLaVA(max_length, padding_side)
    probe = MIRProbe(BATCHES, layers=lambda m: find_hidden_state_modules(m.llm),
                     masks=llava_mask_fn(N_IMG, max_length, padding_side), step=lambda m, b: m(**b))
    result = probe.run(model)
    assert result.error is None
    assert len(model.records) == len(BATCHES)
    for batch, (hidden, vision, text) in zip(BATCHES, model.records):
        assert hidden[0].shape[1] != batch["input_ids"].shape[1]  # T' != T
        got_vision, got_text = llava_masks(batch["input_ids"], batch["attention_mask"], tokens_per_image=N_IMG,
                                           max_length=max_length, padding_side=padding_side)
        assert torch.equal(got_vision, vision) and torch.equal(got_text, text)
    mir, fd, terms = recorded_reference(model)
    assert (result.n_vision, result.n_text) == (terms[0]["n_vision"], terms[0]["n_text"])
    np.testing.assert_allclose(result.per_layer_fd.double().numpy(), fd, rtol=RTOL)
    assert result.mir == pytest.approx(mir, rel=RTOL)


def test_truncation_changes_the_token_counts():
    """The cut removes image features and text (so a missing cut would be seen above)."""
    full = [llava_masks(b["input_ids"], b["attention_mask"], tokens_per_image=N_IMG) for b in BATCHES]
    cut = [llava_masks(b["input_ids"], b["attention_mask"], tokens_per_image=N_IMG, max_length=CUT) for b in BATCHES]
    assert [m[0].shape[1] for m in full] == [31, 33]
    assert sum(int(v.sum()) for v, _ in full) == 8 * N_IMG
    assert sum(int(v.sum()) for v, _ in cut) == 6 * N_IMG + 6 + 6
    # text after the first image: full rows minus prefix/image; cut rows end at CUT
    assert [int(t.sum()) for t in full[0][1]] == [12, 14, 20, 0]
    assert [int(t.sum()) for t in cut[0][1]] == [8, 5, 9, 0]
    assert [m[0].shape[1] for m in cut] == [CUT, CUT]


def test_hand_computed_layout():
    ids = torch.tensor([[5, I, 6, 7, PAD], [PAD, 5, 6, I, I], [PAD] * 5])
    attention = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0] * 5])
    vision, text = llava_masks(ids, attention, tokens_per_image=3)
    assert vision.tolist() == [[0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1], [0] * 8]
    assert text.tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0] * 8, [0] * 8]
    vision, text = llava_masks(ids, attention, tokens_per_image=3, padding_side="left", max_length=5, text="all")
    assert vision.tolist() == [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0] * 5]
    assert text.tolist() == [[1, 0, 0, 0, 1], [1, 1, 0, 0, 0], [0] * 5]
    vision, text = llava_masks(ids[:2], tokens_per_image=1)  # no attention mask: PAD is a text token
    assert vision.tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert text.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("kwargs, error", [
    (dict(tokens_per_image=0), ValueError),
    (dict(tokens_per_image=2.0), ValueError),
    (dict(max_length=0), ValueError),
    (dict(padding_side="middle"), ValueError),
    (dict(text="before_image"), ValueError),
])
def test_bad_options(kwargs, error):
    with pytest.raises(error):
        llava_masks(torch.tensor([[1, I, 2]]), **kwargs)
    with pytest.raises(error):
        llava_mask_fn(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="input_ids"):
        llava_masks(torch.tensor([1, I, 2]))
    with pytest.raises(TypeError, match="integer"):
        llava_masks(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        llava_masks(torch.tensor([[1, I, 2]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="input_ids"):
        llava_mask_fn(4)({"attention_mask": torch.ones(1, 3)})
