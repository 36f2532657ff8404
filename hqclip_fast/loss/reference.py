"""Reference implementation: plain PyTorch on materialized fp32 logits, written to be read, not to be fast.
It is the ground truth of the tests. The contract of both functions is documented in api.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in the accumulation dtype of every implementation: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def contrastive_sums(image, text, logit_scale, *, rows, softmax_negatives=None, pair_negatives=None):
    start, stop = rows
    image, text, scale = upcast(image), upcast(text), upcast(logit_scale)
    local_image, local_text = image[start:stop], text[start:stop]
    targets = torch.arange(start, stop, device=image.device)

    # image -> text: this rank's images against every text (and every negative text, as extra columns).
    logits_i2t = scale * local_image @ text.T
    if softmax_negatives is not None:
        logits_i2t = torch.cat([logits_i2t, scale * local_image @ upcast(softmax_negatives).T], dim=1)
    i2t_sum = F.cross_entropy(logits_i2t, targets, reduction="sum")

    # text -> image: this rank's texts against every image.
    logits_t2i = scale * local_text @ image.T
    t2i_sum = F.cross_entropy(logits_t2i, targets, reduction="sum")

    hni_sum = i2t_sum.new_zeros(())
    if pair_negatives is not None:
        positive = scale * (local_image * local_text).sum(dim=1)
        negative = scale * (local_image * upcast(pair_negatives)).sum(dim=1)
        pair_logits = torch.stack([positive, negative], dim=1)
        hni_sum = F.cross_entropy(pair_logits, torch.zeros_like(targets), reduction="sum")
    return i2t_sum, t2i_sum, hni_sum


def multi_hot(tag_targets: torch.Tensor, num_tags: int, dtype: torch.dtype) -> torch.Tensor:
    """(b, T) ids with -1 padding -> (b, V) 0/1 matrix; a repeated id sets the same entry once."""
    batch = tag_targets.shape[0]
    dense = torch.zeros(batch, num_tags + 1, dtype=dtype, device=tag_targets.device)
    padded = torch.where(tag_targets < 0, num_tags, tag_targets)  # padding lands in an extra column
    dense.scatter_(1, padded, 1.0)
    return dense[:, :num_tags]


def tag_bce_sum(tag_features, tag_weight, tag_bias, tag_targets):
    logits = upcast(tag_features) @ upcast(tag_weight).T
    if tag_bias is not None:
        logits = logits + upcast(tag_bias)
    labels = multi_hot(tag_targets, tag_weight.shape[0], logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
