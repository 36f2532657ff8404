"""Triton kernels for the HQ-CLIP loss and their autograd Functions. Knows nothing of models or configs.

contrastive_lse: row / column log-sum-exp, positive and pairwise-negative logits of s * Q @ [K1; K2].T
                 without the logits.
tag_bce_sum:     fused tag head (F @ W.T + bias) with multi-label sigmoid BCE over sparse targets.
Both are torch.library custom ops (hqclip::*) with autograd, usable inside torch.compile.
"""

from .contrastive import contrastive_lse
from .tag_bce import tag_bce_sum

__all__ = ["contrastive_lse", "tag_bce_sum"]
