"""``MIRCallback``: MIR of the LLM's hidden states at every validation run, for Lightning."""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from mir_lightning.capture import LayerCapture, infer_hidden_size, masks_in_batch, select_layers
from mir_lightning.metric import ModalityIntegrationRate

LayersArg = Sequence[nn.Module] | Callable[["pl.LightningModule"], Sequence[nn.Module]] | None


def _candidate_models(pl_module: nn.Module) -> Iterable[nn.Module]:
    yield pl_module
    for module in pl_module.modules():
        if module is not pl_module and hasattr(module, "config"):
            yield module


class MIRCallback(Callback):
    """Compute the Modality Integration Rate during validation and log it.

    During each validation run (never the sanity check, never training forwards) forward
    hooks on the LLM's layers feed a :class:`ModalityIntegrationRate` layer by layer, so no
    run ever holds all hidden states. At the end of the run MIR is computed (merged across
    ranks) and logged through ``pl_module.log`` as ``name`` (default ``"mir"``), with per-layer
    values as ``{name}/{stat}/layer_{k:02d}``, so every Lightning logger, ``EarlyStopping``
    and ``ModelCheckpoint`` see them. On TensorBoard it also writes a per-layer figure and a
    layer x step heatmap of the history (rank zero only). A failure inside the metric is a
    warning and a NaN value, never a crash.

    Args:
        layers: the modules whose outputs are the LLM's per-layer hidden states (a list,
            or a function of the LightningModule returning one). Default: found
            automatically for Hugging Face VLMs / causal LMs held by the LightningModule
            (decoder layers, the last replaced by the final norm, i.e. ``hidden_states[1:]``).
        masks: function of the batch returning ``(vision_mask, text_mask)`` bool ``[B, T]``.
            Default: ``batch["vision_mask"]``/``batch["text_mask"]`` when present, else masks
            built from ``batch["input_ids"]`` and the model's image-token id.
        probe_dataloader: a fixed probe set to run at the end of every validation run
            instead of capturing the validation batches (the paper's protocol). Batches
            are sharded across ranks without repetition.
        probe_step: how to run the model on a probe batch: ``probe_step(pl_module, batch)``.
            Default: ``pl_module(batch)``.
        source: ``"hooks"`` (default) or ``"step_output"``: read ``hidden_states`` (a
            ``[L, B, T, D]`` tensor or list of ``[B, T, D]``), ``vision_mask``, ``text_mask``
            from the dict returned by ``validation_step`` (for models that insert image
            tokens inside ``forward``, as the original LLaVA code does).
        layer_indices: track only these layers (indices or a slice such as
            ``slice(None, None, 2)``): the metric's memory scales with their number.
        image_token_id: overrides the id read from the model's config.
        text_tokens: ``"after_image"`` (official: text = tokens after the first image
            token) or ``"all"`` (every non-image, non-padding token), for id-built masks.
        name: logged key of MIR.
        log_layer_stats: per-layer statistics to log as scalars (keys of
            ``per_layer_stats()``); ``()`` for none.
        log_figures: write matplotlib figures to TensorBoard loggers.
        hidden_size: width D; inferred from the last hooked module when possible (needed
            up front under DDP so that ranks without batches can join the merge).
        metric_kwargs: passed to :class:`ModalityIntegrationRate` (``outlier_sigma``,
            ``sqrt_mode``, ``state_dtype``, ``max_outliers``...).
    """

    def __init__(
        self,
        layers: LayersArg = None,
        masks: Callable[[Any], tuple[Tensor, Tensor]] | None = None,
        *,
        probe_dataloader: Iterable | None = None,
        probe_step: Callable[["pl.LightningModule", Any], Any] | None = None,
        source: Literal["hooks", "step_output"] = "hooks",
        layer_indices: Sequence[int] | slice | None = None,
        image_token_id: int | None = None,
        text_tokens: Literal["after_image", "all"] = "after_image",
        name: str = "mir",
        log_layer_stats: Sequence[str] = ("fd", "norm_ratio"),
        log_figures: bool = True,
        hidden_size: int | None = None,
        **metric_kwargs: Any,
    ) -> None:
        super().__init__()
        if source not in ("hooks", "step_output"):
            raise ValueError(f"source must be 'hooks' or 'step_output', got {source!r}")
        if text_tokens not in ("after_image", "all"):
            raise ValueError(f"text_tokens must be 'after_image' or 'all', got {text_tokens!r}")
        self.layers = layers
        self.masks = masks
        self.probe_dataloader = probe_dataloader
        self.probe_step = probe_step
        self.source = source
        self.layer_indices = layer_indices
        self.image_token_id = image_token_id
        self.text_tokens = text_tokens
        self.name = name
        self.log_layer_stats = tuple(log_layer_stats)
        self.log_figures = log_figures
        self.hidden_size = hidden_size
        self.metric_kwargs = metric_kwargs
        self.metric: ModalityIntegrationRate | None = None
        self.history: list[dict[str, Any]] = []
        self._capture: LayerCapture | None = None
        self._layer_ids: list[int] = []
        self._masks: tuple[Tensor, Tensor] | None = None
        self._failure: str | None = None
        self._running = False

    # ------------------------------------------------------------------ set-up
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def _prepare(self, pl_module: "pl.LightningModule") -> None:
        """Find the layers and build the metric (at the first validation run, after
        ``configure_model``, so lazily built models are seen)."""
        modules = self._resolve_layers(pl_module)
        total = len(modules)
        ids = list(range(total))
        self._layer_ids = select_layers(ids, self.layer_indices) if self.layer_indices is not None else ids
        selected = [modules[i] for i in self._layer_ids]
        self._capture = LayerCapture(selected)
        if self.hidden_size is None:
            self.hidden_size = infer_hidden_size(selected)
        if self.hidden_size is not None:
            self._new_metric(len(selected), self.hidden_size, pl_module.device)

    def _resolve_layers(self, pl_module: "pl.LightningModule") -> list[nn.Module]:
        if self.layers is not None:
            modules = self.layers(pl_module) if callable(self.layers) and not isinstance(self.layers, nn.Module) else self.layers
            modules = list(modules)
            if not modules or not all(isinstance(m, nn.Module) for m in modules):
                raise ValueError("layers= must give a non-empty list of torch.nn.Module")
            if self.masks is None and self.image_token_id is None:
                self._auto_image_token(pl_module)
            return modules
        from mir_lightning.integrations.transformers import find_hidden_state_modules

        for candidate in _candidate_models(pl_module):
            try:
                modules = find_hidden_state_modules(candidate)
            except (ValueError, TypeError, AttributeError):
                continue
            if self.image_token_id is None and self.masks is None:
                self._auto_image_token(candidate)
            return list(modules)
        raise ValueError(
            f"MIRCallback could not find the LLM's decoder layers in {type(pl_module).__name__}: pass "
            "layers= (a list of modules, or a function of the LightningModule returning it) and, unless the "
            "batch holds 'vision_mask'/'text_mask', masks= (a function of the batch returning (vision_mask, text_mask))"
        )

    def _auto_image_token(self, model: nn.Module) -> None:
        from mir_lightning.integrations.transformers import find_image_token_id

        for candidate in _candidate_models(model):
            try:
                self.image_token_id = find_image_token_id(candidate)
                return
            except (ValueError, TypeError, AttributeError):
                continue

    def _new_metric(self, num_layers: int, hidden_size: int, device: torch.device) -> None:
        self.metric = ModalityIntegrationRate(num_layers, hidden_size, **self.metric_kwargs).to(device)

    # ------------------------------------------------------------------ capture
    def _resolve_masks(self, batch: Any) -> tuple[Tensor, Tensor]:
        if self.masks is not None:
            vision, text = self.masks(batch)
            return vision.bool(), text.bool()
        found = masks_in_batch(batch)
        if found is not None:
            return found
        if isinstance(batch, Mapping) and "input_ids" in batch and self.image_token_id is not None:
            from mir_lightning.integrations.transformers import build_masks

            return build_masks(batch["input_ids"], self.image_token_id, batch.get("attention_mask"), text=self.text_tokens)
        raise ValueError(
            "MIRCallback cannot tell vision from text tokens in this batch: give the batch 'vision_mask' and "
            "'text_mask' entries, or 'input_ids' with a model whose config has an image token id "
            "(or pass image_token_id=), or pass masks= (a function of the batch returning (vision_mask, text_mask))"
        )

    def _sink(self, index: int, hidden: Tensor) -> None:
        if self._failure is not None or self._masks is None:
            return
        try:
            if self.metric is None:
                self._new_metric(len(self._capture.modules), hidden.shape[-1], hidden.device)
            self.metric.update_layer(index, hidden, *self._masks)
        except Exception as err:  # never kill training: report at the end of the run
            self._failure = f"{type(err).__name__}: {err}"

    def _skip(self, trainer: "pl.Trainer") -> bool:
        return trainer.sanity_checking

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._skip(trainer):
            return
        if self.source == "hooks" and self._capture is None:
            self._prepare(pl_module)
        self._running = True
        self._failure = None
        if self.metric is not None:
            self.metric.reset()
        if self._capture is not None:
            self._capture.attach(self._sink)

    def on_validation_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._running or self.probe_dataloader is not None or self._capture is None:
            return
        self._begin_batch(batch)

    def _begin_batch(self, batch: Any) -> None:
        try:
            self._masks = self._resolve_masks(batch)
        except Exception as err:
            self._failure = self._failure or f"{type(err).__name__}: {err}"
            self._masks = None
        self._capture.active = self._masks is not None

    def _end_batch(self) -> None:
        if self._capture is not None:
            self._capture.active = False
        self._masks = None

    def on_validation_batch_end(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._running:
            return
        self._end_batch()
        if self.source == "step_output" and self._failure is None:
            self._update_from_output(outputs, pl_module)

    def _update_from_output(self, outputs: Any, pl_module: "pl.LightningModule") -> None:
        try:
            if not isinstance(outputs, Mapping) or "hidden_states" not in outputs:
                raise ValueError(
                    "source='step_output' needs validation_step to return a dict with 'hidden_states', "
                    "'vision_mask' and 'text_mask'"
                )
            hidden = outputs["hidden_states"]
            if self.layer_indices is not None:
                hidden = select_layers(list(hidden), self.layer_indices)
            if self.metric is None:
                self._new_metric(len(hidden), hidden[0].shape[-1], pl_module.device)
                self._layer_ids = list(range(len(hidden)))
            self.metric.update(hidden, outputs["vision_mask"].bool(), outputs["text_mask"].bool())
        except Exception as err:
            self._failure = f"{type(err).__name__}: {err}"

    def _run_probe(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        step = self.probe_step or (lambda module, batch: module(batch))
        batches = itertools.islice(iter(self.probe_dataloader), trainer.global_rank, None, max(trainer.world_size, 1))
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    batch = move_data_to_device(batch, pl_module.device)
                    self._begin_batch(batch)
                    try:
                        step(pl_module, batch)
                    finally:
                        self._end_batch()
        finally:
            pl_module.train(was_training)

    # ------------------------------------------------------------------ results
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._running:
            return
        self._running = False
        try:
            if self.probe_dataloader is not None and self._capture is not None:
                self._run_probe(trainer, pl_module)
        except Exception as err:
            self._failure = self._failure or f"{type(err).__name__}: {err}"
        finally:
            if self._capture is not None:
                self._capture.detach()
        # agree across ranks before any collective: a rank that failed (or has no metric)
        # must not leave the others waiting inside compute()'s merge
        problem = self._failure is not None or self.metric is None
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(problem, all=False) and not problem:
            self._failure = "another rank failed in this validation run"
        mir, stats = self._compute()
        step = self._logging_step(trainer)
        self._log(pl_module, mir, stats)
        self._record(step, mir, stats)
        if self.log_figures and trainer.is_global_zero and stats is not None:
            self._write_figures(trainer, step, stats)

    def _compute(self) -> tuple[float, dict[str, Tensor] | None]:
        if self.metric is None:
            rank_zero_warn(f"MIRCallback: no hidden states were captured in this validation run; {self.name} is NaN")
            return math.nan, None
        try:
            if self._failure is not None:
                raise RuntimeError(self._failure)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mir = float(self.metric.compute())
                stats = self.metric.per_layer_stats()
            for w in caught:
                rank_zero_warn(f"MIRCallback: {w.message}")
            return mir, stats
        except Exception as err:
            # every rank reaches this point, so no collective is left half-done here
            rank_zero_warn(f"MIRCallback: MIR could not be computed ({err}); logging NaN")
            return math.nan, None

    def _log(self, pl_module: "pl.LightningModule", mir: float, stats: dict[str, Tensor] | None) -> None:
        values = {self.name: mir}
        if stats is not None:
            for key in self.log_layer_stats:
                for layer_id, value in zip(self._layer_ids, stats[key].tolist()):
                    values[f"{self.name}/{key}/layer_{layer_id:02d}"] = value
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            for key, value in values.items():
                # identical on every rank already (the metric merged them): no sync needed
                pl_module.log(key, float(value), on_step=False, on_epoch=True, sync_dist=False, batch_size=1)

    @staticmethod
    def _logging_step(trainer: "pl.Trainer") -> int:
        if trainer.state.fn == "fit":
            return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
        return int(trainer.global_step)

    def _record(self, step: int, mir: float, stats: dict[str, Tensor] | None) -> None:
        # a resumed run re-validating at or before a recorded step replaces those entries
        self.history = [h for h in self.history if h["step"] < step]
        entry: dict[str, Any] = {"step": step, "mir": mir, "layers": list(self._layer_ids)}
        if stats is not None:
            entry.update({key: value.tolist() for key, value in stats.items()})
        self.history.append(entry)

    def _write_figures(self, trainer: "pl.Trainer", step: int, stats: dict[str, Tensor]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        try:
            from mir_lightning.plotting import history_heatmap, per_layer_figure
            import matplotlib.pyplot as plt
        except ImportError:
            return
        complete = [h for h in self.history if "fd" in h]
        figures = {f"{self.name}/per_layer": per_layer_figure({k: v.tolist() for k, v in stats.items()}, f"step {step}")}
        if complete:
            figures[f"{self.name}/history"] = history_heatmap([h["step"] for h in complete], [h["fd"] for h in complete])
        for logger in loggers:
            for tag, fig in figures.items():
                logger.experiment.add_figure(tag, fig, global_step=step, close=False)
        for fig in figures.values():
            plt.close(fig)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._capture is not None:
            self._capture.detach()
