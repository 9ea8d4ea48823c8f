"""fxcache.kernels: fused cache reads for rewritten graphs (one Triton kernel, PyTorch references).

The graph rewrite replaces a cache read followed by per-channel arithmetic with one
call to a function of this package:

=====================================================  ==================================
``scale_shift(cache, scale, shift, channel_dim)``      ``cache * (1 + scale) + shift``
``gated_residual(x, gate, cache, channel_dim)``        ``x + gate * cache``
``forecast(coef, h0, h1, h2)``                         ``sum_j coef[j] * h_j``
``forecast_gated_residual(x, gate, coef, h0, h1, h2,``  ``x + gate * sum_j coef[j] * h_j``
``channel_dim)``
=====================================================  ==================================

The last two are forecasting cache reads (``fxcache.compile(..., forecast=1|2)``), their
own kernel in :mod:`fxcache.kernels.forecast` (ops ``torch.ops.fxcache.forecast`` and
``torch.ops.fxcache.forecast_gated_residual``), dispatched by the same policy.

``channel_dim`` is ``1`` for ``(B, C, *spatial)`` features (NCHW) and ``-1`` for
``(B, *tokens, C)`` features (``(B, N, C)``); the per-(sample, channel) operands are
``(B, C)``, ``(1, C)`` or ``(C,)``. Bad shapes, devices or dtypes raise
:class:`KernelArgumentError` (a ``ValueError``) naming the argument, its shape and the
expected shape. Both are ``cache * m + a`` with ``m`` per (sample, channel): one Triton
kernel, :func:`fxcache.kernels.affine._affine_kernel`, with a ``tl.constexpr`` mode,
registered as the ops ``torch.ops.fxcache.scale_shift`` and
``torch.ops.fxcache.gated_residual`` (``torch.library.triton_op``). Bytes moved and a
worked example are in :mod:`fxcache.kernels.affine`.

Where the kernel runs. ``scale_shift`` / ``gated_residual`` are plain Python that
dynamo traces (``fullgraph=True``); they choose:

* **eager on CUDA** (``fxcache.compile(..., backend=None)``, or any direct call): the
  Triton kernel. Eager PyTorch runs ``x + gate * cache`` as two kernels with an
  n-sized temporary (5·n·s bytes moved), the kernel as one (3·n·s).
* **under torch.compile** (``torch.compiler.is_compiling()``, i.e. while dynamo
  traces a step graph, for inductor or any other backend): the reference arithmetic.
  In one inductor graph the cache buffers are ordinary inputs, and inductor fuses
  ``x + gate * cache`` with its neighbours (the chain of residual additions, the
  next LayerNorm and adaLN modulation) into its own kernels. The op would be an
  opaque extern kernel there: inductor lowers a ``triton_op`` to
  ``ir.UserDefinedTritonKernel``, an ``ExternKernel``, and its scheduler never fuses
  a producer into an extern kernel ("node2 is extern or nop"), nor a consumer unless
  the experimental ``torch._inductor.config.epilogue_fusion_user_defined_triton_kernel``
  is set (off by default, and then only a pointwise epilogue that reads nothing but
  the kernel's output; torch 2.13, ``torch/_inductor/scheduler.py`` ``can_fuse``,
  ``ir.py`` ``UserDefinedTritonKernel.can_fuse_epilogue``). Measured on a step graph:
  ``bench/results/fusion_evidence.md``.
* **every other device** (CPU, MPS, ...), dtypes the kernel does not take (e.g.
  float64), and kernels built for the interpreter (``TRITON_INTERPRET=1``: dynamo
  cannot trace an interpreted kernel): the reference arithmetic.

``*_triton`` call the Triton launcher directly (CUDA, or CPU under
``TRITON_INTERPRET=1``); ``*_reference`` are the pure-PyTorch references.
``TRITON_INTERPRET`` is read by ``@triton.jit`` when it decorates a kernel, i.e. when
this package is first imported, not at launch: set it before starting Python.
"""

if __name__ != "fxcache.kernels":  # pragma: no cover - a packaging/sys.path mistake
    raise ImportError(
        f"this folder is the package fxcache.kernels and was imported as {__name__!r}; "
        f"import fxcache.kernels instead (a top-level `kernels` is another PyPI project, "
        f"and importing this one twice would register its torch ops twice)"
    )

import torch

from . import affine as _affine
from . import forecast as _forecast
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
    "forecast",
    "forecast_reference",
    "forecast_triton",
    "forecast_gated_residual",
    "forecast_gated_residual_reference",
    "forecast_gated_residual_triton",
]

scale_shift_reference = _affine.scale_shift_reference
gated_residual_reference = _affine.gated_residual_reference
forecast_reference = _forecast.forecast_reference
forecast_gated_residual_reference = _forecast.forecast_gated_residual_reference

# The kernel is usable with Triton and built for the GPU (under TRITON_INTERPRET=1
# dynamo cannot trace it). A plain bool, so dynamo folds it.
_KERNEL_USABLE = HAS_TRITON and not is_interpreted(_affine._affine_kernel) and not is_interpreted(
    _forecast._forecast_kernel)


def _use_kernel(*tensors: torch.Tensor) -> bool:
    """The policy of the module docstring: the Triton op in eager mode on CUDA tensors of
    the dtypes it takes; the reference arithmetic under torch.compile (inductor fuses it
    with its neighbours) and everywhere else. Dynamo folds it to a constant."""
    return (
        _KERNEL_USABLE
        and not torch.compiler.is_compiling()
        and tensors[0].device.type == "cuda"
        and all(t.dtype in KERNEL_DTYPES for t in tensors)
    )


def scale_shift_triton(
    cache: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """Run the op ``fxcache::scale_shift``, the affine Triton kernel in its scale-shift
    mode (CUDA, or CPU under TRITON_INTERPRET=1).

    Raises RuntimeError when Triton is not available.
    """
    return _affine.scale_shift_launch(cache, scale, shift, channel_dim)


def gated_residual_triton(
    x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """Run the op ``fxcache::gated_residual``, the affine Triton kernel in its
    gated-residual mode (CUDA, or CPU under TRITON_INTERPRET=1).

    Raises RuntimeError when Triton is not available.
    """
    return _affine.gated_residual_launch(x, gate, cache, channel_dim)


def scale_shift(
    cache: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """``cache * (1 + scale) + shift``, scale/shift per (sample, channel).

    The Triton op in eager mode on CUDA tensors; the PyTorch reference under
    torch.compile (inductor fuses it with its neighbours), on other devices, for dtypes
    other than fp32/fp16/bf16 and when the kernel is interpreted (module docstring).
    Traceable by dynamo (``fullgraph=True``): a graph rewrite inserts it as a
    ``call_function`` target.
    """
    if _use_kernel(cache, scale, shift):
        return torch.ops.fxcache.scale_shift(cache, scale, shift, channel_dim)
    return _affine.scale_shift_reference(cache, scale, shift, channel_dim)


def gated_residual(
    x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """``x + gate * cache``, gate per (sample, channel).

    The Triton op in eager mode on CUDA tensors; the PyTorch reference under
    torch.compile (inductor fuses it with its neighbours), on other devices, for dtypes
    other than fp32/fp16/bf16 and when the kernel is interpreted (module docstring).
    Traceable by dynamo (``fullgraph=True``): a graph rewrite inserts it as a
    ``call_function`` target.
    """
    if _use_kernel(x, gate, cache):
        return torch.ops.fxcache.gated_residual(x, gate, cache, channel_dim)
    return _affine.gated_residual_reference(x, gate, cache, channel_dim)


def forecast_triton(coef: torch.Tensor, h0: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor | None = None) -> torch.Tensor:
    """Run the op ``fxcache::forecast`` (the forecast Triton kernel; CUDA, or CPU under
    TRITON_INTERPRET=1). Raises RuntimeError when Triton is not available."""
    return _forecast.forecast_launch(coef, h0, h1, h2)


def forecast_gated_residual_triton(x, gate, coef, h0, h1, h2, channel_dim: int) -> torch.Tensor:
    """Run the op ``fxcache::forecast_gated_residual`` (CUDA, or CPU under
    TRITON_INTERPRET=1). Raises RuntimeError when Triton is not available."""
    return _forecast.forecast_gated_residual_launch(x, gate, coef, h0, h1, h2, channel_dim)


def forecast(coef: torch.Tensor, h0: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor | None = None) -> torch.Tensor:
    """A forecasting cache read, ``sum_j coef[j] * h_j`` (``coef`` a float32 vector on the
    history's device). The Triton op in eager mode on CUDA; the reference arithmetic
    under torch.compile and elsewhere (module docstring)."""
    if _use_kernel(h0):
        return torch.ops.fxcache.forecast(coef, h0, h1, h2)
    return _forecast.forecast_reference(coef, h0, h1, h2)


def forecast_gated_residual(x, gate, coef, h0, h1, h2, channel_dim: int) -> torch.Tensor:
    """``x + gate * sum_j coef[j] * h_j``, gate per (sample, channel): a forecasting cache
    read fused with FORA's gated residual. Dispatch as :func:`forecast`."""
    if _use_kernel(x, gate, h0):
        return torch.ops.fxcache.forecast_gated_residual(x, gate, coef, h0, h1, h2, channel_dim)
    return _forecast.forecast_gated_residual_reference(x, gate, coef, h0, h1, h2, channel_dim)
