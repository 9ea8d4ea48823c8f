"""Fused cache read into an adaLN-gated residual.

    y = x + gate * cache

``x`` and ``cache`` have the same shape, ``(B, *tokens, C)`` (``channel_dim=-1``, e.g.
``(B, N, C)``) or ``(B, C, *spatial)`` (``channel_dim=1``, e.g. NCHW); ``gate`` is
``(B, C)``, ``(1, C)`` or ``(C,)``. The output has the dtype eager PyTorch gives the
unfused expression (type promotion of the three inputs) and the memory format of
``x``. Arithmetic is done in fp32 (for fp32/fp16/bf16), rounded once.

Bytes moved, for x and cache of n elements of s bytes and P = B*C gate values:

    unfused  ``gate * cache``: reads n + P, writes a temporary of n
             ``x + t``:        reads x (n) and the temporary (n), writes n
             → 5·n·s + O(P·s)   (2 kernel launches, one n-sized temporary)
    fused    reads x and cache, writes n → 3·n·s + O(P·s)   (1 launch, no temporary)

e.g. a DiT-XL/2 block's attention or MLP output (2, 256, 1152) in bf16:
n·s = 1.18 MB, unfused 5.9 MB, fused 3.5 MB per gated residual (FORA does two per
block per cached step). (Non-contiguous ``x``/``cache`` cost one more 2·n·s copy each
in the launcher; ``channels_last`` NCHW and a strided ``gate`` from
``emb.chunk(k, dim=1)`` are read in place.)

This module holds three things: the ``@triton.jit`` kernel (the channel layout is the
``CHANNEL_LAST`` constexpr), its launcher registered as ``fxcache::gated_residual``
with ``torch.library.triton_op``, and the pure-torch ``reference`` that the tests
compare against and that is the implementation everywhere the kernel does not run.
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

OP = "gated_residual"


def _check(x, gate, cache, channel_dim):
    layout = check_layout(x, "x", channel_dim, OP)
    if not isinstance(cache, torch.Tensor):
        raise KernelArgumentError(f"{OP}: `cache` must be a torch.Tensor, got {type(cache).__name__}")
    if cache.shape != x.shape:
        raise KernelArgumentError(
            f"{OP}: `cache` has shape {tuple(cache.shape)}; expected {tuple(x.shape)}, "
            f"the shape of `x`"
        )
    if not cache.is_floating_point():
        raise KernelArgumentError(f"{OP}: `cache` has dtype {cache.dtype}; expected a floating dtype")
    check_param(gate, "gate", layout, OP)
    check_same_device(OP, "x", x, gate=gate, cache=cache)
    return layout


def reference(
    x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """``x + gate * cache`` in plain PyTorch, gate per (sample, channel).

    For fp32 inputs this is exactly the unfused eager expression; for fp16/bf16 it
    computes in fp32 and rounds once, as the kernel does (and as inductor does when it
    fuses this chain).
    """
    layout = _check(x, gate, cache, channel_dim)
    out_dtype = result_dtype(x, gate, cache)
    ct = compute_dtype(out_dtype)
    y = x.to(ct) + param_view(gate, layout).to(ct) * cache.to(ct)
    return y.to(out_dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import param_offsets, tile

    @triton.jit
    def _gated_residual_kernel(
        x_ptr,
        gate_ptr,
        cache_ptr,
        out_ptr,
        R,
        K,
        rows_per_sample,
        gate_stride_b,
        gate_stride_c,
        CHANNEL_LAST: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        offs, mask, rows, cols, row_ok = tile(R, K, BLOCK_R, BLOCK_K)
        g_off, pmask = param_offsets(
            rows, cols, mask, row_ok, rows_per_sample, gate_stride_b, gate_stride_c, CHANNEL_LAST
        )
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        h = tl.load(cache_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(gate_ptr + g_off, mask=pmask).to(tl.float32)
        y = x + g * h
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @torch.library.triton_op("fxcache::gated_residual", mutates_args=())
    def launch(
        x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor, channel_dim: int
    ) -> torch.Tensor:
        """Launch the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
        layout = _check(x, gate, cache, channel_dim)
        check_kernel_dtypes(OP, x=x, gate=gate, cache=cache)
        check_launchable(OP, _gated_residual_kernel, x)
        # x decides the physical layout; cache is brought to the same one (a no-op when
        # it already is, the usual case of a static buffer allocated like x).
        fmt, channel_last = dense_layout(x, layout)
        x = x.contiguous(memory_format=fmt)
        cache = cache.contiguous(memory_format=fmt)
        out = torch.empty_like(x, dtype=result_dtype(x, gate, cache), memory_format=fmt)
        if out.numel() == 0:
            return out
        g = geometry(out.numel(), layout.batch, layout.channels, channel_last)
        torch.library.wrap_triton(_gated_residual_kernel)[g.grid](
            x,
            gate,
            cache,
            out,
            g.rows,
            g.cols,
            g.rows_per_sample,
            *param_strides(gate, layout.batch),
            CHANNEL_LAST=channel_last,
            BLOCK_R=g.block_r,
            BLOCK_K=g.block_k,
        )
        return out

else:

    def launch(
        x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor, channel_dim: int
    ) -> torch.Tensor:
        """Stands in for the Triton launcher when Triton is not available."""
        require_triton("fxcache.kernels.gated_residual_triton")
