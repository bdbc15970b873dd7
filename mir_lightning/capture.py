"""Where hidden states come from: forward hooks on the LLM's layers, and batch masks."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

MaskFn = Callable[[Any], "tuple[Tensor, Tensor]"]


def hidden_from_output(output: Any) -> Tensor:
    """The hidden-state tensor ``[B, T, D]`` of a decoder layer's (or norm's) output."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise TypeError(f"cannot read hidden states from a module output of type {type(output).__name__}")


class LayerCapture:
    """Forward hooks on ``modules`` that hand each output to ``sink(layer_index, hidden)``.

    Hooks are registered by :meth:`attach` and removed by :meth:`detach`; while attached
    they do nothing unless :attr:`active` is True, so the model's own forwards (training,
    or validation batches when a probe set is used) are untouched.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        if not modules:
            raise ValueError("no layers to capture")
        self.modules = list(modules)
        self.active = False
        self._handles: list[Any] = []

    def attach(self, sink: Callable[[int, Tensor], None]) -> None:
        self.detach()
        for index, module in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._hook(index, sink)))

    def _hook(self, index: int, sink: Callable[[int, Tensor], None]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.active:
                sink(index, hidden_from_output(output).detach())

        return hook

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.active = False


def masks_in_batch(batch: Any) -> tuple[Tensor, Tensor] | None:
    """``(batch["vision_mask"], batch["text_mask"])`` when a dict-like batch holds both."""
    if isinstance(batch, Mapping) and "vision_mask" in batch and "text_mask" in batch:
        return batch["vision_mask"].bool(), batch["text_mask"].bool()
    return None


def select_layers(modules: Sequence[nn.Module], which: Sequence[int] | slice | None) -> list[nn.Module]:
    """Subset of ``modules`` by indices or a slice (e.g. ``slice(None, None, 2)`` for every other layer)."""
    modules = list(modules)
    if which is None:
        return modules
    if isinstance(which, slice):
        return modules[which]
    try:
        return [modules[i] for i in which]
    except IndexError as err:
        raise IndexError(f"layer index out of range for {len(modules)} layers: {list(which)}") from err


def infer_hidden_size(modules: Sequence[nn.Module]) -> int | None:
    """Hidden size from the last module's weight or a config, when it can be read."""
    for module in reversed(list(modules)):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 1:
            return int(weight.shape[0])
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "hidden_size", None):
            return int(config.hidden_size)
    return None
