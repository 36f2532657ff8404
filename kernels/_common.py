"""Shared Triton helpers: tile products, launch configurations per device, autotune wrapping."""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def default_tiles(device: torch.device, dtype: torch.dtype) -> Tiles:
    """Tiles for the device: 128x128 on Hopper (wgmma-sized), 64x64 on other GPUs, small in the interpreter."""
    if device.type == "cuda" and not interpreting():
        major, _ = torch.cuda.get_device_capability(device)
        block_k = 64 if dtype in (torch.bfloat16, torch.float16) else 32
        if major >= 9:
            return Tiles(128, 128, block_k, num_warps=8, num_stages=3)
        return Tiles(64, 64, 32, num_warps=4, num_stages=2)
    return Tiles(16, 16, 16, num_warps=1, num_stages=1)


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


def matmul_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b computed and returned in fp32, added in place to `out` when given. On a GPU one cuBLAS call
    with bf16/fp16 inputs and an fp32 result (aten mm.dtype); on the CPU (interpreter runs) fp32 matmuls."""
    if a.is_cuda and a.dtype != torch.float32:
        product = torch.ops.aten.mm.dtype(a, b, torch.float32)
    else:
        product = a.float() @ b.float()
    return product if out is None else out.add_(product)
