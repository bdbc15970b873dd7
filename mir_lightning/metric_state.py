"""The state of :class:`~mir_lightning.metric.ModalityIntegrationRate`: its layout, typed views of
one modality, and the per-layer views and per-batch index tensors that ``update()`` works with.

The metric registers (torchmetrics ``add_state``) one tensor per kind of state, stacked
``[layers, modality, ...]`` (modality 0 vision, 1 text), so that one kernel serves both
modalities; :class:`ModalityState` is the typed, per-modality view of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from mir_lightning.summaries import MedianSketch, ModalitySummary, Tail, symmetric_from_upper

if TYPE_CHECKING:
    from mir_lightning.metric import ModalityIntegrationRate

MODALITIES = ("vision", "text")
SKETCHES = ("med", "nrm")

__all__ = ["MODALITIES", "InputErrorCounts", "ModalityState", "SketchState", "TailState"]


@dataclass(frozen=True)
class StateSpec:
    """Shape, dtype and initial value of one registered state (``fill=None``: left
    uninitialised; a pair: the value of tail end 0 and end 1 along dimension 2)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float | tuple[float, float] | None


@dataclass(frozen=True)
class TailState:
    """The rows kept at one end of the norm distribution, over layers: ``rows [L, K, D]``,
    ``norms [L, K]`` (``-inf`` / ``+inf`` = empty slot), ``dropped [L]`` (the most extreme norm
    not kept); ``largest``: which end."""

    rows: Tensor
    norms: Tensor
    dropped: Tensor
    largest: bool

    def at(self, k: int) -> Tail:
        return Tail(self.rows[k], self.norms[k], self.dropped[k], self.largest)


@dataclass(frozen=True)
class SketchState:
    """A median sketch over layers: exact ``rows [L, R, C]`` (the first ``count`` are filled),
    histogram grid ``centre``, ``scale [L, C]``, ``hist [L, C, B]`` int32 (an empty placeholder
    until some layer needs it)."""

    rows: Tensor
    centre: Tensor
    scale: Tensor
    hist: Tensor

    def at(self, k: int, count: int) -> MedianSketch:
        rows = self.rows[k]
        if count <= rows.shape[0]:
            return MedianSketch(rows[:count])
        return MedianSketch(rows[:0], [(self.hist[k], self.centre[k], self.scale[k])])


@dataclass(frozen=True)
class ModalityState:
    """One modality's state over layers, as views (no copies) into the registered tensors.

    ``count``, ``nonfinite``: ``[L]`` int64 (tokens folded, tokens skipped as non-finite);
    ``mean [L, D]``, ``m2 [L, D, D]`` (centred co-moments: the upper triangle, diagonal
    included; below it a scratch area, see :meth:`summary`), ``norm_mean [L, 1]``,
    ``norm_m2 [L, 1, 1]`` (float64, of the token norms); ``high`` / ``low``: the tails;
    ``values`` / ``norms``: the median sketches of the tokens and of their norms."""

    count: Tensor
    nonfinite: Tensor
    mean: Tensor
    m2: Tensor
    norm_mean: Tensor
    norm_m2: Tensor
    high: TailState
    low: TailState
    values: SketchState
    norms: SketchState

    # attribute suffixes of the per-modality state of earlier versions (``vision_top_rows``...)
    LEGACY_NAMES: ClassVar[dict[str, tuple[str, ...]]] = {
        "count": ("count",), "nonfinite": ("nonfinite",), "mean": ("mean",), "m2": ("m2",),
        "norm_mean": ("norm_mean",), "norm_m2": ("norm_m2",),
        "top_rows": ("high", "rows"), "top_norms": ("high", "norms"), "top_dropped": ("high", "dropped"),
        "bottom_rows": ("low", "rows"), "bottom_norms": ("low", "norms"), "bottom_dropped": ("low", "dropped"),
        "med_rows": ("values", "rows"), "med_centre": ("values", "centre"), "med_scale": ("values", "scale"),
        "med_hist": ("values", "hist"), "nrm_rows": ("norms", "rows"), "nrm_centre": ("norms", "centre"),
        "nrm_scale": ("norms", "scale"), "nrm_hist": ("norms", "hist"),
    }

    @classmethod
    def view(cls, state: Mapping[str, Tensor], i: int) -> "ModalityState":
        """Modality ``i``'s views of a stacked state (the metric's ``metric_state``, allocated)."""
        kept = state["tail_norms"].shape[-1] - 1  # the last slot is scratch

        def tail(end: int) -> TailState:
            return TailState(state["tail_rows"][:, i, end, :kept], state["tail_norms"][:, i, end, :kept],
                             state["tail_dropped"][:, i, end], largest=end == 0)

        def sketch(name: str) -> SketchState:
            hist = state[f"{name}_hist"]
            return SketchState(state[f"{name}_rows"][:, i], state[f"{name}_centre"][:, i], state[f"{name}_scale"][:, i],
                               hist[:, :, i] if hist.numel() else hist)

        return cls(count=state["count"][:, i], nonfinite=state["nonfinite"][:, i], mean=state["mean"][:, i],
                   m2=state["m2"][:, i], norm_mean=state["norm_mean"][:, i], norm_m2=state["norm_m2"][:, i],
                   high=tail(0), low=tail(1), values=sketch("med"), norms=sketch("nrm"))

    def legacy_field(self, name: str) -> Tensor:
        value: Any = self
        for part in self.LEGACY_NAMES[name]:
            value = getattr(value, part)
        return value

    def summary(self, k: int, count: int) -> ModalitySummary:
        """Layer ``k``'s :class:`~mir_lightning.summaries.ModalitySummary` of ``count`` tokens: views,
        except ``m2``, made symmetric from the state's upper triangle (a new ``[D, D]``)."""
        return ModalitySummary(
            count=count, mean=self.mean[k], m2=symmetric_from_upper(self.m2[k]), norm_mean=self.norm_mean[k], norm_m2=self.norm_m2[k],
            high=self.high.at(k), low=self.low.at(k), values=self.values.at(k, count), norms=self.norms.at(k, count),
            nonfinite=int(self.nonfinite[k]),
        )


@dataclass
class InputErrorCounts:
    """Input errors counted on the device and raised later (without stalling ``update()``):
    ``both_masks``: positions in both masks, summed over batches (0-dim int64, or None before
    the first batch). Non-finite tokens need no counter: their norm is ``+inf`` or NaN, so they
    enter their modality's high-norm tail and stay there."""

    both_masks: Tensor | None = None

    def add_both_masks(self, count: Tensor) -> None:
        # summed out of place: the counts may be made under inference mode and read outside it
        self.both_masks = count if self.both_masks is None else self.both_masks + count.to(self.both_masks.device)


@dataclass(frozen=True)
class LayerViews:
    """Views of one layer's state for ``update()``, made once per allocation (every view is a
    dispatched op). Both modalities (and both tail ends) side by side: ``count [2]``,
    ``mean [2, D]``, per-modality ``means``, ``m2s``, 0-dim ``norm_means``, ``norm_m2s``,
    ``norm_mean [2]``, ``norm_m2 [2]``; tails flattened over (modality, end): ``tail_rows [4 (K+1), D]``,
    ``tail_norms [4 (K+1)]``, ``tail_kept_norms [4, K]``, ``tail_dropped [4]``; exact sketch
    buffers flattened over modality: ``med_rows [2 R, D]``, ``nrm_rows [2 Rn]``; allocated
    histograms by sketch name: ``(counts [C, 2 B], centre [2, C], scale [2, C], per-modality counts
    ([C, B], [C, B]))``."""

    count: Tensor
    mean: Tensor
    means: list[Tensor]
    m2s: list[Tensor]
    norm_mean: Tensor
    norm_means: list[Tensor]
    norm_m2: Tensor
    norm_m2s: list[Tensor]
    tail_rows: Tensor
    tail_norms: Tensor
    tail_kept_norms: Tensor
    tail_dropped: Tensor
    med_rows: Tensor
    nrm_rows: Tensor
    histograms: dict[str, tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]]

    BASES: ClassVar[tuple[str, ...]] = ("count", "mean", "m2", "norm_mean", "norm_m2", "tail_rows", "tail_norms",
                                        "tail_dropped", "med_rows", "nrm_rows", "med_hist", "nrm_hist", "med_centre",
                                        "med_scale", "nrm_centre", "nrm_scale")

    @classmethod
    def of(cls, metric: "ModalityIntegrationRate", k: int) -> "LayerViews":
        K, D = metric.max_outliers, metric.hidden_size
        tail_norms = metric.tail_norms[k].reshape(4, K + 1)
        norm_mean = metric.norm_mean[k, :, 0]
        return cls(
            count=metric.count[k], mean=metric.mean[k], means=list(metric.mean[k].unbind(0)),
            m2s=list(metric.m2[k].unbind(0)), norm_mean=norm_mean, norm_means=list(norm_mean.unbind(0)),
            norm_m2=metric.norm_m2[k].view(2), norm_m2s=list(metric.norm_m2[k, :, 0, 0].unbind(0)), tail_rows=metric.tail_rows[k].view(-1, D),
            tail_norms=tail_norms.view(-1), tail_kept_norms=tail_norms[:, :K], tail_dropped=metric.tail_dropped[k].view(4),
            med_rows=metric.med_rows[k].view(-1, D), nrm_rows=metric.nrm_rows[k].view(-1),
            histograms={
                name: (hist[k].view(hist.shape[1], -1), getattr(metric, f"{name}_centre")[k], getattr(metric, f"{name}_scale")[k],
                       hist[k].unbind(1))
                for name in SKETCHES if (hist := getattr(metric, f"{name}_hist")).numel()
            },
        )


@dataclass(frozen=True)
class BatchIndex:
    """Index and weight tensors of one batch's selected positions (vision first, then text),
    built once per mask pair on the metric's device.

    ``positions [n]``: flat positions in ``[B*T]``; ``counts``: (vision, text) host ints;
    ``count_vector [2]``; ``modality [n]`` (0/1); ``membership [n, 2]`` (one-hot) and
    ``mean_weights [2, n]`` (``1 / count`` of the row's modality) in the state dtype and in
    float64, ``member_rows64 [2, n]`` (0/1); ``tail_candidates [4, K + N]``: for each
    (modality, end) tail the index of each candidate's norm in ``cat([tail_norms [4 (K+1)],
    norms [n], pad_norms])``: its ``K`` kept slots, then the new rows of its modality, padded
    to ``N = max(counts)`` with the norm (``-inf`` high end, ``+inf`` low end) that is never
    kept; ``tail_new_candidates [4 N]``: the new candidates' part of it, flattened (a padding
    candidate that ties with an empty slot and enters writes an empty slot's norm);
    ``tail_rows [4 N]``: the row behind each new candidate (0 for padding);
    ``med_slots``, ``nrm_slots`` ``[n]``: the row's place in the flattened exact sketch buffers
    before the rows already seen are added; ``bin_offsets``: per sketch ``[1, n]``, the
    modality's offset (``bins * modality``) in a ``[C, 2 bins]`` histogram, and ``[C, n]``
    int32 views of one (``med_ones``, ``nrm_ones``) to count with; constants
    ``end_sign [4, 1]`` (+1 high end, -1 low end), ``pad_norms [2]``, ``scratch_slot [4, 1]``
    (``K``), ``tail_offsets [4, 1]`` (``(K + 1) * tail``)."""

    positions: Tensor
    counts: tuple[int, int]
    count_vector: Tensor
    modality: Tensor
    membership: Tensor
    mean_weights: Tensor
    membership64: Tensor
    mean_weights64: Tensor
    member_rows64: Tensor
    tail_candidates: Tensor
    tail_new_candidates: Tensor
    tail_rows: Tensor
    med_slots: Tensor
    nrm_slots: Tensor
    med_bin_offsets: Tensor
    nrm_bin_offsets: Tensor
    med_ones: Tensor
    nrm_ones: Tensor
    end_sign: Tensor
    end_sign_flat: Tensor
    pad_norms: Tensor
    scratch_slot: Tensor
    tail_offsets: Tensor

    @property
    def total(self) -> int:
        return self.counts[0] + self.counts[1]

    @classmethod
    def build(cls, positions: Sequence[Tensor], metric: "ModalityIntegrationRate") -> "BatchIndex":
        """From each modality's flat positions (device tensors; their lengths are read here)."""
        device, dtype, K = metric.device, metric.state_dtype, metric.max_outliers
        nv, nt = (int(p.numel()) for p in positions)
        n, longest = nv + nt, max(nv, nt, 1)
        modality = torch.cat([torch.zeros(nv, dtype=torch.long), torch.ones(nt, dtype=torch.long)])
        membership64 = torch.stack([modality == 0, modality == 1], 1).to(torch.float64)
        inverse = torch.tensor([1.0 / nv if nv else 0.0, 1.0 / nt if nt else 0.0], dtype=torch.float64)
        mean_weights64 = (membership64 * inverse).mT.contiguous()
        candidates, rows = [], []
        for start, count in ((0, nv), (nv, nt)):
            own = torch.arange(start, start + count)
            for end in (0, 1):
                kept = torch.arange(K) + len(candidates) * (K + 1)
                pad = torch.full((longest - count,), 4 * (K + 1) + n + end)
                candidates.append(torch.cat([kept, own + 4 * (K + 1), pad]))
                rows.append(torch.cat([own, torch.zeros(longest - count, dtype=torch.long)]))
        within = torch.cat([torch.arange(nv), torch.arange(nt)])
        cpu = dict(
            count_vector=torch.tensor([nv, nt]), modality=modality,
            membership=membership64.to(dtype), mean_weights=mean_weights64.to(dtype),
            membership64=membership64, mean_weights64=mean_weights64, member_rows64=membership64.mT.contiguous(),
            tail_candidates=torch.stack(candidates), tail_new_candidates=torch.stack(candidates)[:, K:].reshape(-1),
            tail_rows=torch.cat(rows),
            med_slots=within + modality * metric.median_buffer, nrm_slots=within + modality * metric.norm_buffer,
            end_sign=torch.tensor([[1.0], [-1.0], [1.0], [-1.0]], dtype=dtype),
            end_sign_flat=torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=dtype),
            pad_norms=torch.tensor([-math.inf, math.inf], dtype=dtype),
            med_bin_offsets=(modality * metric.median_bins)[None], nrm_bin_offsets=(modality * metric.norm_bins)[None],
            scratch_slot=torch.full((4, 1), K), tail_offsets=torch.arange(4)[:, None] * (K + 1),
        )
        moved = {name: t.to(device) for name, t in cpu.items()}
        if dtype == torch.float64:  # one tensor each, not two equal ones
            moved["membership"], moved["mean_weights"] = moved["membership64"], moved["mean_weights64"]
        one = torch.ones((), dtype=torch.int32, device=device)
        return cls(positions=torch.cat(list(positions)).to(device), counts=(nv, nt), **moved,
                   med_ones=one.expand(metric.hidden_size, n), nrm_ones=one.expand(1, n))
