"""Independent float64 implementation of the MIR spec (numpy + scipy), for tests only.

It follows ../shared/docs/MIR.md step by step on materialised tokens and the official
"accurate" mode (scipy.linalg.sqrtm of S_V @ S_T, real part). It shares no code with
the package.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def _replace_outliers(x: np.ndarray, sigma: float | None) -> tuple[np.ndarray, int]:
    if sigma is None:
        return x, 0
    norms = np.linalg.norm(x, axis=1)
    median = np.sort(norms)[(len(norms) - 1) // 2]  # torch.median: the lower middle value
    outlier = np.abs(norms - median) > sigma * norms.std(ddof=1)
    if not outlier.any():
        return x, 0
    median_row = np.sort(x, axis=0)[(len(x) - 1) // 2]
    x = x.copy()
    x[outlier] = median_row
    return x, int(outlier.sum())


def reference_layer(vision, text, sigma=3.0, fast=False) -> dict:
    """FD terms of one layer from token matrices [n, D] (numpy or torch), float64."""
    v = np.asarray(torch.as_tensor(vision).double().cpu().numpy() if not isinstance(vision, np.ndarray) else vision, dtype=np.float64)
    t = np.asarray(torch.as_tensor(text).double().cpu().numpy() if not isinstance(text, np.ndarray) else text, dtype=np.float64)
    ratio = np.linalg.norm(v, axis=1).mean() / np.linalg.norm(t, axis=1).mean()
    a = 1.0 / np.linalg.norm(t, axis=1).mean()
    v, ov = _replace_outliers(v * a, sigma)
    t, ot = _replace_outliers(t * a, sigma)
    mv, mt = v.mean(0), t.mean(0)
    sv, st = np.cov(v, rowvar=False, ddof=1), np.cov(t, rowvar=False, ddof=1)
    if fast:
        cross = 2 * np.trace(sv @ st)
    else:
        cross = 2 * np.trace(scipy.linalg.sqrtm(sv @ st).real)
    mean_term = float(((mv - mt) ** 2).sum())
    fd = mean_term + np.trace(sv) + np.trace(st) - cross
    return dict(fd=float(fd), mean_term=mean_term, trace_vision=float(np.trace(sv)), trace_text=float(np.trace(st)),
                cross_term=float(cross), norm_ratio=float(ratio), outliers_vision=ov, outliers_text=ot,
                n_vision=len(v), n_text=len(t))


def reference_mir(vision_layers, text_layers, sigma=3.0, fast=False) -> tuple[float, np.ndarray, list[dict]]:
    """(MIR, per-layer FD, per-layer term dicts) from lists of per-layer token matrices."""
    layers = [reference_layer(v, t, sigma, fast) for v, t in zip(vision_layers, text_layers)]
    fds = np.array([d["fd"] for d in layers])
    return float(np.log10(fds.sum())), fds, layers


def reference_from_hidden(hidden, vision_mask, text_mask, sigma=3.0, fast=False):
    """Reference MIR from hidden states [L, B, T, D] (or list of [B, T, D]) and bool masks."""
    vis = [h[vision_mask].double() for h in hidden]
    txt = [h[text_mask].double() for h in hidden]
    return reference_mir(vis, txt, sigma, fast)


def llm_like_hidden(layers=3, batch=8, seq=96, dim=48, seed=0, offset=100.0, massive=(5, 40), n_vision=32,
                    prefix=4, pad=8, dtype=torch.float32):
    """Hidden states shaped like an LLM's: a large common offset, an anisotropic spectrum,
    attention-sink tokens with norm >= 100x the median in a few dimensions, a system-prompt
    prefix, image tokens, text tokens, and garbage (NaN/inf/huge) in the padding.

    Returns (hidden [L, B, T, D], vision_mask [B, T], text_mask [B, T]); vision positions
    are prefix..prefix+n_vision, text the rest up to a per-row length, padding after it.
    """
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(-1.5, 0.5, dim, dtype=torch.float64)
    hidden = torch.empty(layers, batch, seq, dim, dtype=torch.float64)
    for k in range(layers):
        common = offset * torch.randn(dim, generator=g, dtype=torch.float64)
        rotation = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
        z = torch.randn(batch, seq, dim, generator=g, dtype=torch.float64) * spectrum
        hidden[k] = z @ rotation.T + common
        # vision tokens: shifted and stretched relative to text
        shift = 2.0 * torch.randn(dim, generator=g, dtype=torch.float64)
        hidden[k, :, prefix:prefix + n_vision] = hidden[k, :, prefix:prefix + n_vision] * 1.5 + shift
    vision = torch.zeros(batch, seq, dtype=torch.bool)
    vision[:, prefix:prefix + n_vision] = True
    text = torch.zeros(batch, seq, dtype=torch.bool)
    lengths = torch.randint(seq - pad - 10, seq - pad + 1, (batch,), generator=g)
    for b in range(batch):
        text[b, prefix + n_vision:int(lengths[b])] = True
    # attention-sink tokens: huge norm concentrated in a few dims
    median_norm = hidden.norm(dim=-1).median()
    for k in range(layers):
        for b in range(batch):
            for pos in massive:
                hidden[k, b, pos, :3] += 150.0 * median_norm
    hidden[:, :, :prefix] *= 1000.0  # the prefix (excluded) holds the real sink
    # garbage in padding
    for b in range(batch):
        hidden[:, b, int(lengths[b]):] = float("nan")
        hidden[:, b, -1] = float("inf")
    return hidden.to(dtype), vision, text
