"""``ModalityIntegrationRate``: streaming, bounded-memory, exactly mergeable MIR metric."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from mir_lightning import _distributed as D
from mir_lightning.functional import SQRT_MODES, frechet_terms
from mir_lightning.summaries import (
    combined_lower_median,
    histogram_add,
    histogram_grid,
    moments_recentre,
    moments_update,
    tails_update,
)

MODALITIES = ("vision", "text")
STAT_KEYS = (
    "fd",
    "mean_term",
    "trace_vision",
    "trace_text",
    "cross_term",
    "norm_ratio",
    "n_vision",
    "n_text",
    "outliers_vision",
    "outliers_text",
    "nonfinite_vision",
    "nonfinite_text",
)


class ModalityIntegrationRate(Metric):
    r"""Modality Integration Rate (Huang et al., arXiv 2410.07167), accumulated over batches.

    Per LLM layer k the Fréchet distance between vision-token and text-token hidden states,
    after text-centric normalisation (both scaled by ``1 / mean text-token norm``) and the
    3-sigma outlier rule (rows whose norm is more than ``outlier_sigma`` std from the median
    norm are replaced by the per-dimension median row, per modality);
    ``MIR = log10(sum_k FD_k)``. Lower is better.

    The state never holds tokens: per layer and modality it keeps centred co-moments
    ``(n, mean, M2)`` (exact, Chan's merge), the ``max_outliers`` largest- and smallest-norm
    rows (the only rows the 3-sigma rule can replace), and median sketches of the values
    and the norms (exact for the first ``median_buffer`` / ``norm_buffer`` rows, then a
    histogram). ``compute()`` merges ranks exactly, one layer at a time.

    Args:
        num_layers: number of LLM layers fed to :meth:`update` (K).
        hidden_size: hidden width D.
        outlier_sigma: threshold of the outlier rule in std units; ``None`` turns it off.
        sqrt_mode: ``"exact"`` (default): the true Fréchet distance,
            ``2 tr((S_V S_T)^(1/2))`` via Cholesky + symmetric eigenvalues.
            ``"official_fast"``: ``2 tr(S_V S_T)``, what the official script's default
            "fast" mode computes (no square root; can be far off and negative); only for
            comparing with numbers made that way.
        state_dtype: dtype of the co-moments and kept rows (``torch.float64`` default;
            ``torch.float32`` halves memory, see README for its accuracy).
        max_outliers: largest-norm rows kept per layer and modality (K; the smallest-norm
            end keeps ``min(K, 64)``: low-norm outliers are rare). The outlier rule is exact
            while every outlier is among them; otherwise only the kept ones are replaced
            and a warning says so (detected exactly: the largest norm ever dropped is kept).
        median_buffer: rows per layer and modality kept exactly for the per-dimension median
            (R); beyond it a ``median_bins``-bin histogram per dimension (finest near the
            median) is used, with a warning: measured relative FD-sum error <= 1e-6 on
            LLM-like data, up to ~1e-4 when vision and text are nearly identical (FD far
            below the traces), see README.
        median_bins: bins of that histogram.
        norm_buffer: norms kept exactly for the median norm; beyond, ``norm_bins`` bins.
        norm_bins: bins of the norm histogram.
        nan_strategy: ``"error"`` (default) raises on non-finite values in selected tokens;
            ``"skip"`` drops such tokens and counts them (``nonfinite_*`` in stats).
        compute_on_cpu_linalg: run the per-layer linear algebra of ``compute()`` on the CPU
            even when the state lives on a GPU.
        normalization: ``"text"`` (default, the paper's MIR): both modalities scaled by
            ``1 / mean text-token norm``. ``"per_modality"``: a labelled VARIANT, not the
            paper's MIR: each modality scaled by its own mean norm, so a vision/text scale
            gap (e.g. a growing projector output norm) no longer enters the distance.
        kwargs: torchmetrics options (``process_group``...). ``sync_on_compute`` and
            ``dist_sync_on_step`` are not supported: ``compute()`` always merges all ranks,
            layer by layer, so every rank must call it.

    Example:
        >>> import torch
        >>> from mir_lightning import ModalityIntegrationRate
        >>> metric = ModalityIntegrationRate(num_layers=2, hidden_size=16)
        >>> g = torch.Generator().manual_seed(0)
        >>> hidden = torch.randn(2, 4, 30, 16, generator=g)     # [layers, batch, tokens, D]
        >>> vision = torch.zeros(4, 30, dtype=torch.bool); vision[:, 2:12] = True
        >>> text = torch.zeros(4, 30, dtype=torch.bool); text[:, 12:] = True
        >>> metric.update(hidden, vision, text)
        >>> metric.compute().shape, metric.per_layer_fd().shape
        (torch.Size([]), torch.Size([2]))
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        *,
        outlier_sigma: float | None = 3.0,
        sqrt_mode: Literal["exact", "official_fast"] = "exact",
        state_dtype: torch.dtype = torch.float64,
        max_outliers: int = 512,
        median_buffer: int = 512,
        median_bins: int = 512,
        norm_buffer: int = 2**18,
        norm_bins: int = 2**16,
        nan_strategy: Literal["error", "skip"] = "error",
        compute_on_cpu_linalg: bool = False,
        normalization: Literal["text", "per_modality"] = "text",
        **kwargs: Any,
    ) -> None:
        for key in ("sync_on_compute", "dist_sync_on_step"):
            if kwargs.get(key):
                raise ValueError(f"{key}=True is not supported: compute() merges ranks itself, layer by layer")
        kwargs["sync_on_compute"] = False
        kwargs["dist_sync_on_step"] = False
        super().__init__(**kwargs)
        if int(num_layers) < 1 or int(hidden_size) < 1:
            raise ValueError(f"num_layers and hidden_size must be positive, got {num_layers}, {hidden_size}")
        if outlier_sigma is not None and not outlier_sigma > 0:
            raise ValueError(f"outlier_sigma must be positive or None, got {outlier_sigma}")
        if sqrt_mode not in SQRT_MODES:
            raise ValueError(f"sqrt_mode must be one of {SQRT_MODES}, got {sqrt_mode!r}")
        if state_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"state_dtype must be torch.float32 or torch.float64, got {state_dtype}")
        if nan_strategy not in ("error", "skip"):
            raise ValueError(f"nan_strategy must be 'error' or 'skip', got {nan_strategy!r}")
        if min(max_outliers, median_buffer, norm_buffer) < 1 or min(median_bins, norm_bins) < 4:
            raise ValueError("max_outliers, median_buffer, norm_buffer must be >= 1 and the bin counts >= 4")
        self.num_layers = int(num_layers)
        self.hidden_size = int(hidden_size)
        self.outlier_sigma = outlier_sigma
        self.sqrt_mode = sqrt_mode
        self.state_dtype = state_dtype
        self.max_outliers = int(max_outliers)
        self.bottom_capacity = min(self.max_outliers, 64)
        self.median_buffer = int(median_buffer)
        self.median_bins = int(median_bins)
        self.norm_buffer = int(norm_buffer)
        self.norm_bins = int(norm_bins)
        self.nan_strategy = nan_strategy
        if normalization not in ("text", "per_modality"):
            raise ValueError(f"normalization must be 'text' or 'per_modality', got {normalization!r}")
        self.normalization = normalization
        self.compute_on_cpu_linalg = compute_on_cpu_linalg
        self._results: dict[str, Tensor] | None = None
        self._warned: set[str] = set()
        # Big states start as empty placeholders (so torchmetrics' reset copies are tiny)
        # and are allocated on first use. They merge by the exact layer-wise procedure in
        # ``_merged_layer``; ``dist_reduce_fx`` below says how each one combines.
        for m in MODALITIES:
            self.add_state(f"{m}_count", torch.zeros(0, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"{m}_nonfinite", torch.zeros(0, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"{m}_norm_sum", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{m}_norm_sqsum", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
            # mean and M2 merge by re-centring on the global mean, then summing (exact)
            self.add_state(f"{m}_mean", torch.zeros(0, dtype=state_dtype), dist_reduce_fx=None)
            self.add_state(f"{m}_m2", torch.zeros(0, dtype=state_dtype), dist_reduce_fx=None)
            # tails merge by concatenation, then top-K again
            for end, extreme in (("top", "max"), ("bottom", "min")):
                self.add_state(f"{m}_{end}_rows", torch.zeros(0, dtype=state_dtype), dist_reduce_fx=None)
                self.add_state(f"{m}_{end}_norms", torch.zeros(0, dtype=state_dtype), dist_reduce_fx=None)
                self.add_state(f"{m}_{end}_dropped", torch.zeros(0, dtype=state_dtype), dist_reduce_fx=extreme)
            # median sketches merge by concatenating exact rows and histograms
            for sketch in ("med", "nrm"):
                self.add_state(f"{m}_{sketch}_rows", torch.zeros(0, dtype=torch.float32), dist_reduce_fx=None)
                self.add_state(f"{m}_{sketch}_hist", torch.zeros(0, dtype=torch.int32), dist_reduce_fx=None)
                self.add_state(f"{m}_{sketch}_centre", torch.zeros(0, dtype=torch.float64), dist_reduce_fx=None)
                self.add_state(f"{m}_{sketch}_scale", torch.zeros(0, dtype=torch.float64), dist_reduce_fx=None)

    # ------------------------------------------------------------------ state layout
    def _shapes(self, m: str) -> dict[str, tuple[tuple[int, ...], torch.dtype, float | None]]:
        """name -> (shape, dtype, fill) of every state of modality ``m`` (histograms excluded).

        ``fill=None``: row buffers left uninitialised (only slots that counts or finite norms
        mark as filled are ever read), so a reset costs no writes over them."""
        L, Dm, K, sd = self.num_layers, self.hidden_size, self.max_outliers, self.state_dtype
        Kb = self.bottom_capacity
        return {
            f"{m}_count": ((L,), torch.long, 0),
            f"{m}_nonfinite": ((L,), torch.long, 0),
            f"{m}_norm_sum": ((L,), torch.float64, 0),
            f"{m}_norm_sqsum": ((L,), torch.float64, 0),
            f"{m}_mean": ((L, Dm), sd, 0),
            f"{m}_m2": ((L, Dm, Dm), sd, 0),
            f"{m}_top_rows": ((L, K, Dm), sd, None),
            f"{m}_top_norms": ((L, K), sd, -math.inf),
            f"{m}_top_dropped": ((L,), sd, -math.inf),
            f"{m}_bottom_rows": ((L, Kb, Dm), sd, None),
            f"{m}_bottom_norms": ((L, Kb), sd, math.inf),
            f"{m}_bottom_dropped": ((L,), sd, math.inf),
            f"{m}_med_rows": ((L, self.median_buffer, Dm), torch.float32, None),
            f"{m}_med_centre": ((L, Dm), torch.float64, 0),
            f"{m}_med_scale": ((L, Dm), torch.float64, 0),
            f"{m}_nrm_rows": ((L, self.norm_buffer, 1), torch.float32, None),
            f"{m}_nrm_centre": ((L, 1), torch.float64, 0),
            f"{m}_nrm_scale": ((L, 1), torch.float64, 0),
        }

    def _sketch_size(self, sketch: str) -> tuple[int, int, int]:
        """(columns, exact rows, bins) of the ``med`` or ``nrm`` sketch."""
        if sketch == "med":
            return self.hidden_size, self.median_buffer, self.median_bins
        return 1, self.norm_buffer, self.norm_bins

    def _ensure_allocated(self) -> None:
        if getattr(self, "vision_count").numel():
            return
        for m in MODALITIES:
            for name, (shape, dtype, fill) in self._shapes(m).items():
                if fill is None:
                    setattr(self, name, torch.empty(shape, dtype=dtype, device=self.device))
                else:
                    setattr(self, name, torch.full(shape, fill, dtype=dtype, device=self.device))

    def _histogram(self, m: str, sketch: str) -> Tensor:
        name = f"{m}_{sketch}_hist"
        hist = getattr(self, name)
        if not hist.numel():
            cols, _, bins = self._sketch_size(sketch)
            hist = torch.zeros(self.num_layers, cols, bins, dtype=torch.int32, device=self.device)
            setattr(self, name, hist)
        return hist

    @staticmethod
    def state_nbytes_for(
        num_layers: int,
        hidden_size: int,
        state_dtype: torch.dtype = torch.float64,
        max_outliers: int = 512,
        median_buffer: int = 512,
        median_bins: int = 512,
        norm_buffer: int = 2**18,
        norm_bins: int = 2**16,
    ) -> int:
        """Upper bound of the state in bytes (both modalities, histograms allocated).

        Per layer and modality: ``s * (D^2 + D + (K + Kb) (D + 1) + 2) + 4 D (R + B) + 16 D
        + 4 Rn + 4 Bn + 48`` with ``s`` the bytes of ``state_dtype``, ``Kb = min(K, 64)``.
        Independent of the number of tokens.
        """
        s = torch.empty(0, dtype=state_dtype).element_size()
        Dm, K = hidden_size, max_outliers
        Kb = min(K, 64)
        per = s * (Dm * Dm + Dm + (K + Kb) * (Dm + 1) + 2) + 4 * Dm * (median_buffer + median_bins) + 16 * Dm
        per += 4 * norm_buffer + 4 * norm_bins + 16 + 32
        return 2 * num_layers * per

    def state_nbytes(self) -> int:
        """Upper bound of this metric's state in bytes (see :meth:`state_nbytes_for`)."""
        return self.state_nbytes_for(
            self.num_layers, self.hidden_size, self.state_dtype, self.max_outliers,
            self.median_buffer, self.median_bins, self.norm_buffer, self.norm_bins,
        )

    # ------------------------------------------------------------------ update
    def update(
        self,
        hidden_states: Tensor | Sequence[Tensor],
        vision_mask: Tensor,
        text_mask: Tensor,
    ) -> None:
        """Fold one batch into the state.

        Args:
            hidden_states: ``num_layers`` tensors ``[B, T, D]`` (a sequence) or one tensor
                ``[num_layers, B, T, D]``; any float dtype, any device.
            vision_mask: bool ``[B, T]``: positions holding image tokens.
            text_mask: bool ``[B, T]``: text positions. Positions in neither mask
                (padding, system prompt) are ignored; a position in both is an error.
        """
        if isinstance(hidden_states, Tensor):
            if hidden_states.ndim != 4:
                raise ValueError(
                    f"hidden_states as one tensor must be [num_layers, B, T, D], got shape {tuple(hidden_states.shape)}"
                )
        elif not isinstance(hidden_states, Sequence):
            raise TypeError(f"hidden_states must be a tensor or a sequence of tensors, got {type(hidden_states).__name__}")
        if len(hidden_states) != self.num_layers:
            raise ValueError(f"expected hidden states of {self.num_layers} layers, got {len(hidden_states)}")
        self._validate_masks(hidden_states[0], vision_mask, text_mask)
        for k in range(self.num_layers):
            self._update_layer(k, hidden_states[k], vision_mask, text_mask, validated=k == 0)

    def update_layer(self, layer: int, hidden: Tensor, vision_mask: Tensor, text_mask: Tensor) -> None:
        """Fold one layer's hidden states ``[B, T, D]`` of one batch (for forward hooks).

        Call it once per tracked layer and batch, in any order. Masks as in :meth:`update`.
        """
        if not 0 <= int(layer) < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a metric of {self.num_layers} layers")
        self._computed = None
        self._update_count += 1
        with torch.no_grad():
            self._update_layer(int(layer), hidden, vision_mask, text_mask, validated=False)

    def _validate_masks(self, hidden: Tensor, vision_mask: Tensor, text_mask: Tensor) -> None:
        if not isinstance(hidden, Tensor) or hidden.ndim != 3:
            raise ValueError(f"each layer's hidden states must be a [B, T, D] tensor, got {getattr(hidden, 'shape', hidden)}")
        if not hidden.is_floating_point():
            raise TypeError(f"hidden states must be floating point, got {hidden.dtype}")
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden size {hidden.shape[-1]} does not match the metric's hidden_size={self.hidden_size}")
        for name, mask in (("vision_mask", vision_mask), ("text_mask", text_mask)):
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"{name} must be a bool tensor [B, T], got {getattr(mask, 'dtype', type(mask).__name__)}")
            if tuple(mask.shape) != tuple(hidden.shape[:2]):
                raise ValueError(f"{name} has shape {tuple(mask.shape)} but hidden states are {tuple(hidden.shape)} ([B, T, D])")
        if bool((vision_mask & text_mask.to(vision_mask.device)).any()):
            raise ValueError("a position is in both vision_mask and text_mask; each token must be one modality")

    def _update_layer(self, k: int, hidden: Tensor, vision_mask: Tensor, text_mask: Tensor, validated: bool) -> None:
        if not validated:
            self._validate_masks(hidden, vision_mask, text_mask)
        self._ensure_allocated()
        self._results = None
        device_type = hidden.device.type
        with torch.autocast(device_type=device_type, enabled=False) if device_type in ("cuda", "cpu") else _null():
            for m, mask in (("vision", vision_mask), ("text", text_mask)):
                rows = hidden[mask.to(hidden.device)]
                if rows.shape[0]:
                    self._fold(m, k, rows.to(device=self.device))

    def _fold(self, m: str, k: int, selected: Tensor) -> None:
        """Fold the selected tokens ``[n, D]`` (input dtype, on the metric's device; a copy this
        method may overwrite) of one modality and layer. The median sketch bins them in their
        own dtype (float32 for half-precision inputs), the rest works in the state dtype."""
        rows = selected.to(self.state_dtype)
        norms = rows.norm(dim=1)
        finite = torch.isfinite(norms)  # a non-finite value makes its row's norm non-finite
        if not bool(finite.all()):
            finite[~finite] = torch.isfinite(rows[~finite]).all(dim=1)  # (or the norm overflowed)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            if self.nan_strategy == "error":
                raise ValueError(
                    f"{bad} selected {m} token(s) of layer {k} hold non-finite values; "
                    "pass nan_strategy='skip' to drop and count them"
                )
            getattr(self, f"{m}_nonfinite")[k] += bad
            rows, norms, selected = rows[finite], norms[finite], selected[finite]
            if not rows.shape[0]:
                return
        count = getattr(self, f"{m}_count")
        seen = int(count[k])
        norms64 = norms.to(torch.float64)
        getattr(self, f"{m}_norm_sum")[k] += norms64.sum()
        getattr(self, f"{m}_norm_sqsum")[k] += (norms64 * norms64).sum()
        for end in ("top", "bottom"):
            tails_update(
                getattr(self, f"{m}_{end}_rows")[k], getattr(self, f"{m}_{end}_norms")[k],
                getattr(self, f"{m}_{end}_dropped")[k], rows, norms, largest=end == "top",
            )
        self._sketch_add(m, "med", k, seen, selected)
        self._sketch_add(m, "nrm", k, seen, norms[:, None])
        # last: centres `rows` in place (a copy made by the mask selection; may be `selected`)
        mean, m2 = getattr(self, f"{m}_mean")[k], getattr(self, f"{m}_m2")[k]
        count[k] = moments_update(seen, mean, m2, rows, overwrite=True)

    def _sketch_add(self, m: str, sketch: str, k: int, seen: int, x: Tensor) -> None:
        _, capacity, _ = self._sketch_size(sketch)
        buffer = getattr(self, f"{m}_{sketch}_rows")[k]
        n = x.shape[0]
        if seen + n <= capacity:
            buffer[seen : seen + n] = x.to(buffer.dtype)
            return
        hist = self._histogram(m, sketch)[k]
        centre, scale = getattr(self, f"{m}_{sketch}_centre")[k], getattr(self, f"{m}_{sketch}_scale")[k]
        if seen <= capacity:  # switch from exact rows to the histogram now
            sample = torch.cat([buffer[:seen].to(x.dtype), x])
            new_centre, new_scale = histogram_grid(sample)
            centre.copy_(new_centre)
            scale.copy_(new_scale)
            histogram_add(hist, centre, scale, sample)
        else:
            histogram_add(hist, centre, scale, x)

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Same as :meth:`update` (MIR of a single batch is not meaningful); returns None."""
        self.update(*args, **kwargs)

    def sync(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102 - see class docstring
        """No-op: :meth:`compute` merges ranks itself, exactly and one layer at a time."""

    def unsync(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        """No-op (see :meth:`sync`)."""

    def reset(self) -> None:
        """Drop all accumulated state (big states go back to empty placeholders)."""
        super().reset()
        self._results = None

    # ------------------------------------------------------------------ compute
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _merged_layer(self, m: str, k: int, group: Any) -> dict[str, Any]:
        """Global summary of modality ``m`` in layer ``k`` (collectives when distributed)."""
        out: dict[str, Any] = {}
        count = getattr(self, f"{m}_count")[k].to(torch.float64)
        mean = getattr(self, f"{m}_mean")[k]
        small = torch.cat([
            count[None],
            getattr(self, f"{m}_norm_sum")[k][None],
            getattr(self, f"{m}_norm_sqsum")[k][None],
            getattr(self, f"{m}_nonfinite")[k].to(torch.float64)[None],
            mean.to(torch.float64) * count,
        ])
        small = D.all_reduce_sum(small, group)
        n_total = small[0]
        out["n"] = int(round(float(n_total)))
        out["norm_sum"], out["norm_sqsum"], out["nonfinite"] = small[1], small[2], int(round(float(small[3])))
        global_mean = small[4:] / n_total.clamp_min(1)
        m2 = getattr(self, f"{m}_m2")[k]
        if D.world_size(group) > 1:
            m2 = D.all_reduce_sum(moments_recentre(count, mean.to(torch.float64), m2.to(torch.float64), global_mean), group)
            out["mean"] = global_mean
        else:
            out["mean"] = mean.to(torch.float64)
        out["m2"] = m2.to(torch.float64)
        for end in ("top", "bottom"):
            rows = D.all_gather_cat(getattr(self, f"{m}_{end}_rows")[k], group)
            norms = D.all_gather_cat(getattr(self, f"{m}_{end}_norms")[k], group)
            dropped = D.all_gather_cat(getattr(self, f"{m}_{end}_dropped")[k][None], group)
            # the union is kept whole: the capacity bounds the state, not this one-layer merge
            out[f"{end}_rows"], out[f"{end}_norms"] = rows.to(torch.float64), norms.to(torch.float64)
            out[f"{end}_dropped"] = float(dropped.max() if end == "top" else dropped.min())
        seen = int(getattr(self, f"{m}_count")[k])
        for sketch in ("med", "nrm"):
            cols, capacity, bins = self._sketch_size(sketch)
            exact = seen <= capacity
            raw = getattr(self, f"{m}_{sketch}_rows")[k][: seen if exact else 0]
            if exact:
                hist = torch.zeros(0, cols, bins, dtype=torch.int32, device=self.device)
                grid = torch.zeros(0, 2, cols, dtype=torch.float64, device=self.device)
            else:
                hist = self._histogram(m, sketch)[k][None]
                grid = torch.stack([getattr(self, f"{m}_{sketch}_centre")[k], getattr(self, f"{m}_{sketch}_scale")[k]])[None]
            raw, hist, grid = (D.all_gather_cat(t, group) for t in (raw, hist, grid))
            out[f"{sketch}_parts"] = (raw, [(h, g[0], g[1]) for h, g in zip(hist, grid)])
        return out

    def _sketch_median(self, s: dict[str, Any], sketch: str) -> Tensor:
        """Lower median per column of a merged sketch (``"nrm"``: token norms, ``"med"``: rows);
        warns once when a histogram had to be used."""
        raw, hists = s[f"{sketch}_parts"]
        median, exact = combined_lower_median(raw, hists)
        if not exact:
            if sketch == "nrm":
                buffer, what = "norm_buffer", (
                    f"the median norm of the outlier rule is read from a {self.norm_bins}-bin histogram (exact up to "
                    "tokens whose norm lies within ~1e-4 of the 3-sigma threshold)")
            else:
                buffer, what = "median_buffer", (
                    "the per-dimension median row that replaces outliers is interpolated from a "
                    f"{self.median_bins}-bin histogram per dimension (measured relative FD error <= 1e-6 on LLM-like "
                    "data, ~1e-4 if FD is far below the traces; see README)")
            self._warn_once(f"approx-{sketch}", f"more than {buffer}={getattr(self, buffer)} tokens of a modality in "
                            f"a layer: {what}; raise {buffer} for an exact result")
        return median

    def _apply_outlier_rule(self, m: str, k: int, s: dict[str, Any]) -> tuple[Tensor, Tensor, int]:
        """Mean and M2 of modality ``m`` after replacing outliers by the median row."""
        n, mean, m2 = s["n"], s["mean"], s["m2"]
        if self.outlier_sigma is None:
            return mean, m2, 0
        variance = (s["norm_sqsum"] - s["norm_sum"] ** 2 / n) / (n - 1)
        std = variance.clamp_min(0).sqrt()
        median_norm = self._sketch_median(s, "nrm")[0].to(std.device)
        high, low = median_norm + self.outlier_sigma * std, median_norm - self.outlier_sigma * std
        picked = []
        for end, beyond in (("top", lambda x: x > high), ("bottom", lambda x: x < low)):
            norms = s[f"{end}_norms"]
            hit = beyond(norms) & torch.isfinite(norms)
            if bool(beyond(torch.tensor(s[f"{end}_dropped"], dtype=torch.float64, device=norms.device))):
                capacity = self.max_outliers if end == "top" else self.bottom_capacity
                self._warn_once(
                    f"overflow-{m}-{end}",
                    f"layer {k}, {m}: more outlier tokens at the {'high' if end == 'top' else 'low'}-norm end than the "
                    f"{capacity} rows kept there; only the {int(hit.sum())} most extreme are replaced by the median row, "
                    "the others count as they are (raise max_outliers for an exact result)",
                )
            picked.append(s[f"{end}_rows"][hit])
        outliers = torch.cat(picked)
        count = outliers.shape[0]
        if count == 0:
            return mean, m2, 0
        median_row = self._sketch_median(s, "med").to(mean.device)
        y = outliers - mean
        ym = median_row - mean
        shift = count * ym - y.sum(0)
        m2 = torch.addmm(m2, y.mT, y, alpha=-1.0)  # a new matrix: the state stays as it is
        m2.addr_(ym, ym, alpha=float(count))
        m2.addr_(shift, shift, alpha=-1.0 / n)
        return mean + shift / n, m2, count

    def _layer_result(self, k: int, group: Any) -> dict[str, float | Tensor]:
        summaries = {m: self._merged_layer(m, k, group) for m in MODALITIES}
        nv, nt = summaries["vision"]["n"], summaries["text"]["n"]
        result: dict[str, Any] = {
            "n_vision": nv,
            "n_text": nt,
            "nonfinite_vision": summaries["vision"]["nonfinite"],
            "nonfinite_text": summaries["text"]["nonfinite"],
        }
        if nv < 2 or nt < 2:
            self._warn_once(f"few-{k}", f"layer {k}: fewer than 2 vision ({nv}) or text ({nt}) tokens; its FD is NaN")
            return {**result, **{key: math.nan for key in STAT_KEYS if key not in result}, "outliers_vision": 0, "outliers_text": 0}
        text_mean_norm = summaries["text"]["norm_sum"] / nt
        vision_mean_norm = summaries["vision"]["norm_sum"] / nv
        scales = {"text": 1.0 / text_mean_norm, "vision": 1.0 / text_mean_norm}
        if self.normalization == "per_modality":
            scales["vision"] = 1.0 / vision_mean_norm
        result["norm_ratio"] = float(vision_mean_norm / text_mean_norm)
        means, covs = {}, {}
        device = torch.device("cpu") if self.compute_on_cpu_linalg else self.device
        for m in MODALITIES:
            s = summaries[m]
            mean, m2, outliers = self._apply_outlier_rule(m, k, s)
            result[f"outliers_{m}"] = outliers
            scale = scales[m]
            means[m] = (mean * scale).to(device)
            # symmetric up to rounding; no explicit symmetrising: the Cholesky reads one
            # triangle and trace_sqrt_product symmetrises the product it solves
            covs[m] = (m2 * (scale * scale / (s["n"] - 1))).to(device)
        # factor the better-sampled covariance (Cholesky needs it positive definite)
        first, second = ("text", "vision") if nt >= nv else ("vision", "text")
        terms = frechet_terms(means[first], covs[first], means[second], covs[second], self.sqrt_mode)
        fd = terms["fd"]
        if self.sqrt_mode == "exact":
            fd = fd.clamp_min(0)
        result.update(
            fd=float(fd),
            mean_term=float(terms["mean_term"]),
            trace_vision=float(terms["trace1" if first == "vision" else "trace2"]),
            trace_text=float(terms["trace1" if first == "text" else "trace2"]),
            cross_term=float(terms["cross_term"]),
        )
        return result

    def _compute_results(self) -> dict[str, Tensor]:
        if self._results is not None:
            return self._results
        self._ensure_allocated()
        rows = [self._layer_result(k, self.process_group) for k in range(self.num_layers)]
        self._results = {key: torch.tensor([r[key] for r in rows], dtype=torch.float64) for key in STAT_KEYS}
        return self._results

    def compute(self) -> Tensor:
        """MIR ``log10(sum_k FD_k)`` as a 0-dim float64 tensor (NaN, with a warning, when a
        layer lacks tokens or the sum is not positive). Every rank must call it."""
        fd = self._compute_results()["fd"]
        total = fd.sum()
        if not bool(total > 0):
            self._warn_once("nonpositive", f"the FD sum is {float(total)}; MIR is NaN")
            return torch.tensor(math.nan, dtype=torch.float64)
        return torch.log10(total)

    def per_layer_fd(self) -> Tensor:
        """Per-layer text-normalised FD after the outlier rule, ``[num_layers]`` float64
        (their sum is ``10**MIR``). Merged across ranks like :meth:`compute`."""
        return self._compute_results()["fd"].clone()

    def per_layer_stats(self) -> dict[str, Tensor]:
        """Diagnostics per layer, each a ``[num_layers]`` float64 tensor.

        ``fd``; ``mean_term`` ``||mu_V - mu_T||^2``, ``trace_vision`` ``tr S_V``,
        ``trace_text`` ``tr S_T``, ``cross_term`` ``2 tr((S_V S_T)^(1/2))`` (all after
        normalisation and the outlier rule; ``fd = mean + traces - cross``);
        ``norm_ratio``: mean vision-token norm / mean text-token norm before normalisation;
        ``n_vision``, ``n_text``: token counts; ``outliers_vision``, ``outliers_text``:
        replaced tokens; ``nonfinite_vision``, ``nonfinite_text``: skipped tokens.
        """
        return {key: value.clone() for key, value in self._compute_results().items()}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
