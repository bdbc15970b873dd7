"""The streaming metric against the independent float64 reference (tests/reference.py)."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch

from mir_lightning import ModalityIntegrationRate
from mir_lightning.functional import modality_integration_rate
from reference import llm_like_hidden, reference_from_hidden, reference_mir


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


@pytest.mark.parametrize("sigma,tol", [(None, 1e-6), (3.0, 1e-4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_matches_reference_any_split(sigma, tol, seed):
    hidden, vision, text = llm_like_hidden(seed=seed)
    ref_mir, ref_fd, ref_layers = reference_from_hidden(hidden, vision, text, sigma)
    if sigma is not None:
        assert all(d["outliers_vision"] > 0 for d in ref_layers), "data must exercise the outlier rule"
    for split_seed in range(3):
        metric = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1], outlier_sigma=sigma)
        feed(metric, hidden, vision, text, seed=split_seed, layerwise=split_seed == 2)
        assert rel(float(metric.per_layer_fd().sum()), ref_fd.sum()) < tol
        assert abs(float(metric.compute()) - ref_mir) < tol
    stats = metric.per_layer_stats()
    for k, d in enumerate(ref_layers):
        assert stats["n_vision"][k] == d["n_vision"] and stats["n_text"][k] == d["n_text"]
        assert stats["outliers_vision"][k] == d["outliers_vision"]
        assert stats["outliers_text"][k] == d["outliers_text"]
        for key in ("mean_term", "trace_vision", "trace_text", "cross_term", "norm_ratio"):
            assert rel(float(stats[key][k]), d[key]) < 1e-6 if sigma is None else True
        assert math.isclose(float(stats["fd"][k]), d["fd"], rel_tol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    hidden, vision, text = llm_like_hidden(seed=3, offset=20.0)
    hidden = hidden.clamp(-6e4, 6e4).to(dtype)  # the reference sees the same rounded values
    for sigma, tol in ((None, 1e-6), (3.0, 1e-4)):
        ref_mir, ref_fd, _ = reference_from_hidden(hidden.double(), vision, text, sigma)
        metric = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1], outlier_sigma=sigma)
        feed(metric, hidden, vision, text, seed=5)
        assert rel(float(metric.per_layer_fd().sum()), ref_fd.sum()) < tol


def test_fewer_tokens_than_dimensions():
    # 3 samples x 12 vision tokens = 36 rows < D = 64: the vision covariance is singular
    hidden, vision, text = llm_like_hidden(layers=2, batch=3, seq=120, dim=64, n_vision=12, seed=4)
    for sigma, tol in ((None, 1e-6), (3.0, 1e-4)):
        ref_mir, ref_fd, _ = reference_from_hidden(hidden, vision, text, sigma)
        metric = ModalityIntegrationRate(2, 64, outlier_sigma=sigma)
        feed(metric, hidden, vision, text, seed=1)
        assert rel(float(metric.per_layer_fd().sum()), ref_fd.sum()) < tol
    # both singular
    hidden, vision, text = llm_like_hidden(layers=1, batch=2, seq=60, dim=64, n_vision=20, seed=5)
    ref_mir, ref_fd, _ = reference_from_hidden(hidden, vision, text, None)
    metric = ModalityIntegrationRate(1, 64, outlier_sigma=None)
    feed(metric, hidden, vision, text)
    assert rel(float(metric.per_layer_fd().sum()), ref_fd.sum()) < 1e-6


def test_official_fast_mode_reproduces_the_script_default():
    hidden, vision, text = llm_like_hidden(seed=6, offset=0.5, massive=())
    ref_mir, ref_fd, _ = reference_from_hidden(hidden, vision, text, 3.0, fast=True)
    metric = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1], sqrt_mode="official_fast")
    feed(metric, hidden, vision, text)
    assert np.allclose(metric.per_layer_fd().numpy(), ref_fd, rtol=1e-4)
    exact = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1])
    feed(exact, hidden, vision, text)
    assert not np.allclose(exact.per_layer_fd().numpy(), ref_fd, rtol=1e-2)  # they really differ


def test_histogram_median_path_beyond_the_exact_buffer():
    """More rows than median_buffer: the median comes from the histogram (documented bound)."""
    hidden, vision, text = llm_like_hidden(layers=2, batch=40, seq=96, dim=48, seed=7)
    ref_mir, ref_fd, ref_layers = reference_from_hidden(hidden, vision, text, 3.0)
    assert sum(d["outliers_vision"] for d in ref_layers) > 0
    metric = ModalityIntegrationRate(2, 48, median_buffer=64, norm_buffer=100)
    feed(metric, hidden, vision, text, seed=3)
    err = rel(float(metric.per_layer_fd().sum()), ref_fd.sum())
    assert err < 1e-4, err


def test_more_outliers_than_kept_rows_warns_and_stays_close():
    hidden, vision, text = llm_like_hidden(layers=1, batch=12, seed=8, massive=(5, 6, 7, 8, 40))
    ref_mir, ref_fd, ref_layers = reference_from_hidden(hidden, vision, text, 3.0)
    metric = ModalityIntegrationRate(1, hidden.shape[-1], max_outliers=8)
    feed(metric, hidden, vision, text)
    with pytest.warns(RuntimeWarning, match="max_outliers"):
        metric.compute()
    exact = ModalityIntegrationRate(1, hidden.shape[-1], max_outliers=64)
    feed(exact, hidden, vision, text)
    assert rel(float(exact.compute()), ref_mir) < 1e-6


def test_functional_matches_reference():
    hidden, vision, text = llm_like_hidden(seed=9)
    vis = [h[vision].double() for h in hidden]
    txt = [h[text].double() for h in hidden]
    for sigma in (None, 3.0):
        mir, fd = modality_integration_rate(vis, txt, outlier_sigma=sigma)
        ref_mir, ref_fd, _ = reference_mir(vis, txt, sigma)
        # scipy's sqrtm itself is only good to ~1e-8 on the cross term here (condition ~1e11,
        # checked against a 40-digit mpmath computation), which the FD's cancellation
        # turns into ~5e-7: hence 1e-6, the bound
        assert np.allclose(fd.numpy(), ref_fd, rtol=1e-6)
        assert abs(float(mir) - ref_mir) < 1e-6


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
    ref_mir, _, _ = reference_from_hidden(hidden, vision, text, 3.0)
    assert abs(float(metric.compute()) - ref_mir) < 1e-4


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
    ref_mir, _, _ = reference_from_hidden(h, keep_v, keep_t, 3.0)
    assert abs(float(metric.compute()) - ref_mir) < 1e-8


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
    assert rel(float(metric.per_layer_fd().sum()), ref_fd.sum()) < 1e-4


def test_per_modality_normalisation_variant():
    """The labelled variant scales each modality by its own mean norm (reference: rescale tokens first)."""
    hidden, vision, text = llm_like_hidden(seed=13)
    vis = [h[vision].double() for h in hidden]
    txt = [h[text].double() for h in hidden]
    # scaling the vision tokens by mean|T|/mean|V| first makes the paper's MIR equal the variant
    vis_rescaled = [v * (t.norm(dim=1).mean() / v.norm(dim=1).mean()) for v, t in zip(vis, txt)]
    _, ref_fd, _ = reference_mir(vis_rescaled, txt, 3.0)
    metric = ModalityIntegrationRate(hidden.shape[0], hidden.shape[-1], normalization="per_modality")
    feed(metric, hidden, vision, text)
    assert np.allclose(metric.per_layer_fd().numpy(), ref_fd, rtol=1e-4)
    with pytest.raises(ValueError, match="normalization"):
        ModalityIntegrationRate(2, 8, normalization="vision")
