"""Locking (LiT, arXiv:2111.07991) with open_clip's groups: freeze a tower, leave its last groups trainable."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def freeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad = False


def unlock_last_groups(groups: Sequence[Sequence[nn.Module | nn.Parameter]], count: int, what: str) -> None:
    """Make the parameters of the last `count` groups trainable again (count 0: none; more than there are: all,
    as open_clip's slicing does)."""
    if count < 0:
        raise ValueError(f"{what} must be >= 0, got {count}")
    for group in groups[len(groups) - min(count, len(groups)):]:
        for part in group:
            for param in [part] if isinstance(part, nn.Parameter) else part.parameters():
                param.requires_grad = True
