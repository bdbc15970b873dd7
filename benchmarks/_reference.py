"""The benchmarks' reference math: a re-export of ``tests/reference.py``, the repository's one
independent implementation of the MIR spec (float64 by default, torch, cancellation-free
Frechet distance). ``feed`` streams one layer's tokens into ``metric.update_layer``."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from reference import (  # noqa: E402,F401
    bures_fd,
    bures_terms,
    exact_tokens,
    layer_stats,
    llm_like_hidden,
    mean_cov,
    outlier_rule,
    reference_layer,
    reference_mir,
    sqrt_sym,
    token_hash,
)
from reference import stream_layer as feed  # noqa: E402,F401
from reference import stream_layer  # noqa: E402,F401

__all__ = ["bures_fd", "bures_terms", "exact_tokens", "feed", "layer_stats", "llm_like_hidden", "mean_cov",
           "outlier_rule", "reference_layer", "reference_mir", "sqrt_sym", "stream_layer",
           "token_hash"]
