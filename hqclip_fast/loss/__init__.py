"""HQ-CLIP loss: CLIP InfoNCE + hard-negative identification + short-tag classification.

`hqclip_loss` / `HQCLIPLoss` are the single entry point; impl="reference" | "chunked" | "triton" | "auto".
"""

from .api import IMPLS, STC_REDUCTIONS, HQCLIPLoss, LossOutput, hqclip_loss

__all__ = ["IMPLS", "STC_REDUCTIONS", "HQCLIPLoss", "LossOutput", "hqclip_loss"]
