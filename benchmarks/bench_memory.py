"""Metric state size and compute() peak memory, against the official script's host memory.

    python benchmarks/bench_memory.py            # peak measured at D=1024 x 16 layers
    python benchmarks/bench_memory.py --quick    # peak measured at D=512 x 8 layers (< 1 minute)

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
    ap.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(int(a.child[0]), int(a.child[1]), a.child[2], int(a.child[3]), int(a.child[4]))
        return
    C.setup(2)
    warnings.simplefilter("ignore")
    t_start = time.perf_counter()
    print(C.machine_info())
    print()
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
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
