"""Independent reference implementation of the MIR spec on materialised tokens.

The one reference of the repository, used by the tests and (re-exported through
``benchmarks/_reference.py``) by the benchmarks. It shares no code with the package and
follows the paper's definition (Huang et al., arXiv 2410.07167) step by step, per layer:

1. text-centric scale ``a = 1 / mean_i ||t_i||`` applied to both modalities;
2. per modality, rows whose norm is more than ``sigma`` unbiased std from the lower median
   norm are replaced by the per-dimension lower median row (``torch.median`` semantics);
3. unbiased means and covariances;
4. the Frechet distance in the Bures-Procrustes form
   ``FD = ||mu_v - mu_t||^2 + min_U ||S_v^(1/2) - S_t^(1/2) U||_F^2`` (U orthogonal), a sum
   of squares: no non-symmetric matrix square root and no subtraction of the nearly equal
   ``tr S_v + tr S_t`` and ``2 tr((S_v S_t)^(1/2))``. Its error against 40-digit mpmath on
   ill-conditioned and singular cases is measured by ``benchmarks/mpmath_reference.py``
   and checked in ``tests/test_reference.py``.

Everything runs in float64 by default (torch, CPU or GPU); ``dtype=torch.float32`` reproduces
the official script's float32 pipeline. Keyword knobs (``median``, ``ddof``,
``normalization``) build deliberate spec violations, so that tests can show they would
catch them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal, Sequence

import numpy as np
import torch

Median = Literal["lower", "midpoint"]
Normalization = Literal["text", "per_modality"]


def as_float64(x) -> torch.Tensor:
    """A float64 CPU tensor with the exact values of ``x`` (numpy array or tensor of any float dtype)."""
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().to("cpu", torch.float64)


def column_median(x: torch.Tensor, median: Median = "lower") -> torch.Tensor:
    """Per-column median of ``x [n, D]``: the lower middle value (the spec, ``torch.median``) or,
    as a deliberate deviation, the midpoint of the two middle values (``numpy.median``)."""
    ordered = x.sort(dim=0).values
    lower = ordered[(x.shape[0] - 1) // 2]
    if median == "lower":
        return lower
    if median == "midpoint":
        return 0.5 * (lower + ordered[x.shape[0] // 2])
    raise ValueError(f"median must be 'lower' or 'midpoint', got {median!r}")


def outlier_rule(x: torch.Tensor, sigma: float | None = 3.0, median: Median = "lower", ddof: int = 1,
                 max_replaced: int | None = None) -> tuple[torch.Tensor, int]:
    """The 3-sigma rule on rows ``x [n, D]`` in ``x``'s dtype: rows with
    ``|norm - median(norm)| > sigma * std(norm)`` become the per-dimension median row.

    ``ddof=1`` is the spec's unbiased std; ``median`` applies to both medians.
    ``max_replaced``: of the outliers above the median norm only the ``max_replaced`` largest
    are replaced (what the package documents when more than ``max_outliers`` rows are
    outliers); ``None`` replaces all (the spec). Returns ``(x', number of replaced rows)``;
    ``sigma=None`` returns ``(x, 0)``."""
    if sigma is None or x.shape[0] < 2:
        return x, 0
    norms = x.norm(dim=1)
    centre = column_median(norms[:, None], median)[0]
    std = norms.std(correction=ddof)
    mask = (norms - centre).abs() > sigma * std
    high = mask & (norms > centre)
    if max_replaced is not None and int(high.sum()) > max_replaced:
        mask &= ~high | (norms >= norms[high].topk(max_replaced).values[-1])
    count = int(mask.sum())
    if count == 0:
        return x, 0
    out = x.clone()
    out[mask] = column_median(x, median)
    return out, count


def mean_cov(x: torch.Tensor, ddof: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and covariance ``[D, D]`` (two-pass, centred product, divided by ``n - ddof``)."""
    mu = x.mean(0)
    xc = x - mu
    return mu, (xc.mT @ xc) / (x.shape[0] - ddof)


def layer_stats(vision, text, dtype: torch.dtype = torch.float64, median: Median = "lower", *,
                sigma: float | None = 3.0, ddof: int = 1, normalization: Normalization = "text",
                max_replaced: int | None = None) -> dict:
    """Steps 1-3 for one layer from token matrices ``[n, D]``, all in ``dtype`` on the tokens' device.

    Returns a dict: ``mu_v``, ``S_v``, ``mu_t``, ``S_t`` (tensors), ``outliers_vision``,
    ``outliers_text`` (ints), ``norm_ratio`` (mean vision norm / mean text norm, float).
    ``normalization="per_modality"`` (each modality scaled by its own mean norm) is the
    package's labelled variant; ``ddof`` applies to the outlier std and the covariances;
    ``max_replaced`` goes to :func:`outlier_rule`."""
    v = vision.to(dtype) if isinstance(vision, torch.Tensor) else as_float64(vision).to(dtype)
    t = text.to(dtype) if isinstance(text, torch.Tensor) else as_float64(text).to(dtype)
    mean_norm_v, mean_norm_t = v.norm(dim=1).mean(), t.norm(dim=1).mean()
    if normalization == "text":
        v, t = v / mean_norm_t, t / mean_norm_t
    elif normalization == "per_modality":
        v, t = v / mean_norm_v, t / mean_norm_t
    else:
        raise ValueError(f"normalization must be 'text' or 'per_modality', got {normalization!r}")
    v, outliers_v = outlier_rule(v, sigma, median, ddof, max_replaced)
    t, outliers_t = outlier_rule(t, sigma, median, ddof, max_replaced)
    mu_v, s_v = mean_cov(v, ddof)
    mu_t, s_t = mean_cov(t, ddof)
    return {"mu_v": mu_v, "S_v": s_v, "mu_t": mu_t, "S_t": s_t, "outliers_vision": outliers_v,
            "outliers_text": outliers_t, "norm_ratio": float(mean_norm_v / mean_norm_t)}


def sqrt_sym(s: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root through an eigendecomposition (negative rounding eigenvalues -> 0)."""
    w, q = torch.linalg.eigh(0.5 * (s + s.mT))
    return (q * w.clamp_min(0).sqrt()) @ q.mT


def bures_terms(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> dict[str, float]:
    """The Frechet distance and its terms, the covariance part as a sum of squares.

    With ``A = S1^(1/2)``, ``B = S2^(1/2)`` and ``A B = P diag(s) Q^T``, ``U = Q P^T`` minimises
    ``||A - B U||_F^2``, which equals ``tr S1 + tr S2 - 2 sum(s)`` and
    ``sum(s) = tr((S1 S2)^(1/2))``. Returns floats ``fd``, ``mean_term``, ``trace1``,
    ``trace2``, ``cross_term`` (``2 sum(s)``)."""
    a, b = sqrt_sym(s1), sqrt_sym(s2)
    p, singular, qh = torch.linalg.svd(a @ b)
    resid = a - b @ (qh.mT @ p.mT)
    diff = mu1 - mu2
    mean_term = float((diff * diff).sum())
    return {"fd": mean_term + float((resid * resid).sum()), "mean_term": mean_term,
            "trace1": float(torch.diagonal(s1).sum()), "trace2": float(torch.diagonal(s2).sum()),
            "cross_term": 2.0 * float(singular.sum())}


def bures_fd(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """Cancellation-free Frechet distance (see :func:`bures_terms`)."""
    return bures_terms(mu1, s1, mu2, s2)["fd"]


def reference_layer(vision, text, sigma: float | None = 3.0, fast: bool = False, *, median: Median = "lower",
                    ddof: int = 1, normalization: Normalization = "text", max_replaced: int | None = None) -> dict:
    """FD and its terms for one layer from token matrices ``[n, D]`` (numpy or torch), float64.

    ``fast=True`` gives what the official script's default "fast" mode computes:
    ``||dmu||^2 + tr S_v + tr S_t - 2 tr(S_v S_t)`` (no square root). Returns a dict with
    ``fd``, ``mean_term``, ``trace_vision``, ``trace_text``, ``cross_term``, ``norm_ratio``,
    ``outliers_vision``, ``outliers_text``, ``n_vision``, ``n_text``. The keyword knobs are
    deliberate deviations from the spec (see :func:`layer_stats`)."""
    v, t = as_float64(vision), as_float64(text)
    st = layer_stats(v, t, torch.float64, median, sigma=sigma, ddof=ddof, normalization=normalization,
                     max_replaced=max_replaced)
    terms = bures_terms(st["mu_v"], st["S_v"], st["mu_t"], st["S_t"])
    if fast:
        terms["cross_term"] = 2.0 * float((st["S_v"] * st["S_t"]).sum())
        terms["fd"] = terms["mean_term"] + terms["trace1"] + terms["trace2"] - terms["cross_term"]
    return dict(fd=terms["fd"], mean_term=terms["mean_term"], trace_vision=terms["trace1"],
                trace_text=terms["trace2"], cross_term=terms["cross_term"], norm_ratio=st["norm_ratio"],
                outliers_vision=st["outliers_vision"], outliers_text=st["outliers_text"],
                n_vision=v.shape[0], n_text=t.shape[0])


def reference_mir(vision_layers: Sequence, text_layers: Sequence, sigma: float | None = 3.0, fast: bool = False,
                  **spec) -> tuple[float, np.ndarray, list[dict]]:
    """``(MIR, per-layer FD [K], per-layer term dicts)`` from lists of per-layer token matrices;
    ``spec`` goes to :func:`reference_layer` (``median``, ``ddof``, ``normalization``, ``max_replaced``)."""
    layers = [reference_layer(v, t, sigma, fast, **spec) for v, t in zip(vision_layers, text_layers)]
    fds = np.array([d["fd"] for d in layers])
    return float(np.log10(fds.sum())), fds, layers


def reference_from_hidden(hidden, vision_mask, text_mask, sigma: float | None = 3.0, fast: bool = False, **spec):
    """Reference MIR from hidden states ``[L, B, T, D]`` (or a list of ``[B, T, D]``) and bool masks ``[B, T]``."""
    vis = [h[vision_mask].double() for h in hidden]
    txt = [h[text_mask].double() for h in hidden]
    return reference_mir(vis, txt, sigma, fast, **spec)


def stream_layer(metric, k: int, vision: torch.Tensor, text: torch.Tensor, chunk: int = 512) -> None:
    """Stream one layer's token matrices into ``metric.update_layer`` as batches ``[1, <=2*chunk, D]``
    (a chunk of vision rows, then a chunk of text rows)."""
    nv, nt = vision.shape[0], text.shape[0]
    for i in range(max(math.ceil(nv / chunk), math.ceil(nt / chunk))):
        v, t = vision[i * chunk:(i + 1) * chunk], text[i * chunk:(i + 1) * chunk]
        hidden = torch.cat([v, t])[None]
        vm = torch.zeros(1, hidden.shape[1], dtype=torch.bool, device=hidden.device)
        vm[0, : v.shape[0]] = True
        metric.update_layer(k, hidden, vm, ~vm)


def exact_tokens(seed: int, n_vision: int, n_text: int, dim: int, massive: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """LLM-like float64 token matrices ``(vision [n_vision, D], text [n_text, D])`` that are
    bit-identical on every machine: integer draws (``torch.randint``) combined by operations
    that are exact in float64 (all values are multiples of 2^-16 below 2^24), so no BLAS or
    LAPACK rounding enters. The cases of ``benchmarks/mpmath_reference.py``.

    Like :func:`llm_like_hidden`: a large common offset, an anisotropic spectrum (std 2^-5 .. 2^2),
    a mixing matrix, vision = 1.5 x text-like + shift, and ``massive`` rows per modality with
    +2^17 (about 150x the median norm) in 3 dimensions (condition numbers ~1e11)."""
    g = torch.Generator().manual_seed(seed)

    def randint(low, high, shape):
        return torch.randint(low, high, shape, generator=g).to(torch.float64)

    spectrum = torch.pow(2.0, torch.round(torch.linspace(-5, 2, dim, dtype=torch.float64)))
    mixing = randint(-8, 9, (dim, dim))
    common = randint(-100, 101, (dim,))

    def draw(n):
        z = randint(-1024, 1025, (n, dim)) / 1024 * spectrum
        return z @ mixing.T + common

    vision = 1.5 * draw(n_vision) + randint(-4, 5, (dim,)) / 2
    text = draw(n_text)
    for x in (vision, text):
        rows = torch.randperm(x.shape[0], generator=g)[:massive]
        x[rows, :3] += 2.0**17
    return vision.numpy(), text.numpy()


def token_hash(vision: np.ndarray, text: np.ndarray) -> str:
    """sha256 of the float64 bytes of both token matrices (C order, little endian)."""
    h = hashlib.sha256()
    for x in (vision, text):
        h.update(np.ascontiguousarray(x, dtype="<f8").tobytes())
    return h.hexdigest()


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
