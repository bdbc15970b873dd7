"""The metric's core: merge_state, plot, warnings per computation, the norm moments of the
outlier rule, the public update path and an update() that never waits for the device."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mir_lightning import ModalityIntegrationRate
from mir_lightning import summaries
from reference import llm_like_hidden, reference_from_hidden, reference_mir


def rel(a, b):
    return abs(a - b) / abs(b)


def split_feed(hidden, vision, text, **kwargs):
    """(a, b, c): a saw rows 1, 2, 4, 5, ..., b rows 0, 3, 6, ..., c all of them, row by row."""
    layers, dim = hidden.shape[0], hidden.shape[-1]
    a, b, c = (ModalityIntegrationRate(layers, dim, **kwargs) for _ in range(3))
    for row in range(hidden.shape[1]):
        batch = (hidden[:, row:row + 1], vision[row:row + 1], text[row:row + 1])
        (a if row % 3 else b).update(*batch)
        c.update(*batch)
    return a, b, c


def test_merge_state_equals_one_metric_that_saw_both_streams():
    hidden, vision, text = llm_like_hidden(seed=3)
    a, b, c = split_feed(hidden, vision, text)
    a.merge_state(b)
    merged, sequential = a.per_layer_stats(), c.per_layer_stats()
    for key in ("n_vision", "n_text", "outliers_vision", "outliers_text"):
        assert torch.equal(merged[key], sequential[key]), key
    assert merged["outliers_vision"].sum() > 0  # the outlier rule is exercised
    # measured 6e-13 (rounding of the merge order, amplified by the outlier rank update)
    np.testing.assert_allclose(merged["fd"].numpy(), sequential["fd"].numpy(), rtol=1e-11)
    # a metric_state dict works the same way
    d, e, _ = split_feed(hidden, vision, text)
    d.merge_state(e.metric_state)
    np.testing.assert_allclose(d.per_layer_fd().numpy(), merged["fd"].numpy(), rtol=1e-14)


def test_merge_state_of_overflowed_buffers_stays_within_the_sketch_bound():
    hidden, vision, text = llm_like_hidden(seed=3)
    buffers = dict(median_buffer=64, norm_buffer=100)
    a, b, c = split_feed(hidden, vision, text, **buffers)
    assert int(b.vision_count[0]) > 64  # both parts went past the exact buffers
    a.merge_state(b)
    _, ref_fd, _ = reference_from_hidden(hidden, vision, text, 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged, sequential = float(a.per_layer_fd().sum()), float(c.per_layer_fd().sum())
    # measured: merged vs sequential 6e-8, each vs the reference 1.3e-7; the sketch's bound is 1e-6
    assert rel(merged, sequential) < 1e-6
    assert rel(merged, ref_fd.sum()) < 1e-6


def test_merge_state_refuses_other_sizes():
    a = ModalityIntegrationRate(2, 8)
    b = ModalityIntegrationRate(2, 8, median_buffer=16)
    b.update(torch.randn(2, 1, 20, 8), torch.ones(1, 20, dtype=torch.bool), torch.zeros(1, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="same sizes"):
        a.merge_state(b)


def test_plot_returns_the_per_layer_figure():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    hidden, vision, text = llm_like_hidden(seed=4)
    metric = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1])
    metric.update(hidden, vision, text)
    fig, axes = metric.plot()
    plotted = axes[0].get_lines()[0].get_ydata()
    np.testing.assert_array_equal(plotted, metric.per_layer_fd().numpy())
    fig2, _ = metric.plot(metric.per_layer_stats())
    assert fig2 is not fig
    with pytest.raises(ValueError, match="ax=None"):
        metric.plot(ax=axes[0])


def _warning_messages(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_warnings_come_back_after_reset_and_name_every_layer():
    metric = ModalityIntegrationRate(3, 8)
    h = torch.randn(3, 1, 10, 8)
    v = torch.zeros(1, 10, dtype=torch.bool)
    v[0, 0] = True  # one vision token: every layer is degenerate
    for _ in range(2):
        metric.update(h, v, ~v)
        few = [m for m in _warning_messages(metric.compute) if "fewer than 2" in m]
        assert len(few) == 3, few
        metric.reset()
    # more outliers than kept rows in both layers: the warning names each layer
    hidden, vision, text = llm_like_hidden(layers=2, batch=12, seed=8, massive=(5, 6, 7, 8, 40))
    metric = ModalityIntegrationRate(2, hidden.shape[-1], max_outliers=8, median_buffer=4096)
    metric.update(hidden, vision, text)
    overflow = [m for m in _warning_messages(metric.compute) if "max_outliers" in m]
    assert any("layer 0, vision" in m for m in overflow) and any("layer 1, vision" in m for m in overflow), overflow


def test_norm_variance_is_exact_with_a_large_common_norm():
    """Token norms 1e5 + N(0, 1e-3): a naive sum of squares loses the variance (n * 1e10 * 1e-16
    >> 1e-6), the Chan-merged norm moments keep it; outlier counts must equal the reference's."""
    g = torch.Generator().manual_seed(0)
    dim, n = 16, 4000
    norms = 1e5 + 1e-3 * torch.randn(2 * n, generator=g, dtype=torch.float64)
    norms[:7] += 0.02  # outliers at 20 std
    direction = torch.randn(2 * n, dim, generator=g, dtype=torch.float64)
    tokens = direction / direction.norm(dim=1, keepdim=True) * norms[:, None]
    tokens[n:] = tokens[n:] * 1.01 + 3.0  # text: another distribution
    vision_rows, text_rows = tokens[:n].reshape(8, n // 8, dim), tokens[n:].reshape(8, n // 8, dim)
    hidden = torch.cat([vision_rows, text_rows], dim=1)[None]  # [1, 8, 2n/8, D]: vision, then text
    vision = torch.zeros(8, 2 * n // 8, dtype=torch.bool)
    vision[:, : n // 8] = True
    _, ref_fd, ref_layers = reference_from_hidden(hidden, vision, ~vision, 3.0)
    assert ref_layers[0]["outliers_vision"] >= 7
    metric = ModalityIntegrationRate(1, dim, median_buffer=2 * n)
    for b in range(8):  # many batches: the merge of the norm moments is exercised
        metric.update(hidden[:, b:b + 1], vision[b:b + 1], ~vision[b:b + 1])
    stats = metric.per_layer_stats()
    assert stats["outliers_vision"][0] == ref_layers[0]["outliers_vision"]
    assert stats["outliers_text"][0] == ref_layers[0]["outliers_text"]
    # the naive sum of squares gave 576 vision outliers here instead of 7
    assert rel(float(stats["fd"][0]), ref_fd[0]) < 1e-9


class _SyncCounter:
    """Counts the Python-level reads of tensor values (each a host sync on an accelerator)."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "tolist")

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(self_, *a, _original=original, **kw):
                self.calls += 1
                return _original(self_, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)


def _steady_batches(layers, dim, batches=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    vision = torch.zeros(2, 64, dtype=torch.bool)
    vision[:, 4:24] = True
    text = torch.zeros(2, 64, dtype=torch.bool)
    text[:, 24:60] = True
    return [(torch.randn(layers, 2, 64, dim, generator=g) + 3.0, vision.clone(), text.clone()) for _ in range(batches)]


@pytest.mark.parametrize("fixed", [False, True])
def test_update_reads_no_tensor_values_per_layer(monkeypatch, fixed):
    """Steady state (past the exact median buffers): update() reads tensor values on the host
    once per batch (the input-error check), whatever the number of layers; update_layer()
    with the masks of the batch not at all."""
    monkeypatch.setattr(summaries, "fixed_shapes", lambda device: fixed)
    calls = {}
    for layers in (1, 4):
        metric = ModalityIntegrationRate(layers, 32, median_buffer=16, norm_buffer=16, max_outliers=8)
        batches = _steady_batches(layers, 32)
        for batch in batches[:2]:
            metric.update(*batch)  # warm-up: sketches switch to their histograms
        counter = _SyncCounter(monkeypatch)
        for batch in batches[2:]:
            metric.update(*batch)
        calls[layers] = counter.calls
        monkeypatch.undo()
        monkeypatch.setattr(summaries, "fixed_shapes", lambda device: fixed)
        hidden, vision, text = batches[0]
        counter = _SyncCounter(monkeypatch)
        for k in range(layers):
            metric.update_layer(k, hidden[k], vision, text)
        assert counter.calls == 0
        monkeypatch.undo()
        monkeypatch.setattr(summaries, "fixed_shapes", lambda device: fixed)
    assert calls[1] == calls[4] == 2, calls  # one any() per update() call, 2 calls


class _OpRecorder(TorchDispatchMode):
    """Records aten ops whose output shape depends on the data or that read a value."""

    SYNCING = ("nonzero", "_local_scalar_dense", "masked_select", "unique")

    def __init__(self):
        super().__init__()
        self.syncing = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        bool_index = name.startswith("index.") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) if i is not None)
        if any(s in name for s in self.SYNCING) or bool_index:
            self.syncing.append(name)
        return func(*args, **(kwargs or {}))


def test_fixed_shape_update_has_no_data_dependent_ops_per_layer(monkeypatch):
    """On accelerators (fixed shapes) the per-layer work has no nonzero, boolean indexing or
    value reads: only the batch's mask positions (once per mask pair) remain."""
    monkeypatch.setattr(summaries, "fixed_shapes", lambda device: True)
    metric = ModalityIntegrationRate(3, 32, median_buffer=16, norm_buffer=16, max_outliers=8)
    batches = _steady_batches(3, 32)
    for batch in batches[:2]:
        metric.update(*batch)
    hidden, vision, text = batches[2]
    recorder = _OpRecorder()
    with recorder:
        for k in range(3):
            metric.update_layer(k, hidden[k], vision, text)
    assert sorted(recorder.syncing) == ["nonzero.default"] * 2, recorder.syncing  # vision and text positions, once


def test_input_errors_are_raised_after_the_batch_and_by_compute():
    metric = ModalityIntegrationRate(2, 8)
    h = torch.randn(2, 3, 10, 8)
    v = torch.zeros(3, 10, dtype=torch.bool)
    v[:, :4] = True
    bad = h.clone()
    bad[1, 0, 5, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 1 hold non-finite"):
        metric.update(bad, v, ~v)
    metric.reset()
    metric.update_layer(1, bad[1], v, ~v)  # a hook cannot stop the forward: compute() raises
    with pytest.raises(ValueError, match="layer 1 hold non-finite"):
        metric.compute()
    metric.reset()
    metric.update(h, v, ~v)
    assert math.isfinite(float(metric.compute()))


def test_update_layer_counts_as_an_update():
    metric = ModalityIntegrationRate(2, 8)
    v = torch.zeros(1, 10, dtype=torch.bool)
    v[:, :4] = True
    for k in (1, 0):
        metric.update_layer(k, torch.randn(1, 10, 8), v, ~v)
    assert metric.update_called and metric.update_count == 2
    metric.reset()
    assert not metric.update_called


def test_outlier_rule_resolves_norms_that_agree_below_float32_resolution():
    """After a final RMSNorm every token's norm can agree to ~1e-8 relative (here: norm 8 with a
    spread of 2.5e-8 relative, below float32's 6e-8): the median norm must be resolved in
    float64, or rounding it moves the 3-sigma band by more than a std and flips rows in or out
    (measured with float32 norm buffers: 1 spurious vision outlier and an FD error of 3e-5 on a
    final-norm layer). Rows at +-3.5 std are real outliers; the closest others sit >= 0.3 std
    inside the band."""
    g = torch.Generator().manual_seed(11)
    dim, n = 48, 160
    vision_dirs = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64) + 0.5, dim=1)
    text_dirs = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    spread = 8.0 * 2.5e-8
    centre = 8.0 + 4.6e-7  # half-way between two float32 values (their spacing at 8 is 9.5e-7)
    vision_norms = centre + spread * torch.randn(n, generator=g, dtype=torch.float64).clamp(-2.5, 2.5)
    vision_norms[:2] = centre + torch.tensor([3.5, -3.5], dtype=torch.float64) * spread * 1.6
    text_norms = centre + spread * torch.randn(n, generator=g, dtype=torch.float64).clamp(-2.5, 2.5)
    vision, text = vision_dirs * vision_norms[:, None], text_dirs * text_norms[:, None]
    metric = ModalityIntegrationRate(1, dim)
    hidden = torch.cat([vision, text])[None, None]
    vision_mask = torch.zeros(1, 2 * n, dtype=torch.bool)
    vision_mask[0, :n] = True
    metric.update(hidden, vision_mask, ~vision_mask)
    stats = metric.per_layer_stats()
    ref_mir, ref_fd, _ = reference_mir([vision], [text])
    from reference import outlier_rule

    expected_vision = outlier_rule(vision / text.norm(dim=1).mean())[1]
    assert expected_vision >= 1  # the case has a real outlier to find
    assert int(stats["outliers_vision"][0]) == expected_vision
    assert int(stats["outliers_text"][0]) == outlier_rule(text / text.norm(dim=1).mean())[1]
    # float64 inputs: the median row is buffered in float32 (documented ~1e-10); measured 1.1e-10
    assert rel(float(stats["fd"][0]), float(ref_fd[0])) < 1e-9
