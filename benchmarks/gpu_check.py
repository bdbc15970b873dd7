"""GPU check: compute() at D=4096 x 32 layers and update() throughput against the bare
masked X^T X product on one CUDA device, then the scale checks of issue 12 (step 5). Steps
1-4 take < 3 minutes on an H100-class GPU; the whole script is meant to end in < 8 minutes
(67 s on an H200; table in benchmarks/RESULTS.md).

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
   masked X^T X product, float64 and float32, interleaved;
5. scale checks (issue 12), one table: host syncs inside steady-state update() counted with
   ``torch.cuda.set_sync_debug_mode("warn")`` (on CPU: calls of ``Tensor.item``/``bool``/
   ``int``/``float``/``tolist``, a proxy); ``MIRProbe`` on a tiny LLaVA (tests/vlm_factory.py)
   unsharded, under FSDP2 ``fully_shard`` in a one-rank world (nccl on CUDA, gloo on CPU),
   compiled with ``torch.compile`` and, when deepspeed is installed (CUDA only), under ZeRO-3
   in a one-rank world, each against the single-process float64 reference on materialised
   tokens (tests/reference.py), with the probe's wall time.

6. the budgeted probe of a 7B-shaped model (issue 18): ``MIRProbe`` over a
   ``_common.ShapedStack`` of D x L (LLaMA-7B's 4096 x 32; quick: 1024 x 4) with LLM-like
   tokens, without a budget, with ``max_state_bytes`` = the state of L/3 layers, and with the
   default budget (a share of the free CUDA memory): passes, forwards, peak extra device memory
   (``max_memory_allocated`` - before), memory allocated before and after ``run()`` (equal:
   nothing held), reserved after, per-layer FD against the unbudgeted run, and torch's CPU and
   CUDA generator states before/after (equal).

    python benchmarks/gpu_check.py --steps scale --device cpu --quick   # step 5 only (CPU smoke)
    python benchmarks/gpu_check.py --steps probe                        # step 6 only
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings

import _common as C  # first: sets OMP_WAIT_POLICY before torch loads
import torch
from collections.abc import Iterator

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
    ap.add_argument("--steps", choices=("all", "core", "scale", "probe"), default="all",
                    help="core: steps 1-4; scale: step 5 (issue 12 checks); probe: step 6 (issue 18); all: every step")
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
    if a.steps in ("all", "core"):
        core_checks(dev, D, L, T, a, t_start, sync)
    if a.steps in ("all", "scale"):
        print("\n5. scale checks (issue 12)")
        print(C.table(["check", "result", "expected", "status"], scale_checks(dev, a.quick, sync)))
    if a.steps in ("all", "probe"):
        print(f"\n6. budgeted probe (issue 18): ShapedStack D={D} x {L} layers on {dev}")
        print(C.table(["max_state_bytes", "passes", "forwards", "state GiB (all layers)", "peak extra GiB",
                       "allocated before -> after run() (bytes)", "reserved after GiB", "FD vs one pass", "run() s",
                       "RNG unchanged", "status"], budgeted_probe(dev, D, L, sync)))
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    return 0


def core_checks(dev: torch.device, D: int, L: int, T: int, a: argparse.Namespace, t_start: float, sync) -> None:
    """Steps 1-4 (see the module docstring)."""

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


# ----------------------------------------------------------------------------- step 5
TESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
PROBE_BATCHES = 5
# The float32 forward of the tiny LLaVA on another device (or compiled) differs from the CPU
# one by ~1e-7 relative per hidden state; MIR moves by about as much. Sharding or the
# probe's own bookkeeping must not add to it (1e-12 against the same device unsharded).
MIR_TOL_DEVICE = 1e-4
MIR_TOL_SAME = 1e-9


@contextlib.contextmanager
def count_host_syncs(dev: torch.device) -> Iterator[list[int]]:
    """Count host syncs inside the block: CUDA's sync debug mode warnings on CUDA; on CPU
    (no syncs exist) calls of the tensor-to-Python conversions that would sync on a GPU."""
    count = [0]
    if dev.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield count
            finally:
                torch.cuda.set_sync_debug_mode("default")
        count[0] = sum("synchroniz" in str(w.message) for w in caught)
        return
    names = ("item", "__bool__", "__int__", "__float__", "tolist")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def counting(original):
        def wrapper(self, *args, **kwargs):
            count[0] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for n, f in originals.items():
        setattr(torch.Tensor, n, counting(f))
    try:
        yield count
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)


def update_syncs(dev: torch.device, quick: bool, sync) -> list[list[object]]:
    """Host syncs per steady-state update() (float64 and float32 state), after warm-up."""
    import bench_update as BU

    D, L = (256, 4) if quick else (4096, 8)
    batches = BU.make_batches(D, L, 2, 2, 256 if quick else 1024, 3, device=dev)
    rows = []
    for dtype in (F64, F32):
        metric = ModalityIntegrationRate(L, D, state_dtype=dtype).to(dev)
        for hidden, vm, tm in batches:  # warm-up: buffers filled, medians settled
            metric.update(hidden, vm, tm)
        sync()
        with count_host_syncs(dev) as count:
            for hidden, vm, tm in batches:
                metric.update(hidden, vm, tm)
            sync_free = count[0]
        per_call = sync_free / len(batches)
        kind = "CUDA sync warnings" if dev.type == "cuda" else "CPU proxy: .item/bool/int/float/tolist calls"
        rows.append([f"update() host syncs per call, {str(dtype)[6:]} state, {L} layers ({kind})",
                     f"{per_call:.1f} ({per_call / L:.2f} per layer)", "0 per layer (issue 12 item 6)",
                     "ok" if sync_free == 0 else "SYNCS"])
    return rows


def _tiny_llava_parts():
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import sharded_common

    return sharded_common


def _probe_row(name: str, run, mir_ref: float, tol: float, expected: str) -> tuple[list[object], float]:
    try:
        result = run()
    except Exception as err:  # one failing engine must not hide the others
        return [name, f"raised {type(err).__name__}: {str(err)[:120]}", expected, "FAIL"], math.nan
    if result.error is not None:
        return [name, f"error: {result.error[:120]}", expected, "FAIL"], math.nan
    diff = abs(result.mir - mir_ref)
    return [name, f"|dMIR| {diff:.1e}, probe {result.seconds:.2f} s, {result.forwards} forwards", expected,
            "ok" if diff <= tol else "MISMATCH"], result.mir


def probe_parity(dev: torch.device, quick: bool, sync) -> list[list[object]]:
    """MIRProbe unsharded / FSDP2 (one rank) / compiled / ZeRO-3 (one rank) against the
    float64 reference and against each other."""
    import datetime
    import socket

    import torch.distributed as dist

    from mir_lightning.probe import MIRProbe

    sc = _tiny_llava_parts()
    rows: list[list[object]] = []
    mir_ref, _ = sc.reference_result("fsdp2", PROBE_BATCHES)  # CPU float64, materialised tokens
    batches = sc.probe_batches(PROBE_BATCHES)

    def probe() -> MIRProbe:
        return MIRProbe(batches, hidden_size=64)

    plain = sc.build_model("fsdp2").to(dev)
    row, mir_plain = _probe_row("MIRProbe, unsharded", lambda: probe().run(plain), mir_ref, MIR_TOL_DEVICE,
                                f"= float64 reference (<= {MIR_TOL_DEVICE:g}, float32 forward on {dev.type})")
    rows.append(row)
    mir_same = mir_plain if math.isfinite(mir_plain) else mir_ref
    started = False
    if not (dist.is_available() and dist.is_initialized()):
        with socket.socket() as s_:
            s_.bind(("127.0.0.1", 0))
            port = s_.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=120))
        started = True
    try:
        sharded = sc.shard(sc.build_model("fsdp2").to(dev), "fsdp2", 1, device_type=dev.type)
        row, _ = _probe_row("MIRProbe, FSDP2 fully_shard (1 rank)", lambda: probe().run(sharded), mir_same,
                            MIR_TOL_SAME, f"= unsharded on {dev.type} (<= {MIR_TOL_SAME:g})")
        rows.append(row)
        del sharded
        rows.append(hf_trainer_fsdp_row(dev, sc, batches, mir_same))
        if dev.type == "cuda":
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                rows.append(["MIRProbe, DeepSpeed ZeRO-3 (1 rank)", "skipped: deepspeed not installed", "", "skip"])
            else:
                engine = sc.shard(sc.build_model("fsdp2").to(dev), "deepspeed", 1)
                row, _ = _probe_row("MIRProbe, DeepSpeed ZeRO-3 (1 rank)", lambda: probe().run(engine), mir_same,
                                    MIR_TOL_SAME, f"= unsharded on {dev.type} (<= {MIR_TOL_SAME:g})")
                rows.append(row)
                del engine
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()
    if quick and dev.type == "cpu":
        rows.append(["MIRProbe, torch.compile(model)", "skipped in --quick on CPU (inductor build)", "", "skip"])
        return rows
    compiled = torch.compile(sc.build_model("fsdp2").to(dev))
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(**{k: v.to(dev) for k, v in batches[0].items()})  # compile once, as training would
        sync()
        compile_s = time.perf_counter() - t0
    except Exception as err:
        rows.append(["MIRProbe, torch.compile(model)", f"compile raised {type(err).__name__}: {str(err)[:100]}", "",
                     "FAIL"])
        return rows
    row, _ = _probe_row(f"MIRProbe, torch.compile(model) (compiled in {compile_s:.0f} s)",
                        lambda: probe().run(compiled), mir_same, MIR_TOL_DEVICE,
                        f"= unsharded (<= {MIR_TOL_DEVICE:g}) or a clear error")
    rows.append(row)
    return rows


def hf_trainer_fsdp_row(dev: torch.device, sc, batches, mir_same: float) -> list[object]:
    """HF ``Trainer(fsdp="full_shard")`` in the one-rank world, one step at learning rate 0
    (weights unchanged), MIRTrainerCallback probing after it. On CPU accelerate runs no FSDP
    (the row says which wrapper the Trainer used)."""
    name = "MIRTrainerCallback, HF Trainer fsdp='full_shard' (1 rank)"
    try:
        from mir_lightning.adapters.hf_trainer import MIRTrainerCallback
    except ImportError:
        return [name, "skipped: mir_lightning.adapters.hf_trainer not present", "", "skip"]
    import tempfile

    from transformers import Trainer, TrainingArguments

    expected = f"= unsharded on {dev.type} (<= {MIR_TOL_SAME:g}), model wrapped by FSDP"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(
                output_dir=tmp, max_steps=1, learning_rate=0.0, weight_decay=0.0, per_device_train_batch_size=1,
                report_to=[], save_strategy="no", logging_strategy="no", remove_unused_columns=False,
                use_cpu=dev.type == "cpu", fsdp="full_shard",
                fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
            )
            callback = MIRTrainerCallback(batches, every_n_steps=1, hidden_size=64)
            trainer = Trainer(model=sc.build_model("fsdp2").to(dev), args=args, train_dataset=batches[:1],
                              data_collator=lambda items: {**items[0], "labels": items[0]["input_ids"]},
                              callbacks=[callback])
            trainer.train()
            wrapper = type(trainer.model_wrapped).__name__
        mir = float(callback.history[-1]["mir"])
    except Exception as err:
        return [name, f"raised {type(err).__name__}: {str(err)[:120]}", expected, "FAIL"]
    diff = abs(mir - mir_same)
    sharded = "FullyShardedDataParallel" in wrapper or wrapper.startswith("FSDP")  # FSDP1 or FSDP2 class
    status = "ok" if diff <= MIR_TOL_SAME and sharded else (
        "MISMATCH" if diff > MIR_TOL_SAME else "no FSDP")
    return [name, f"|dMIR| {diff:.1e}, wrapper {wrapper}", expected, status]


def scale_checks(dev: torch.device, quick: bool, sync) -> list[list[object]]:
    """Step 5: the rows of one table (a check that raises becomes a FAIL row, the others still run)."""
    rows: list[list[object]] = []
    for check in (update_syncs, probe_parity):
        try:
            rows += check(dev, quick, sync)
        except Exception as err:
            rows.append([check.__name__, f"raised {type(err).__name__}: {str(err)[:160]}", "", "FAIL"])
    return rows


# ----------------------------------------------------------------------------- step 6
def _allocated(dev: torch.device) -> int:
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else C.live_tensor_bytes("cpu")


def _rng_state(dev: torch.device) -> list[torch.Tensor]:
    return [torch.random.get_rng_state(), *(torch.cuda.get_rng_state_all() if dev.type == "cuda" else [])]


def budgeted_probe(dev: torch.device, D: int, L: int, sync) -> list[list[object]]:
    """Step 6: one row per budget (none, L/3 layers' state, the default)."""
    from mir_lightning import MIRProbe
    from mir_lightning.probe import default_state_budget

    model = C.ShapedStack(D, L, device=dev)
    batches = C.shaped_probe_batches(C.SyntheticLLM(D, seed=2, device=dev))
    state = ModalityIntegrationRate.state_nbytes_for(L, D)
    third = ModalityIntegrationRate.state_nbytes_for(max(1, L // 3), D)
    default = default_state_budget(dev)
    rows, base = [], None
    for name, budget in (("none", None), (f"{max(1, L // 3)} layers: {third / 2**30:.2f} GiB", third),
                         (f"default: {'none' if default is None else f'{default / 2**30:.1f} GiB'}", "default")):
        probe = MIRProbe(batches, layers=list(model.layers), hidden_size=D,
                         **({} if budget == "default" else {"max_state_bytes": budget}))
        sync()
        rng = _rng_state(dev)
        before = _allocated(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            result = probe.run(model)
        except Exception as err:  # one failing row must not hide the others
            rows.append([name, "", "", "", "", "", "", "", "", "", f"raised {type(err).__name__}: {str(err)[:80]}"])
            continue
        sync()
        peak = torch.cuda.max_memory_allocated(dev) - before if dev.type == "cuda" else math.nan
        fd, passes, forwards, seconds, error = (result.per_layer_fd.tolist(), result.passes, result.forwards,
                                                result.seconds, result.error)
        del probe, result  # (the result's small CPU tensors would count on CPU)
        after = _allocated(dev)
        base = fd if base is None else base
        fd_err = max(abs(x / y - 1) for x, y in zip(fd, base))
        same_rng = all(torch.equal(x, y) for x, y in zip(rng, _rng_state(dev)))
        reserved = torch.cuda.memory_reserved(dev) / 2**30 if dev.type == "cuda" else math.nan
        ok = error is None and after == before and same_rng and fd_err <= 1e-12
        rows.append([name, passes, forwards, f"{state / 2**30:.2f}", f"{peak / 2**30:.2f}", f"{before:,} -> {after:,}",
                     f"{reserved:.2f}", f"{fd_err:.1e}", f"{seconds:.1f}", "yes" if same_rng else "NO",
                     "ok" if ok else (error or "CHECK")[:80]])
    del model, batches
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    sys.exit(main())
