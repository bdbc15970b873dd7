"""benchmarks/study_mir_quality.py on the example's random tiny parts: one run's MIR against the
float64 reference at its final weights, the early-stopping replays against a direct window
check, and --quick end to end (the weight packages hidden, so it must fall back to --tiny)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from example_helpers import lvlm_reference

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study_mir_quality.py"

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")


def _load_study():
    spec = importlib.util.spec_from_file_location("study_mir_quality", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_spearman_bootstrap_known_cases():
    study = _load_study()
    x = np.arange(8.0)
    up = study.spearman_boot(x, x ** 2, n_boot=200)
    assert up["rho"] == pytest.approx(1.0) and up["lo"] == pytest.approx(1.0) and up["hi"] == pytest.approx(1.0)
    down = study.spearman_boot(x, -x, n_boot=200)
    assert down["rho"] == pytest.approx(-1.0) and down["hi"] == pytest.approx(-1.0)
    noisy = study.spearman_boot(x, [3, 1, 4, 1, 5, 9, 2, 6], n_boot=500)
    assert -1 <= noisy["lo"] <= noisy["hi"] <= 1 and noisy["n_boot"] > 400
    const = study.spearman_boot(x, np.ones(8), n_boot=50)  # undefined, reported as NaN, no crash
    assert math.isnan(const["rho"]) and const["n_boot"] == 0


def test_run_rows_equal_reference_at_final_weights():
    study = _load_study()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parts = study.load_parts(tiny=True, probe=40)
        spec = study.RunSpec("main_s0", "main", main=True)
        run = study.run_one(parts, spec, steps=4, val_every=2, batch_size=8, keep_model=True)
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in run["rows"]] == [0, 2, 4]
    mir, fd, terms = lvlm_reference(run["module"].model, run["probe_loader"])
    final = run["rows"][-1]
    # measured: 7e-14 (MIR) and 3e-13 (covariance-only variant) from the reference; both float64 over
    # the same fp32 hidden states with an exact outlier median (median_buffer 1024 > 360 tokens)
    assert abs(final["mir"] - mir) < 1e-9
    assert final["fd"] == pytest.approx(fd, rel=1e-9, abs=1e-12)
    cov = sum(t["fd"] - t["mean_term"] for t in terms)
    assert abs(final["mir_cov"] - math.log10(cov)) < 1e-9
    assert final["mean_share"] == pytest.approx(sum(t["mean_term"] for t in terms) / fd.sum(), rel=1e-9)
    assert final["outliers_vision"] == sum(t["outliers_vision"] for t in terms)
    assert abs(run["rows"][0]["mir"] - mir) > 1e-3  # trained: the final weights are not the initial ones


def _plateau_window(values, patience, band):
    """First index whose last patience + 1 values (float32, as logged) span at most ``band``."""
    v = np.asarray(values, dtype=np.float32)
    for i in range(patience, len(v)):
        if float(v[i - patience:i + 1].max()) - float(v[i - patience:i + 1].min()) <= band:
            return i
    return None


def test_quick_study_end_to_end_without_weight_packages(tmp_path, monkeypatch):
    study = _load_study()
    monkeypatch.setattr(study.lvlm, "real_parts_available", lambda: False)  # as if the wheels were missing
    out = tmp_path / "study"
    threads = torch.get_num_threads()
    try:
        results = study.main(["--quick", "--out", str(out), "--boot", "200"])
    finally:
        torch.set_num_threads(threads)  # the script pins 1 thread; leave the test session as it was

    cfg = results["config"]
    assert cfg["tiny"] and cfg["quick"]  # fell back to the random tiny parts
    for name in ("results.json", "RESULTS.md", "main_run_curves.png", "mir_vs_accuracy.png",
                 "fd_heatmap_main.png", "norm_ratio_main.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for path in results["figures"].values():
        assert (out / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads((out / "results.json").read_text())
    runs = saved["runs"]
    assert len(runs) >= 6
    assert sum(r["spec"]["name"].startswith("main_s") for r in runs) >= 2  # two seeds of the main setting
    assert len({r["rows"][-1]["step"] for r in runs}) == 1  # same step budget
    main = next(r for r in runs if r["spec"]["main"])
    assert len(main["rows"]) >= 6 and main["rows"][0]["step"] == 0
    for r in runs:
        for row in r["rows"]:
            assert _finite(row["mir"], row["mir_pm"], row["mir_cov"], row["acc"], row["caption_loss"],
                           row["digit_loss"], row["img_norm"], row["norm_ratio_mean"], row["mean_share"])
            assert len(row["fd"]) == len(row["norm_ratio"]) == 4  # the tiny Llama's 4 layers
    assert main["rows"][-1]["caption_loss"] < main["rows"][0]["caption_loss"]  # it trains

    final = saved["analysis"]["final"]
    corr = saved["analysis"]["correlations"]
    assert {(c["x"], c["y"]) for c in corr} >= {("mir", "acc"), ("mir", "caption_loss"), ("mir_pm", "acc"),
                                                 ("mir_cov", "acc"), ("acc", "norm_ratio_mean"),
                                                 ("acc", "mean_share"), ("acc", "img_norm")}
    n_defined = 0
    for c in corr:
        # the random tiny LLM leaves accuracy at chance, possibly equal in every run: Spearman is then
        # undefined (NaN by design); every correlation between non-constant columns must be finite
        if np.ptp(final[c["x"]]) > 0 and np.ptp(final[c["y"]]) > 0:
            assert _finite(c["rho"], c["lo"], c["hi"]), c
            assert -1 <= c["lo"] <= c["hi"] <= 1 and c["n_boot"] > 100
            n_defined += 1
    assert n_defined >= 6
    by = {(c["x"], c["y"]): c for c in corr}
    for m in ("mir", "mir_pm", "mir_cov"):
        assert _finite(by[(m, "caption_loss")]["rho"], by[(m, "caption_loss")]["lo"])
    main_fit = [row for row in main["rows"] if row["step"] > 0]
    plateau = [e for e in saved["analysis"]["early_stopping"] if e["rule"] == "plateau"]
    assert len(plateau) == 9
    for e in plateau:
        i = _plateau_window([row[e["metric"]] for row in main_fit], e["patience"], e["min_delta"])
        assert e["stop_step"] == (None if i is None else main_fit[i]["step"]), e
    report = (out / "RESULTS.md").read_text()
    assert "Spearman" in report and "## Findings" in report and "per-modality" in report
    assert all(r["spec"]["name"] in report for r in runs)
