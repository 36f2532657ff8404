"""Fused tag head + multi-label BCE: sum over b x V of BCE-with-logits(F @ W.T + bias, multi-hot(targets)),
without ever holding the b x V logits.

Targets are sparse: (b, T) int64 ids, -1 is padding. A tile builds its multi-hot block by comparing its
column ids with the row's T ids (an OR, so a repeated id counts once and -1 never matches).

Forward (`_tag_bce_fwd_kernel`): program (m, g) sweeps a group of V tiles of row block m and writes one
partial sum; torch sums the partials in a fixed order. BCE(z, y) = max(z, 0) - y z + log(1 + exp(-|z|)).
Backward: per panel of rows, `_tag_bce_grad_kernel` recomputes each tile once and writes
dZ = g * (sigmoid(z) - y) in the input dtype; dF = dZ @ W, dW = dZ.T @ F and dbias = column sums of dZ are
GEMMs / reductions in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    Tiles,
    addmm_fp32_,
    autotune_configs,
    check_interpreter,
    dot_precision,
    launch_config,
    tile_dot,
)

__all__ = ["tag_bce_sum", "tag_bce_forward", "tag_bce_backward"]


@triton.jit
def _tile_logits_and_labels(f_ptr, w_ptr, bias_ptr, tgt_ptr, rows, cols, row_ok, col_ok, D, T,
                            stride_f, stride_w, stride_t, HAS_BIAS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            PRECISION: tl.constexpr):
    z = tile_dot(f_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_f, stride_w,
                 BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    hit = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int1)
    for t in range(0, T):
        ids = tl.load(tgt_ptr + rows * stride_t + t, mask=row_ok, other=-1)
        hit = hit | (ids[:, None] == cols[None, :])
    return z, hit.to(tl.float32)


@triton.autotune(configs=autotune_configs(), key=["D", "V", "T"])
@triton.jit
def _tag_bce_fwd_kernel(f_ptr, w_ptr, bias_ptr, tgt_ptr, part_ptr, M, V, D, T, stride_f, stride_w, stride_t,
                        N_TILES, TILES_PER_GROUP, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_start = pid_g * TILES_PER_GROUP
    t_stop = tl.minimum(t_start + TILES_PER_GROUP, N_TILES)
    for t in range(t_start, t_stop):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        z, y = _tile_logits_and_labels(f_ptr, w_ptr, bias_ptr, tgt_ptr, rows, cols, row_ok, col_ok, D, T,
                                       stride_f, stride_w, stride_t, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K,
                                       PRECISION)
        bce = tl.maximum(z, 0.0) - y * z + tl.log(1.0 + tl.exp2(-tl.abs(z) * LOG2E))
        bce = tl.where(row_ok[:, None] & col_ok[None, :], bce, 0.0)
        total += tl.sum(bce, axis=1)
    tl.store(part_ptr + pid_m * tl.num_programs(1) + pid_g, tl.sum(total, axis=0))


@triton.autotune(configs=autotune_configs(), key=["D", "V", "T"])
@triton.jit
def _tag_bce_grad_kernel(f_ptr, w_ptr, bias_ptr, tgt_ptr, gout_ptr, dz_ptr, M, V, D, T,
                         stride_f, stride_w, stride_t, stride_dz, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < V
    z, y = _tile_logits_and_labels(f_ptr, w_ptr, bias_ptr, tgt_ptr, rows, cols, row_ok, col_ok, D, T,
                                   stride_f, stride_w, stride_t, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K,
                                   PRECISION)
    g = tl.load(gout_ptr).to(tl.float32)
    dz = g * (tl.sigmoid(z) - y)
    tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _prep(features, weight, bias, targets, tiles):
    check_interpreter()
    features, weight, targets = features.contiguous(), weight.contiguous(), targets.contiguous()
    bias_arg = bias.contiguous() if bias is not None else weight[0]  # never read when HAS_BIAS is False
    launch = launch_config(features.device, features.dtype)
    return features, weight, bias_arg, targets, tiles or launch.tiles, launch


def tag_bce_forward(features, weight, bias, targets, tiles: Tiles | None = None) -> torch.Tensor:
    """fp32 0-d sum of BCE-with-logits over the b x V tag logits."""
    features, weight, bias_arg, targets, tiles, launch = _prep(features, weight, bias, targets, tiles)
    M, D = features.shape
    V, T = weight.shape[0], targets.shape[1]
    row_blocks, n_tiles = triton.cdiv(M, tiles.block_m), triton.cdiv(V, tiles.block_n)
    # Column groups so that row blocks x groups fill the programs a sweep aims for.
    groups = max(1, min(n_tiles, triton.cdiv(launch.programs, row_blocks)))
    per_group = triton.cdiv(n_tiles, groups)
    groups = triton.cdiv(n_tiles, per_group)
    part = torch.empty(row_blocks, groups, device=features.device, dtype=torch.float32)
    _tag_bce_fwd_kernel[(row_blocks, groups)](
        features, weight, bias_arg, targets, part, M, V, D, T, features.stride(0), weight.stride(0),
        targets.stride(0), n_tiles, per_group, HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, PRECISION=dot_precision(features.dtype))
    return part.sum()


def tag_bce_backward(features, weight, bias, targets, grad_out, *, panel_rows: int = 0,
                     tiles: Tiles | None = None):
    """(d features, d weight, d bias or None) of grad_out * tag_bce_forward(...)."""
    has_bias = bias is not None
    features, weight, bias_arg, targets, tiles, launch = _prep(features, weight, bias, targets, tiles)
    M, D = features.shape
    V, T = weight.shape[0], targets.shape[1]
    if panel_rows <= 0:
        budget = launch.panel_bytes // features.element_size()
        panel_rows = max(tiles.block_m, budget // V // tiles.block_m * tiles.block_m)
    panel_rows = min(panel_rows, M)
    single = panel_rows >= M
    grad_out = grad_out.detach().float().reshape(1)
    dfeat = torch.empty_like(features)
    dweight = torch.zeros(V, D, device=features.device, dtype=features.dtype if single else torch.float32)
    dbias = torch.zeros(V, device=features.device, dtype=torch.float32)
    dz_buf = torch.empty(panel_rows, V, device=features.device, dtype=features.dtype)
    for start in range(0, M, panel_rows):
        stop = min(start + panel_rows, M)
        fp, dz = features[start:stop], dz_buf[:stop - start]
        grid = (triton.cdiv(stop - start, tiles.block_m), triton.cdiv(V, tiles.block_n))
        _tag_bce_grad_kernel[grid](
            fp, weight, bias_arg, targets[start:stop], grad_out, dz, stop - start, V, D, T, fp.stride(0),
            weight.stride(0), targets.stride(0), dz.stride(0), HAS_BIAS=has_bias, BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, PRECISION=dot_precision(features.dtype))
        dfeat[start:stop] = dz @ weight.to(dz.dtype)
        if single:
            dweight = dz.T @ fp
        else:
            addmm_fp32_(dweight, dz.T, fp)
        if has_bias:
            dbias += dz.sum(dim=0, dtype=torch.float32)
    return dfeat, dweight.to(weight.dtype), (dbias.to(bias.dtype) if has_bias else None)


@torch.library.custom_op("hqclip::tag_bce_sum", mutates_args=())
def _tag_bce_op(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, panel_rows: int) -> torch.Tensor:
    return tag_bce_forward(features, weight, bias, targets)


@_tag_bce_op.register_fake
def _(features, weight, bias, targets, panel_rows):
    return features.new_empty((), dtype=torch.float32)


@torch.library.custom_op("hqclip::tag_bce_sum_backward", mutates_args=())
def _tag_bce_backward_op(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, grad_out: torch.Tensor, panel_rows: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dfeat, dweight, dbias = tag_bce_backward(features, weight, bias, targets, grad_out, panel_rows=panel_rows)
    return dfeat, dweight, (dbias if dbias is not None else weight.new_empty(0))


@_tag_bce_backward_op.register_fake
def _(features, weight, bias, targets, grad_out, panel_rows):
    dbias = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(features), torch.empty_like(weight), dbias


def _setup_context(ctx, inputs, output):
    features, weight, bias, targets, panel_rows = inputs
    ctx.save_for_backward(features, weight, bias, targets)
    ctx.panel_rows = panel_rows


def _backward(ctx, grad_out):
    features, weight, bias, targets = ctx.saved_tensors
    dfeat, dweight, dbias = _tag_bce_backward_op(features, weight, bias, targets, grad_out, ctx.panel_rows)
    return dfeat, dweight, (dbias if bias is not None else None), None, None


_tag_bce_op.register_autograd(_backward, setup_context=_setup_context)


def tag_bce_sum(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, *, panel_rows: int = 0) -> torch.Tensor:
    """Differentiable fp32 sum over b x V of BCE-with-logits(features @ weight.T + bias, multi-hot(targets)).

    features (b, D), weight (V, D) in the same dtype; bias (V,) or None; targets (b, T) int64 ids in [0, V)
    with -1 padding (repeated ids count once). Ids are not range-checked here (the loss API validates).
    """
    if features.dim() != 2 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(f"features and weight must be (b, D) and (V, D), got {tuple(features.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.dim() != 2 or targets.shape[0] != features.shape[0]:
        raise ValueError(f"targets must be (b, T) with b = {features.shape[0]}, got {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    dtype = torch.promote_types(features.dtype, weight.dtype)
    return _tag_bce_op(features.to(dtype), weight.to(dtype), bias, targets.to(torch.int64), panel_rows)
