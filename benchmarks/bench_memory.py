"""Metric state size, compute() and probe peak memory, against the official script's host memory.

    python benchmarks/bench_memory.py            # peaks measured at D=1024 x 16 layers
    python benchmarks/bench_memory.py --quick    # peaks measured at D=512 x 8 layers (< 1 minute)
    python benchmarks/bench_memory.py --probe-only   # only 4 and 5 (the probe, the budget table)

1. ``state_nbytes_for`` against the bytes of the state tensors actually held (small cases,
   every sketch allocated; and a default-config case where it is an upper bound).
2. compute() peak: a fresh subprocess feeds synthetic tokens, frees them and trims the heap,
   reads its RSS, resets the kernel's RSS high-water mark (``/proc/self/clear_refs`` = 5),
   runs compute() and reads VmHWM; peak extra = VmHWM - RSS before compute(). A 1 ms RSS
   sampling thread (psutil-free, /proc) is a cross-check.
3. Formula table for (D, layers) = (4096, 32), (5120, 40), (8192, 80): state in float64 and
   float32 against the official script's host memory, which keeps every hidden state of
   every sample: (layers + 1) x tokens x D x N x 2 bytes (fp16) for N = 100 and 1,000, with
   ``--tokens`` per sample from the image on (default 700: LLaVA-1.5's 576 image tokens and
   a ~120-token caption).
4. ``MIRProbe.run()`` peak and what stays held after it, in fresh subprocesses, without a
   budget and with ``max_state_bytes`` = the state of L/2, L/4 and 1 layer(s): a
   :class:`_common.ShapedStack` of the same width and depth (LLM-like tokens,
   ``_common.SyntheticLLM``), peak extra = VmHWM during ``run()`` - RSS before; held after =
   RSS after ``run()`` (heap trimmed) - RSS before, and the live tensor bytes counted through
   ``gc`` after - before (exact; the probe and its result deleted). Each child first runs a
   tiny probe, so that library loading is not counted. Per-layer FD against the unbudgeted run.
5. The budget table for 7B / 13B / 34B / 70B LLM shapes (formula): state, passes and expected
   probe time at budgets of 2 / 8 / 32 GiB, with the assumption stated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
import warnings

import _common as C  # first: sets OMP_WAIT_POLICY before torch loads
import torch

from mir_lightning import ModalityIntegrationRate

F64, F32 = torch.float64, torch.float32
GiB = 2**30
MiB = 2**20


def held_bytes(metric: ModalityIntegrationRate) -> tuple[int, int]:
    """(bytes of the current state tensors, bytes of torchmetrics' reset defaults)."""
    state = sum(getattr(metric, name).nbytes for name in metric._defaults)
    defaults = sum(t.nbytes for t in metric._defaults.values() if isinstance(t, torch.Tensor))
    return state, defaults


def feed_random(metric: ModalityIntegrationRate, layers: int, D: int, nv: int, nt: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for k in range(layers):
        hidden = torch.randn(1, nv + nt, D, generator=g) + 3.0
        vm = torch.zeros(1, nv + nt, dtype=torch.bool)
        vm[0, :nv] = True
        metric.update_layer(k, hidden, vm, ~vm)


def verify_formula() -> list[list[object]]:
    rows = []
    small = dict(max_outliers=8, median_buffer=16, median_bins=32, norm_buffer=32, norm_bins=64)
    for dtype in (F64, F32):
        for layers, D in ((2, 48), (3, 100)):
            m = ModalityIntegrationRate(layers, D, state_dtype=dtype, **small)
            before, _ = held_bytes(m)
            feed_random(m, layers, D, 60, 70)  # > median_buffer and > norm_buffer: every sketch allocated
            held, defaults = held_bytes(m)
            formula = ModalityIntegrationRate.state_nbytes_for(layers, D, dtype, **small)
            rows.append([f"L={layers}, D={D}, small sketches, all allocated", str(dtype).replace("torch.", ""),
                         f"{formula:,}", f"{held:,}", f"{held - formula:+,}", f"{before:,} / {defaults:,}"])
    m = ModalityIntegrationRate(4, 256)
    feed_random(m, 4, 256, 700, 900)  # default sketches: norm histogram not yet allocated (< 2^18 rows)
    held, defaults = held_bytes(m)
    formula = m.state_nbytes()
    rows.append(["L=4, D=256, default config, 700+900 rows/layer", "float64", f"{formula:,}", f"{held:,}",
                 f"{held - formula:+,}", f"0 / {defaults:,}"])
    return rows


# --------------------------------------------------------------------------- child process
def child(D: int, layers: int, dtype_name: str, rank: int = 0, world: int = 1) -> None:
    """Feed a metric (this rank's share of the tokens when ``world`` > 1, gloo on localhost) and
    print one JSON line with its RSS before and the high-water mark during ``compute()``."""
    C.setup(1 if world > 1 else 2)
    warnings.simplefilter("ignore")
    if world > 1:
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    dtype = F64 if dtype_name == "float64" else F32
    metric = ModalityIntegrationRate(layers, D, state_dtype=dtype)
    model = C.SyntheticLLM(D, seed=1)
    nv, nt = max(int(1.25 * D), 768), max(int(1.5 * D), 1024)
    for k in range(layers):
        v, t = model.tokens("vision", nv, k)[rank::world], model.tokens("text", nt, k)[rank::world]
        hidden = torch.cat([v, t])[None]
        vm = torch.zeros(1, hidden.shape[1], dtype=torch.bool)
        vm[0, : v.shape[0]] = True
        metric.update_layer(k, hidden, vm, ~vm)
        del v, t, hidden
    del model
    C.trim_heap()
    held, _ = held_bytes(metric)
    rss0 = C.rss_bytes()
    peak_sampled = [rss0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_sampled[0] = max(peak_sampled[0], C.rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    reset_ok = C.reset_hwm()
    thread.start()
    t0 = time.perf_counter()
    mir = float(metric.compute())
    seconds = time.perf_counter() - t0
    hwm = C.hwm_bytes()
    stop.set()
    thread.join()
    print(json.dumps(dict(D=D, layers=layers, dtype=dtype_name, formula=metric.state_nbytes(), held=held, rss_before=rss0,
                          hwm=hwm, hwm_reset=reset_ok, peak_sampled=peak_sampled[0], seconds=seconds, mir=mir)))


def measure_peak(D: int, layers: int, dtype_name: str, world: int = 1) -> list[dict]:
    """Peak of ``compute()`` in fresh processes: one, or ``world`` gloo ranks (one dict each)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(D), str(layers), dtype_name, str(rank), str(world)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in range(world)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode:
            raise RuntimeError(f"child failed: {err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# --------------------------------------------------------------------------- the probe
def probe_child(D: int, layers: int, budget_layers: int) -> None:
    """One ``MIRProbe.run()`` on a ShapedStack (``budget_layers`` 0: no budget); prints one JSON line."""
    from mir_lightning import MIRProbe

    C.setup(2)
    warnings.simplefilter("ignore")
    warm = C.ShapedStack(64, 2)  # loads every library the probe uses, so RSS differences are data
    MIRProbe(C.shaped_probe_batches(C.SyntheticLLM(64)), layers=list(warm.layers), hidden_size=64).run(warm)
    del warm
    model = C.ShapedStack(D, layers)
    batches = C.shaped_probe_batches(C.SyntheticLLM(D, seed=1))
    budget = ModalityIntegrationRate.state_nbytes_for(budget_layers, D) if budget_layers else None
    probe = MIRProbe(batches, layers=list(model.layers), hidden_size=D, max_state_bytes=budget)
    C.trim_heap()
    tensors0, rss0 = C.live_tensor_bytes(), C.rss_bytes()
    reset_ok = C.reset_hwm()
    result = probe.run(model)
    hwm = C.hwm_bytes()
    fd, passes, forwards, seconds, error = result.per_layer_fd.tolist(), result.passes, result.forwards, \
        result.seconds, result.error
    del probe, result
    C.trim_heap()
    tensors1, rss1 = C.live_tensor_bytes(), C.rss_bytes()
    print(json.dumps(dict(state=ModalityIntegrationRate.state_nbytes_for(layers, D), budget=budget, passes=passes,
                          forwards=forwards, seconds=seconds, peak_extra=hwm - rss0, held_rss=rss1 - rss0,
                          held_tensors=tensors1 - tensors0, hwm_reset=reset_ok, fd=fd, error=error)))


def _child_json(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe_rows(D: int, L: int) -> list[list[object]]:
    rows, base = [], None
    for budget_layers in (0, L // 2, L // 4, 1):
        r = _child_json("--probe-child", str(D), str(L), str(budget_layers))
        base = base or r
        fd_err = max(abs(a / b - 1) for a, b in zip(r["fd"], base["fd"]))
        rows.append(["none" if not budget_layers else f"{budget_layers} layer(s): {r['budget'] / MiB:.0f} MiB",
                     r["passes"], r["forwards"], f"{r['state'] / MiB:.0f}", f"{r['peak_extra'] / MiB:.0f}",
                     r["peak_extra"] / r["state"], f"{r['held_rss'] / MiB:+.1f}", f"{r['held_tensors']:+,}",
                     f"{fd_err:.1e}", f"{r['seconds']:.1f}", r["error"] or ("yes" if r["hwm_reset"] else "NO")])
    return rows


# LLM shapes (hidden size x layers, parameters) of the table, from the models' config.json:
# LLaMA-2 / Vicuna 7B and 13B (LLaVA-1.5), Yi-34B (the LLM of LLaVA-NeXT-34B), LLaMA-2 70B.
LLM_SHAPES = (("7B (LLaMA-2 / Vicuna-7B)", 4096, 32, 6.7e9), ("13B (LLaMA-2 / Vicuna-13B)", 5120, 40, 13.0e9),
              ("34B (Yi-34B)", 7168, 60, 34.4e9), ("70B (LLaMA-2-70B)", 8192, 80, 69.0e9))
BUDGETS_GIB = (2, 8, 32)
# Assumption of the time column: one pass = the probe set's forwards, 2 x parameters FLOP per
# token, over PROBE_TOKENS tokens (100 samples of ~700 tokens: 576 image tokens + a caption)
# at ACHIEVED_FLOPS (bf16, ~40% of an H100/H200's dense peak), on one GPU (W data-parallel
# ranks divide it by W). The metric's update() and compute() are not repeated: each pass folds
# and solves only its own layers, so their total is the same at any budget.
PROBE_TOKENS = 100 * 700
ACHIEVED_FLOPS = 400e12


def budget_rows() -> list[list[object]]:
    """State, passes and expected forward time per budget, from ``state_nbytes_for``."""
    from mir_lightning.probe import layer_groups

    rows = []
    for name, D, L, params in LLM_SHAPES:
        layer = ModalityIntegrationRate.state_nbytes_for(1, D)
        forward_s = 2 * params * PROBE_TOKENS / ACHIEVED_FLOPS
        row: list[object] = [name, f"{D} x {L}", f"{ModalityIntegrationRate.state_nbytes_for(L, D) / GiB:.1f}",
                             f"{layer / GiB:.3f}", f"{forward_s:.1f}"]
        for gib in BUDGETS_GIB:
            try:
                passes = len(layer_groups(L, layer, gib * GiB))
                row.append(f"{passes} / {passes * forward_s:.0f} s")
            except ValueError:
                row.append("below one layer")
        rows.append(row)
    return rows


def budget_table() -> str:
    return C.table(["LLM", "D x layers", "float64 state GiB", "one layer GiB", "forwards s per pass",
                    *(f"{g} GiB: passes / forwards s" for g in BUDGETS_GIB)], budget_rows())


# --------------------------------------------------------------------------- main
def official_host_bytes(layers: int, D: int, n_samples: int, tokens: int = 700, bytes_per: int = 2) -> int:
    """Hidden states the official script keeps on the host: all layers + the embedding output,
    every token from the image on, every sample, in the model's dtype (fp16)."""
    return (layers + 1) * tokens * D * n_samples * bytes_per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--peak", type=int, nargs=2, default=None, metavar=("D", "LAYERS"))
    ap.add_argument("--tokens", type=int, default=700, help="tokens per sample the official script keeps (from the image on)")
    ap.add_argument("--world", type=int, default=1, help="also measure compute()'s peak per rank on this many gloo ranks")
    ap.add_argument("--probe-only", action="store_true", help="only the probe (4) and the budget table (5)")
    ap.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-child", nargs=3, type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(int(a.child[0]), int(a.child[1]), a.child[2], int(a.child[3]), int(a.child[4]))
        return
    if a.probe_child:
        probe_child(*a.probe_child)
        return
    C.setup(2)
    warnings.simplefilter("ignore")
    t_start = time.perf_counter()
    print(C.machine_info())
    print()
    if not a.probe_only:
        core_sections(a)
    D, L = a.peak or ((512, 8) if a.quick else (1024, 16))
    print(f"\n## 4. MIRProbe.run() memory (fresh subprocess per row; ShapedStack D={D} x {L} layers, "
          f"{int(1.25 * D)} vision + {int(1.5 * D)} text tokens in 4 batches)")
    print(C.table(["max_state_bytes", "passes", "forwards", "state MiB (all layers)", "peak extra in run() MiB",
                   "peak / state", "RSS held after run() MiB", "tensor bytes held after run()", "FD vs one pass",
                   "run() s", "HWM reset / error"], probe_rows(D, L)))
    print(f"\n## 5. State budget: passes per probe for LLM shapes (float64 state, default sketches; forwards of "
          f"{PROBE_TOKENS:,} probe tokens at 2 x params FLOP/token, {ACHIEVED_FLOPS / 1e12:.0f} TFLOP/s achieved, one GPU; "
          "update() and compute() add the same time at any budget)")
    print(budget_table())
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")


def core_sections(a: argparse.Namespace) -> None:
    """Sections 1-3 (the metric alone)."""
    print("## 1. state_nbytes_for() against the state tensors held")
    print(C.table(["case", "state dtype", "formula bytes", "held bytes", "held - formula", "held before update / reset defaults"],
                  verify_formula()))

    D, L = a.peak or ((512, 8) if a.quick else (1024, 16))
    print(f"\n## 2. compute() peak memory (fresh subprocess per row, D={D} x {L} layers)")
    rows = []
    for dtype_name in ("float64", "float32"):
        r = measure_peak(D, L, dtype_name)[0]
        extra = r["hwm"] - r["rss_before"]
        rows.append([dtype_name, f"{r['formula'] / MiB:.1f}", f"{r['held'] / MiB:.1f}", f"{r['rss_before'] / MiB:.1f}",
                     f"{extra / MiB:.1f}", extra / r["held"], f"{(r['peak_sampled'] - r['rss_before']) / MiB:.1f}",
                     f"{r['seconds']:.2f}", "yes" if r["hwm_reset"] else "NO (VmHWM is the process peak)"])
    print(C.table(["state", "formula MiB", "held MiB", "RSS before compute MiB", "peak extra in compute MiB",
                   "peak extra / state", "sampled peak extra MiB", "compute s", "HWM reset"], rows))

    if a.world > 1:
        print(f"\n## 2b. compute() peak memory per rank on {a.world} gloo ranks (each fed 1/{a.world} of the tokens; "
              f"layer-sharded merge), D={D} x {L} layers, float64")
        rows = []
        for r_ in measure_peak(D, L, "float64", a.world):
            extra = r_["hwm"] - r_["rss_before"]
            rows.append([len(rows), f"{r_['held'] / MiB:.1f}", f"{extra / MiB:.1f}", extra / r_["held"],
                         f"{r_['seconds']:.2f}", "yes" if r_["hwm_reset"] else "NO"])
        print(C.table(["rank", "held MiB", "peak extra in compute MiB", "peak extra / state", "compute s", "HWM reset"], rows))

    print(f"\n## 3. State vs the official script's host memory (formula; official: (layers+1) x {a.tokens:,} tokens x D x N x 2 B fp16)")
    rows = []
    for D, L in ((4096, 32), (5120, 40), (8192, 80)):
        s64 = ModalityIntegrationRate.state_nbytes_for(L, D, F64)
        s32 = ModalityIntegrationRate.state_nbytes_for(L, D, F32)
        o100, o1000 = official_host_bytes(L, D, 100, a.tokens), official_host_bytes(L, D, 1000, a.tokens)
        rows.append([f"{D} x {L}", f"{s64 / GiB:.2f}", f"{s32 / GiB:.2f}", f"{o100 / GiB:.1f}", f"{o1000 / GiB:.0f}",
                     o100 / s64, o100 / s32, o1000 / s64])
    print(C.table(["D x layers", "state f64 GiB", "state f32 GiB", "official N=100 GiB", "official N=1000 GiB",
                   "official100 / f64", "official100 / f32", "official1000 / f64"], rows))
    print("The metric's state does not grow with N; the official script's host memory grows linearly with N.")


if __name__ == "__main__":
    main()
