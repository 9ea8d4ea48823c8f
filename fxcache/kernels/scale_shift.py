"""Fused cache read with a per-(sample, channel) scale and shift.

    y = cache * (1 + scale) + shift

``cache`` is ``(B, C, *spatial)`` (``channel_dim=1``, e.g. NCHW) or ``(B, *tokens, C)``
(``channel_dim=-1``, e.g. ``(B, N, C)``); ``scale`` and ``shift`` are ``(B, C)``,
``(1, C)`` or ``(C,)``, each independently. The output has the dtype eager PyTorch
gives the unfused expression (type promotion of the three inputs) and the memory
format of ``cache``. Arithmetic is done in fp32 (for fp32/fp16/bf16), rounded once.

Bytes moved, for a cache of n elements of s bytes and P = B*C parameters:

    unfused  ``1 + scale``: reads P, writes P (small)
             ``cache * t``: reads n + P, writes a temporary of n
             ``+ shift``:   reads the temporary n + P, writes n
             → 4·n·s + O(P·s)   (3 kernel launches, one n-sized temporary)
    fused    reads n, writes n → 2·n·s + O(P·s)   (1 launch, no temporary)

e.g. a DiT-XL/2 token tensor (2, 256, 1152) in bf16: n·s = 1.18 MB, unfused 4.7 MB,
fused 2.4 MB. (A non-contiguous ``cache`` costs one more 2·n·s copy in the launcher;
``channels_last`` NCHW and the strided views ``emb.chunk(k, dim=1)`` gives for
``scale``/``shift`` are read in place.)

This module holds three things: the ``@triton.jit`` kernel (the channel layout is the
``CHANNEL_LAST`` constexpr), its launcher registered as ``fxcache::scale_shift`` with
``torch.library.triton_op``, and the pure-torch ``reference`` that the tests compare
against and that is the implementation everywhere the kernel does not run.
"""

import torch

from ._common import (
    HAS_TRITON,
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

OP = "scale_shift"


def _check(cache, scale, shift, channel_dim):
    layout = check_layout(cache, "cache", channel_dim, OP)
    check_param(scale, "scale", layout, OP)
    check_param(shift, "shift", layout, OP)
    check_same_device(OP, "cache", cache, scale=scale, shift=shift)
    return layout


def reference(
    cache: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """``cache * (1 + scale) + shift`` in plain PyTorch, scale/shift per (sample, channel).

    For fp32 inputs this is exactly the unfused eager expression; for fp16/bf16 it
    computes in fp32 and rounds once, as the kernel does (and as inductor does when it
    fuses this chain).
    """
    layout = _check(cache, scale, shift, channel_dim)
    out_dtype = result_dtype(cache, scale, shift)
    ct = compute_dtype(out_dtype)
    y = cache.to(ct) * (1 + param_view(scale, layout).to(ct)) + param_view(shift, layout).to(ct)
    return y.to(out_dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import param_offsets, tile

    @triton.jit
    def _scale_shift_kernel(
        cache_ptr,
        scale_ptr,
        shift_ptr,
        out_ptr,
        R,
        K,
        rows_per_sample,
        scale_stride_b,
        scale_stride_c,
        shift_stride_b,
        shift_stride_c,
        CHANNEL_LAST: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        offs, mask, rows, cols, row_ok = tile(R, K, BLOCK_R, BLOCK_K)
        sc_off, pmask = param_offsets(
            rows, cols, mask, row_ok, rows_per_sample, scale_stride_b, scale_stride_c, CHANNEL_LAST
        )
        sh_off, _ = param_offsets(
            rows, cols, mask, row_ok, rows_per_sample, shift_stride_b, shift_stride_c, CHANNEL_LAST
        )
        x = tl.load(cache_ptr + offs, mask=mask).to(tl.float32)
        sc = tl.load(scale_ptr + sc_off, mask=pmask).to(tl.float32)
        sh = tl.load(shift_ptr + sh_off, mask=pmask).to(tl.float32)
        y = x * (1.0 + sc) + sh
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @torch.library.triton_op("fxcache::scale_shift", mutates_args=())
    def launch(
        cache: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int
    ) -> torch.Tensor:
        """Launch the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
        layout = _check(cache, scale, shift, channel_dim)
        check_kernel_dtypes(OP, cache=cache, scale=scale, shift=shift)
        check_launchable(OP, _scale_shift_kernel, cache)
        fmt, channel_last = dense_layout(cache, layout)
        cache = cache.contiguous(memory_format=fmt)
        out = torch.empty_like(cache, dtype=result_dtype(cache, scale, shift), memory_format=fmt)
        if out.numel() == 0:
            return out
        g = geometry(out.numel(), layout.batch, layout.channels, channel_last)
        torch.library.wrap_triton(_scale_shift_kernel)[g.grid](
            cache,
            scale,
            shift,
            out,
            g.rows,
            g.cols,
            g.rows_per_sample,
            *param_strides(scale, layout.batch),
            *param_strides(shift, layout.batch),
            CHANNEL_LAST=channel_last,
            BLOCK_R=g.block_r,
            BLOCK_K=g.block_k,
        )
        return out

else:

    def launch(
        cache: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int
    ) -> torch.Tensor:
        """Stands in for the Triton launcher when Triton is not available."""
        require_triton("fxcache.kernels.scale_shift_triton")
