"""update() throughput of ModalityIntegrationRate against the floor: a bare masked X^T X
product of the same tokens in the same dtype, accumulated into a D x D buffer.

    python benchmarks/bench_update.py            # D in {512, 1024, 2048}, 4 layers, batches [4, 512, D]
    python benchmarks/bench_update.py --quick    # D in {256, 512}, 2 layers, < 1 minute
    python benchmarks/bench_update.py --count-ops  # dispatched aten ops of one update_layer() call

Batches are float32 hidden states [layers, B, T, D] (synthetic LLM-like tokens); per sample a
32-token prefix (excluded), a vision span of T*5/16 tokens, then a caption of random length,
then padding: the two masks select ~60% of the positions (vision 31%, caption 5-23%). Routes, interleaved per round:

* ``update() f64``: ``metric.update(hidden, vision_mask, text_mask)``, float64 state;
* ``floor f64``: per layer and modality ``x = hidden[k][mask].to(float64)``,
  ``acc.addmm_(x.T, x)`` -- what any float64 second-moment accumulation must do;
* the same two with a float32 state and a float32 product.

Throughput counts selected positions (vision + text) per second, all layers of a batch
processed. The metric is warmed past its exact median buffer first (steady state: the
histogram path).
"""

from __future__ import annotations

import argparse
import time

import _common as C  # first: sets OMP_WAIT_POLICY before torch loads
import torch

from mir_lightning import ModalityIntegrationRate

F64, F32 = torch.float64, torch.float32


def make_batches(D: int, layers: int, n_batches: int, B: int, T: int, seed: int, device="cpu"):
    model = C.SyntheticLLM(D, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed)
    prefix, n_vis = 32, (T * 5) // 16
    batches = []
    for _ in range(n_batches):
        vm = torch.zeros(B, T, dtype=torch.bool)
        tm = torch.zeros(B, T, dtype=torch.bool)
        vm[:, prefix: prefix + n_vis] = True
        max_txt = T - prefix - n_vis
        for b in range(B):
            n_txt = int(torch.randint(max_txt // 6, (3 * max_txt) // 4 + 1, (1,), generator=g))
            tm[b, prefix + n_vis: prefix + n_vis + n_txt] = True
        hidden = torch.empty(layers, B, T, D, device=device)
        for k in range(layers):
            h = model.tokens("text", B * T, k).view(B, T, D)
            h[vm.to(device)] = model.tokens("vision", int(vm.sum()), k)
            hidden[k] = h
        batches.append((hidden, vm.to(device), tm.to(device)))
    return batches


class Floor:
    """Bare masked X^T X per layer and modality, accumulated in ``dtype``."""

    def __init__(self, layers: int, D: int, dtype: torch.dtype, device="cpu") -> None:
        self.dtype = dtype
        self.acc = torch.zeros(layers, 2, D, D, dtype=dtype, device=device)

    def update(self, hidden: torch.Tensor, vm: torch.Tensor, tm: torch.Tensor) -> None:
        for k in range(hidden.shape[0]):
            for j, mask in enumerate((vm, tm)):
                x = hidden[k][mask].to(self.dtype)
                self.acc[k, j].addmm_(x.mT, x)


def feeder(target, batches, per_call: int):
    state = {"i": 0}

    def call() -> None:
        for _ in range(per_call):
            hidden, vm, tm = batches[state["i"] % len(batches)]
            state["i"] += 1
            target.update(hidden, vm, tm)

    return call


def profile_update(metric: ModalityIntegrationRate, batches, runs: int = 3):
    """Wall-time breakdown of update() by patching the functions _fold calls (median of runs)."""
    import mir_lightning.metric as M

    acc: dict[str, float] = {}
    names = {
        ("metric", "_moments_update"): "co-moments (centred GEMMs + Chan merge, both modalities)",
        ("metric", "_norm_moments_update"): "norm moments",
        ("metric", "_tails_update"): "tails (one top-k for 2 modalities x 2 ends, entering rows copied)",
        ("metric", "_sketch_rows"): "median/norm sketches",
        ("M", "histogram_add_by_group"): "  of which histogram_add_by_group (grid position, scatter-add by column)",
        ("metric", "_validate"): "input validation (host-side shapes and dtypes)",
        ("metric", "_batch_index"): "mask positions and index tensors (once per batch)",
        ("metric", "_fold"): "_fold total",
    }

    samples = []
    for r in range(runs):
        acc.clear()
        with C.timed_patches(acc, [(M if o == "M" else metric, n, key) for (o, n), key in names.items()]):
            hidden, vm, tm = batches[r % len(batches)]
            t0 = time.perf_counter()
            metric.update(hidden, vm, tm)
            acc["total"] = time.perf_counter() - t0
        samples.append(dict(acc))
    med = {k: C.median([s.get(k, 0.0) for s in samples]) for k in set().union(*samples)}
    total = med["total"]
    fold = med.get("_fold total", 0.0)
    rows = []
    for key in names.values():
        if key != "_fold total":
            rows.append([key, med.get(key, 0.0), med.get(key, 0.0) / total])
    parts = sum(med.get(names[k], 0.0) for k in (("metric", "_moments_update"), ("metric", "_norm_moments_update"),
                                                  ("metric", "_tails_update"), ("metric", "_sketch_rows")))
    rows.append(["rest of _fold (norms, casts)", fold - parts, (fold - parts) / total])
    other = total - fold - med.get(names[("metric", "_validate")], 0.0) - med.get(names[("metric", "_batch_index")], 0.0)
    rows.append(["rest of update (index_select of the positions, .to(state dtype), loop, input-error check)", other, other / total])
    rows.append(["total update()", total, 1.0])
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hidden, vm, tm = batches[0]
        metric.update(hidden, vm, tm)
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40)
    return rows, ops


def sync_check(device: str, D: int = 256, layers_list=(1, 8), batches: int = 4) -> None:
    """Host syncs during steady-state update() against the number of layers: on CUDA the
    warnings of ``torch.cuda.set_sync_debug_mode("warn")``, on CPU the Python-level reads of
    tensor values (item, bool, int, float, tolist) that would be syncs on an accelerator."""
    import warnings

    rows = []
    for layers in layers_list:
        data = make_batches(D, layers, batches, 2, 256, seed=0, device=device)
        metric = ModalityIntegrationRate(layers, D, median_buffer=64, norm_buffer=64).to(device)
        for hidden, vm, tm in data[:2]:  # past the exact buffers
            metric.update(hidden, vm, tm)
        counted = [0]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        else:
            originals = {n: getattr(torch.Tensor, n) for n in ("item", "__bool__", "__int__", "__float__", "tolist")}
            for n, f in originals.items():
                setattr(torch.Tensor, n, lambda self, *a, _f=f, **k: (counted.__setitem__(0, counted[0] + 1), _f(self, *a, **k))[1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for hidden, vm, tm in data[2:]:
                metric.update(hidden, vm, tm)
        if device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode(0)
            counted[0] = sum("synchroniz" in str(w.message) for w in caught)
        else:
            for n, f in originals.items():
                setattr(torch.Tensor, n, f)
        rows.append([layers, len(data) - 2, counted[0], counted[0] / (len(data) - 2)])
    what = "sync warnings (set_sync_debug_mode)" if device.startswith("cuda") else "Python-level tensor value reads"
    print(f"## Host syncs in steady-state update() on {device}, D={D}")
    print(C.table(["layers", "update() calls", what, "per call"], rows))


def count_ops() -> None:
    """Dispatched aten ops (views included) of one steady-state update_layer() call, B 4, T 300,
    D 64 (400 vision, 400 text tokens), on the CPU path and the fixed-shape path of accelerators."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from mir_lightning import summaries

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.__name__] += 1
            return func(*args, **(kwargs or {}))

    vision = torch.zeros(4, 300, dtype=torch.bool)
    vision[:, 10:110] = True
    text = torch.zeros(4, 300, dtype=torch.bool)
    text[:, 110:210] = True
    hidden = torch.randn(4, 300, 64, generator=torch.Generator().manual_seed(0))
    original = summaries.fixed_shapes
    rows = []
    for regime, buffers, warm in (("exact medians", {}, 1), ("value median on its histogram", dict(median_buffer=64), 2),
                                  ("both medians on histograms", dict(median_buffer=64, norm_buffer=64), 2)):
        counts = []
        for fixed in (False, True):
            summaries.fixed_shapes = lambda device, _fixed=fixed: _fixed
            metric = ModalityIntegrationRate(2, 64, **buffers)
            for _ in range(warm):
                metric.update_layer(1, hidden, vision, text)
            counter = Counter()
            with counter:
                metric.update_layer(1, hidden, vision, text)
            counts.append(sum(counter.ops.values()))
        summaries.fixed_shapes = original
        rows.append([regime, *counts])
    print("## Dispatched aten ops of one steady-state update_layer() call, B 4, T 300, D 64 (400 vision, 400 text tokens)")
    print(C.table(["regime", "CPU path", "fixed shapes (accelerators)"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dims", type=int, nargs="+", default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    ap.add_argument("--batches-per-call", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--sync-check", default=None, metavar="DEVICE", help="only count host syncs of update() on DEVICE")
    ap.add_argument("--count-ops", action="store_true", help="only count the dispatched ops of one update_layer() call")
    a = ap.parse_args()
    if a.count_ops:
        C.setup(a.threads)
        count_ops()
        return
    if a.sync_check:
        C.setup(a.threads)
        print(C.machine_info(a.sync_check))
        sync_check(a.sync_check)
        return
    dims = a.dims or ([256, 512] if a.quick else [512, 1024, 2048])
    layers = a.layers or (2 if a.quick else 4)
    repeats = a.repeats or (3 if a.quick else 5)
    C.setup(a.threads)
    t_start = time.perf_counter()
    print(C.machine_info())
    print(f"bench_update: dims={dims} layers={layers} batches [{a.batch}, {a.seq}, D] float32 input, "
          f"{a.batches_per_call} batches per timed call, median of {repeats} interleaved rounds\n")
    headers = ["D", "state", "update() tokens/s", "floor tokens/s", "update / floor", "update s/call (min-max)", "floor s/call"]
    rows, ratios = [], {}
    profile_d = None
    for D in dims:
        batches = make_batches(D, layers, 3, a.batch, a.seq, a.seed + D)
        selected = C.median([float(vm.sum() + tm.sum()) for _, vm, tm in batches])
        frac = selected / (a.batch * a.seq)
        targets = {
            "update f64": ModalityIntegrationRate(layers, D),
            "floor f64": Floor(layers, D, F64),
            "update f32": ModalityIntegrationRate(layers, D, state_dtype=F32),
            "floor f32": Floor(layers, D, F32),
        }
        fewest = min(int(m.sum()) for _, vm, tm in batches for m in (vm, tm))
        warm = -(-targets["update f64"].median_buffer // fewest) + 1  # batches that pass the exact median buffer
        for t in targets.values():  # past the exact median buffer: steady state
            feeder(t, batches, warm)()
        calls = {k: feeder(t, batches, a.batches_per_call) for k, t in targets.items()}
        times = C.run_interleaved(calls, repeats, warmup=False)
        for dt in ("f64", "f32"):
            tu, tf = C.median(times[f"update {dt}"]), C.median(times[f"floor {dt}"])
            tok = selected * a.batches_per_call
            ratios[(D, dt)] = tf / tu
            rows.append([D, dt, f"{tok / tu:,.0f}", f"{tok / tf:,.0f}", tf / tu,
                         f"{tu:.3g} ({min(times[f'update {dt}']):.3g}-{max(times[f'update {dt}']):.3g})", f"{tf:.3g}"])
        print(f"D={D}: {selected:.0f} selected positions per batch ({frac:.0%} of {a.batch}x{a.seq}), {layers} layers", flush=True)
        if profile_d is None or D == 1024 or (D > profile_d[0] and profile_d[0] != 1024):
            profile_d = (D, targets["update f64"], batches)
    print()
    print(C.table(headers, rows))
    worst = min(ratios.values())
    print(f"\nTarget: update / floor >= 0.7 (worst measured: {worst:.2f}).")
    if not a.no_profile and profile_d is not None:
        D, metric, batches = profile_d
        prow, ops = profile_update(metric, batches)
        print(f"\n## Where update() spends its time (D={D}, {layers} layers, float64 state, one batch)")
        print(C.table(["part", "s", "share"], prow))
        print("\ntorch.profiler, top aten ops by self CPU time (one update()):")
        print(ops)
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
