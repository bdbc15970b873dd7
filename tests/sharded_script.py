"""Run MIRProbe on a tiny LLaVA sharded by real engines, on W gloo ranks (CPU).

    python tests/sharded_script.py --world 2 --engines fsdp2,fsdp1,peft_ddp --batches 5 --out DIR
    DS_ACCELERATOR=cpu python tests/sharded_script.py --world 2 --engines deepspeed --batches 5 --out DIR
    python tests/sharded_script.py --world 2 --engines fsdp2 --then-unequal 8 --batches 5 --out DIR
    python tests/sharded_script.py --world 2 --engines fsdp2 --budget-layers 1 --batches 5 --out DIR

Each rank writes ``DIR/{engine}_rank{r}.json`` with the probe's MIR, per-layer FD, forward
count, passes and the hooked modules' classes and names. ``--budget-layers N`` gives the
probe ``max_state_bytes`` = the state of N layers, so it measures the layers in passes. ``--then-unequal S`` then runs the forwards
the old way (rank r takes batches r, r + W, ...) under FSDP2 on a process group with an
S-second timeout: ranks run different numbers of forwards, so one waits in an all-gather that
never comes, and the timeout turns the hang into a non-zero exit (it prints
``UNEQUAL-START`` first and ``UNEQUAL-FAILED rank r after t s: <error>`` for each rank
that raised). Ranks are started with ``torch.multiprocessing.spawn``;
every process group has a ``--timeout`` so nothing can hang forever.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from distributed_helpers import free_port, process_group  # noqa: E402


def _hooked(probe, wrapped) -> list[list[str]]:
    """(class, qualified name inside the wrapper) of each module the probe hooked."""
    names = {id(m): n for n, m in wrapped.named_modules()}
    return [[type(m).__name__, names.get(id(m), "?")] for m in probe.measurement.targets.modules]


def _run_engine(engine: str, rank: int, world: int, n_batches: int, out: str, budget_layers: int = 0) -> None:
    from sharded_common import build_model, probe_batches, shard

    from mir_lightning import ModalityIntegrationRate
    from mir_lightning.probe import MIRProbe

    wrapped = shard(build_model(engine), engine, world)
    budget = ModalityIntegrationRate.state_nbytes_for(budget_layers, 64) if budget_layers else None
    probe = MIRProbe(probe_batches(n_batches), hidden_size=64, max_state_bytes=budget)
    result = probe.run(wrapped)
    record = {
        "engine": engine,
        "rank": rank,
        "world": world,
        "mir": float(result.mir),
        "per_layer_fd": [float(x) for x in result.per_layer_fd],
        "forwards": int(result.forwards),
        "passes": int(result.passes),
        "error": result.error,
        "layer_ids": list(result.layers),
        "hooked": _hooked(probe, wrapped),
        "wrapper": type(wrapped).__name__,
    }
    with open(os.path.join(out, f"{engine}_rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()


def _run_unequal(rank: int, world: int, n_batches: int, timeout: float) -> None:
    """The pre-fix probe loop: rank-strided batches, no padding forwards (hangs under FSDP2)."""
    from sharded_common import build_model, probe_batches, shard

    group = dist.new_group(timeout=datetime.timedelta(seconds=timeout))
    wrapped = shard(build_model("fsdp2"), "fsdp2", world, group=group)
    dist.barrier(group)
    if rank == 0:
        print("UNEQUAL-START", flush=True)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for batch in itertools.islice(probe_batches(n_batches), rank, None, world):
                wrapped(**batch)
        dist.barrier(group)
    except Exception as err:  # the rank that timed out first, or its peer seeing the connection close
        print(f"UNEQUAL-FAILED rank {rank} after {time.perf_counter() - start:.1f} s: "
              f"{type(err).__name__}: {str(err).splitlines()[0]}", flush=True)
        raise


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    with process_group(rank, world, port, args.timeout):
        for engine in filter(None, args.engines.split(",")):
            _run_engine(engine, rank, world, args.batches, args.out, args.budget_layers)
        if args.then_unequal:
            _run_unequal(rank, world, args.batches, args.then_unequal)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--engines", default="fsdp2,fsdp1,peft_ddp")
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-layers", type=int, default=0, help="max_state_bytes = the state of this many layers")
    ap.add_argument("--timeout", type=float, default=90.0, help="process-group timeout, seconds")
    ap.add_argument("--then-unequal", type=float, default=0.0, metavar="S",
                    help="then run unequal forward counts under FSDP2 with an S-second timeout (must fail)")
    args = ap.parse_args()
    if "deepspeed" in args.engines.split(","):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from sharded_common import extension_cache_dir

        os.environ.setdefault("TORCH_EXTENSIONS_DIR", extension_cache_dir())
    mp.spawn(_worker, args=(args.world, free_port(), args), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
