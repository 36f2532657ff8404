"""AdamW with a weight-decay split chosen by name (`WEIGHT_DECAY_RULES`).

- "open_clip" (the default): open_clip_train's rule. Every parameter with ndim >= 2 is decayed unless its name
  contains "bn", "ln", "bias" or "logit_scale"; so projections, convolutions and also the token, positional and
  class embeddings of ndim >= 2 are decayed; gains, biases (1-D) and the temperature are not.
- "skip_embeddings": hqclip-fast's rule before open_clip parity: as above by shape, but no parameter whose name
  contains "embedding", "logit_scale" or "logit_bias" is decayed (embedding tables and positional embeddings are
  lookups, not projections).
Frozen parameters (requires_grad=False: locked towers) are left out of the optimizer, so they get no state.
"""

from __future__ import annotations

import torch
from torch import nn

# open_clip_train/main.py: exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
OPEN_CLIP_NO_DECAY_NAME_PARTS = ("bn", "ln", "bias", "logit_scale")
SKIP_EMBEDDINGS_NO_DECAY_NAME_PARTS = ("embedding", "logit_scale", "logit_bias")
WEIGHT_DECAY_RULES = {"open_clip": OPEN_CLIP_NO_DECAY_NAME_PARTS,
                      "skip_embeddings": SKIP_EMBEDDINGS_NO_DECAY_NAME_PARTS}


def decays(name: str, param: torch.Tensor, rule: str = "open_clip") -> bool:
    """True when `rule` decays the parameter `name` (see the module docstring)."""
    if rule not in WEIGHT_DECAY_RULES:
        raise ValueError(f"weight-decay rule must be one of {sorted(WEIGHT_DECAY_RULES)}, got {rule!r}")
    return param.ndim >= 2 and not any(part in name for part in WEIGHT_DECAY_RULES[rule])


def param_groups(model: nn.Module, weight_decay: float, rule: str = "open_clip") -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param, rule) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    weight_decay_rule: str = "open_clip",
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
        param_groups(model, weight_decay, weight_decay_rule),
        lr=lr,
        betas=(float(betas[0]), float(betas[1])),
        eps=eps,
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )
