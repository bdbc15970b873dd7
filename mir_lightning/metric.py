"""``ModalityIntegrationRate``: streaming, bounded-memory, exactly mergeable MIR metric."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from mir_lightning import _distributed as D
from mir_lightning.functional import SQRT_MODES, LayerResult, layer_result
from mir_lightning.summaries import (
    MedianSketch,
    ModalitySummary,
    Tail,
    histogram_add,
    histogram_grid,
    histogram_rebin,
    moments_merge,
    moments_update,
    tails_update,
)

MODALITIES = ("vision", "text")
STAT_KEYS = LayerResult.STATS


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
        kwargs: torchmetrics options (``process_group``...). ``sync_on_compute`` and
            ``dist_sync_on_step`` are not supported: ``compute()`` always merges all ranks,
            layer by layer, so every rank must call it. ``compute()`` caches its result
            itself (torchmetrics' ``compute_with_cache`` is off).

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
        self.normalization = normalization
        self.compute_on_cpu_linalg = compute_on_cpu_linalg
        self._results: list[LayerResult] | None = None
        self._mir = math.nan
        # tokens folded per modality and layer, mirrored on the host so update() never reads the device
        self._seen: list[list[int]] | None = [[0] * self.num_layers for _ in MODALITIES]
        self._mask_cache: tuple[Any, ...] | None = None
        # device-side counts of input problems, raised later without stalling update(): key 0 positions
        # in both masks; 1 + 2k + i non-finite tokens of layer k, modality i (nan_strategy="error").
        # Summed out of place: the counts may be made under inference mode and read outside it.
        self._bad_inputs: dict[int, Tensor] = {}
        # Big states start as empty placeholders (so torchmetrics' reset copies are tiny) and are
        # allocated on first use. They never go through torchmetrics' reductions: compute() and
        # merge_state() merge them exactly through the typed summaries (dist_reduce_fx=None).
        for m in MODALITIES:
            for name, (_, dtype, _) in self._layout(m).items():
                self.add_state(name, torch.zeros(0, dtype=dtype), dist_reduce_fx=None)
            for sketch in ("med", "nrm"):
                self.add_state(f"{m}_{sketch}_hist", torch.zeros(0, dtype=torch.int32), dist_reduce_fx=None)

    # ------------------------------------------------------------------ state layout
    def _layout(self, m: str) -> dict[str, tuple[tuple[int, ...], torch.dtype, float | None]]:
        """name -> (shape, dtype, fill) of every state of modality ``m`` (histograms excluded).

        Per layer: ``count``, ``nonfinite``; co-moments ``mean [D]``, ``m2 [D, D]``; norm
        moments ``norm_mean [1]``, ``norm_m2 [1, 1]``; tails ``top_*`` / ``bottom_*`` (rows,
        norms, dropped); median sketches ``med_*`` (values) and ``nrm_*`` (norms): exact rows,
        grid centre and scale. ``fill=None``: row buffers left uninitialised (only slots that
        counts or finite norms mark as filled are ever read), so a reset costs no writes."""
        L, Dm, K, sd = self.num_layers, self.hidden_size, self.max_outliers, self.state_dtype
        Kb, f64 = self.bottom_capacity, torch.float64
        return {
            f"{m}_count": ((L,), torch.long, 0),
            f"{m}_nonfinite": ((L,), torch.long, 0),
            f"{m}_mean": ((L, Dm), sd, 0),
            f"{m}_m2": ((L, Dm, Dm), sd, 0),
            f"{m}_norm_mean": ((L, 1), f64, 0),
            f"{m}_norm_m2": ((L, 1, 1), f64, 0),
            f"{m}_top_rows": ((L, K, Dm), sd, None),
            f"{m}_top_norms": ((L, K), sd, -math.inf),
            f"{m}_top_dropped": ((L,), sd, -math.inf),
            f"{m}_bottom_rows": ((L, Kb, Dm), sd, None),
            f"{m}_bottom_norms": ((L, Kb), sd, math.inf),
            f"{m}_bottom_dropped": ((L,), sd, math.inf),
            f"{m}_med_rows": ((L, self.median_buffer, Dm), torch.float32, None),
            f"{m}_med_centre": ((L, Dm), f64, 0),
            f"{m}_med_scale": ((L, Dm), f64, 0),
            # norms in float64: after a final RMSNorm every token's norm can agree to ~1e-8,
            # below float32 resolution, and the rule's median norm must resolve that spread
            f"{m}_nrm_rows": ((L, self.norm_buffer, 1), f64, None),
            f"{m}_nrm_centre": ((L, 1), f64, 0),
            f"{m}_nrm_scale": ((L, 1), f64, 0),
        }

    def _sketch_size(self, sketch: str) -> tuple[int, int, int]:
        """(columns, exact rows, bins) of the ``med`` or ``nrm`` sketch."""
        if sketch == "med":
            return self.hidden_size, self.median_buffer, self.median_bins
        return 1, self.norm_buffer, self.norm_bins

    def _ensure_allocated(self) -> None:
        if self.vision_count.numel():
            return
        for m in MODALITIES:
            for name, (shape, dtype, fill) in self._layout(m).items():
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

    def _host_seen(self) -> list[list[int]]:
        """Tokens folded per modality and layer (host ints; rebuilt from the state after a load)."""
        if self._seen is None:
            counts = [getattr(self, f"{m}_count") for m in MODALITIES]
            self._seen = [c.tolist() if c.numel() else [0] * self.num_layers for c in counts]
        return self._seen

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
        + 8 Rn + 4 Bn + 48`` with ``s`` the bytes of ``state_dtype``, ``Kb = min(K, 64)``.
        Independent of the number of tokens.
        """
        s = torch.empty(0, dtype=state_dtype).element_size()
        Dm, K = hidden_size, max_outliers
        Kb = min(K, 64)
        per = s * (Dm * Dm + Dm + (K + Kb) * (Dm + 1) + 2) + 4 * Dm * (median_buffer + median_bins) + 16 * Dm
        per += 8 * norm_buffer + 4 * norm_bins + 16 + 32
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
                flat = hidden.reshape(-1, self.hidden_size)
                for i, (index, count) in enumerate(self._mask_index(vision_mask, text_mask, hidden.device)):
                    if count:
                        self._fold(i, k, flat.index_select(0, index).to(device=self.device))
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

    def _mask_index(self, vision_mask: Tensor, text_mask: Tensor, device: torch.device) -> list[tuple[Tensor, int]]:
        """Flat positions and counts of both masks on ``device``, computed once per mask pair
        (the one place a batch waits for the device: the number of selected positions)."""
        key = (vision_mask, text_mask, _version(vision_mask), _version(text_mask), device)
        cache = self._mask_cache
        if cache is not None and all(a is b if isinstance(a, Tensor) else a == b for a, b in zip(cache[0], key)):
            return cache[1]
        vision, text = vision_mask.to(device), text_mask.to(device)
        self._count_bad_input(0, (vision & text).sum())
        index = []
        for mask in (vision, text):
            flat = mask.reshape(-1).nonzero().squeeze(1)
            index.append((flat, flat.numel()))
        self._mask_cache = (key, index)
        return index

    def _count_bad_input(self, key: int, count: Tensor) -> None:
        previous = self._bad_inputs.get(key)
        self._bad_inputs[key] = count if previous is None else previous + count.to(previous.device)

    def _raise_input_errors(self) -> None:
        """Raise what the device found wrong with the inputs since the last reset (one sync)."""
        if not self._bad_inputs:
            return
        keys = list(self._bad_inputs)
        counts = torch.stack([self._bad_inputs[key].to(self._bad_inputs[keys[0]].device) for key in keys])
        if not bool(counts.any()):
            return
        bad = dict.fromkeys(range(1 + 2 * self.num_layers), 0)
        bad.update(zip(keys, counts.tolist()))
        problems = []
        if bad[0]:
            problems.append(f"{bad[0]} position(s) are in both vision_mask and text_mask; each token must be one modality")
        for k in range(self.num_layers):
            for i, m in enumerate(MODALITIES):
                if bad[1 + 2 * k + i]:
                    problems.append(f"{bad[1 + 2 * k + i]} selected {m} token(s) of layer {k} hold non-finite values "
                                    "(pass nan_strategy='skip' to drop and count them)")
        raise ValueError("; ".join(problems) + ". The state holds these tokens now: reset() the metric")

    def _fold(self, i: int, k: int, selected: Tensor) -> None:
        """Fold the selected tokens ``[n, D]`` of modality ``i`` into layer ``k`` (input dtype, on
        the metric's device; a copy this method may overwrite). The median sketch bins them in
        their own dtype (float32 for half-precision inputs), the rest works in the state dtype."""
        m = MODALITIES[i]
        rows = selected.to(self.state_dtype)
        norms = rows.norm(dim=1)  # a non-finite value makes its row's norm non-finite
        if self.nan_strategy == "skip":
            rows, norms, selected = self._drop_nonfinite(m, k, rows, norms, selected)
            if not rows.shape[0]:
                return
        else:
            self._count_bad_input(1 + 2 * k + i, (~torch.isfinite(norms)).sum())
        seen = self._host_seen()[i][k]
        for end in ("top", "bottom"):
            tails_update(
                getattr(self, f"{m}_{end}_rows")[k], getattr(self, f"{m}_{end}_norms")[k],
                getattr(self, f"{m}_{end}_dropped")[k], rows, norms, largest=end == "top",
            )
        self._sketch_add(m, "med", k, seen, selected)
        self._sketch_add(m, "nrm", k, seen, norms[:, None])
        moments_update(seen, getattr(self, f"{m}_norm_mean")[k], getattr(self, f"{m}_norm_m2")[k],
                       norms.to(torch.float64)[:, None])
        # last: centres `rows` in place (a copy made by the mask selection; may be `selected`)
        moments_update(seen, getattr(self, f"{m}_mean")[k], getattr(self, f"{m}_m2")[k], rows, overwrite=True)
        getattr(self, f"{m}_count")[k] += rows.shape[0]
        self._seen[i][k] = seen + rows.shape[0]

    def _drop_nonfinite(self, m: str, k: int, rows: Tensor, norms: Tensor, selected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """nan_strategy="skip": drop and count rows holding non-finite values (host syncs)."""
        finite = torch.isfinite(norms)
        if not bool(finite.all()):
            finite[~finite] = torch.isfinite(rows[~finite]).all(dim=1)  # (or the norm overflowed)
        if bool(finite.all()):
            return rows, norms, selected
        getattr(self, f"{m}_nonfinite")[k] += int((~finite).sum())
        return rows[finite], norms[finite], selected[finite]

    def _sketch_add(self, m: str, sketch: str, k: int, seen: int, x: Tensor) -> None:
        """Add rows ``x [n, C]`` to a median sketch that has seen ``seen`` rows."""
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

    def _sketch_merge(self, m: str, sketch: str, k: int, seen: int, other: MedianSketch) -> None:
        """Add another sketch of the same size (exact rows or one histogram) to this one."""
        if other.rows.shape[0]:
            self._sketch_add(m, sketch, k, seen, other.rows)
            seen += other.rows.shape[0]
        for counts, other_centre, other_scale in other.histograms:
            _, capacity, _ = self._sketch_size(sketch)
            hist = self._histogram(m, sketch)[k]
            centre, scale = getattr(self, f"{m}_{sketch}_centre")[k], getattr(self, f"{m}_{sketch}_scale")[k]
            if seen <= capacity:  # still exact here: bin the exact rows on a grid from them (or the other's)
                rows = getattr(self, f"{m}_{sketch}_rows")[k][:seen]
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

    def reset(self) -> None:
        """Drop all accumulated state (big states go back to empty placeholders)."""
        super().reset()
        self._results = None
        self._seen = [[0] * self.num_layers for _ in MODALITIES]
        self._mask_cache = None
        self._bad_inputs = {}

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._seen = None
        self._results = None

    # ------------------------------------------------------------------ summaries and merging
    def _summary(self, m: str, k: int, state: Mapping[str, Tensor] | None = None) -> ModalitySummary:
        """The summary of modality ``m`` in layer ``k``: views into this metric's state, or into
        ``state`` (another metric's ``metric_state``)."""
        if state is None:
            get = lambda name: getattr(self, f"{m}_{name}")  # noqa: E731
            count = self._host_seen()[MODALITIES.index(m)][k]
        else:
            get = lambda name: state[f"{m}_{name}"]  # noqa: E731
            count = int(get("count")[k])

        def sketch(name: str) -> MedianSketch:
            rows = get(f"{name}_rows")[k]
            if count <= rows.shape[0]:
                return MedianSketch(rows[:count])
            return MedianSketch(rows[:0], [(get(f"{name}_hist")[k], get(f"{name}_centre")[k], get(f"{name}_scale")[k])])

        return ModalitySummary(
            count=count, mean=get("mean")[k], m2=get("m2")[k], norm_mean=get("norm_mean")[k], norm_m2=get("norm_m2")[k],
            high=Tail(get("top_rows")[k], get("top_norms")[k], get("top_dropped")[k], largest=True),
            low=Tail(get("bottom_rows")[k], get("bottom_norms")[k], get("bottom_dropped")[k], largest=False),
            values=sketch("med"), norms=sketch("nrm"), nonfinite=int(get("nonfinite")[k]),
        )

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
        else:
            raise ValueError(f"expected a ModalityIntegrationRate or its metric_state dict, got {type(incoming_state).__name__}")
        if not state["vision_count"].numel():
            return  # the other metric never saw a token
        self._ensure_allocated()
        for name in self._layout("vision"):
            suffix = name[len("vision_"):]
            for m in MODALITIES:
                mine, theirs = getattr(self, f"{m}_{suffix}"), state[f"{m}_{suffix}"]
                if mine.shape != theirs.shape:
                    raise ValueError(f"cannot merge a metric with {m}_{suffix} of shape {tuple(theirs.shape)} "
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
                self._sketch_merge(m, "med", k, here.count, other.values)
                self._sketch_merge(m, "nrm", k, here.count, other.norms)
                here.mean.copy_(mean)
                here.m2.copy_(m2)
                here.norm_mean.copy_(norm_mean)
                here.norm_m2.copy_(norm_m2)
                getattr(self, f"{m}_count")[k] = count
                getattr(self, f"{m}_nonfinite")[k] += other.nonfinite
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
        """Warnings about this computation's caveats (every computation warns again)."""
        emitted: set[str] = set()

        def warn(key: str, message: str) -> None:
            if key not in emitted:
                emitted.add(key)
                warnings.warn(message, RuntimeWarning, stacklevel=5)

        for k, r in enumerate(results):
            if r.degenerate:
                warn(f"few-{k}", f"layer {k}: fewer than 2 vision ({r.n_vision}) or text ({r.n_text}) tokens; its FD is NaN")
            for m in MODALITIES:
                for end in ("high", "low"):
                    if getattr(r, f"overflow_{end}_{m}"):
                        capacity = self.max_outliers if end == "high" else self.bottom_capacity
                        warn(f"overflow-{k}-{m}-{end}",
                             f"layer {k}, {m}: more outlier tokens at the {end}-norm end than the {capacity} rows kept "
                             f"there; only the kept ones are replaced by the median row ({getattr(r, f'outliers_{m}')} "
                             "in all), the others count as they are (raise max_outliers for an exact result)")
        sketched = {
            "median_buffer": [k for k, r in enumerate(results) if r.median_sketch_vision or r.median_sketch_text],
            "norm_buffer": [k for k, r in enumerate(results) if r.norm_sketch_vision or r.norm_sketch_text],
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
                warn(f"approx-{buffer}", f"more than {buffer}={getattr(self, buffer)} tokens of a modality in layer(s) "
                     f"{layers}: {what[buffer]}; raise {buffer} for an exact result")
        if not total > 0 and not any(r.degenerate for r in results):
            warn("nonpositive", f"the FD sum is {total}; MIR is NaN")

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
        fig = per_layer_figure({key: torch.as_tensor(value).detach().cpu().tolist() for key, value in stats.items()})
        return fig, fig.axes


def _version(tensor: Tensor) -> int | None:
    """In-place modification counter of ``tensor`` (None for inference tensors, which have none:
    the mask cache then relies on identity alone)."""
    return None if tensor.is_inference() else tensor._version
