"""GPU check: compute() at D=4096 x 32 layers and update() throughput against the bare
masked X^T X product, on one CUDA device (< 3 minutes on an H100-class GPU).

    python benchmarks/gpu_check.py                     # CUDA, D=4096 x 32 layers
    python benchmarks/gpu_check.py --device cpu --quick    # CPU smoke run, D=1024 x 4 layers

Steps (every timing synchronises the device before and after; each route is warmed up on a
small case first):
1. feed a float64-state and a float32-state metric with synthetic LLM-like tokens
   (vision 1.25 D, text 1.5 D tokens per layer, streamed in chunks), keeping layer 0's tokens;
2. compute() (float64 state) ``--repeats`` times, against the floor: one float64 eigvalsh
   per layer of the same size on the same device; compute() of the float32 state once;
   peak device memory during compute() against the state;
3. accuracy of layer 0 against a float64 reference computed from its materialised tokens
   (3-sigma rule with exact medians, Bures/Procrustes form);
4. update() throughput (batches [4, 1024, D], ~60% of positions selected) against the bare
   masked X^T X product, float64 and float32, interleaved.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import _common as C  # first: sets OMP_WAIT_POLICY before torch loads
import torch

from mir_lightning import ModalityIntegrationRate

F64, F32 = torch.float64, torch.float32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="D=1024 x 4 layers (a smoke run; on CPU < 1 minute)")
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2, help="CPU intra-op threads (CPU runs)")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="skip remaining repeats once this much wall time has passed")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here; run with --device cpu --quick for a CPU smoke run.", file=sys.stderr)
        return 2
    D = a.dim or (1024 if a.quick else 4096)
    L = a.layers or (4 if a.quick else 32)
    T = a.seq or (256 if a.quick else 1024)
    if dev.type == "cpu":
        C.setup(a.threads)
    warnings.simplefilter("ignore")
    t_start = time.perf_counter()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    print(C.machine_info(str(dev)))
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        print(f"device: {torch.cuda.get_device_name(dev)} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    print(f"gpu_check: D={D} x {L} layers on {dev}\n")

    import _reference as BC  # reference math (same folder, torch only)
    import bench_update as BU

    # ---- warm-up of every route on a small case (kernels, cuBLAS/cuSOLVER handles)
    wm = ModalityIntegrationRate(2, 64).to(dev)
    wmodel = C.SyntheticLLM(64, seed=9, device=dev)
    for k in range(2):
        BC.feed(wm, k, wmodel.tokens("vision", 700, k), wmodel.tokens("text", 800, k))
    wm.compute()
    torch.linalg.eigvalsh(torch.eye(64, dtype=F64, device=dev))
    wb = BU.make_batches(64, 2, 1, 2, 64, 0, device=dev)
    for t in (ModalityIntegrationRate(2, 64).to(dev), BU.Floor(2, 64, F64, dev),
              ModalityIntegrationRate(2, 64, state_dtype=F32).to(dev), BU.Floor(2, 64, F32, dev)):
        BU.feeder(t, wb, 1)()
    sync()
    del wm, wmodel, wb

    # ---- 1. feed
    model = C.SyntheticLLM(D, seed=0, device=dev)
    nv, nt = int(1.25 * D), int(1.5 * D)
    m64 = ModalityIntegrationRate(L, D).to(dev)
    m32 = ModalityIntegrationRate(L, D, state_dtype=F32).to(dev)
    keep = None
    feed_s = 0.0
    for k in range(L):
        v, t = model.tokens("vision", nv, k), model.tokens("text", nt, k)
        sync()
        t0 = time.perf_counter()
        BC.feed(m64, k, v, t, chunk=2048)
        sync()
        feed_s += time.perf_counter() - t0
        BC.feed(m32, k, v, t, chunk=2048)
        if k == 0:
            keep = (v, t)
        del v, t
    sync()
    print(f"fed {L} layers x ({nv} vision + {nt} text) tokens: update_layer() float64 total {feed_s:.2f} s")

    # ---- 2. compute() vs floor
    state_bytes = m64.state_nbytes()
    t_compute, t_floor, peak_extra = [], [], math.nan
    floor_mats = [m64.text_m2[k] for k in range(L)]  # D x D float64 on the device: the floor's input
    for r in range(a.repeats):
        if r and time.perf_counter() - t_start > a.budget_s:
            print(f"(budget reached: {r} repeat(s) timed)")
            break
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        m64._computed = None
        m64._results = None
        t_compute.append(C.time_call(m64.compute, sync))
        if dev.type == "cuda":
            peak_extra = torch.cuda.max_memory_allocated(dev) - base
        t_floor.append(C.time_call(lambda: [torch.linalg.eigvalsh(s) for s in floor_mats], sync))
    mir64 = float(m64.compute())
    m32._computed = None
    t32 = C.time_call(m32.compute, sync)
    mir32 = float(m32.compute())
    tc, tf = C.median(t_compute), C.median(t_floor)
    rows = [["compute() float64 state", f"{tc:.2f}", f"{min(t_compute):.2f}-{max(t_compute):.2f}", tc / tf],
            ["compute() float32 state (once)", f"{t32:.2f}", "", t32 / tf],
            [f"floor: {L} x eigvalsh({D}x{D}) float64", f"{tf:.2f}", f"{min(t_floor):.2f}-{max(t_floor):.2f}", 1.0]]
    print(C.table(["route", "s (median)", "min-max", "x floor"], rows))
    print(f"MIR float64 state {mir64:.8f}, float32 state {mir32:.8f} (|diff| {abs(mir64 - mir32):.2e})")
    print(f"state {state_bytes / 2**30:.2f} GiB (float64); peak extra device memory during compute() "
          f"{peak_extra / 2**20:.0f} MiB ({peak_extra / state_bytes:.3f} x state)" if dev.type == "cuda"
          else f"state {state_bytes / 2**30:.2f} GiB (float64)")

    # ---- 3. accuracy of layer 0
    v, t = keep
    ref = BC.layer_stats(v, t, F64)
    fd_ref = BC.bures_fd(ref["mu_v"], ref["S_v"], ref["mu_t"], ref["S_t"])
    fd0 = float(m64.per_layer_fd()[0])
    fd0_32 = float(m32.per_layer_fd()[0])
    print(f"layer 0 FD: reference {fd_ref:.10g}; compute() float64 rel err {abs(fd0 - fd_ref) / fd_ref:.2e}, "
          f"float32 state {abs(fd0_32 - fd_ref) / fd_ref:.2e} (includes the default median sketch)")
    del keep, v, t, ref, m32, model
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # ---- 4. update() throughput
    del m64
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    batches = BU.make_batches(D, L, 2, 4, T, 1, device=dev)
    selected = C.median([float(vm.sum() + tm.sum()) for _, vm, tm in batches])
    targets = {
        "update f64": ModalityIntegrationRate(L, D).to(dev), "floor f64": BU.Floor(L, D, F64, dev),
        "update f32": ModalityIntegrationRate(L, D, state_dtype=F32).to(dev), "floor f32": BU.Floor(L, D, F32, dev),
    }
    for tg in targets.values():
        BU.feeder(tg, batches, 1)()
    sync()
    calls = {k: BU.feeder(tg, batches, 2) for k, tg in targets.items()}
    times = C.run_interleaved(calls, 3, sync=sync, warmup=False, settle=0.0 if dev.type == "cuda" else 0.1)
    rows = []
    for dt in ("f64", "f32"):
        tu, tfl = C.median(times[f"update {dt}"]), C.median(times[f"floor {dt}"])
        rows.append([dt, f"{2 * selected / tu:,.0f}", f"{2 * selected / tfl:,.0f}", tfl / tu])
    print(f"\nupdate(): batches [4, {T}, {D}] x {L} layers, {selected:.0f} selected positions per batch")
    print(C.table(["state", "update() tokens/s", "floor tokens/s", "update / floor"], rows))
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
