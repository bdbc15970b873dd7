"""compute() speed and accuracy of ModalityIntegrationRate against the official modes,
the torchmetrics route and the floor (one float64 eigvalsh per layer).

    python benchmarks/bench_compute.py            # D in {512, 1024, 2048} x 8 layers (+ near-identical case)
    python benchmarks/bench_compute.py --quick    # D in {256, 512} x 4 layers, < 1 minute
    python benchmarks/bench_compute.py --world-sizes 1 2 3   # layer-sharded compute() on gloo ranks

Every route runs at the same thread count (``--threads``: torch and OpenBLAS alike). The
official accurate mode is ``scipy.linalg.sqrtm`` of the float32 product ``S_V S_T`` (scipy
>= 1.15 computes it in float32), as the official script runs it on ``.float()`` tokens.

Per D, synthetic LLM-like tokens (large common offset with a few massive dimensions,
power-law spectra in different random bases, more tokens than D) are fed to four metrics
(float64 and float32 state, each with the default median sketch and with an exact median
buffer), and the same
tokens give (i) a float64 reference FD per layer: text-centric scale + 3-sigma rule on the
materialised tokens, two-pass covariances, then the cancellation-free Bures/Procrustes form
``||mu_V - mu_T||^2 + ||S_T^(1/2) - S_V^(1/2) U||_F^2`` (U the optimal orthogonal factor from
an SVD), and (ii) the official script's float32 pipeline (``.float()`` tokens, float32
centred covariances). Every route below is timed in one process, interleaved, median of
``--repeats`` rounds; slow routes may be timed on a subset of layers and scaled to the set.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import _common as C  # first: sets OMP_WAIT_POLICY before torch loads
import numpy as np
import scipy.linalg
import torch

from _reference import bures_fd, feed, layer_stats
from mir_lightning import ModalityIntegrationRate
from mir_lightning.functional import frechet_distance

F64, F32 = torch.float64, torch.float32


# --------------------------------------------------------------------------- routes under test
def fd_scipy(mu_v: np.ndarray, s_v: np.ndarray, mu_t: np.ndarray, s_t: np.ndarray) -> float:
    """The official "accurate" mode: sqrtm(S_V @ S_T), real part, in the arrays' dtype."""
    covmean = scipy.linalg.sqrtm(s_v.dot(s_t))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(np.sum((mu_v - mu_t) ** 2) + np.trace(s_v) + np.trace(s_t) - 2 * np.trace(covmean))


def fd_official_fast(mu_v, s_v, mu_t, s_t, steps: int = 5) -> float:
    """The official "fast" mode (docs/spec.md): Y = A, Z = I, then Y <- (Y + Z^-1 A)/2,
    Z <- (Z + Y^-1 A)/2, ``steps`` times; A = S_V S_T. Y = A, Z = I is a fixed point."""
    a = s_v @ s_t
    y, z = a, torch.eye(a.shape[0], dtype=a.dtype)
    for _ in range(steps):
        y = 0.5 * (y + torch.inverse(z) @ a)
        z = 0.5 * (z + torch.inverse(y) @ a)
    diff = mu_v - mu_t
    return float((diff * diff).sum() + torch.trace(s_v) + torch.trace(s_t) - 2 * torch.trace(y))


def fd_eigvals(mu_v, s_v, mu_t, s_t) -> float:
    """torchmetrics' FID route: eigvals of the non-symmetric product, complex sqrt, real part."""
    cross = torch.linalg.eigvals(s_v @ s_t).sqrt().real.sum()
    diff = mu_v - mu_t
    return float((diff * diff).sum() + torch.trace(s_v) + torch.trace(s_t) - 2 * cross)


def fd_chol_svdvals(mu_v, s_v, mu_t, s_t) -> float:
    """Candidate accurate route: tr((S_T S_V)^(1/2)) = sum of singular values of L_T^T L_V
    (both Cholesky factors): no square roots of tiny eigenvalues."""
    l_t, l_v = torch.linalg.cholesky(s_t), torch.linalg.cholesky(s_v)
    cross = torch.linalg.svdvals(l_t.mT @ l_v).sum()
    diff = mu_v - mu_t
    return float((diff * diff).sum() + torch.trace(s_v) + torch.trace(s_t) - 2 * cross)


# --------------------------------------------------------------------------- one case
@dataclass
class Case:
    name: str
    D: int
    layers: int
    n_vision: int
    n_text: int
    metrics: dict[str, ModalityIntegrationRate]
    ref64: list[dict[str, torch.Tensor]] = field(default_factory=list)
    off32: list[dict[str, torch.Tensor]] = field(default_factory=list)
    fd_ref: list[float] = field(default_factory=list)
    fd_over_trace: list[float] = field(default_factory=list)
    fd_midpoint: dict[int, float] = field(default_factory=dict)
    setup_s: float = 0.0


def build_case(name: str, D: int, layers: int, near_identical: bool, seed: int) -> Case:
    start = time.perf_counter()
    model = C.SyntheticLLM(D, seed=seed)
    nv = max(int(1.25 * D), 768)
    nt = nv if near_identical else max(int(1.5 * D), 1024)
    metrics = {
        "f64": ModalityIntegrationRate(layers, D),
        "f64_exact_median": ModalityIntegrationRate(layers, D, median_buffer=max(nv, nt)),
        "f32": ModalityIntegrationRate(layers, D, state_dtype=F32),
        "f32_exact_median": ModalityIntegrationRate(layers, D, state_dtype=F32, median_buffer=max(nv, nt)),
    }
    case = Case(name, D, layers, nv, nt, metrics)
    for k in range(layers):
        vision = model.tokens("vision", nv, k)
        text = model.near_identical_text(vision) if near_identical else model.tokens("text", nt, k)
        for metric in metrics.values():
            feed(metric, k, vision, text)
        ref = layer_stats(vision, text, F64)
        case.ref64.append(ref)
        case.off32.append(layer_stats(vision, text, F32))
        fd = bures_fd(ref["mu_v"], ref["S_v"], ref["mu_t"], ref["S_t"])
        case.fd_ref.append(fd)
        case.fd_over_trace.append(fd / float(torch.trace(ref["S_v"]) + torch.trace(ref["S_t"])))
        if k < 2:  # sensitivity of the spec to its choice of median (lower vs midpoint)
            mid = layer_stats(vision, text, F64, median="midpoint")
            case.fd_midpoint[k] = bures_fd(mid["mu_v"], mid["S_v"], mid["mu_t"], mid["S_t"])
        del vision, text
    case.setup_s = time.perf_counter() - start
    return case


def fresh_compute(metric: ModalityIntegrationRate) -> torch.Tensor:
    """compute() from the fed state, bypassing the two result caches (torchmetrics' and the metric's)."""
    metric._results = None
    return metric.compute()


@dataclass
class Route:
    label: str
    dtype: str
    layers_timed: int
    fn: Callable[[int], float] | None = None  # per-layer route: k -> FD (nan for the floor)
    whole: Callable[[], torch.Tensor] | None = None  # whole-set route (compute())
    metric_key: str = ""
    results: dict[int, float] = field(default_factory=dict)


def routes_for(case: Case, slow_layers: int, mid_layers: int) -> dict[str, Route]:
    L = case.layers
    r64, o32 = case.ref64, case.off32
    np64 = [{k: v.numpy() for k, v in r.items() if torch.is_tensor(v)} for r in r64]
    np32 = [{k: v.numpy() for k, v in r.items() if torch.is_tensor(v)} for r in o32]

    def args(stats, k):
        s = stats[k]
        return s["mu_v"], s["S_v"], s["mu_t"], s["S_t"]

    def pkg(k):  # the package's linear algebra alone (text first, as compute() does when n_t >= n_v)
        s = r64[k]
        return float(frechet_distance(s["mu_t"], s["S_t"], s["mu_v"], s["S_v"]))

    return {
        "compute64": Route("compute() float64 state", "f64", L, whole=lambda: fresh_compute(case.metrics["f64"]), metric_key="f64"),
        "compute32": Route("compute() float32 state", "f32 state, f64 linalg", L, whole=lambda: fresh_compute(case.metrics["f32"]),
                           metric_key="f32"),
        "pkg": Route("functional.frechet_distance (Cholesky+eigvalsh)", "f64", L, fn=pkg),
        "chol_svd": Route("candidate: Cholesky x2 + svdvals(L_T^T L_V)", "f64", mid_layers, fn=lambda k: fd_chol_svdvals(*args(r64, k))),
        "scipy32": Route("official accurate: scipy sqrtm(S_V S_T)", "f32 (as official)", slow_layers, fn=lambda k: fd_scipy(*args(np32, k))),
        "scipy64": Route("scipy sqrtm(S_V S_T)", "f64", slow_layers, fn=lambda k: fd_scipy(*args(np64, k))),
        "fast32": Route("official fast: 5-step iteration (returns A)", "f32 (as official)", mid_layers, fn=lambda k: fd_official_fast(*args(o32, k))),
        "eigvals": Route("torchmetrics: eigvals(S_V S_T)", "f64", mid_layers, fn=lambda k: fd_eigvals(*args(r64, k))),
        "floor": Route("floor: one eigvalsh per layer", "f64", L, fn=lambda k: (torch.linalg.eigvalsh(r64[k]["S_t"]), math.nan)[1]),
    }


def timed_callable(route: Route, L: int) -> Callable[[], None]:
    if route.whole is not None:
        return route.whole
    counter = itertools.count()

    def call() -> None:
        r = next(counter)
        for i in range(route.layers_timed):
            k = (r * route.layers_timed + i) % L  # rotate over the layers from round to round
            route.results[k] = route.fn(k)

    return call


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def errors(route: Route, case: Case) -> tuple[float, float, float]:
    """(max per-layer relative FD error, relative error of the FD sum, |MIR error|)."""
    if route.whole is not None:
        fds = case.metrics[route.metric_key].per_layer_fd().tolist()  # cached by the timed compute()
        got = dict(zip(range(case.layers), fds))
    else:
        got = route.results
    if not got or all(math.isnan(v) for v in got.values()):
        return math.nan, math.nan, math.nan
    ks = sorted(got)
    per = max(rel(got[k], case.fd_ref[k]) for k in ks)
    s_got, s_ref = sum(got[k] for k in ks), sum(case.fd_ref[k] for k in ks)
    mir_err = abs(math.log10(s_got) - math.log10(s_ref)) if s_got > 0 else math.inf
    return per, rel(s_got, s_ref), mir_err


CORE = ("compute64", "compute32", "pkg", "floor")


def run_case(case: Case, repeats: int, slow_repeats: int, slow_layers: int, mid_layers: int,
             skip: set[str]) -> tuple[list[list[object]], dict[str, float], dict[str, float]]:
    """Time all routes interleaved: the compute() routes, the package's linear algebra and the
    floor ``repeats`` times, the other (slower) routes ``slow_repeats`` times."""
    routes = {k: r for k, r in routes_for(case, slow_layers, mid_layers).items() if k not in skip}
    calls = {k: timed_callable(r, case.layers) for k, r in routes.items()}
    counts = {k: repeats if k in CORE else min(slow_repeats, repeats) for k in routes}
    times = C.run_interleaved(calls, counts, warmup=False)
    per_set = {k: [t * case.layers / routes[k].layers_timed for t in ts] for k, ts in times.items()}
    floor, floor_min = C.median(per_set["floor"]), min(per_set["floor"])
    rows = []
    for key, route in routes.items():
        med = C.median(per_set[key])
        per, sum_err, mir_err = errors(route, case)
        timed = f"{route.layers_timed}/{case.layers}" + ("" if route.layers_timed == case.layers else " (scaled)")
        rows.append([route.label, route.dtype, timed, f"{len(per_set[key])}", med,
                     f"{min(per_set[key]):.3g}-{max(per_set[key]):.3g}", med / floor, min(per_set[key]) / floor_min,
                     per, sum_err, mir_err])
    return rows, {k: C.median(v) for k, v in per_set.items()}, {k: min(v) for k, v in per_set.items()}


# --------------------------------------------------------------------------- profile of compute()
def profile_compute(metric: ModalityIntegrationRate, runs: int = 3) -> tuple[list[list[object]], str]:
    """Wall-time breakdown of compute() by patching the functions it calls (median of ``runs``)."""
    import mir_lightning.functional as F

    import mir_lightning.summaries as S

    merge_key = "summaries (_summary: views of the state)"
    rule_key = "outlier rule (replace_outliers_in_moments, incl. medians)"
    median_key = "  of which medians (combined_lower_median)"
    terms_key = "Frechet terms (frechet_terms)"
    chol_key = "  of which Cholesky (_psd_factor)"
    acc: dict[str, float] = {}
    samples: list[dict[str, float]] = []
    for _ in range(runs):
        acc.clear()
        with C.timed_patches(acc, [
            (metric, "_summary", merge_key),
            (F, "replace_outliers_in_moments", rule_key),
            (S, "combined_lower_median", median_key),
            (F, "frechet_terms", terms_key),
            (F, "_psd_factor", chol_key),
            (torch.linalg, "eigvalsh", "  of which eigvalsh"),
            (F, "trace_sqrt_product", "trace_sqrt_product"),
        ]):
            t0 = time.perf_counter()
            fresh_compute(metric)
            acc["total"] = time.perf_counter() - t0
        samples.append(dict(acc))
    med = {k: C.median([s.get(k, 0.0) for s in samples]) for k in samples[0]}
    total = med["total"]
    tsp = med.get("trace_sqrt_product", 0.0)
    chol = med.get(chol_key, 0.0)
    eig = med.get("  of which eigvalsh", 0.0)
    rows = []
    for key in (merge_key, rule_key, median_key, terms_key, chol_key):
        rows.append([key, med.get(key, 0.0), med.get(key, 0.0) / total])
    gemm = max(tsp - chol - eig, 0.0)
    rows.append(["  of which GEMMs L^T S L + symmetrise (rest of trace_sqrt_product)", gemm, gemm / total])
    rows.append(["  of which eigvalsh", eig, eig / total])
    accounted = sum(med.get(k, 0.0) for k in (merge_key, rule_key, terms_key))
    rows.append(["rest of compute() (scaling covs, bookkeeping)", total - accounted, (total - accounted) / total])
    rows.append(["total compute()", total, 1.0])

    # aten-level view (one run)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fresh_compute(metric)
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40)
    return rows, ops


# --------------------------------------------------------------------------- layer-sharded compute()
CUBIC = ("eigvalsh", "cholesky_ex", "eigh")


def distributed_worker(rank: int, world: int, port: int, D: int, layers: int, threads: int, repeats: int,
                       out_dir: str) -> None:
    """One gloo rank: feed its share of the tokens (every world-th token), then time compute()
    between barriers and count the cubic linear-algebra calls it makes."""
    import datetime
    import json
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        torch.set_num_threads(threads)
        warnings.simplefilter("ignore", RuntimeWarning)
        model = C.SyntheticLLM(D, seed=1)
        nv, nt = max(int(1.25 * D), 768), max(int(1.5 * D), 1024)
        metric = ModalityIntegrationRate(layers, D, median_buffer=nt)  # exact medians: the split cannot matter
        for k in range(layers):
            vision, text = model.tokens("vision", nv, k)[rank::world], model.tokens("text", nt, k)[rank::world]
            feed(metric, k, vision, text)
        calls: dict[str, int] = {}
        flops = [0.0]
        originals = {name: getattr(torch.linalg, name) for name in CUBIC}

        def counted(name):
            def call(a, *args, **kwargs):
                calls[name] = calls.get(name, 0) + 1
                flops[0] += a.shape[-1] ** 3 * (a.numel() // (a.shape[-1] * a.shape[-2]))
                return originals[name](a, *args, **kwargs)
            return call

        times = []
        for r in range(repeats + 1):
            metric._results = None
            metric._computed = None  # (torchmetrics' cache: used by versions before the layer-sharded compute)
            if r == repeats:  # one more, counted
                for name in CUBIC:
                    setattr(torch.linalg, name, counted(name))
            dist.barrier()
            t0 = time.perf_counter()
            mir = float(metric.compute())
            dist.barrier()
            if r < repeats:
                times.append(time.perf_counter() - t0)
        for name in CUBIC:
            setattr(torch.linalg, name, originals[name])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(dict(times=times, calls=calls, n3=flops[0], mir=mir, fd=metric.per_layer_fd().tolist()), f)
    finally:
        dist.destroy_process_group()


def run_distributed(world_sizes: list[int], D: int, layers: int, threads: int, repeats: int) -> None:
    import json
    import socket
    import tempfile

    import torch.multiprocessing as mp

    rows, base = [], None
    for world in world_sizes:
        with tempfile.TemporaryDirectory() as out_dir, socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()
            mp.spawn(distributed_worker, args=(world, port, D, layers, threads, repeats, out_dir), nprocs=world, join=True)
            ranks = [json.load(open(f"{out_dir}/rank{r}.json")) for r in range(world)]
        wall = [max(t) for t in zip(*(r["times"] for r in ranks))]  # the slowest rank per round
        n3 = max(r["n3"] for r in ranks)
        eig = max(r["calls"].get("eigvalsh", 0) for r in ranks)
        if base is None:
            base = (C.median(wall), n3, ranks[0]["fd"])
        diff = max(abs(a - b) / abs(b) for a, b in zip(ranks[0]["fd"], base[2]))
        same = all(r["fd"] == ranks[0]["fd"] for r in ranks)
        rows.append([world, f"{threads} each", C.median(wall), f"{min(wall):.3g}-{max(wall):.3g}", C.median(wall) / base[0],
                     f"{eig} (of {layers})", n3 / base[1], f"{diff:.1e}", "yes" if same else "NO"])
    print(f"## Layer-sharded compute(): D={D} x {layers} layers, gloo on CPU, median of {repeats} rounds "
          "(wall time of the slowest rank between barriers)")
    print(C.table(["ranks", "torch threads", "compute() s", "min-max", "x 1 rank", "eigvalsh calls / rank (max)",
                   "cubic work / rank vs 1 rank", "max rel FD diff vs 1 rank", "all ranks equal"], rows))
    print("Cubic work counts n^3 per call of eigvalsh / cholesky_ex / eigh on the busiest rank.")


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="D in {256, 512} x 4 layers, near-identical at D=256 (< 1 min)")
    ap.add_argument("--dims", type=int, nargs="+", default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="rounds of compute(), the package FD and the floor")
    ap.add_argument("--slow-repeats", type=int, default=None, help="rounds of the other routes (3; --quick 2)")
    ap.add_argument("--near-dim", type=int, default=None, help="D of the near-identical case")
    ap.add_argument("--near-layers", type=int, default=2)
    ap.add_argument("--big-d", type=int, default=1536,
                    help="scipy routes are timed on 2 layers per round below this D and on 1 from it on; "
                         "the other per-layer candidates on all layers below it and on 2 from it on "
                         "(scaled to the set; --quick: 1 and 2 everywhere)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=None,
                    help="only the layer-sharded compute() benchmark, for these numbers of gloo ranks")
    ap.add_argument("--dist-dim", type=int, default=384)
    ap.add_argument("--dist-layers", type=int, default=8)
    a = ap.parse_args()
    if a.world_sizes:
        C.setup(a.threads)
        print(C.machine_info())
        run_distributed(a.world_sizes, a.dist_dim, a.dist_layers, a.threads, a.repeats or 5)
        return
    dims = a.dims or ([256, 512] if a.quick else [512, 1024, 2048])
    layers = a.layers or (4 if a.quick else 8)
    repeats = a.repeats or (3 if a.quick else 7)
    near_dim = a.near_dim or (256 if a.quick else 512)
    C.setup(a.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    t_start = time.perf_counter()
    print(C.machine_info())
    print(f"bench_compute: dims={dims} layers={layers} repeats={repeats} near-identical D={near_dim} "
          f"x {a.near_layers} layers; seconds are per set of {layers} layers (median of n interleaved rounds; ratios of medians and of minima)\n")

    # warm-up of every library path on a tiny case
    tiny = build_case("warm-up", 32, 2, False, a.seed)
    run_case(tiny, 1, 1, 1, 1, set())

    headers = ["route", "dtype", "layers timed", "n", "s / set (median)", "min-max", "x floor (medians)",
               "x floor (mins)", "max rel err/layer", "rel err FD sum", "|MIR err|"]
    summary = []
    cases = [(f"LLM-like D={d}", d, layers, False) for d in dims] + [(f"near-identical D={near_dim}", near_dim, a.near_layers, True)]
    profile_target = None
    for name, d, L, near in cases:
        case = build_case(name, d, L, near, a.seed + d)
        big = a.quick or d >= a.big_d
        rows, med, mins = run_case(case, repeats, a.slow_repeats or (2 if a.quick else 3), 1 if big else min(2, L), 2 if big else L, set())
        fot = case.fd_over_trace
        print(f"## {name} x {L} layers  (tokens/layer: vision {case.n_vision}, text {case.n_text}; "
              f"FD/(trS_V+trS_T) {min(fot):.2e}..{max(fot):.2e}; setup {case.setup_s:.0f} s)")
        print(C.table(headers, rows))
        exact = {}
        for key in ("f64_exact_median", "f32_exact_median"):
            m = case.metrics[key]
            fresh_compute(m)
            exact[key] = max(rel(f, r) for f, r in zip(m.per_layer_fd().tolist(), case.fd_ref))
        ex, ex32 = exact["f64_exact_median"], exact["f32_exact_median"]
        mid = max(rel(case.fd_midpoint[k], case.fd_ref[k]) for k in case.fd_midpoint)
        st = case.metrics["f64"].per_layer_stats()
        print(f"with an exact median buffer (median_buffer={max(case.n_vision, case.n_text)}), compute() max rel err/layer: "
              f"float64 state {ex:.2e}, float32 state {ex32:.2e}  (the default median sketch's share is the difference)")
        print(f"outliers replaced per layer: vision {st['outliers_vision'].mean():.1f}, text {st['outliers_text'].mean():.1f}; "
              f"reference with the midpoint instead of the lower median differs by {mid:.2e} (layers 0-1)\n")
        summary.append([name, med["compute64"] / med["floor"], mins["compute64"] / mins["floor"], rows[0][8], ex, mid, rows[1][8], ex32,
                        med["scipy32"] / med["compute64"], med["eigvals"] / med["compute64"]])
        if not near and (profile_target is None or d > profile_target.D):
            profile_target = case
        else:
            del case

    print("## Summary")
    print(C.table(["case", "compute()/floor (medians)", "(mins)", "compute() f64 max rel err", "same, exact medians",
                   "lower vs midpoint median (ref)",
                   "compute() f32-state max rel err", "same, exact medians", "official accurate / compute()", "eigvals / compute()"], summary))
    print("Targets: compute()/floor <= 2.5 at D >= 1024; float64 max rel err <= 1e-6.\n")

    if not a.no_profile and profile_target is not None:
        prows, ops = profile_compute(profile_target.metrics["f64"])
        print(f"## Where compute() spends its time (D={profile_target.D} x {profile_target.layers} layers, float64 state)")
        print(C.table(["part", "s", "share"], prows))
        print("\ntorch.profiler, top aten ops by self CPU time (one compute()):")
        print(ops)
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
