"""A tiny LLaVA trained by the Hugging Face Trainer with ``MIRTrainerCallback``.

Imported by tests/test_hf_trainer.py (one process), and run by it under
``torchrun --nproc_per_node 2 tests/hf_trainer_script.py OUT_DIR ...`` (gloo on CPU): each
rank then writes ``OUT_DIR/rank_{r}.json`` with its ``log_history``, final ``global_step``
and the class of the model the probe's forwards went through.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_helpers import end_process_group_at_exit  # noqa: E402
from vlm_factory import PAD_ID, make_tiny_vlm  # noqa: E402

SEED = 0
PROBE_BATCHES = 3  # odd: under 2 ranks one rank runs a padding forward


def probe_batches() -> list[dict[str, torch.Tensor]]:
    """The fixed probe set: 3 batches of 3 rows with different text lengths."""
    _, make_inputs = make_tiny_vlm("llava", seed=SEED)
    return [make_inputs(3, 12 + 4 * i, seed=100 + i) for i in range(PROBE_BATCHES)]


def train_examples(n: int = 32) -> list[dict[str, torch.Tensor]]:
    """``n`` single examples (equal length, right-padded) with labels (-100 on padding)."""
    _, make_inputs = make_tiny_vlm("llava", seed=SEED)
    batch = make_inputs(n, 6, seed=7)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == PAD_ID, -100)
    return [{"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i],
             "pixel_values": batch["pixel_values"][i], "labels": labels[i]} for i in range(n)]


def make_trainer(output_dir: str, *, max_steps: int, every_n_steps: int | None = 2, patience: int | None = None,
                 min_delta: float = 1e-6, eval_steps: int | None = None, save_steps: int | None = None,
                 report_to: str = "tensorboard", step: Any = None, add_callback: bool = False,
                 restore_callback_states: bool = False, callback_options: dict[str, Any] | None = None,
                 ) -> tuple[Any, Any]:
    """A Trainer (learning rate 0: the weights, hence MIR, never change) with the callback
    passed exactly as a user would (``callbacks=[...]``, or ``trainer.add_callback`` after
    construction); returns ``(trainer, callback)``. ``step``: the callback's ``probe_step``;
    ``callback_options``: further arguments of the callback."""
    from transformers import Trainer, TrainingArguments

    from mir_lightning import MIRPlateau
    from mir_lightning.integrations.hf_trainer import MIRTrainerCallback

    model, _ = make_tiny_vlm("llava", seed=SEED)
    model.train()
    args = TrainingArguments(
        output_dir=output_dir, use_cpu=True, per_device_train_batch_size=2, max_steps=max_steps,
        learning_rate=0.0, lr_scheduler_type="constant", logging_steps=2, report_to=report_to,
        eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps, per_device_eval_batch_size=4,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, seed=SEED,
        restore_callback_states_from_checkpoint=restore_callback_states,
        # under torchrun: gloo on CPU, and a process-group timeout that turns a hang into a failure
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None, ddp_timeout=120,
    )
    stopper = MIRPlateau(patience=patience, min_delta=min_delta) if patience else None
    kwargs = {"probe_step": step} if step is not None else {}
    kwargs.update(callback_options or {})
    callback = MIRTrainerCallback(probe_batches(), every_n_steps=every_n_steps, early_stopping=stopper, **kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=train_examples(),
                      eval_dataset=train_examples(8) if eval_steps else None,
                      callbacks=None if add_callback else [callback])
    if add_callback:
        trainer.add_callback(callback)
    return trainer, callback


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", help="folder for rank_{r}.json and the Trainer's output")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--every-n-steps", type=int, default=2)
    parser.add_argument("--patience", type=int, default=None)
    options = parser.parse_args()
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:  # the Trainer leaves its group alive: end it before the interpreter shuts down
        end_process_group_at_exit()
    wrappers: list[str] = []

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        wrappers.append(type(model).__name__)
        return model(**batch)

    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(options.out, "tb"))
    trainer, callback = make_trainer(options.out, max_steps=options.max_steps, every_n_steps=options.every_n_steps,
                                     patience=options.patience, step=step)
    trainer.train()
    rank = trainer.args.process_index
    Path(options.out, f"rank_{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": trainer.args.world_size, "global_step": trainer.state.global_step,
        "log_history": trainer.state.log_history, "history_steps": [h["step"] for h in callback.history],
        "wrappers": sorted(set(wrappers)),
    }))


if __name__ == "__main__":
    main()
