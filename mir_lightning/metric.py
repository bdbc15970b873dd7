"""``ModalityIntegrationRate``: streaming, bounded-memory, exactly mergeable MIR metric."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from mir_lightning import _distributed as D
from mir_lightning._warnings import warn_once
from mir_lightning import summaries
from mir_lightning.functional import SQRT_MODES, LayerResult, layer_result
from mir_lightning.metric_state import (
    MODALITIES,
    SKETCHES,
    BatchIndex,
    InputErrorCounts,
    LayerViews,
    ModalityState,
    SketchState,
    StateSpec,
)
from mir_lightning.summaries import (
    GroupGrids,
    MedianSketch,
    ModalitySummary,
    binning_dtype,
    gram_panels,
    gram_upper_add_,
    histogram_add,
    histogram_add_by_group,
    histogram_grid,
    histogram_rebin,
    moments_merge,
    tails_update,
)

STAT_KEYS = LayerResult.STATS
DEFAULT_MEDIAN_BUFFER = 1024
"""Exact median rows per layer and modality by default: above the 900 tokens per modality of a
100-sample probe of the example model (``examples/lvlm.py``: 9 image tokens and 9 text tokens
per sample), so that its outlier rule is exact."""


def _foreach_lerp_takes_scalars() -> bool:
    """Whether ``torch._foreach_lerp_`` takes a list of scalar weights (recent torch; 2.1 does not)."""
    try:
        torch._foreach_lerp_([torch.zeros(1)], [torch.ones(1)], [0.5])
    except (TypeError, RuntimeError):
        return False
    return True


_FOREACH_LERP_SCALARS = _foreach_lerp_takes_scalars()


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
    histogram). ``update()`` never waits for the device (no host syncs per layer);
    ``compute()`` merges ranks exactly, each layer on one owner rank that alone solves it,
    and shares the per-layer results, so every rank returns the same values.

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
        max_outliers: rows kept at each end of the norm distribution per layer and modality
            (K largest, K smallest). The outlier rule is exact while every outlier is among
            them; otherwise only the kept ones are replaced and a warning says so (detected
            exactly: the most extreme norm ever dropped is kept).
        median_buffer: rows per layer and modality kept exactly for the per-dimension median
            (R; default 1024, enough for the example's 100-sample probe); beyond it a
            ``median_bins``-bin histogram per dimension (finest near the median) is used, with
            a warning: measured relative FD-sum error <= 1e-6 on LLM-like data, up to ~1e-4
            when vision and text are nearly identical (FD far below the traces), see README.
        median_bins: bins of that histogram.
        norm_buffer: norms kept exactly for the median norm; beyond, ``norm_bins`` bins.
        norm_bins: bins of the norm histogram.
        nan_strategy: ``"error"`` (default) raises on non-finite values in selected tokens
            (detected on the device: raised at the end of :meth:`update`, or by
            :meth:`compute` for :meth:`update_layer`; the state then holds them until
            :meth:`reset`); ``"skip"`` drops such tokens and counts them (``nonfinite_*`` in
            stats; costs one host sync per layer and modality).
        compute_on_cpu_linalg: run the per-layer linear algebra of ``compute()`` on the CPU
            even when the state lives on a GPU.
        normalization: ``"text"`` (default, the paper's MIR): both modalities scaled by
            ``1 / mean text-token norm``. ``"per_modality"``: a labelled VARIANT, not the
            paper's MIR: each modality scaled by its own mean norm, so a vision/text scale
            gap (e.g. a growing projector output norm) no longer enters the distance.
        layer_ids: the model's id of each of the ``num_layers`` layers (default ``0, 1, ...``),
            used in warnings, errors and :meth:`plot`; entry ``j`` of every per-layer result is
            layer ``layer_ids[j]``.
        kwargs: torchmetrics options (``process_group``...). ``sync_on_compute`` and
            ``dist_sync_on_step`` are not supported: ``compute()`` always merges all ranks,
            layer by layer, so every rank must call it. ``compute()`` caches its result
            itself (torchmetrics' ``compute_with_cache`` is off).

    Warnings are shown once per process and cause (:func:`mir_lightning._warnings.warn_once`):
    a probe repeated during training does not repeat them.

    The median buffers hold float32 values: for float64 inputs the exact-median outlier rule
    is exact up to float32 rounding of the median row (relative ~1e-10 of the FD measured).

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
        median_buffer: int = DEFAULT_MEDIAN_BUFFER,
        median_bins: int = 512,
        norm_buffer: int = 2**18,
        norm_bins: int = 2**16,
        nan_strategy: Literal["error", "skip"] = "error",
        compute_on_cpu_linalg: bool = False,
        normalization: Literal["text", "per_modality"] = "text",
        layer_ids: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        for key in ("sync_on_compute", "dist_sync_on_step"):
            if kwargs.get(key):
                raise ValueError(f"{key}=True is not supported: compute() merges ranks itself, layer by layer")
        kwargs.update(sync_on_compute=False, dist_sync_on_step=False, compute_with_cache=False)
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
        if normalization not in ("text", "per_modality"):
            raise ValueError(f"normalization must be 'text' or 'per_modality', got {normalization!r}")
        self.num_layers = int(num_layers)
        self.hidden_size = int(hidden_size)
        self.layer_ids = list(range(self.num_layers)) if layer_ids is None else [int(i) for i in layer_ids]
        if len(self.layer_ids) != self.num_layers:
            raise ValueError(f"layer_ids names {len(self.layer_ids)} layers, the metric has num_layers={self.num_layers}")
        self.outlier_sigma = outlier_sigma
        self.sqrt_mode = sqrt_mode
        self.state_dtype = state_dtype
        self.max_outliers = int(max_outliers)
        self.median_buffer = int(median_buffer)
        self.median_bins = int(median_bins)
        self.norm_buffer = int(norm_buffer)
        self.norm_bins = int(norm_bins)
        self.nan_strategy = nan_strategy
        self.normalization = normalization
        self.compute_on_cpu_linalg = compute_on_cpu_linalg
        self._results: list[LayerResult] | None = None
        self._mir = math.nan
        # tokens folded per modality and layer, mirrored on the host so update() never reads the device
        self._seen: list[list[int]] | None = [[0] * self.num_layers for _ in MODALITIES]
        self._batch_cache: tuple[tuple[Any, ...], BatchIndex] | None = None
        self._views_cache: tuple[tuple[Tensor, ...], dict[int, LayerViews]] | None = None
        self._grids_cache: dict[tuple[int, str], tuple[tuple[Any, ...], GroupGrids]] = {}
        self._input_errors = InputErrorCounts()
        # Big states start as empty placeholders (so torchmetrics' reset copies are tiny) and are
        # allocated on first use. They never go through torchmetrics' reductions: compute() and
        # merge_state() merge them exactly through the typed summaries (dist_reduce_fx=None).
        for name, spec in self._layout().items():
            self.add_state(name, torch.zeros(0, dtype=spec.dtype), dist_reduce_fx=None)
        for sketch in SKETCHES:
            self.add_state(f"{sketch}_hist", torch.zeros(0, dtype=torch.int32), dist_reduce_fx=None)

    # ------------------------------------------------------------------ state layout
    def _layout(self) -> dict[str, StateSpec]:
        """name -> (shape, dtype, fill) of every registered state (histograms excluded).

        Every state is stacked ``[layers, modality, ...]`` (modality 0 vision, 1 text; the tails
        also ``[..., end, ...]``, end 0 the largest norms, 1 the smallest), so that one kernel
        updates both modalities and both ends; :meth:`modality_state` gives one modality's typed
        views. Per layer and modality: ``count``, ``nonfinite``; co-moments ``mean [D]``,
        ``m2 [D, D]`` (its upper triangle, diagonal included: the CPU accumulates only that, see
        :func:`~mir_lightning.summaries.gram_upper_add_`); norm moments ``norm_mean [1]``, ``norm_m2 [1, 1]``; tails (rows, norms,
        most extreme dropped norm) with ``K + 1`` slots per end (the last one a scratch slot that
        fixed-shape updates write unused rows into, never read); median sketches ``med_*``
        (values) and ``nrm_*`` (norms): exact rows, grid centre and scale. ``fill=None``: row
        buffers left uninitialised (only slots that counts or finite norms mark as filled are
        ever read), so a reset costs no writes; a pair fills the two tail ends."""
        L, Dm, K, sd = self.num_layers, self.hidden_size, self.max_outliers, self.state_dtype
        f64, inf = torch.float64, math.inf
        return {
            "count": StateSpec((L, 2), torch.long, 0),
            "nonfinite": StateSpec((L, 2), torch.long, 0),
            "mean": StateSpec((L, 2, Dm), sd, 0),
            "m2": StateSpec((L, 2, Dm, Dm), sd, 0),
            "norm_mean": StateSpec((L, 2, 1), f64, 0),
            "norm_m2": StateSpec((L, 2, 1, 1), f64, 0),
            "tail_rows": StateSpec((L, 2, 2, K + 1, Dm), sd, None),
            "tail_norms": StateSpec((L, 2, 2, K + 1), sd, (-inf, inf)),
            "tail_dropped": StateSpec((L, 2, 2), sd, (-inf, inf)),
            "med_rows": StateSpec((L, 2, self.median_buffer, Dm), torch.float32, None),
            "med_centre": StateSpec((L, 2, Dm), f64, 0),
            "med_scale": StateSpec((L, 2, Dm), f64, 0),
            # norms in float64: after a final RMSNorm every token's norm can agree to ~1e-8,
            # below float32 resolution, and the rule's median norm must resolve that spread
            "nrm_rows": StateSpec((L, 2, self.norm_buffer, 1), f64, None),
            "nrm_centre": StateSpec((L, 2, 1), f64, 0),
            "nrm_scale": StateSpec((L, 2, 1), f64, 0),
        }

    def _sketch_size(self, sketch: str) -> tuple[int, int, int]:
        """(columns, exact rows, bins) of the ``med`` or ``nrm`` sketch."""
        if sketch == "med":
            return self.hidden_size, self.median_buffer, self.median_bins
        return 1, self.norm_buffer, self.norm_bins

    def _ensure_allocated(self) -> None:
        if self.count.numel():
            return
        for name, spec in self._layout().items():
            if spec.fill is None:
                tensor = torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
            elif isinstance(spec.fill, tuple):
                tensor = torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
                for end, fill in enumerate(spec.fill):
                    tensor[:, :, end] = fill
            else:
                tensor = torch.full(spec.shape, spec.fill, dtype=spec.dtype, device=self.device)
            setattr(self, name, tensor)

    def _histogram(self, sketch: str) -> Tensor:
        """``[layers, columns, modality, bins]`` int32 counts of a sketch (allocated on first use;
        modality inside a column, so that both modalities' counts of a column are one contiguous row)."""
        hist = getattr(self, f"{sketch}_hist")
        if not hist.numel():
            cols, _, bins = self._sketch_size(sketch)
            hist = torch.zeros(self.num_layers, cols, 2, bins, dtype=torch.int32, device=self.device)
            setattr(self, f"{sketch}_hist", hist)
        return hist

    def modality_state(self, modality: str) -> ModalityState:
        """Typed views (no copies) of one modality's state, stacked over layers (allocates the state)."""
        self._ensure_allocated()
        return ModalityState.view(self.metric_state, MODALITIES.index(modality))

    def __getattr__(self, name: str) -> Any:
        # the per-modality attribute names of earlier versions (``vision_m2``, ``text_count``...)
        modality, _, field_name = name.partition("_")
        if modality in MODALITIES and field_name in ModalityState.LEGACY_NAMES:
            if not self.count.numel():  # not allocated yet: the (empty) placeholder, allocating nothing
                end, _, rest = field_name.partition("_")
                return getattr(self, f"tail_{rest}" if end in ("top", "bottom") else field_name)
            return ModalityState.legacy_field(self.modality_state(modality), field_name)
        return super().__getattr__(name)

    def _host_seen(self) -> list[list[int]]:
        """Tokens folded per modality and layer (host ints; rebuilt from the state after a load)."""
        if self._seen is None:
            counts = self.count
            self._seen = counts.mT.tolist() if counts.numel() else [[0] * self.num_layers for _ in MODALITIES]
        return self._seen

    @staticmethod
    def state_nbytes_for(
        num_layers: int,
        hidden_size: int,
        state_dtype: torch.dtype = torch.float64,
        max_outliers: int = 512,
        median_buffer: int = DEFAULT_MEDIAN_BUFFER,
        median_bins: int = 512,
        norm_buffer: int = 2**18,
        norm_bins: int = 2**16,
    ) -> int:
        """Bytes of the state of ``num_layers`` layers (both modalities, histograms allocated):
        exactly what the state tensors hold once every buffer is in use.

        Per layer and modality: ``s * (D^2 + D + 2 (K + 1) (D + 1) + 2) + 4 D (R + B) + 16 D
        + 8 Rn + 4 Bn + 48`` with ``s`` the bytes of ``state_dtype``, ``K = max_outliers`` (rows
        kept at each end of the norm distribution, plus one scratch slot). Independent of the
        number of tokens.
        """
        s = torch.empty(0, dtype=state_dtype).element_size()
        Dm, K = hidden_size, max_outliers
        per = s * (Dm * Dm + Dm + 2 * (K + 1) * (Dm + 1) + 2) + 4 * Dm * (median_buffer + median_bins) + 16 * Dm
        per += 8 * norm_buffer + 4 * norm_bins + 16 + 32
        return 2 * num_layers * per

    def state_nbytes(self) -> int:
        """Bytes of this metric's state once allocated (see :meth:`state_nbytes_for`)."""
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
        layer: int | None = None,
    ) -> None:
        """Fold one batch into the state.

        Args:
            hidden_states: ``num_layers`` tensors ``[B, T, D]`` (a sequence) or one tensor
                ``[num_layers, B, T, D]``; any float dtype, any device. With ``layer``: one
                layer's ``[B, T, D]``.
            vision_mask: bool ``[B, T]``: positions holding image tokens.
            text_mask: bool ``[B, T]``: text positions. Positions in neither mask
                (padding, system prompt) are ignored; a position in both is an error.
            layer: fold only this layer (what :meth:`update_layer` does).

        Input errors found on the device (a position in both masks, non-finite values) are
        raised once at the end of the call (or, with ``layer``, by :meth:`compute`).
        """
        if layer is not None:
            if not 0 <= int(layer) < self.num_layers:
                raise IndexError(f"layer {layer} out of range for a metric of {self.num_layers} layers")
            layers: list[tuple[int, Tensor]] = [(int(layer), hidden_states)]  # type: ignore[list-item]
        else:
            if isinstance(hidden_states, Tensor):
                if hidden_states.ndim != 4:
                    raise ValueError(
                        f"hidden_states as one tensor must be [num_layers, B, T, D], got shape {tuple(hidden_states.shape)}"
                    )
            elif not isinstance(hidden_states, Sequence):
                raise TypeError(f"hidden_states must be a tensor or a sequence of tensors, got {type(hidden_states).__name__}")
            if len(hidden_states) != self.num_layers:
                raise ValueError(f"expected hidden states of {self.num_layers} layers, got {len(hidden_states)}")
            layers = list(enumerate(hidden_states))
        self._validate(layers[0][1], vision_mask, text_mask)
        self._ensure_allocated()
        self._results = None
        device_type = layers[0][1].device.type
        autocast_off = torch.autocast(device_type, enabled=False) if device_type in ("cuda", "cpu") else contextlib.nullcontext()
        with autocast_off:
            for k, hidden in layers:
                if k != layers[0][0]:
                    self._validate(hidden, vision_mask, text_mask)
                batch = self._batch_index(vision_mask, text_mask, hidden.device)
                if batch.total:
                    flat = hidden.reshape(-1, self.hidden_size)
                    self._fold(k, flat.index_select(0, batch.positions).to(device=self.device), batch)
        if layer is None:
            self._raise_input_errors()

    def update_layer(self, layer: int, hidden: Tensor, vision_mask: Tensor, text_mask: Tensor) -> None:
        """Fold one layer's hidden states ``[B, T, D]`` of one batch (for forward hooks).

        Call it once per tracked layer and batch, in any order. Masks as in :meth:`update`;
        passing the same mask tensors for every layer of a batch selects their positions once.
        """
        self.update(hidden, vision_mask, text_mask, layer=layer)

    def _validate(self, hidden: Tensor, vision_mask: Tensor, text_mask: Tensor) -> None:
        """Shape and dtype checks (host only; the mask overlap is checked on the device)."""
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

    def _batch_index(self, vision_mask: Tensor, text_mask: Tensor, device: torch.device) -> BatchIndex:
        """The positions of both masks and the fold's index tensors, built once per mask pair (the
        one place a batch waits for the device: the number of selected positions)."""
        key = _stamp((vision_mask, text_mask), device)
        cache = self._batch_cache
        if cache is not None and _same_stamp(cache[0], key):
            return cache[1]
        vision, text = vision_mask.to(device), text_mask.to(device)
        self._input_errors.add_both_masks((vision & text).sum())
        positions = [mask.reshape(-1).nonzero().squeeze(1) for mask in (vision, text)]
        batch = BatchIndex.build(positions, self)
        self._batch_cache = (key, batch)
        return batch

    def _input_error_messages(self) -> list[str]:
        """What the device found wrong with the inputs since the last reset (one sync; [] if nothing)."""
        counts = []
        if self._input_errors.both_masks is not None:
            counts.append(self._input_errors.both_masks.reshape(1).to(torch.long))
        if self.count.numel():
            # a non-finite value makes its row's norm +inf or NaN: such a row enters the high-norm
            # tail of its modality and never leaves it (empty slots hold -inf)
            high = self.tail_norms[:, :, 0, : self.max_outliers]
            counts.append((torch.isnan(high) | (high == math.inf)).sum(-1).reshape(-1).to(counts[0].device if counts else high.device))
        if not counts:
            return []
        flat = torch.cat([c.to(counts[0].device) for c in counts])
        if not bool(flat.any()):
            return []
        values = flat.tolist()
        problems = []
        if self._input_errors.both_masks is not None:
            both, values = values[0], values[1:]
            if both:
                problems.append(f"{both} position(s) are in both vision_mask and text_mask; each token must be one modality")
        for k in range(self.num_layers):
            for i, m in enumerate(MODALITIES):
                bad = values[2 * k + i] if values else 0
                if bad:
                    more = "" if bad < self.max_outliers else " (at least)"
                    problems.append(f"{bad}{more} selected {m} token(s) of layer {self.layer_ids[k]} hold non-finite values "
                                    "(pass nan_strategy='skip' to drop and count them)")
        return problems

    def _raise_input_errors(self) -> None:
        """Raise what the device found wrong with the inputs since the last reset."""
        problems = self._input_error_messages()
        if problems:
            raise ValueError("; ".join(problems) + ". The state holds these tokens now: reset() the metric")

    def _views(self, k: int) -> LayerViews:
        """Layer ``k``'s views into the state, made once per allocation (views cost a dispatch each)."""
        bases = tuple(getattr(self, name) for name in LayerViews.BASES)
        cache = self._views_cache
        if cache is None or not all(a is b for a, b in zip(cache[0], bases)):
            cache = self._views_cache = (bases, {})
        views = cache[1].get(k)
        if views is None:
            views = cache[1][k] = LayerViews.of(self, k)
        return views

    def _group_grids(self, k: int, sketch: str, centre: Tensor, scale: Tensor, dtype: torch.dtype, bins: int
                     ) -> GroupGrids:
        """Layer ``k``'s histogram grids of ``sketch`` prepared for binning (both modalities),
        rebuilt only when the grid tensors changed (a new allocation, or rebinned in place)."""
        key = (k, sketch)
        stamp = _stamp((centre, scale), binning_dtype(dtype))
        cached = self._grids_cache.get(key)
        if cached is None or not _same_stamp(cached[0], stamp):
            cached = self._grids_cache[key] = (stamp, GroupGrids.of(centre, scale, dtype, bins))
        return cached[1]

    def _fold(self, k: int, selected: Tensor, batch: BatchIndex) -> None:
        """Fold the selected tokens ``[n, D]`` of layer ``k`` (vision rows, then text rows; input
        dtype, on the metric's device; a copy this method may overwrite) into both modalities'
        state. The median sketch keeps them in their own dtype (float32 for half-precision
        inputs), the rest works in the state dtype."""
        rows = selected.to(self.state_dtype)
        norms = torch.linalg.vector_norm(rows, dim=1)  # a non-finite value makes its row's norm non-finite
        if self.nan_strategy == "skip":
            rows, norms, selected, batch = self._drop_nonfinite(k, rows, norms, selected, batch)
            if not batch.total:
                return
        seen = self._host_seen()
        counts = (seen[0][k], seen[1][k])
        views = self._views(k)
        norms64 = norms.to(torch.float64)
        self._sketch_rows(k, views, selected, norms64, batch, counts)
        self._tails_update(views, rows, norms, batch)
        self._norm_moments_update(views, norms64, batch, counts)
        self._moments_update(views, rows, batch, counts)  # last: centres `rows` in place
        views.count.add_(batch.count_vector)
        for i, n in enumerate(batch.counts):
            seen[i][k] += n

    @staticmethod
    def _chan_weights(seen: tuple[int, int], batch: BatchIndex) -> tuple[list[float], list[float]]:
        """Per modality ``n / (c + n)`` (the mean's step) and ``c n / (c + n)`` (the cross term of
        Chan's merge) for ``c`` rows seen and ``n`` new ones."""
        steps, cross = [], []
        for c, n in zip(seen, batch.counts):
            total = c + n
            steps.append(n / total if total else 0.0)
            cross.append(c * n / total if total else 0.0)
        return steps, cross

    def _moments_update(self, views: LayerViews, rows: Tensor, batch: BatchIndex, seen: tuple[int, int]) -> None:
        """Co-moments of both modalities: centred batch products (one GEMM each) and Chan's
        merge, as :func:`~mir_lightning.summaries.moments_update` does for one. Centres
        ``rows`` in place."""
        batch_means = torch.mm(batch.mean_weights, rows)  # [2, D]
        rows.addmm_(batch.membership, batch_means, alpha=-1.0)  # each row minus its modality's batch mean
        panels = gram_panels(rows.shape[1], rows.device)
        for m2, part, n in zip(views.m2s, rows.split(batch.counts), batch.counts):
            if n:
                gram_upper_add_(m2, part, panels)  # the upper triangle; read through symmetric_from_upper
        steps, cross = self._chan_weights(seen, batch)
        delta = batch_means - views.mean
        for m2, d, alpha in zip(views.m2s, delta.unbind(0), cross):
            if alpha:
                m2.addr_(d, d, alpha=alpha)
        if _FOREACH_LERP_SCALARS:
            torch._foreach_lerp_(views.means, list(batch_means.unbind(0)), steps)
        else:  # older torch (2.1) has no scalar-list weights for lerp: the same update, one op per modality
            for mean, d, step in zip(views.means, delta.unbind(0), steps):
                mean.add_(d, alpha=step)

    def _norm_moments_update(self, views: LayerViews, norms: Tensor, batch: BatchIndex, seen: tuple[int, int]) -> None:
        """Count, mean and M2 of the token norms (float64 ``[n]``), both modalities at once."""
        batch_means = torch.mv(batch.mean_weights64, norms)  # [2]
        centred = torch.addmv(norms, batch.membership64, batch_means, alpha=-1.0)
        steps, cross = self._chan_weights(seen, batch)
        delta = list((batch_means - views.norm_mean).unbind(0))
        views.norm_m2.addmv_(batch.member_rows64, centred * centred)  # + centred sums of squares
        torch._foreach_addcmul_(views.norm_m2s, delta, delta, cross)
        torch._foreach_add_(views.norm_means, torch._foreach_mul(delta, steps))

    def _tails_update(self, views: LayerViews, rows: Tensor, norms: Tensor, batch: BatchIndex) -> None:
        """The four tails of the layer (2 modalities x 2 ends) in one top-k, as
        :func:`~mir_lightning.summaries.tails_update` does for one, with no host sync.

        Norms are turned into keys (``-norm`` at the low end) so every tail keeps its largest
        keys. Candidates per tail: its ``K`` kept keys, then the new rows' keys (padded with
        ``-inf`` keys to the larger modality's count); a top-``K+1`` gives the new kept set and
        the most extreme key not kept. Freed slots take the entering rows in order; with fixed
        shapes (accelerators) every new row is written, the ones not entering into the scratch
        slot ``K``; otherwise only the entering rows are copied."""
        K = self.max_outliers
        pool = torch.cat([views.tail_norms, norms, batch.pad_norms])
        candidates = pool.take(batch.tail_candidates)  # [4, K + N]
        top = candidates.mul_(batch.end_sign).topk(K + 1, dim=1)  # on keys: the low end negated
        dropped = views.tail_dropped
        torch.mul(torch.maximum(dropped * batch.end_sign_flat, top.values[:, K]), batch.end_sign_flat, out=dropped)
        stays = torch.zeros(candidates.shape, dtype=torch.bool, device=candidates.device)
        stays.scatter_(1, top.indices[:, :K], True)
        kept_slots, entering = stays.split([K, stays.shape[1] - K], dim=1)
        freed_first = torch.sort(kept_slots, dim=1, stable=True).indices  # freed slots, ascending, then kept ones
        rank = entering.cumsum(1).mul_(entering)  # 1, 2, ... for the entering rows of a tail, 0 for the others
        slot = torch.cat([batch.scratch_slot, freed_first], 1).gather(1, rank)  # [4, N]: slot K for rank 0
        slot = slot.add_(batch.tail_offsets).view(-1)
        sources, values = batch.tail_rows, batch.tail_new_candidates  # padding: row 0 with an empty slot's norm
        if not summaries.fixed_shapes(rows.device):  # only the entering rows
            pick = rank.view(-1).nonzero().squeeze(1)
            slot, sources, values = slot.index_select(0, pick), sources.index_select(0, pick), values.index_select(0, pick)
        views.tail_rows.index_copy_(0, slot, rows.index_select(0, sources))
        views.tail_norms.index_copy_(0, slot, pool.index_select(0, values))

    def _sketch_rows(self, k: int, views: LayerViews, selected: Tensor, norms: Tensor, batch: BatchIndex,
                     seen: tuple[int, int]) -> None:
        """Add the rows to the value sketch and their norms to the norm sketch of both modalities:
        one copy per sketch while both fit their exact buffers, else per modality."""
        for sketch, x in (("med", selected), ("nrm", norms)):
            _, capacity, bins = self._sketch_size(sketch)
            if all(c + n <= capacity for c, n in zip(seen, batch.counts)):
                rows_view, base = (views.med_rows, batch.med_slots) if sketch == "med" else (views.nrm_rows, batch.nrm_slots)
                slots = torch.add(base, batch.modality, alpha=seen[1] - seen[0]).add_(seen[0])
                rows_view.index_copy_(0, slots, x.to(rows_view.dtype))
                continue
            if sketch == "nrm":
                x = x[:, None]  # [n, 1]: one column
            grid = views.histograms.get(sketch)
            if grid is not None and all(c > capacity for c in seen):  # both on their histograms already
                hist, centre, scale, group_hists = grid
                offsets = batch.med_bin_offsets if sketch == "med" else batch.nrm_bin_offsets
                ones = batch.med_ones if sketch == "med" else batch.nrm_ones
                grids = self._group_grids(k, sketch, centre, scale, x.dtype, bins)
                histogram_add_by_group(hist, grids, x, batch.counts, batch.modality, offsets, ones, group_hists)
                continue
            for i, (part, c) in enumerate(zip(x.split(batch.counts), seen)):
                if part.shape[0]:
                    self._sketch_add(i, sketch, k, c, part)

    def _drop_nonfinite(self, k: int, rows: Tensor, norms: Tensor, selected: Tensor, batch: BatchIndex
                        ) -> tuple[Tensor, Tensor, Tensor, BatchIndex]:
        """nan_strategy="skip": drop and count rows holding non-finite values (host syncs)."""
        finite = torch.isfinite(norms)
        if not bool(finite.all()):
            finite[~finite] = torch.isfinite(rows[~finite]).all(dim=1)  # (or the norm overflowed)
        if bool(finite.all()):
            return rows, norms, selected, batch
        keep = []
        for i, part in enumerate(finite.split(batch.counts)):
            self.nonfinite[k, i] += int((~part).sum())
            keep.append(part)
        positions = [p[f] for p, f in zip(batch.positions.split(batch.counts), keep)]
        return rows[finite], norms[finite], selected[finite], BatchIndex.build(positions, self)

    def _sketch_state(self, i: int, sketch: str) -> SketchState:
        state = self.modality_state(MODALITIES[i])
        if sketch == "med":
            return state.values
        return state.norms

    def _sketch_add(self, i: int, sketch: str, k: int, seen: int, x: Tensor) -> None:
        """Add rows ``x [n, C]`` to modality ``i``'s median sketch of layer ``k``, which has seen
        ``seen`` rows."""
        _, capacity, _ = self._sketch_size(sketch)
        state = self._sketch_state(i, sketch)
        buffer = state.rows[k]
        n = x.shape[0]
        if seen + n <= capacity:
            buffer[seen : seen + n] = x.to(buffer.dtype)
            return
        hist = self._histogram(sketch)[k, :, i]
        centre, scale = state.centre[k], state.scale[k]
        if seen <= capacity:  # switch from exact rows to the histogram now
            sample = torch.cat([buffer[:seen].to(x.dtype), x])
            new_centre, new_scale = histogram_grid(sample)
            centre.copy_(new_centre)
            scale.copy_(new_scale)
            histogram_add(hist, centre, scale, sample)
        else:
            histogram_add(hist, centre, scale, x)

    def _sketch_merge(self, i: int, sketch: str, k: int, seen: int, other: MedianSketch) -> None:
        """Add another sketch of the same size (exact rows or one histogram) to this one."""
        if other.rows.shape[0]:
            self._sketch_add(i, sketch, k, seen, other.rows)
            seen += other.rows.shape[0]
        for counts, other_centre, other_scale in other.histograms:
            _, capacity, _ = self._sketch_size(sketch)
            state = self._sketch_state(i, sketch)
            hist = self._histogram(sketch)[k, :, i]
            centre, scale = state.centre[k], state.scale[k]
            if seen <= capacity:  # still exact here: bin the exact rows on a grid from them (or the other's)
                rows = state.rows[k][:seen]
                new_centre, new_scale = histogram_grid(rows) if seen else (other_centre, other_scale)
                centre.copy_(new_centre)
                scale.copy_(new_scale)
                histogram_add(hist, centre, scale, rows)
            if torch.equal(centre, other_centre) and torch.equal(scale, other_scale):
                hist += counts.to(hist.dtype)
            else:
                histogram_rebin(hist, centre, scale, counts, other_centre, other_scale)
            seen += int(counts[0].sum())

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Same as :meth:`update` (MIR of a single batch is not meaningful); returns None."""
        self.update(*args, **kwargs)

    def sync(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102 - see class docstring
        """No-op: :meth:`compute` merges ranks itself, exactly and one layer at a time."""

    def unsync(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        """No-op (see :meth:`sync`)."""

    def _forget_views(self) -> None:
        """Drop the cached index tensors and state views (they would keep old state alive)."""
        self._batch_cache = None
        self._views_cache = None
        self._grids_cache = {}

    def reset(self) -> None:
        """Drop all accumulated state (big states go back to empty placeholders)."""
        super().reset()
        self._results = None
        self._seen = [[0] * self.num_layers for _ in MODALITIES]
        self._forget_views()

    def release_state(self) -> None:
        """Free the accumulated state (as :meth:`reset`) but keep the computed per-layer results,
        a few floats per layer: ``per_layer_stats()`` / ``per_layer_fd()`` still answer."""
        results = self._results
        self.reset()
        self._results = results
        self._input_errors = InputErrorCounts()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "ModalityIntegrationRate":
        self._forget_views()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        legacy = {key[len(prefix):]: state_dict.pop(key) for key in list(state_dict)
                  if key.startswith(prefix) and key[len(prefix):].partition("_")[0] in MODALITIES}
        if legacy:
            state_dict.update({prefix + name: value for name, value in self._from_legacy(legacy).items()})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._seen = None
        self._results = None
        self._forget_views()

    def _from_legacy(self, legacy: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The stacked state of a per-modality state of earlier versions (``vision_m2`` ...)."""
        if not legacy["vision_count"].numel():
            return {name: torch.zeros(0, dtype=spec.dtype) for name, spec in self._layout().items()} | {
                f"{s}_hist": torch.zeros(0, dtype=torch.int32) for s in SKETCHES}
        out: dict[str, Tensor] = {}
        for name in self._layout():
            if not name.startswith("tail_"):
                out[name] = torch.stack([legacy[f"{m}_{name}"] for m in MODALITIES], 1)
        for sketch in SKETCHES:
            parts = [legacy.get(f"{m}_{sketch}_hist") for m in MODALITIES]
            if all(p is not None and p.numel() for p in parts):
                out[f"{sketch}_hist"] = torch.stack(parts, 2)
            elif any(p is not None and p.numel() for p in parts):
                shape = next(p for p in parts if p is not None and p.numel()).shape
                out[f"{sketch}_hist"] = torch.stack([p if p is not None and p.numel() else torch.zeros(shape, dtype=torch.int32)
                                                     for p in parts], 2)
            else:
                out[f"{sketch}_hist"] = torch.zeros(0, dtype=torch.int32)
        K, L, Dm = self.max_outliers, self.num_layers, self.hidden_size
        rows = torch.empty(L, 2, 2, K + 1, Dm, dtype=legacy["vision_top_rows"].dtype)
        norms = torch.empty(L, 2, 2, K + 1, dtype=legacy["vision_top_norms"].dtype)
        norms[:, :, 0], norms[:, :, 1] = -math.inf, math.inf
        dropped = torch.empty(L, 2, 2, dtype=norms.dtype)
        for i, m in enumerate(MODALITIES):
            for e, end in enumerate(("top", "bottom")):
                kept = legacy[f"{m}_{end}_norms"].shape[1]
                if kept > K:
                    raise ValueError(f"the state keeps {kept} rows at the {end}-norm end, this metric max_outliers={K}")
                rows[:, i, e, :kept] = legacy[f"{m}_{end}_rows"]
                norms[:, i, e, :kept] = legacy[f"{m}_{end}_norms"]
                dropped[:, i, e] = legacy[f"{m}_{end}_dropped"]
        out.update(tail_rows=rows, tail_norms=norms, tail_dropped=dropped)
        return out

    # ------------------------------------------------------------------ summaries and merging
    def _summary(self, m: str, k: int, state: Mapping[str, Tensor] | None = None) -> ModalitySummary:
        """The summary of modality ``m`` in layer ``k``: views into this metric's state, or into
        ``state`` (another metric's ``metric_state``)."""
        i = MODALITIES.index(m)
        if state is None:
            return self.modality_state(m).summary(k, self._host_seen()[i][k])
        view = ModalityState.view(state, i)
        return view.summary(k, int(view.count[k]))

    def merge_state(self, incoming_state: "ModalityIntegrationRate | dict[str, Tensor]") -> None:
        """Fold another metric's state (or its ``metric_state`` dict) into this one: the result
        is that of one metric that saw both streams (exact co-moments, norm moments, tails and
        exact medians; histogram medians within the sketch's resolution). Sizes must match."""
        if isinstance(incoming_state, Metric):
            if not isinstance(incoming_state, ModalityIntegrationRate):
                raise ValueError(f"expected a ModalityIntegrationRate, got {type(incoming_state).__name__}")
            incoming_state._raise_input_errors()
            state = incoming_state.metric_state
        elif isinstance(incoming_state, dict):
            state = incoming_state
            if "vision_count" in state:
                state = self._from_legacy(state)
        else:
            raise ValueError(f"expected a ModalityIntegrationRate or its metric_state dict, got {type(incoming_state).__name__}")
        if not state["count"].numel():
            return  # the other metric never saw a token
        self._ensure_allocated()
        for name in self._layout():
            mine, theirs = getattr(self, name), state[name]
            if mine.shape != theirs.shape:
                raise ValueError(f"cannot merge a metric with {name} of shape {tuple(theirs.shape)} "
                                 f"into one of shape {tuple(mine.shape)}: construct both with the same sizes")
        self._results = None
        seen = self._host_seen()
        for i, m in enumerate(MODALITIES):
            for k in range(self.num_layers):
                other = self._summary(m, k, state)
                if other.count == 0:
                    continue
                here = self._summary(m, k)
                count, mean, m2 = moments_merge([here.count, other.count], [here.mean, other.mean], [here.m2, other.m2])
                _, norm_mean, norm_m2 = moments_merge([here.count, other.count], [here.norm_mean, other.norm_mean],
                                                      [here.norm_m2, other.norm_m2])
                for tail, other_tail in ((here.high, other.high), (here.low, other.low)):
                    kept = torch.isfinite(other_tail.norms)
                    tails_update(tail.rows, tail.norms, tail.dropped, other_tail.rows[kept], other_tail.norms[kept], tail.largest)
                    extreme = torch.maximum if tail.largest else torch.minimum
                    tail.dropped.copy_(extreme(tail.dropped, other_tail.dropped.to(tail.dropped.dtype)))
                self._sketch_merge(i, "med", k, here.count, other.values)
                self._sketch_merge(i, "nrm", k, here.count, other.norms)
                here.mean.copy_(mean)
                self.m2[k, i].copy_(m2)  # here.m2 is a symmetric copy
                here.norm_mean.copy_(norm_mean)
                here.norm_m2.copy_(norm_m2)
                self.count[k, i] = count
                self.nonfinite[k, i] += other.nonfinite
                seen[i][k] = count

    # ------------------------------------------------------------------ compute
    def _layer_results(self) -> list[LayerResult]:
        """Every layer's result, layer-sharded over the ranks: in rounds of ``world`` layers, each
        layer's summaries are merged onto one owner rank (``k % world``), each rank solves the
        layer it owns, and the results are shared. One process: the local summaries as they are."""
        group = self.process_group
        world, rank = D.world_size(group), D.rank(group)
        device = torch.device("cpu") if self.compute_on_cpu_linalg else self.device
        rows = torch.zeros(self.num_layers, LayerResult.width(), dtype=torch.float64, device=self.device)
        for start in range(0, self.num_layers, world):
            mine = None
            for k in range(start, min(start + world, self.num_layers)):
                owner = k - start
                merged = [D.reduce_summary(self._summary(m, k), owner, group, (self.median_bins, self.norm_bins)) for m in MODALITIES]
                if owner == rank:
                    mine = (k, merged)
            if mine is not None:
                k, (vision, text) = mine
                result = layer_result(vision, text, outlier_sigma=self.outlier_sigma, sqrt_mode=self.sqrt_mode,
                                      normalization=self.normalization, device=device)
                rows[k] = result.as_row().to(rows.device)
                del vision, text, mine
        rows = D.all_reduce_sum(rows, group)  # each row is non-zero on its owner only
        return [LayerResult.from_row(row) for row in rows.cpu()]

    def _compute_results(self) -> list[LayerResult]:
        if self._results is not None:
            return self._results
        self._raise_input_errors()
        self._ensure_allocated()
        results = self._layer_results()
        total = sum(r.fd for r in results)
        self._warn(results, total)
        self._mir = math.log10(total) if total > 0 else math.nan
        self._results = results
        return results

    def _warn(self, results: list[LayerResult], total: float) -> None:
        """Warnings about this computation's caveats, each once per process and cause (see
        :func:`~mir_lightning._warnings.warn_once`); layers are named by ``layer_ids``."""
        ids = self.layer_ids
        for k, r in enumerate(results):
            if r.degenerate:
                warn_once(("few tokens", ids[k], r.n_vision < 2, r.n_text < 2),
                          f"layer {ids[k]}: fewer than 2 vision ({r.n_vision}) or text ({r.n_text}) tokens; its FD is NaN",
                          stacklevel=4)
            for m in MODALITIES:
                for end in ("high", "low"):
                    if getattr(r, f"overflow_{end}_{m}"):
                        warn_once(("outlier overflow", ids[k], m, end, self.max_outliers),
                                  f"layer {ids[k]}, {m}: more outlier tokens at the {end}-norm end than the "
                                  f"{self.max_outliers} rows kept there; only the kept ones are replaced by the median "
                                  f"row ({getattr(r, f'outliers_{m}')} in all), the others count as they are "
                                  "(raise max_outliers for an exact result)", stacklevel=4)
        sketched = {
            "median_buffer": [ids[k] for k, r in enumerate(results) if r.median_sketch_vision or r.median_sketch_text],
            "norm_buffer": [ids[k] for k, r in enumerate(results) if r.norm_sketch_vision or r.norm_sketch_text],
        }
        what = {
            "median_buffer": "the per-dimension median row that replaces outliers is interpolated from a "
            f"{self.median_bins}-bin histogram per dimension (measured relative FD error <= 1e-6 on LLM-like data, "
            "~1e-4 if FD is far below the traces; see README)",
            "norm_buffer": f"the median norm of the outlier rule is read from a {self.norm_bins}-bin histogram "
            "(exact up to tokens whose norm lies within ~1e-4 of the 3-sigma threshold)",
        }
        for buffer, layers in sketched.items():
            if layers:
                size = getattr(self, buffer)
                warn_once(("sketched median", buffer, size, tuple(layers)),
                          f"more than {buffer}={size} tokens of a modality in layer(s) {layers}: {what[buffer]}; "
                          f"raise {buffer} for an exact result", stacklevel=4)
        if not total > 0 and not any(r.degenerate for r in results):
            warn_once(("non-positive FD sum", tuple(ids)), f"the FD sum is {total}; MIR is NaN", stacklevel=4)

    def compute(self) -> Tensor:
        """MIR ``log10(sum_k FD_k)`` as a 0-dim float64 tensor (NaN, with a warning, when a
        layer lacks tokens or the sum is not positive). Every rank must call it."""
        self._compute_results()
        return torch.tensor(self._mir, dtype=torch.float64)

    def per_layer_fd(self) -> Tensor:
        """Per-layer text-normalised FD after the outlier rule, ``[num_layers]`` float64
        (their sum is ``10**MIR``). Merged across ranks like :meth:`compute`."""
        return self.per_layer_stats()["fd"]

    def per_layer_stats(self) -> dict[str, Tensor]:
        """Diagnostics per layer, each a ``[num_layers]`` float64 tensor.

        ``fd``; ``mean_term`` ``||mu_V - mu_T||^2``, ``trace_vision`` ``tr S_V``,
        ``trace_text`` ``tr S_T``, ``cross_term`` ``2 tr((S_V S_T)^(1/2))`` (all after
        normalisation and the outlier rule; ``fd = mean + traces - cross``);
        ``norm_ratio``: mean vision-token norm / mean text-token norm before normalisation;
        ``n_vision``, ``n_text``: token counts; ``outliers_vision``, ``outliers_text``:
        replaced tokens; ``nonfinite_vision``, ``nonfinite_text``: skipped tokens.
        """
        results = self._compute_results()
        return {key: torch.tensor([float(getattr(r, key)) for r in results], dtype=torch.float64) for key in STAT_KEYS}

    def plot(self, val: Mapping[str, Sequence[float] | Tensor] | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Per-layer figure (torchmetrics' ``plot`` convention, ``(fig, axes)``): the FD split
        into its terms and the vision/text norm ratio, over layers.

        Args:
            val: per-layer statistics as returned by :meth:`per_layer_stats` (default: this
                metric's, computed now).
            ax: not supported (the figure has two panels of its own); must be None.
        """
        from mir_lightning.plotting import per_layer_figure

        if ax is not None:
            raise ValueError("the MIR figure has two panels of its own: call plot() with ax=None and use the returned axes")
        stats = self.per_layer_stats() if val is None else val
        if not isinstance(stats, Mapping):
            raise TypeError(f"val must be per_layer_stats() (a mapping of per-layer values), got {type(stats).__name__}")
        fig = per_layer_figure({key: torch.as_tensor(value).detach().cpu().tolist() for key, value in stats.items()},
                               layers=self.layer_ids)
        return fig, fig.axes


def _version(tensor: Tensor) -> int | None:
    """In-place modification counter of ``tensor`` (None for inference tensors, which have none:
    the mask cache then relies on identity alone)."""
    return None if tensor.is_inference() else tensor._version


def _stamp(tensors: Sequence[Tensor], *extra: Any) -> tuple[Any, ...]:
    """A cache key of ``tensors`` (and ``extra`` values): their identity and in-place versions,
    so it stops matching when one is replaced or modified in place."""
    return (*tensors, *(_version(t) for t in tensors), *extra)


def _same_stamp(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two :func:`_stamp` keys match (tensors by identity, the rest by value)."""
    return len(a) == len(b) and all(x is y if isinstance(x, Tensor) else x == y for x, y in zip(a, b))
