"""Autograd all-gather for the loss: forward concatenates every rank's rows in rank order, backward sums each
rank's gradient w.r.t. the gathered tensor and hands every owner its slice (a reduce-scatter)."""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.14 renamed the single-tensor collectives; older releases only have the *_tensor names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_rank_and_size(group=None):
    """(group, rank in group, group size). group=None: the default group if initialized, else one process."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 0, 1
        group = dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, world_size: int) -> torch.Tensor:
        ctx.group, ctx.world_size = group, world_size
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        local = grad.new_empty((grad.shape[0] // ctx.world_size, *grad.shape[1:]))
        _reduce_scatter_single(local, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return local, None, None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Rows of `x` from every rank of `group`, in rank order; identity on a single process."""
    group, _, world_size = group_rank_and_size(group)
    if world_size == 1:
        return x
    return _AllGather.apply(x, group, world_size)
