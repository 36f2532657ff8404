"""Learning-rate schedules: linear warmup, then open_clip_train's `cosine`, `const` or `const-cooldown`.

Each is a multiplier of the base learning rate after `step` optimizer steps (the learning rate of step s is
base_lr * f(s), as open_clip_train's `scheduler(step)` sets it before step s). Classes rather than lambdas so that
LambdaLR.state_dict() records their settings.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "const", "const-cooldown")


def _check(warmup_steps: int, total_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")


class _Warmup:
    """Steps 0..warmup_steps-1 ramp linearly up to 1 (the first step already gets 1/warmup_steps, never 0)."""

    def __init__(self, warmup_steps: int, total_steps: int):
        _check(warmup_steps, total_steps)
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.after_warmup(step)

    def after_warmup(self, step: int) -> float:
        raise NotImplementedError


class WarmupCosine(_Warmup):
    """After the warmup a half cosine from 1 down to `min_lr_ratio` at `total_steps` (open_clip's `cosine` with
    min_lr_ratio = 0)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
        super().__init__(warmup_steps, total_steps)
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.min_lr_ratio = min_lr_ratio

    def after_warmup(self, step: int) -> float:
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


class WarmupConstant(_Warmup):
    """After the warmup the base learning rate (open_clip's `const`)."""

    def after_warmup(self, step: int) -> float:
        return 1.0


class WarmupConstantCooldown(_Warmup):
    """open_clip's `const-cooldown`: constant until step total_steps - cooldown_steps, then
    end + (1 - end) * (1 - e / cooldown_steps) ** power, e the steps into the cooldown (power 1: linear), where
    end = `cooldown_end_ratio` (open_clip's --lr-cooldown-end over the base lr). The warmup wins where they overlap,
    as in open_clip; past total_steps the rate stays at the end value."""

    def __init__(self, warmup_steps: int, total_steps: int, cooldown_steps: int, cooldown_power: float = 1.0,
                 cooldown_end_ratio: float = 0.0):
        super().__init__(warmup_steps, total_steps)
        if not 1 <= cooldown_steps <= total_steps:
            raise ValueError(f"cooldown_steps must be in [1, total_steps={total_steps}], got {cooldown_steps}")
        if cooldown_power <= 0:
            raise ValueError(f"cooldown_power must be > 0, got {cooldown_power}")
        if cooldown_end_ratio < 0:
            raise ValueError(f"the cooldown's end learning rate must be >= 0, got ratio {cooldown_end_ratio}")
        self.cooldown_steps, self.cooldown_power = cooldown_steps, cooldown_power
        self.cooldown_end_ratio = cooldown_end_ratio

    def after_warmup(self, step: int) -> float:
        into = step - (self.total_steps - self.cooldown_steps)
        if into < 0:
            return 1.0
        decay = (1.0 - min(into, self.cooldown_steps) / self.cooldown_steps) ** self.cooldown_power
        return self.cooldown_end_ratio + (1.0 - self.cooldown_end_ratio) * decay


def lr_multiplier(schedule: str, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                  cooldown_steps: int = 0, cooldown_power: float = 1.0, cooldown_end_ratio: float = 0.0) -> _Warmup:
    if schedule == "cosine":
        return WarmupCosine(warmup_steps, total_steps, min_lr_ratio)
    if schedule == "const":
        return WarmupConstant(warmup_steps, total_steps)
    if schedule == "const-cooldown":
        return WarmupConstantCooldown(warmup_steps, total_steps, cooldown_steps, cooldown_power, cooldown_end_ratio)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                       min_lr_ratio: float = 0.0, schedule: str = "cosine", cooldown_steps: int = 0,
                       cooldown_power: float = 1.0, cooldown_end_ratio: float = 0.0) -> LambdaLR:
    return LambdaLR(optimizer, lr_multiplier(
        schedule, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio,
        cooldown_steps=cooldown_steps, cooldown_power=cooldown_power, cooldown_end_ratio=cooldown_end_ratio))
