"""``MIRCallback``: MIR of the LLM's hidden states in Lightning, at validation runs or every N training steps."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from mir_lightning.capture import LayersArg
from mir_lightning.measurement import FailureKind, Measurement, MIRResult
from mir_lightning.plateau import MIRPlateau
from mir_lightning.probe import MIRProbe, renamed_argument
from mir_lightning.publish import MIRHistoryEntry, MIRPublisher


class MIRCallback(Callback):
    """Compute the Modality Integration Rate during training and log it.

    Where it measures:

    * by default, during each validation run (never the sanity check, never training
      forwards): forward hooks on the LLM's layers feed a :class:`ModalityIntegrationRate`
      layer by layer, so no run ever holds all hidden states;
    * with ``probe_dataloader``: on that fixed probe set (the paper's protocol) at the end of
      each validation run, through :class:`~mir_lightning.MIRProbe`;
    * with ``probe_dataloader`` and ``every_n_steps=N``: on the probe set every N
      optimizer steps during training, with or without a validation loop (and then not at
      validation runs).

    Every value is logged once per measurement, at ``trainer.global_step`` (the number of
    optimizer steps taken; a resumed run continues the same numbering), straight to every
    Lightning logger: ``name`` (default ``"mir"``) and per-layer values
    ``{name}_{stat}/layer_{k:02d}`` (k: the model's layer id). The same keys are put in
    ``trainer.callback_metrics``, where ``EarlyStopping``, ``MIREarlyStopping`` and
    ``ModelCheckpoint`` read them (``trainer.validate`` does not return them: read
    ``trainer.callback_metrics`` or :attr:`history`). On TensorBoard it also writes a
    per-layer figure and a layer x step heatmap of the history (rank zero only). A failure
    is a warning and a NaN value on every rank, never a crash.

    With ``early_stopping=MIRPlateau(patience, min_delta)`` training stops once the last
    ``patience + 1`` values lie within ``min_delta``, decided after every measurement through
    ``trainer.strategy.reduce_boolean_decision`` (every rank stops at the same step) and
    announced on rank zero. (:class:`~mir_lightning.MIREarlyStopping` does the same from
    ``trainer.callback_metrics``, with Lightning ``EarlyStopping``'s options.)

    Args:
        layers: the modules whose outputs are the LLM's per-layer hidden states (a list,
            or a function of the LightningModule returning one). Default: found
            automatically for Hugging Face VLMs / causal LMs held by the LightningModule
            (decoder layers, the last replaced by the final norm, i.e. ``hidden_states[1:]``).
        masks: function of the batch returning ``(vision_mask, text_mask)`` bool ``[B, T]``.
            Default: ``batch["vision_mask"]``/``batch["text_mask"]`` when present, else masks
            built from ``batch["input_ids"]`` and the model's image-token id (per sample
            when the batch holds ``position_ids`` or ``cu_seqlens`` of packed rows).
        probe_dataloader: a fixed probe set measured instead of the validation batches.
            Under DDP give every rank the same loader: batches are sharded across ranks
            without repetition, every rank running the same number of forwards.
        every_n_steps: measure the probe set every N optimizer steps during training
            (needs ``probe_dataloader``); ``None``: at validation runs. (``every_n_train_steps``
            is its former, deprecated name.)
        probe_step: how to run the model on a probe batch: ``probe_step(pl_module, batch)``.
            Default: ``pl_module(batch)`` (a LightningModule without ``forward`` needs one,
            e.g. ``lambda module, batch: module.model(**batch)``).
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
            ``per_layer_stats()``); ``()`` for none. Unknown keys are refused here.
        log_figures: write matplotlib figures to TensorBoard loggers.
        early_stopping: a :class:`~mir_lightning.MIRPlateau`, or None.
        hidden_size: width D; inferred when possible.
        max_state_bytes: the most metric state allowed at once (see
            :class:`~mir_lightning.MIRProbe`; with ``probe_dataloader`` the probe measures
            the layers in passes that fit, and its default on CUDA applies). Validation
            batches run once, so without ``probe_dataloader`` a state above it is a failure
            (NaN, with a warning saying so); no default budget there.
        metric_kwargs: passed to :class:`ModalityIntegrationRate` (``outlier_sigma``,
            ``sqrt_mode``, ``state_dtype``, ``max_outliers``...); other names are refused.
    """

    def __init__(
        self,
        layers: LayersArg = None,
        masks: Callable[[Any], tuple[Tensor, Tensor]] | None = None,
        *,
        probe_dataloader: Iterable | None = None,
        every_n_steps: int | None = None,
        probe_step: Callable[["pl.LightningModule", Any], Any] | None = None,
        source: Literal["hooks", "step_output"] = "hooks",
        layer_indices: Sequence[int] | slice | None = None,
        image_token_id: int | None = None,
        text_tokens: Literal["after_image", "all"] = "after_image",
        name: str = "mir",
        log_layer_stats: Sequence[str] = ("fd", "norm_ratio"),
        log_figures: bool = True,
        early_stopping: MIRPlateau | None = None,
        hidden_size: int | None = None,
        max_state_bytes: int | None = None,
        **metric_kwargs: Any,
    ) -> None:
        super().__init__()
        every_n_steps = renamed_argument(metric_kwargs, "every_n_train_steps", "every_n_steps", every_n_steps,
                                         "MIRCallback")
        if source not in ("hooks", "step_output"):
            raise ValueError(f"source must be 'hooks' or 'step_output', got {source!r}")
        if every_n_steps is not None:
            if probe_dataloader is None:
                raise ValueError("every_n_steps needs probe_dataloader= (the batches to measure during training)")
            if isinstance(every_n_steps, bool) or int(every_n_steps) != every_n_steps or every_n_steps < 1:
                raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if probe_dataloader is not None and source != "hooks":
            raise ValueError("probe_dataloader= measures through hooks: it cannot be combined with source='step_output'")
        self.publisher = MIRPublisher(name, log_layer_stats, log_figures=log_figures, early_stopping=early_stopping,
                                      owner="MIRCallback")
        self.probe_dataloader = probe_dataloader
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.probe_step = probe_step
        self.source = source
        self.layer_indices = layer_indices
        options = dict(layers=layers, masks=masks, image_token_id=image_token_id, layer_indices=layer_indices,
                       text_tokens=text_tokens, hidden_size=hidden_size)
        self.measurement = Measurement(**options, metric_kwargs=metric_kwargs, owner="MIRCallback")
        self.probe: MIRProbe | None = None
        self.max_state_bytes = max_state_bytes
        if probe_dataloader is not None:
            self.probe = MIRProbe(probe_dataloader, probe_step=probe_step or _call_module, max_state_bytes=max_state_bytes,
                                  **options, **metric_kwargs)
            self.measurement = self.probe.measurement
        self._running = False
        self._forwards = 0

    @property
    def name(self) -> str:
        """Logged key of MIR."""
        return self.publisher.tags.name

    @property
    def log_layer_stats(self) -> tuple[str, ...]:
        return self.publisher.tags.log_layer_stats

    @property
    def log_figures(self) -> bool:
        return self.publisher.log_figures

    @property
    def early_stopping(self) -> MIRPlateau | None:
        return self.publisher.early_stopping

    @property
    def every_n_train_steps(self) -> int | None:
        """Former name of :attr:`every_n_steps`."""
        return self.every_n_steps

    @property
    def history(self) -> list[MIRHistoryEntry]:
        """One entry per measurement, in step order (typed; also readable as the former dicts)."""
        return self.publisher.history

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @property
    def metric(self):  # noqa: ANN201 - ModalityIntegrationRate | None
        """The metric of the last measurement (its last pass), state released: see
        :attr:`MIRProbe.metric <mir_lightning.MIRProbe.metric>`."""
        return self.measurement.metric

    # ------------------------------------------------------------------ validation runs
    def _measures_validation(self, trainer: "pl.Trainer") -> bool:
        return not trainer.sanity_checking and self.every_n_steps is None

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._measures_validation(trainer):
            return
        self._running = True
        self._forwards = 0
        if self.probe is None:
            self.measurement.begin(pl_module if self.source == "hooks" else None)
            self._check_state_budget()

    def _check_state_budget(self) -> None:
        """Validation batches run once: a state above ``max_state_bytes`` cannot be split into passes."""
        m, budget = self.measurement, self.max_state_bytes
        if budget is None or m.hidden_size is None or not m.layer_ids:
            return
        needed = m.state_nbytes(len(m.layer_ids), m.hidden_size)
        if needed > budget:
            m.fail(f"the state of the {len(m.layer_ids)} measured layers ({needed:,} bytes) exceeds max_state_bytes="
                   f"{budget:,}, and validation batches cannot be run once per group of layers: give probe_dataloader= "
                   "(measured in passes) or fewer layer_indices=",
                   FailureKind.STATE_BUDGET)

    def on_validation_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._running and self.probe is None and self.source == "hooks":
            self.measurement.start_batch(batch)

    def on_validation_batch_end(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._running or self.probe is not None:
            return
        self._forwards += 1
        if self.source == "hooks":
            self.measurement.end_batch()
        elif not isinstance(outputs, Mapping) or "hidden_states" not in outputs:
            self.measurement.fail(
                "source='step_output' needs validation_step to return a dict with 'hidden_states', 'vision_mask' "
                "and 'text_mask'",
                FailureKind.STEP_OUTPUT,
            )
        else:
            self.measurement.feed(outputs["hidden_states"], outputs["vision_mask"], outputs["text_mask"])

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._running:
            return
        self._running = False
        if self.probe is not None:
            result = self._run_probe(trainer, pl_module)
        else:
            result = self.measurement.finish(self._forwards)
        self._publish(trainer, result)

    # ------------------------------------------------------------------ training steps
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n, step = self.every_n_steps, trainer.global_step
        if n is None or step == 0 or step % n or step <= self.publisher.last_step:
            return  # (several micro-batches share a step under gradient accumulation)
        self._publish(trainer, self._run_probe(trainer, pl_module))
        for listener in trainer.callbacks:  # e.g. MIREarlyStopping: decide at this step, in any callback order
            hook = getattr(listener, "on_mir_measurement", None)
            if listener is not self and callable(hook):
                hook(trainer, self.name)

    def _run_probe(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> MIRResult:
        return self.probe.run(self._probe_model(trainer, pl_module))

    def _probe_model(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> nn.Module:
        """What the probe's forwards go through: Lightning's root FSDP1 wrapper when the strategy
        put one around the module (its forward unshards the root's own parameters; calling the
        LightningModule directly would meet flat shards), else the LightningModule. A custom
        ``probe_step`` always receives the LightningModule, as documented."""
        wrapped = getattr(trainer.strategy, "model", None)
        if self.probe_step is None and wrapped is not pl_module and wrapped is not None:
            from torch.distributed.fsdp import FullyShardedDataParallel

            if isinstance(wrapped, FullyShardedDataParallel) and wrapped.module is pl_module:
                return wrapped
        return pl_module

    # ------------------------------------------------------------------ results
    def _publish(self, trainer: "pl.Trainer", result: MIRResult) -> None:
        """Log, record and plot one measurement at ``trainer.global_step``; apply the plateau rule."""
        published = self.publisher.publish(int(trainer.global_step), result)
        entry = published.entry
        if entry.error is not None:
            rank_zero_warn(self.publisher.failure_message(entry))
        # identical on every rank already (the metric merged them): no sync needed
        trainer.callback_metrics.update(
            {key: torch.tensor(value, dtype=torch.float64) for key, value in published.scalars.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(published.scalars, step=entry.step)
            self.publisher.write_figures(entry, _tensorboard_writers(trainer))
        if self.early_stopping is not None:
            stop = trainer.strategy.reduce_boolean_decision(published.stop, all=False)
            if stop:
                trainer.should_stop = True
                rank_zero_info(published.stop_reason or f"MIRCallback: stopping training at step {entry.step}")

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return self.publisher.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.publisher.load_state_dict(state_dict)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.measurement.detach()
        self.measurement.release()  # a run interrupted inside a measurement leaves no state behind


def _tensorboard_writers(trainer: "pl.Trainer") -> list[Any]:
    """The ``SummaryWriter`` of each TensorBoard logger of ``trainer``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def _call_module(module: nn.Module, batch: Any) -> Any:
    """Lightning's default probe step: ``pl_module(batch)``."""
    if isinstance(module, pl.LightningModule) and type(module).forward is pl.LightningModule.forward:
        raise TypeError(
            f"{type(module).__name__} defines no forward(), which the probe calls by default: pass "
            "MIRCallback(probe_step=lambda module, batch: module.model(**batch)) (how to run one probe batch)"
        )
    return module(batch)
