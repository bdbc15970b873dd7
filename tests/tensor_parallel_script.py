"""MIRProbe on a tiny Llama under tensor parallelism: 4 gloo ranks as a 2 x 2 (dp, tp) mesh (CPU).

    python tests/tensor_parallel_script.py --out DIR [--timeout 60]

The model (2 layers, D 32, float64) is built from a config with the same seed on every rank
and sharded with ``parallelize_module`` over the mesh's ``tp`` dimension in three plans:

* ``tp``: ColwiseParallel / RowwiseParallel in attention and MLP: layer outputs are plain,
  replicated tensors (tensor-parallel peers hold the same tokens);
* ``sp``: the same plus SequenceParallel norms, the embedding and the row-wise projections
  giving ``Shard(1)`` DTensors (``use_local_output=False``), and an LM head whose output is a
  ``Replicate()`` DTensor; measured on the default layers and on
  ``[layers.0, layers.1, norm, lm_head]`` (sequence shards and a replica in one measurement);
* ``sp_feed``: the ``sp`` model's ``output_hidden_states[1:]`` (DTensors) given to
  ``Measurement.feed`` (Lightning's ``source="step_output"``);
* ``sp_fail``: ``sp`` with a mask function that raises on rank 1 only: every rank must report
  a ``masks`` failure (rank 0's data-parallel group learns it through the whole job's agreement).

The probe batches have odd lengths (7, 9, 5, 11, 3 positions): the two sequence shards are
uneven. ``MIRProbe(..., process_group=<dp group>)`` measures each; rank r writes
``DIR/rank{r}.json`` (the results, and under ``layouts`` the class, placements and local shape
of each of the four modules' outputs on the first batch, per plan); rank 0 also writes ``DIR/reference.json``: the float64 reference
(tests/reference.py) on the tokens of the unsharded model, hooked on the same modules. Ranks
are forked (the parent imports torch and transformers once); every process group has a
``--timeout`` so that a hang becomes a failure.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import transformers as tf  # noqa: E402

WORLD = 4
MESH = (2, 2)
LENGTHS = (7, 9, 5, 11, 3)  # odd: uneven sequence shards over 2 ranks; 5 batches over 2 dp replicas
ROWS = 4
VISION = range(1, 3)  # "image" positions of every row; text: the positions after them
SEED = 0
EXPLICIT = ["model.layers.0", "model.layers.1", "model.norm", "lm_head"]


def build_model() -> torch.nn.Module:
    """The unsharded tiny Llama (vocabulary = width = 32, so the LM head's output is measurable too)."""
    torch.manual_seed(SEED)
    config = tf.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(config).to(torch.float64).eval()


def probe_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(SEED + 1)
    batches = []
    for length in LENGTHS:
        vision = torch.zeros(ROWS, length, dtype=torch.bool)
        vision[:, VISION.start:min(VISION.stop, length)] = True
        text = torch.zeros_like(vision)
        text[:, VISION.stop:] = True
        ids = torch.randint(0, 32, (ROWS, length), generator=generator)
        batches.append({"input_ids": ids, "vision_mask": vision, "text_mask": text})
    return batches


def plan(style: str) -> dict:
    """The ``parallelize_module`` plan of ``style`` (``tp``: plain tensor parallel; ``sp``: with
    sequence-parallel DTensor outputs)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    sequence = style == "sp"
    result: dict = {}
    if sequence:
        result["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                                       use_local_output=False)
        result["model.norm"] = SequenceParallel()
        result["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate(),
                                            use_local_output=False)
    for i in range(2):
        layer = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            result[layer + name] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            result[layer + name] = (RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
                                    if sequence else RowwiseParallel())
        if sequence:
            result[layer + "input_layernorm"] = SequenceParallel()
            result[layer + "post_attention_layernorm"] = SequenceParallel()
            result[layer + "self_attn"] = PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)}, desired_input_kwarg_layouts={"hidden_states": Replicate()})
            result[layer + "mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return result


@torch.no_grad()
def reference(model: torch.nn.Module, names: list[str], batches: list[dict]) -> dict:
    """Float64 reference of the unsharded ``model`` on the outputs of the modules ``names``."""
    from reference import reference_mir

    modules = dict(model.named_modules())
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [modules[name].register_forward_hook(
        lambda m, a, out, name=name: outputs[name].append(out[0] if isinstance(out, tuple) else out)) for name in names]
    vision, text = [], []
    for batch in batches:
        model(input_ids=batch["input_ids"])
        vision.append(batch["vision_mask"])
        text.append(batch["text_mask"])
    for handle in handles:
        handle.remove()
    vis = [torch.cat([h[v] for h, v in zip(outputs[name], vision)]) for name in names]
    txt = [torch.cat([h[t] for h, t in zip(outputs[name], text)]) for name in names]
    mir, fd, _ = reference_mir(vis, txt)
    return {"mir": mir, "per_layer_fd": [float(x) for x in fd], "n_vision": vis[0].shape[0], "n_text": txt[0].shape[0]}


@torch.no_grad()
def _fed(model: torch.nn.Module, batches: list[dict], mesh):
    """Lightning's ``source="step_output"`` path: ``output_hidden_states[1:]`` (DTensors under
    sequence parallelism) handed to ``Measurement.feed``, batches shared out over ``dp``."""
    from mir_lightning.measurement import Measurement

    measurement = Measurement(process_group=mesh["dp"].get_group())
    measurement.begin()
    for batch in batches[mesh.get_local_rank("dp")::MESH[0]]:
        hidden = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[1:]
        measurement.feed(hidden, batch["vision_mask"], batch["text_mask"])
    return measurement.finish()


def _record(result, probe, model) -> dict:
    names = {id(m): n for n, m in model.named_modules()}
    hooked = [] if probe is None else [names[id(m)] for m in probe.measurement.targets.modules]
    return {
        "mir": float(result.mir), "per_layer_fd": [float(x) for x in result.per_layer_fd],
        "n_vision": result.n_vision, "n_text": result.n_text, "forwards": result.forwards,
        "error": result.error, "error_kind": None if result.error_kind is None else result.error_kind.value,
        "hooked": hooked,
    }


@torch.no_grad()
def output_layouts(model: torch.nn.Module, names: list[str], batch: dict) -> list[list]:
    """``[class, placements, local shape]`` of the outputs of the modules ``names`` on ``batch``."""
    seen: list[list] = []
    modules = dict(model.named_modules())

    def hook(module, args, out):
        out = out[0] if isinstance(out, tuple) else out
        local = out.to_local() if hasattr(out, "to_local") else out
        seen.append([type(out).__name__, str(getattr(out, "placements", None)), list(local.shape)])

    handles = [modules[name].register_forward_hook(hook) for name in names]
    model(input_ids=batch["input_ids"])
    for handle in handles:
        handle.remove()
    return seen


def _masks_failing_on(failing_rank: int, rank: int):
    def masks(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if rank == failing_rank:
            raise RuntimeError(f"masks fail on rank {rank}")
        return batch["vision_mask"], batch["text_mask"]

    return masks


def _worker(rank: int, port: int, out: str, timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=timeout))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        from mir_lightning import MIRProbe

        options = dist.ProcessGroupGloo._Options()  # the mesh's groups get the timeout too (default: 30 min)
        options._timeout = datetime.timedelta(seconds=timeout)
        mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("dp", "tp"),
                                backend_override={"dp": ("gloo", options), "tp": ("gloo", options)})
        for name in ("dp", "tp"):
            assert mesh[name].get_group()._get_backend(torch.device("cpu")).options._timeout == options._timeout
        dp_group = mesh["dp"].get_group()
        base, batches = build_model(), probe_batches()
        records, hooked = {}, {}
        models = {style: parallelize_module(copy.deepcopy(base), mesh["tp"], plan(style)) for style in ("tp", "sp")}
        runs = (("tp", "tp", {}), ("sp", "sp", {}),
                ("sp_explicit", "sp", {"layers": lambda m: [m.get_submodule(n) for n in EXPLICIT]}),
                ("sp_fail", "sp", {"masks": _masks_failing_on(1, rank)}))
        for name, style, options in runs:
            probe = MIRProbe(batches, process_group=dp_group, **options)
            records[name] = _record(probe.run(models[style]), probe, models[style])
            hooked[name] = records[name]["hooked"]
        records["sp_feed"] = _record(_fed(models["sp"], batches, mesh), None, models["sp"])
        records["layouts"] = {style: output_layouts(models[style], EXPLICIT, batches[0]) for style in models}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(records, f)
        if rank == 0:
            refs = {name: reference(base, hooked[name], batches) for name in ("tp", "sp", "sp_explicit")}
            with open(os.path.join(out, "reference.json"), "w") as f:
                json.dump(refs, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, default=60.0, help="process-group timeout, seconds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, args.out, args.timeout), nprocs=WORLD, start_method="fork")
    return 0


if __name__ == "__main__":
    sys.exit(main())
