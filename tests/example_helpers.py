"""Helpers of the tests of examples/: import the example modules and the float64 reference MIR
of an ``lvlm.LVLM`` on a probe, from tokens materialised with ``output_hidden_states``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from reference import reference_mir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


@torch.no_grad()
def lvlm_reference(model, loader):
    """(MIR, per-layer FD [L], per-layer term dicts) of ``model`` (an ``lvlm.LVLM``) on every batch of
    ``loader``: hidden_states[1:] of the frozen LLM on the model's input embeddings, vision and text
    tokens chosen by the batch masks, then tests/reference.py (float64, numpy/scipy)."""
    was_training = model.training
    model.eval()
    vision, text = None, None
    try:
        for batch in loader:
            emb = model.llm.get_input_embeddings()(batch["input_ids"])
            img = model.projector(batch["image_features"])
            emb = emb.masked_scatter(batch["vision_mask"].unsqueeze(-1), img.reshape(-1, img.shape[-1]))
            hidden = model.llm(inputs_embeds=emb, attention_mask=batch["attention_mask"],
                               output_hidden_states=True).hidden_states[1:]
            if vision is None:
                vision, text = [[] for _ in hidden], [[] for _ in hidden]
            for k, h in enumerate(hidden):
                vision[k].append(h[batch["vision_mask"]].double())
                text[k].append(h[batch["text_mask"]].double())
    finally:
        model.train(was_training)
    return reference_mir([torch.cat(v) for v in vision], [torch.cat(t) for t in text])
