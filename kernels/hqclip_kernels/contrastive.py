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
InfoNCE targets) and, when asked, the pairwise logits of the hard negatives in K2, neg_diag[i] =
s <q_i, k2_{i + offset2}> (HNI's), whose gradients the backward adds into G like the positives'.

Backward: for panels of the logits, `_grad_logits_kernel` recomputes each tile once and writes
  G = s * (g_row_i P_row_ij + g_col_j P_col_ij + [j = i + offset] g_diag_i),
  P_row = exp(S - lse_row), P_col = exp(S - lse_col)
(the gradient w.r.t. s * <q_i, k_j>, times s) in the input dtype, plus a per-tile partial of d(scale).
The positive-logit gradient is added in fp32 inside the tile, so the large, nearly cancelling
softmax and target terms are rounded to bf16 once, after they cancel.
Then dQ = G @ K and dK = G.T @ Q are plain GEMMs (cuBLAS on a GPU). No atomics: every sum has a fixed
order, so two runs are bit-identical. A panel of rows spans every column, so its rows of dQ are complete and
written once in the input dtype, while dK sums over panels in an fp32 buffer; column panels do the reverse,
and `lse_backward` picks the axis whose fp32 buffer is smaller. Its "two_pass" form makes G twice (row
panels for dQ, then column panels for dK) and needs no fp32 buffer, for one more recomputation of the logits.

Memory (benchmarks/memory_model.py: every allocation of one fwd+bwd at GPU shapes, traced on the meta device
with an H100's launch layout; a model, not a GPU measurement). B = 32768, D = 768, bf16, no negatives,
extra bytes beyond the inputs, the inputs' two bf16 gradients (96 MiB) included:
  one pass, 128 MiB panels   289 MiB: panel 128 + fp32 dK buffer 96 + dQ 48 + a 16 MiB product chunk
  one pass,  32 MiB panels   193 MiB: at the end, the fp32 dK buffer with both gradients (96 + 48 + 48)
  two passes, 32 MiB panels  129 MiB: panel 32 + the two gradients 96
  open_clip ClipLoss        8288 MiB: two B x B logit matrices and two saved log-softmaxes (2 GiB each)
So the 2% of open_clip target (166 MiB) is met only in two passes; one pass is the default on a GPU
(`_common.GPU_TWO_PASS`) until the GPU benchmark has timed the extra recomputation against the one-pass
form's fp32 read-modify-write of dK (16 passes over 96 MiB at 128 MiB panels).
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
    addmm_fp32_,
    autotune_configs,
    check_interpreter,
    dot_precision,
    launch_config,
    mm_fp32,
    tile_dot,
)

__all__ = ["contrastive_lse", "lse_forward", "lse_backward", "sweep_grid", "SweepGrid"]

@triton.autotune(configs=autotune_configs(), key=["D", "ROW_BLOCKS", "TOTAL_TILES", "COL_STATS"])
@triton.jit
def _lse_fwd_kernel(q_ptr, k1_ptr, k2_ptr, scale_ptr, row_part_ptr, col_part_ptr, diag_ptr, diag2_ptr,
                    M, N1, N2, D, stride_q, stride_k1, stride_k2,
                    ROW_BLOCKS, TILES1, TOTAL_TILES, BLOCKS_PER_GROUP, TILES_PER_GROUP, DIAG_OFFSET, DIAG2_OFFSET,
                    COL_STATS: tl.constexpr, HAS_DIAG: tl.constexpr, HAS_DIAG2: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
            if HAS_DIAG2:
                if t >= TILES1:  # the pairwise logits s <q_i, k2_{i + offset}> (HNI's hard negatives)
                    start2 = (t - TILES1) * BLOCK_N
                    on_diag2 = cols[None, :] == rows[:, None] + DIAG2_OFFSET
                    in_tile2 = (row_ok & (rows + DIAG2_OFFSET >= start2)
                                & (rows + DIAG2_OFFSET < start2 + BLOCK_N))
                    tl.store(diag2_ptr + rows, tl.sum(tl.where(on_diag2, x, 0.0), axis=1) * LN2, mask=in_tile2)
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
                        diag_g_ptr, diag2_g_ptr, g_ptr, ds_part_ptr, M, N1, N2, D, stride_q, stride_k1, stride_k2,
                        stride_g, TILES1, N_TILES, TILE_START, G_COL_START, DIAG_OFFSET, DIAG2_OFFSET,
                        COL_STATS: tl.constexpr, HAS_DIAG: tl.constexpr, HAS_DIAG2: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # Program (m, t) writes the tile of row block m and column tile TILE_START + t to the panel, whose
    # column 0 is column G_COL_START of [k1; k2]. ds_part is indexed by the panel's own tiles (N_TILES).
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    t = pid_t + TILE_START
    scale = tl.load(scale_ptr).to(tl.float32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    first = t < TILES1
    k_ptr = tl.where(first, k1_ptr, k2_ptr)
    cols = tl.where(first, t, t - TILES1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < tl.where(first, N1, N2)
    g_cols = tl.where(first, cols, N1 + cols) - G_COL_START
    acc = tile_dot(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, stride_q, tl.where(first, stride_k1, stride_k2),
                   BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    x = acc * (scale * LOG2E)
    lse_r = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    g_r = tl.load(row_g_ptr + rows, mask=row_ok, other=0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    grad = g_r[:, None] * tl.exp2(x - lse_r[:, None])
    if HAS_DIAG:
        if t < TILES1:
            g_d = tl.load(diag_g_ptr + rows, mask=row_ok, other=0.0)
            grad += tl.where(cols[None, :] == rows[:, None] + DIAG_OFFSET, g_d[:, None], 0.0)
    if HAS_DIAG2:
        if t >= TILES1:
            g_d2 = tl.load(diag2_g_ptr + rows, mask=row_ok, other=0.0)
            grad += tl.where(cols[None, :] == rows[:, None] + DIAG2_OFFSET, g_d2[:, None], 0.0)
    grad = tl.where(ok, grad, 0.0)
    # d(scale) in two parts: row + positive terms, and column terms (owned by another rank in a ring).
    ds_ptr = ds_part_ptr + 2 * (pid_m * N_TILES + pid_t)
    tl.store(ds_ptr, tl.sum(tl.sum(grad * acc, axis=1), axis=0))
    if COL_STATS:
        if t < TILES1:
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


def _prep(q, k1, k2, tiles):
    """Contiguous inputs (k2 empty when absent), the tiles (given or the device's) and the launch config."""
    check_interpreter()
    q, k1 = q.contiguous(), k1.contiguous()
    k2 = k1[:0] if k2 is None else k2.contiguous()
    launch = launch_config(q.device, q.dtype)
    return q, k1, k2, tiles or launch.tiles, launch


def lse_forward(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor | None, scale: torch.Tensor,
                col_stats: bool, diag_offset: int, neg_diag_offset: int = -1, tiles: Tiles | None = None,
                programs: int = 0):
    """(row_lse (M,), col_lse (N1,) or empty, diag (M,) or empty, neg_diag (M,) or empty), fp32; an offset
    < 0 leaves its diagonal out. See `contrastive_lse`.
    programs: how many programs the sweep aims for (0: fill the device; tests pass small counts)."""
    q, k1, k2, tiles, launch = _prep(q, k1, k2, tiles)
    M, D = q.shape
    N1, N2 = k1.shape[0], k2.shape[0]
    row_blocks = triton.cdiv(M, tiles.block_m)
    tiles1, tiles2 = triton.cdiv(N1, tiles.block_n), triton.cdiv(N2, tiles.block_n)
    total = tiles1 + tiles2
    grid = sweep_grid(row_blocks, total, col_stats, programs or launch.programs)
    row_shape, col_shape = grid.partial_shapes(M, N1, col_stats)
    row_part = torch.empty(row_shape, device=q.device, dtype=torch.float32)
    col_part = torch.empty(col_shape, device=q.device, dtype=torch.float32)
    has_diag = diag_offset >= 0
    diag = torch.empty(M if has_diag else 0, device=q.device, dtype=torch.float32)
    has_diag2 = neg_diag_offset >= 0
    diag2 = torch.empty(M if has_diag2 else 0, device=q.device, dtype=torch.float32)
    scale = scale.detach().float().reshape(1)
    _lse_fwd_kernel[(grid.row_groups, grid.col_groups)](
        q, k1, k2, scale, row_part, col_part, diag, diag2, M, N1, N2, D, q.stride(0), k1.stride(0), k2.stride(0),
        row_blocks, tiles1, total, grid.blocks_per_group, grid.tiles_per_group, max(diag_offset, 0),
        max(neg_diag_offset, 0), COL_STATS=col_stats, HAS_DIAG=has_diag, HAS_DIAG2=has_diag2,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, PRECISION=dot_precision(q.dtype))
    # The partials are log2-sum-exp2 values: natural lse = logsumexp(ln 2 * partials), in a fixed order.
    row_lse = torch.logsumexp(row_part.mul_(math.log(2)), dim=0)
    col_lse = torch.logsumexp(col_part.mul_(math.log(2)), dim=0) if col_stats else col_part.new_empty(0)
    return row_lse, col_lse, diag, diag2


@dataclass(frozen=True)
class _Panel:
    """Rows [r0, r1) x column tiles [t0, t1) of the logits; their columns are [c0, c1) of [k1; k2]."""

    r0: int
    r1: int
    t0: int
    t1: int
    c0: int
    c1: int


def _panels(M: int, N1: int, N2: int, tiles: Tiles, axis: str, size: int) -> list[_Panel]:
    """Cut the logits into panels of `size` rows (axis "rows") or about `size` columns ("cols", whole tiles)."""
    tiles1 = triton.cdiv(N1, tiles.block_n)
    n_tiles = tiles1 + triton.cdiv(N2, tiles.block_n)

    def first_col(t):  # column of [k1; k2] where tile t starts (N1 + N2 for t = n_tiles)
        return min(t * tiles.block_n, N1) if t <= tiles1 else min(N1 + (t - tiles1) * tiles.block_n, N1 + N2)

    if axis == "rows":
        return [_Panel(r, min(r + size, M), 0, n_tiles, 0, N1 + N2) for r in range(0, M, size)]
    step = max(1, size // tiles.block_n)
    return [_Panel(0, M, t, min(t + step, n_tiles), first_col(t), first_col(min(t + step, n_tiles)))
            for t in range(0, n_tiles, step)]


def _write_or_add(target: torch.Tensor, products: list[tuple[torch.Tensor, torch.Tensor]], summing: bool) -> None:
    """summing: target (an fp32 buffer that sums over panels) += sum a @ b. Otherwise target = sum a @ b,
    complete after this panel and rounded once to its dtype."""
    products = [(a, b) for a, b in products if a.numel() and b.numel()]
    if summing:
        for a, b in products:
            addmm_fp32_(target, a, b)
    elif not products:
        target.zero_()
    elif len(products) == 1:
        torch.mm(*products[0], out=target)
    else:
        total = mm_fp32(*products[0])
        for a, b in products[1:]:
            addmm_fp32_(total, a, b)
        target.copy_(total)


PANEL_AXES = ("auto", "rows", "cols", "two_pass")


def lse_backward(q, k1, k2, scale, row_lse, col_lse, grad_row, grad_col, grad_diag, diag_offset: int, *,
                 grad_neg_diag=None, neg_diag_offset: int = -1, panel_size: int = 0, panel_axis: str = "auto",
                 tiles: Tiles | None = None, accumulate=None):
    """Gradients (dq, dk1, dk2 or None, dscale_rows, dscale_cols) of sum(grad_row * row_lse) +
    sum(grad_col * col_lse) + sum(grad_diag * diag) + sum(grad_neg_diag * neg_diag); d(scale) is split into
    the row, positive and pairwise terms and the column terms (0-d fp32 tensors, their sum is d(scale)).

    The logit gradient G is made a panel at a time: `panel_size` rows of q against every key (panel_axis
    "rows") or about `panel_size` keys against every row of q ("cols"); 0 picks the size from the device's
    panel budget. The side that a panel spans whole gets its gradient complete per panel, written once in
    the input dtype; the other side sums over panels in an fp32 buffer, read and written once per panel.
    "auto" spans the longer side, so that the fp32 buffer is the smaller one (M x D for q against
    [texts; negatives] or against gathered texts), or takes "two_pass" where the device's launch config says
    so. "two_pass" makes G twice, in row panels for dq and in column panels for dk: every gradient is
    complete per panel and there is no fp32 buffer, for one more recomputation of the logits.

    accumulate: optional fp32 buffers (dq, dk1, dk2 or None) that the gradients are added to in place and
    returned as, for callers that sum over several key chunks (the ring). Otherwise gradients come in q's
    dtype.
    """
    if panel_axis not in PANEL_AXES:
        raise ValueError(f"panel_axis must be one of {PANEL_AXES}, got {panel_axis!r}")
    has_k2 = k2 is not None
    q, k1, k2, tiles, launch = _prep(q, k1, k2, tiles)
    M, D = q.shape
    N1, N2 = k1.shape[0], k2.shape[0]
    col_stats, has_diag = col_lse.numel() > 0, diag_offset >= 0
    grad_row = grad_row.float().contiguous()
    grad_col = grad_col.float().contiguous() if col_stats else grad_row
    col_lse = col_lse if col_stats else row_lse
    grad_diag = grad_diag.float().contiguous() if has_diag else grad_row
    has_diag2 = neg_diag_offset >= 0
    grad_neg_diag = grad_neg_diag.float().contiguous() if has_diag2 else grad_row
    if panel_axis == "auto":
        # (A caller that sums over key chunks keeps fp32 buffers anyway: two passes would only cost time.)
        two_pass = launch.two_pass and accumulate is None
        panel_axis = "two_pass" if two_pass else "rows" if M >= N1 + N2 else "cols"
    budget = launch.panel_bytes // q.element_size()

    def panels_along(axis):
        block, spanned = (tiles.block_m, N1 + N2) if axis == "rows" else (tiles.block_n, M)
        size = panel_size if panel_size > 0 else max(block, budget // max(spanned, 1) // block * block)
        return _panels(M, N1, N2, tiles, axis, size)

    # (panel, makes dq, makes dk). The row + positive and column parts of d(scale) come from the panels
    # that make dq, which cover every tile once.
    if panel_axis == "two_pass":
        work = [(p, True, False) for p in panels_along("rows")] + [(p, False, True) for p in panels_along("cols")]
    else:
        work = [(p, True, True) for p in panels_along(panel_axis)]

    # Gradient targets: complete per panel in q's dtype, or fp32 buffers that sum over panels in a fixed
    # order (deterministic). Callers that sum over several key chunks pass fp32 buffers for all three.
    if accumulate is not None:
        dq, dk1, dk2 = accumulate
        dk2 = dk2 if dk2 is not None else k2.new_empty(0, D, dtype=torch.float32)
        q_sums = k_sums = True
    else:
        several = len(work) > 1 and panel_axis != "two_pass"
        q_sums, k_sums = several and panel_axis == "cols", several and panel_axis == "rows"

        def target(like, sums):
            return torch.zeros(like.shape, device=q.device, dtype=torch.float32) if sums else torch.empty_like(like)
        dq, dk1, dk2 = target(q, q_sums), target(k1, k_sums), target(k2, k_sums)

    tiles1 = triton.cdiv(N1, tiles.block_n)
    scale32 = scale.detach().float().reshape(1)
    buffer = torch.empty(max((p.r1 - p.r0) * (p.c1 - p.c0) for p, _, _ in work), device=q.device, dtype=q.dtype)
    ds_parts = []
    for p, makes_dq, makes_dk in work:
        rows, cols = p.r1 - p.r0, p.c1 - p.c0
        g, qp = buffer[:rows * cols].view(rows, cols), q[p.r0:p.r1]
        row_blocks, panel_tiles = triton.cdiv(rows, tiles.block_m), p.t1 - p.t0
        ds_part = torch.zeros(row_blocks, panel_tiles, 2, device=q.device, dtype=torch.float32)
        # Panel row r is row r0 + r: its positive sits in column r0 + r + offset.
        _grad_logits_kernel[(row_blocks, panel_tiles)](
            qp, k1, k2, scale32, row_lse[p.r0:p.r1], grad_row[p.r0:p.r1], col_lse, grad_col,
            grad_diag[p.r0:p.r1], grad_neg_diag[p.r0:p.r1], g, ds_part, rows, N1, N2, D, qp.stride(0),
            k1.stride(0), k2.stride(0), g.stride(0), tiles1, panel_tiles, p.t0, p.c0,
            p.r0 + max(diag_offset, 0), p.r0 + max(neg_diag_offset, 0), COL_STATS=col_stats, HAS_DIAG=has_diag,
            HAS_DIAG2=has_diag2, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
            PRECISION=dot_precision(q.dtype))
        # The panel's columns split into a k1 part [c0, split) and a k2 part [split, c1).
        split = min(max(p.c0, N1), p.c1)
        g1, g2 = g[:, :split - p.c0], g[:, split - p.c0:]
        if makes_dq:
            ds_parts.append(ds_part.sum(dim=(0, 1)))
            k2p = k2[split - N1:p.c1 - N1] if p.c1 > N1 else k2[:0]
            _write_or_add(dq[p.r0:p.r1], [(g1, k1[p.c0:split]), (g2, k2p)], q_sums)
        if makes_dk and g1.shape[1]:
            _write_or_add(dk1[p.c0:split], [(g1.T, qp)], k_sums)
        if makes_dk and g2.shape[1]:
            _write_or_add(dk2[split - N1:p.c1 - N1], [(g2.T, qp)], k_sums)
    del buffer, g, g1, g2  # the panel is not needed for the casts below
    ds_row, ds_col = torch.stack(ds_parts).sum(dim=0).unbind()
    if accumulate is None:
        dq, dk1, dk2 = (x.to(q.dtype) for x in (dq, dk1, dk2))
    return dq, dk1, (dk2 if has_k2 else None), ds_row, ds_col


# torch.compile sees these as opaque ops with fake (shape-only) implementations: no graph breaks.
@torch.library.custom_op("hqclip::contrastive_lse", mutates_args=())
def _contrastive_lse_op(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor | None, scale: torch.Tensor,
                        col_stats: bool, diag_offset: int, neg_diag_offset: int, panel_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return lse_forward(q, k1, k2, scale, col_stats, diag_offset, neg_diag_offset)


@_contrastive_lse_op.register_fake
def _(q, k1, k2, scale, col_stats, diag_offset, neg_diag_offset, panel_size):
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(q.shape[0], **f32), q.new_empty(k1.shape[0] if col_stats else 0, **f32),
            q.new_empty(q.shape[0] if diag_offset >= 0 else 0, **f32),
            q.new_empty(q.shape[0] if neg_diag_offset >= 0 else 0, **f32))


@torch.library.custom_op("hqclip::contrastive_lse_backward", mutates_args=())
def _contrastive_lse_backward_op(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor | None,
                                 scale: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
                                 grad_row: torch.Tensor, grad_col: torch.Tensor, grad_diag: torch.Tensor,
                                 grad_neg_diag: torch.Tensor, diag_offset: int, neg_diag_offset: int,
                                 panel_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk1, dk2, ds_row, ds_col = lse_backward(
        q, k1, k2, scale, row_lse, col_lse, grad_row, grad_col, grad_diag, diag_offset,
        grad_neg_diag=grad_neg_diag, neg_diag_offset=neg_diag_offset, panel_size=panel_size)
    dk2 = dk2 if dk2 is not None else k1.new_empty(0, k1.shape[1])
    return dq, dk1, dk2, (ds_row + ds_col).to(scale.dtype).reshape(scale.shape)


@_contrastive_lse_backward_op.register_fake
def _(q, k1, k2, scale, row_lse, col_lse, grad_row, grad_col, grad_diag, grad_neg_diag, diag_offset,
      neg_diag_offset, panel_size):
    dk2 = torch.empty_like(k2) if k2 is not None else k1.new_empty(0, k1.shape[1])
    return torch.empty_like(q), torch.empty_like(k1), dk2, torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    q, k1, k2, scale, col_stats, diag_offset, neg_diag_offset, panel_size = inputs
    row_lse, col_lse, _, _ = output
    ctx.save_for_backward(q, k1, k2, scale, row_lse, col_lse)
    ctx.diag_offset, ctx.neg_diag_offset, ctx.panel_size = diag_offset, neg_diag_offset, panel_size


def _backward(ctx, grad_row, grad_col, grad_diag, grad_neg_diag):
    q, k1, k2, scale, row_lse, col_lse = ctx.saved_tensors

    def zeros_if_none(grad, size):
        return row_lse.new_zeros(size) if grad is None else grad
    M = row_lse.shape[0]
    dq, dk1, dk2, dscale = _contrastive_lse_backward_op(
        q, k1, k2, scale, row_lse, col_lse, zeros_if_none(grad_row, M),
        zeros_if_none(grad_col, col_lse.shape[0]), zeros_if_none(grad_diag, M if ctx.diag_offset >= 0 else 0),
        zeros_if_none(grad_neg_diag, M if ctx.neg_diag_offset >= 0 else 0), ctx.diag_offset,
        ctx.neg_diag_offset, ctx.panel_size)
    return dq, dk1, (dk2 if k2 is not None else None), dscale, None, None, None, None


_contrastive_lse_op.register_autograd(_backward, setup_context=_setup_context)


def contrastive_lse(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor | None, scale: torch.Tensor, *,
                    col_stats: bool = False, diag_offset: int | None = None, neg_diag_offset: int | None = None,
                    panel_size: int = 0):
    """Differentiable statistics of the logits S = s * q @ [k1; k2].T, which are never materialized.

    Returns fp32 (row_lse, col_lse, diag, neg_diag):
      row_lse[i]  = log sum_j exp(S_ij) over all k1 and k2 rows;
      col_lse[j]  = log sum_i exp(S_ij) over all q rows, for the k1 columns (empty unless col_stats);
      diag[i]     = S_{i, i + diag_offset}, the positive logits (empty when diag_offset is None);
      neg_diag[i] = s <q_i, k2_{i + neg_diag_offset}>, the pairwise logits of hard negatives given as k2
                    (empty when neg_diag_offset is None).
    Gradients reach q, k1, k2 and scale (a 0-d tensor). panel_size bounds the backward's logit panel: rows
    of q, or keys when there are more keys than rows (see `lse_backward`; 0: from a memory budget).
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
    if neg_diag_offset is not None:
        n2 = 0 if k2 is None else k2.shape[0]
        if not 0 <= neg_diag_offset <= n2 - q.shape[0]:
            raise ValueError(f"neg_diag_offset must put every pairwise negative inside k2: 0 <= "
                             f"{neg_diag_offset} <= {n2} - {q.shape[0]}")
    offset = -1 if diag_offset is None else diag_offset
    neg_offset = -1 if neg_diag_offset is None else neg_diag_offset
    return _contrastive_lse_op(q, k1, k2, scale.reshape(()), col_stats, offset, neg_offset, panel_size)
