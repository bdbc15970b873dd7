"""Shared pieces of the sharded-engine tests: the tiny LLaVA, its probe batches, the
engines that shard it (FSDP2, FSDP1 with activation checkpointing, DeepSpeed ZeRO-3,
peft LoRA + DDP) and the single-process float64 reference on materialised tokens.

Every process that imports this builds the same weights from the same seed, so a sharded
model and the unsharded reference compute the same function.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from vlm_factory import make_tiny_vlm

SEED = 0
BATCH_SIZE = 2
N_TEXT = 24
ENGINES = ("fsdp2", "fsdp1", "peft_ddp", "deepspeed")
# DeepSpeed ZeRO-3 settings that make a tiny model really partitioned (every parameter,
# however small, is released after use and gathered again at its next use).
ZERO3_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_allow_untested_optimizer": True,
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_max_reuse_distance": 0,
        "stage3_prefetch_bucket_size": 0,
    },
}


def extension_cache_dir() -> str:
    """Where DeepSpeed builds its CPU extension once (``tests/.cache``, ignored by git)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "torch_extensions")


def probe_batches(n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` LLaVA batches of ``BATCH_SIZE`` rows (16 image tokens, ~25 text tokens per row)."""
    _, make_inputs = make_tiny_vlm("llava", seed=SEED)
    return [make_inputs(BATCH_SIZE, N_TEXT + i, seed=100 + i) for i in range(n)]


def lora_config() -> Any:
    """LoRA on the attention projections with random (non-zero) B, so the adapters change
    every hidden state and the reference must run through them too."""
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def build_model(engine: str) -> nn.Module:
    """The unsharded model an engine starts from (LoRA-adapted for ``peft_ddp``), eval mode."""
    model, _ = make_tiny_vlm("llava", seed=SEED)
    if engine == "peft_ddp":
        from peft import get_peft_model

        torch.manual_seed(SEED + 1)
        model = get_peft_model(model, lora_config())
    return model.eval()


def decoder_layer_class() -> type:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return LlamaDecoderLayer


def shard(model: nn.Module, engine: str, world: int, group: Any = None, device_type: str = "cpu") -> nn.Module:
    """Wrap ``model`` (from :func:`build_model`) with ``engine`` on ``group`` (FSDP2 only;
    default: the default process group); ``device_type`` of the FSDP2 mesh."""
    layer_cls = decoder_layer_class()
    if engine == "fsdp2":
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device_type, (world,)) if group is None else DeviceMesh.from_group(group, device_type)
        for module in list(model.modules()):
            if isinstance(module, layer_cls):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if engine == "fsdp1":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        wrapped = FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({layer_cls}), device_id=torch.device("cpu"), use_orig_params=True
        )
        apply_activation_checkpointing(
            wrapped, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: isinstance(m, layer_cls)
        )
        return wrapped
    if engine == "peft_ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if engine == "deepspeed":
        import deepspeed

        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        engine_, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ZERO3_CONFIG)
        return engine_
    raise KeyError(f"unknown engine {engine!r}; known: {ENGINES}")


def official_masks(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent masks: image tokens; text = attended non-image tokens after a row's first image token."""
    from lightning_helpers import official_masks as masks

    return masks(batch)


@torch.no_grad()
def reference_result(engine: str, n_batches: int, sigma: float = 3.0) -> tuple[float, list[float]]:
    """(MIR, per-layer FD) in float64 from ``output_hidden_states[1:]`` of the unsharded model."""
    from reference import reference_mir

    model = build_model(engine)
    vis: list[list[torch.Tensor]] = []
    txt: list[list[torch.Tensor]] = []
    for batch in probe_batches(n_batches):
        hidden = model(**batch, output_hidden_states=True).hidden_states[1:]
        v, t = official_masks(batch)
        if not vis:
            vis, txt = [[] for _ in hidden], [[] for _ in hidden]
        for k, h in enumerate(hidden):
            vis[k].append(h[v].double())
            txt[k].append(h[t].double())
    mir, fds, _ = reference_mir([torch.cat(x) for x in vis], [torch.cat(x) for x in txt], sigma)
    return mir, [float(f) for f in fds]
