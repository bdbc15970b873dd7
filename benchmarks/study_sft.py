#!/usr/bin/env python
"""Does pre-training MIR predict quality *after* supervised fine-tuning?  (issue 14)

The paper (arXiv 2410.07167) relates MIR at the end of pre-training to benchmark results after
supervised fine-tuning (SFT). ``benchmarks/study_mir_quality.py`` compares MIR with accuracy at
the end of pre-training only; this script adds the SFT stage and tests the claim as stated.

1. Pre-training: every run of the study (its ``RunSpec`` list, its runner ``run_one``, its
   parts, the common step budget) is re-run here, because the study keeps no projector
   weights; the run's final projector is kept, with the study's own pre-training MIR (paper,
   per-modality and covariance-only variants), vision/text norm ratio and digit accuracy.
2. SFT, the same recipe, budget and SFT seed for every run (LLaVA-style): the pre-trained
   projector and LoRA adapters (peft) on the LLM's attention and MLP projections are trained on
   instruction data built from the training images::

       BOS "... USER:" <9 image tokens> " Which digit is this? ASSISTANT:" " seven" EOS
       \\_____ prefix ____/ \\_ vision _/ \\__________________ text __________________/
                                                                      loss here ^^^^^^^^

   Three tasks: the digit's name, "Is the digit even?" (yes/no) and "What is the digit plus
   one?" (a number word, nine -> ten); two phrasings of each question are trained.
3. Evaluation on the held-out images (the study's probe digits, never trained on) with every
   task's first phrasing: exact match of greedy decoding (the answer's tokens and then EOS),
   computed with one teacher-forced forward (greedy decoding reproduces the answer exactly iff
   every answer position's argmax is the answer's next token). MIR after SFT: ``MIRProbe`` on
   the study's probe (its caption layout), paper MIR and the per-modality variant.
4. Spearman(pre-training MIR, post-SFT average accuracy) with a bootstrap 95% interval over runs
   (the study's ``spearman_boot``), beside Spearman(pre-training accuracy, ...) and
   Spearman(norm ratio, ...); a figure; ``results.json``; ``RESULTS.md`` with a README-ready
   section written from the numbers.

    python benchmarks/study_sft.py                  # every run of the study on the real parts
    python benchmarks/study_sft.py --quick          # tiny parts, a few steps, 3 runs (seconds)
    python benchmarks/study_sft.py --runs main_s0,lr3e-2 --steps 4 --sft-steps 4 --probe 20   # real-parts smoke
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "study_sft"
STUDY_RESULTS = REPO / "benchmarks" / "study" / "results.json"


def load_study():
    """``benchmarks/study_mir_quality.py`` as a module (it puts ``examples/`` on ``sys.path``)."""
    if "study_mir_quality" in sys.modules:
        return sys.modules["study_mir_quality"]
    spec = importlib.util.spec_from_file_location("study_mir_quality", REPO / "benchmarks" / "study_mir_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


study = load_study()
lvlm = study.lvlm

# ----------------------------------------------------------------------------- instruction data
NUMBER_WORDS = lvlm.DIGIT_WORDS + ["ten"]


@dataclass(frozen=True)
class SFTTask:
    """One instruction task: question phrasings (the first is the evaluated one) and the answer of a digit."""

    name: str
    questions: tuple[str, ...]
    answer: Callable[[int], str]


TASKS: tuple[SFTTask, ...] = (
    SFTTask("digit", ("Which digit is this?", "What digit is shown?"), lambda d: NUMBER_WORDS[d]),
    SFTTask("even", ("Is the digit even?", "Is this digit an even number?"), lambda d: "yes" if d % 2 == 0 else "no"),
    SFTTask("plus_one", ("What is the digit plus one?", "What is one more than this digit?"),
            lambda d: NUMBER_WORDS[d + 1]),
)
TASK_NAMES = [t.name for t in TASKS]


def sft_texts() -> list[str]:
    """Every string the SFT sequences contain (the tiny tokenizer's vocabulary must cover them)."""
    out = [" " + q + lvlm.ASSISTANT_PROMPT for t in TASKS for q in t.questions]
    return out + [" " + w for w in NUMBER_WORDS + ["yes", "no"]]


class SFTTinyTokenizer(lvlm.TinyTokenizer):
    """The example's tiny word tokenizer plus the SFT words (appended: the old ids are unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        for w in sorted({t for s in sft_texts() for t in self.PATTERN.findall(s)}):
            if w not in self.vocab:
                self.vocab[w] = len(self.vocab)
        self.eos_id = 0  # the tiny Llama's eos (= pad) id


def eos_id(tok: Any) -> int:
    return tok.eos_id if isinstance(tok, SFTTinyTokenizer) else int(tok.tok.eos_token_id)


class SFTLayout:
    """Token ids of the SFT sequences: prefix | image | question + " ASSISTANT:" | answer + EOS."""

    def __init__(self, tok: Any, prefix: Sequence[int], n_image: int) -> None:
        self.tok, self.prefix, self.n_image, self.eos = tok, list(prefix), n_image, eos_id(tok)
        self.question_ids = {(t.name, i): tok.encode(" " + q + lvlm.ASSISTANT_PROMPT) for t in TASKS
                             for i, q in enumerate(t.questions)}

    def answer_ids(self, task: SFTTask, digit: int) -> list[int]:
        return self.tok.encode(" " + task.answer(digit)) + [self.eos]

    def sample(self, task: SFTTask, phrasing: int, digit: int) -> tuple[list[int], list[int]]:
        """Ids and kinds (0 prefix, 1 image, 2 question, 3 answer) of one sequence."""
        q, a = self.question_ids[(task.name, phrasing)], self.answer_ids(task, digit)
        ids = self.prefix + [self.tok.image_placeholder_id] * self.n_image + q + a
        return ids, [0] * len(self.prefix) + [1] * self.n_image + [2] * len(q) + [3] * len(a)


class SFTDataset(torch.utils.data.Dataset):
    """(features [n_img, C], digit, task index, phrasing index) items: every image with every task;
    ``train=True`` cycles the phrasings over images, else every item asks the first phrasing."""

    def __init__(self, features: Tensor, labels: Tensor, train: bool) -> None:
        self.features, self.labels, self.train = features, labels, train

    def __len__(self) -> int:
        return len(self.labels) * len(TASKS)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int, int]:
        img, task = divmod(i, len(TASKS))
        phrasing = (img % len(TASKS[task].questions)) if self.train else 0
        return self.features[img], int(self.labels[img]), task, phrasing


class SFTCollate:
    """Batches for ``LVLM(**batch)``: ``input_ids``, ``attention_mask``, ``image_features``,
    ``vision_mask``, ``text_mask`` (question and answer), ``targets`` (the next answer token at
    every position that predicts one, else -100), ``task`` [B] and ``digit`` [B]."""

    def __init__(self, layout: SFTLayout) -> None:
        self.layout = layout

    def __call__(self, items: Sequence[tuple[Tensor, int, int, int]]) -> dict[str, Tensor]:
        batch, _ = lvlm.padded_batch([self.layout.sample(TASKS[t], p, d) for _, d, t, p in items],
                                     self.layout.tok.pad_id, torch.stack([f for f, *_ in items]))
        return {**batch, "task": torch.tensor([t for _, _, t, _ in items]),
                "digit": torch.tensor([d for _, d, _, _ in items])}


# ----------------------------------------------------------------------------- the SFT model
@dataclass
class SFTRecipe:
    """The one SFT recipe every pre-trained run gets."""

    steps: int = 80
    batch_size: int = 12
    lr: float = 5e-4  # AdamW, constant, projector and LoRA alike
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    seed: int = 0  # LoRA initialisation and data order: the same for every run


def sft_tokenizer(parts: Any) -> Any:
    return SFTTinyTokenizer() if isinstance(parts.layout.tok, lvlm.TinyTokenizer) else parts.layout.tok


def build_sft_model(parts: Any, projector: str, projector_state: dict[str, Tensor], recipe: SFTRecipe,
                    tok: Any) -> lvlm.LVLM:
    """An :class:`lvlm.LVLM` on a copy of the frozen LLM (the parts' LLM stays untouched) with the
    given projector weights and fresh LoRA adapters (``peft.inject_adapter_in_model``); only the
    projector and the adapters train. The tiny LLM's vocabulary grows by the SFT words (new,
    seeded random rows; the example's ids keep their embeddings)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(recipe.seed)
    llm = copy.deepcopy(parts.llm)
    n_old = llm.get_input_embeddings().weight.shape[0]
    if isinstance(tok, SFTTinyTokenizer) and len(tok) > n_old:
        llm.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            w = llm.get_input_embeddings().weight
            g = torch.Generator().manual_seed(1234)
            w[n_old:] = torch.randn(len(tok) - n_old, w.shape[1], generator=g) * llm.config.initializer_range
    model = lvlm.LVLM(llm, parts.feature_dim, parts.layout.prefix, parts.layout.digit_token_ids, projector=projector,
                      use_kv_cache=False)  # LoRA changes the prefix's keys/values: no cached prefix
    model.projector.load_state_dict(projector_state)
    cfg = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                     target_modules=list(recipe.target_modules))
    inject_adapter_in_model(cfg, model.llm)
    for name, p in model.llm.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The SFT-trained weights (projector and LoRA adapters)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keep}


def train_sft(model: lvlm.LVLM, loader: Any, recipe: SFTRecipe) -> list[float]:
    """``recipe.steps`` AdamW steps on the answer loss (cycling the loader); the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    model.train()
    losses, it = [], iter(loader)
    for _ in range(recipe.steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def exact_match(model: lvlm.LVLM, loader: Any) -> dict[str, float]:
    """Exact-match accuracy of greedy decoding per task and their mean (``"average"``): an item is
    right iff at every answer position the argmax over the vocabulary is the answer's next token
    (answer words and EOS), which is when greedy decoding returns exactly the answer."""
    model.eval()
    right = {t: 0 for t in TASK_NAMES}
    total = {t: 0 for t in TASK_NAMES}
    for batch in loader:
        out = model(**{k: v for k, v in batch.items() if k != "targets"})
        logits = model.llm.get_output_embeddings()(out.hidden)
        keep = batch["targets"] != -100
        hit = (logits.argmax(-1) == batch["targets"]) | ~keep
        ok = hit.all(1)
        for b, t in enumerate(batch["task"].tolist()):
            right[TASK_NAMES[t]] += int(ok[b])
            total[TASK_NAMES[t]] += 1
    acc = {t: right[t] / total[t] for t in TASK_NAMES}
    acc["average"] = float(np.mean([acc[t] for t in TASK_NAMES]))
    return acc


def measure_mir(model: lvlm.LVLM, probe_loader: Any) -> dict[str, float]:
    """Paper MIR (with its drivers, :func:`lvlm.mir_drivers`) and the per-modality variant of
    ``model`` on the study's probe, through ``mir_lightning.MIRProbe``."""
    from mir_lightning import MIRProbe

    out: dict[str, float] = {}
    for name, kw in (("mir", {}), ("mir_pm", {"normalization": "per_modality"})):
        res = MIRProbe(probe_loader, **kw).run(model)
        if res.error is not None:
            raise RuntimeError(f"post-SFT {name} failed: {res.error}")
        entry = {"mir": res.mir, **{k: v.tolist() for k, v in res.stats.items()}}
        d = lvlm.mir_drivers(entry)
        if name == "mir":
            out.update({k: d[k] for k in ("mir", "mir_cov", "norm_ratio_mean", "mean_share")})
        else:
            out["mir_pm"] = d["mir"]
    return out


# ----------------------------------------------------------------------------- one run
PRE_COLUMNS = ("mir", "mir_pm", "mir_cov", "norm_ratio_mean", "mean_share", "acc", "caption_loss", "img_norm")


def sft_one(parts: Any, spec: Any, steps: int, batch_size: int, recipe: SFTRecipe, tok: Any,
            models_dir: Path | None) -> dict:
    """Pre-train ``spec`` with the study's runner (no intermediate validation), then SFT and evaluate."""
    t0 = time.time()
    pre = study.run_one(parts, spec, steps, steps, batch_size, keep_model=True)
    t_pre = time.time() - t0
    final = study.final_row(pre, steps)
    projector_state = {k[len("projector."):]: v for k, v in pre["module"].model.trainable_state_dict().items()}
    probe_loader = pre["probe_loader"]
    del pre["module"]

    t0 = time.time()
    model = build_sft_model(parts, spec.projector, projector_state, recipe, tok)
    layout = SFTLayout(tok, parts.layout.prefix, parts.layout.n_image)
    collate = SFTCollate(layout)
    g = torch.Generator().manual_seed(recipe.seed)
    train_dl = torch.utils.data.DataLoader(SFTDataset(parts.train_features, parts.train_labels, train=True),
                                           batch_size=recipe.batch_size, shuffle=True, generator=g,
                                           collate_fn=collate, drop_last=True)
    losses = train_sft(model, train_dl, recipe)
    t_sft = time.time() - t0
    t0 = time.time()
    acc = exact_match(model, eval_loader(parts, tok))
    t_eval = time.time() - t0
    t0 = time.time()
    mir_after = measure_mir(model, probe_loader)
    t_mir = time.time() - t0
    if models_dir is not None:
        models_dir.mkdir(parents=True, exist_ok=True)
        torch.save(trainable_state(model), models_dir / f"{spec.name}.pt")
        torch.save(projector_state, models_dir / f"{spec.name}_pretrained.pt")
    return {
        "spec": asdict(spec),
        "pre": {k: float(final.get(k, math.nan)) for k in PRE_COLUMNS},
        "sft_acc": acc,
        "post": mir_after,
        "sft_loss_first": losses[0], "sft_loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])),
        "wall": {"pretrain_s": t_pre, "sft_s": t_sft, "eval_s": t_eval, "mir_s": t_mir},
    }


def eval_loader(parts: Any, tok: Any, batch_size: int = 50) -> torch.utils.data.DataLoader:
    """The held-out SFT evaluation: the study's probe images (never trained on), every task, first phrasing."""
    layout = SFTLayout(tok, parts.layout.prefix, parts.layout.n_image)
    ds = SFTDataset(parts.probe_features, parts.probe_labels, train=False)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=SFTCollate(layout))


# ----------------------------------------------------------------------------- statistics and report
SFT_CORRELATIONS = [  # (pre-training column, post-SFT column)
    ("mir", "average"), ("mir_pm", "average"), ("mir_cov", "average"), ("acc", "average"),
    ("norm_ratio_mean", "average"), ("mir", "digit"), ("mir", "even"), ("mir", "plus_one"),
    ("post_mir", "average"),
]
XNAMES = {"mir": "pre-training MIR (paper)", "mir_pm": "pre-training MIR, per-modality variant",
          "mir_cov": "pre-training MIR, covariance-only variant", "acc": "pre-training digit accuracy",
          "norm_ratio_mean": "pre-training vision/text norm ratio (mean over layers)",
          "post_mir": "post-SFT MIR (paper)"}
YNAMES = {"average": "post-SFT average accuracy", "digit": "post-SFT digit task", "even": "post-SFT even task",
          "plus_one": "post-SFT plus-one task"}


def xcol(run: dict, key: str) -> float:
    return run["post"]["mir"] if key == "post_mir" else run["pre"][key]


def analyse(runs: list[dict], n_boot: int) -> list[dict]:
    out = []
    for i, (x, y) in enumerate(SFT_CORRELATIONS):
        c = study.spearman_boot([xcol(r, x) for r in runs], [r["sft_acc"][y] for r in runs], n_boot, seed=2000 + i)
        out.append({"x": x, "y": y, **c})
    return out


def _f(v, fmt="{:.3f}"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _ci(c):
    return f"{_f(c['rho'], '{:+.2f}')} [{_f(c['lo'], '{:+.2f}')}, {_f(c['hi'], '{:+.2f}')}]"


def _verdict(c) -> str:
    if not math.isfinite(c["rho"]):
        return "undefined"
    if c["hi"] < 0:
        return "negative (interval excludes 0)"
    if c["lo"] > 0:
        return "positive (interval excludes 0)"
    return "inconclusive (interval includes 0)"


def readme_section(results: dict) -> str:
    """The README section, written from the numbers."""
    cfg, runs = results["config"], results["runs"]
    by = {(c["x"], c["y"]): c for c in results["correlations"]}
    cm, ca, cn, cp = by[("mir", "average")], by[("acc", "average")], by[("norm_ratio_mean", "average")], \
        by[("post_mir", "average")]
    best = max(runs, key=lambda r: r["sft_acc"]["average"])
    worst = min(runs, key=lambda r: r["sft_acc"]["average"])
    low = min(runs, key=lambda r: r["pre"]["mir"])
    lines = ["## Does pre-training MIR predict quality after SFT?", ""]
    if cfg["tiny"] or cfg["quick"]:
        lines += ["**Smoke test only** (random tiny parts or a few steps): these numbers say nothing about MIR.", ""]
    elif len(runs) < 5:
        lines += [f"**Smoke run only** ({len(runs)} runs): too few for a correlation to mean anything.", ""]
    lines += [
        f"Every pre-training run of `benchmarks/study_mir_quality.py` ({len(runs)} runs, {cfg['steps']} steps each) "
        f"got the same LLaVA-style SFT: projector + LoRA (r {cfg['recipe']['lora_r']}) on {cfg['parts']}, "
        f"{cfg['recipe']['steps']} steps of batch {cfg['recipe']['batch_size']}, AdamW lr {cfg['recipe']['lr']:g}, "
        f"SFT seed {cfg['recipe']['seed']} for all, on three instruction tasks (digit name, even yes/no, digit plus "
        f"one), evaluated by greedy exact match on {cfg['n_eval_images']} held-out images x 3 tasks. "
        f"Command: `{cfg['command']}` ({results['wall_s'] / 60:.1f} min on {cfg['machine']}).",
        "",
        f"- Spearman(pre-training MIR, post-SFT average accuracy) = {_ci(cm)} (95% bootstrap over {len(runs)} runs): "
        f"{_verdict(cm)}. The paper's claim (lower MIR, better after SFT) predicts a negative rho.",
        f"- Spearman(pre-training accuracy, post-SFT average) = {_ci(ca)}: {_verdict(ca)}; "
        f"Spearman(vision/text norm ratio, post-SFT average) = {_ci(cn)}: {_verdict(cn)}.",
        f"- Variants: per-modality {_ci(by[('mir_pm', 'average')])}, covariance-only "
        f"{_ci(by[('mir_cov', 'average')])}. MIR measured after SFT: {_ci(cp)}.",
        f"- Post-SFT average accuracy ranges from {worst['sft_acc']['average']:.2f} ({worst['spec']['name']}, "
        f"pre-training MIR {worst['pre']['mir']:.2f}) to {best['sft_acc']['average']:.2f} ({best['spec']['name']}, "
        f"MIR {best['pre']['mir']:.2f}); the lowest pre-training MIR, {low['pre']['mir']:.2f} ({low['spec']['name']}), "
        f"reaches {low['sft_acc']['average']:.2f}.",
    ]
    if math.isfinite(cm["rho"]) and math.isfinite(ca["rho"]):
        closer = ("pre-training accuracy" if abs(ca["rho"]) > abs(cm["rho"]) else "pre-training MIR") \
            if abs(ca["rho"]) != abs(cm["rho"]) else "both equally"
        lines.append(f"- Post-SFT accuracy follows {closer} more closely, nominally (|rho| {abs(ca['rho']):.2f} for "
                     f"pre-training accuracy, {abs(cm['rho']):.2f} for MIR; see the intervals above).")
    else:
        lines.append("- Whether post-SFT accuracy follows pre-training accuracy or MIR more closely cannot be said: "
                     "one of the two correlations is undefined (a constant column).")
    lines += [
        "",
        "Supported: " + ("the paper's direction (lower pre-training MIR, better after SFT)" if cm["hi"] < 0 else
                         "nothing of the headline claim at this scale") + ". "
        "Contradicted: " + ("the headline claim (the interval excludes a negative relation)" if cm["lo"] > 0 else
                            "nothing decisively (the interval includes 0 or is negative)") + ". "
        "Cannot be tested here: the paper's scale (7B LLMs, 558K pre-training pairs, real benchmarks), full "
        "fine-tuning of the LLM (LoRA only here), and question types beyond three templated digit questions.",
    ]
    return "\n".join(lines)


def write_report(results: dict, out: Path) -> Path:
    lines = ["# Pre-training MIR vs quality after SFT (issue 14)", "", readme_section(results), "",
             "## Runs", "",
             "| run | setting | pre MIR | pre MIR pm | pre MIR cov | v/t norm ratio | pre acc | SFT digit | SFT even "
             "| SFT plus-one | SFT average | post-SFT MIR | post-SFT MIR pm | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        p, a = r["pre"], r["sft_acc"]
        lines.append(
            f"| {r['spec']['name']} | {r['spec']['label']} | {_f(p['mir'])} | {_f(p['mir_pm'])} | {_f(p['mir_cov'])} | "
            f"{_f(p['norm_ratio_mean'], '{:.2f}')} | {_f(p['acc'], '{:.2f}')} | {a['digit']:.2f} | {a['even']:.2f} | "
            f"{a['plus_one']:.2f} | **{a['average']:.3f}** | "
            f"{_f(r['post']['mir'])} | {_f(r['post']['mir_pm'])} | {sum(r['wall'].values()):.0f} |")
    lines += ["", "## Spearman correlations across runs", "",
              f"`scipy.stats.spearmanr`; 95% percentile bootstrap over runs ({results['config']['boot']} resamples).",
              "", "| x | y | rho | 95% interval | p |", "|---|---|---:|---|---:|"]
    for c in results["correlations"]:
        lines.append(f"| {XNAMES[c['x']]} | {YNAMES[c['y']]} | {_f(c['rho'], '{:+.2f}')} | "
                     f"[{_f(c['lo'], '{:+.2f}')}, {_f(c['hi'], '{:+.2f}')}] | {_f(c['p'], '{:.3f}')} |")
    rep = results.get("reproduction")
    if rep:
        lines += ["", f"Pre-training re-run against the study's recorded results ({rep['runs']} runs): max |MIR "
                  f"difference| {rep['max_abs_mir_diff']:.2g}, max |accuracy difference| {rep['max_abs_acc_diff']:.2g}."]
    lines += ["", f"![pre-training MIR vs post-SFT accuracy]({Path(results['figure']).name})", ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_figure(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    by = {(c["x"], c["y"]): c for c in results["correlations"]}
    y = [r["sft_acc"]["average"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key in zip(axes, ("mir", "acc", "post_mir"), strict=True):
        x = [xcol(r, key) for r in runs]
        ax.scatter(x, y)
        for xi, yi, r in zip(x, y, runs, strict=True):
            ax.annotate(r["spec"]["name"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(XNAMES[key])
        ax.set_ylabel("post-SFT average exact match")
        ax.set_title(f"Spearman {_ci(by[(key, 'average')])}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "mir_vs_sft_accuracy.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def reproduction(runs: list[dict], cfg: dict) -> dict | None:
    """The re-run's pre-training values against the study's ``results.json`` (same budget, real parts)."""
    if cfg["tiny"] or not STUDY_RESULTS.is_file():
        return None
    rec = json.loads(STUDY_RESULTS.read_text())
    rc = rec["config"]
    if (rc["steps"], rc["probe"], rc["batch_size"], rc["tiny"]) != (cfg["steps"], cfg["probe"], cfg["batch_size"], False):
        return None
    recorded = {r["spec"]["name"]: study.final_row(r, rc["steps"]) for r in rec["runs"]}
    both = [r for r in runs if r["spec"]["name"] in recorded]
    if not both:
        return None
    return {"runs": len(both),
            "max_abs_mir_diff": max(abs(r["pre"]["mir"] - recorded[r["spec"]["name"]]["mir"]) for r in both),
            "max_abs_acc_diff": max(abs(r["pre"]["acc"] - recorded[r["spec"]["name"]]["acc"]) for r in both)}


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny parts, a few steps, 3 runs (the test suite's smoke)")
    p.add_argument("--tiny", action="store_true", help="random tiny parts (automatic when the weight packages are missing)")
    p.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT}; --quick: runs/study_sft_quick)")
    p.add_argument("--steps", type=int, default=None, help="pre-training steps per run (default: the study's 78; quick 4)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the study's main setting")
    p.add_argument("--runs", default=None, help="comma-separated subset of the study's run names (default: all; "
                                                "quick: main_s0,lr3e-4,lr3e-2)")
    p.add_argument("--probe", type=int, default=None, help="held-out probe = SFT evaluation images (default 100; tiny 40)")
    p.add_argument("--batch-size", type=int, default=None, help="pre-training batch (the study's: 12; tiny 8)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default 80; quick 40)")
    p.add_argument("--sft-batch-size", type=int, default=None, help="SFT batch (default 12; tiny 8)")
    p.add_argument("--sft-lr", type=float, default=None, help=f"SFT AdamW learning rate (default {SFTRecipe.lr:g}; quick 1e-2)")
    p.add_argument("--lora-r", type=int, default=SFTRecipe.lora_r, help="LoRA rank")
    p.add_argument("--boot", type=int, default=None, help="bootstrap resamples (default 2000; quick 300)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = p.parse_args(argv)
    if a.quick:
        a.tiny = True
    if not a.tiny and not lvlm.real_parts_available():
        print("[sft] weight packages not installed -> random tiny parts (--tiny)", flush=True)
        a.tiny = True
    q, t = a.quick, a.tiny
    a.steps = a.steps or (4 if q else (20 if t else 78))
    a.probe = a.probe or (40 if t else 100)
    a.batch_size = a.batch_size or (8 if t else 12)
    a.sft_steps = a.sft_steps or (40 if q else 80)
    a.sft_lr = a.sft_lr or (1e-2 if q else SFTRecipe.lr)
    a.sft_batch_size = a.sft_batch_size or (8 if t else 12)
    a.boot = a.boot or (300 if q else 2000)
    if a.runs is None and q:
        a.runs = "main_s0,lr3e-4,lr3e-2"
    a.out = a.out or str(REPO / "runs" / "study_sft_quick" if q else DEFAULT_OUT)
    if a.probe % 10:
        p.error("--probe must be a multiple of 10 (balanced over digits)")
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    parts = study.load_parts(args.tiny, args.probe)
    print(f"[sft] parts: {parts.description} (data {parts.timings['data_s']:.0f}s, LLM "
          f"{parts.timings['llm_load_s']:.0f}s)", flush=True)
    specs = study.run_specs(args.seeds, lr_sweep=True)
    if args.runs:
        keep = args.runs.split(",")
        unknown = set(keep) - {s.name for s in specs}
        if unknown:
            raise SystemExit(f"unknown run names {sorted(unknown)}; the study's are {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in keep]
    recipe = SFTRecipe(steps=args.sft_steps, batch_size=args.sft_batch_size, lr=args.sft_lr, lora_r=args.lora_r,
                       lora_alpha=2 * args.lora_r)
    tok = sft_tokenizer(parts)
    runs = []
    for i, spec in enumerate(specs):
        r = sft_one(parts, spec, args.steps, args.batch_size, recipe, tok, out / "models")
        runs.append(r)
        a, p = r["sft_acc"], r["pre"]
        print(f"[sft] {i + 1}/{len(specs)} {spec.name}: pre MIR {p['mir']:.3f} acc {p['acc']:.2f} | SFT loss "
              f"{r['sft_loss_first']:.2f}->{r['sft_loss_last']:.2f}, exact match digit {a['digit']:.2f} even "
              f"{a['even']:.2f} plus-one {a['plus_one']:.2f} avg {a['average']:.3f} | post MIR {r['post']['mir']:.3f} "
              f"| {sum(r['wall'].values()):.0f}s (pre {r['wall']['pretrain_s']:.0f}, SFT {r['wall']['sft_s']:.0f}, "
              f"eval {r['wall']['eval_s']:.0f}, MIR {r['wall']['mir_s']:.0f}) | elapsed "
              f"{(time.time() - t_start) / 60:.1f} min", flush=True)
    argv_s = " ".join(argv) if argv is not None else " ".join(sys.argv[1:])
    cfg = {"command": f"python benchmarks/study_sft.py {argv_s}".strip(), "steps": args.steps,
           "batch_size": args.batch_size, "probe": args.probe, "n_eval_images": len(parts.probe_labels),
           "boot": args.boot, "tiny": args.tiny, "quick": args.quick, "threads": args.threads,
           "recipe": asdict(recipe), "tasks": {t.name: list(t.questions) for t in TASKS},
           "parts": parts.description, "timings": parts.timings, "machine": study.machine_line(args.threads)}
    results = {"config": cfg, "runs": runs, "correlations": analyse(runs, args.boot),
               "reproduction": reproduction(runs, cfg), "wall_s": time.time() - t_start}
    results["figure"] = str(make_figure(results, out).relative_to(out))
    results["readme_section"] = readme_section(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = write_report(results, out)
    print(f"[sft] wrote {out / 'results.json'}, {report}, {out / results['figure']} | wall "
          f"{results['wall_s'] / 60:.1f} min", flush=True)
    return results


if __name__ == "__main__":
    main()
