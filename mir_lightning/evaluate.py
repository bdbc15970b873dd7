"""``evaluate_checkpoint``: the MIR of a saved Hugging Face vision-language checkpoint.

One image and one text per sample, as in the paper (arXiv 2410.07167): the prompt is a
user turn holding the image then the text (the processor's chat template when it has one,
else the image placeholder followed by the text). The hidden states of
every decoder layer (``hidden_states[1:]``: the last after the final norm) at the
image-token and text-token positions feed :class:`~mir_lightning.ModalityIntegrationRate`.

The measurement runs through :class:`~mir_lightning.MIRProbe` (the engine every trainer
adapter uses): forward hooks on the LLM's layers (equal to ``hidden_states[1:]``), and under
``torchrun`` batches dealt round-robin to the ranks (each sample once) with the same number
of forwards on every rank: a rank short of a batch runs a padding batch whose tokens are not
counted (sharded engines such as FSDP or ZeRO-3 gather parameters in every forward and hang
when ranks disagree). The probe loader is :func:`~mir_lightning.paper_probe` (the same
loader any adapter can use): images are decoded per batch, on the rank that runs it, so
memory does not grow with the number of samples.

Steps: :func:`read_checkpoint` (config, image token, processor), :func:`paper_probe`,
:func:`load_model`, :func:`parse_layers`, MoCa when asked, then :class:`MIRProbe`.
Problems with the input raise :class:`~mir_lightning.probe_data.InputError`, worded with the
keyword names of :func:`evaluate_checkpoint` (the command line words them as its flags).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mir_lightning import _distributed as D
from mir_lightning._progress import dependency_progress
from mir_lightning.measurement import FailureKind, MIRResult
from mir_lightning.metric import DEFAULT_MEDIAN_BUFFER
from mir_lightning.probe import MIRProbe, StateBudgetError
from mir_lightning.probe_data import InputError, ProbeBatches, ProbeSet, paper_probe

__all__ = [
    "COUNT_KEYS", "DTYPES", "Checkpoint", "EvaluationResult", "InputError", "ProbeBatches", "attach_moca",
    "evaluate_checkpoint", "llm_dimensions", "load_model", "load_model_and_processor", "parse_layers",
    "read_checkpoint", "resolve_device",
]

DTYPES = ("float32", "float16", "bfloat16")
COUNT_KEYS = ("n_vision", "n_text", "outliers_vision", "outliers_text", "nonfinite_vision", "nonfinite_text")
"""Per-layer statistics that are token counts (stored as ``int``)."""


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate_checkpoint` measured (identical on every rank).

    Attributes:
        mir: ``log10(sum_k FD_k)`` over the selected layers (NaN when undefined).
        layers: the selected decoder-layer ids, 0-based into ``hidden_states[1:]``.
        per_layer: per-layer statistics (``ModalityIntegrationRate.per_layer_stats`` keys),
            one value per entry of ``layers``; floats, except the :data:`COUNT_KEYS` (ints).
        num_samples: image+text samples measured (each once over all ranks).
        vision_tokens, text_tokens: tokens per layer and modality.
        skipped_images, skipped_texts: inputs skipped as unreadable / empty.
        model_class, model_layers, hidden_size, image_token_id: the model.
        device, world_size: where it ran.
        seconds: wall time of the evaluation (loading included).
        settings: the arguments of the call, as given.
    """

    mir: float
    layers: list[int]
    per_layer: dict[str, list[float] | list[int]]
    num_samples: int
    vision_tokens: int
    text_tokens: int
    model_class: str
    model_layers: int
    hidden_size: int
    image_token_id: int
    device: str
    world_size: int
    seconds: float
    image_source: str
    text_source: str
    skipped_images: list[str] = field(default_factory=list)
    skipped_texts: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_measurement(
        cls, measured: MIRResult, *, samples: ProbeSet, layers: list[int], **model_and_run: Any
    ) -> EvaluationResult:
        """The result of the probe run ``measured`` over ``samples`` on ``layers``;
        ``model_and_run``: the other fields (``model_class``, ``model_layers``, ``hidden_size``,
        ``image_token_id``, ``device``, ``world_size``, ``seconds``, ``settings``)."""
        per_layer = {
            key: [int(x) for x in values.tolist()] if key in COUNT_KEYS else [float(x) for x in values.tolist()]
            for key, values in measured.stats.items()
        }
        return cls(
            mir=measured.mir, layers=layers, per_layer=per_layer, num_samples=len(samples),
            vision_tokens=int(per_layer["n_vision"][0]), text_tokens=int(per_layer["n_text"][0]),
            image_source=samples.image_source, text_source=samples.text_source,
            skipped_images=list(samples.skipped_images), skipped_texts=list(samples.skipped_texts), **model_and_run,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of ``--out`` (non-finite floats become ``null``)."""
        import transformers

        import mir_lightning

        result = {
            "mir": self.mir,
            "layers": list(self.layers),
            "per_layer": self.per_layer,
            "counts": {
                "samples": self.num_samples,
                "skipped_images": len(self.skipped_images),
                "skipped_image_files": list(self.skipped_images),
                "skipped_text_files": len(self.skipped_texts),
                "vision_tokens": self.vision_tokens,
                "text_tokens": self.text_tokens,
                "model_layers": self.model_layers,
                "hidden_size": self.hidden_size,
            },
            "settings": {
                **self.settings,
                "model_class": self.model_class,
                "images": self.image_source,
                "texts": self.text_source,
                "device": self.device,
                "image_token_id": self.image_token_id,
                "world_size": self.world_size,
            },
            "seconds": self.seconds,
            "versions": {
                "mir_lightning": mir_lightning.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        }
        return _finite_or_none(result)


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


# --------------------------------------------------------------------------- arguments
def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """Layer indices (0-based into ``hidden_states[1:]``) from ``"0,1,5"``, ``"::2"``, ``"2:10"``,
    ``"-1"`` or a mix (``"0,4:8,-1"``); ``None`` or ``"all"`` selects all ``num_layers``.

    Returns:
        Sorted unique indices in ``[0, num_layers)``.

    Raises:
        InputError: on a malformed spec, an out-of-range index or an empty selection.
    """
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(range(num_layers))
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ":" in part:
                pieces = part.split(":")
                if len(pieces) > 3:
                    raise ValueError(part)
                chosen.update(range(num_layers)[slice(*(int(p) if p.strip() else None for p in pieces))])
            else:
                idx = int(part)
                if not -num_layers <= idx < num_layers:
                    raise InputError(
                        "{layers}: index {index} is out of range; the model has {count} layers (valid: "
                        "0..{last}, or negative from the end)",
                        index=idx, count=num_layers, last=num_layers - 1,
                    )
                chosen.add(idx % num_layers)
        except InputError:
            raise
        except ValueError as exc:
            raise InputError(
                "{layers}: cannot parse {part!r}; use comma-separated indices and slices, e.g. '0,1,5', '::2', "
                "'4:12', '-1'",
                part=part,
            ) from exc
    if not chosen:
        raise InputError("{layers=spec} selects no layer of the {count} layers", spec=spec, count=num_layers)
    return sorted(chosen)


def resolve_device(spec: str | None, local_rank: int = 0) -> torch.device:
    """The device of ``--device``: ``None`` is ``cuda`` when available else ``cpu``; ``cuda``
    is ``cuda:<local_rank>``; ``cuda:N`` is kept.

    Raises:
        InputError: for anything else, and for a CUDA device that does not exist.
    """
    if spec is None:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise InputError("{device} must be cpu, cuda or cuda:N, got {spec!r}", spec=spec) from exc
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise InputError("{device} must be cpu, cuda or cuda:N, got {spec!r}", spec=spec)
    if not torch.cuda.is_available():
        raise InputError(
            "{device=spec}: no CUDA device is available (torch.cuda.is_available() is False); use {device=cpu}",
            spec=spec, cpu="cpu",
        )
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise InputError("{device=spec}: CUDA device {index} does not exist ({visible} visible)", spec=spec,
                         index=index, visible=torch.cuda.device_count())
    return torch.device("cuda", index)


# --------------------------------------------------------------------------- model
def _check_model_dir(model_dir: str | os.PathLike) -> None:
    path = Path(model_dir)
    if not path.is_dir():
        raise InputError("{model_dir=path} is not a folder", path=str(model_dir))
    if not (path / "config.json").is_file():
        raise InputError("{model_dir=path} has no config.json; save the model with save_pretrained()", path=str(model_dir))


def _resolve_model_class(config: Any, arch: str, model_dir: str) -> Any:
    """``AutoModelForImageTextToText`` when it maps ``config``, else (also where transformers has
    no such auto class) the class the config names (only for configs with a ``vision_config``)."""
    import transformers

    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

        if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
            return transformers.AutoModelForImageTextToText
    except ImportError:  # transformers < 4.46 has no image-text-to-text auto class: the config's class
        pass
    if getattr(config, "vision_config", None) is not None:
        for name in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, name, None)
            if cls is not None and hasattr(cls, "from_pretrained"):
                return cls
    raise InputError.plain(
        f"unsupported architecture {arch} (model_type {config.model_type!r}) in {model_dir}: "
        "AutoModelForImageTextToText does not know it and its config has no vision_config. "
        "Supported: vision-language models whose image features sit at image-token positions "
        "(LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, PaliGemma, Gemma 3, ...); for "
        "other models use MIRCallback(layers=..., masks=...) or ModalityIntegrationRate directly"
    )


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder read up to its weights: the ``config``, its ``arch`` (for
    messages), ``image_token_id``, the ``model_class`` that loads it and its ``processor``."""

    model_dir: str
    config: Any
    arch: str
    image_token_id: int
    model_class: Any
    processor: Any


def read_checkpoint(model_dir: str | os.PathLike) -> Checkpoint:
    """Config and processor of a local folder (``local_files_only=True``), weights not read.

    Raises:
        InputError: not a folder, unreadable config or processor, no image token in the
            config, an unsupported architecture, a processor that does not process images.
    """
    import transformers

    from mir_lightning.models.transformers import find_image_token_id

    model_dir = str(model_dir)
    _check_model_dir(model_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError.plain(f"cannot read the model config in {model_dir}: {exc}") from exc
    arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    try:
        image_token_id = find_image_token_id(config)
    except ValueError as exc:
        raise InputError.plain(
            f"the model in {model_dir} ({arch}) has no image token in its config (image_token_id / "
            "image_token_index): it is not a vision-language model whose image features sit at "
            "image-token positions, so MIR cannot be measured on it"
        ) from exc
    model_class = _resolve_model_class(config, arch, model_dir)
    try:
        processor = transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError.plain(f"cannot load the processor of {model_dir} ({arch}): {type(exc).__name__}: {exc}") from exc
    if not callable(processor) or getattr(processor, "image_processor", None) is None:
        raise InputError(
            "the processor in {path} ({kind}) does not process images; save a multimodal processor there "
            "(processor.save_pretrained({model_dir}))",
            path=model_dir, kind=type(processor).__name__,
        )
    return Checkpoint(model_dir, config, arch, int(image_token_id), model_class, processor)


def load_model(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device) -> Any:
    """The model of ``checkpoint`` in ``dtype``, in eval mode on ``device``.

    Raises:
        InputError: the weights cannot be loaded.
    """
    import transformers

    # transformers >= 4.56 names it ``dtype``; older versions ``torch_dtype``
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        model = checkpoint.model_class.from_pretrained(checkpoint.model_dir, local_files_only=True, **{dtype_kw: dtype})
    except Exception as exc:  # noqa: BLE001
        raise InputError.plain(
            f"cannot load the model in {checkpoint.model_dir} ({checkpoint.arch}): {type(exc).__name__}: {exc}"
        ) from exc
    return model.to(device).eval()


def load_model_and_processor(model_dir: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, int]:
    """Processor and model of a local folder (:func:`read_checkpoint`, :func:`load_model`).

    Returns:
        ``(model, processor, image_token_id)``; the model is in eval mode on ``device``.
    """
    checkpoint = read_checkpoint(model_dir)
    return load_model(checkpoint, dtype, device), checkpoint.processor, checkpoint.image_token_id


def llm_dimensions(model: Any) -> tuple[int, int]:
    """``(num_layers, hidden_size)`` of the model's LLM (its text config).

    Raises:
        InputError: the text config has no ``num_hidden_layers`` / ``hidden_size``.
    """
    config = model.config
    if hasattr(config, "get_text_config"):
        text_config = config.get_text_config()
    else:  # transformers < 4.45: a VLM config holds its LLM's as text_config
        text_config = getattr(config, "text_config", None) or config
    try:
        return int(text_config.num_hidden_layers), int(text_config.hidden_size)
    except (AttributeError, TypeError) as exc:
        raise InputError.plain(
            f"unsupported architecture {type(model).__name__}: its text config has no num_hidden_layers / hidden_size"
        ) from exc


def _forward(model: Any, batch: Mapping[str, Any]) -> Any:
    """One probe forward; a failure is reported as the model and processor not matching."""
    try:
        return model(**batch)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError.plain(
            f"the forward pass of {type(model).__name__} failed ({type(exc).__name__}: {str(exc)[:500]}); the "
            "processor and the model may not match, or the architecture is not supported"
        ) from exc


@contextlib.contextmanager
def _process_group(device_spec: str | None) -> Iterator[tuple[int, int, torch.device]]:
    """Under torchrun (``WORLD_SIZE`` > 1) with no process group yet, create one (NCCL on CUDA,
    gloo on CPU) and destroy it on exit. Yields ``(rank, world_size, device)``."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not D.initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    try:
        yield *D.rank_world(), device
    finally:
        if created:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- evaluation
def evaluate_checkpoint(
    model_dir: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    texts: str | os.PathLike | None = None,
    num_samples: int = 100,
    batch_size: int = 4,
    device: str | None = None,
    dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    sqrt_mode: Literal["exact", "official_fast"] = "exact",
    layers: str | None = None,
    text_tokens: Literal["after_image", "all"] = "after_image",
    outlier_sigma: float | None = 3.0,
    max_outliers: int = 512,
    median_buffer: int = DEFAULT_MEDIAN_BUFFER,
    progress: bool = True,
    moca: str | os.PathLike | None = None,
    max_state_bytes: int | None = None,
) -> EvaluationResult:
    """Compute the MIR of the checkpoint in ``model_dir`` on ``num_samples`` image+text samples.

    Args:
        model_dir: a folder written by ``save_pretrained`` (model and processor).
        images: folder / single image / ``.txt`` list of paths; ``None``: built-in images.
        texts: folder of ``.txt`` / text file / ``.jsonl``; ``None``: built-in texts.
        num_samples, batch_size: samples in all, samples per forward.
        device: ``cpu``, ``cuda`` or ``cuda:N``; ``None``: CUDA when available.
        dtype: model dtype.
        sqrt_mode, outlier_sigma, max_outliers, median_buffer: passed to
            :class:`~mir_lightning.ModalityIntegrationRate`.
        layers: decoder-layer selection as :func:`parse_layers` reads it (``None``: all).
        text_tokens: ``after_image`` (text after the first image token, the official
            convention) or ``all`` non-image tokens.
        progress: show a progress bar (rank 0).
        max_state_bytes: the most metric state allowed at once; above it the layers are
            measured in passes over the probe set (see :class:`~mir_lightning.MIRProbe`,
            whose default on CUDA applies when ``None``).
        moca: MoCa parameters of a model trained with MoCa (:func:`~mir_lightning.moca.load_moca_state`
            reads them: a ``save_pretrained`` folder, ``model_dir`` itself included, a
            ``.safetensors`` file, or a ``torch.save`` / Lightning checkpoint); MoCa is attached
            to the loaded model before measuring, so MIR sees the calibrated hidden states.
            ``None``: no MoCa; a warning says so when the safetensors weights in ``model_dir``
            hold MoCa parameters (``from_pretrained`` drops them).

    Warnings (data skipped, few samples, the metric's) are issued on rank 0 only. Under
    ``torchrun`` every rank must call it; all return the same result.

    Raises:
        InputError: a problem with the inputs or the model (the message says what to change,
            naming the arguments of this function).
    """
    from tqdm.auto import tqdm

    settings = dict(
        model_dir=str(model_dir), num_samples=num_samples, batch_size=batch_size, dtype=dtype,
        sqrt_mode=sqrt_mode, layers=layers or "all", text_tokens=text_tokens, outlier_sigma=outlier_sigma,
        max_outliers=max_outliers, median_buffer=median_buffer, moca=None if moca is None else str(moca),
        max_state_bytes=max_state_bytes,
    )
    metric_options = dict(outlier_sigma=outlier_sigma, sqrt_mode=sqrt_mode, max_outliers=max_outliers,
                          median_buffer=median_buffer)
    start = time.perf_counter()
    _check_options(batch_size=batch_size, dtype=dtype, max_state_bytes=max_state_bytes, **metric_options)
    torch_dtype = getattr(torch, dtype)
    with _process_group(device) as (rank, world, dev), _warnings_on_rank_zero(rank):
        show_progress = progress and rank == 0
        checkpoint = read_checkpoint(model_dir)
        loader = paper_probe(checkpoint.processor, num_samples, batch_size, images=images, texts=texts,
                             dtype=torch_dtype, image_token_id=checkpoint.image_token_id)
        with dependency_progress(show_progress):
            model = load_model(checkpoint, torch_dtype, dev)
        num_layers, hidden_size = llm_dimensions(model)
        chosen = parse_layers(layers, num_layers)
        _calibrate(model, model_dir, moca)
        probe = MIRProbe(
            tqdm(loader, desc="MIR", unit="batch", disable=not show_progress),
            probe_step=_forward, image_token_id=checkpoint.image_token_id, layer_indices=chosen,
            text_tokens=text_tokens, hidden_size=hidden_size, max_state_bytes=max_state_bytes, **metric_options,
        )
        measured = _measure(probe, model)
    return EvaluationResult.from_measurement(
        measured, samples=loader.samples, layers=chosen, model_class=type(model).__name__, model_layers=num_layers,
        hidden_size=hidden_size, image_token_id=checkpoint.image_token_id, device=str(dev), world_size=world,
        seconds=time.perf_counter() - start, settings=settings,
    )


def _check_options(*, batch_size: int, dtype: str, outlier_sigma: float | None, max_outliers: int,
                   median_buffer: int, max_state_bytes: int | None = None, **_: Any) -> None:
    """Refuse option values the measurement cannot use, before anything is loaded."""
    if batch_size < 1:
        raise InputError("{batch_size} must be at least 1, got {n}", n=batch_size)
    if outlier_sigma is not None and not outlier_sigma > 0:
        raise InputError("{outlier_sigma} must be positive, got {value}", value=outlier_sigma)
    if max_outliers < 1:
        raise InputError("{max_outliers} must be at least 1, got {n}", n=max_outliers)
    if median_buffer < 1:
        raise InputError("{median_buffer} must be at least 1, got {n}", n=median_buffer)
    if dtype not in DTYPES:
        raise InputError("{dtype} must be one of {choices}, got {value!r}", choices=DTYPES, value=dtype)
    if max_state_bytes is not None and not max_state_bytes > 0:
        raise InputError("{max_state_bytes=value} must be positive", value=max_state_bytes)


@contextlib.contextmanager
def _warnings_on_rank_zero(rank: int) -> Iterator[None]:
    """Warnings raised inside are shown by rank 0 only (every rank meets the same ones)."""
    with warnings.catch_warnings():
        if rank != 0:
            warnings.simplefilter("ignore")
        yield


def _calibrate(model: torch.nn.Module, model_dir: str | os.PathLike, moca: str | os.PathLike | None) -> None:
    """Attach MoCa from ``moca``; without it, warn when ``model_dir`` holds MoCa weights."""
    if moca is not None:
        attach_moca(model, moca)
    elif _holds_moca(model_dir):
        warnings.warn(
            f"{model_dir} holds MoCa parameters (moca.scale / moca.shift) that loading the model drops: "
            f"this measures the model WITHOUT MoCa; to measure the calibrated model it was trained "
            f"as, pass --moca {model_dir} (evaluate_checkpoint(..., moca=MODEL_DIR) in Python)",
            stacklevel=3,
        )


def _measure(probe: MIRProbe, model: torch.nn.Module) -> MIRResult:
    """``probe.run(model)``, its failure raised.

    Raises:
        InputError: the layers cannot be found, or the probe failed on the input.
        RuntimeError: the probe failed otherwise.
    """
    try:
        measured = probe.run(model)
    except StateBudgetError as exc:
        raise InputError("{max_state_bytes}: {error}", error=exc) from exc
    except ValueError as exc:  # the layers cannot be found
        raise InputError.plain(f"unsupported architecture {type(model).__name__}: {exc}") from exc
    _raise_failure(measured)
    return measured


def attach_moca(model: torch.nn.Module, path: str | os.PathLike) -> Any:
    """Attach :class:`~mir_lightning.moca.MoCa` to ``model`` and load its parameters from ``path``.

    Returns:
        The attached MoCa (``model.moca``).

    Raises:
        InputError: ``path`` is missing or unreadable, holds no MoCa parameters, or holds
            parameters of another shape than the model's ``[num_layers, hidden_size]``; MoCa
            cannot be attached to the model.
    """
    from mir_lightning.moca import MoCa, load_moca_state

    try:
        state = load_moca_state(path)
    except FileNotFoundError as exc:
        raise InputError("{moca=path}: no such checkpoint ({error})", path=str(path), error=exc) from exc
    except KeyError as exc:
        raise InputError("{moca=path} holds no MoCa weights: {error}", path=str(path),
                         error=exc.args[0] if exc.args else exc) from exc
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files
        raise InputError("{moca=path}: cannot read MoCa weights ({error})", path=str(path),
                         error=f"{type(exc).__name__}: {exc}") from exc
    try:
        calibration = MoCa.attach(model)
    except (ValueError, RuntimeError) as exc:
        raise InputError("{moca}: cannot attach MoCa to {kind}: {error}", kind=type(model).__name__, error=exc) from exc
    expected = (calibration.num_layers, calibration.hidden_size)
    found = {name: tuple(value.shape) for name, value in state.items()}
    if any(shape != expected for shape in found.values()):
        calibration.remove()
        raise InputError(
            "{moca=path}: MoCa weights of shape {scale} (scale) / {shift} (shift) do not fit this model's {layers_} "
            "decoder layers of width {width}, i.e. [{layers_}, {width}]; they belong to another model",
            path=str(path), scale=found["scale"], shift=found["shift"], layers_=expected[0], width=expected[1],
        )
    calibration.load_state_dict(state)
    return calibration


def _holds_moca(model_dir: str | os.PathLike) -> bool:
    """True when the safetensors weights in ``model_dir`` hold MoCa parameters (only their key
    lists are read; a ``pytorch_model.bin`` is not loaded a second time just to look)."""
    from mir_lightning.moca import load_moca_state

    if not any((Path(model_dir) / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        return False
    try:
        load_moca_state(model_dir)
    except Exception:  # noqa: BLE001 - no MoCa keys, unreadable: nothing to say
        return False
    return True


# Failures of the probe's own batches and forwards (ProbeBatches and _forward raise InputError
# for every problem they find): the inputs or the model, not the measurement.
_INPUT_FAILURES = (FailureKind.LOADER, FailureKind.FORWARD)


def _raise_failure(measured: MIRResult) -> None:
    """Re-raise a failure the probe reported (of the same kind on every rank) as an exception:
    InputError for the probe set's batches and forwards, RuntimeError for the rest."""
    if measured.error is None:
        return
    if measured.error_kind in _INPUT_FAILURES:  # the message without the exception's type, as raised
        raise InputError.plain(measured.error.removeprefix(f"{InputError.__name__}: "))
    raise RuntimeError(f"the MIR measurement failed: {measured.error}")
