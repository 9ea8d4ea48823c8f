"""What the kernel module (:mod:`fxcache.kernels.affine`) builds on: triton detection,
argument checks, the launch geometry, and the ``@triton.jit`` tiling helpers.

Nothing here launches anything; the checks are plain Python on shapes, dtypes and
devices, so they run unchanged under dynamo, on fake tensors and in eager mode.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# --------------------------------------------------------------------------- triton
try:  # the package must import without triton; the ops are simply not registered then
    import triton
    import triton.language as tl

    if not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        raise ImportError(
            f"torch {torch.__version__} has no torch.library.triton_op/wrap_triton (needs torch>=2.6)"
        )
    HAS_TRITON: bool = True
    TRITON_UNAVAILABLE_REASON: str = ""
except Exception as exc:  # ImportError, or a triton build that fails to initialise
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False
    TRITON_UNAVAILABLE_REASON = f"{type(exc).__name__}: {exc}"

#: Tiling. A dense feature tensor is read as a matrix of R rows by K columns (see
#: ``Geometry``); a program handles a BLOCK_R x BLOCK_K tile, masked at the edges, so
#: sizes need not be multiples of anything. The (sample, channel) of an element is
#: derived per row, not per element, so the integer divisions cost 1/BLOCK_K of an
#: operation per element and the kernel stays memory-bound.
MAX_BLOCK_K = 1024
TILE_ELEMENTS = 2048

#: Input/output dtypes the kernels accept (they compute in fp32 and store in the
#: output dtype). The references accept any floating dtype.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelArgumentError(ValueError):
    """An argument of an fxcache kernel has the wrong shape, layout, dtype or device.

    The message names the argument, what it got and what was expected.
    """


# --------------------------------------------------------------------------- checks
class Layout(NamedTuple):
    """How a feature tensor is read as ``(batch, channels)`` plus the rest.

    ``channel_last``: the channel dim is the last dim (``(B, N, C)``); otherwise it is
    dim 1 (``(B, C, *spatial)``).
    """

    ndim: int
    batch: int
    channels: int
    channel_last: bool


def check_layout(t: torch.Tensor, name: str, channel_dim: int, op: str) -> Layout:
    """Validate the feature tensor ``t`` and its ``channel_dim`` (1 or -1)."""
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim < 2:
        raise KernelArgumentError(
            f"{op}: `{name}` has shape {tuple(t.shape)}; expected at least 2 dims, "
            f"(B, C, *spatial) with channel_dim=1 or (B, *tokens, C) with channel_dim=-1"
        )
    if not t.is_floating_point():
        raise KernelArgumentError(f"{op}: `{name}` has dtype {t.dtype}; expected a floating dtype")
    if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
        raise KernelArgumentError(f"{op}: channel_dim must be an int (1 or -1), got {channel_dim!r}")
    cd = channel_dim + t.ndim if channel_dim < 0 else channel_dim
    if cd not in (1, t.ndim - 1):
        raise KernelArgumentError(
            f"{op}: channel_dim={channel_dim} is not supported for `{name}` of shape "
            f"{tuple(t.shape)}; use 1 for (B, C, *spatial) or -1 for (B, *tokens, C)"
        )
    return Layout(ndim=t.ndim, batch=t.shape[0], channels=t.shape[cd], channel_last=cd == t.ndim - 1)


def check_param(p: torch.Tensor, name: str, layout: Layout, op: str) -> None:
    """Validate a per-(sample, channel) parameter: ``(B, C)``, ``(1, C)`` or ``(C,)``."""
    if not isinstance(p, torch.Tensor):
        raise KernelArgumentError(f"{op}: `{name}` must be a torch.Tensor, got {type(p).__name__}")
    B, C = layout.batch, layout.channels
    ok = (p.ndim == 1 and p.shape[0] == C) or (
        p.ndim == 2 and p.shape[1] == C and p.shape[0] in (1, B)
    )
    if not ok:
        raise KernelArgumentError(
            f"{op}: `{name}` has shape {tuple(p.shape)}; expected ({B}, {C}), (1, {C}) or ({C},) "
            f"(per sample and channel of a feature tensor with batch {B} and {C} channels)"
        )
    if not p.is_floating_point():
        raise KernelArgumentError(f"{op}: `{name}` has dtype {p.dtype}; expected a floating dtype")


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise KernelArgumentError(
                f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; "
                f"move them to the same device"
            )


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype eager PyTorch gives the unfused expression (type promotion)."""
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def compute_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 (what the kernels do); wider dtypes keep their precision."""
    if out_dtype in (torch.float16, torch.bfloat16, torch.float32):
        return torch.float32
    return out_dtype


def param_view(p: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Reshape a checked ``(B|1, C)``/``(C,)`` parameter so it broadcasts against the feature."""
    bp = p.shape[0] if p.ndim == 2 else 1
    ones = (1,) * (layout.ndim - 2)
    if layout.channel_last:
        return p.reshape((bp,) + ones + (layout.channels,))
    return p.reshape((bp, layout.channels) + ones)


def dense_layout(t: torch.Tensor, layout: Layout) -> tuple[torch.memory_format, bool]:
    """Pick the physical layout the kernel reads ``t`` in, without copying when possible.

    Returns ``(memory_format, channel_last)``: a contiguous tensor is read as given
    (channel dim 1 or last); an NCHW tensor in ``torch.channels_last`` memory format is
    physically ``(B, H, W, C)`` and is read with the channel-last variant of the kernel.
    Anything else will be copied to ``torch.contiguous_format`` by the launcher.
    """
    if t.is_contiguous():
        return torch.contiguous_format, layout.channel_last
    if t.ndim == 4 and not layout.channel_last and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last, True
    return torch.contiguous_format, layout.channel_last


def check_kernel_dtypes(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in KERNEL_DTYPES:
            raise KernelArgumentError(
                f"{op}: `{name}` has dtype {t.dtype}; the Triton kernel supports "
                f"float32, float16 and bfloat16 (use the reference for other dtypes)"
            )


# --------------------------------------------------------------------------- launching
def require_triton(what: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(
            f"{what} needs Triton, which is not available ({TRITON_UNAVAILABLE_REASON}); "
            f"install fxcache[triton], or call the device-dispatching function "
            f"(fxcache.kernels.scale_shift / gated_residual), which uses the PyTorch "
            f"reference where Triton cannot run"
        )


def is_interpreted(kernel: object) -> bool:
    """True when ``@triton.jit`` built an interpreter kernel (TRITON_INTERPRET=1 was set
    when the kernel module was imported). Triton reads the variable at decoration time,
    not at launch time."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_launchable(op: str, kernel: object, t: torch.Tensor) -> None:
    """Refuse, with the fix in the message, to launch a GPU-compiled kernel on CPU tensors."""
    if t.device.type == "cpu" and not is_interpreted(kernel):
        raise RuntimeError(
            f"{op}: got CPU tensors, but the Triton kernel was compiled for the GPU. Triton "
            f"reads TRITON_INTERPRET when @triton.jit runs, i.e. when fxcache.kernels is first "
            f"imported: set TRITON_INTERPRET=1 before starting Python to run the kernel in the "
            f"interpreter, or call fxcache.kernels.{op}, which uses the reference on CPU"
        )


class Geometry(NamedTuple):
    """How a kernel is launched over a dense feature tensor.

    channel-last ``(B, S, C)``: rows are the B*S tokens/pixels, columns the C channels,
    ``rows_per_sample = S``; a parameter varies along the columns.
    channel-first ``(B, C, S)``: rows are the B*C channel planes, columns the S
    positions, ``rows_per_sample = C``; a parameter is one value per row.
    """

    rows: int
    cols: int
    rows_per_sample: int
    block_r: int
    block_k: int
    grid: tuple


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def geometry(numel: int, batch: int, channels: int, channel_last: bool) -> Geometry:
    """Tile sizes and grid for a dense tensor of ``numel`` elements (``numel > 0``)."""
    positions = numel // (batch * channels)
    if channel_last:
        rows, cols, per_sample = batch * positions, channels, positions
    else:
        rows, cols, per_sample = batch * channels, positions, channels
    block_k = min(_next_pow2(cols), MAX_BLOCK_K)
    block_r = min(_next_pow2(rows), max(1, TILE_ELEMENTS // block_k))
    grid = (-(-rows // block_r), -(-cols // block_k))
    if grid[1] > 65535:  # CUDA's limit on the second grid dimension
        raise KernelArgumentError(
            f"feature tensor with {cols} positions per channel plane is too large for the "
            f"Triton kernel (at most {65535 * MAX_BLOCK_K}); use the reference"
        )
    return Geometry(rows, cols, per_sample, block_r, block_k, grid)


def param_strides(p: torch.Tensor, batch: int) -> tuple[int, int]:
    """(batch stride, channel stride) of a checked parameter; batch stride 0 broadcasts."""
    if p.ndim == 2 and p.shape[0] == batch and batch > 1:
        return p.stride(0), p.stride(1)
    return 0, p.stride(-1)


if HAS_TRITON:

    @triton.jit
    def tile(R, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """This program's BLOCK_R x BLOCK_K tile of a dense (R, K) matrix: flat offsets,
        mask, and the row and column indices with the rows' own mask."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = rows < R
        mask = row_ok[:, None] & (cols < K)[None, :]
        offs = rows[:, None] * K + cols[None, :]
        return offs, mask, rows, cols, row_ok

    @triton.jit
    def param_offsets(
        rows, cols, mask, row_ok, rows_per_sample, stride_b, stride_c, CHANNEL_LAST: tl.constexpr
    ):
        """Offsets (and mask) of a per-(sample, channel) parameter for a tile (see
        ``Geometry``): a (BLOCK_R, BLOCK_K) gather along the channels when CHANNEL_LAST,
        one value per row, shape (BLOCK_R, 1), otherwise."""
        b = rows // rows_per_sample
        if CHANNEL_LAST:
            off = b[:, None] * stride_b + cols[None, :] * stride_c
            pmask = mask
        else:
            c = rows - b * rows_per_sample
            off = (b * stride_b + c * stride_c)[:, None]
            pmask = row_ok[:, None]
        return off, pmask
