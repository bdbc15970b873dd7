"""MoCa training steps for the DDP test: one worker per rank (gloo), and the same steps in one process.

Kept apart from tests/test_moca.py so that the spawned processes import only torch,
transformers and the package.
"""

from __future__ import annotations

import os

import torch

from distributed_helpers import process_group
from mir_lightning.moca import MoCa
from vlm_factory import make_tiny_vlm

STEPS, LR, GLOBAL_BATCH = 3, 2.0, 4


def ddp_batch() -> dict[str, torch.Tensor]:
    """The global batch: 4 padded LLaVA rows (one image each)."""
    _, make_inputs = make_tiny_vlm("llava")
    return make_inputs(GLOBAL_BATCH, 6, seed=3)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """MoCa and the projector train (as in the paper's pre-training); everything else is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("moca.", "model.multi_modal_projector.")))
    return [p for p in model.parameters() if p.requires_grad]


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over rows of each row's mean next-token cross entropy (the same on any equal split of rows)."""
    logits = model(**batch).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    weight = batch["attention_mask"][:, 1:].float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return ((ce * weight).sum(1) / weight.sum(1)).mean()


def train(model: torch.nn.Module, batch: dict[str, torch.Tensor], params: list[torch.nn.Parameter]) -> None:
    """``STEPS`` plain SGD steps on ``batch``."""
    optimizer = torch.optim.SGD(params, lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()


def _train_rank(rank: int, world: int) -> dict[str, torch.Tensor]:
    """MoCa's state after training under DistributedDataParallel on this rank's rows (the DDP
    module, which holds the process group, is gone when this returns)."""
    model, _ = make_tiny_vlm("llava")
    MoCa.attach(model)
    params = trainable(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    share = GLOBAL_BATCH // world
    batch = {k: v[rank * share:(rank + 1) * share] for k, v in ddp_batch().items()}
    train(ddp, batch, params)
    return {k: v.detach().clone() for k, v in model.moca.state_dict().items()}


def ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Train MoCa under DistributedDataParallel on this rank's rows; save ``rank{rank}.pt``."""
    torch.set_num_threads(1)
    with process_group(rank, world, port, timeout_s=120):
        torch.save(_train_rank(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
