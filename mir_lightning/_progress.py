"""Progress bars of the libraries the package drives (transformers' weight loading, its GGUF
de-quantisation, huggingface_hub): on at a terminal, off otherwise or when asked.

A bar redrawn with carriage returns is noise in a log file, CI output or a pipe, so the
command line and the examples show bars only when both stdout and stderr are terminals
(:func:`on_terminal`) and ``--no-progress`` is not given.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator

__all__ = ["dependency_progress", "on_terminal"]


def on_terminal() -> bool:
    """True when stdout and stderr are both terminals (a person is watching the output)."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


@contextlib.contextmanager
def dependency_progress(enabled: bool) -> Iterator[None]:
    """Inside: transformers' and huggingface_hub's progress bars (weight loading, downloads,
    GGUF de-quantisation) off unless ``enabled``. The previous settings are restored on exit;
    ``enabled=True`` changes nothing (a bar the user switched off stays off)."""
    if enabled:
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # nothing of transformers will draw a bar
        yield
        return
    import huggingface_hub.utils as hub_utils

    was_on, hub_was_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    gguf = _gguf_module()
    gguf_bar = getattr(gguf, "tqdm", None)
    hf_logging.disable_progress_bar()
    if gguf_bar is not None:  # this module calls tqdm itself, outside transformers' switch
        gguf.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        if gguf_bar is not None:
            gguf.tqdm = gguf_bar
        if was_on:
            hf_logging.enable_progress_bar()  # also re-enables huggingface_hub's
        if hub_was_off:
            hub_utils.disable_progress_bars()


def _gguf_module():  # noqa: ANN202 - a module or None
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf
    except Exception:  # noqa: BLE001 - absent in old transformers, or its imports fail
        return None
    return gguf
