"""The package's warnings: each cause once per process, not once per probe.

A long training run measures MIR many times; a caveat of the measurement (a median read from a
histogram, more outliers than rows kept) is worth one line in the log, not one per probe.
:func:`warn_once` remembers the causes it has shown in a per-process set and never touches
Python's warnings registry or filters (a monitor must not change the warning state of the run
it watches). Where the caller asked to see every warning (the first matching warnings filter
says ``"always"``, as inside ``pytest.warns`` or ``catch_warnings`` + ``simplefilter("always")``)
a cause shown before is shown again. :func:`reset_warned` forgets all causes (for tests, or a
new run in the same process).
"""

from __future__ import annotations

import sys
import warnings
from typing import Hashable

__all__ = ["reset_warned", "warn_once"]

_shown: set[Hashable] = set()


def warn_once(cause: Hashable, message: str, category: type[Warning] = RuntimeWarning, stacklevel: int = 2) -> bool:
    """Emit ``message`` unless ``cause`` was shown before in this process; return whether it was emitted.

    ``cause``: a hashable key naming what the warning is about (kind, layer ids, modality...):
    a fresh cause warns, a repeated one does not. ``stacklevel`` as in :func:`warnings.warn`,
    counted from the caller of this function.
    """
    if cause in _shown and not _always_shown(message, category, stacklevel + 1):
        return False
    _shown.add(cause)
    warnings.warn(message, category, stacklevel=stacklevel + 1)
    return True


def reset_warned() -> None:
    """Forget every cause shown so far: each warns once more."""
    _shown.clear()


def _always_shown(message: str, category: type[Warning], stacklevel: int) -> bool:
    """Whether the first warnings filter matching this warning has the action ``"always"`` (read only)."""
    try:
        frame = sys._getframe(stacklevel)  # 0 is this function, 1 warn_once
        module, lineno = frame.f_globals.get("__name__", ""), frame.f_lineno
    except ValueError:
        module, lineno = "sys", 0
    for action, text, kind, module_pattern, line in warnings.filters:
        if text is not None and not text.match(message):
            continue
        if not issubclass(category, kind):
            continue
        if module_pattern is not None and not module_pattern.match(module):
            continue
        if line and line != lineno:
            continue
        return action == "always"
    return False
