"""Float64 reference math of the benchmarks (torch only): the MIR steps on materialised
tokens and a cancellation-free Frechet distance. Independent of the package's code."""

from __future__ import annotations

import math

import torch


def outlier_rule(x: torch.Tensor, sigma: float = 3.0, median: str = "lower") -> torch.Tensor:
    """MIR.md step 3 on materialised rows, in x's dtype (lower medians, unbiased std).

    ``median="midpoint"`` replaces outliers by the per-dimension midpoint median (mean of the
    two middle values) instead: not the spec, used to show how much the FD depends on that
    choice of order statistic."""
    norms = x.norm(dim=1)
    mask = (norms - norms.median()).abs() > sigma * norms.std()
    if bool(mask.any()):
        x = x.clone()
        x[mask] = x.median(dim=0).values if median == "lower" else torch.quantile(x, 0.5, dim=0)
    return x


def mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (two-pass, centred product)."""
    mu = x.mean(0)
    xc = x - mu
    return mu, (xc.mT @ xc) / (x.shape[0] - 1)


def layer_stats(vision: torch.Tensor, text: torch.Tensor, dtype: torch.dtype, median: str = "lower") -> dict[str, torch.Tensor]:
    """Text-centric scale, 3-sigma rule, means and covariances of one layer, all in ``dtype``
    (``float32`` reproduces the official script's pipeline: ``.float()`` tokens throughout)."""
    v, t = vision.to(dtype), text.to(dtype)
    scale = 1.0 / t.norm(dim=1).mean()
    v, t = outlier_rule(v * scale, median=median), outlier_rule(t * scale, median=median)
    mu_v, s_v = mean_cov(v)
    mu_t, s_t = mean_cov(t)
    return {"mu_v": mu_v, "S_v": s_v, "mu_t": mu_t, "S_t": s_t}


def sqrt_sym(s: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root through an eigendecomposition."""
    w, q = torch.linalg.eigh(s)
    return (q * w.clamp_min(0).sqrt()) @ q.mT


def bures_fd(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """Cancellation-free FD: ``||dmu||^2 + min_U ||S1^(1/2) - S2^(1/2) U||_F^2`` over orthogonal U.

    With ``A = S1^(1/2)``, ``B = S2^(1/2)`` and ``A B = P diag(s) Q^T``, the minimiser is
    ``U = Q P^T`` and the minimum equals ``tr S1 + tr S2 - 2 sum(s)`` = the Frechet covariance
    term, but it is computed as a sum of squares (no subtraction of nearly equal traces).
    """
    a, b = sqrt_sym(s1), sqrt_sym(s2)
    p, _, qh = torch.linalg.svd(a @ b)
    resid = a - b @ (qh.mT @ p.mT)
    diff = mu1 - mu2
    return float((diff * diff).sum() + (resid * resid).sum())


def feed(metric, k: int, vision: torch.Tensor, text: torch.Tensor, chunk: int = 512) -> None:
    """Stream one layer's tokens into ``metric.update_layer`` as batches [1, <=2*chunk, D]
    (a chunk of vision rows, then a chunk of text rows)."""
    nv, nt = vision.shape[0], text.shape[0]
    for i in range(max(math.ceil(nv / chunk), math.ceil(nt / chunk))):
        v, t = vision[i * chunk:(i + 1) * chunk], text[i * chunk:(i + 1) * chunk]
        hidden = torch.cat([v, t])[None]
        vm = torch.zeros(1, hidden.shape[1], dtype=torch.bool, device=hidden.device)
        vm[0, : v.shape[0]] = True
        metric.update_layer(k, hidden, vm, ~vm)
