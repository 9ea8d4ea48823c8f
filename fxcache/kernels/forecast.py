"""The forecasting cache read: ``sum_j coef[j] * h_j``, optionally gated into a residual.

With ``fxcache.compile(..., forecast=order)`` a cache read yields TaylorSeer's forecast
from the unit's values at its last ``order + 1`` computed steps (history slots ``h_0``,
the newest, to ``h_order``); the weights ``coef`` are one row of the coefficient buffer
the runtime writes before each step (:func:`fxcache.rewrite.step_graphs.forecast_weights`).
Two ops, one Triton kernel with constexprs ``N_HIST`` (2 or 3 history tensors) and
``GATED``:

=======================================================  ====================================
``forecast(coef, h0, h1, h2)``                           ``sum_j coef[j] * h_j``
``forecast_gated_residual(x, gate, coef, h0, h1, h2,``   ``x + gate * sum_j coef[j] * h_j``
``channel_dim)``
=======================================================  ====================================

``h2`` is None for order 1. The history tensors have one shape, dtype and layout (static
buffers allocated alike); ``coef`` is a float32 vector of ``order + 1`` weights on their
device (a device tensor, not Python floats: the weights change every step and the graph
must not). The gated form is FORA's reuse path with forecasting: ``x``/``h_j`` are
``(B, N, C)`` token features, ``gate`` per (sample, channel) as in
:mod:`fxcache.kernels.affine`. Arithmetic in fp32, in the order written (``h0*c0 +
h1*c1 + h2*c2``), rounded once to the output dtype (that of the history, promoted with
``x`` and ``gate`` when gated).

Bytes moved, n elements of s bytes per feature tensor, order 2: unfused eager PyTorch
reads and writes a temporary per product and per sum (``h_j*c_j``: 3 x (r n, w n); two
adds: 2 x (r 2n, w n); gated: ``gate*t`` (r n, w n), ``x+t`` (r 2n, w n)): 12·n·s
ungated, 17·n·s gated; the kernel reads each history tensor (and ``x``) once and writes
once: 4·n·s and 5·n·s. As for the other kernels, this is what it saves in eager graphs
on CUDA; under ``torch.compile`` the dispatcher in :mod:`fxcache.kernels` uses the
reference arithmetic, which inductor fuses with the neighbours into one kernel itself.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import (
    HAS_TRITON,
    KernelArgumentError,
    check_kernel_dtypes,
    check_launchable,
    check_layout,
    check_param,
    check_same_device,
    compute_dtype,
    dense_layout,
    geometry,
    param_strides,
    param_view,
    require_triton,
    result_dtype,
)

__all__ = ["forecast_reference", "forecast_gated_residual_reference", "forecast_launch",
           "forecast_gated_residual_launch"]


# --------------------------------------------------------------------------- checks
def _history(coef, h0, h1, h2, op: str) -> list:
    hist = [h0, h1] + ([h2] if h2 is not None else [])
    for j, h in enumerate(hist):
        if not isinstance(h, torch.Tensor):
            raise KernelArgumentError(f"{op}: `h{j}` must be a torch.Tensor, got {type(h).__name__}")
        if not h.is_floating_point():
            raise KernelArgumentError(f"{op}: `h{j}` has dtype {h.dtype}; expected a floating dtype")
        if h.shape != h0.shape or h.dtype != h0.dtype:
            raise KernelArgumentError(
                f"{op}: `h{j}` is {tuple(h.shape)} {h.dtype}; expected {tuple(h0.shape)} {h0.dtype}, like `h0` "
                f"(the history slots of one cache slot)"
            )
    if not isinstance(coef, torch.Tensor) or coef.ndim != 1 or coef.shape[0] != len(hist):
        shape = tuple(coef.shape) if isinstance(coef, torch.Tensor) else type(coef).__name__
        raise KernelArgumentError(f"{op}: `coef` is {shape}; expected a vector of {len(hist)} weights, one per h_j")
    if coef.dtype != torch.float32:
        raise KernelArgumentError(f"{op}: `coef` has dtype {coef.dtype}; expected torch.float32")
    check_same_device(op, "h0", h0, coef=coef, **{f"h{j}": h for j, h in enumerate(hist)})
    return hist


def _check_gated(x, gate, coef, h0, h1, h2, channel_dim):
    op = "forecast_gated_residual"
    layout = check_layout(x, "x", channel_dim, op)
    hist = _history(coef, h0, h1, h2, op)
    if h0.shape != x.shape:
        raise KernelArgumentError(f"{op}: `h0` has shape {tuple(h0.shape)}; expected {tuple(x.shape)}, the shape of `x`")
    check_param(gate, "gate", layout, op)
    check_same_device(op, "x", x, gate=gate, h0=h0)
    return layout, hist


# --------------------------------------------------------------------------- references
def _sum(coef: torch.Tensor, hist: list, ct: torch.dtype) -> torch.Tensor:
    acc = hist[0].to(ct) * coef[0].to(ct)
    for j in range(1, len(hist)):
        acc = acc + hist[j].to(ct) * coef[j].to(ct)
    return acc


def forecast_reference(coef: torch.Tensor, h0: torch.Tensor, h1: torch.Tensor,
                       h2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_j coef[j] * h_j`` in plain PyTorch: fp32 arithmetic (for fp32/fp16/bf16
    history), in the order written, rounded once to the history's dtype."""
    hist = _history(coef, h0, h1, h2, "forecast")
    return _sum(coef, hist, compute_dtype(h0.dtype)).to(h0.dtype)


def forecast_gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, coef: torch.Tensor, h0: torch.Tensor,
                                      h1: torch.Tensor, h2: Optional[torch.Tensor], channel_dim: int) -> torch.Tensor:
    """``x + gate * sum_j coef[j] * h_j`` in plain PyTorch, gate per (sample, channel):
    fp32 arithmetic, rounded once."""
    layout, hist = _check_gated(x, gate, coef, h0, h1, h2, channel_dim)
    out_dtype = result_dtype(x, gate, h0)
    ct = compute_dtype(out_dtype)
    return (x.to(ct) + param_view(gate, layout).to(ct) * _sum(coef, hist, ct)).to(out_dtype)


# --------------------------------------------------------------------------- kernel
if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import param_offsets, tile

    @triton.jit
    def _forecast_kernel(
        h0_ptr, h1_ptr, h2_ptr, coef_ptr, x_ptr, gate_ptr, out_ptr,
        R, K, rows_per_sample, g_stride_b, g_stride_c,
        N_HIST: tl.constexpr, GATED: tl.constexpr, CHANNEL_LAST: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """``y = sum_j coef[j] * h_j`` over a dense (R, K) matrix; with GATED,
        ``y = x + gate[b, c] * y`` (gate per sample and channel, see ``_common.Geometry``)."""
        offs, mask, rows, cols, row_ok = tile(R, K, BLOCK_R, BLOCK_K)
        y = tl.load(h0_ptr + offs, mask=mask).to(tl.float32) * tl.load(coef_ptr)
        y = y + tl.load(h1_ptr + offs, mask=mask).to(tl.float32) * tl.load(coef_ptr + 1)
        if N_HIST == 3:
            y = y + tl.load(h2_ptr + offs, mask=mask).to(tl.float32) * tl.load(coef_ptr + 2)
        if GATED:
            g_off, pmask = param_offsets(rows, cols, mask, row_ok, rows_per_sample, g_stride_b, g_stride_c,
                                         CHANNEL_LAST)
            g = tl.load(gate_ptr + g_off, mask=pmask).to(tl.float32)
            y = tl.load(x_ptr + offs, mask=mask).to(tl.float32) + g * y
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    def _flat_geometry(numel: int):
        """An (R, K) view of a dense tensor: K the largest power of two <= 1024 dividing it."""
        k = 1024
        while numel % k:
            k //= 2
        return geometry(numel, 1, k, True)  # channel-last over "k channels": rows = numel // k

    def _launch(op, coef, hist, x=None, gate=None, layout=None, out_dtype=None):
        gated = x is not None
        lead = x if gated else hist[0]
        check_launchable(op, _forecast_kernel, lead)
        if gated:
            fmt, channel_last = dense_layout(x, layout)
        else:
            fmt = torch.channels_last if (lead.ndim == 4 and not lead.is_contiguous()
                                          and lead.is_contiguous(memory_format=torch.channels_last)) \
                else torch.contiguous_format
            channel_last = True
        hist = [h.contiguous(memory_format=fmt) for h in hist]
        out = torch.empty_like(lead, dtype=out_dtype or hist[0].dtype, memory_format=fmt)
        if out.numel() == 0:
            return out
        if gated:
            x = x.contiguous(memory_format=fmt)
            g = geometry(out.numel(), layout.batch, layout.channels, channel_last)
            gs = param_strides(gate, layout.batch)
        else:
            g = _flat_geometry(out.numel())
            x, gate, gs = hist[0], coef, (0, 0)  # unused by the ungated kernel
        torch.library.wrap_triton(_forecast_kernel)[g.grid](
            hist[0], hist[1], hist[2] if len(hist) == 3 else hist[1], coef, x, gate, out,
            g.rows, g.cols, g.rows_per_sample, *gs,
            N_HIST=len(hist), GATED=gated, CHANNEL_LAST=channel_last,
            BLOCK_R=g.block_r, BLOCK_K=g.block_k,
        )
        return out

    @torch.library.triton_op("fxcache::forecast", mutates_args=())
    def forecast_launch(coef: torch.Tensor, h0: torch.Tensor, h1: torch.Tensor,
                        h2: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sum_j coef[j] * h_j`` by the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
        hist = _history(coef, h0, h1, h2, "forecast")
        check_kernel_dtypes("forecast", h0=h0)
        return _launch("forecast", coef, hist)

    @torch.library.triton_op("fxcache::forecast_gated_residual", mutates_args=())
    def forecast_gated_residual_launch(x: torch.Tensor, gate: torch.Tensor, coef: torch.Tensor, h0: torch.Tensor,
                                       h1: torch.Tensor, h2: Optional[torch.Tensor], channel_dim: int) -> torch.Tensor:
        """``x + gate * sum_j coef[j] * h_j`` by the Triton kernel."""
        layout, hist = _check_gated(x, gate, coef, h0, h1, h2, channel_dim)
        check_kernel_dtypes("forecast_gated_residual", x=x, gate=gate, h0=h0)
        return _launch("forecast_gated_residual", coef, hist, x, gate, layout, result_dtype(x, gate, h0))

else:
    _forecast_kernel = None

    def forecast_launch(coef, h0, h1, h2=None):
        """Stands in for the Triton launcher when Triton is not available."""
        require_triton("fxcache.kernels.forecast_triton")

    def forecast_gated_residual_launch(x, gate, coef, h0, h1, h2, channel_dim):
        """Stands in for the Triton launcher when Triton is not available."""
        require_triton("fxcache.kernels.forecast_gated_residual_triton")
