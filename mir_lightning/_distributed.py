"""torch.distributed helpers of the metric's exact, layer-sharded merge (no-ops on one process)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from mir_lightning.summaries import MedianSketch, ModalitySummary, Tail, moments_merge, moments_recentre, pooled_mean


def initialized() -> bool:
    """Whether a torch.distributed default process group is up."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Number of processes in ``group`` (1 when torch.distributed is not initialised)."""
    if not initialized():
        return 1
    return dist.get_world_size(group)


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialised)."""
    if world_size(group) == 1:
        return 0
    return dist.get_rank(group)


def rank_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` without torch.distributed."""
    return rank(group), world_size(group)


def collective_device(group: Any = None) -> torch.device:
    """The device a collective of ``group`` runs on (the current CUDA device under NCCL)."""
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_max(values: Sequence[float], group: Any = None) -> list[float]:
    """Element-wise maximum of ``values`` over the ranks of ``group`` (one collective)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.tolist()


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """Sum ``tensor`` over ranks in place and return it (no-op on one process)."""
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _global_rank(group: Any, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def gather_cat(tensor: Tensor, lengths: list[int], owner: int, group: Any = None) -> Tensor | None:
    """Concatenate along dim 0 the tensors of all ranks on rank ``owner`` (None elsewhere).
    ``lengths``: every rank's first dimension (known to all ranks; may differ, even be 0)."""
    longest = max(lengths)
    here = rank(group)
    if longest == 0:  # nothing anywhere: every rank knows it, no collective
        return tensor[:0] if here == owner else None
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in lengths] if here == owner else None
    dist.gather(padded, parts, dst=_global_rank(group, owner), group=group)
    if parts is None:
        return None
    return torch.cat([part[:n] for part, n in zip(parts, lengths)])


def reduce_summary(
    summary: ModalitySummary, owner: int, group: Any = None, bins: tuple[int, int] = (512, 2**16)
) -> ModalitySummary | None:
    """The summary of all ranks' streams on rank ``owner`` (None on the others).

    ``bins``: histogram bins of the value and norm sketches (equal on every rank).

    Every rank sends its counts, means and norm moments to every rank (small), re-centres
    its ``M2`` on the pooled mean and sums it onto the owner (one ``reduce``: the exact merge
    of :func:`~mir_lightning.summaries.moments_merge`); the tails and median sketches are
    gathered onto the owner only. One process: ``summary`` itself.
    """
    world = world_size(group)
    if world == 1:
        return summary
    device = summary.mean.device
    small = torch.cat([
        torch.tensor([summary.count, summary.nonfinite], dtype=torch.float64, device=device),
        summary.norm_mean.reshape(1).to(torch.float64), summary.norm_m2.reshape(1).to(torch.float64),
        summary.high.dropped.reshape(1).to(torch.float64), summary.low.dropped.reshape(1).to(torch.float64),
        torch.tensor([not summary.values.histograms, not summary.norms.histograms], dtype=torch.float64, device=device),
        summary.mean.to(torch.float64),
    ])
    gathered = [torch.empty_like(small) for _ in range(world)]
    dist.all_gather(gathered, small, group=group)
    counts = [int(g[0]) for g in gathered]
    means = [g[8:] for g in gathered]
    centre = pooled_mean(counts, means)
    m2 = moments_recentre(summary.count, summary.mean.to(torch.float64), summary.m2.to(torch.float64), centre)
    dist.reduce(m2, dst=_global_rank(group, owner), op=dist.ReduceOp.SUM, group=group)

    tails = []
    for tail in (summary.high, summary.low):
        packed = torch.cat([tail.rows, tail.norms[:, None].to(tail.rows.dtype)], dim=1)
        tails.append(gather_cat(packed, [packed.shape[0]] * world, owner, group))
    sketches = []
    for j, (sketch, bin_count) in enumerate(zip((summary.values, summary.norms), bins)):
        exact = [bool(g[6 + j]) for g in gathered]  # exact: rows = count; otherwise one histogram
        columns = sketch.rows.shape[1]
        if sketch.histograms:
            counts_part, grid_centre, grid_scale = sketch.histograms[0]
            hist, grid = counts_part[None], torch.stack([grid_centre, grid_scale])[None].to(torch.float64)
        else:
            hist = torch.zeros(0, columns, bin_count, dtype=torch.int32, device=device)
            grid = torch.zeros(0, 2, columns, dtype=torch.float64, device=device)
        rows = gather_cat(sketch.rows, [n if e else 0 for n, e in zip(counts, exact)], owner, group)
        hists = gather_cat(hist, [0 if e else 1 for e in exact], owner, group)
        grids = gather_cat(grid, [0 if e else 1 for e in exact], owner, group)
        sketches.append((rows, hists, grids))
    if rank(group) != owner:
        return None
    total = sum(counts)
    _, norm_mean, norm_m2 = moments_merge(counts, [g[2:3] for g in gathered], [g[3:4].reshape(1, 1) for g in gathered])
    dim = summary.mean.shape[0]
    high_dropped = torch.stack([g[4] for g in gathered]).max()
    low_dropped = torch.stack([g[5] for g in gathered]).min()
    merged_tails = [
        Tail(t[:, :dim], t[:, dim], dropped.to(t.dtype), largest)
        for t, dropped, largest in zip(tails, (high_dropped, low_dropped), (True, False))
    ]
    merged_sketches = [
        MedianSketch(rows, [(h, g[0], g[1]) for h, g in zip(hists, grids)]) for rows, hists, grids in sketches
    ]
    return ModalitySummary(
        count=total, mean=centre, m2=m2, norm_mean=norm_mean, norm_m2=norm_m2,
        high=merged_tails[0], low=merged_tails[1], values=merged_sketches[0], norms=merged_sketches[1],
        nonfinite=sum(int(g[1]) for g in gathered),
    )
