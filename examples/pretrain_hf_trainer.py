#!/usr/bin/env python
"""MIR during Hugging Face ``Trainer`` pre-training with evaluation switched off, as LLaVA-style
codebases run it (``eval_strategy="no"``): ``MIRTrainerCallback`` runs the probe every N steps.

Same model and data as ``examples/pretrain_lvlm.py`` (``examples/lvlm.py``): ``LVLM(**batch)``
returns the caption loss, which is all the Trainer needs. MIR is one line::

    Trainer(..., callbacks=[MIRTrainerCallback(probe_loader, every_n_steps=25)])

``mir`` and ``mir/fd/layer_XX`` land in ``trainer.state.log_history`` and in every ``report_to``
integration (TensorBoard shows them as ``train/mir``...).

    python examples/pretrain_hf_trainer.py --tiny      # random tiny parts, seconds
    python examples/pretrain_hf_trainer.py             # real parts (examples/requirements-parts.txt)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))
if str(EXAMPLES.parent) not in sys.path:  # a source checkout without installing the package
    sys.path.append(str(EXAMPLES.parent))

import lvlm  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="random tiny parts (smoke test, seconds)")
    p.add_argument("--max-steps", type=int, default=150, help="optimizer steps")
    p.add_argument("--probe-every", type=int, default=25, help="run the MIR probe every N optimizer steps")
    p.add_argument("--batch-size", type=int, default=12, help="training batch size (per device)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the projector (constant)")
    p.add_argument("--n-train", type=int, default=1800, help="training images (tiny parts: at most 160 used)")
    p.add_argument("--n-probe", type=int, default=100, help="held-out probe images, a multiple of 10")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the projector and the shuffling")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--output-dir", default="runs/hf_trainer", help="Trainer output_dir (TensorBoard under runs/)")
    a = p.parse_args(argv)
    if a.tiny:
        a.n_train, a.n_probe = min(a.n_train, 160), min(a.n_probe, 40)
    if a.n_probe % 10:
        p.error("--n-probe must be a multiple of 10 (balanced over digits)")
    return a


@dataclass
class HFRunResult:
    """The Trainer's ``mir`` log entries (``step``, ``mir``, per-layer values), the model, the probe loader."""

    rows: list[dict[str, Any]]
    model: lvlm.LVLM
    probe_loader: Any
    log_history: list[dict[str, Any]]


def train(args: argparse.Namespace) -> HFRunResult:
    from transformers import Trainer, TrainingArguments

    from mir_lightning.integrations.hf_trainer import MIRTrainerCallback

    parts = lvlm.load_parts(args.tiny, args.n_train, args.n_probe, args.seed)
    _, probe_loader = parts.loaders(args.batch_size, seed=args.seed)
    model = parts.model()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",  # as the Lightning example: plain AdamW
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping, as the Lightning example
        eval_strategy="no",  # pre-training without evaluation: MIR comes from the callback's probe
        save_strategy="no",
        logging_steps=args.probe_every,
        report_to=["tensorboard"],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        dataloader_drop_last=True,
        remove_unused_columns=False,  # LVLM.forward takes the whole batch
        disable_tqdm=not sys.stderr.isatty(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=lvlm.FeatureDataset(parts.train_features, parts.train_labels),
        data_collator=lvlm.Collate(parts.layout),
        # median_buffer above the probe's tokens per modality keeps the outlier rule's median row exact
        callbacks=[MIRTrainerCallback(probe_loader, every_n_steps=args.probe_every, median_buffer=1024)],
    )
    trainer.train()
    rows = [dict(entry) for entry in trainer.state.log_history if "mir" in entry]
    return HFRunResult(rows=rows, model=model, probe_loader=probe_loader, log_history=trainer.state.log_history)


def main(argv: list[str] | None = None) -> HFRunResult:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = train(args)
    for row in result.rows:
        print(f"step {row['step']}: MIR {row['mir']:.3f}")
    print(f"\nTensorBoard: tensorboard --logdir {args.output_dir}/runs")
    return result


if __name__ == "__main__":
    main()
