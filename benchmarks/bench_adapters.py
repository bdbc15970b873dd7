"""Probe cost per call for the three adapters (Lightning, Hugging Face Trainer, own loop) on the
example model, and what each adapter adds over ``MIRProbe.run`` itself.

The example's frozen SmolLM2-135M (30 decoder layers, D = 576) with its projector, probe of 100
held-out MNIST digits in batches of 50 (``examples/lvlm.py``). Each adapter trains the projector
for ``--calls x --every`` steps with the probe every ``--every`` steps:

* Lightning: ``MIRCallback(probe_dataloader=probe, every_n_steps=N)``, no validation loop;
* HF Trainer: ``MIRTrainerCallback(probe, every_n_steps=N)`` with ``eval_strategy="no"``;
* own loop: ``examples/loop_adapter.py`` (``probe.run(model)``, scalars to a ``SummaryWriter``) every N steps,
  as examples/custom_loop.py runs it.

Per call the adapter's hook (``on_train_batch_end`` / ``on_step_end`` / the loop's measure
function) and the ``MIRProbe.run`` inside it are timed in the same call, so the machine's load
cancels out of their difference, the adapter's own cost (logging, figures, plateau rule, finding
the trainer). The Lightning and HF rows are repeated without TensorBoard figures (the per-layer
figure and the layer x step heatmap, drawn with matplotlib at every probe). The probe's extra time per call is the hook time: training steps without a probe
call take none of it.

    python benchmarks/bench_adapters.py            # real example parts (examples/requirements-parts.txt)
    python benchmarks/bench_adapters.py --tiny     # random tiny parts, a smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from typing import Any, Callable

import _common as C  # first: sets OMP_WAIT_POLICY before torch loads
import torch

sys.path.insert(0, str(C.REPO / "examples"))
import lvlm  # noqa: E402  (the example's parts and model)
from loop_adapter import MIRLoopAdapter  # noqa: E402
from lvlm_lightning import LVLMPretrainer, quiet_known_noise  # noqa: E402


class HookTimer:
    """Times ``owner.hook`` calls that contain a ``probe.run`` call, and that ``probe.run`` (per call)."""

    def __init__(self) -> None:
        self.hook_s: list[float] = []
        self.probe_s: list[float] = []

    def wrap(self, owner: Any, hook: str, probe: Any) -> None:
        original_hook, original_run = getattr(owner, hook), probe.run
        inner: list[float] = []

        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original_run(*args, **kwargs)
            finally:
                inner.append(time.perf_counter() - t0)

        def timed_hook(*args: Any, **kwargs: Any) -> Any:
            inner.clear()
            t0 = time.perf_counter()
            try:
                return original_hook(*args, **kwargs)
            finally:
                if inner:  # a call that ran the probe
                    self.hook_s.append(time.perf_counter() - t0)
                    self.probe_s.append(sum(inner))

        setattr(probe, "run", run)
        setattr(owner, hook, timed_hook)


def lightning_adapter(parts: lvlm.Parts, probe_loader: Any, every: int, steps: int, out: str,
                      figures: bool = True) -> HookTimer:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from mir_lightning import MIRCallback

    train_loader, _ = parts.loaders(batch_size=12)
    callback = MIRCallback(probe_dataloader=probe_loader, every_n_steps=every,
                           log_figures=figures)
    timer = HookTimer()
    timer.wrap(callback, "on_train_batch_end", callback.probe)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=TensorBoardLogger(out, name="lightning"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(LVLMPretrainer(parts.model()), train_loader)
    return timer


def hf_adapter(parts: lvlm.Parts, probe_loader: Any, every: int, steps: int, out: str,
               tensorboard: bool = True) -> HookTimer:
    from transformers import Trainer, TrainingArguments

    from mir_lightning.adapters.hf_trainer import MIRTrainerCallback

    callback = MIRTrainerCallback(probe_loader, every_n_steps=every)
    timer = HookTimer()
    timer.wrap(callback, "on_step_end", callback.probe)
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=12, learning_rate=3e-3,
                             lr_scheduler_type="constant", max_grad_norm=0.0, eval_strategy="no", save_strategy="no",
                             logging_steps=every, report_to=["tensorboard"] if tensorboard else [], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, dataloader_drop_last=True)
    Trainer(model=parts.model(), args=args, data_collator=lvlm.Collate(parts.layout), callbacks=[callback],
            train_dataset=lvlm.FeatureDataset(parts.train_features, parts.train_labels)).train()
    return timer


def own_loop_adapter(parts: lvlm.Parts, probe_loader: Any, every: int, steps: int, out: str) -> HookTimer:
    from torch.utils.tensorboard import SummaryWriter

    train_loader, _ = parts.loaders(batch_size=12)
    model = parts.model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    loop = MIRLoopAdapter(probe_loader, SummaryWriter(f"{out}/own_loop"), every_n_steps=every, log_layer_stats=("fd",),
                          log_figures=False)
    timer = HookTimer()
    timer.wrap(loop, "measure", loop.probe)
    for step, batch in enumerate(train_loader, start=1):
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loop.on_step_end(model, step)
        if step == steps:
            break
    loop.writer.close()
    return timer


ADAPTERS: dict[str, Callable[..., HookTimer]] = {
    "Lightning MIRCallback(every_n_steps), TensorBoard": lightning_adapter,
    "  the same, log_figures=False": partial(lightning_adapter, figures=False),
    "HF Trainer MIRTrainerCallback(every_n_steps), report_to tensorboard": hf_adapter,
    "  the same, report_to none (no figures)": partial(hf_adapter, tensorboard=False),
    "own loop: examples/loop_adapter.py, SummaryWriter scalars": own_loop_adapter,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="random tiny parts of the example (no weight packages)")
    ap.add_argument("--every", type=int, default=2, help="probe every N training steps")
    ap.add_argument("--calls", type=int, default=3, help="probe calls per adapter")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    C.setup(a.threads)
    quiet_known_noise()
    t_start = time.time()
    print(C.machine_info())
    parts = lvlm.load_parts(a.tiny, 160 if a.tiny else 1800, 40 if a.tiny else 100)
    _, probe_loader = parts.loaders(batch_size=12, probe_batch_size=50)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name, adapter in ADAPTERS.items():
            timer = adapter(parts, probe_loader, a.every, a.every * a.calls, out)
            if len(timer.hook_s) != a.calls:
                raise RuntimeError(f"{name}: {len(timer.hook_s)} probe calls, expected {a.calls}")
            hook, probe = C.median(timer.hook_s), C.median(timer.probe_s)
            extra = [h - p for h, p in zip(timer.hook_s, timer.probe_s)]
            rows.append([name, f"{C.fmt(hook)} ({C.fmt(min(timer.hook_s))}-{C.fmt(max(timer.hook_s))})",
                         C.fmt(probe), C.fmt(C.median(extra)), C.fmt(C.median(extra) / probe)])
    print(f"\n{parts.description}: {parts.llm.config.num_hidden_layers} decoder layers, probe of "
          f"{len(probe_loader.dataset)} samples in batches of 50; {a.calls} probe calls per adapter, every "
          f"{a.every} steps; medians over calls\n")
    print(C.table(["adapter", "probe's extra s per call (min-max)", "MIRProbe.run s inside it",
                   "adapter's own s (hook - run)", "adapter's own / run"], rows))
    print(f"\ntotal wall time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
