#!/usr/bin/env python
"""MIR during Hugging Face ``Trainer`` pre-training with evaluation switched off, as LLaVA-style
codebases run it (``eval_strategy="no"``): ``MIRTrainerCallback`` runs the probe every N steps.

Same model and data as ``examples/pretrain_lvlm.py`` (``examples/lvlm.py``): ``LVLM(**batch)``
returns the caption loss, which is all the Trainer needs. MIR is one line::

    Trainer(..., callbacks=[MIRTrainerCallback(probe_loader, every_n_steps=25)])

``mir`` and ``mir_fd/layer_XX`` land in ``trainer.state.log_history`` and in every ``report_to``
integration (TensorBoard shows them as ``train/mir``...).

    python examples/pretrain_hf_trainer.py --tiny      # random tiny parts, seconds
    python examples/pretrain_hf_trainer.py             # real parts (examples/requirements-parts.txt)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))

import lvlm  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = lvlm.probe_script_parser(__doc__, "--output-dir", "runs/hf_trainer", "Trainer output_dir (TensorBoard under runs/)")
    return lvlm.parse_probe_script_args(parser, argv)


def train(args: argparse.Namespace) -> lvlm.ProbeRun:
    from transformers import Trainer, TrainingArguments

    from mir_lightning.adapters.hf_trainer import MIRTrainerCallback

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
        callbacks=[MIRTrainerCallback(probe_loader, every_n_steps=args.probe_every)],
    )
    trainer.train()
    rows = [dict(entry) for entry in trainer.state.log_history if "mir" in entry]
    return lvlm.ProbeRun(rows=rows, model=model, probe_loader=probe_loader, log_history=trainer.state.log_history)


def main(argv: list[str] | None = None) -> lvlm.ProbeRun:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = train(args)
    for row in result.rows:
        print(f"step {row['step']}: MIR {row['mir']:.3f}")
    print(f"\nTensorBoard: tensorboard --logdir {args.output_dir}/runs")
    return result


if __name__ == "__main__":
    main()
