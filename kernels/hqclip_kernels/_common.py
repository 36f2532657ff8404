"""Shared Triton helpers: tile products, launch configurations per device, autotune wrapping."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

# Globals used inside kernels must be tl.constexpr instances (an annotation is not enough when compiling).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Masked logits: finite so that max/exp never produce inf - inf = nan; far below any |s * <a, b>| <= 100.
NEG = tl.constexpr(-1.0e30)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_interpreter() -> None:
    """Fail clearly where Triton's interpreter cannot run our kernels. Triton 3.6's interpreter turns every
    runtime loop bound into a 1-element array and calls int() on it, which numpy >= 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"); Triton 3.7 and later are fine. Compiled runs
    on a GPU are not affected."""
    if not interpreting():
        return
    triton_version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    numpy_version = tuple(int(x) for x in np.__version__.split(".")[:2])
    if triton_version < (3, 7) and numpy_version >= (2, 4):
        raise RuntimeError(
            f"TRITON_INTERPRET=1 with triton {triton.__version__} and numpy {np.__version__}: this interpreter "
            "cannot take runtime loop bounds under numpy >= 2.4. Use triton >= 3.7 or numpy < 2.4 for "
            "interpreted (CPU) kernel runs.")


# Triton's interpreter gets bf16 x bf16 dots wrong (numpy has no bf16 matmul); upcasting there is exact,
# since a product of two bf16 values is exact in fp32, so results equal the GPU's fp32-accumulating dot.
UPCAST_DOT = tl.constexpr(interpreting())


@dataclass(frozen=True)
class Tiles:
    """Tile shape of one launch. block_m x block_n logits per program, block_k features per dot step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class Launch:
    """How the kernels are laid out on a device: the tile shape, how many programs a sweep aims for, the
    bytes of one backward logit panel, and whether the contrastive backward makes the logit gradient in two
    passes (see contrastive.lse_backward)."""

    tiles: Tiles
    programs: int
    panel_bytes: int
    two_pass: bool = False


# One backward logit panel on a GPU. Fewer, larger panels mean fewer passes over the fp32 buffer in which the
# other side's gradient sums over panels (bf16, B = 32768 without negatives: 2048 rows, 16 panels).
GPU_PANEL_BYTES = 128 << 20
# Two passes trade one more recomputation of the logits for no fp32 gradient buffer (benchmarks/
# memory_model.py, B = 32768, D = 768: 129 MiB with 32 MiB panels, against 289 MiB in one pass with 128 MiB
# panels). Off until the GPU benchmark (bench_loss.py impl triton_2pass) has timed both.
GPU_TWO_PASS = False


def launch_config(device: torch.device, dtype: torch.dtype) -> Launch:
    """On a GPU: 128 x 128 tiles on Hopper (wgmma-sized), 64 x 64 elsewhere; four programs per SM, so that
    shorter last groups even out. In the interpreter: small tiles, four programs (each is a Python loop there;
    2 x 2 groups still exercise the merges across groups) and small panels, so that tests cut several."""
    if device.type == "cuda" and not interpreting():
        major, _ = torch.cuda.get_device_capability(device)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        block_k = 64 if dtype in (torch.bfloat16, torch.float16) else 32
        tiles = Tiles(128, 128, block_k, num_warps=8, num_stages=3) if major >= 9 else Tiles(64, 64, 32)
        return Launch(tiles, 4 * sms, GPU_PANEL_BYTES, GPU_TWO_PASS)
    return Launch(Tiles(16, 16, 16, num_warps=1, num_stages=1), 4, (1 << 14) * dtype.itemsize)


def autotune_configs() -> list[triton.Config]:
    """block_k / warps / stages to try on a GPU (block_m, block_n are fixed by the caller because they set
    the shape of the partial-statistics buffers). One config (no tuning) in the interpreter."""
    if interpreting() or not torch.cuda.is_available():
        return [triton.Config({}, num_warps=1, num_stages=1)]
    return [
        triton.Config({}, num_warps=w, num_stages=s)
        for w in (4, 8)
        for s in (2, 3, 4)
    ]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products ("ieee": the loss must match the reference, so no tf32), as do
    the interpreter's upcast bf16 dots; bf16/fp16 on a GPU take the default tensor-core path."""
    return "ieee" if dtype == torch.float32 or interpreting() else "tf32"


@triton.jit
def tile_dot(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr):
    """fp32 tile <a_rows, b_cols> (BLOCK_M x BLOCK_N), looping over the feature dim in BLOCK_K steps."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        dd = d0 + tl.arange(0, BLOCK_K)
        d_ok = dd < D
        a = tl.load(a_ptr + rows[:, None] * stride_a + dd[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(b_ptr + cols[None, :] * stride_b + dd[:, None],
                    mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_DOT:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b computed and returned in fp32. On a GPU one cuBLAS call with bf16/fp16 inputs and an fp32 result
    (aten mm.dtype, which has no CPU kernel); on the CPU (interpreter runs) an fp32 matmul."""
    if a.device.type != "cpu" and a.dtype != torch.float32:
        return torch.ops.aten.mm.dtype(a, b, torch.float32)
    return a.float() @ b.float()


# Bytes of the fp32 temporary that addmm_fp32_ adds from: small enough to stay in a GPU's L2 cache.
_ACCUMULATE_CHUNK_BYTES = 16 << 20


def row_chunks(rows: int, row_bytes: int, chunk_bytes: int) -> list[slice]:
    """Slices over `rows` rows of `row_bytes` each, at most `chunk_bytes` a slice (at least one row)."""
    step = max(1, chunk_bytes // max(row_bytes, 1))
    return [slice(start, start + step) for start in range(0, rows, step)]


def addmm_fp32_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a @ b in place, `out` fp32. fp32 inputs: one addmm (beta = 1, no temporary). bf16/fp16 inputs:
    aten cannot add a bf16 product into an fp32 tensor in place (addmm.dtype wants `self` in the inputs'
    dtype), so the fp32 product is made and added a row chunk at a time: the temporary stays at 16 MiB
    instead of the size of `out` (96 MiB for a 32768 x 768 key gradient)."""
    if a.dtype == torch.float32:
        return out.addmm_(a, b)
    for rows in row_chunks(out.shape[0], 4 * out.shape[1], _ACCUMULATE_CHUNK_BYTES):
        out[rows] += mm_fp32(a[rows], b)
    return out
