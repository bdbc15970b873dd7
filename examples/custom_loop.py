#!/usr/bin/env python
"""MIR in a plain PyTorch training loop: ``MIRProbe.run(model)`` every N steps, TensorBoard
through ``torch.utils.tensorboard.SummaryWriter``.

Same model and data as ``examples/pretrain_lvlm.py`` (``examples/lvlm.py``: frozen SmolLM2-135M,
EfficientNet-Lite0 features of MNIST digits, trainable projector); no Lightning. The loop
itself is the ten lines in :func:`train`; MIR is one call::

    probe = MIRProbe(probe_loader)     # decoder layers and vision/text masks found automatically
    result = probe.run(model)          # eval + no_grad, hooks only for its own forwards
    writer.add_scalar("mir", result.mir, step)

Here that call and its logging (the tags, per-layer scalars and figures every adapter writes)
go through ``examples/loop_adapter.py``, the 60-line adapter of README "Adding MIR to another
trainer".

    python examples/custom_loop.py --tiny          # random tiny parts, seconds
    python examples/custom_loop.py                 # real parts (examples/requirements-parts.txt)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))

import lvlm  # noqa: E402
from loop_adapter import MIRLoopAdapter  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = lvlm.probe_script_parser(__doc__, "--log-dir", "runs/custom_loop", "TensorBoard folder of this run")
    return lvlm.parse_probe_script_args(parser, argv)


def measure(mir: MIRLoopAdapter, model: lvlm.LVLM, probe_loader: Any, step: int) -> dict[str, Any]:
    """Run the probe (MIR, per-layer scalars and figures logged by the adapter) and log the
    task metrics at ``step``; one row."""
    entry = mir.measure(model, step).entry
    scores = lvlm.probe_scores(model, probe_loader)
    for name in lvlm.ProbeScores.names():
        mir.writer.add_scalar(f"val/{name}", getattr(scores, name), step)
    return {"step": step, **vars(scores), **lvlm.mir_drivers(entry), "probe_s": mir.last_result.seconds}


def train(args: argparse.Namespace) -> lvlm.ProbeRun:
    from torch.utils.tensorboard import SummaryWriter

    parts = lvlm.load_parts(args.tiny, args.n_train, args.n_probe, args.seed)
    train_loader, probe_loader = parts.loaders(args.batch_size, seed=args.seed)
    model = parts.model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    writer = SummaryWriter(args.log_dir)
    mir = MIRLoopAdapter(probe_loader, writer, every_n_steps=args.probe_every)
    start = time.time()
    rows = [measure(mir, model, probe_loader, 0)]
    step = 0
    while step < args.max_steps:
        for batch in train_loader:
            model.train()
            loss = model(**batch).loss
            writer.add_scalar("train/caption_loss", loss.item(), step)  # computed with the weights after `step` steps
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % args.probe_every == 0 or step == args.max_steps:
                rows.append(measure(mir, model, probe_loader, step))
                r = rows[-1]
                print(f"[probe] step {step}: MIR {r['mir']:.3f} ({r['probe_s']:.1f}s), digit acc {r['digit_acc']:.2f}, "
                      f"caption loss {r['caption_loss']:.3f}, elapsed {time.time() - start:.0f}s", flush=True)
            if step >= args.max_steps:
                break
    writer.close()
    return lvlm.ProbeRun(rows=rows, model=model, probe_loader=probe_loader)


def main(argv: list[str] | None = None) -> lvlm.ProbeRun:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = train(args)
    lvlm.print_summary(result.rows)
    print(f"\nTensorBoard: tensorboard --logdir {args.log_dir}")
    return result


if __name__ == "__main__":
    main()
