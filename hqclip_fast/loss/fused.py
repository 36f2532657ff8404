"""impl="triton": the loss terms through the fused Triton kernels of `hqclip_kernels` (contract in api.py).

The logits are never materialized: the kernels keep O(b + B) log-sum-exp statistics and recompute tiles in
backward. On a single process one B x B sweep yields both the image->text row statistics and the
text->image column statistics. With several ranks api.py hands in gathered features: this rank's images
sweep all texts (and negatives), this rank's texts sweep all images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from hqclip_kernels._common import interpreting
    from hqclip_kernels.contrastive import contrastive_lse
    from hqclip_kernels.tag_bce import tag_bce_sum as _fused_tag_bce_sum
except ImportError as err:  # triton missing: api.py reports impl="triton" as unavailable
    raise ImportError(f"impl='triton' needs the triton package ({err})") from err

__all__ = ["is_available", "contrastive_sums", "tag_bce_sum"]


def is_available() -> bool:
    """Triton kernels run on CUDA devices, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
    return torch.cuda.is_available() or interpreting()


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_device(x: torch.Tensor, name: str) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"impl='triton': {name} is on {x.device}; the kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 to run them through Triton's CPU interpreter)")


def contrastive_sums(image, text, logit_scale, *, rows, softmax_negatives=None, pair_negatives=None):
    _check_device(image, "image_features")
    start, stop = rows
    dtype = image.dtype
    text = text.to(dtype)
    if softmax_negatives is not None:
        softmax_negatives = softmax_negatives.to(dtype)
    local_image, local_text = image[start:stop], text[start:stop]

    if stop - start == image.shape[0]:
        # One process: a single sweep gives the row (image->text) and column (text->image) statistics.
        i2t_lse, t2i_lse, positive = contrastive_lse(image, text, softmax_negatives, logit_scale,
                                                     col_stats=True, diag_offset=0)
        t2i_positive = positive
    else:
        i2t_lse, _, positive = contrastive_lse(local_image, text, softmax_negatives, logit_scale,
                                               diag_offset=start)
        t2i_lse, _, t2i_positive = contrastive_lse(local_text, image, None, logit_scale, diag_offset=start)

    i2t_sum = (i2t_lse - positive).sum()
    t2i_sum = (t2i_lse - t2i_positive).sum()
    hni_sum = i2t_sum.new_zeros(())
    if pair_negatives is not None:
        negative = _upcast(logit_scale) * (_upcast(local_image) * _upcast(pair_negatives)).sum(dim=1)
        hni_sum = F.softplus(negative - positive).sum()
    return i2t_sum, t2i_sum, hni_sum


def tag_bce_sum(tag_features, tag_weight, tag_bias, tag_targets):
    _check_device(tag_features, "tag_features")
    return _fused_tag_bce_sum(tag_features, tag_weight, tag_bias, tag_targets)
