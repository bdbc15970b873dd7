"""Command line: ``mir-lightning evaluate MODEL_DIR`` (or ``python -m mir_lightning evaluate``).

A shell over :func:`mir_lightning.evaluate.evaluate_checkpoint`: parse the arguments, check
the output paths before any work, run it, and on rank 0 print MIR and the per-layer table
and write ``--out`` (JSON) and ``--plot`` (:func:`mir_lightning.plotting.per_layer_figure`).

User errors (bad paths, empty text files, too few samples, a missing output folder, a
CUDA device that does not exist, a model without image token or of an unsupported
architecture, ``--moca`` weights that are missing or do not fit the model) print one ``error:`` line and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mir_lightning import _distributed as D
from mir_lightning import evaluate
from mir_lightning._progress import on_terminal
from mir_lightning.evaluate import DTYPES, EvaluationResult, evaluate_checkpoint
from mir_lightning.metric import DEFAULT_MEDIAN_BUFFER
from mir_lightning.probe_data import NO_VALUE, InputError

__all__ = ["UserError", "build_parser", "command_line_spelling", "format_table", "main", "parse_layers"]

UserError = InputError
"""Alias kept for code that caught ``mir_lightning.cli.UserError``."""

EXIT_USER_ERROR = 2

STAT_COLUMNS = (
    ("fd", "FD", "{:.4g}"),
    ("mean_term", "mean", "{:.4g}"),
    ("trace_vision", "trV", "{:.4g}"),
    ("trace_text", "trT", "{:.4g}"),
    ("cross_term", "cross", "{:.4g}"),
    ("norm_ratio", "|V|/|T|", "{:.3g}"),
    ("n_vision", "nV", "{:d}"),
    ("n_text", "nT", "{:d}"),
    ("outliers_vision", "outV", "{:d}"),
    ("outliers_text", "outT", "{:d}"),
)

# the metric's warnings name its constructor arguments; say which options set them here
_OPTION_OF = {"max_outliers": "--max-outliers", "median_buffer": "--median-buffer"}


def command_line_spelling(name: str, value: Any) -> str:
    """An argument of :func:`~mir_lightning.evaluate.evaluate_checkpoint` as the command line
    writes it (:meth:`InputError.worded`): ``model_dir`` is ``MODEL_DIR``, ``num_samples``
    is ``--num-samples``; with a value, ``--num-samples 5``."""
    if name == "max_state_bytes":  # the command line gives the budget in GiB
        return "--max-state-gib" if value is NO_VALUE else f"--max-state-gib {value / 2**30:g}"
    flag = "MODEL_DIR" if name == "model_dir" else "--" + name.replace("_", "-")
    return flag if value is NO_VALUE else f"{flag} {value}"


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """:func:`mir_lightning.evaluate.parse_layers` of ``--layers``, its errors naming the option.

    Raises:
        InputError: worded for the command line.
    """
    try:
        return evaluate.parse_layers(spec, num_layers)
    except InputError as exc:
        raise InputError.plain(exc.worded(command_line_spelling)) from None


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
            "the paper's numbers. Images are decoded per batch: memory does not grow with "
            "--num-samples."
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
    ev.add_argument(
        "--device", default=None,
        help="cpu, cuda (under torchrun: cuda:LOCAL_RANK) or cuda:N; an error when that device does "
        "not exist (default: cuda when available, else cpu)",
    )
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
    ev.add_argument(
        "--max-outliers", type=int, default=512,
        help="high-norm outliers per layer and modality the 3-sigma rule replaces exactly (default 512); "
        "raise it when a warning says more were found",
    )
    ev.add_argument(
        "--median-buffer", type=int, default=DEFAULT_MEDIAN_BUFFER,
        help="tokens per layer and modality whose per-dimension median is exact (default 512; beyond, a "
        "histogram interpolates it); raise it above the token count for an exact result (4 x hidden size "
        "bytes per token and layer)",
    )
    ev.add_argument(
        "--moca", metavar="PATH", default=None,
        help="measure a model trained with MoCa (the paper's vision-token calibration): attach MoCa and load "
        "its scale/shift from PATH, a save_pretrained folder (MODEL_DIR itself when MoCa was saved with the "
        "model), a .safetensors file or a torch/Lightning checkpoint holding <prefix>moca.scale and "
        "<prefix>moca.shift. Default: no MoCa, also when MODEL_DIR holds MoCa parameters (loading the model "
        "drops them): then a warning says so and suggests --moca MODEL_DIR",
    )
    ev.add_argument(
        "--max-state-gib", type=float, default=None, metavar="GIB",
        help="the most metric state (GiB) held at once: above it the layers are measured in groups, the probe set "
        "running once per group (same result). Default: on CUDA half the free memory, none on CPU",
    )
    ev.add_argument("--out", help="write the result as JSON to this path (its folder must exist)")
    ev.add_argument("--plot", help="write a per-layer plot (PNG) to this path (its folder must exist; needs matplotlib)")
    ev.add_argument(
        "--no-progress", action="store_true",
        help="no progress bars (the measurement's and transformers' weight loading); without a terminal "
        "(stdout or stderr redirected) there are none either",
    )
    return parser


# --------------------------------------------------------------------------- output
def _fmt(value: float | int, spec: str) -> str:
    return "nan" if isinstance(value, float) and not math.isfinite(value) else spec.format(value)


def format_table(layers: Sequence[int], stats: dict[str, Sequence[float | int]]) -> str:
    """The per-layer table as text (one row per selected layer)."""
    header = ["layer"] + [title for _, title, _ in STAT_COLUMNS]
    rows = []
    for i, layer in enumerate(layers):
        row = [str(layer)]
        for key, _, spec in STAT_COLUMNS:
            row.append(_fmt(stats[key][i], spec) if key in stats else "-")
        rows.append(row)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _check_output_path(option: str, path: str | None) -> None:  # option: out, plot
    """Refuse an output path whose folder does not exist (nothing is created)."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise InputError("{" + option + "=path}: the folder {folder} does not exist; create it first", path=path,
                         folder=Path(path).parent)


def write_plot(path: str, result: EvaluationResult) -> None:
    """Save the per-layer figure of ``result`` (x axis: the real layer ids) as an image."""
    from mir_lightning.plotting import per_layer_figure

    fig = per_layer_figure(result.per_layer, title=f"MIR = {result.mir:.4f}", layers=result.layers)
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def report(result: EvaluationResult, out: str | None, plot: str | None) -> None:
    """Print MIR and the table; write ``out`` (JSON) and ``plot`` (PNG)."""
    print(
        f"model: {result.settings['model_dir']} ({result.model_class}), samples: {result.num_samples} "
        f"(images: {result.image_source}; texts: {result.text_source}), sqrt mode: "
        f"{result.settings['sqrt_mode']}, text tokens: {result.settings['text_tokens']}, "
        f"device: {result.device} x {result.world_size}, {result.seconds:.1f} s"
    )
    if result.settings.get("moca"):
        print(f"MoCa: attached, scale/shift from {result.settings['moca']}")
    if result.skipped_images:
        print(f"skipped images: {len(result.skipped_images)}")
    print(format_table(result.layers, result.per_layer))
    print(
        "FD = mean + trV + trT - cross (mean = ||mu_V - mu_T||^2, cross = 2 tr((S_V S_T)^1/2), all after "
        "text-centric scaling); |V|/|T| = mean vision / mean text token norm; nV, nT = tokens; "
        "outV, outT = rows replaced by the outlier rule"
    )
    fd = [v for v in result.per_layer["fd"] if math.isfinite(v)]
    mean = [v for v in result.per_layer["mean_term"] if math.isfinite(v)]
    if fd and sum(fd) > 0 and mean:
        print(f"mean term share of the FD sum: {sum(mean) / sum(fd):.1%}")
    print(f"MIR: {result.mir:.6f}")
    if out:
        Path(out).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    if plot:
        write_plot(plot, result)
        print(f"wrote {plot}")


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show warnings as ``warning: ...`` lines on stderr, naming the command's options."""

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = str(message)
        options = [opt for name, opt in _OPTION_OF.items() if name in text]
        if options:
            text += f" (command line: {' / '.join(options)})"
        print(f"warning: {text}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _rank() -> int:
    """This process's rank: the process group's when one is up, else torchrun's ``RANK``."""
    return D.rank() if D.initialized() else int(os.environ.get("RANK", "0"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mir-lightning``; returns the exit code (0 ok, 2 user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "evaluate":
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    try:
        _check_output_path("out", args.out)
        _check_output_path("plot", args.plot)
        if args.plot:
            if importlib.util.find_spec("matplotlib") is None:
                raise InputError("{plot} needs matplotlib: pip install matplotlib")
        with _warnings_as_lines():
            result = evaluate_checkpoint(
                args.model_dir, images=args.images, texts=args.texts, num_samples=args.num_samples,
                batch_size=args.batch_size, device=args.device, dtype=args.dtype, sqrt_mode=args.sqrt_mode,
                layers=args.layers, text_tokens=args.text_tokens, outlier_sigma=args.outlier_sigma,
                max_outliers=args.max_outliers, median_buffer=args.median_buffer,
                progress=not args.no_progress and on_terminal(),
                moca=args.moca,
                max_state_bytes=None if args.max_state_gib is None else int(args.max_state_gib * 2**30),
            )
        if _rank() == 0:
            report(result, args.out, args.plot)
    except InputError as exc:
        print(f"mir-lightning: error: {exc.worded(command_line_spelling)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("mir-lightning: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
