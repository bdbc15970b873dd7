"""A tiny LLaVA LightningModule, data and an independent reference for callback tests."""

from __future__ import annotations

import glob
import os

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from distributed_helpers import end_process_group_at_exit
from reference import reference_mir
from vlm_factory import IMAGE_TOKEN_ID, make_tiny_vlm


class TinyLlava(pl.LightningModule):
    def __init__(self, lr: float = 0.0, seed: int = 0):
        super().__init__()
        self.model, _ = make_tiny_vlm("llava", seed=seed)
        self.lr = lr

    def forward(self, batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        out = self.model(**batch, labels=batch["input_ids"])
        return out.loss

    def validation_step(self, batch, batch_idx):
        out = self.model(**batch, labels=batch["input_ids"])
        self.log("val_loss", out.loss, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class EndProcessGroup(pl.Callback):
    """Ends gloo in every ddp_spawn worker: a barrier once the run is over, then
    :func:`distributed_helpers.end_process_group` at the worker's exit (Lightning's strategy
    still holds the DDP module, and with it the group, after the callbacks' teardown)."""

    def setup(self, trainer, pl_module, stage):
        end_process_group_at_exit()

    def teardown(self, trainer, pl_module, stage):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def make_batches(n_batches: int = 4, batch_size: int = 3, n_text: int = 20, seed: int = 0):
    _, make_inputs = make_tiny_vlm("llava")
    return [make_inputs(batch_size, n_text + i, seed=seed + i) for i in range(n_batches)]


def loader(batches):
    return DataLoader(batches, batch_size=None, shuffle=False)


def official_masks(batch):
    """Independent mask builder: image tokens; text = attended non-image tokens after the first image token."""
    ids, att = batch["input_ids"], batch["attention_mask"].bool()
    vision = (ids == IMAGE_TOKEN_ID) & att
    text = torch.zeros_like(vision)
    for b in range(ids.shape[0]):
        where = torch.nonzero(vision[b]).flatten()
        if len(where):
            text[b, int(where[0]):] = True
    text &= att & ~vision
    return vision, text


@torch.no_grad()
@torch.no_grad()
def reference_on(model, batches, sigma=3.0, layers=None):
    """``reference_mir`` (float64) of ``output_hidden_states[1:]`` of a Hugging Face ``model`` on
    ``batches``, with masks built independently of the package; the model's mode is restored."""
    was_training = model.training
    model.eval()
    vis, txt = None, None
    for batch in batches:
        hidden = model(**batch, output_hidden_states=True).hidden_states[1:]
        if layers is not None:
            hidden = [hidden[i] for i in layers]
        v, t = official_masks(batch)
        if vis is None:
            vis, txt = [[] for _ in hidden], [[] for _ in hidden]
        for k, h in enumerate(hidden):
            vis[k].append(h[v].double())
            txt[k].append(h[t].double())
    model.train(was_training)
    return reference_mir([torch.cat(x) for x in vis], [torch.cat(x) for x in txt], sigma)


def reference_for(module, batches, sigma=3.0, layers=None):
    """:func:`reference_on` of ``module.model`` (the LightningModule is left in eval mode)."""
    module.eval()
    return reference_on(module.model, batches, sigma, layers)


def _event_file_order(path: str) -> tuple:
    """Event files in the order their writers were made: ``events.out.tfevents.<seconds>.<host>.<pid>.<n>``
    compared as numbers (as text, a process's writer ``.10`` would sort before its writer ``.9``)."""
    parts = os.path.basename(path).split(".")
    numbers = [int(p) if p.isdigit() else 0 for p in (parts[3], parts[-2], parts[-1])] if len(parts) >= 6 else []
    return (os.path.dirname(path), *numbers, path)


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``log_dir`` (tensorboard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True), key=_event_file_order):
        acc = EventAccumulator(path, size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def read_image_tags(log_dir: str) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[int]] = {}
    for path in sorted(glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True)):
        acc = EventAccumulator(path, size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            out.setdefault(tag, []).extend(e.step for e in acc.Images(tag))
    return out
