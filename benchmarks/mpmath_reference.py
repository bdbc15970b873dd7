"""High-precision MIR values that measure the error of the float64 reference (and of the package).

The float64 reference of the tests (``tests/reference.py``) is itself rounded. This script
computes the spec's per-layer FD terms from the same tokens with exact rational arithmetic
(Python integers: every float64 token is a dyadic rational) for the means, covariances and
norms, and 40-digit mpmath for the square roots and the symmetric eigenvalues, then records:

* ``cases``: bit-reproducible token sets (``reference.exact_tokens``: ill-conditioned with
  attention-sink rows, and fewer vision rows than dimensions), each with and without the
  3-sigma rule: the mpmath terms, the relative error of the float64 reference, of the
  eigenvalue route ``tr S1 + tr S2 - 2 sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``, of the old
  ``scipy.linalg.sqrtm`` route, and of the package (``ModalityIntegrationRate``).
  ``tests/test_reference.py`` regenerates the tokens, checks their hash and compares the
  reference and the package with these values.
* ``test_cases`` (``--test-cases``): the same errors on the token sets of
  ``tests/test_metric.py`` (their ``llm_like_hidden`` data go through LAPACK, so they are a
  record of this machine, not checked by tests): the measured basis of its tolerances.

    python benchmarks/mpmath_reference.py                 # cases only, about 1 minute
    python benchmarks/mpmath_reference.py --test-cases    # also the test suite's cases, a few minutes

writes ``benchmarks/mpmath_reference.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import mpmath
import numpy as np
import scipy
import scipy.linalg
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import cpu_model  # noqa: E402
from _reference import (  # noqa: E402
    exact_tokens,
    layer_stats,
    llm_like_hidden,
    reference_layer,
    stream_layer,
    token_hash,
)

from mir_lightning import ModalityIntegrationRate  # noqa: E402

DPS = 40
OUTPUT = HERE / "mpmath_reference.json"
TERMS = ("fd", "mean_term", "trace_vision", "trace_text", "cross_term")

# bit-reproducible cases: (name, seed, n_vision, n_text, dim)
CASES = (
    ("ill_conditioned", 0, 256, 400, 48),
    ("fewer_vision_rows_than_dims", 1, 40, 300, 64),
)


class ExactRows:
    """Rows of a float64 matrix as Python integers times one power of two (exact)."""

    def __init__(self, x: np.ndarray):
        x = np.asarray(x, dtype=np.float64)
        mant, expo = np.frexp(x)
        ints = (mant * 2.0**53).astype(np.int64)  # exact: |mant| < 1
        expo = expo.astype(np.int64) - 53
        self.exp = int(expo[ints != 0].min()) if np.any(ints != 0) else 0
        self.ints = np.empty(x.shape, dtype=object)
        for idx, (m, e) in enumerate(zip(ints.ravel().tolist(), expo.ravel().tolist())):
            self.ints.flat[idx] = m << (e - self.exp) if m else 0
        self.n, self.dim = x.shape

    def squared_norms(self) -> list[int]:
        return [sum(v * v for v in row) for row in self.ints.tolist()]


def _mpf_ratio(num: int, den: int, exp2: int) -> mpmath.mpf:
    return mpmath.mpf(num) / den * mpmath.power(2, exp2)


def exact_outlier_rule(x: np.ndarray, sigma: float | None) -> tuple[np.ndarray, int, mpmath.mpf]:
    """The 3-sigma rule decided in high precision (the decision is scale free, so it is made
    before the text-centric scale). Returns ``(x', replaced rows, mean norm)``."""
    rows = ExactRows(x)
    sq = rows.squared_norms()
    norms = [mpmath.sqrt(mpmath.mpf(s)) * mpmath.power(2, rows.exp) for s in sq]
    mean_norm = mpmath.fsum(norms) / len(norms)
    if sigma is None:
        return x, 0, mean_norm
    order = sorted(range(len(sq)), key=sq.__getitem__)
    median = norms[order[(len(sq) - 1) // 2]]
    std = mpmath.sqrt(mpmath.fsum((v - mean_norm) ** 2 for v in norms) / (len(norms) - 1))
    mask = np.array([abs(v - median) > sigma * std for v in norms])
    if not mask.any():
        return x, 0, mean_norm
    out = x.copy()
    out[mask] = np.sort(x, axis=0)[(len(x) - 1) // 2]  # exact selection: the lower median row
    return out, int(mask.sum()), mean_norm


def exact_moments(x: np.ndarray) -> tuple[mpmath.matrix, mpmath.matrix]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]``, exact rationals rounded once to mpf."""
    rows = ExactRows(x)
    n = rows.n
    total = rows.ints.sum(axis=0)
    gram = rows.ints.T.dot(rows.ints)
    mean = mpmath.matrix([_mpf_ratio(int(s), n, rows.exp) for s in total])
    cov = mpmath.matrix(rows.dim, rows.dim)
    for i in range(rows.dim):
        for j in range(i, rows.dim):
            num = n * int(gram[i, j]) - int(total[i]) * int(total[j])
            cov[i, j] = cov[j, i] = _mpf_ratio(num, n * (n - 1), 2 * rows.exp)
    return mean, cov


def mp_trace_sqrt_product(s1: mpmath.matrix, s2: mpmath.matrix) -> mpmath.mpf:
    """``tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))`` at the working precision."""
    w, q = mpmath.eigsy(s1)
    root = q * mpmath.diag([mpmath.sqrt(max(v, 0)) for v in w]) * q.T
    inner = root * s2 * root
    inner = (inner + inner.T) / 2
    return mpmath.fsum(mpmath.sqrt(max(v, 0)) for v in mpmath.eigsy(inner, eigvals_only=True))


def exact_layer(vision: np.ndarray, text: np.ndarray, sigma: float | None) -> dict:
    """The spec's FD terms of one layer at ``DPS`` digits (mpf values)."""
    with mpmath.workdps(DPS):
        v, ov, mean_norm_v = exact_outlier_rule(vision, sigma)
        t, ot, mean_norm_t = exact_outlier_rule(text, sigma)
        scale2 = 1 / mean_norm_t**2  # FD terms scale with the square of the text-centric scale
        mu_v, s_v = exact_moments(v)
        mu_t, s_t = exact_moments(t)
        mean_term = mpmath.fsum((mu_v[i] - mu_t[i]) ** 2 for i in range(len(mu_v))) * scale2
        trace_v = mpmath.fsum(s_v[i, i] for i in range(s_v.rows)) * scale2
        trace_t = mpmath.fsum(s_t[i, i] for i in range(s_t.rows)) * scale2
        cross = 2 * mp_trace_sqrt_product(s_v, s_t) * scale2
        return {"fd": mean_term + trace_v + trace_t - cross, "mean_term": mean_term, "trace_vision": trace_v,
                "trace_text": trace_t, "cross_term": cross, "outliers_vision": ov, "outliers_text": ot,
                "norm_ratio": mean_norm_v / mean_norm_t}


def rel_err(value: float, exact: mpmath.mpf) -> float:
    return float(abs(mpmath.mpf(value) - exact) / abs(exact))


def eig_route_fd(vision: np.ndarray, text: np.ndarray, sigma: float | None) -> float:
    """FD through the float64 eigenvalue route (cancellation in ``tr + tr - 2 sum sqrt``)."""
    d = reference_layer(vision, text, sigma)
    st = _stats(vision, text, sigma)
    w, q = np.linalg.eigh(st[1])
    root = (q * np.sqrt(np.clip(w, 0, None))) @ q.T
    lam = np.linalg.eigvalsh(root @ st[3] @ root)
    return d["mean_term"] + d["trace_vision"] + d["trace_text"] - 2 * np.sqrt(np.clip(lam, 0, None)).sum()


def sqrtm_route_fd(vision: np.ndarray, text: np.ndarray, sigma: float | None) -> float:
    """FD through ``scipy.linalg.sqrtm(S_v @ S_t)`` (real part): the route the tests used before."""
    d = reference_layer(vision, text, sigma)
    st = _stats(vision, text, sigma)
    return d["mean_term"] + d["trace_vision"] + d["trace_text"] - 2 * np.trace(scipy.linalg.sqrtm(st[1] @ st[3]).real)


def _stats(vision, text, sigma):
    st = layer_stats(vision, text, torch.float64, sigma=sigma)
    return [st[k].numpy() for k in ("mu_v", "S_v", "mu_t", "S_t")]


def package_fds(vision_layers, text_layers, sigma, **kwargs) -> list[float]:
    """Per-layer FD of ``ModalityIntegrationRate`` fed one layer at a time in chunks of 64 rows."""
    metric = ModalityIntegrationRate(len(vision_layers), vision_layers[0].shape[1], outlier_sigma=sigma, **kwargs)
    for k, (v, t) in enumerate(zip(vision_layers, text_layers)):
        stream_layer(metric, k, torch.as_tensor(v), torch.as_tensor(t), chunk=64)
    return metric.per_layer_fd().tolist()


def measure_layer(vision: np.ndarray, text: np.ndarray, sigma: float | None, package_fd: float) -> dict:
    exact = exact_layer(vision, text, sigma)
    ref = reference_layer(vision, text, sigma)
    return {
        "sigma": sigma,
        "mpmath": {k: mpmath.nstr(exact[k], 30) for k in TERMS},
        "outliers_vision": exact["outliers_vision"], "outliers_text": exact["outliers_text"],
        "reference_rel_err": {k: rel_err(ref[k], exact[k]) for k in TERMS},
        "eig_route_fd_rel_err": rel_err(eig_route_fd(vision, text, sigma), exact["fd"]),
        "scipy_sqrtm_fd_rel_err": rel_err(sqrtm_route_fd(vision, text, sigma), exact["fd"]),
        "package_fd_rel_err": rel_err(package_fd, exact["fd"]),
    }


def run_cases() -> list[dict]:
    out = []
    for name, seed, nv, nt, dim in CASES:
        vision, text = exact_tokens(seed, nv, nt, dim)
        for sigma in (None, 3.0):
            t0 = time.time()
            fd = package_fds([vision], [text], sigma)[0]
            row = {"name": name, "seed": seed, "n_vision": nv, "n_text": nt, "dim": dim,
                   "sha256": token_hash(vision, text), **measure_layer(vision, text, sigma, fd)}
            print(f"{name} sigma={sigma}: reference {row['reference_rel_err']['fd']:.1e}, eig route "
                  f"{row['eig_route_fd_rel_err']:.1e}, sqrtm {row['scipy_sqrtm_fd_rel_err']:.1e}, package "
                  f"{row['package_fd_rel_err']:.1e} ({time.time() - t0:.0f} s)", flush=True)
            out.append(row)
    return out


def test_suite_cases():
    """``(name, vision layers, text layers, sigma, package kwargs)`` mirroring tests/test_metric.py."""
    def hidden_case(sigma, **kw):
        hidden, vm, tm = llm_like_hidden(**kw)
        return [h[vm].double().numpy() for h in hidden], [h[tm].double().numpy() for h in hidden], sigma

    for seed in (0, 1):
        for sigma in (None, 3.0):
            yield (f"streaming seed={seed} sigma={sigma}", *hidden_case(sigma, seed=seed), {})
    for dtype in (torch.float16, torch.bfloat16):
        hidden, vm, tm = llm_like_hidden(seed=3, offset=20.0)
        hidden = hidden.clamp(-6e4, 6e4).to(dtype).double()
        for sigma in (None, 3.0):
            yield (f"half inputs {str(dtype)[6:]} sigma={sigma}", [h[vm].numpy() for h in hidden],
                   [h[tm].numpy() for h in hidden], sigma, {})
    for sigma in (None, 3.0):
        yield (f"fewer tokens than dims sigma={sigma}",
               *hidden_case(sigma, layers=2, batch=3, seq=120, dim=64, n_vision=12, seed=4), {})
    yield ("both singular sigma=None", *hidden_case(None, layers=1, batch=2, seq=60, dim=64, n_vision=20, seed=5), {})
    yield ("float32 state sigma=None", *hidden_case(None, seed=12), {"state_dtype": torch.float32})
    yield ("histogram median path sigma=3",
           *hidden_case(3.0, layers=2, batch=40, seq=96, dim=48, seed=7), {"median_buffer": 64, "norm_buffer": 100})


def run_test_cases() -> list[dict]:
    out = []
    for name, vis, txt, sigma, kwargs in test_suite_cases():
        t0 = time.time()
        fds = package_fds(vis, txt, sigma, **kwargs)
        layers = [measure_layer(v, t, sigma, fd) for v, t, fd in zip(vis, txt, fds)]
        exact_sum = mpmath.fsum(mpmath.mpf(d["mpmath"]["fd"]) for d in layers)
        ref_sum = sum(reference_layer(v, t, sigma)["fd"] for v, t in zip(vis, txt))
        row = {"name": name, "package_kwargs": {k: str(v) for k, v in kwargs.items()},
               "reference_fd_sum_rel_err": rel_err(ref_sum, exact_sum),
               "package_fd_sum_rel_err": rel_err(sum(fds), exact_sum),
               "reference_max_layer_rel_err": {k: max(d["reference_rel_err"][k] for d in layers) for k in TERMS},
               "scipy_sqrtm_max_layer_fd_rel_err": max(d["scipy_sqrtm_fd_rel_err"] for d in layers),
               "package_max_layer_fd_rel_err": max(d["package_fd_rel_err"] for d in layers),
               "layers": layers}
        print(f"{name}: FD sum rel err reference {row['reference_fd_sum_rel_err']:.1e}, package "
              f"{row['package_fd_sum_rel_err']:.1e}; max layer: reference {row['reference_max_layer_rel_err']['fd']:.1e}"
              f", sqrtm {row['scipy_sqrtm_max_layer_fd_rel_err']:.1e}, package {row['package_max_layer_fd_rel_err']:.1e}"
              f" ({time.time() - t0:.0f} s)", flush=True)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test-cases", action="store_true", help="also measure the token sets of tests/test_metric.py")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    result = {
        "command": "python benchmarks/mpmath_reference.py" + (" --test-cases" if args.test_cases else ""),
        "mpmath_dps": DPS, "commit": commit, "machine": cpu_model(),
        "versions": {"numpy": np.__version__, "scipy": scipy.__version__, "torch": torch.__version__,
                     "mpmath": mpmath.__version__},
        "cases": run_cases(),
    }
    if args.test_cases:
        result["test_cases"] = run_test_cases()
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
