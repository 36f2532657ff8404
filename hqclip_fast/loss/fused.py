"""impl="triton": the loss terms through the fused Triton kernels of `hqclip_kernels` (contract in api.py).

The logits are never materialized: the kernels keep O(b + B) log-sum-exp statistics and recompute tiles in
backward. On a single process one B x B sweep yields both the image->text row statistics and the
text->image column statistics. With several ranks api.py calls `contrastive_sums_ring` on local features:
the other ranks' texts arrive around a ring while earlier chunks compute (see below). `contrastive_sums` on
gathered features (this rank's images sweep all texts and negatives, its texts sweep all images) is the
contract's plain path, kept for callers that gather themselves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .gather import _all_gather_single, group_rank_and_size

try:
    from hqclip_kernels._common import interpreting, row_chunks
    from hqclip_kernels.contrastive import contrastive_lse, lse_backward, lse_forward
    from hqclip_kernels.tag_bce import tag_bce_sum as _fused_tag_bce_sum
except ImportError as err:  # triton missing: api.py reports impl="triton" as unavailable
    raise ImportError(f"impl='triton' needs the triton package ({err})") from err

__all__ = ["is_available", "contrastive_sums", "contrastive_sums_ring", "tag_bce_sum"]


def is_available() -> bool:
    """Triton kernels run on CUDA devices, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
    return torch.cuda.is_available() or interpreting()


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


# Rows per chunk of the pairwise (HNI) dot products: their fp32 temporaries stay at 16 MiB for any batch.
_PAIR_CHUNK_BYTES = 16 << 20


class _RowwiseDot(torch.autograd.Function):
    """fp32 <a_i, b_i> per row, from bf16/fp32 rows, with gradients in the inputs' dtype rounded once. Upcasting
    whole (b, D) inputs would hold three fp32 copies of them (96 MiB each at b = 32768, D = 768) in forward
    and again in backward; row chunks keep that to one 16 MiB temporary."""

    @staticmethod
    def _chunks(rows: int, dim: int):
        return row_chunks(rows, 4 * dim, _PAIR_CHUNK_BYTES)

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        out = a.new_empty(a.shape[0], dtype=torch.float32)
        for rows in _RowwiseDot._chunks(*a.shape):
            torch.linalg.vecdot(a[rows].float(), b[rows].float(), out=out[rows])
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
        for rows in _RowwiseDot._chunks(*a.shape):
            g = grad[rows, None].float()
            grad_a[rows] = g * b[rows].float()
            grad_b[rows] = g * a[rows].float()
        return grad_a, grad_b


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return _RowwiseDot.apply(a.to(dtype), b.to(dtype))


def _check_device(x: torch.Tensor, name: str) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"impl='triton': {name} is on {x.device}; the kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 to run them through Triton's CPU interpreter)")
    if x.dtype == torch.float64:
        raise ValueError(f"impl='triton': {name} is float64, but the kernels accumulate in fp32; use "
                         "impl='reference' or 'chunked' for float64 (e.g. gradcheck)")


def contrastive_sums(image, text, logit_scale, *, rows, softmax_negatives=None, pair_negatives=None):
    _check_device(image, "image_features")
    start, stop = rows
    dtype = image.dtype
    text = text.to(dtype)
    if softmax_negatives is not None:
        softmax_negatives = softmax_negatives.to(dtype)
    # Hard negatives that are softmax columns are the kernel's k2 block, and (api.py's contract) the pairwise
    # ones are their rows start:stop: the sweep yields the HNI logits too, and their gradient joins the
    # logit gradient in the same backward GEMMs.
    pair_in_sweep = pair_negatives is not None and softmax_negatives is not None
    if stop - start == image.shape[0]:
        # One process: a single sweep gives the row (image->text) and column (text->image) statistics.
        i2t_lse, t2i_lse, positive, negative = contrastive_lse(
            image, text, softmax_negatives, logit_scale, col_stats=True, diag_offset=0,
            neg_diag_offset=0 if pair_in_sweep else None)
        t2i_positive = positive
        local_image = image  # not image[0:b]: a slice's backward allocates a zero-filled full-size gradient
    else:
        local_image, local_text = image[start:stop], text[start:stop]
        i2t_lse, _, positive, negative = contrastive_lse(
            local_image, text, softmax_negatives, logit_scale, diag_offset=start,
            neg_diag_offset=start if pair_in_sweep else None)
        t2i_lse, _, t2i_positive, _ = contrastive_lse(local_text, image, None, logit_scale, diag_offset=start)

    i2t_sum = (i2t_lse - positive).sum()
    t2i_sum = (t2i_lse - t2i_positive).sum()
    hni_sum = i2t_sum.new_zeros(())
    if pair_negatives is not None:
        if not pair_in_sweep:
            negative = _upcast(logit_scale) * _rowwise_dot(local_image, pair_negatives)
        hni_sum = F.softplus(negative - positive).sum()
    return i2t_sum, t2i_sum, hni_sum


def tag_bce_sum(tag_features, tag_weight, tag_bias, tag_targets):
    _check_device(tag_features, "tag_features")
    return _fused_tag_bce_sum(tag_features, tag_weight, tag_bias, tag_targets)


# ---------------------------------------------------------------------------------------------------------
# Distributed: a ring over the group instead of an all-gather. Each rank keeps its own images and sees every
# rank's texts (and negatives) one chunk at a time: while chunk c is swept, chunk c - 1 is already in flight
# to the next rank. Peak memory O(b x D) (two chunk buffers) plus O(B) statistics, independent of n.
# One sweep of local rows x every chunk yields the image->text row statistics and, per chunk, the partial
# text->image column statistics over the local images; an all_to_all hands each owner the n partials of its
# own columns. Backward walks the same ring: each chunk travels with an fp32 gradient accumulator that every
# rank adds its share to (fixed order: owner, owner + 1, ...), and which reaches its owner after n hops.
# ---------------------------------------------------------------------------------------------------------


class _Ring:
    """Point-to-point ring neighbours of this rank in `group` (global ranks, as isend/irecv want them)."""

    def __init__(self, group, rank: int, world_size: int):
        self.group, self.rank, self.size = group, rank, world_size
        self.next = dist.get_global_rank(group, (rank + 1) % world_size)
        self.prev = dist.get_global_rank(group, (rank - 1) % world_size)

    def shift(self, send: torch.Tensor, recv: torch.Tensor, tag: int):
        """Start sending `send` to the next rank and receiving into `recv` from the previous one (one batched
        pair, so NCCL runs it as one group call on its own stream, overlapping the caller's kernels)."""
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, self.next, self.group, tag),
                                       dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)])

    @staticmethod
    def wait(requests) -> None:
        for request in requests:
            request.wait()


_FEATURES, _GRADS = 0, 1  # message tags


class _RingContrastive(torch.autograd.Function):
    """(row_lse, col_lse, positive) for this rank's rows and columns, the keys arriving around the ring.

    keys = [texts; negatives] of this rank (negatives only when they are softmax columns); `num_texts` = b.
    """

    @staticmethod
    def forward(ctx, image, keys, scale, ring: _Ring, num_texts: int):
        b, n, r = image.shape[0], ring.size, ring.rank
        keys = keys.contiguous()
        receive = [torch.empty_like(keys), torch.empty_like(keys)]  # never into `keys`: it may be the caller's
        col_parts = image.new_empty(n, b, dtype=torch.float32)
        row_lse = positive = None
        current = keys
        for step in range(n):
            chunk = (r - step) % n
            pending = ring.shift(current, receive[step % 2], _FEATURES) if step < n - 1 else []
            rows, col_parts[chunk], diag, _ = lse_forward(
                image, current[:num_texts], current[num_texts:] if keys.shape[0] > num_texts else None,
                scale, True, 0 if chunk == r else -1)
            row_lse = rows if row_lse is None else torch.logaddexp(row_lse, rows)
            if chunk == r:
                positive = diag
            ring.wait(pending)
            current = receive[step % 2]
        # Owner c receives every rank's partial lse of its columns, sums them, and shares the result.
        received = torch.empty_like(col_parts)
        dist.all_to_all_single(received, col_parts, group=ring.group)
        col_lse = torch.logsumexp(received, dim=0)
        all_col_lse = image.new_empty(n * b, dtype=torch.float32)
        _all_gather_single(all_col_lse, col_lse, group=ring.group)
        all_col_lse = all_col_lse.view(n, b)

        ctx.save_for_backward(image, keys, scale, row_lse, all_col_lse)
        ctx.ring, ctx.num_texts = ring, num_texts
        return row_lse, col_lse, positive

    @staticmethod
    def backward(ctx, grad_row, grad_col, grad_positive):
        image, keys, scale, row_lse, all_col_lse = ctx.saved_tensors
        ring, num_texts = ctx.ring, ctx.num_texts
        b, n, r = image.shape[0], ring.size, ring.rank
        grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row.float().contiguous()
        grad_col = torch.zeros(b, device=image.device) if grad_col is None else grad_col.float().contiguous()
        grad_positive = torch.zeros_like(row_lse) if grad_positive is None else grad_positive
        all_grad_col = torch.empty(n * b, device=image.device, dtype=torch.float32)
        _all_gather_single(all_grad_col, grad_col, group=ring.group)
        all_grad_col = all_grad_col.view(n, b)

        receive = [torch.empty_like(keys), torch.empty_like(keys)]
        accumulators = [torch.zeros(keys.shape, device=keys.device, dtype=torch.float32) for _ in range(2)]
        grad_image = torch.zeros(image.shape, device=image.device, dtype=torch.float32)
        grad_chunk = torch.empty(keys.shape, device=keys.device, dtype=torch.float32)
        ds_rows = torch.zeros((), device=image.device, dtype=torch.float32)
        ds_cols = torch.zeros(n, device=image.device, dtype=torch.float32)  # per owner of the columns
        current, grads_in_flight = keys, []
        for step in range(n):
            chunk = (r - step) % n
            pending = ring.shift(current, receive[step % 2], _FEATURES) if step < n - 1 else []
            grad_chunk.zero_()
            has_negatives = keys.shape[0] > num_texts
            _, _, _, ds_r, ds_c = lse_backward(
                image, current[:num_texts], current[num_texts:] if has_negatives else None,
                scale, row_lse, all_col_lse[chunk], grad_row, all_grad_col[chunk], grad_positive,
                0 if chunk == r else -1,
                accumulate=(grad_image, grad_chunk[:num_texts], grad_chunk[num_texts:] if has_negatives else None))
            ds_rows += ds_r
            ds_cols[chunk] += ds_c
            # This chunk's accumulator came from the previous rank during the sweep (the owner starts at 0);
            # add this rank's share and pass it on.
            ring.wait(grads_in_flight)
            accumulator = accumulators[step % 2]
            accumulator += grad_chunk
            grads_in_flight = ring.shift(accumulator, accumulators[(step + 1) % 2], _GRADS)
            ring.wait(pending)
            current = receive[step % 2]
        ring.wait(grads_in_flight)
        grad_keys = accumulators[n % 2]  # after n hops every chunk's accumulator is back with its owner
        dist.all_reduce(ds_cols, group=ring.group)
        grad_scale = (ds_rows + ds_cols[r]).to(scale.dtype).reshape(scale.shape)
        return grad_image.to(image.dtype), grad_keys.to(keys.dtype), grad_scale, None, None


# Point-to-point communication inside an autograd Function does not trace; under torch.compile the ring is
# one explicit graph break (inside it the same Triton kernels run eagerly).
@torch.compiler.disable
def contrastive_sums_ring(image, text, logit_scale, *, group, negatives=None, negatives_in_softmax=True,
                          pair_negatives=False):
    """(i2t_sum, t2i_sum, hni_sum) of this rank from its LOCAL (b, D) features, with the same values and
    gradients as `contrastive_sums` on gathered features followed by the autograd all-gather's
    reduce-scatter. The other ranks' features arrive around the ring, overlapped with the sweep."""
    _check_device(image, "image_features")
    group, rank, world_size = group_rank_and_size(group)
    if world_size == 1:
        raise ValueError("group: contrastive_sums_ring needs at least 2 ranks")
    b, dtype = image.shape[0], image.dtype
    keys = text.to(dtype)
    if negatives is not None and negatives_in_softmax:
        keys = torch.cat([keys, negatives.to(dtype)])
    ring = _Ring(group, rank, world_size)
    row_lse, col_lse, positive = _RingContrastive.apply(image, keys, logit_scale.reshape(()), ring, b)
    i2t_sum = (row_lse - positive).sum()
    t2i_sum = (col_lse - positive).sum()
    hni_sum = i2t_sum.new_zeros(())
    if pair_negatives:
        negative = _upcast(logit_scale) * _rowwise_dot(image, negatives)
        hni_sum = F.softplus(negative - positive).sum()
    return i2t_sum, t2i_sum, hni_sum
