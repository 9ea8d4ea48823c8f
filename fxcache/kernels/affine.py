"""The one fused cache-read kernel: a per-(sample, channel) affine map of a feature tensor.

Both fused ops of :mod:`fxcache.kernels` are ``y = cache * m + a`` with ``m`` per
(sample, channel); they differ only in where ``m`` and ``a`` come from, which is the
``MODE`` ``tl.constexpr`` of the kernel (one Triton kernel, compiled per mode):

=========================  =================  ===========================  ==============
mode                       op                 ``m``                        ``a``
=========================  =================  ===========================  ==============
``SCALE_SHIFT``            ``scale_shift``    ``1 + scale`` (per channel)  ``shift`` (per channel)
``GATED_RESIDUAL``         ``gated_residual`` ``gate`` (per channel)       ``x`` (per element)
=========================  =================  ===========================  ==============

i.e. ``scale_shift(cache, scale, shift) = cache * (1 + scale) + shift`` (block caching's
scale-shift adjustment) and ``gated_residual(x, gate, cache) = x + gate * cache`` (FORA's
reuse path: adaLN gate of the current step times the cached attention/MLP output).

Layouts. The feature tensors are ``(B, C, *spatial)`` (``channel_dim=1``, e.g. NCHW) or
``(B, *tokens, C)`` (``channel_dim=-1``, e.g. ``(B, N, C)``); the per-(sample, channel)
operands are ``(B, C)``, ``(1, C)`` or ``(C,)``, each independently. The output has the
dtype eager PyTorch gives the unfused expression (type promotion of the three inputs)
and the memory format of the layout tensor (``cache`` for scale_shift, ``x`` for
gated_residual; the other feature tensor is brought to it, a no-op for a static buffer
allocated like it). ``channels_last`` NCHW is read in place with the channel-last
variant (``CHANNEL_LAST`` constexpr), strided parameters (``emb.chunk(k, dim=1)`` views)
through their strides; any other non-contiguous feature is copied once. Arithmetic is
done in fp32 (for fp32/fp16/bf16), rounded once.

Bytes moved, n elements per feature tensor of s bytes, P = B*C parameters (negligible):

==============  ==========================================  ===========  =======
op              unfused eager PyTorch                       unfused      fused
==============  ==========================================  ===========  =======
scale_shift     ``1+scale``; ``cache*t`` (r n, w n);        4·n·s        2·n·s
                ``+shift`` (r n, w n)
gated_residual  ``gate*cache`` (r n, w n); ``x+t``          5·n·s        3·n·s
                (r 2n, w n)
==============  ==========================================  ===========  =======

e.g. a DiT-XL/2 token tensor (2, 256, 1152) in bf16: n·s = 1.18 MB; scale_shift 4.7 MB
unfused, 2.4 MB fused; gated_residual 5.9 MB unfused, 3.5 MB fused (FORA does two per
block per cached step). That is what the kernel saves where it runs: in eager graphs.
Inside an inductor graph the same chain is fused by inductor itself, with its
neighbours too, which the kernel would prevent (see :mod:`fxcache.kernels`).

This module holds the ``@triton.jit`` kernel, one launcher for both modes, the two
launchers registered as ``fxcache::scale_shift`` and ``fxcache::gated_residual`` with
``torch.library.triton_op``, and the pure-PyTorch references.
"""

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

__all__ = [
    "SCALE_SHIFT",
    "GATED_RESIDUAL",
    "scale_shift_reference",
    "gated_residual_reference",
    "scale_shift_launch",
    "gated_residual_launch",
]

#: Values of the kernel's ``MODE`` constexpr.
SCALE_SHIFT = 0
GATED_RESIDUAL = 1


# --------------------------------------------------------------------------- checks
def _check_scale_shift(cache, scale, shift, channel_dim):
    op = "scale_shift"
    layout = check_layout(cache, "cache", channel_dim, op)
    check_param(scale, "scale", layout, op)
    check_param(shift, "shift", layout, op)
    check_same_device(op, "cache", cache, scale=scale, shift=shift)
    return layout


def _check_gated_residual(x, gate, cache, channel_dim):
    op = "gated_residual"
    layout = check_layout(x, "x", channel_dim, op)
    if not isinstance(cache, torch.Tensor):
        raise KernelArgumentError(f"{op}: `cache` must be a torch.Tensor, got {type(cache).__name__}")
    if cache.shape != x.shape:
        raise KernelArgumentError(
            f"{op}: `cache` has shape {tuple(cache.shape)}; expected {tuple(x.shape)}, the shape of `x`"
        )
    if not cache.is_floating_point():
        raise KernelArgumentError(f"{op}: `cache` has dtype {cache.dtype}; expected a floating dtype")
    check_param(gate, "gate", layout, op)
    check_same_device(op, "x", x, gate=gate, cache=cache)
    return layout


# --------------------------------------------------------------------------- references
def scale_shift_reference(
    cache: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """``cache * (1 + scale) + shift`` in plain PyTorch, scale/shift per (sample, channel).

    For fp32 inputs this is exactly the unfused eager expression; for fp16/bf16 it
    computes in fp32 and rounds once, as the kernel does (and as inductor does when it
    fuses this chain).
    """
    layout = _check_scale_shift(cache, scale, shift, channel_dim)
    out_dtype = result_dtype(cache, scale, shift)
    ct = compute_dtype(out_dtype)
    y = cache.to(ct) * (1 + param_view(scale, layout).to(ct)) + param_view(shift, layout).to(ct)
    return y.to(out_dtype)


def gated_residual_reference(
    x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """``x + gate * cache`` in plain PyTorch, gate per (sample, channel).

    For fp32 inputs this is exactly the unfused eager expression; for fp16/bf16 it
    computes in fp32 and rounds once, as the kernel does (and as inductor does when it
    fuses this chain).
    """
    layout = _check_gated_residual(x, gate, cache, channel_dim)
    out_dtype = result_dtype(x, gate, cache)
    ct = compute_dtype(out_dtype)
    y = x.to(ct) + param_view(gate, layout).to(ct) * cache.to(ct)
    return y.to(out_dtype)


# --------------------------------------------------------------------------- kernel
if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import param_offsets, tile

    @triton.jit
    def _affine_kernel(
        cache_ptr,
        m_ptr,
        a_ptr,
        out_ptr,
        R,
        K,
        rows_per_sample,
        m_stride_b,
        m_stride_c,
        a_stride_b,
        a_stride_c,
        MODE: tl.constexpr,
        CHANNEL_LAST: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """``out = cache * m + a`` over a dense (R, K) matrix (see ``_common.Geometry``).

        MODE == SCALE_SHIFT (0): ``m = 1 + m_ptr[b, c]``, ``a = a_ptr[b, c]``.
        MODE == GATED_RESIDUAL (1): ``m = m_ptr[b, c]``, ``a = a_ptr[offs]`` (dense,
        laid out like ``cache``; its strides arguments are unused).
        """
        offs, mask, rows, cols, row_ok = tile(R, K, BLOCK_R, BLOCK_K)
        m_off, pmask = param_offsets(rows, cols, mask, row_ok, rows_per_sample, m_stride_b, m_stride_c, CHANNEL_LAST)
        h = tl.load(cache_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + m_off, mask=pmask).to(tl.float32)
        if MODE == 0:
            a_off, _ = param_offsets(rows, cols, mask, row_ok, rows_per_sample, a_stride_b, a_stride_c, CHANNEL_LAST)
            a = tl.load(a_ptr + a_off, mask=pmask).to(tl.float32)
            m = 1.0 + m
        else:
            a = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
        y = h * m + a
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    def _launch(mode: int, op: str, layout, lead, cache, m, a, out_dtype) -> torch.Tensor:
        """Launch ``_affine_kernel`` in ``mode``. ``lead``: the feature tensor that fixes
        the physical layout of the output (``cache`` or ``x``); the other dense operands
        are brought to it."""
        check_launchable(op, _affine_kernel, lead)
        fmt, channel_last = dense_layout(lead, layout)
        cache = cache.contiguous(memory_format=fmt)
        if mode == GATED_RESIDUAL:
            a = a.contiguous(memory_format=fmt)
        out = torch.empty_like(lead, dtype=out_dtype, memory_format=fmt)
        if out.numel() == 0:
            return out
        g = geometry(out.numel(), layout.batch, layout.channels, channel_last)
        a_strides = param_strides(a, layout.batch) if mode == SCALE_SHIFT else (0, 0)
        torch.library.wrap_triton(_affine_kernel)[g.grid](
            cache,
            m,
            a,
            out,
            g.rows,
            g.cols,
            g.rows_per_sample,
            *param_strides(m, layout.batch),
            *a_strides,
            MODE=mode,
            CHANNEL_LAST=channel_last,
            BLOCK_R=g.block_r,
            BLOCK_K=g.block_k,
        )
        return out

    @torch.library.triton_op("fxcache::scale_shift", mutates_args=())
    def scale_shift_launch(
        cache: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int
    ) -> torch.Tensor:
        """``cache * (1 + scale) + shift`` by the Triton kernel (CUDA tensors, or CPU
        tensors under TRITON_INTERPRET=1)."""
        layout = _check_scale_shift(cache, scale, shift, channel_dim)
        check_kernel_dtypes("scale_shift", cache=cache, scale=scale, shift=shift)
        return _launch(SCALE_SHIFT, "scale_shift", layout, cache, cache, scale, shift,
                       result_dtype(cache, scale, shift))

    @torch.library.triton_op("fxcache::gated_residual", mutates_args=())
    def gated_residual_launch(
        x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor, channel_dim: int
    ) -> torch.Tensor:
        """``x + gate * cache`` by the Triton kernel (CUDA tensors, or CPU tensors under
        TRITON_INTERPRET=1)."""
        layout = _check_gated_residual(x, gate, cache, channel_dim)
        check_kernel_dtypes("gated_residual", x=x, gate=gate, cache=cache)
        # x fixes the output's layout; cache is brought to it
        return _launch(GATED_RESIDUAL, "gated_residual", layout, x, cache, gate, x,
                       result_dtype(x, gate, cache))

else:
    _affine_kernel = None

    def scale_shift_launch(
        cache: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int
    ) -> torch.Tensor:
        """Stands in for the Triton launcher when Triton is not available."""
        require_triton("fxcache.kernels.scale_shift_triton")

    def gated_residual_launch(
        x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor, channel_dim: int
    ) -> torch.Tensor:
        """Stands in for the Triton launcher when Triton is not available."""
        require_triton("fxcache.kernels.gated_residual_triton")
