"""AdamW with the usual CLIP split: no weight decay on gains, biases, embeddings and the logit scale."""

from __future__ import annotations

import torch
from torch import nn

# Parameters whose names contain one of these are never decayed, whatever their shape: embedding tables and the
# positional embeddings are 2-D but are lookups, not projections (open_clip's training recipe does the same).
NO_DECAY_NAME_PARTS = ("embedding", "logit_scale", "logit_bias")


def decays(name: str, param: torch.Tensor) -> bool:
    """True for weight matrices (projections, convolutions); False for gains, biases, embeddings, scale."""
    return param.ndim >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] | list[float] = (0.9, 0.98),
    eps: float = 1e-6,
    device: torch.device | str = "cpu",
) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters; the fused kernel on CUDA, the foreach one elsewhere."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if len(betas) != 2:
        raise ValueError(f"betas must have two values, got {list(betas)}")
    on_cuda = torch.device(device).type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, weight_decay),
        lr=lr,
        betas=(float(betas[0]), float(betas[1])),
        eps=eps,
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )
