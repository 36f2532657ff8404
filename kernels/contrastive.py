"""Fused log-sum-exp of contrastive logits, s * Q @ K.T, without ever holding the logits.

Keys are given as two row blocks K = [K1; K2] (K2 optional: negative texts as extra image->text columns), so
the caller never concatenates feature matrices.

Forward (`_lse_fwd_kernel`): one sweep over BLOCK_M x BLOCK_N logit tiles. `sweep_grid` cuts the plane of
row blocks x column tiles into row groups x column groups, one program each (about four programs per SM of
the GPU). Program (r, c) walks its row blocks (outer loop) and, for each, its column tiles (inner loop):
  row_part[c, i] = lse of row i over column group c: an online (max, sum) per row in registers, stored once
                   per row block;
  col_part[r, j] = lse of column j over row group r (only K1 columns, only when column stats are asked for):
                   merged tile by tile into the buffer (read, merge, write). Program (r, c) is the only
                   one that touches these entries, so there are no atomics and the result is bit-reproducible.
Both are reduced with torch.logsumexp afterwards, in a fixed order. The buffers hold col_groups x M and
row_groups x N1 floats, about sqrt(programs) per axis: O(M + N) whatever the batch (one partial per row block
and column would be O(M N / BLOCK_M), 32 MiB at B = 32768). Rows and columns are rescaled by their own
running max in base 2 (partials are log2-sum-exp2), so any scale (up to 100 and beyond) is safe however
poorly rows align. The same sweep stores the positive logits diag[i] = s <q_i, k1_{i + offset}> (the
InfoNCE targets).

Backward: for panels of Q rows, `_grad_logits_kernel` recomputes each tile once and writes
  G = s * (g_row_i P_row_ij + g_col_j P_col_ij + [j = i + offset] g_diag_i),
  P_row = exp(S - lse_row), P_col = exp(S - lse_col)
(the gradient w.r.t. s * <q_i, k_j>, times s) in the input dtype, plus a per-tile partial of d(scale).
The positive-logit gradient is added in fp32 inside the tile, so the large, nearly cancelling
softmax and target terms are rounded to bf16 once, after they cancel.
Then dQ = G @ K and dK = G.T @ Q are plain GEMMs (cuBLAS on a GPU). No atomics: every sum has a fixed
order, so two runs are bit-identical. A panel spans every column, so dQ is written panel by panel in the
input dtype; dK sums over panels in an fp32 buffer (unless there is one panel). Peak extra memory: one panel
(panel_rows x (N1 + N2)), the fp32 dK buffer and O(M + N) statistics.

Memory model, one process, B = M = N1 = 32768, D = 768, bf16, no negatives, H100 (132 SMs, 528 programs,
128 x 128 tiles; an estimate from the code, to be checked with benchmarks/bench_loss.py --device cuda):
  forward        row_part 24 x B + col_part 22 x B fp32, row/col lse + diag                      ~6 MiB
  backward sweep logit panel 2048 x B bf16 (16 panels; 1024 x 2B with negatives)               128 MiB
                 fp32 dK buffer B x D (one more for the negatives' gradient)                      96 MiB
                 dQ output, bf16 B x D (written panel by panel)                                   48 MiB
  backward end   fp32 dK buffer + dQ and dK outputs: 96 + 48 + 48                               192 MiB
  peak extra ~272 MiB, in the backward sweep (the forward's partials are gone by then).
open_clip's ClipLoss at the same shapes (bf16 features, no autocast) holds logits_per_image and
logits_per_text (B x B, 2 GiB each) until its forward returns, and each cross_entropy saves its log-softmax
(B x B, 2 GiB each): ~8 GiB at the end of the forward, about as much in backward (the saved log-softmaxes plus
one direction's B x B gradients), so a peak of ~8 GiB (about twice that under autocast, where cross_entropy
runs on fp32 copies). Against the 2% target (~164 MiB): 272 / 8192 = 3.3%, missed by this estimate; the
statistics are not the issue, the backward's panel and fp32 dK buffer are. Halving _PANEL_ELEMENTS gives
~208 MiB (2.5%) at the cost of twice as many fp32 read-modify-write passes over the dK buffer; the dK buffer
plus the dQ output (144 MiB, 1.8%) are the floor of a backward whose dK GEMMs run per panel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    LN2,
    LOG2E,
    NEG,
    Tiles,
    autotune_configs,
    default_tiles,
    dot_precision,
    interpreting,
    matmul_fp32,
    tile_dot,
)

__all__ = ["contrastive_lse", "lse_forward", "lse_backward", "sweep_grid", "SweepGrid"]

# Elements of one backward panel on a GPU (bf16: 128 MiB): fewer panels mean fewer fp32 passes over the
# accumulated key gradient (B=32768: 2048 rows, 16 panels). The interpreter uses small panels.
_PANEL_ELEMENTS = 1 << 26


@triton.autotune(configs=autotune_configs(), key=["D", "ROW_BLOCKS", "TOTAL_TILES", "COL_STATS"])
@triton.jit
def _lse_fwd_kernel(q_ptr, k1_ptr, k2_ptr, scale_ptr, row_part_ptr, col_part_ptr, diag_ptr,
                    M, N1, N2, D, stride_q, stride_k1, stride_k2,
                    ROW_BLOCKS, TILES1, TOTAL_TILES, BLOCKS_PER_GROUP, TILES_PER_GROUP, DIAG_OFFSET,
                    COL_STATS: tl.constexpr, HAS_DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_r = tl.program_id(0)  # row group: writes col_part[pid_r, its columns]
    pid_c = tl.program_id(1)  # column group: writes row_part[pid_c, its rows]
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E  # base-2 logits: exp2 is the fast path
    b_start = pid_r * BLOCKS_PER_GROUP
    b_stop = tl.minimum(b_start + BLOCKS_PER_GROUP, ROW_BLOCKS)
    t_start = pid_c * TILES_PER_GROUP
    t_stop = tl.minimum(t_start + TILES_PER_GROUP, TOTAL_TILES)
    for b in range(b_start, b_stop):
        rows = b * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        m_i = tl.full([BLOCK_M], NEG, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for t in range(t_start, t_stop):
            # Pick the key block by select, not by branch: the feature loop inside tile_dot then stays the
            # innermost loop outside any branch, which Triton software-pipelines.
            first = t < TILES1
            k_ptr = tl.where(first, k1_ptr, k2_ptr)
            cols = tl.where(first, t, t - TILES1) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < tl.where(first, N1, N2)
            acc = tile_dot(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, stride_q,
                           tl.where(first, stride_k1, stride_k2), BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            x = acc * scale2
            x_row = tl.where(col_ok[None, :], x, NEG)
            m_new = tl.maximum(m_i, tl.max(x_row, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(x_row - m_new[:, None]), axis=1)
            m_i = m_new
            if HAS_DIAG:
                if t < TILES1:
                    on_diag = cols[None, :] == rows[:, None] + DIAG_OFFSET
                    in_tile = (row_ok & (rows + DIAG_OFFSET >= t * BLOCK_N)
                               & (rows + DIAG_OFFSET < t * BLOCK_N + BLOCK_N))
                    tl.store(diag_ptr + rows, tl.sum(tl.where(on_diag, x, 0.0), axis=1) * LN2, mask=in_tile)
            if COL_STATS:
                if t < TILES1:
                    # Merge this block's column lse into the row group's running one (log2 units). Only
                    # this program touches these entries; the group's first block overwrites them, so a
                    # relaunch (autotuning) needs no reset.
                    x_col = tl.where(row_ok[:, None], x, NEG)
                    c_m = tl.max(x_col, axis=0)
                    c_lse = c_m + tl.log2(tl.sum(tl.exp2(x_col - c_m[None, :]), axis=0))
                    part = col_part_ptr + pid_r * N1 + cols
                    old = tl.load(part, mask=col_ok & (b > b_start), other=NEG)
                    top = tl.maximum(old, c_lse)
                    tl.store(part, top + tl.log2(tl.exp2(old - top) + tl.exp2(c_lse - top)), mask=col_ok)
                    # The next block reads these back, maybe in other threads: make the stores visible.
                    tl.debug_barrier()
        tl.store(row_part_ptr + pid_c * M + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.autotune(configs=autotune_configs(), key=["D", "TILES1", "N_TILES"])
@triton.jit
def _grad_logits_kernel(q_ptr, k1_ptr, k2_ptr, scale_ptr, row_lse_ptr, row_g_ptr, col_lse_ptr, col_g_ptr,
                        diag_g_ptr, g_ptr, ds_part_ptr, M, N1, N2, D, stride_q, stride_k1, stride_k2, stride_g,
                        TILES1, N_TILES, DIAG_OFFSET,
                        COL_STATS: tl.constexpr, HAS_DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    first = pid_t < TILES1
    k_ptr = tl.where(first, k1_ptr, k2_ptr)
    cols = tl.where(first, pid_t, pid_t - TILES1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < tl.where(first, N1, N2)
    g_cols = tl.where(first, cols, N1 + cols)
    acc = tile_dot(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, stride_q, tl.where(first, stride_k1, stride_k2),
                   BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    x = acc * (scale * LOG2E)
    lse_r = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    g_r = tl.load(row_g_ptr + rows, mask=row_ok, other=0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    grad = g_r[:, None] * tl.exp2(x - lse_r[:, None])
    if HAS_DIAG:
        if pid_t < TILES1:
            g_d = tl.load(diag_g_ptr + rows, mask=row_ok, other=0.0)
            grad += tl.where(cols[None, :] == rows[:, None] + DIAG_OFFSET, g_d[:, None], 0.0)
    grad = tl.where(ok, grad, 0.0)
    # d(scale) in two parts: row + positive terms, and column terms (owned by another rank in a ring).
    ds_ptr = ds_part_ptr + 2 * (pid_m * N_TILES + pid_t)
    tl.store(ds_ptr, tl.sum(tl.sum(grad * acc, axis=1), axis=0))
    if COL_STATS:
        if pid_t < TILES1:
            lse_c = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0) * LOG2E
            g_c = tl.load(col_g_ptr + cols, mask=col_ok, other=0.0)
            grad_c = tl.where(ok, g_c[None, :] * tl.exp2(x - lse_c[None, :]), 0.0)
            tl.store(ds_ptr + 1, tl.sum(tl.sum(grad_c * acc, axis=1), axis=0))
            grad += grad_c
    tl.store(g_ptr + rows[:, None] * stride_g + g_cols[None, :],
             (grad * scale).to(g_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class SweepGrid:
    """How the forward splits the plane of row blocks x column tiles: program (r, c) sweeps row blocks
    [r * blocks_per_group, (r + 1) * blocks_per_group) against column tiles [c * tiles_per_group, ...)
    (the last group of each axis may be shorter; none is empty)."""

    row_groups: int
    col_groups: int
    blocks_per_group: int
    tiles_per_group: int

    def partial_shapes(self, M: int, N1: int, col_stats: bool) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of the fp32 partial-statistics buffers: row_part (col_groups, M), col_part (row_groups, N1)
        (no rows without column statistics). O(M + N1) for a fixed number of programs."""
        return (self.col_groups, M), (self.row_groups if col_stats else 0, N1)


def sweep_grid(row_blocks: int, col_tiles: int, col_stats: bool, programs: int) -> SweepGrid:
    """About `programs` programs in a (row groups x column groups) grid. The buffers hold col_groups x M and
    row_groups x N1 floats, so with column statistics both axes get about sqrt(programs) groups; without
    them row groups cost nothing and take all they can."""
    row_blocks, col_tiles, programs = max(row_blocks, 1), max(col_tiles, 1), max(programs, 1)
    row_groups = min(row_blocks, math.isqrt(programs) if col_stats else programs)
    col_groups = min(col_tiles, triton.cdiv(programs, row_groups))
    blocks, tiles = triton.cdiv(row_blocks, row_groups), triton.cdiv(col_tiles, col_groups)
    return SweepGrid(triton.cdiv(row_blocks, blocks), triton.cdiv(col_tiles, tiles), blocks, tiles)


def _forward_programs(device: torch.device) -> int:
    """Four programs per SM on a GPU, so that shorter last groups even out; four in the interpreter (each
    program is a Python loop there; 2 x 2 groups still exercise the merges across groups)."""
    if device.type == "cuda" and not interpreting():
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _prep(q, k1, k2, tiles):
    q, k1 = q.contiguous(), k1.contiguous()
    k2 = k1[:0] if k2 is None else k2.contiguous()
    tiles = tiles or default_tiles(q.device, q.dtype)
    return q, k1, k2, tiles


def lse_forward(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor | None, scale: torch.Tensor,
                col_stats: bool, diag_offset: int, tiles: Tiles | None = None, programs: int = 0):
    """(row_lse (M,), col_lse (N1,) or empty, diag (M,) or empty), fp32. See `contrastive_lse`.
    programs: how many programs the sweep aims for (0: fill the device; tests pass small counts)."""
    q, k1, k2, tiles = _prep(q, k1, k2, tiles)
    M, D = q.shape
    N1, N2 = k1.shape[0], k2.shape[0]
    row_blocks = triton.cdiv(M, tiles.block_m)
    tiles1, tiles2 = triton.cdiv(N1, tiles.block_n), triton.cdiv(N2, tiles.block_n)
    total = tiles1 + tiles2
    grid = sweep_grid(row_blocks, total, col_stats, programs or _forward_programs(q.device))
    row_shape, col_shape = grid.partial_shapes(M, N1, col_stats)
    row_part = torch.empty(row_shape, device=q.device, dtype=torch.float32)
    col_part = torch.empty(col_shape, device=q.device, dtype=torch.float32)
    has_diag = diag_offset >= 0
    diag = torch.empty(M if has_diag else 0, device=q.device, dtype=torch.float32)
    scale = scale.detach().float().reshape(1)
    _lse_fwd_kernel[(grid.row_groups, grid.col_groups)](
        q, k1, k2, scale, row_part, col_part, diag, M, N1, N2, D, q.stride(0), k1.stride(0), k2.stride(0),
        row_blocks, tiles1, total, grid.blocks_per_group, grid.tiles_per_group, max(diag_offset, 0),
        COL_STATS=col_stats, HAS_DIAG=has_diag, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, PRECISION=dot_precision(q.dtype))
    # The partials are log2-sum-exp2 values: natural lse = logsumexp(ln 2 * partials), in a fixed order.
    row_lse = torch.logsumexp(row_part.mul_(math.log(2)), dim=0)
    col_lse = torch.logsumexp(col_part.mul_(math.log(2)), dim=0) if col_stats else col_part.new_empty(0)
    return row_lse, col_lse, diag


def lse_backward(q, k1, k2, scale, row_lse, col_lse, grad_row, grad_col, grad_diag, diag_offset: int, *,
                 panel_rows: int = 0, tiles: Tiles | None = None, accumulate=None):
    """Gradients (dq, dk1, dk2 or None, dscale_rows, dscale_cols) of
    sum(grad_row * row_lse) + sum(grad_col * col_lse) + sum(grad_diag * diag); d(scale) is split into the
    row + positive terms and the column terms (0-d fp32 tensors, their sum is d(scale)).

    accumulate: optional fp32 buffers (dq, dk1, dk2 or None) that the gradients are added to in place and
    returned as, for callers that sum over several key chunks (the ring). Otherwise gradients come in q's
    dtype.
    """
    has_k2 = k2 is not None
    q, k1, k2, tiles = _prep(q, k1, k2, tiles)
    M, D = q.shape
    N1, N2 = k1.shape[0], k2.shape[0]
    col_stats, has_diag = col_lse.numel() > 0, diag_offset >= 0
    grad_row = grad_row.float().contiguous()
    grad_col = grad_col.float().contiguous() if col_stats else grad_row
    col_lse = col_lse if col_stats else row_lse
    grad_diag = grad_diag.float().contiguous() if has_diag else grad_row
    if panel_rows <= 0:
        budget = _PANEL_ELEMENTS if q.is_cuda and not interpreting() else 1 << 14
        panel_rows = max(tiles.block_m, budget // max(N1 + N2, 1) // tiles.block_m * tiles.block_m)
    panel_rows = min(panel_rows, M)
    tiles1, tiles2 = triton.cdiv(N1, tiles.block_n), triton.cdiv(N2, tiles.block_n)
    n_tiles = tiles1 + tiles2
    scale32 = scale.detach().float().reshape(1)

    # A panel spans every column, so its rows of dq are complete after it: written in q's dtype (one
    # rounding). dk sums over panels: fp32 buffers add them in order (deterministic), unless there is one
    # panel. Callers that sum over several key chunks pass fp32 buffers for all three.
    caller_buffers = accumulate is not None
    single_panel = panel_rows >= M
    if caller_buffers:
        dq_acc, dk1_acc, dk2_acc = accumulate
    else:
        dq = torch.empty_like(q)
        if not single_panel:
            dk1_acc, dk2_acc = (torch.zeros(n, D, device=q.device, dtype=torch.float32) for n in (N1, N2))
    ds_parts = []
    grad = torch.empty(panel_rows, N1 + N2, device=q.device, dtype=q.dtype)
    for start in range(0, M, panel_rows):
        stop = min(start + panel_rows, M)
        rows = stop - start
        row_blocks = triton.cdiv(rows, tiles.block_m)
        ds_part = torch.zeros(row_blocks, n_tiles, 2, device=q.device, dtype=torch.float32)
        g, qp = grad[:rows], q[start:stop]
        # Panel row r is row start + r: its positive sits in column start + r + offset.
        _grad_logits_kernel[(row_blocks, n_tiles)](
            qp, k1, k2, scale32, row_lse[start:stop], grad_row[start:stop], col_lse, grad_col,
            grad_diag[start:stop], g, ds_part, rows, N1, N2, D, qp.stride(0), k1.stride(0), k2.stride(0),
            g.stride(0), tiles1, n_tiles, start + max(diag_offset, 0), COL_STATS=col_stats, HAS_DIAG=has_diag,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
            PRECISION=dot_precision(q.dtype))
        ds_parts.append(ds_part.sum(dim=(0, 1)))
        g1, g2 = g[:, :N1], g[:, N1:]
        if caller_buffers:
            matmul_fp32(g1, k1, dq_acc[start:stop])
            if N2:
                matmul_fp32(g2, k2, dq_acc[start:stop])
        elif N2:
            dq[start:stop] = matmul_fp32(g2, k2, matmul_fp32(g1, k1))
        else:
            torch.matmul(g1, k1, out=dq[start:stop])
        if single_panel and not caller_buffers:
            dk1, dk2 = g1.T @ qp, g2.T @ qp
        else:
            matmul_fp32(g1.T, qp, dk1_acc)
            if N2:
                matmul_fp32(g2.T, qp, dk2_acc)
    del grad, g, g1, g2  # the panel is not needed for the casts below
    ds_row, ds_col = torch.stack(ds_parts).sum(dim=0).unbind()
    if caller_buffers:
        dq, dk1, dk2 = accumulate
    elif not single_panel:
        dk1, dk2 = dk1_acc.to(q.dtype), dk2_acc.to(q.dtype)
    return dq, dk1, (dk2 if has_k2 else None), ds_row, ds_col


# torch.compile sees these as opaque ops with fake (shape-only) implementations: no graph breaks.
@torch.library.custom_op("hqclip::contrastive_lse", mutates_args=())
def _contrastive_lse_op(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor | None, scale: torch.Tensor,
                        col_stats: bool, diag_offset: int, panel_rows: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return lse_forward(q, k1, k2, scale, col_stats, diag_offset)


@_contrastive_lse_op.register_fake
def _(q, k1, k2, scale, col_stats, diag_offset, panel_rows):
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(q.shape[0], **f32), q.new_empty(k1.shape[0] if col_stats else 0, **f32),
            q.new_empty(q.shape[0] if diag_offset >= 0 else 0, **f32))


@torch.library.custom_op("hqclip::contrastive_lse_backward", mutates_args=())
def _contrastive_lse_backward_op(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor | None,
                                 scale: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
                                 grad_row: torch.Tensor, grad_col: torch.Tensor, grad_diag: torch.Tensor,
                                 diag_offset: int, panel_rows: int
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk1, dk2, ds_row, ds_col = lse_backward(q, k1, k2, scale, row_lse, col_lse, grad_row, grad_col,
                                                grad_diag, diag_offset, panel_rows=panel_rows)
    dk2 = dk2 if dk2 is not None else k1.new_empty(0, k1.shape[1])
    return dq, dk1, dk2, (ds_row + ds_col).to(scale.dtype).reshape(scale.shape)


@_contrastive_lse_backward_op.register_fake
def _(q, k1, k2, scale, row_lse, col_lse, grad_row, grad_col, grad_diag, diag_offset, panel_rows):
    dk2 = torch.empty_like(k2) if k2 is not None else k1.new_empty(0, k1.shape[1])
    return torch.empty_like(q), torch.empty_like(k1), dk2, torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    q, k1, k2, scale, col_stats, diag_offset, panel_rows = inputs
    row_lse, col_lse, _ = output
    ctx.save_for_backward(q, k1, k2, scale, row_lse, col_lse)
    ctx.diag_offset, ctx.panel_rows = diag_offset, panel_rows


def _backward(ctx, grad_row, grad_col, grad_diag):
    q, k1, k2, scale, row_lse, col_lse = ctx.saved_tensors
    grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row
    grad_col = torch.zeros_like(col_lse) if grad_col is None else grad_col
    if grad_diag is None:
        grad_diag = row_lse.new_zeros(row_lse.shape[0] if ctx.diag_offset >= 0 else 0)
    dq, dk1, dk2, dscale = _contrastive_lse_backward_op(q, k1, k2, scale, row_lse, col_lse, grad_row,
                                                        grad_col, grad_diag, ctx.diag_offset, ctx.panel_rows)
    return dq, dk1, (dk2 if k2 is not None else None), dscale, None, None, None


_contrastive_lse_op.register_autograd(_backward, setup_context=_setup_context)


def contrastive_lse(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor | None, scale: torch.Tensor, *,
                    col_stats: bool = False, diag_offset: int | None = None, panel_rows: int = 0):
    """Differentiable statistics of the logits S = s * q @ [k1; k2].T, which are never materialized.

    Returns fp32 (row_lse, col_lse, diag):
      row_lse[i] = log sum_j exp(S_ij) over all k1 and k2 rows;
      col_lse[j] = log sum_i exp(S_ij) over all q rows, for the k1 columns (empty unless col_stats);
      diag[i]    = S_{i, i + diag_offset}, the positive logits (empty when diag_offset is None).
    Gradients reach q, k1, k2 and scale (a 0-d tensor). panel_rows bounds the backward's logit panel
    (0: automatic).
    """
    if q.dim() != 2 or k1.dim() != 2 or q.shape[1] != k1.shape[1]:
        raise ValueError(f"q and k1 must be (M, D) and (N, D), got {tuple(q.shape)} and {tuple(k1.shape)}")
    if k2 is not None and (k2.dim() != 2 or k2.shape[1] != q.shape[1]):
        raise ValueError(f"k2 must be (N2, {q.shape[1]}), got {tuple(k2.shape)}")
    if k1.dtype != q.dtype or (k2 is not None and k2.dtype != q.dtype):
        raise ValueError(f"q, k1, k2 must share a dtype, got {q.dtype}, {k1.dtype}, "
                         f"{None if k2 is None else k2.dtype}")
    if scale.numel() != 1:
        raise ValueError(f"scale must be a scalar tensor, got shape {tuple(scale.shape)}")
    if diag_offset is not None and not 0 <= diag_offset <= k1.shape[0] - q.shape[0]:
        raise ValueError(f"diag_offset must put every positive inside k1: 0 <= {diag_offset} <= "
                         f"{k1.shape[0]} - {q.shape[0]}")
    offset = -1 if diag_offset is None else diag_offset
    return _contrastive_lse_op(q, k1, k2, scale.reshape(()), col_stats, offset, panel_rows)
