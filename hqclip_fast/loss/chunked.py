"""Memory-efficient implementation for any device (contract in api.py).

The logit matrices are walked in (CHUNK_ROWS x CHUNK_COLS) tiles. Forward keeps only running log-sum-exps
(one per local row and one per local column, O(b)); backward recomputes each tile and turns it into its
softmax-gradient tile at once, so neither the b x B contrastive logits nor the b x V tag logits ever exist
whole. All arithmetic is fp32 (fp64 for fp64 inputs) whatever the feature dtype; gradients are returned
in the input dtypes. The cheap O(b * D) terms (the pairwise HNI term, the tag positives) use plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import upcast as _upcast

# Tile sizes, read at call time (tests set them small). A fp32 tile is CHUNK_ROWS * CHUNK_COLS * 4 bytes
# (16 MiB); on CPU smaller tiles cost more time than they save in cache (benchmarks/bench_loss.py).
CHUNK_ROWS = 2048
CHUNK_COLS = 2048


def _spans(lo: int, hi: int, size: int):
    return [(a, min(a + size, hi)) for a in range(lo, hi, size)]


def _tiles(total: int, start: int, stop: int, has_negatives: bool):
    """Tiles (row span, col span, on_negatives, rows_local, cols_local) covering every logit that a local
    row or a local column needs: local rows x all columns (+ negative columns), other rows x local columns.
    Spans never straddle the local range, so each tile is wholly local or not, per axis."""
    rows_local = _spans(start, stop, CHUNK_ROWS)
    rows_other = _spans(0, start, CHUNK_ROWS) + _spans(stop, total, CHUNK_ROWS)
    cols_local = _spans(start, stop, CHUNK_COLS)
    cols_other = _spans(0, start, CHUNK_COLS) + _spans(stop, total, CHUNK_COLS)
    for rows in rows_local:
        for cols in cols_local:
            yield rows, cols, False, True, True
        for cols in cols_other:
            yield rows, cols, False, True, False
        if has_negatives:
            for cols in _spans(0, total, CHUNK_COLS):
                yield rows, cols, True, True, False
    for rows in rows_other:
        for cols in cols_local:
            yield rows, cols, False, False, True


# A column sum built from row-shifted exponentials may have lost terms below fp32's normal range
# (~1e-38 each, at most CHUNK_ROWS of them); above this value that loss is negligible, below it the
# column is recomputed exactly.
_LOSSY_COLUMN_SUM = 1e-25


class _TileBuffers:
    """Reused tile-sized buffers: one allocation per pass instead of one per tile, so the CPU allocator
    does not keep freed tiles around (with glibc's adaptive thresholds they stay resident)."""

    def __init__(self, like: torch.Tensor, count: int):
        size = min(CHUNK_ROWS, len(like)) * min(CHUNK_COLS, len(like))  # small batches need small tiles
        self.flat = [like.new_empty(size) for _ in range(count)]

    def __call__(self, index: int, rows: int, cols: int) -> torch.Tensor:
        return self.flat[index][: rows * cols].view(rows, cols)


def _tile_logits(img_rows, s, cols, buffers: _TileBuffers):
    return torch.mm(img_rows * s, cols.T, out=buffers(0, len(img_rows), len(cols)))


def _tile_log_sum_exps(logits, rows_local: bool, cols_local: bool, buffers: _TileBuffers):
    """(row log-sum-exps, column log-sum-exps) of one tile; None for an axis that is not local."""
    if not rows_local:
        return None, torch.logsumexp(logits, dim=0)
    row_max = logits.amax(dim=1)
    shifted = torch.sub(logits, row_max[:, None], out=buffers(1, *logits.shape)).exp_()
    row_lse = shifted.sum(dim=1).log_().add_(row_max)
    if not cols_local:
        return row_lse, None
    # One exp pass serves both axes: sum_i e^{x_ij} = e^M * sum_i e^{m_i - M} * e^{x_ij - m_i}, M = max_i m_i.
    tile_max = row_max.max()
    col_sum = torch.exp(row_max - tile_max) @ shifted
    col_lse = col_sum.log().add_(tile_max)
    lossy = col_sum < _LOSSY_COLUMN_SUM
    if lossy.any():  # a host read per tile, the one of this implementation (fused.py's kernels have none)
        col_lse[lossy] = torch.logsumexp(logits[:, lossy], dim=0)
    return row_lse, col_lse


class _ContrastiveSums(torch.autograd.Function):
    """(i2t_sum, t2i_sum) of api.py's contract: the log-sum-exps of the local rows and local columns of
    s * image @ [text; negatives].T, tile by tile, minus the positive logits s<I_i,T_i> of the local rows.
    The positives are handled here rather than by autograd on row slices, which would allocate a full-size
    gradient per slice."""

    @staticmethod
    def forward(ctx, image, text, negatives, scale, start: int, stop: int):
        img, txt = _upcast(image), _upcast(text)
        neg = _upcast(negatives) if negatives is not None else None
        s = _upcast(scale)
        row_lse = img.new_full((stop - start,), float("-inf"))
        buffers = _TileBuffers(img, 2)
        col_lse = img.new_full((stop - start,), float("-inf"))
        for (r0, r1), (c0, c1), on_neg, rows_local, cols_local in _tiles(len(img), start, stop, neg is not None):
            logits = _tile_logits(img[r0:r1], s, (neg if on_neg else txt)[c0:c1], buffers)
            tile_row_lse, tile_col_lse = _tile_log_sum_exps(logits, rows_local, cols_local, buffers)
            if rows_local:
                rl = row_lse[r0 - start:r1 - start]
                torch.logaddexp(rl, tile_row_lse, out=rl)
            if cols_local:
                cl = col_lse[c0 - start:c1 - start]
                torch.logaddexp(cl, tile_col_lse, out=cl)
        positive_sum = s * (img[start:stop] * txt[start:stop]).sum()
        ctx.save_for_backward(image, text, negatives, scale, row_lse, col_lse)
        ctx.start, ctx.stop = start, stop
        return row_lse.sum() - positive_sum, col_lse.sum() - positive_sum

    @staticmethod
    def backward(ctx, grad_rows, grad_cols):
        image, text, negatives, scale, row_lse, col_lse = ctx.saved_tensors
        start, stop = ctx.start, ctx.stop
        img, txt = _upcast(image), _upcast(text)
        neg = _upcast(negatives) if negatives is not None else None
        s = _upcast(scale)
        # exp(x - lse) * g == sign(g) * exp(x - (lse - log|g|)): the upstream gradient folds into the shift.
        row_shift = row_lse - _upcast(grad_rows).abs().log()
        col_shift = col_lse - _upcast(grad_cols).abs().log()
        # The signs stay on the device (no host read in a training step).
        row_sign, col_sign = (torch.where(g < 0, -1.0, 1.0).to(img.dtype) for g in (grad_rows, grad_cols))
        # Unscaled gradients: d(loss)/d(image_i) = s * sum_j P_ij y_j, so s is applied once at the end.
        d_img, d_txt = torch.zeros_like(img), torch.zeros_like(txt)
        d_neg = torch.zeros_like(neg) if neg is not None else None
        buffers = _TileBuffers(img, 2)
        for (r0, r1), (c0, c1), on_neg, rows_local, cols_local in _tiles(len(img), start, stop, neg is not None):
            cols_src, cols_grad = (neg, d_neg) if on_neg else (txt, d_txt)
            logits = _tile_logits(img[r0:r1], s, cols_src[c0:c1], buffers)
            # Gradient tile: g_rows * row softmax (local rows) + g_cols * column softmax (local columns).
            probs = None
            if rows_local:
                probs = torch.sub(logits, row_shift[r0 - start:r1 - start, None],
                                  out=buffers(1, *logits.shape)).exp_()
                probs.mul_(row_sign)
            if cols_local:
                col_probs = logits.sub_(col_shift[None, c0 - start:c1 - start]).exp_()
                col_probs.mul_(col_sign)
                probs = col_probs if probs is None else probs.add_(col_probs)
            d_img[r0:r1].addmm_(probs, cols_src[c0:c1])
            cols_grad[c0:c1].addmm_(probs.T, img[r0:r1])
        # The positives: -(g_rows + g_cols) * s<I_i,T_i> for the local rows.
        grad_positive = _upcast(grad_rows + grad_cols)
        d_img[start:stop].sub_(grad_positive * txt[start:stop])
        d_txt[start:stop].sub_(grad_positive * img[start:stop])
        # sum_ij P_ij <image_i, y_j> = sum_i <image_i, d_img_i>: the gradient w.r.t. the scale.
        d_scale = (d_img * img).sum().to(scale.dtype) if ctx.needs_input_grad[3] else None
        d_img = d_img.mul_(s).to(image.dtype)
        d_txt = d_txt.mul_(s).to(text.dtype)
        if d_neg is not None:
            d_neg = d_neg.mul_(s).to(negatives.dtype)
        return d_img, d_txt, d_neg, d_scale, None, None


def contrastive_sums(image, text, logit_scale, *, rows, softmax_negatives=None, pair_negatives=None):
    start, stop = rows
    i2t_sum, t2i_sum = _ContrastiveSums.apply(image, text, softmax_negatives, logit_scale, start, stop)
    hni_sum = i2t_sum.new_zeros(())
    if pair_negatives is not None:
        s = _upcast(logit_scale)
        local_image = _upcast(image[start:stop])
        margin = (local_image * (_upcast(pair_negatives) - _upcast(text[start:stop]))).sum(dim=1)
        hni_sum = F.softplus(s * margin).sum()
    return i2t_sum, t2i_sum, hni_sum


class _SoftplusSum(torch.autograd.Function):
    """sum over the b x V entries of softplus(features @ weight.T + bias), tile by tile."""

    @staticmethod
    def forward(ctx, features, weight, bias):
        feats, w = _upcast(features), _upcast(weight)
        b = _upcast(bias) if bias is not None else None
        total = feats.new_zeros(())
        for (r0, r1), (c0, c1) in _tag_tiles(len(feats), len(w)):
            logits = _tag_logits(feats[r0:r1], w[c0:c1], b, c0, c1)
            total += F.softplus(logits).sum()
        ctx.save_for_backward(features, weight, bias)
        return total

    @staticmethod
    def backward(ctx, grad):
        features, weight, bias = ctx.saved_tensors
        feats, w = _upcast(features), _upcast(weight)
        b = _upcast(bias) if bias is not None else None
        grad = _upcast(grad)
        d_feats, d_w = torch.zeros_like(feats), torch.zeros_like(w)
        d_b = torch.zeros_like(b) if b is not None else None
        for (r0, r1), (c0, c1) in _tag_tiles(len(feats), len(w)):
            d_logits = _tag_logits(feats[r0:r1], w[c0:c1], b, c0, c1).sigmoid_().mul_(grad)
            d_feats[r0:r1].addmm_(d_logits, w[c0:c1])
            d_w[c0:c1].addmm_(d_logits.T, feats[r0:r1])
            if d_b is not None:
                d_b[c0:c1] += d_logits.sum(dim=0)
        d_b = d_b.to(bias.dtype) if d_b is not None else None
        return d_feats.to(features.dtype), d_w.to(weight.dtype), d_b


def _tag_tiles(batch: int, num_tags: int):
    for rows in _spans(0, batch, CHUNK_ROWS):
        for cols in _spans(0, num_tags, CHUNK_COLS):
            yield rows, cols


def _tag_logits(feats, w, b, c0, c1):
    if b is None:
        return feats @ w.T
    return torch.addmm(b[c0:c1], feats, w.T)


def tag_bce_sum(tag_features, tag_weight, tag_bias, tag_targets):
    # BCE(z, y) = softplus(z) - y * z: the softplus part spans all b x V logits (chunked), the y * z part
    # only the target entries, gathered as one weighted sum of tag_weight rows per sample.
    softplus_sum = _SoftplusSum.apply(tag_features, tag_weight, tag_bias)
    if tag_targets.shape[1] == 0:
        return softplus_sum
    ids, _ = tag_targets.sort(dim=1)
    repeated = torch.zeros_like(ids, dtype=torch.bool)
    repeated[:, 1:] = ids[:, 1:] == ids[:, :-1]
    weight = _upcast(tag_weight)
    counted = ((ids >= 0) & ~repeated).to(weight.dtype)
    ids = ids.clamp(min=0)
    target_weight_sum = F.embedding_bag(ids, weight, per_sample_weights=counted, mode="sum")
    positive_sum = (_upcast(tag_features) * target_weight_sum).sum()
    if tag_bias is not None:
        positive_sum = positive_sum + (_upcast(tag_bias)[ids] * counted).sum()
    return softplus_sum - positive_sum
