"""Thin torch.distributed helpers used by the metric's exact, layer-wise merge."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world_size(group: Any = None) -> int:
    """Number of processes in ``group`` (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """Sum ``tensor`` over ranks in place and return it (no-op on one process)."""
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_cat(tensor: Tensor, group: Any = None) -> Tensor:
    """Concatenate along dim 0 the tensors of all ranks; their first dimension may differ (even 0)."""
    size = world_size(group)
    if size == 1:
        return tensor
    lengths = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device), group=group)
    counts = [int(n) for n in lengths]
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])
