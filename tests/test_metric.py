"""The streaming metric against the independent float64 reference (tests/reference.py)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from mir_lightning import ModalityIntegrationRate
from mir_lightning.functional import modality_integration_rate
from reference import llm_like_hidden, reference_from_hidden, reference_layer, reference_mir


def feed(metric, hidden, vision, text, splits=None, seed=0, layerwise=False):
    """Feed rows of the batch in random order and random chunk sizes."""
    rows = list(range(hidden.shape[1]))
    random.Random(seed).shuffle(rows)
    chunks, i = [], 0
    rng = random.Random(seed + 1)
    while i < len(rows):
        size = splits or rng.randint(1, 3)
        chunks.append(rows[i:i + size])
        i += size
    for chunk in chunks:
        idx = torch.tensor(chunk)
        if layerwise:
            for k in reversed(range(hidden.shape[0])):
                metric.update_layer(k, hidden[k][idx], vision[idx], text[idx])
        else:
            metric.update([h[idx] for h in hidden], vision[idx], text[idx])


def rel(a, b):
    return abs(a - b) / abs(b)


# Tolerances, from measured errors (benchmarks/mpmath_reference.json and runs of these cases;
# torch 2.13 with MKL's default, MKL_CBWR=COMPATIBLE and AVX2 kernels, 1 or 2 threads):
# - the reference (tests/reference.py, float64, Bures form) against 40-digit mpmath: <= 1.5e-14
#   per layer on the llm_like_hidden cases below, <= 8e-13 on a layer with fewer rows than D;
# - the package (float64 state, exact medians) against the reference: <= 4.1e-12 per layer and
#   on FD sums (<= 1.6e-11 for the per-modality variant), in every split and order;
# - the smallest effects of spec violations on these cases: the midpoint instead of the lower
#   median moves FD sums by 4.3e-7 (per layer >= 3.7e-7), a biased (n) std and covariance by
#   >= 5.6e-7, per-modality instead of text-centric scaling by ~1.
# EXACT_RTOL is 24x the package's error and >= 125x the reference's, and 3700x below the
# smallest of those effects. MIR errors are FD-sum errors / ln(10), so the same bound serves.
EXACT_RTOL = 1e-10


def assert_matches(metric, ref_fd, ref_mir, rtol=EXACT_RTOL):
    fd = metric.per_layer_fd().numpy()
    assert rel(fd.sum(), ref_fd.sum()) < rtol
    np.testing.assert_allclose(fd, ref_fd, rtol=rtol, atol=0)
    assert abs(float(metric.compute()) - ref_mir) < rtol


@pytest.mark.parametrize("sigma", [None, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_matches_reference_any_split(sigma, seed):
    hidden, vision, text = llm_like_hidden(seed=seed)
    ref_mir, ref_fd, ref_layers = reference_from_hidden(hidden, vision, text, sigma)
    if sigma is not None:
        assert all(d["outliers_vision"] > 0 for d in ref_layers), "data must exercise the outlier rule"
    for split_seed in range(3):
        metric = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1], outlier_sigma=sigma)
        feed(metric, hidden, vision, text, seed=split_seed, layerwise=split_seed == 2)
        assert_matches(metric, ref_fd, ref_mir)
    stats = metric.per_layer_stats()
    for k, d in enumerate(ref_layers):
        assert stats["n_vision"][k] == d["n_vision"] and stats["n_text"][k] == d["n_text"]
        assert stats["outliers_vision"][k] == d["outliers_vision"]
        assert stats["outliers_text"][k] == d["outliers_text"]
        # terms, measured package errors: <= 3e-15 with the rule off. With it on, the covariance
        # terms lose up to 4.4e-9 (the sink rows taken out of the co-moments held ~1e8 times the
        # remaining trace) while FD, dominated by the mean term, keeps 1.6e-12: 5e-8 for those.
        # The reference's terms are within 5e-15 of mpmath; a biased covariance moves them by 2.6e-3.
        for key in ("fd", "mean_term", "norm_ratio"):
            assert rel(float(stats[key][k]), d[key]) < EXACT_RTOL, key
        for key in ("trace_vision", "trace_text", "cross_term"):
            assert rel(float(stats[key][k]), d[key]) < (EXACT_RTOL if sigma is None else 5e-8), key


@pytest.mark.parametrize("sigma, rtol", [(None, EXACT_RTOL), (3.0, 5e-9)])
@pytest.mark.parametrize("dim, panels", [(512, None), (48, 3)])
def test_upper_triangle_co_moments_match_reference(monkeypatch, dim, panels, sigma, rtol):
    """On the CPU from D = 512 the co-moments accumulate only their upper triangle (4 panel
    GEMMs, 10/16 of the flops); streamed, merged from two metrics and reloaded from a
    state_dict, the result is the reference's. ``panels`` forces a panel count at a small D.
    Measured per layer at D = 512 (768 vision tokens): 1.0e-12 with the rule off; 7.1e-10 with
    it on, as with full GEMMs (7.1e-10 before this change: the sink rows taken out of the
    co-moments cancel ~1e8 times the rest of the trace); reference vs mpmath <= 1.5e-14 at
    D = 48. Reading the state without mirroring its upper triangle moves FD by 3.1e-9 (rule
    off; FD is mostly the mean term here) and 3.9e-2 (rule on)."""
    import mir_lightning.metric as metric_module

    if panels is not None:
        monkeypatch.setattr(metric_module, "gram_panels", lambda columns, device: panels)
    hidden, vision, text = llm_like_hidden(layers=2, batch=24, seq=64, dim=dim, seed=11)
    ref_mir, ref_fd, _ = reference_from_hidden(hidden, vision, text, sigma)
    halves = []
    for rows in (slice(0, 9), slice(9, None)):
        part = ModalityIntegrationRate(2, dim, outlier_sigma=sigma, median_buffer=4096)
        feed(part, hidden[:, rows], vision[rows], text[rows], seed=2)
        halves.append(part)
    m2 = halves[0].m2[0, 1]
    assert not torch.equal(m2, m2.mT), "the state must hold the upper triangle only"
    halves[0].merge_state(halves[1])
    assert_matches(halves[0], ref_fd, ref_mir, rtol)
    halves[0].persistent(True)
    reloaded = ModalityIntegrationRate(2, dim, outlier_sigma=sigma, median_buffer=4096)
    reloaded.persistent(True)
    reloaded.load_state_dict(halves[0].state_dict())
    assert_matches(reloaded, ref_fd, ref_mir, rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    hidden, vision, text = llm_like_hidden(seed=3, offset=20.0)
    hidden = hidden.clamp(-6e4, 6e4).to(dtype)  # the reference sees the same rounded values
    for sigma in (None, 3.0):
        # measured: package <= 3e-12 per layer, reference vs mpmath <= 1.5e-14; the midpoint
        # median would move the sigma=3 FD sums by 1.3e-5 (fp16) and 1.5e-5 (bf16)
        ref_mir, ref_fd, _ = reference_from_hidden(hidden.double(), vision, text, sigma)
        metric = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1], outlier_sigma=sigma)
        feed(metric, hidden, vision, text, seed=5)
        assert_matches(metric, ref_fd, ref_mir)


def test_fewer_tokens_than_dimensions():
    # 3 samples x 12 vision tokens = 36 rows < D = 64: the vision covariance is singular.
    # Measured: reference vs mpmath <= 7e-13 on such layers; package <= 4.4e-13 with the rule off
    # and <= 1.4e-9 with it on (the package's diagonal jitter of the rank-deficient covariance;
    # 1.2e-9 against mpmath): 2e-8 there, 550x below the smallest midpoint-median effect on this
    # case (1.1e-5 per layer)
    hidden, vision, text = llm_like_hidden(layers=2, batch=3, seq=120, dim=64, n_vision=12, seed=4)
    for sigma, tol in ((None, EXACT_RTOL), (3.0, 2e-8)):
        ref_mir, ref_fd, _ = reference_from_hidden(hidden, vision, text, sigma)
        metric = ModalityIntegrationRate(2, 64, outlier_sigma=sigma)
        feed(metric, hidden, vision, text, seed=1)
        assert_matches(metric, ref_fd, ref_mir, tol)
    # both singular; measured package <= 4.1e-12
    hidden, vision, text = llm_like_hidden(layers=1, batch=2, seq=60, dim=64, n_vision=20, seed=5)
    ref_mir, ref_fd, _ = reference_from_hidden(hidden, vision, text, None)
    metric = ModalityIntegrationRate(1, 64, outlier_sigma=None)
    feed(metric, hidden, vision, text)
    assert_matches(metric, ref_fd, ref_mir)


def test_official_fast_mode_reproduces_the_script_default():
    hidden, vision, text = llm_like_hidden(seed=6, offset=0.5, massive=())
    ref_mir, ref_fd, _ = reference_from_hidden(hidden, vision, text, 3.0, fast=True)
    metric = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1], sqrt_mode="official_fast")
    feed(metric, hidden, vision, text)
    assert_matches(metric, ref_fd, ref_mir)  # measured 2e-16
    exact = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1])
    feed(exact, hidden, vision, text)
    assert np.all(rel(exact.per_layer_fd().numpy(), ref_fd) > 0.1)  # they really differ (measured >= 0.34)


def test_histogram_median_path_beyond_the_exact_buffer():
    """More rows than median_buffer: the median comes from the histogram (documented bound).

    Measured on this case: FD-sum error 5.0e-8, per layer 5.6e-8 with this feed (1.3e-7 per
    layer fed in 64-row chunks); the reference is within 1e-15 of mpmath here. 5e-7 is 10x the
    error of this feed, below the documented 1e-6."""
    hidden, vision, text = llm_like_hidden(layers=2, batch=40, seq=96, dim=48, seed=7)
    ref_mir, ref_fd, ref_layers = reference_from_hidden(hidden, vision, text, 3.0)
    assert sum(d["outliers_vision"] for d in ref_layers) > 0
    metric = ModalityIntegrationRate(2, 48, median_buffer=64, norm_buffer=100)
    feed(metric, hidden, vision, text, seed=3)
    with pytest.warns(RuntimeWarning, match="median_buffer"):
        metric.compute()
    assert_matches(metric, ref_fd, ref_mir, 5e-7)


def test_more_outliers_than_kept_rows_warns_and_replaces_the_most_extreme():
    """48 vision rows carry attention-sink norms (4 per sample), the metric keeps 16: it must warn,
    replace exactly the 16 largest-norm outliers (as documented) and count the rest as they are."""
    hidden, vision, text = llm_like_hidden(layers=1, batch=12, seed=8, massive=(5, 6, 7, 8, 40))
    _, full_fd, full = reference_from_hidden(hidden, vision, text, 3.0)
    assert full[0]["outliers_vision"] == 48 and full[0]["outliers_text"] == 12
    ref_mir, ref_fd, ref = reference_from_hidden(hidden, vision, text, 3.0, max_replaced=16)
    assert ref[0]["outliers_vision"] == 16 and ref[0]["outliers_text"] == 12
    # median_buffer above the 541 text rows: exact medians, so only the overflow differs
    metric = ModalityIntegrationRate(1, hidden.shape[-1], max_outliers=16, median_buffer=1024)
    feed(metric, hidden, vision, text)
    with pytest.warns(RuntimeWarning, match="max_outliers"):
        metric.compute()
    stats = metric.per_layer_stats()
    assert stats["outliers_vision"][0] == 16 and stats["outliers_text"][0] == 12
    assert_matches(metric, ref_fd, ref_mir)  # measured 2.0e-12 (7e-13 for the exact metric below)
    assert rel(float(metric.per_layer_fd()[0]), full_fd[0]) > 1e-3  # the overflow really matters here (2e4x)
    exact = ModalityIntegrationRate(1, hidden.shape[-1], max_outliers=64, median_buffer=1024)
    feed(exact, hidden, vision, text)
    assert_matches(exact, full_fd, np.log10(full_fd.sum()))


def test_functional_matches_reference():
    hidden, vision, text = llm_like_hidden(seed=9)
    vis = [h[vision].double() for h in hidden]
    txt = [h[text].double() for h in hidden]
    for sigma in (None, 3.0):
        mir, fd = modality_integration_rate(vis, txt, outlier_sigma=sigma)
        ref_mir, ref_fd, _ = reference_mir(vis, txt, sigma)
        # measured 8e-14 per layer (package), the reference's own error <= 1.5e-14
        np.testing.assert_allclose(fd.numpy(), ref_fd, rtol=EXACT_RTOL, atol=0)
        assert abs(float(mir) - ref_mir) < EXACT_RTOL


@pytest.mark.parametrize("violation", [
    dict(median="midpoint"),  # numpy.median's midpoint instead of torch.median's lower middle value
    dict(ddof=0),  # biased (n) std in the outlier rule and biased covariances
    dict(normalization="per_modality"),  # each modality scaled by its own mean norm
])
def test_a_spec_violation_would_fail(violation):
    """The tolerance separates the spec from plausible mistakes: the metric is within it of the
    reference and outside it (by a wide margin) of the same reference with one deviation."""
    hidden, vision, text = llm_like_hidden(seed=0)
    assert int(vision.sum()) % 2 == 0  # an even count: the two medians differ
    ref_mir, ref_fd, ref_layers = reference_from_hidden(hidden, vision, text, 3.0)
    assert all(d["outliers_vision"] > 0 and d["outliers_text"] > 0 for d in ref_layers)
    _, wrong_fd, _ = reference_from_hidden(hidden, vision, text, 3.0, **violation)
    metric = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1])
    feed(metric, hidden, vision, text, seed=4)
    assert_matches(metric, ref_fd, ref_mir)
    fd = metric.per_layer_fd().numpy()
    assert np.all(rel(fd, wrong_fd) > 100 * EXACT_RTOL)  # measured >= 3.7e-7 per layer
    assert rel(fd.sum(), wrong_fd.sum()) > 100 * EXACT_RTOL


def test_outlier_threshold_uses_the_unbiased_std():
    """One vision row placed 2.985 unbiased std from the median norm: not an outlier under the spec
    (n - 1), an outlier with the biased std (n), whose threshold is 3 sqrt(39/40) = 2.962 std."""
    g = torch.Generator().manual_seed(21)
    vision = torch.randn(40, 8, generator=g, dtype=torch.float64) + 4.0
    text = torch.randn(60, 8, generator=g, dtype=torch.float64) + 4.0

    def distance_in_std(c):
        norms = vision.norm(dim=1)
        norms[0] *= c
        return float((norms[0] - norms.median()) / norms.std())

    low, high = 1.0, 10.0
    assert distance_in_std(low) < 2.985 < distance_in_std(high)
    for _ in range(60):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if distance_in_std(mid) < 2.985 else (low, mid)
    vision[0] *= low
    spec = reference_layer(vision, text, 3.0)
    biased = reference_layer(vision, text, 3.0, ddof=0)
    assert (spec["outliers_vision"], biased["outliers_vision"]) == (0, 1)
    assert spec["outliers_text"] == biased["outliers_text"] == 0
    hidden = torch.cat([vision, text])[None, None]
    vm = torch.zeros(1, 100, dtype=torch.bool)
    vm[0, :40] = True
    metric = ModalityIntegrationRate(1, 8)
    metric.update(hidden, vm, ~vm)
    assert metric.per_layer_stats()["outliers_vision"][0] == 0
    assert rel(float(metric.per_layer_fd()[0]), spec["fd"]) < EXACT_RTOL
    assert rel(float(metric.per_layer_fd()[0]), biased["fd"]) > 100 * EXACT_RTOL


def test_state_does_not_grow_with_tokens():
    metric = ModalityIntegrationRate(2, 16, median_buffer=32, norm_buffer=64)
    g = torch.Generator().manual_seed(0)
    vision = torch.zeros(4, 50, dtype=torch.bool)
    vision[:, :20] = True
    text = ~vision
    sizes = []
    for step in range(30):
        metric.update(torch.randn(2, 4, 50, 16, generator=g), vision, text)
        sizes.append(sum(t.numel() * t.element_size() for t in metric.metric_state.values()))
    assert sizes[5] == sizes[-1]
    assert sizes[-1] <= metric.state_nbytes()
    assert metric.state_nbytes() == ModalityIntegrationRate.state_nbytes_for(2, 16, median_buffer=32, norm_buffer=64)


def test_reset_and_reuse():
    hidden, vision, text = llm_like_hidden(seed=10)
    metric = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1])
    metric.update(torch.randn_like(hidden).nan_to_num(), vision, text)
    metric.compute()
    metric.reset()
    feed(metric, hidden, vision, text)
    ref_mir, ref_fd, _ = reference_from_hidden(hidden, vision, text, 3.0)
    assert_matches(metric, ref_fd, ref_mir)  # measured 3.4e-13 per layer


def test_bad_input_errors():
    metric = ModalityIntegrationRate(2, 8)
    h = torch.randn(2, 3, 10, 8)
    v = torch.zeros(3, 10, dtype=torch.bool)
    v[:, :4] = True
    t = torch.zeros(3, 10, dtype=torch.bool)
    t[:, 4:] = True
    with pytest.raises(ValueError, match="shape"):
        metric.update(h, v[:, :5], t)
    with pytest.raises(TypeError, match="bool"):
        metric.update(h, v.long(), t)
    with pytest.raises(ValueError, match="2 layers"):
        metric.update(h[:1], v, t)
    with pytest.raises(ValueError, match="hidden_size"):
        metric.update(torch.randn(2, 3, 10, 9), v, t)
    with pytest.raises(ValueError, match="both"):
        metric.update(h, v, t | v)
    bad = h.clone()
    bad[0, 0, 5, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        metric.update(bad, v, t)
    with pytest.raises(ValueError, match="sqrt_mode"):
        ModalityIntegrationRate(2, 8, sqrt_mode="fast")
    with pytest.raises(IndexError):
        metric.update_layer(2, h[0], v, t)


def test_nonfinite_skip_counts_tokens():
    metric = ModalityIntegrationRate(1, 8, nan_strategy="skip")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 4, 20, 8, generator=g)
    v = torch.zeros(4, 20, dtype=torch.bool)
    v[:, :8] = True
    t = ~v
    h[0, 1, 3, 2] = float("inf")
    h[0, 2, 15, 0] = float("nan")
    metric.update(h, v, t)
    stats = metric.per_layer_stats()
    assert stats["nonfinite_vision"][0] == 1 and stats["nonfinite_text"][0] == 1
    keep_v = v.clone(); keep_v[1, 3] = False
    keep_t = t.clone(); keep_t[2, 15] = False
    ref_mir, ref_fd, _ = reference_from_hidden(h, keep_v, keep_t, 3.0)
    assert_matches(metric, ref_fd, ref_mir)


def test_too_few_tokens_gives_nan_with_warning():
    metric = ModalityIntegrationRate(2, 8)
    h = torch.randn(2, 1, 10, 8)
    v = torch.zeros(1, 10, dtype=torch.bool)
    v[0, 0] = True  # one vision token
    t = torch.zeros(1, 10, dtype=torch.bool)
    t[0, 2:] = True
    metric.update(h, v, t)
    with pytest.warns(RuntimeWarning, match="fewer than 2"):
        value = metric.compute()
    assert math.isnan(float(value))
    assert torch.isnan(metric.per_layer_fd()).all()


def test_sequence_and_tensor_inputs_agree_and_autocast_does_not_degrade():
    hidden, vision, text = llm_like_hidden(seed=11)
    a = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1])
    b = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1])
    a.update(hidden, vision, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b.update(list(hidden), vision, text)
    assert torch.equal(a.per_layer_fd(), b.per_layer_fd())
    assert b.vision_m2.dtype == torch.float64


def test_float32_state_is_close():
    hidden, vision, text = llm_like_hidden(seed=12)
    ref_mir, ref_fd, _ = reference_from_hidden(hidden, vision, text, None)
    metric = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1], outlier_sigma=None, state_dtype=torch.float32)
    feed(metric, hidden, vision, text)
    # float32 rounding depends on the feed and on MKL's code path: measured over llm_like_hidden
    # seeds 0-2 and 12, two feeds each, default / MKL_CBWR=COMPATIBLE / AVX2 kernels: FD sum
    # <= 2.2e-6, per layer <= 4.3e-6. 10x that; a biased covariance would move this case by
    # 8.8e-3, per-modality scaling by 0.36.
    assert_matches(metric, ref_fd, ref_mir, 5e-5)
    assert rel(float(metric.per_layer_fd().sum()), ref_fd.sum()) < 3e-5
    # With the outlier rule on and attention-sink rows (norm 150x the median) the float32 state
    # is far worse: over the same runs FD sum <= 1.1e-3, per layer <= 2.9e-3 (taking the sink
    # rows out of float32 co-moments cancels catastrophically). Only that measured bound (10x)
    # is asserted here; it still fails on per-modality scaling (~1 on this case).
    ref_mir, ref_fd, _ = reference_from_hidden(hidden, vision, text, 3.0)
    metric = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1], state_dtype=torch.float32)
    feed(metric, hidden, vision, text)
    assert_matches(metric, ref_fd, ref_mir, 3e-2)
    assert rel(float(metric.per_layer_fd().sum()), ref_fd.sum()) < 1e-2


def test_per_modality_normalisation_variant():
    """The labelled variant scales each modality by its own mean norm (reference: rescale tokens first)."""
    hidden, vision, text = llm_like_hidden(seed=13)
    vis = [h[vision].double() for h in hidden]
    txt = [h[text].double() for h in hidden]
    # scaling the vision tokens by mean|T|/mean|V| first makes the paper's MIR equal the variant
    vis_rescaled = [v * (t.norm(dim=1).mean() / v.norm(dim=1).mean()) for v, t in zip(vis, txt)]
    ref_mir, ref_fd, _ = reference_mir(vis_rescaled, txt, 3.0)
    _, knob_fd, _ = reference_mir(vis, txt, 3.0, normalization="per_modality")
    np.testing.assert_allclose(knob_fd, ref_fd, rtol=1e-12)  # the reference's knob is that variant
    metric = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1], normalization="per_modality")
    feed(metric, hidden, vision, text)
    # measured <= 1.6e-11 per layer (more cancellation than the paper's MIR on this case): 1e-9;
    # the paper's MIR differs from the variant by ~1 here
    assert_matches(metric, ref_fd, ref_mir, 1e-9)
    with pytest.raises(ValueError, match="normalization"):
        ModalityIntegrationRate(2, 8, normalization="vision")
