"""The reference itself: its error against committed 40-digit mpmath values, and its spec knobs.

``benchmarks/mpmath_reference.py`` computed the FD terms of bit-reproducible token sets
(``reference.exact_tokens``) with exact rational moments and 40-digit eigenvalues and wrote
``benchmarks/mpmath_reference.json``. Here the tokens are regenerated (their hash must match),
and the float64 reference and the package are compared with those values, so the reference's
own error is measured on every machine that runs the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mir_lightning import ModalityIntegrationRate
from reference import (
    column_median,
    exact_tokens,
    outlier_rule,
    reference_layer,
    stream_layer,
    token_hash,
)

RECORD = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "mpmath_reference.json").read_text())
CASES = RECORD["cases"]

# Measured (the JSON records it): the reference's FD is within 3.6e-15 of mpmath on the
# ill-conditioned case (condition ~1e11, sink rows) and 6.9e-13 with fewer vision rows than
# dimensions; 1e-11 is 14x the worst. Every test that compares the package with the reference
# uses a tolerance >= 1e-10, so this bound keeps each >= 10x the reference's own error.
REFERENCE_FD_RTOL = 1e-11
# Its terms: mean and traces are within 5e-16 (1e-14 here). The cross term 2 tr((S_v S_t)^(1/2))
# is within 2.2e-15 for full-rank covariances but only 7e-10 for a singular S_v with the rule
# on (square roots of rounding-level eigenvalues): the FD is computed without it (Bures form).
REFERENCE_TERM_RTOL = {"mean_term": 1e-14, "trace_vision": 1e-14, "trace_text": 1e-14, "cross_term": 1e-8}
# The package on the same cases: measured <= 5.9e-13 (test_metric.EXACT_RTOL).
PACKAGE_FD_RTOL = 1e-10


def rel(value: float, exact: str) -> float:
    exact_value = float(exact)  # the 30-digit record rounded to float64: 1e-16 relative
    return abs(value - exact_value) / abs(exact_value)


def case_id(case: dict) -> str:
    return f"{case['name']}-sigma={case['sigma']}"


def tokens(case: dict) -> tuple[np.ndarray, np.ndarray]:
    vision, text = exact_tokens(case["seed"], case["n_vision"], case["n_text"], case["dim"])
    assert token_hash(vision, text) == case["sha256"], "the token generator no longer makes the recorded tokens"
    return vision, text


def test_the_record_covers_hard_cases():
    names = {(c["name"], c["sigma"]) for c in CASES}
    assert names == {(n, s) for n in ("ill_conditioned", "fewer_vision_rows_than_dims") for s in (None, 3.0)}
    # the old scipy.linalg.sqrtm route was measurably worse on these: why the reference changed
    worst_sqrtm = max(c["scipy_sqrtm_fd_rel_err"] for c in CASES)
    assert worst_sqrtm > 100 * REFERENCE_FD_RTOL


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_against_mpmath(case):
    vision, text = tokens(case)
    got = reference_layer(vision, text, case["sigma"])
    assert (got["outliers_vision"], got["outliers_text"]) == (case["outliers_vision"], case["outliers_text"])
    assert rel(got["fd"], case["mpmath"]["fd"]) < REFERENCE_FD_RTOL
    for key, rtol in REFERENCE_TERM_RTOL.items():
        assert rel(got[key], case["mpmath"][key]) < rtol, key


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_package_against_mpmath(case):
    vision, text = tokens(case)
    metric = ModalityIntegrationRate(1, case["dim"], outlier_sigma=case["sigma"])
    stream_layer(metric, 0, torch.from_numpy(vision), torch.from_numpy(text), chunk=100)
    stats = metric.per_layer_stats()
    assert (stats["outliers_vision"][0], stats["outliers_text"][0]) == (case["outliers_vision"], case["outliers_text"])
    assert rel(float(stats["fd"][0]), case["mpmath"]["fd"]) < PACKAGE_FD_RTOL


def test_medians_follow_torch_and_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    assert torch.equal(column_median(x, "lower"), x.median(dim=0).values)
    np.testing.assert_array_equal(column_median(x, "midpoint").numpy(), np.median(x.numpy(), axis=0))
    assert torch.equal(column_median(x[:9], "midpoint"), column_median(x[:9], "lower"))  # odd count: one middle


def test_outlier_rule_replaces_by_the_median_row_and_limits_replacements():
    x = torch.ones(20, 2, dtype=torch.float64) + torch.linspace(0, 0.1, 20, dtype=torch.float64)[:, None]
    x[3] *= 100.0
    x[7] *= 50.0
    out, count = outlier_rule(x, 3.0)
    # std with both far rows is ~25: only the farther one is beyond 3 std of the median norm
    assert count == 1 and torch.equal(out[3], x.median(dim=0).values) and torch.equal(out[7], x[7])
    out, count = outlier_rule(x, 1.0, max_replaced=1)
    assert count == 1 and torch.equal(out[3], x.median(dim=0).values) and torch.equal(out[7], x[7])
    out, count = outlier_rule(x, 1.0)
    assert count == 2 and torch.equal(out[7], x.median(dim=0).values)
    assert outlier_rule(x, None)[1] == 0


def test_bures_form_equals_the_trace_form_on_a_well_conditioned_case():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(200, 6, generator=g, dtype=torch.float64) * 2 + 1
    t = torch.randn(300, 6, generator=g, dtype=torch.float64)
    d = reference_layer(v, t, None)
    # condition ~10: both forms are accurate to ~1e-15 here
    trace_form = d["mean_term"] + d["trace_vision"] + d["trace_text"] - d["cross_term"]
    assert abs(d["fd"] - trace_form) < 1e-13 * d["fd"]
