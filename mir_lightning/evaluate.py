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
when ranks disagree). Images are decoded per batch, on the rank that runs it
(:class:`ProbeBatches`): memory does not grow with the number of samples.

Problems with the input raise :class:`~mir_lightning.probe_data.InputError`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mir_lightning import _distributed as D
from mir_lightning.measurement import FailureKind, MIRResult
from mir_lightning.probe import MIRProbe, StateBudgetError
from mir_lightning.probe_data import InputError, ProbeSet, probe_set

__all__ = [
    "COUNT_KEYS", "DTYPES", "EvaluationResult", "InputError", "ProbeBatches", "attach_moca", "evaluate_checkpoint",
    "parse_layers",
    "resolve_device",
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
                        f"--layers: index {idx} is out of range; the model has {num_layers} layers "
                        f"(valid: 0..{num_layers - 1}, or negative from the end)"
                    )
                chosen.add(idx % num_layers)
        except InputError:
            raise
        except ValueError as exc:
            raise InputError(
                f"--layers: cannot parse {part!r}; use comma-separated indices and slices, "
                "e.g. '0,1,5', '::2', '4:12', '-1'"
            ) from exc
    if not chosen:
        raise InputError(f"--layers {spec!r} selects no layer of the {num_layers} layers")
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
        raise InputError(f"--device must be cpu, cuda or cuda:N, got {spec!r}") from exc
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise InputError(f"--device must be cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        raise InputError(f"--device {spec}: no CUDA device is available (torch.cuda.is_available() is False); use --device cpu")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise InputError(f"--device {spec}: CUDA device {index} does not exist ({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


# --------------------------------------------------------------------------- model
def _check_model_dir(model_dir: str | os.PathLike) -> None:
    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(f"MODEL_DIR {model_dir} is not a folder")
    if not (path / "config.json").is_file():
        raise InputError(f"MODEL_DIR {model_dir} has no config.json; save the model with save_pretrained()")


def _resolve_model_class(config: Any, arch: str, model_dir: str) -> Any:
    """``AutoModelForImageTextToText`` when it maps ``config``, else the class the config names
    (only for configs with a ``vision_config``)."""
    import transformers

    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

        if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
            return transformers.AutoModelForImageTextToText
    except ImportError:  # pragma: no cover - layout of older transformers
        return transformers.AutoModelForImageTextToText
    if getattr(config, "vision_config", None) is not None:
        for name in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, name, None)
            if cls is not None and hasattr(cls, "from_pretrained"):
                return cls
    raise InputError(
        f"unsupported architecture {arch} (model_type {config.model_type!r}) in {model_dir}: "
        "AutoModelForImageTextToText does not know it and its config has no vision_config. "
        "Supported: vision-language models whose image features sit at image-token positions "
        "(LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, PaliGemma, Gemma 3, ...); for "
        "other models use MIRCallback(layers=..., masks=...) or ModalityIntegrationRate directly"
    )


def load_model_and_processor(model_dir: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, int]:
    """Processor and model of a local folder (``local_files_only=True``).

    Returns:
        ``(model, processor, image_token_id)``; the model is in eval mode on ``device``.

    Raises:
        InputError: unloadable config/processor/model, no image token, unsupported architecture.
    """
    import transformers

    from mir_lightning.models.transformers import find_image_token_id

    _check_model_dir(model_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read the model config in {model_dir}: {exc}") from exc
    arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    try:
        image_token_id = find_image_token_id(config)
    except ValueError as exc:
        raise InputError(
            f"the model in {model_dir} ({arch}) has no image token in its config (image_token_id / "
            "image_token_index): it is not a vision-language model whose image features sit at "
            "image-token positions, so MIR cannot be measured on it"
        ) from exc
    model_cls = _resolve_model_class(config, arch, model_dir)
    try:
        processor = transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot load the processor of {model_dir} ({arch}): {type(exc).__name__}: {exc}") from exc
    if not callable(processor) or getattr(processor, "image_processor", None) is None:
        raise InputError(
            f"the processor in {model_dir} ({type(processor).__name__}) does not process images; "
            "save a multimodal processor there (processor.save_pretrained(MODEL_DIR))"
        )
    # transformers >= 4.56 names it ``dtype``; older versions ``torch_dtype``
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        model = model_cls.from_pretrained(model_dir, local_files_only=True, **{dtype_kw: dtype})
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot load the model in {model_dir} ({arch}): {type(exc).__name__}: {exc}") from exc
    model.to(device).eval()
    return model, processor, image_token_id


def build_prompt(processor: Any, text: str) -> str:
    """One user turn with the image then ``text``: the chat template when the processor has one
    (with the assistant prefix appended, as the official script does), else the image
    placeholder followed by the text."""
    template = getattr(processor, "chat_template", None) or getattr(
        getattr(processor, "tokenizer", None), "chat_template", None
    )
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        try:
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"chat template failed ({exc}); using an image placeholder + text", stacklevel=2)
    placeholder = getattr(processor, "image_token", None) or "<image>"
    return f"{placeholder}{text}"


def encode_batch(processor: Any, samples: ProbeSet, indices: Sequence[int]) -> dict[str, Any]:
    """Decode the images of ``indices`` and run the processor on them (padding on); returns
    its outputs without ``labels``."""
    images = [samples.image(i) for i in indices]
    prompts = [build_prompt(processor, samples.texts[i]) for i in indices]
    errors = []
    for layout in ([[im] for im in images], images):  # nested (Idefics3/Gemma 3) first
        try:
            enc = processor(images=layout, text=prompts, padding=True, return_tensors="pt")
            break
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}")
    else:
        raise InputError(f"the processor failed on a batch: {' | '.join(errors)[:600]}")
    enc = dict(enc)
    enc.pop("labels", None)
    return enc


class _Batch(Mapping[str, Any]):
    """The processor's output for one batch of samples, computed when first read: a rank
    decodes only the images of the batches it runs (the probe skips the others unread)."""

    def __init__(self, encode: Callable[[], dict[str, Any]]) -> None:
        self._encode = encode
        self._data: dict[str, Any] | None = None

    def _get(self) -> dict[str, Any]:
        if self._data is None:
            self._data = self._encode()
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


class ProbeBatches(Sequence[Mapping[str, Any]]):
    """The probe loader of :func:`evaluate_checkpoint`: batch ``b`` holds samples
    ``b * batch_size ...`` of ``samples``, encoded by ``processor`` when read (floating
    tensors cast to ``dtype``). Holds no image: memory is flat in the number of samples.

    Raises (when a batch is read):
        InputError: the processor fails, or inserts no image token ``image_token_id``.
    """

    def __init__(self, samples: ProbeSet, processor: Any, batch_size: int, dtype: torch.dtype, image_token_id: int) -> None:
        self.samples, self.processor, self.batch_size = samples, processor, batch_size
        self.dtype, self.image_token_id = dtype, image_token_id

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def __getitem__(self, index: int) -> Mapping[str, Any]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.batch_size
        indices = range(start, min(start + self.batch_size, len(self.samples)))
        return _Batch(lambda: self._encode(indices))

    def _encode(self, indices: Sequence[int]) -> dict[str, Any]:
        enc = encode_batch(self.processor, self.samples, indices)
        if not bool((enc["input_ids"] == self.image_token_id).any()):
            raise InputError(
                f"no image token (id {self.image_token_id}) in the processed batch: the processor does not "
                "insert the model's image tokens"
            )
        return {k: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in enc.items()}


def _forward(model: Any, batch: Mapping[str, Any]) -> Any:
    """One probe forward; a failure is reported as the model and processor not matching."""
    try:
        return model(**batch)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(
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
    median_buffer: int = 512,
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
        InputError: a problem with the inputs or the model (the message says what to change).
    """
    from tqdm.auto import tqdm

    settings = dict(
        model_dir=str(model_dir), num_samples=num_samples, batch_size=batch_size, dtype=dtype,
        sqrt_mode=sqrt_mode, layers=layers or "all", text_tokens=text_tokens, outlier_sigma=outlier_sigma,
        max_outliers=max_outliers, median_buffer=median_buffer, moca=None if moca is None else str(moca),
        max_state_bytes=max_state_bytes,
    )
    start = time.perf_counter()
    _check_model_dir(model_dir)
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if outlier_sigma is not None and not outlier_sigma > 0:
        raise InputError(f"--outlier-sigma must be positive, got {outlier_sigma}")
    for name, value in (("--max-outliers", max_outliers), ("--median-buffer", median_buffer)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if max_state_bytes is not None and not max_state_bytes > 0:
        raise InputError(f"--max-state-gib must be positive, got {max_state_bytes / 2**30:g} GiB")
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    with _process_group(device) as (rank, world, dev), warnings.catch_warnings():
        if rank != 0:
            warnings.simplefilter("ignore")
        samples = probe_set(images, texts, num_samples)
        model, processor, image_token_id = load_model_and_processor(str(model_dir), torch_dtype, dev)
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        try:
            num_layers = int(text_config.num_hidden_layers)
            hidden_size = int(text_config.hidden_size)
        except (AttributeError, TypeError) as exc:
            raise InputError(
                f"unsupported architecture {type(model).__name__}: its text config has no "
                "num_hidden_layers / hidden_size"
            ) from exc
        chosen = parse_layers(layers, num_layers)
        if moca is not None:
            attach_moca(model, moca)
        elif _holds_moca(model_dir):
            warnings.warn(
                f"{model_dir} holds MoCa parameters (moca.scale / moca.shift) that loading the model drops: "
                f"this measures the model WITHOUT MoCa; to measure the calibrated model it was trained "
                f"as, pass --moca {model_dir} (evaluate_checkpoint(..., moca=MODEL_DIR) in Python)",
                stacklevel=2,
            )
        loader = ProbeBatches(samples, processor, batch_size, torch_dtype, image_token_id)
        probe = MIRProbe(
            tqdm(loader, desc="MIR", unit="batch", disable=rank != 0 or not progress),
            step=_forward, image_token_id=image_token_id, layer_indices=chosen, text_tokens=text_tokens,
            hidden_size=hidden_size, outlier_sigma=outlier_sigma, sqrt_mode=sqrt_mode,
            max_outliers=max_outliers, median_buffer=median_buffer, max_state_bytes=max_state_bytes,
        )
        try:
            measured = probe.run(model)
        except StateBudgetError as exc:
            raise InputError(f"--max-state-gib / max_state_bytes: {exc}") from exc
        except ValueError as exc:  # the layers cannot be found
            raise InputError(f"unsupported architecture {type(model).__name__}: {exc}") from exc
        _raise_failure(measured)
        mir = measured.mir
        stats = {k: v.tolist() for k, v in measured.stats.items()}
    per_layer = {k: [int(x) for x in v] if k in COUNT_KEYS else [float(x) for x in v] for k, v in stats.items()}
    return EvaluationResult(
        mir=mir,
        layers=chosen,
        per_layer=per_layer,
        num_samples=len(samples),
        vision_tokens=int(per_layer["n_vision"][0]),
        text_tokens=int(per_layer["n_text"][0]),
        model_class=type(model).__name__,
        model_layers=num_layers,
        hidden_size=hidden_size,
        image_token_id=int(image_token_id),
        device=str(dev),
        world_size=world,
        seconds=time.perf_counter() - start,
        image_source=samples.image_source,
        text_source=samples.text_source,
        skipped_images=list(samples.skipped_images),
        skipped_texts=list(samples.skipped_texts),
        settings=settings,
    )


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
        raise InputError(f"--moca {path}: no such checkpoint ({exc})") from exc
    except KeyError as exc:
        raise InputError(f"--moca {path} holds no MoCa weights: {exc.args[0] if exc.args else exc}") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files
        raise InputError(f"--moca {path}: cannot read MoCa weights ({type(exc).__name__}: {exc})") from exc
    try:
        calibration = MoCa.attach(model)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"--moca: cannot attach MoCa to {type(model).__name__}: {exc}") from exc
    expected = (calibration.num_layers, calibration.hidden_size)
    found = {name: tuple(value.shape) for name, value in state.items()}
    if any(shape != expected for shape in found.values()):
        calibration.remove()
        raise InputError(
            f"--moca {path}: MoCa weights of shape {found['scale']} (scale) / {found['shift']} (shift) do not fit "
            f"this model's {expected[0]} decoder layers of width {expected[1]}, i.e. [{expected[0]}, {expected[1]}]; "
            "they belong to another model"
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
        raise InputError(measured.error.removeprefix(f"{InputError.__name__}: "))
    raise RuntimeError(f"the MIR measurement failed: {measured.error}")
