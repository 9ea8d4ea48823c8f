"""What the CUDA variants of the tests share (scripts/gpu_check.sh runs them on a GPU).

Without CUDA they skip, saying why; with ``FXCACHE_REQUIRE_CUDA=1`` (gpu_check.sh sets
it when it found a GPU) a missing CUDA device fails instead, so a GPU run can never
pass by skipping everything.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["REQUIRE_CUDA", "need_cuda", "on_device", "OpLog"]

REQUIRE_CUDA = os.environ.get("FXCACHE_REQUIRE_CUDA") == "1"


def need_cuda(what: str = "this test") -> None:
    """Skip (or, under FXCACHE_REQUIRE_CUDA=1, fail) unless a CUDA device is usable."""
    if torch.cuda.is_available():
        return
    why = f"{what} needs a CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    if REQUIRE_CUDA:
        pytest.fail(f"FXCACHE_REQUIRE_CUDA=1 but {why}")
    pytest.skip(why)


def on_device(T, device):
    """Move a :class:`fxcache.testing.Tiny` to ``device``: the model in place, and every
    tensor of every call's inputs (copied at each call)."""
    T.model.to(device)
    inputs = T.inputs

    def moved(t):
        return pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, inputs(t))

    T.inputs = moved
    return T


class OpLog(TorchDispatchMode):
    """Records the name of every operator dispatched while active (``with OpLog() as log``).
    A registered ``triton_op`` shows up as ``fxcache.<name>.default`` or as the
    ``triton_kernel_wrapper_*`` it decomposes into."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

    def custom_kernel_calls(self) -> list[str]:
        return [n for n in self.names if "fxcache" in n or "triton_kernel_wrapper" in n]
