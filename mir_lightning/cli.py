"""Command line: ``mir-lightning evaluate MODEL_DIR`` computes the MIR of a local checkpoint.

One image and one text per sample, as in the paper: the prompt is a user turn holding the
image then the text (built with the processor's chat template when it has one, else an
image placeholder followed by the text). The model runs with ``output_hidden_states=True``;
``hidden_states[1:]`` (one entry per decoder layer, the last after the final norm) of the
image-token and text-token positions feed :class:`~mir_lightning.ModalityIntegrationRate`.

Runs under ``torchrun --nproc_per_node N``: samples are sharded across ranks (each sample
once), the metric merges all ranks in ``compute()``, and rank 0 prints and writes.

User errors (bad paths, empty text files, too few samples, a model without image token or
of an unsupported architecture) print one ``error:`` line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DTYPES = ("float32", "float16", "bfloat16")
EXIT_USER_ERROR = 2

STAT_COLUMNS = (
    ("fd", "FD", "{:.4g}"),
    ("mean_term", "mean", "{:.4g}"),
    ("trace_vision", "trV", "{:.4g}"),
    ("trace_text", "trT", "{:.4g}"),
    ("cross_term", "cross", "{:.4g}"),
    ("norm_ratio", "|V|/|T|", "{:.3g}"),
    ("n_vision", "nV", "{:.0f}"),
    ("n_text", "nT", "{:.0f}"),
    ("outliers_vision", "outV", "{:.0f}"),
    ("outliers_text", "outT", "{:.0f}"),
)


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""


@dataclass
class Samples:
    """The evaluation set: ``images[i]`` (``PIL.Image``, RGB) goes with ``texts[i]``."""

    images: list[Any]
    texts: list[str]
    image_source: str
    text_source: str
    skipped_images: list[str] = field(default_factory=list)
    skipped_texts: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- parsing
def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """Layer indices (0-based into ``hidden_states[1:]``) from ``"0,1,5"``, ``"::2"``, ``"2:10"``,
    ``"-1"`` or a mix (``"0,4:8,-1"``); ``None`` or ``"all"`` selects all ``num_layers``.

    Returns:
        Sorted unique indices in ``[0, num_layers)``.

    Raises:
        UserError: on a malformed spec, an out-of-range index or an empty selection.
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
                nums = [int(p) if p.strip() else None for p in pieces]
                chosen.update(range(num_layers)[slice(*nums)])
            else:
                idx = int(part)
                if not -num_layers <= idx < num_layers:
                    raise UserError(
                        f"--layers: index {idx} is out of range; the model has {num_layers} layers "
                        f"(valid: 0..{num_layers - 1}, or negative from the end)"
                    )
                chosen.add(idx % num_layers)
        except ValueError as exc:
            raise UserError(
                f"--layers: cannot parse {part!r}; use comma-separated indices and slices, "
                "e.g. '0,1,5', '::2', '4:12', '-1'"
            ) from exc
    if not chosen:
        raise UserError(f"--layers {spec!r} selects no layer of the {num_layers} layers")
    return sorted(chosen)


def build_parser() -> argparse.ArgumentParser:
    """The ``mir-lightning`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="mir-lightning",
        description="Modality Integration Rate (MIR) of vision-language models.",
    )
    sub = parser.add_subparsers(dest="command")
    ev = sub.add_parser(
        "evaluate",
        help="compute the MIR of a local Hugging Face VLM checkpoint",
        description=(
            "Compute the MIR of a local Hugging Face vision-language checkpoint on image+text "
            "samples (one image and one unrelated text per sample, as in the paper). Without "
            "--images/--texts a built-in offline probe set is used (procedural images, "
            "English paragraphs): its values compare checkpoints with each other, not with "
            "the paper's numbers."
        ),
    )
    ev.add_argument("model_dir", metavar="MODEL_DIR", help="folder with config.json, weights and processor files")
    ev.add_argument(
        "--images",
        help="folder of images (sorted by name), a single image, or a .txt file listing image paths; "
        "unreadable images are skipped with a warning",
    )
    ev.add_argument(
        "--texts",
        help="folder of .txt files (one text each) or a text file: blank-line separated paragraphs, "
        "or one text per line when it has no blank lines; .jsonl: one {\"text\": ...} per line",
    )
    ev.add_argument("--num-samples", type=int, default=100, help="number of image+text samples (default 100)")
    ev.add_argument("--batch-size", type=int, default=4, help="samples per forward pass (default 4)")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    ev.add_argument(
        "--sqrt-mode",
        choices=("exact", "official_fast"),
        default="exact",
        help="exact: the true Frechet distance (default); official_fast: reproduce the official "
        "script's 'fast' mode (no square root, not the Frechet distance)",
    )
    ev.add_argument(
        "--layers",
        default=None,
        help="decoder layers to use, 0-based indices into hidden_states[1:]: '0,1,5', '::2', '4:12', "
        "'-1'; write negative lists as --layers=-2,-1 (default: all)",
    )
    ev.add_argument(
        "--text-tokens",
        choices=("after_image", "all"),
        default="after_image",
        help="after_image: non-image tokens after the first image token (official convention, "
        "default); all: every non-image token",
    )
    ev.add_argument("--outlier-sigma", type=float, default=3.0, help="outlier rule threshold in std (default 3)")
    ev.add_argument("--out", help="write the result as JSON to this path")
    ev.add_argument("--plot", help="write a per-layer plot (PNG) to this path (needs matplotlib)")
    ev.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return parser


# --------------------------------------------------------------------------- inputs
def _warn(message: str, rank: int = 0) -> None:
    if rank == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _image_paths(source: Path) -> list[Path]:
    if not source.exists():
        raise UserError(f"--images: {source} does not exist")
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise UserError(f"--images: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {source}")
        return paths
    if source.suffix.lower() in (".txt", ".lst"):
        lines = [ln.strip() for ln in source.read_text(encoding="utf-8").splitlines()]
        paths = [(source.parent / ln) if not os.path.isabs(ln) else Path(ln) for ln in lines if ln]
        if not paths:
            raise UserError(f"--images: the list {source} names no image")
        return paths
    return [source]


def load_images(source: Path, n: int, rank: int = 0) -> tuple[list[Any], list[str]]:
    """The first ``n`` readable images of ``source`` as RGB ``PIL.Image``; skips bad ones.

    Returns:
        ``(images, skipped)`` where ``skipped`` lists ``"path: reason"`` of the images
        that could not be read (before the ``n``-th good one).

    Raises:
        UserError: when ``source`` is missing or holds fewer than ``n`` readable images.
    """
    from PIL import Image

    paths = _image_paths(source)
    images: list[Any] = []
    skipped: list[str] = []
    for path in paths:
        if len(images) == n:
            break
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.convert("RGB"))
        except FileNotFoundError:
            skipped.append(f"{path}: missing")
            _warn(f"skipping image {path}: file not found", rank)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
            skipped.append(f"{path}: {type(exc).__name__}: {exc}")
            _warn(f"skipping unreadable image {path} ({type(exc).__name__}: {exc})", rank)
    if len(images) < n:
        raise UserError(
            f"--num-samples {n} asks for {n} samples but only {len(images)} readable images exist in "
            f"{source} ({len(skipped)} skipped); pass --num-samples {len(images)} or add images"
            if images
            else f"--images: no readable image in {source} ({len(skipped)} skipped)"
        )
    return images, skipped


def _texts_from_file(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--texts: {path} is not UTF-8 text ({exc})") from exc
    if not raw.strip():
        raise UserError(f"--texts: the text file {path} is empty")
    if path.suffix.lower() == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"--texts: {path} line {i} is not valid JSON ({exc.msg})") from exc
            text = obj.get("text") if isinstance(obj, dict) else obj if isinstance(obj, str) else None
            if not isinstance(text, str):
                raise UserError(f"--texts: {path} line {i} has no string field 'text'")
            if text.strip():
                texts.append(text.strip())
        return texts
    normalised = raw.replace("\r\n", "\n")
    blocks = [b.strip() for b in normalised.split("\n\n")]
    blocks = [" ".join(b.split("\n")).strip() for b in blocks if b.strip()]
    if len(blocks) > 1:
        return blocks
    return [ln.strip() for ln in normalised.splitlines() if ln.strip()]


def load_texts(source: Path, n: int, rank: int = 0) -> tuple[list[str], list[str]]:
    """The first ``n`` texts of a file or folder (see ``--texts``).

    Returns:
        ``(texts, skipped)``; ``skipped`` lists empty files of a folder.

    Raises:
        UserError: for a missing source, an empty file, or fewer than ``n`` texts.
    """
    if not source.exists():
        raise UserError(f"--texts: {source} does not exist")
    skipped: list[str] = []
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
        if not files:
            raise UserError(f"--texts: no .txt files in {source}")
        texts = []
        for p in files:
            if len(texts) == n:
                break
            body = p.read_text(encoding="utf-8", errors="replace").strip()
            if body:
                texts.append(" ".join(body.split()))
            else:
                skipped.append(str(p))
                _warn(f"skipping empty text file {p}", rank)
        if not texts:
            raise UserError(f"--texts: every .txt file in {source} is empty")
    else:
        texts = _texts_from_file(source)
    if len(texts) < n:
        raise UserError(
            f"--num-samples {n} asks for {n} samples but only {len(texts)} texts exist in {source}; "
            f"pass --num-samples {len(texts)} or add texts"
        )
    return texts[:n], skipped


def collect_samples(images: str | None, texts: str | None, n: int, rank: int = 0) -> Samples:
    """Pair ``n`` images with ``n`` texts (the built-in probe set fills in what is not given)."""
    from mir_lightning import probe_data

    if n < 1:
        raise UserError(f"--num-samples must be at least 1, got {n}")
    try:
        import PIL  # noqa: F401
    except ImportError as exc:
        raise UserError("mir-lightning evaluate needs Pillow to read images: pip install pillow") from exc
    if n < 20:
        _warn(f"{n} samples: the paper reports MIR stable from about 20 samples on", rank)
    if (images is None or texts is None) and n > probe_data.MAX_SAMPLES:
        raise UserError(
            f"--num-samples {n} asks for {n} samples but the built-in probe set has "
            f"{probe_data.MAX_SAMPLES}; pass --images and --texts for more"
        )
    if texts is not None:
        text_list, skipped_texts = load_texts(Path(texts), n, rank)
        text_source = str(texts)
    else:
        text_list, skipped_texts, text_source = probe_data.probe_texts(n), [], "built-in probe texts"
    if images is not None:
        image_list, skipped = load_images(Path(images), n, rank)
        image_source = str(images)
    else:
        image_list, skipped, image_source = probe_data.probe_images(n), [], "built-in procedural images"
    return Samples(image_list, text_list, image_source, text_source, skipped, skipped_texts)


# --------------------------------------------------------------------------- model
def check_model_dir(model_dir: str) -> None:
    """Raise :class:`UserError` unless ``model_dir`` is a folder with a ``config.json``."""
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"MODEL_DIR {model_dir} is not a folder")
    if not (path / "config.json").is_file():
        raise UserError(f"MODEL_DIR {model_dir} has no config.json; save the model with save_pretrained()")


def load_model_and_processor(model_dir: str, dtype: Any, device: Any) -> tuple[Any, Any, int]:
    """Load processor and model from a local folder (``local_files_only=True``).

    Returns:
        ``(model, processor, image_token_id)``; the model is in eval mode on ``device``.

    Raises:
        UserError: missing folder, unloadable processor, no image token, unsupported architecture.
    """
    import transformers

    from mir_lightning.integrations.transformers import find_image_token_id

    check_model_dir(model_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read the model config in {model_dir}: {exc}") from exc
    arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    try:
        image_token_id = find_image_token_id(config)
    except ValueError as exc:
        raise UserError(
            f"the model in {model_dir} ({arch}) has no image token in its config (image_token_id / "
            "image_token_index): it is not a vision-language model whose image features sit at "
            "image-token positions, so MIR cannot be measured on it"
        ) from exc
    model_cls = _resolve_model_class(config, arch, model_dir)
    try:
        processor = transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load the processor of {model_dir} ({arch}): {type(exc).__name__}: {exc}") from exc
    if not callable(processor) or getattr(processor, "image_processor", None) is None:
        raise UserError(
            f"the processor in {model_dir} ({type(processor).__name__}) does not process images; "
            "save a multimodal processor there (processor.save_pretrained(MODEL_DIR))"
        )
    # transformers >= 4.56 names it ``dtype``; older versions ``torch_dtype``
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        model = model_cls.from_pretrained(model_dir, local_files_only=True, **{dtype_kw: dtype})
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load the model in {model_dir} ({arch}): {type(exc).__name__}: {exc}") from exc
    model.to(device).eval()
    return model, processor, image_token_id


def _resolve_model_class(config: Any, arch: str, model_dir: str) -> Any:
    """``AutoModelForImageTextToText`` when it maps ``config``, else the class the config names
    (only for configs with a ``vision_config``). Raises :class:`UserError` otherwise."""
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
    raise UserError(
        f"unsupported architecture {arch} (model_type {config.model_type!r}) in {model_dir}: "
        "AutoModelForImageTextToText does not know it and its config has no vision_config. "
        "Supported: vision-language models whose image features sit at image-token positions "
        "(LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, PaliGemma, Gemma 3, ...); for "
        "other models use MIRCallback(layers=..., masks=...) or ModalityIntegrationRate directly"
    )


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


def encode_batch(processor: Any, images: list[Any], prompts: list[str]) -> dict[str, Any]:
    """Run the processor on one batch (padding on); returns its tensors (``labels`` dropped)."""
    errors = []
    for layout in ([[im] for im in images], list(images)):  # nested (Idefics3/Gemma 3) first
        try:
            enc = processor(images=layout, text=prompts, padding=True, return_tensors="pt")
            break
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}")
    else:
        raise UserError(f"the processor failed on a batch: {' | '.join(errors)[:600]}")
    enc = dict(enc)
    enc.pop("labels", None)
    return enc


# --------------------------------------------------------------------------- output
def _fmt(value: float, spec: str) -> str:
    return "nan" if not math.isfinite(value) else spec.format(value)


def format_table(layers: list[int], stats: dict[str, Any]) -> str:
    """The per-layer table as text (one row per selected layer)."""
    header = ["layer"] + [title for _, title, _ in STAT_COLUMNS]
    rows = []
    for i, layer in enumerate(layers):
        row = [str(layer)]
        for key, _, spec in STAT_COLUMNS:
            row.append(_fmt(float(stats[key][i]), spec) if key in stats else "-")
        rows.append(row)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_plot(path: str, layers: list[int], stats: dict[str, list[float]], mir: float) -> None:
    """Per-layer plot: FD and its mean term (log scale), and the vision/text norm ratio."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from exc
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(layers, stats["fd"], "o-", label="FD")
    if "mean_term" in stats:
        ax1.plot(layers, stats["mean_term"], "s--", label="mean term ||mu_V - mu_T||^2")
    if all(v is not None and v > 0 for v in stats["fd"]):
        ax1.set_yscale("log")
    ax1.set_ylabel("text-normalised FD")
    ax1.set_title(f"MIR = {mir:.4f}")
    ax1.legend()
    if "norm_ratio" in stats:
        ax2.plot(layers, stats["norm_ratio"], "o-", color="tab:red")
        ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_ylabel("mean |vision| / mean |text|")
    ax2.set_xlabel("decoder layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- evaluate
def _setup_distributed(device_arg: str | None) -> tuple[int, int, Any, bool]:
    """Init the process group under torchrun. Returns ``(rank, world_size, device, created)``."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg == "cuda" or (device_arg is None and torch.cuda.is_available())
    if device_arg not in (None, "cpu", "cuda") and not str(device_arg).startswith("cuda:"):
        raise UserError(f"--device must be cpu or cuda, got {device_arg!r}")
    if want_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    created = False
    if world > 1 and dist.is_available() and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        created = True
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if want_cuda:
        if str(device_arg).startswith("cuda:"):
            device = torch.device(device_arg)
        else:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return rank, world, device, created


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``evaluate`` and return the result dict (what ``--out`` writes); every rank returns it."""
    import torch
    from tqdm.auto import tqdm

    from mir_lightning.integrations.transformers import build_masks
    from mir_lightning.metric import ModalityIntegrationRate

    check_model_dir(args.model_dir)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.outlier_sigma is not None and not args.outlier_sigma > 0:
        raise UserError(f"--outlier-sigma must be positive, got {args.outlier_sigma}")
    rank, world, device, created = _setup_distributed(args.device)
    try:
        samples = collect_samples(args.images, args.texts, args.num_samples, rank)
        dtype = getattr(torch, args.dtype)
        model, processor, image_token_id = load_model_and_processor(args.model_dir, dtype, device)
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        try:
            num_layers = int(text_config.num_hidden_layers)
            hidden_size = int(text_config.hidden_size)
        except (AttributeError, TypeError) as exc:
            raise UserError(
                f"unsupported architecture {type(model).__name__}: its text config has no "
                "num_hidden_layers / hidden_size"
            ) from exc
        layers = parse_layers(args.layers, num_layers)

        mine = list(range(rank, len(samples.texts), world))  # each sample on exactly one rank
        metric = ModalityIntegrationRate(
            len(layers), hidden_size, outlier_sigma=args.outlier_sigma, sqrt_mode=args.sqrt_mode
        ).to(device)
        batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
        checked = False
        for idx in tqdm(batches, desc="MIR", unit="batch", disable=rank != 0 or args.no_progress):
            prompts = [build_prompt(processor, samples.texts[i]) for i in idx]
            enc = encode_batch(processor, [samples.images[i] for i in idx], prompts)
            enc = {
                k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                if isinstance(v, torch.Tensor)
                else v
                for k, v in enc.items()
            }
            try:
                with torch.inference_mode():
                    outputs = model(**enc, output_hidden_states=True, return_dict=True)
            except (TypeError, ValueError, RuntimeError) as exc:
                if checked:
                    raise
                raise UserError(
                    f"the forward pass of {type(model).__name__} failed on the first batch "
                    f"({type(exc).__name__}: {str(exc)[:500]}); the processor and the model in "
                    f"{args.model_dir} may not match, or the architecture is not supported"
                ) from exc
            hidden = getattr(outputs, "hidden_states", None)
            if hidden is None or not isinstance(hidden[0], torch.Tensor):
                raise UserError(
                    f"unsupported architecture {type(model).__name__}: its forward returns no "
                    "hidden_states of the language model"
                )
            if not checked:
                if len(hidden) != num_layers + 1 or hidden[-1].shape[-1] != hidden_size:
                    raise UserError(
                        f"unsupported architecture {type(model).__name__}: hidden_states has "
                        f"{len(hidden)} entries of width {hidden[-1].shape[-1]}, expected "
                        f"{num_layers + 1} of width {hidden_size} (num_hidden_layers + 1)"
                    )
                checked = True
            vision, text = build_masks(
                enc["input_ids"], image_token_id, enc.get("attention_mask"), text=args.text_tokens
            )
            if not bool(vision.any()):
                raise UserError(
                    f"no image token (id {image_token_id}) in the processed batch: the processor of "
                    f"{args.model_dir} does not insert the model's image tokens"
                )
            metric.update([hidden[1 + k] for k in layers], vision, text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if rank != 0 else "default")
            mir = float(metric.compute())
            stats = {k: [float(x) for x in v.detach().cpu().tolist()] for k, v in metric.per_layer_stats().items()}
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()

    import transformers

    import mir_lightning

    result = {
        "mir": mir,
        "layers": layers,
        "per_layer": stats,
        "counts": {
            "samples": len(samples.texts),
            "skipped_images": len(samples.skipped_images),
            "skipped_image_files": samples.skipped_images,
            "skipped_text_files": len(samples.skipped_texts),
            "vision_tokens": int(stats["n_vision"][0]) if stats.get("n_vision") else 0,
            "text_tokens": int(stats["n_text"][0]) if stats.get("n_text") else 0,
            "model_layers": num_layers,
            "hidden_size": hidden_size,
        },
        "settings": {
            "model_dir": str(args.model_dir),
            "model_class": type(model).__name__,
            "images": samples.image_source,
            "texts": samples.text_source,
            "num_samples": args.num_samples,
            "batch_size": args.batch_size,
            "device": str(device),
            "dtype": args.dtype,
            "sqrt_mode": args.sqrt_mode,
            "layers": args.layers or "all",
            "text_tokens": args.text_tokens,
            "outlier_sigma": args.outlier_sigma,
            "image_token_id": image_token_id,
            "world_size": world,
        },
        "versions": {
            "mir_lightning": getattr(mir_lightning, "__version__", "unknown"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    if rank == 0:
        report(result, args)
    return result


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    """Print MIR and the table; write ``--out`` and ``--plot`` (rank 0 only)."""
    counts, settings = result["counts"], result["settings"]
    print(
        f"model: {settings['model_dir']} ({settings['model_class']}), samples: {counts['samples']} "
        f"(images: {settings['images']}; texts: {settings['texts']}), sqrt mode: {settings['sqrt_mode']}, "
        f"text tokens: {settings['text_tokens']}"
    )
    if counts["skipped_images"]:
        print(f"skipped images: {counts['skipped_images']}")
    print(format_table(result["layers"], result["per_layer"]))
    print(
        "FD = mean + trV + trT - cross (mean = ||mu_V - mu_T||^2, cross = 2 tr((S_V S_T)^1/2), all after "
        "text-centric scaling); |V|/|T| = mean vision / mean text token norm; nV, nT = tokens; "
        "outV, outT = rows replaced by the outlier rule"
    )
    fd = [v for v in result["per_layer"].get("fd", []) if math.isfinite(v)]
    mean = [v for v in result["per_layer"].get("mean_term", []) if math.isfinite(v)]
    if fd and sum(fd) > 0 and mean:
        print(f"mean term share of the FD sum: {sum(mean) / sum(fd):.1%}")
    print(f"MIR: {result['mir']:.6f}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_jsonable(result), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        write_plot(args.plot, result["layers"], result["per_layer"], result["mir"])
        print(f"wrote {args.plot}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mir-lightning``; returns the exit code (0 ok, 2 user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "evaluate":
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    try:
        evaluate(args)
    except UserError as exc:
        print(f"mir-lightning: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("mir-lightning: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
