"""Validation overhead of MIRCallback on the example model, against the covariance flop floor.

The example's frozen SmolLM2-135M (hidden 576, 30 decoder layers) with its projector, on the
example's probe of 100 held-out MNIST digits (batches of 50; 9 image tokens and a short
caption per sample; BOS and system prompt excluded). Two routes, interleaved round by round in
one process: ``trainer.validate(model, probe)`` without callbacks, and the same with
``MIRCallback`` capturing every decoder layer through forward hooks.

The floor: tracking MIR needs at least the covariance products, ``2 * D^2`` flops per selected
token per tracked layer. Their share of the validation's forward flops (counted by
``torch.utils.flop_counter.FlopCounterMode`` on the same batches) times the validation time
without the callback is the floor time. Target: extra time <= 2x the floor.

The extra time splits into the per-token part (hooks, masks, ``update_layer``) and the fixed
``compute()`` at the end of each validation run (Cholesky + ``eigvalsh`` of ``L`` matrices of
``D x D``, independent of the number of tokens). Both are reported; the ratio is given for the
whole and for the per-token part, whose share grows with the validation set.

    python benchmarks/bench_callback.py            # real example parts (see examples/requirements-parts.txt)
    python benchmarks/bench_callback.py --tiny     # random tiny parts, a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as C  # first: sets OMP_WAIT_POLICY before torch loads
import torch
from torch.utils.flop_counter import FlopCounterMode

from mir_lightning import MIRCallback
from mir_lightning.models.transformers import find_hidden_state_modules

sys.path.insert(0, str(C.REPO / "examples"))
import lvlm  # noqa: E402  (the example's parts and model)
from lvlm_lightning import LVLMPretrainer, quiet_known_noise  # noqa: E402


def build(tiny: bool, n_val: int, batch: int):
    """The example's frozen LLM + projector (a LightningModule) and its probe dataloader (validation set)."""
    parts = lvlm.load_parts(tiny, 160 if tiny else 1800, n_val)  # the example's split and feature cache
    _, probe = parts.loaders(batch_size=1, probe_batch_size=batch)
    return LVLMPretrainer(parts.model()), probe


def validate(model, probe, callbacks) -> None:
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.validate(model, probe, verbose=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="random tiny parts of the example (no weight packages)")
    ap.add_argument("--n-val", type=int, default=100, help="probe samples (multiple of 10)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    C.setup(a.threads)
    quiet_known_noise()
    t_start = time.time()
    print(C.machine_info())

    model, probe = build(a.tiny, a.n_val, a.batch)
    layers = find_hidden_state_modules(model.model.llm)
    L_, D = len(layers), model.model.llm.config.hidden_size

    # forward flops of one validation run, counted on the same batches
    with FlopCounterMode(display=False) as counter:
        validate(model, probe, [])
    forward_flops = counter.get_total_flops()

    compute_s: dict[int, list[float]] = {}  # seconds of the callback's compute() per validation run

    def validate_with(callback: MIRCallback) -> None:
        acc: dict[str, float] = {}
        with C.timed_patches(acc, [(callback.measurement, "finish", "compute")]):
            validate(model, probe, [callback])
        compute_s.setdefault(id(callback), []).append(acc.get("compute", 0.0))

    def make_callback(state_dtype: torch.dtype) -> MIRCallback:
        callback = MIRCallback(log_figures=False, state_dtype=state_dtype)
        validate(model, probe, [callback])  # allocates the metric's state once, as in training
        return callback

    callbacks = {"float64 state (default)": make_callback(torch.float64), "float32 state": make_callback(torch.float32)}
    stats = callbacks["float64 state (default)"].metric.per_layer_stats()
    selected = int(stats["n_vision"][0] + stats["n_text"][0])
    cov_flops = 2 * D * D * L_ * selected
    routes = {"without callback": lambda: validate(model, probe, [])}
    routes.update({f"MIRCallback, {name}": (lambda cb=cb: validate_with(cb)) for name, cb in callbacks.items()})
    times = C.run_interleaved(routes, repeats=a.repeats, warmup=False)
    t_without = C.median(times["without callback"])
    floor_share = cov_flops / forward_flops
    floor_s = floor_share * t_without

    print(f"\n{'tiny random parts' if a.tiny else 'SmolLM2-135M + EfficientNet-Lite0'}: {L_} decoder layers, D={D}; "
          f"probe {a.n_val} samples in batches of {a.batch}; {selected} selected tokens per layer "
          f"({int(stats['n_vision'][0])} vision + {int(stats['n_text'][0])} text); "
          f"median of {a.repeats} interleaved rounds\n")
    print(C.table(["quantity", "value"], [
        ["forward GFLOP per validation run (FlopCounterMode)", C.fmt(forward_flops / 1e9)],
        ["covariance GFLOP (2 D^2 x layers x selected tokens)", C.fmt(cov_flops / 1e9)],
        ["flop floor: covariance / forward", C.fmt(floor_share)],
        ["validation s without callback (min-max)", f"{C.fmt(t_without)} ({C.fmt(min(times['without callback']))}"
                                                    f"-{C.fmt(max(times['without callback']))})"],
        ["floor s (flop floor x time without)", C.fmt(floor_s)],
    ]))
    rows = []
    for name, cb in callbacks.items():
        t = times[f"MIRCallback, {name}"]
        extra = C.median(t) - t_without
        t_compute = C.median(compute_s[id(cb)])
        per_token = extra - t_compute
        rows.append([name, f"{C.fmt(C.median(t))} ({C.fmt(min(t))}-{C.fmt(max(t))})", C.fmt(extra), C.fmt(t_compute),
                     C.fmt(per_token), C.fmt(extra / floor_s), C.fmt(per_token / floor_s), C.fmt(extra / t_without)])
    print()
    print(C.table(["MIRCallback", "validation s (min-max)", "extra s", "compute() s", "per-token part s",
                   "extra / floor (target <= 2)", "per-token / floor", "extra / time without"], rows))
    print(f"\ntotal wall time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
