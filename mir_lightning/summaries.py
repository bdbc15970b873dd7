"""Mergeable streaming summaries of a token stream (plain torch, no framework).

The metric keeps, per layer and modality, three summaries from which MIR is exact:

* co-moments ``(n, mean, M2)`` with ``M2 = sum (x - mean)(x - mean)^T``, updated with
  centred batch products and Chan's merge (one GEMM per batch, on the CPU only its upper
  triangle: :func:`gram_upper_add_`; float32-safe because
  nothing is accumulated about the origin), and re-centred about a common mean to merge
  ranks with one sum;
* the ``K`` largest- and smallest-norm rows ("tails"): the 3-sigma rule can only pick rows
  from the two ends of the norm distribution, so as long as a layer has at most ``K``
  outliers per end, the rows to replace are known exactly;
* a median sketch per column: the first ``R`` rows exactly, then a fixed-grid histogram
  (grid set from those rows, finest near their median), from which the lower median is
  read by interpolation.

All functions act on one layer's tensors (views into the metric's stacked state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CorrectedMoments",
    "GroupGrids",
    "MedianSketch",
    "ModalitySummary",
    "Tail",
    "binning_dtype",
    "column_order_statistics",
    "combined_lower_median",
    "gram_panels",
    "gram_upper_add_",
    "histogram_add",
    "histogram_add_by_group",
    "histogram_grid",
    "histogram_rebin",
    "moments_merge",
    "moments_recentre",
    "moments_update",
    "pooled_mean",
    "replace_outliers_in_moments",
    "symmetric_from_upper",
    "tails_update",
]


def moments_update(count: int, mean: Tensor, m2: Tensor, x: Tensor, overwrite: bool = False) -> int:
    """Fold rows ``x [n, D]`` into ``(count, mean [D], m2 [D, D])`` in place; return the new count.

    Uses the centred batch product ``(x - xbar)^T (x - xbar)`` and Chan et al.'s merge, so
    the state stays accurate in float32 even when the mean is large against the spread.
    ``overwrite=True`` centres ``x`` in place instead of in a copy (x is then lost; ~15%
    faster on CPU at D = 1024).
    """
    n = x.shape[0]
    if n == 0:
        return count
    batch_mean = x.mean(0)
    centred = x.sub_(batch_mean) if overwrite else x - batch_mean
    total = count + n
    delta = batch_mean - mean
    m2.addmm_(centred.mT, centred)
    if count > 0:
        m2.addr_(delta, delta, alpha=count * n / total)
    mean.add_(delta, alpha=n / total)
    return total


def gram_panels(columns: int, device: torch.device) -> int:
    """How many column panels :func:`gram_upper_add_` splits a ``[n, columns]`` product into:
    4 on the CPU from 512 columns (the upper block triangle is 10/16 of the flops; measured
    1.2-1.5x faster than one ``addmm`` at D = 512-2048 with 2 threads), else 1 (one kernel:
    on accelerators a launch costs more than the flops it would save at these sizes)."""
    return 4 if device.type == "cpu" and columns >= 512 else 1


def gram_upper_add_(acc: Tensor, x: Tensor, panels: int = 1) -> None:
    """``acc += x^T x`` on the upper triangle of ``acc [D, D]`` (diagonal included), for rows
    ``x [n, D]``, in ``panels`` row panels of ``acc``: panel ``i`` gets ``x_i^T x[:, e_i:]``.
    Below the diagonal blocks ``acc`` is left as it was; read it through
    :func:`symmetric_from_upper`. ``panels=1`` is one full ``addmm``."""
    if panels <= 1:
        acc.addmm_(x.mT, x)
        return
    D = x.shape[1]
    edges = [D * i // panels for i in range(panels + 1)]
    for start, stop in zip(edges[:-1], edges[1:]):
        acc[start:stop, start:].addmm_(x[:, start:stop].mT, x[:, start:])


def symmetric_from_upper(m: Tensor) -> Tensor:
    """The symmetric matrix ``[..., D, D]`` whose upper triangle (diagonal included) is that of
    ``m`` (a new tensor): how co-moments accumulated by :func:`gram_upper_add_` are read."""
    return m.triu().add_(m.triu(1).mT)


def moments_recentre(count: Tensor | int, mean: Tensor, m2: Tensor, centre: Tensor) -> Tensor:
    """``sum (x - centre)(x - centre)^T`` from ``(count, mean, m2)`` (a new tensor).

    Sums about one common centre add up exactly across ranks (used for the distributed merge).
    """
    delta = mean - centre
    return torch.addr(m2, delta, delta, alpha=float(count))


def pooled_mean(counts: Sequence[int], means: Sequence[Tensor]) -> Tensor:
    """Mean of the union of parts with ``counts[i]`` rows and mean ``means[i]`` (float64 ``[D]``)."""
    total = sum(counts)
    pooled = torch.zeros_like(means[0], dtype=torch.float64)
    for count, mean in zip(counts, means):
        if count:
            pooled.add_(mean.to(torch.float64), alpha=count / total)
    return pooled


def moments_merge(counts: Sequence[int], means: Sequence[Tensor], m2s: Sequence[Tensor]) -> tuple[int, Tensor, Tensor]:
    """Exact ``(count, mean, M2)`` of the union of parts (Chan et al.): every part's ``M2`` is
    re-centred on the pooled mean (:func:`moments_recentre`) and the results are summed.
    Float64, new tensors. The distributed merge does the same with a sum over ranks."""
    total = sum(counts)
    mean = pooled_mean(counts, means)
    m2 = torch.zeros_like(m2s[0], dtype=torch.float64)
    for count, part_mean, part_m2 in zip(counts, means, m2s):
        if count:
            m2 += moments_recentre(count, part_mean.to(torch.float64), part_m2.to(torch.float64), mean)
    return total, mean, m2


def fixed_shapes(device: torch.device) -> bool:
    """Whether streaming updates on ``device`` avoid data-dependent shapes (boolean indexing,
    ``nonzero``), which make the host wait for an accelerator's stream. On the CPU work is
    synchronous anyway, and selecting only the rows that matter is cheaper."""
    return device.type != "cpu"


def tails_update(
    rows: Tensor, norms: Tensor, dropped: Tensor, x: Tensor, x_norms: Tensor, largest: bool, fixed: bool | None = None
) -> None:
    """Keep the ``K`` rows of largest (or smallest) norm seen so far, in place, with no host sync.

    Args:
        rows: ``[K, D]`` kept rows; norms: ``[K]`` their norms (``-inf``/``+inf`` = empty slot).
        dropped: 0-dim, the most extreme norm of any row not kept (``-inf``/``+inf`` if none):
            the 3-sigma rule is exact as long as this row is not an outlier.
        x, x_norms: new rows ``[n, D]`` and their norms ``[n]``.
        fixed: fixed shapes (default: :func:`fixed_shapes` of the device): one sorted
            top-``K+1`` of the ``K + n`` norms, then ``min(K, n)`` slots rewritten (the freed
            ones first, the rest onto themselves). Otherwise only the new rows beyond the kept
            extreme are looked at and only the entering ones copied (data-dependent shapes).
    """
    k, n = norms.shape[0], x.shape[0]
    if n == 0:
        return
    x_norms = x_norms.to(norms.dtype)
    if fixed is None:
        fixed = fixed_shapes(x.device)
    extreme_of = torch.maximum if largest else torch.minimum
    if not fixed and k:
        bound = norms.min() if largest else norms.max()  # an empty slot's -+inf while not full
        enter = x_norms > bound if largest else x_norms < bound
        outside = x_norms.masked_fill(enter, -math.inf if largest else math.inf)
        dropped.copy_(extreme_of(dropped, outside.max() if largest else outside.min()))
        x, x_norms = x[enter], x_norms[enter]
    candidates = x_norms.shape[0]
    all_norms = torch.cat([norms, x_norms])
    top = torch.topk(all_norms, k + 1, largest=largest, sorted=True) if candidates else None
    if top is None:
        return
    dropped.copy_(extreme_of(dropped, top.values[k]))  # the most extreme norm not kept (or an empty slot's)
    if k == 0:
        return
    keep = top.indices[:k]
    # pair freed slots with incoming rows: incoming first (key < 0), then kept old indices ascending;
    # freed slots first, then kept slots ascending (the same set as the kept old indices)
    kept_slot = torch.zeros(k + candidates, dtype=torch.bool, device=norms.device)
    kept_slot[keep] = True
    slots = torch.argsort(kept_slot[:k].to(torch.uint8), stable=True)
    sources = torch.sort(torch.where(keep >= k, keep - (k + candidates), keep)).values
    sources = torch.where(sources < 0, sources + (k + candidates), sources)
    writes = min(k, candidates)
    slots, sources = slots[:writes], sources[:writes]
    if fixed:
        new = (sources >= k)[:, None]
        values = torch.where(new, x.index_select(0, (sources - k).clamp(min=0)).to(rows.dtype),
                             rows.index_select(0, sources.clamp(max=k - 1)))
    else:  # only the incoming rows
        incoming = sources >= k
        slots, sources = slots[incoming], sources[incoming]
        values = x.index_select(0, sources - k).to(rows.dtype)
    rows.index_copy_(0, slots, values)
    norms.index_copy_(0, slots, all_norms[sources])


def column_order_statistics(x: Tensor, ranks: list[int]) -> Tensor:
    """The ``ranks``-th smallest values (0-based) of every column of ``x [m, D]``: ``[len(ranks), D]``
    float64, exact. On CPU numpy sorts each column as a contiguous row (its vectorised sort
    was 3-10x faster there than torch's sort or median, and than numpy's multi-rank
    partition), elsewhere a torch sort."""
    if x.device.type == "cpu":
        values = x.detach()
        if values.dtype not in (torch.float32, torch.float64):
            values = values.to(torch.float32)  # monotone and exact for half types
        columns = np.sort(np.ascontiguousarray(values.numpy().T), axis=1)
        return torch.from_numpy(np.ascontiguousarray(columns[:, ranks].T)).to(torch.float64)
    return x.sort(dim=0).values[ranks].to(torch.float64)


GRID_SPREAD = 7.0
"""The grid reaches this many quartile distances either side of the sample median."""
GRID_ZOOM = 4.0
"""Bins are uniform in ``t = u / (1 + |u|)``, ``u = (x - centre) / scale``, with ``scale`` =
quartile distance / ``GRID_ZOOM``: fine near the centre, coarse in the tails."""
_REACH = GRID_SPREAD * GRID_ZOOM / (1.0 + GRID_SPREAD * GRID_ZOOM)  # t at +-GRID_SPREAD quartile distances


def histogram_grid(rows: Tensor, max_rows: int = 256) -> tuple[Tensor, Tensor]:
    """A per-column grid ``(centre [D], scale [D])`` (float64) from sample rows ``[m, D]``.

    ``centre`` is the sample median and ``scale`` the larger distance from it to a quartile,
    divided by ``GRID_ZOOM``. Bin edges are uniform in ``t = u / (1 + |u|)`` with
    ``u = (x - centre) / scale``, over the ``t`` of +-``GRID_SPREAD`` quartile distances: the
    grid spans +-7 quartile distances (about +-4.7 std of a Gaussian column; robust to up
    to a quarter of massive-activation rows), with bins ~28x finer at the centre, where
    the median lies, than a uniform grid of the same count, as fine at one quartile
    distance, and coarser in the tails. The grid only has to cover the data, so it is
    placed from at most ``max_rows`` evenly spaced sample rows (sorting every column of a
    large sample costs as much as a covariance product).
    """
    if rows.shape[0] > max_rows:
        rows = rows[torch.linspace(0, rows.shape[0] - 1, max_rows, device=rows.device).round().long()]
    m = rows.shape[0]
    med, q_lo, q_hi = column_order_statistics(rows, [(m - 1) // 2, int(0.25 * (m - 1)), int(round(0.75 * (m - 1)))])
    quartile = torch.maximum(q_hi - med, med - q_lo)
    quartile = torch.maximum(quartile, 1e-7 * med.abs() + 1e-30)
    return med, quartile / GRID_ZOOM


def _grid_ends(centre: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """The first and last bin edge per column: ``centre -+ GRID_SPREAD`` quartile distances."""
    reach = scale * (GRID_SPREAD * GRID_ZOOM)
    return centre - reach, centre + reach


def _bin_position(x: Tensor, centre: Tensor, inverse_scale: Tensor, bins: int, offset: float = 0.0) -> Tensor:
    """Continuous position of ``x`` on the grid: ``offset`` at the first edge, ``bins - 2 + offset``
    at the last (``centre`` and ``inverse_scale`` broadcast against ``x``)."""
    half = (bins - 2) / 2
    u = torch.sub(x, centre).mul_(inverse_scale)  # u = (x - centre) / scale
    t_denominator = torch.abs(u).add_(1.0)  # 1 + |u|
    base = torch.tensor(half + offset, dtype=u.dtype, device=u.device)
    return torch.addcdiv(base, u, t_denominator, value=half / _REACH, out=t_denominator)


def _chunk_rows(columns: int, device: torch.device) -> int:
    """Rows per chunk of :func:`histogram_add`: on CPU ~256K values (the buffers stay in cache)
    but at least 256 rows (shorter runs per column made the scatter 2x slower at D = 4096);
    ~4M values on accelerators (few kernel launches; 64 MiB of temporaries)."""
    if device.type == "cpu":
        return max(256, 2**18 // max(columns, 1))
    return max(1, 2**22 // max(columns, 1))


def histogram_add(hist: Tensor, centre: Tensor, scale: Tensor, x: Tensor) -> None:
    """Count rows ``x [n, D]`` into ``hist [D, B]`` (per-column grids ``[D]``), in place.

    Bin positions are computed in ``x``'s dtype (float64 or float32; others go through
    float32): in float32 a value within a few rounding steps of an edge may land in the
    neighbouring bin, no more than the rounding already in ``x``. One group of
    :func:`histogram_add_by_group` (rows in chunks transposed to ``[D, rows]``, so that each
    column's counts are added in one contiguous run; a flat scatter over ``[n, D]`` order cost
    ~5x more on CPU).
    """
    n = x.shape[0]
    if not n:
        return
    grids = GroupGrids.of(centre[None], scale[None], x.dtype, hist.shape[1])
    group = torch.zeros(n, dtype=torch.long, device=x.device)
    histogram_add_by_group(hist, grids, x, [n], group, group[None], group_hists=[hist])


def binning_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype values of ``dtype`` are binned in: their own for float32 and float64, float32
    for the rest (half types)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@dataclass(frozen=True)
class GroupGrids:
    """The grids of ``G`` groups (the modalities) that share one histogram, prepared once per
    grid for :func:`histogram_add_by_group`: ``centre`` and ``negative_inverse`` (``-1 / scale``)
    ``[C, G]`` in the binning dtype, the same per group as ``[C, 1]`` columns, and ``base``
    (0-dim: the grid position of ``centre``, first edge at 1). Build with :meth:`of`."""

    centre: Tensor
    negative_inverse: Tensor
    columns: tuple[tuple[Tensor, Tensor], ...]
    base: Tensor
    bins: int

    @classmethod
    def of(cls, centre: Tensor, scale: Tensor, dtype: torch.dtype, bins: int) -> "GroupGrids":
        """From ``centre`` and ``scale`` ``[G, C]`` (see :func:`histogram_grid`); ``bins`` per group."""
        dtype = binning_dtype(dtype)
        centre_t = centre.to(dtype).mT.contiguous()
        negative_inverse = scale.reciprocal().neg_().to(dtype).mT.contiguous()
        columns = tuple(zip(centre_t.split(1, dim=1), negative_inverse.split(1, dim=1)))
        base = torch.tensor((bins - 2) / 2 + 1.0, dtype=dtype, device=centre.device)
        return cls(centre_t, negative_inverse, columns, base, int(bins))

    @property
    def dtype(self) -> torch.dtype:
        return self.centre.dtype


def _positions(grids: GroupGrids, difference: Tensor, negative_inverse: Tensor) -> Tensor:
    """Clamped grid positions ``[C, m]`` from ``centre - x`` (``difference``, overwritten):
    ``u = (x - centre) / scale``, then ``1 + (B - 2) / 2 * (1 + t / _REACH)`` with
    ``t = u / (1 + |u|)``, clamped to the ``B`` bins. Bitwise the positions of
    :func:`_bin_position` (signs flip exactly)."""
    half = (grids.bins - 2) / 2
    u = difference.mul_(negative_inverse)
    denominator = torch.abs(u).add_(1.0)
    return torch.addcdiv(grids.base, u, denominator, value=half / _REACH, out=denominator).clamp_(0, grids.bins - 1)


def histogram_add_by_group(
    hist: Tensor, grids: GroupGrids, x: Tensor, counts: Sequence[int], group: Tensor, offsets: Tensor,
    ones: Tensor | None = None, group_hists: Sequence[Tensor] | None = None,
) -> None:
    """Count rows ``x [n, C]`` of ``G`` groups (the modalities) into ``hist [C, G * bins]`` in
    place, each row on its group's grid (:class:`GroupGrids`; group ``g``'s bins at
    ``g * bins``): the bins :func:`histogram_add` gives each group.

    Rows come grouped: ``counts[g]`` rows of group ``g``, in group order. ``group [n]`` (each
    row's group), ``offsets [1, n]`` (``group * bins``) and ``ones`` (optionally a ``[C, n]``
    view of ones of ``hist``'s dtype) serve the gathered route, ``group_hists`` (optionally
    ``hist``'s ``G`` views ``[C, bins]``) the per-group one.

    Two routes, the same counts. On accelerators (and for one column) every row is binned at
    once against its group's grid gathered per row: few, large kernels. On a CPU with several
    columns each group's rows are binned against its own ``[C, 1]`` grid columns, in chunks of
    ~256K values transposed to ``[C, rows]`` so that each column's counts go into one
    contiguous histogram row: no per-row grid is materialised (1.8x faster at D = 512).
    """
    n, columns = x.shape
    if not n:
        return
    dtype, bins = grids.dtype, grids.bins
    rows = min(n, _chunk_rows(columns, x.device))
    if fixed_shapes(x.device) or columns == 1:
        for start in range(0, n, rows):
            chunk, ids, shift, count = x, group, offsets, ones
            if rows < n:
                end = start + rows
                chunk, ids, shift, count = x[start:end], group[start:end], offsets[:, start:end], None
            difference = torch.sub(grids.centre.index_select(1, ids), chunk.mT)  # [C, m], laid out as the grids
            pos = _positions(grids, difference, grids.negative_inverse.index_select(1, ids))
            index = pos.to(torch.long).add_(shift)  # truncation = floor (pos >= 0)
            if count is None:
                count = torch.ones((), dtype=hist.dtype, device=hist.device).expand_as(index)
            hist.scatter_add_(1, index, count)
        return
    if group_hists is None:
        group_hists = hist.view(columns, len(counts), bins).unbind(1)
    x_t = x.mT
    if max(counts) <= rows:  # one chunk per group: buffers for all rows, split by group
        u_buffer = torch.empty(columns, n, dtype=dtype, device=x.device)
        if ones is None:
            ones = torch.ones((), dtype=hist.dtype, device=hist.device).expand(columns, n)
        split = zip(x_t.split(counts, 1), u_buffer.split(counts, 1), ones.split(counts, 1))
        pieces = [[piece] for piece in split]
    else:
        u_buffer = torch.empty(columns, rows, dtype=dtype, device=x.device)
        pieces = _group_chunks(x_t, u_buffer, counts, rows, hist.dtype)
    for (centre, negative_inverse), group_hist, group_pieces in zip(grids.columns, group_hists, pieces):
        for values, u, count in group_pieces:
            if columns >= 512:  # a blocked transposing copy first: reading `values` strided costs 1.5-2.3x more
                values = u.copy_(values)  # from 512 columns (CPU, 2 threads), less below
            pos = _positions(grids, torch.sub(centre, values, out=u), negative_inverse)
            group_hist.scatter_add_(1, pos.to(torch.long), count)


def _group_chunks(x_t: Tensor, u_buffer: Tensor, counts: Sequence[int], rows: int, count_dtype: torch.dtype
                  ) -> list[list[tuple[Tensor, Tensor, Tensor]]]:
    """Per group, its chunks of at most ``rows`` columns of ``x_t [C, n]``, each with the
    matching view of the ``[C, rows]`` buffer and ones of ``count_dtype`` to count with."""
    one = torch.ones((), dtype=count_dtype, device=x_t.device)
    chunks, first = [], 0
    for count in counts:
        group = []
        for start in range(first, first + count, rows):
            m = min(rows, first + count - start)
            group.append((x_t[:, start : start + m], u_buffer[:, :m], one.expand(x_t.shape[0], m)))
        chunks.append(group)
        first += count
    return chunks


def _histogram_cdf(cum: Tensor, centre: Tensor, inverse_scale: Tensor, v: Tensor) -> Tensor:
    """Histogram mass ``<= v`` per column from cumulative counts ``cum [D, B]`` (grid ``centre``,
    ``1 / scale``).

    Interior bins spread their mass uniformly in the grid's coordinate ``t``; the
    open-ended bins count as point masses at the grid's ends.
    """
    b = cum.shape[1]
    pos = _bin_position(v, centre, inverse_scale, b)
    i = torch.floor(pos).clamp(0, b - 3).long() + 1  # interior bin holding v (1..B-2)
    frac = (pos - (i - 1)).clamp(0.0, 1.0)
    prev = cum.gather(1, (i - 1)[:, None]).squeeze(1)
    cur = cum.gather(1, i[:, None]).squeeze(1)
    mass = prev + frac * (cur - prev)
    mass = torch.where(pos < 0, torch.zeros_like(mass), mass)
    return torch.where(pos >= b - 2, cum[:, -1], mass)


def combined_lower_median(
    raw: Tensor, histograms: list[tuple[Tensor, Tensor, Tensor]], iterations: int = 80
) -> tuple[Tensor, bool]:
    """Lower median per column of the union of exact rows and histograms.

    Args:
        raw: exact rows ``[m, D]``.
        histograms: ``(counts [D, B], centre [D], scale [D])`` triples (see :func:`histogram_grid`).

    Returns:
        ``(median [D] float64, exact)``. With no histogram this is exactly
        ``torch.median(raw, 0)``; otherwise the value where the merged CDF (histogram mass
        spread uniformly within bins) reaches the lower-median rank, found by bisection.
        ``exact`` is False when a histogram was used.
    """
    if not histograms:
        return column_order_statistics(raw, [(raw.shape[0] - 1) // 2])[0], True
    raw = raw.to(torch.float64)
    d = raw.shape[1] if raw.numel() else histograms[0][0].shape[0]
    # cumulative counts and inverse scales once: the bisection below reads them ~50 times
    cums = [(h.to(torch.float64).cumsum(1), centre, scale.reciprocal()) for h, centre, scale in histograms]
    total = raw.shape[0] + sum(float(c[:, -1].max()) if c.numel() else 0.0 for c, _, _ in cums)
    target = float((int(round(total)) - 1) // 2 + 1)
    ends = [_grid_ends(centre, scale) for _, centre, scale in histograms]
    lows = [lo for lo, _ in ends]
    highs = [hi for _, hi in ends]
    if raw.shape[0]:
        lows.append(raw.min(0).values)
        highs.append(raw.max(0).values)
    a = torch.stack(lows).min(0).values - 1e-12
    b = torch.stack(highs).max(0).values + 1e-12
    a = a.to(torch.float64).reshape(d)
    b = b.to(torch.float64).reshape(d)

    def cdf(v: Tensor) -> Tensor:
        mass = (raw <= v).sum(0).to(torch.float64) if raw.shape[0] else torch.zeros_like(v)
        for cum, centre, inverse_scale in cums:
            mass = mass + _histogram_cdf(cum, centre, inverse_scale, v)
        return mass

    # the histogram resolves the median to ~1e-3 quartile distances; 1e-10 of the bracket is plenty
    tolerance = 1e-10 * (b - a)
    for step in range(iterations):
        mid = 0.5 * (a + b)
        reached = cdf(mid) >= target - 1e-9
        b = torch.where(reached, mid, b)
        a = torch.where(reached, a, mid)
        if step % 4 == 3 and bool(((b - a) <= tolerance).all()):
            break
    return b, False


def _grid_value(position: Tensor, centre: Tensor, scale: Tensor, bins: int) -> Tensor:
    """Inverse of :func:`_bin_position` (offset 0): the value at a grid position."""
    half = (bins - 2) / 2
    t = ((position - half) * (_REACH / half)).clamp(-_REACH, _REACH)
    return centre + scale * t / (1.0 - t.abs())


def histogram_rebin(
    hist: Tensor, centre: Tensor, scale: Tensor, source: Tensor, source_centre: Tensor, source_scale: Tensor
) -> None:
    """Add the counts of histogram ``source [C, B]`` (its own grid) into ``hist [C, B]`` (grid
    ``centre``, ``scale``), in place: each source bin's count lands where its midpoint falls
    (the open-ended bins at their grid ends). Moves mass by at most half a source bin: within
    the resolution the source histogram already had. Used when merging two metrics."""
    c, b = source.shape
    position = torch.arange(b, dtype=torch.float64, device=source.device).sub_(0.5).clamp_(0, b - 2)
    values = _grid_value(position[None, :], source_centre[:, None], source_scale[:, None], b)  # [C, B]
    histogram_add_weighted(hist, centre, scale, values, source)


def histogram_add_weighted(hist: Tensor, centre: Tensor, scale: Tensor, values: Tensor, weights: Tensor) -> None:
    """Count ``values [C, m]`` with integer ``weights [C, m]`` into ``hist [C, B]`` (one grid per row)."""
    b = hist.shape[1]
    pos = _bin_position(values.to(torch.float64), centre.to(torch.float64)[:, None],
                        scale.reciprocal().to(torch.float64)[:, None], b, offset=1.0).clamp_(0, b - 1)
    hist.scatter_add_(1, pos.long(), weights.to(hist.dtype))


# ----------------------------------------------------------------------------- typed summaries
@dataclass
class Tail:
    """The rows kept at one end of the norm distribution (see :func:`tails_update`).

    ``rows [k, D]``, ``norms [k]`` (``-inf`` / ``+inf`` marks an empty slot), ``dropped``
    (0-dim): the most extreme norm of a row not kept; ``largest``: which end."""

    rows: Tensor
    norms: Tensor
    dropped: Tensor
    largest: bool


@dataclass
class MedianSketch:
    """Columns' lower median of a stream: exact ``rows [m, C]`` and
    ``histograms`` ``(counts [C, B], centre [C], scale [C])`` of the rest."""

    rows: Tensor
    histograms: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)

    def lower_median(self) -> tuple[Tensor, bool]:
        """``(median [C] float64, exact)`` (see :func:`combined_lower_median`)."""
        return combined_lower_median(self.rows, self.histograms)


@dataclass
class ModalitySummary:
    """Everything MIR needs of one modality in one layer, from which it is exact.

    Attributes:
        count: tokens folded in (non-finite ones skipped are in ``nonfinite``).
        mean: ``[D]``; m2: ``[D, D]`` centred co-moment ``sum (x - mean)(x - mean)^T``.
        norm_mean: ``[1]``; norm_m2: ``[1, 1]``: the same two moments of the token norms.
        high, low: the largest- and smallest-norm rows (:class:`Tail`).
        values: median sketch of the tokens (columns = dimensions); norms: of their norms.
        nonfinite: tokens skipped for non-finite values.
    """

    count: int
    mean: Tensor
    m2: Tensor
    norm_mean: Tensor
    norm_m2: Tensor
    high: Tail
    low: Tail
    values: MedianSketch
    norms: MedianSketch
    nonfinite: int = 0

    @property
    def mean_norm(self) -> float:
        return float(self.norm_mean.reshape(()))

    @property
    def norm_std(self) -> float:
        """Unbiased standard deviation of the token norms (0 below 2 tokens)."""
        if self.count < 2:
            return 0.0
        return math.sqrt(max(float(self.norm_m2.reshape(())) / (self.count - 1), 0.0))


@dataclass
class CorrectedMoments:
    """Mean ``[D]`` and M2 ``[D, D]`` (float64) after the 3-sigma rule, and how they were made.

    ``replaced``: rows replaced by the median row; ``median_exact`` / ``norm_median_exact``:
    False when that median came from a histogram (only read when needed);
    ``overflow_high`` / ``overflow_low``: an outlier may have been dropped from that tail (only
    the kept ones were replaced)."""

    mean: Tensor
    m2: Tensor
    replaced: int = 0
    median_exact: bool = True
    norm_median_exact: bool = True
    overflow_high: bool = False
    overflow_low: bool = False


def replace_outliers_in_moments(summary: ModalitySummary, sigma: float | None) -> CorrectedMoments:
    """The 3-sigma rule as a rank update of the moments.

    Rows whose norm lies more than ``sigma`` (unbiased) std from the lower median norm are
    replaced by the per-dimension lower median row ``r``. They can only be among the kept
    tails; with ``Y`` = those rows minus the mean, ``c`` of them, ``n`` tokens and
    ``s = c (r - mean) - sum Y``: ``mean' = mean + s / n`` and
    ``M2' = M2 - Y^T Y + c (r - mean)(r - mean)^T - s s^T / n`` (a new matrix; the summary is
    not modified). ``sigma=None`` or fewer than 2 tokens: unchanged.
    """
    mean, m2, n = summary.mean.to(torch.float64), summary.m2.to(torch.float64), summary.count
    if sigma is None or n < 2:
        return CorrectedMoments(mean, m2)
    median_norm, norm_exact = summary.norms.lower_median()
    median_norm = float(median_norm[0])
    spread = sigma * summary.norm_std
    high, low = median_norm + spread, median_norm - spread
    top, bottom = summary.high, summary.low
    hit_high = (top.norms > high) & torch.isfinite(top.norms)
    hit_low = (bottom.norms < low) & torch.isfinite(bottom.norms)
    outliers = torch.cat([top.rows[hit_high], bottom.rows[hit_low]]).to(torch.float64)
    result = CorrectedMoments(mean, m2, norm_median_exact=norm_exact, overflow_high=float(top.dropped) > high,
                              overflow_low=float(bottom.dropped) < low)
    count = outliers.shape[0]
    if count == 0:
        return result
    median_row, result.median_exact = summary.values.lower_median()
    y = outliers.sub_(mean)
    ym = median_row.to(mean.device) - mean
    shift = count * ym - y.sum(0)
    corrected = torch.addmm(m2, y.mT, y, alpha=-1.0)
    corrected.addr_(ym, ym, alpha=float(count))
    corrected.addr_(shift, shift, alpha=-1.0 / n)
    result.mean, result.m2, result.replaced = mean + shift / n, corrected, count
    return result
