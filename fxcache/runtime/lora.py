"""peft LoRA scales as graph inputs: changing an adapter's weight recompiles nothing.

peft's LoRA layers multiply each adapter's branch by ``self.scaling[adapter]``, a Python
float, which ``torch.export`` would bake into the graph as a constant (so
``set_adapters(..., weights=[0.3])`` would need a new capture and a new compile). While
fxcache captures, each such float of a float32 LoRA layer is replaced by a 0-d float32
tensor on the layer's device (then put back): the captured graph reads that tensor (export
lifts it as a constant, the same object, read at every call by eager graphs and by
inductor's compiled ones alike). At every generation start :meth:`LoraScales.sync` copies
peft's current floats into the tensors (``fill_``: a device write, no sync), and the
guard (:mod:`fxcache.runtime.guards`) compares only which adapters a layer has, not
their scales. Which adapters are active, disabled or fused still captures again: those
change the graph.

Only float32 layers: ``x * 0.3`` with a Python float and ``x * t`` with a 0-d float32
tensor give the same bits in float32 (both multiply by the float32 value), not in
bf16/fp16, where a tensor operand is rounded to the low precision first. Low-precision
layers keep their scales baked in and capture again when one changes.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["LoraScales", "lifted_scales"]


def lifted_scales(m: torch.nn.Module) -> bool:
    """Whether ``m`` is a peft LoRA layer whose scales fxcache makes graph inputs."""
    scaling = m.__dict__.get("scaling")
    if not isinstance(scaling, dict) or "lora_A" not in m._modules:
        return False
    weight = getattr(m._modules.get("base_layer"), "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dtype == torch.float32


class LoraScales:
    """The scale tensors of one engine: ``(module, adapter) -> [tensor, value]``."""

    def __init__(self):
        self.slots: dict = {}

    @contextlib.contextmanager
    def lifted(self, model: torch.nn.Module):
        """While capturing: every float scale of a lifted layer is its tensor."""
        swapped = []
        slots = {}
        for m in model.modules():
            if not lifted_scales(m):
                continue
            device = m.base_layer.weight.device
            for adapter, value in list(m.scaling.items()):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                key = (id(m), adapter)
                slot = self.slots.get(key)
                if slot is None or slot[1] is not m or slot[0].device != device:
                    with torch.inference_mode(False), torch.no_grad():
                        slot = [torch.tensor(float(value), dtype=torch.float32, device=device), m, float(value)]
                else:
                    slot[0].fill_(float(value))
                    slot[2] = float(value)
                slots[key] = slot
                m.scaling[adapter] = slot[0]
                swapped.append((m, adapter, value))
        self.slots = slots
        try:
            yield
        finally:
            for m, adapter, value in swapped:
                m.scaling[adapter] = value

    def sync(self) -> None:
        """peft's current scales into the tensors the graphs read."""
        for (_, adapter), slot in self.slots.items():
            tensor, m, last = slot
            value = m.scaling.get(adapter)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) != last:
                with torch.no_grad():
                    tensor.fill_(float(value))
                slot[2] = float(value)
