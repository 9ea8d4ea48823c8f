"""fxcache.kernels: fused cache reads for rewritten graphs (Triton, with PyTorch references).

The graph rewrite replaces a cache read followed by per-channel arithmetic with one
call to a function of this package:

=====================================================  ==================================
``scale_shift(cache, scale, shift, channel_dim)``      ``cache * (1 + scale) + shift``
``gated_residual(x, gate, cache, channel_dim)``        ``x + gate * cache``
=====================================================  ==================================

``channel_dim`` is ``1`` for ``(B, C, *spatial)`` features (NCHW) and ``-1`` for
``(B, *tokens, C)`` features (``(B, N, C)``); the per-(sample, channel) operands are
``(B, C)``, ``(1, C)`` or ``(C,)``. Bad shapes, devices or dtypes raise
:class:`KernelArgumentError` (a ``ValueError``) naming the argument, its shape and the
expected shape.

Device split. ``scale_shift`` / ``gated_residual`` are plain Python that dynamo traces:
on CUDA tensors (with Triton available) they call the registered ops
``torch.ops.fxcache.scale_shift`` / ``torch.ops.fxcache.gated_residual``
(``torch.library.triton_op``, so ``torch.compile`` sees the kernel); on every other
device they run the reference arithmetic, which inductor fuses itself (inductor cannot
compile a ``triton_op`` on CPU tensors). They also use the reference for dtypes the
kernels do not take (e.g. float64) and when the kernels were built for the interpreter
(``TRITON_INTERPRET=1``: dynamo cannot trace an interpreted kernel, even on CUDA). ``*_triton`` call the Triton launcher directly (CUDA, or CPU under
``TRITON_INTERPRET=1``); ``*_reference`` are the pure-PyTorch references.

``TRITON_INTERPRET`` is read by ``@triton.jit`` when it decorates a kernel, i.e. when
this package is first imported, not at launch: set it before starting Python.

Bytes moved (n elements per feature tensor, s bytes per element, P = B*C per-channel
values; the P terms are negligible next to n for any real feature map):

=================  ==========================================  ===========  =======
op                 unfused PyTorch ops                         unfused      fused
=================  ==========================================  ===========  =======
scale_shift        ``1+scale``; ``cache*t`` (r n, w n);        4·n·s        2·n·s
                   ``+shift`` (r n, w n)
gated_residual     ``gate*cache`` (r n, w n); ``x+t``          5·n·s        3·n·s
                   (r 2n, w n)
=================  ==========================================  ===========  =======

so the fused ops halve (scale_shift) or cut by 40 % (gated_residual) the memory traffic
of these memory-bound steps, and drop one n-sized temporary and one or two launches.
``torch.compile`` fuses the same chains on its own when they sit in one graph; the
fused op guarantees it at the cache-read boundary, in eager graphs too. Details and a
worked example per op are in the docstrings of :mod:`fxcache.kernels.scale_shift` and
:mod:`fxcache.kernels.gated_residual`.
"""

if __name__ != "fxcache.kernels":  # pragma: no cover - a packaging/sys.path mistake
    raise ImportError(
        f"this folder is the package fxcache.kernels and was imported as {__name__!r}; "
        f"import fxcache.kernels instead (a top-level `kernels` is another PyPI project, "
        f"and importing this one twice would register its torch ops twice)"
    )

import torch

from . import gated_residual as _gated_residual_mod
from . import scale_shift as _scale_shift_mod
from ._common import HAS_TRITON, KERNEL_DTYPES, KernelArgumentError, is_interpreted

__all__ = [
    "HAS_TRITON",
    "KernelArgumentError",
    "scale_shift",
    "scale_shift_reference",
    "scale_shift_triton",
    "gated_residual",
    "gated_residual_reference",
    "gated_residual_triton",
]

scale_shift_reference = _scale_shift_mod.reference
gated_residual_reference = _gated_residual_mod.reference

# The dispatching functions use the ops only where they compile: with Triton, kernels
# built for the GPU (under TRITON_INTERPRET=1 dynamo cannot trace them), CUDA tensors,
# and dtypes the kernels take. A plain bool, so dynamo folds it.
_OPS_USABLE = HAS_TRITON and not (
    is_interpreted(_scale_shift_mod._scale_shift_kernel)
    or is_interpreted(_gated_residual_mod._gated_residual_kernel)
)


def _use_op(*tensors: torch.Tensor) -> bool:
    return (
        _OPS_USABLE
        and tensors[0].device.type == "cuda"
        and all(t.dtype in KERNEL_DTYPES for t in tensors)
    )


def scale_shift_triton(
    cache: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """Run the Triton kernel ``fxcache::scale_shift`` (CUDA, or CPU under TRITON_INTERPRET=1).

    Raises RuntimeError when Triton is not available.
    """
    return _scale_shift_mod.launch(cache, scale, shift, channel_dim)


def gated_residual_triton(
    x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """Run the Triton kernel ``fxcache::gated_residual`` (CUDA, or CPU under TRITON_INTERPRET=1).

    Raises RuntimeError when Triton is not available.
    """
    return _gated_residual_mod.launch(x, gate, cache, channel_dim)


def scale_shift(
    cache: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """``cache * (1 + scale) + shift``, scale/shift per (sample, channel).

    The Triton op on CUDA tensors, the PyTorch reference elsewhere (and for dtypes other
    than fp32/fp16/bf16, or when the kernels are interpreted). Traceable by dynamo
    (``fullgraph=True``): a graph rewrite inserts it as a ``call_function`` target.
    """
    if _use_op(cache, scale, shift):
        return torch.ops.fxcache.scale_shift(cache, scale, shift, channel_dim)
    return _scale_shift_mod.reference(cache, scale, shift, channel_dim)


def gated_residual(
    x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """``x + gate * cache``, gate per (sample, channel).

    The Triton op on CUDA tensors, the PyTorch reference elsewhere (and for dtypes other
    than fp32/fp16/bf16, or when the kernels are interpreted). Traceable by dynamo
    (``fullgraph=True``): a graph rewrite inserts it as a ``call_function`` target.
    """
    if _use_op(x, gate, cache):
        return torch.ops.fxcache.gated_residual(x, gate, cache, channel_dim)
    return _gated_residual_mod.reference(x, gate, cache, channel_dim)
