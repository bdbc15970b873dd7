"""examples/pretrain_lvlm.py --tiny --moca (MoCa trained with the projector) and
benchmarks/study_paper_claims.py --quick on the example's random tiny parts."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from example_helpers import EXAMPLES  # noqa: F401  (puts examples/ on sys.path)
from reference import reference_mir

import pretrain_lvlm  # noqa: E402

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study_paper_claims.py"


@torch.no_grad()
def _calibrated_reference(model, loader):
    """Float64 reference MIR of an ``lvlm.LVLM`` with MoCa attached, on the hidden states as the
    next module receives them (forward pre-hooks on decoder layers 1..L-1) and, for the last layer,
    the final norm's output (``hidden_states[-1]``'s convention): ``output_hidden_states`` would
    record the layer outputs before MoCa's hook changes them."""
    decoder = model.llm.get_decoder()
    receivers = [*list(decoder.layers)[1:], decoder.norm]
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
               for m in receivers[:-1]]
    handles.append(decoder.norm.register_forward_hook(lambda mod, args, out: seen.append(out.detach())))
    vision, text = [[] for _ in receivers], [[] for _ in receivers]
    model.eval()
    try:
        for batch in loader:
            seen.clear()
            model(**batch)
            assert len(seen) == len(receivers)
            for k, h in enumerate(seen):
                vision[k].append(h[batch["vision_mask"]].double())
                text[k].append(h[batch["text_mask"]].double())
    finally:
        for h in handles:
            h.remove()
    return reference_mir([torch.cat(v) for v in vision], [torch.cat(t) for t in text])


def test_pretrain_moca_trains_scale_and_shift_and_logs_calibrated_mir(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = pretrain_lvlm.main(["--tiny", "--moca", "--log-dir", str(tmp_path), "--max-steps", "10",
                                     "--val-every", "5"])
    finally:
        torch.set_num_threads(threads)  # the script pins 1 thread
    model = result.module.model
    moca = model.moca
    assert tuple(moca.scale.shape) == (4, 64) and tuple(moca.shift.shape) == (4, 64)  # tiny Llama: 4 x 64
    # moved from the identity (scale 1, shift 0): the optimizer holds them
    assert float((moca.scale.detach() - 1).abs().max()) > 1e-4 and float(moca.shift.detach().abs().max()) > 1e-4
    ckpt = torch.load(Path(result.log_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert torch.equal(ckpt["state_dict"]["model.llm.model.moca.scale"], moca.scale.detach())
    assert torch.equal(ckpt["state_dict"]["model.llm.model.moca.shift"], moca.shift.detach())
    assert set(ckpt["state_dict"]) == {"model.llm.model.moca.scale", "model.llm.model.moca.shift",
                                       *(f"model.{k}" for k in model.state_dict() if k.startswith("projector."))}
    assert [r["step"] for r in result.rows] == [0, 5, 10]
    mir, fd, _ = _calibrated_reference(model, result.probe_loader)
    # measured |callback - reference| ~1e-13 (both float64 over the same fp32 states, exact outlier
    # median); MoCa's learned scales change MIR by > 1e-3 here, so 1e-9 fails if they were skipped
    assert abs(result.rows[-1]["mir"] - mir) < 1e-9
    assert result.rows[-1]["fd"] == pytest.approx(fd, rel=1e-9, abs=1e-12)
    with torch.no_grad():  # the same weights without MoCa give another MIR: the test can tell them apart
        saved = moca.scale.clone(), moca.shift.clone()
        moca.scale.fill_(1.0), moca.shift.zero_()
        identity_mir, _, _ = _calibrated_reference(model, result.probe_loader)
        moca.scale.copy_(saved[0]), moca.shift.copy_(saved[1])
    assert abs(identity_mir - mir) > 1e-6
