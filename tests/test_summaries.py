"""The bounded summaries against plain numpy on the same rows, fed in many small pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mir_lightning import summaries
from mir_lightning.summaries import (
    GRID_SPREAD,
    GRID_ZOOM,
    GroupGrids,
    column_order_statistics,
    histogram_add,
    histogram_add_by_group,
    histogram_grid,
    tails_update,
)


def test_tails_keep_the_k_most_extreme_rows_and_the_most_extreme_dropped_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64) * torch.rand(500, 1, generator=g, dtype=torch.float64) * 10
    norms = x.norm(dim=1)
    k = 16
    for largest in (True, False):
        rows = torch.zeros(k, 6, dtype=torch.float64)
        kept = torch.full((k,), -np.inf if largest else np.inf, dtype=torch.float64)
        dropped = torch.tensor(-np.inf if largest else np.inf, dtype=torch.float64)
        for piece in torch.split(torch.arange(500), [3, 40, 1, 100, 7, 200, 149]):
            tails_update(rows, kept, dropped, x[piece], norms[piece], largest=largest)
        order = np.argsort(norms.numpy())
        want = order[-k:] if largest else order[:k]
        np.testing.assert_array_equal(np.sort(kept.numpy()), np.sort(norms.numpy()[want]))
        np.testing.assert_array_equal(rows[kept.argsort()].numpy(), x.numpy()[want][np.argsort(norms.numpy()[want])])
        next_one = order[-k - 1] if largest else order[k]
        assert float(dropped) == norms.numpy()[next_one]


@pytest.mark.parametrize("chunk_rows", [None, 97])
def test_histogram_counts_match_numpy_binning(chunk_rows, monkeypatch):
    if chunk_rows is not None:  # many chunks per call, the last one partial
        monkeypatch.setattr(summaries, "_chunk_rows", lambda columns, device: chunk_rows)
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = (torch.randn(3000, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.1, 5.0, 1e-3, 2.0]) + 40).to(dtype)
        x[:20] *= 50  # far outside the grid: the open-ended bins
        bins = 64
        centre, scale = histogram_grid(x[:500])
        hist = torch.zeros(5, bins, dtype=torch.int32)
        for piece in torch.split(x, 701):
            histogram_add(hist, centre, scale, piece)
        xs = x.to(torch.float64).numpy()
        # the documented grid: bins - 1 edges uniform in t = u / (1 + |u|), u = (x - centre) / scale,
        # between the t of -+GRID_SPREAD quartile distances (= GRID_SPREAD * GRID_ZOOM scales)
        reach = GRID_SPREAD * GRID_ZOOM / (1 + GRID_SPREAD * GRID_ZOOM)
        t = np.linspace(-reach, reach, bins - 1)
        edges_all = centre.numpy()[:, None] + scale.numpy()[:, None] * t / (1 - np.abs(t))
        # float64 data is binned to rounding; float32 work may move a value lying within a few
        # float32 rounding steps of an edge to the neighbouring bin, and nothing else
        eps = np.finfo(np.float64 if dtype == torch.float64 else np.float32).eps
        for j in range(5):
            edges = edges_all[j]
            want = np.bincount(np.searchsorted(edges, xs[:, j], side="right"), minlength=bins)
            assert int(hist[j].sum()) == 3000
            got_cdf, want_cdf = np.cumsum(hist[j].numpy())[:-1], np.cumsum(want)[:-1]
            near = np.abs(xs[:, j, None] - edges[None, :]) <= 64 * eps * (np.abs(xs[:, j, None]) + np.abs(edges))
            assert np.all(np.abs(got_cdf - want_cdf) <= near.sum(0)), (dtype, j)
            # finest at the sample median: 5x narrower there than a uniform grid over the same span
            mid = np.searchsorted(edges, np.median(xs[:500, j]))
            uniform = (edges[-1] - edges[0]) / (bins - 2)
            assert edges[mid] - edges[mid - 1] < 0.2 * uniform


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 97])
def test_grouped_histogram_counts_each_group_as_histogram_add_does(fixed, chunk_rows, monkeypatch):
    """Both routes of histogram_add_by_group (gathered grids on accelerators, per group on CPU),
    in one chunk or many, count each group's rows exactly as histogram_add counts them alone
    (one group; checked against numpy's binning above): no row reaches another group's bins."""
    monkeypatch.setattr(summaries, "fixed_shapes", lambda device: fixed)
    if chunk_rows is not None:
        monkeypatch.setattr(summaries, "_chunk_rows", lambda columns, device: chunk_rows)
    g = torch.Generator().manual_seed(3)
    bins, columns = 48, 7
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for counts in ((300, 120), (0, 250), (90, 0)):
            groups = [(torch.randn(c, columns, generator=g, dtype=torch.float64) * (1 + i) + 3 * i).to(dtype)
                      for i, c in enumerate(counts)]
            grid_rows = [torch.randn(64, columns, generator=g, dtype=torch.float64) * (1 + i) + 3 * i for i in range(2)]
            centre, scale = (torch.stack(part) for part in zip(*(histogram_grid(r) for r in grid_rows)))
            want = torch.zeros(columns, 2, bins, dtype=torch.int32)
            for i, rows in enumerate(groups):
                histogram_add(want[:, i], centre[i], scale[i], rows)
            got = torch.zeros(columns, 2 * bins, dtype=torch.int32)
            group = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
            histogram_add_by_group(got, GroupGrids.of(centre, scale, dtype, bins), torch.cat(groups), counts, group,
                                   (group * bins)[None])
            assert torch.equal(got.view(columns, 2, bins), want), (dtype, counts)


def test_column_order_statistics_match_numpy_sort():
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = (torch.randn(301, 7, generator=g, dtype=torch.float64) * 3).to(dtype)
        x[5:40, 2] = x[4, 2]  # ties
        ranks = [0, 75, 150, 300]
        want = np.sort(x.to(torch.float64).numpy(), axis=0)[ranks]
        got = column_order_statistics(x, ranks)
        assert got.dtype == torch.float64
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("panels", [1, 2, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_upper_add_fills_the_upper_triangle(panels, dtype):
    """``acc += x^T x`` on the upper triangle, read back symmetric: = numpy's float64 product
    (measured 0 in float64 at this size, 6e-7 relative in float32); entries below the diagonal
    blocks are left as they were."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 23, generator=g, dtype=dtype)
    start = torch.randn(23, 23, generator=g, dtype=dtype)
    start = start + start.mT
    acc = start.clone()
    summaries.gram_upper_add_(acc, x, panels)
    x64 = x.double().numpy()
    expected = start.double().numpy() + x64.T @ x64
    got = summaries.symmetric_from_upper(acc).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=(1e-12 if dtype == torch.float64 else 1e-4) * np.abs(expected).max())
    if panels > 1:  # below the first diagonal block: untouched
        np.testing.assert_array_equal(acc[23 // panels:, 0].numpy(), start[23 // panels:, 0].numpy())
    assert summaries.gram_panels(512, torch.device("cpu")) == 4 and summaries.gram_panels(511, torch.device("cpu")) == 1
    assert summaries.gram_panels(4096, torch.device("meta")) == 1


def test_wide_histograms_count_as_narrow_ones():
    """From 512 columns the CPU route transposes each chunk with one copy before binning; the
    counts are bitwise those of binning the same columns 64 at a time (the strided route,
    checked against numpy's binning above)."""
    g = torch.Generator().manual_seed(4)
    columns, bins = 576, 32
    x = torch.randn(700, columns, generator=g) * 2 + 1
    centre, scale = histogram_grid(x[:200].double())
    wide = torch.zeros(columns, bins, dtype=torch.int32)
    histogram_add(wide, centre, scale, x)
    narrow = torch.zeros(columns, bins, dtype=torch.int32)
    for s in range(0, columns, 64):
        histogram_add(narrow[s:s + 64], centre[s:s + 64], scale[s:s + 64], x[:, s:s + 64])
    assert torch.equal(wide, narrow) and int(wide.sum()) == 700 * columns
