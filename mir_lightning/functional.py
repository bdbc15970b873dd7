"""Pure tensor math of the Modality Integration Rate (no torchmetrics, no Lightning).

Spec: Huang et al., arXiv 2410.07167. Per LLM layer k,
with vision tokens ``V_k`` and text tokens ``T_k`` (rows):

1. text-centric scale ``a_k = 1 / mean_i ||T_k[i]||``, applied to both modalities;
2. 3-sigma rule per modality: a row whose norm ``n_i`` has ``|n_i - median(n)| > 3 std(n)``
   (``std`` unbiased) is replaced by the per-dimension (lower) median row;
3. ``FD_k = ||mu_V - mu_T||^2 + tr S_V + tr S_T - 2 tr((S_V S_T)^(1/2))`` with unbiased
   covariances;
4. ``MIR = log10(sum_k FD_k)``.

:func:`modality_integration_rate` works on materialised tokens; :func:`layer_result` gives the
same per-layer result from two streaming summaries (:class:`~mir_lightning.summaries.ModalitySummary`),
which is what the metric computes. Linear algebra runs in the dtype it is given (use float64).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import astuple, dataclass, fields
from typing import Literal, Sequence

import torch
from torch import Tensor

from mir_lightning.summaries import ModalitySummary, replace_outliers_in_moments

SqrtMode = Literal["exact", "official_fast"]
SQRT_MODES = ("exact", "official_fast")

__all__ = [
    "SQRT_MODES",
    "LayerResult",
    "layer_result",
    "text_centric_scales",
    "frechet_distance",
    "frechet_terms",
    "lower_median",
    "modality_integration_rate",
    "outlier_rows",
    "replace_outliers",
    "trace_sqrt_product",
]


def _check_sqrt_mode(sqrt_mode: str) -> None:
    if sqrt_mode not in SQRT_MODES:
        raise ValueError(f"sqrt_mode must be one of {SQRT_MODES}, got {sqrt_mode!r}")


def _psd_factor(cov: Tensor, max_tries: int = 4) -> Tensor:
    """A factor ``F`` with ``F F^T = cov`` for a batch of symmetric PSD matrices ``[..., D, D]``.

    Cholesky first; matrices that are not numerically positive definite (fewer samples
    than D) get a diagonal jitter ``eps * tr(C)/D`` with ``eps = 1e-15 ... 1e-12``; those
    still failing (indefinite from rounding, e.g. float32 states) use ``U sqrt(max(w, 0))``
    from a symmetric eigendecomposition.
    """
    factor, info = torch.linalg.cholesky_ex(cov)
    failed = info > 0
    if not bool(failed.any()):
        return factor
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(cov.dtype).tiny)
    eps = 1e-15 if cov.dtype == torch.float64 else 1e-7
    for _ in range(max_tries):
        retry, info_retry = torch.linalg.cholesky_ex(cov + (scale * eps)[..., None, None] * eye)
        factor = torch.where(failed[..., None, None], retry, factor)
        failed = failed & (info_retry > 0)
        if not bool(failed.any()):
            return factor
        eps *= 10.0
    values, vectors = torch.linalg.eigh(cov)
    eig_factor = vectors * values.clamp_min(0).sqrt()[..., None, :]
    return torch.where(failed[..., None, None], eig_factor, factor)


def trace_sqrt_product(cov1: Tensor, cov2: Tensor) -> Tensor:
    """``tr((cov1 @ cov2)^(1/2))`` for batches of symmetric PSD matrices ``[..., D, D]``.

    With ``cov1 = L L^T`` (Cholesky), ``cov1 cov2`` is similar to the symmetric PSD matrix
    ``L^T cov2 L``, so the trace of the square root is the sum of square roots of its
    eigenvalues: one Cholesky, two products and one symmetric eigenvalue solve, no
    non-symmetric square root. Rank-deficient ``cov1`` gets a tiny diagonal jitter
    (relative ``1e-15`` of the mean variance, escalated only if needed, then an
    eigendecomposition factor if rounding made it indefinite). Pass the
    better-conditioned matrix (more samples) as ``cov1``. Returns shape ``[...]``.
    """
    if cov1.shape != cov2.shape or cov1.shape[-1] != cov1.shape[-2]:
        raise ValueError(f"covariances must be square and of one shape, got {tuple(cov1.shape)} and {tuple(cov2.shape)}")
    factor = _psd_factor(cov1)
    inner = factor.mT @ cov2 @ factor
    inner = 0.5 * (inner + inner.mT)
    eigenvalues = torch.linalg.eigvalsh(inner)
    return eigenvalues.clamp_min(0).sqrt().sum(-1)


def frechet_terms(
    mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor, sqrt_mode: SqrtMode = "exact"
) -> dict[str, Tensor]:
    """The four terms of the Fréchet distance, batched over leading dimensions.

    Args:
        mu1, mu2: means ``[..., D]``.
        cov1, cov2: covariances ``[..., D, D]`` (symmetric PSD).
        sqrt_mode: ``"exact"`` uses ``2 tr((cov1 cov2)^(1/2))``; ``"official_fast"``
            uses ``2 tr(cov1 cov2)``, what the official script's default "fast" mode
            computes (its square-root iteration ``Y = A, Z = I`` is a fixed point that returns its
            input ``A``). Not a
            Fréchet distance; offered only to compare with numbers made that way.

    Returns:
        dict of ``[...]`` tensors: ``mean_term`` ``||mu1 - mu2||^2``, ``trace1``, ``trace2``,
        ``cross_term`` (the subtracted ``2 tr(...)``) and ``fd`` = mean + traces - cross.
        ``fd`` is not clamped here.
    """
    _check_sqrt_mode(sqrt_mode)
    diff = mu1 - mu2
    mean_term = (diff * diff).sum(-1)
    trace1 = torch.diagonal(cov1, dim1=-2, dim2=-1).sum(-1)
    trace2 = torch.diagonal(cov2, dim1=-2, dim2=-1).sum(-1)
    if sqrt_mode == "exact":
        cross = 2.0 * trace_sqrt_product(cov1, cov2)
    else:
        cross = 2.0 * (cov1 * cov2).sum((-2, -1))
    return {
        "mean_term": mean_term,
        "trace1": trace1,
        "trace2": trace2,
        "cross_term": cross,
        "fd": mean_term + trace1 + trace2 - cross,
    }


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor, sqrt_mode: SqrtMode = "exact") -> Tensor:
    """Fréchet distance between Gaussians, batched over leading dimensions.

    ``||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))``.

    Args:
        mu1, mu2: ``[..., D]``; cov1, cov2: ``[..., D, D]`` symmetric PSD, any float dtype
            (float64 recommended: every float32 route loses digits when the distance is
            small against the traces).
        sqrt_mode: ``"exact"`` (default) or ``"official_fast"`` (see :func:`frechet_terms`).

    Returns:
        ``[...]`` distances. In exact mode tiny negative values from rounding are clamped to 0.

    Example:
        >>> import torch
        >>> from mir_lightning.functional import frechet_distance
        >>> mu, cov = torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
        >>> float(frechet_distance(mu, cov, mu + 1, 4 * cov))  # 3 + 3 + 12 - 2*2*3
        6.0
    """
    fd = frechet_terms(mu1, cov1, mu2, cov2, sqrt_mode)["fd"]
    return fd.clamp_min(0) if sqrt_mode == "exact" else fd


def lower_median(x: Tensor, dim: int = 0) -> Tensor:
    """Median along ``dim``; for an even count the lower middle value (``torch.median``)."""
    return x.median(dim=dim).values


def outlier_rows(norms: Tensor, sigma: float | None = 3.0) -> Tensor:
    """Bool ``[n]``: rows whose norm is more than ``sigma`` unbiased std from the median norm.

    ``sigma=None`` disables the rule (all False). Fewer than 2 rows: all False.
    """
    if sigma is None or norms.numel() < 2:
        return torch.zeros_like(norms, dtype=torch.bool)
    return (norms - lower_median(norms)).abs() > sigma * norms.std(unbiased=True)


def replace_outliers(tokens: Tensor, sigma: float | None = 3.0) -> tuple[Tensor, int]:
    """Apply the 3-sigma rule to ``tokens [n, D]``: outlier rows become the per-dimension
    lower median row (median over all rows, outliers included). Returns ``(tokens', count)``."""
    mask = outlier_rows(tokens.norm(dim=1), sigma)
    count = int(mask.sum())
    if count == 0:
        return tokens, 0
    out = tokens.clone()
    out[mask] = lower_median(tokens, 0)
    return out, count


def _mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.mT @ xc / (x.shape[0] - 1)


def modality_integration_rate(
    vision_tokens: Sequence[Tensor],
    text_tokens: Sequence[Tensor],
    *,
    outlier_sigma: float | None = 3.0,
    sqrt_mode: SqrtMode = "exact",
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """MIR from materialised per-layer token matrices (the non-streaming path).

    Args:
        vision_tokens: one ``[n_v, D]`` tensor per layer (all vision tokens of all samples).
        text_tokens: one ``[n_t, D]`` tensor per layer.
        outlier_sigma: the outlier rule's threshold in std units; ``None`` turns it off.
        sqrt_mode: ``"exact"`` (true Fréchet distance) or ``"official_fast"``.
        dtype: computation dtype (float64 by default).

    Returns:
        ``(mir, per_layer_fd)``: a 0-dim tensor ``log10(sum FD)`` and ``[num_layers]`` FDs
        (text-normalised, after the outlier rule). A layer with fewer than 2 tokens of a
        modality gives NaN (with a warning).

    Example:
        >>> import torch
        >>> from mir_lightning.functional import modality_integration_rate
        >>> g = torch.Generator().manual_seed(0)
        >>> vis = [torch.randn(50, 8, generator=g) + 1 for _ in range(2)]
        >>> txt = [torch.randn(60, 8, generator=g) for _ in range(2)]
        >>> mir, fd = modality_integration_rate(vis, txt)
        >>> fd.shape
        torch.Size([2])
    """
    _check_sqrt_mode(sqrt_mode)
    if len(vision_tokens) != len(text_tokens):
        raise ValueError(f"got {len(vision_tokens)} vision layers but {len(text_tokens)} text layers")
    fds = []
    for k, (vis, txt) in enumerate(zip(vision_tokens, text_tokens)):
        vis, txt = vis.to(dtype), txt.to(dtype)
        if vis.ndim != 2 or txt.ndim != 2 or vis.shape[1] != txt.shape[1]:
            raise ValueError(f"layer {k}: expected [n, D] matrices of one D, got {tuple(vis.shape)} and {tuple(txt.shape)}")
        if vis.shape[0] < 2 or txt.shape[0] < 2:
            warnings.warn(f"layer {k}: fewer than 2 vision or text tokens; its FD is NaN", RuntimeWarning, stacklevel=2)
            fds.append(torch.tensor(math.nan, dtype=dtype))
            continue
        scale = 1.0 / txt.norm(dim=1).mean()
        vis, _ = replace_outliers(vis * scale, outlier_sigma)
        txt, _ = replace_outliers(txt * scale, outlier_sigma)
        mu_v, cov_v = _mean_cov(vis)
        mu_t, cov_t = _mean_cov(txt)
        fds.append(frechet_distance(mu_t, cov_t, mu_v, cov_v, sqrt_mode))
    per_layer = torch.stack(fds)
    return torch.log10(per_layer.sum()), per_layer


Normalization = Literal["text", "per_modality"]


def text_centric_scales(
    vision_mean_norm: float, text_mean_norm: float, normalization: Normalization = "text"
) -> tuple[float, float]:
    """``(vision scale, text scale)``: both ``1 / mean text-token norm`` (the paper's MIR), or
    with ``normalization="per_modality"`` (a labelled variant) each ``1 / its own mean norm``."""
    text_scale = 1.0 / text_mean_norm
    vision_scale = 1.0 / vision_mean_norm if normalization == "per_modality" else text_scale
    return vision_scale, text_scale


@dataclass(frozen=True)
class LayerResult:
    """One layer's MIR diagnostics (see ``ModalityIntegrationRate.per_layer_stats``) and caveats.

    The first twelve fields are the per-layer statistics; the ``*_sketch`` flags say that a
    median came from a histogram (``median_sketch``: the median row that replaced outliers;
    ``norm_sketch``: the median norm); ``overflow_*``: more outliers at that end of the norm
    distribution than rows kept there. All fields are numbers, so a result travels as one
    float64 row (:meth:`as_row` / :meth:`from_row`)."""

    fd: float
    mean_term: float
    trace_vision: float
    trace_text: float
    cross_term: float
    norm_ratio: float
    n_vision: int
    n_text: int
    outliers_vision: int = 0
    outliers_text: int = 0
    nonfinite_vision: int = 0
    nonfinite_text: int = 0
    median_sketch_vision: bool = False
    median_sketch_text: bool = False
    norm_sketch_vision: bool = False
    norm_sketch_text: bool = False
    overflow_high_vision: bool = False
    overflow_low_vision: bool = False
    overflow_high_text: bool = False
    overflow_low_text: bool = False

    STATS = ("fd", "mean_term", "trace_vision", "trace_text", "cross_term", "norm_ratio", "n_vision", "n_text",
             "outliers_vision", "outliers_text", "nonfinite_vision", "nonfinite_text")

    @property
    def degenerate(self) -> bool:
        """Fewer than 2 tokens of a modality: FD is NaN."""
        return self.n_vision < 2 or self.n_text < 2

    def as_row(self) -> Tensor:
        return torch.tensor([float(v) for v in astuple(self)], dtype=torch.float64)

    @classmethod
    def from_row(cls, row: Tensor) -> "LayerResult":
        values = row.tolist()
        kinds = [f.type for f in fields(cls)]
        return cls(*(v if kind == "float" else (bool(v) if kind == "bool" else int(round(v))) for v, kind in zip(values, kinds)))

    @classmethod
    def width(cls) -> int:
        return len(fields(cls))


def layer_result(
    vision: ModalitySummary,
    text: ModalitySummary,
    *,
    outlier_sigma: float | None = 3.0,
    sqrt_mode: SqrtMode = "exact",
    normalization: Normalization = "text",
    device: torch.device | None = None,
) -> LayerResult:
    """MIR of one layer from the summaries of its vision and text tokens.

    Text-centric scaling (:func:`text_centric_scales`), the 3-sigma rule as a rank update of
    each modality's moments (:func:`~mir_lightning.summaries.replace_outliers_in_moments`),
    then :func:`frechet_terms` in float64 on ``device`` (default: where the summaries are),
    factoring the covariance of the modality with more tokens. Fewer than 2 tokens of a
    modality: NaN terms.
    """
    nv, nt = vision.count, text.count
    counts = dict(n_vision=nv, n_text=nt, nonfinite_vision=vision.nonfinite, nonfinite_text=text.nonfinite)
    if nv < 2 or nt < 2:
        nan = math.nan
        return LayerResult(fd=nan, mean_term=nan, trace_vision=nan, trace_text=nan, cross_term=nan, norm_ratio=nan, **counts)
    scale_v, scale_t = text_centric_scales(vision.mean_norm, text.mean_norm, normalization)
    corrected_v = replace_outliers_in_moments(vision, outlier_sigma)
    corrected_t = replace_outliers_in_moments(text, outlier_sigma)
    target = device if device is not None else vision.m2.device

    def gaussian(corrected, scale: float, n: int) -> tuple[Tensor, Tensor]:
        """Scaled mean and unbiased covariance (symmetric up to rounding: the Cholesky reads one
        triangle and trace_sqrt_product symmetrises the product it solves). The corrected M2 is
        a new matrix and is scaled in place; an uncorrected one is the state's and is copied."""
        factor = scale * scale / (n - 1)
        cov = corrected.m2.mul_(factor) if corrected.replaced else corrected.m2 * factor
        return (corrected.mean * scale).to(target), cov.to(target)

    mu_v, cov_v = gaussian(corrected_v, scale_v, nv)
    mu_t, cov_t = gaussian(corrected_t, scale_t, nt)
    if nt >= nv:
        terms = frechet_terms(mu_t, cov_t, mu_v, cov_v, sqrt_mode)
        trace_t, trace_v = terms["trace1"], terms["trace2"]
    else:
        terms = frechet_terms(mu_v, cov_v, mu_t, cov_t, sqrt_mode)
        trace_v, trace_t = terms["trace1"], terms["trace2"]
    fd = terms["fd"].clamp_min(0) if sqrt_mode == "exact" else terms["fd"]
    return LayerResult(
        fd=float(fd), mean_term=float(terms["mean_term"]), trace_vision=float(trace_v), trace_text=float(trace_t),
        cross_term=float(terms["cross_term"]), norm_ratio=vision.mean_norm / text.mean_norm,
        outliers_vision=corrected_v.replaced, outliers_text=corrected_t.replaced,
        median_sketch_vision=not corrected_v.median_exact, median_sketch_text=not corrected_t.median_exact,
        norm_sketch_vision=not corrected_v.norm_median_exact, norm_sketch_text=not corrected_t.norm_median_exact,
        overflow_high_vision=corrected_v.overflow_high, overflow_low_vision=corrected_v.overflow_low,
        overflow_high_text=corrected_t.overflow_high, overflow_low_text=corrected_t.overflow_low,
        **counts,
    )
