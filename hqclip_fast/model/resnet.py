"""ResNet image tower with open_clip's layout ("ModifiedResNet", the OpenAI CLIP RN50/RN101/RN50x4 towers).

Differences from a torchvision ResNet, as in open_clip: a stem of three 3x3 convolutions and a 2x2 average pool
(no max pool); strided bottlenecks downsample by an average pool before their stride-1 convolution
(anti-aliasing); the head is an attention pool whose single query is the mean of the final feature map.
Parameter and buffer names match open_clip's, so state dicts map one to one (BatchNorm buffers included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .configs import VisionConfig
from .locking import freeze

EXPANSION = 4  # a bottleneck's output has 4x its inner width


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that also runs when its gain and bias come in lower precision than its running statistics
    (a mixed-precision wrapper such as FSDP2 casts parameters, not buffers, and the op wants the four in one
    dtype): they are cast to the statistics' dtype; bf16 activations are fine as they are."""

    # True: normalize by the running statistics in training too and never update them (open_clip's
    # FrozenBatchNorm2d, which lock_image_tower(freeze_bn_stats=True) swaps in).
    frozen_stats: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats_dtype = self.running_mean.dtype
        if self.frozen_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight.to(stats_dtype),
                                self.bias.to(stats_dtype), False, 0.0, self.eps)
        if self.weight.dtype == stats_dtype:
            return super().forward(x)
        # nn.BatchNorm2d's update rule (affine, tracked statistics: how this tower builds them).
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight.to(stats_dtype),
                            self.bias.to(stats_dtype), self.training, momentum, self.eps)


class Bottleneck(nn.Module):
    def __init__(self, in_width: int, width: int, stride: int = 1):
        super().__init__()
        out_width = width * EXPANSION
        self.conv1 = nn.Conv2d(in_width, width, 1, bias=False)
        self.bn1 = BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        # Downsample by averaging before the 1x1 convolution, not by a strided convolution (anti-aliasing).
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(width, out_width, 1, bias=False)
        self.bn3 = BatchNorm2d(out_width)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or in_width != out_width:
            # open_clip's names: "-1" (the pool), "0" (the conv), "1" (the norm).
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity())
            self.downsample.add_module("0", nn.Conv2d(in_width, out_width, 1, bias=False))
            self.downsample.add_module("1", BatchNorm2d(out_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act3(out + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention pooling: one query (the mean of the feature map) over the mean and every position."""

    def __init__(self, grid_size: int, width: int, heads: int, out_dim: int, *, backend: str):
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.positional_embedding = nn.Parameter(torch.empty(grid_size**2 + 1, width))
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, out_dim)."""
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        # Only the mean token's output is kept, so it is the only query computed.
        q = self.q_proj(x[:, :1]).unflatten(-1, (self.heads, -1))
        k = self.k_proj(x).unflatten(-1, (self.heads, -1))
        v = self.v_proj(x).unflatten(-1, (self.heads, -1))
        out = attention(q, k, v, backend=self.backend)  # (B, 1, heads, head_dim)
        return self.c_proj(out.flatten(-2)[:, 0])


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, *, backend: str):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        # Four stages; each after the first halves the resolution and doubles the width.
        in_width = width
        for stage, depth in enumerate(cfg.layers):
            inner = width * 2**stage
            blocks = [Bottleneck(in_width, inner, stride=1 if stage == 0 else 2)]  # the first block downsamples
            blocks += [Bottleneck(inner * EXPANSION, inner) for _ in range(depth - 1)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            in_width = inner * EXPANSION
        # The total stride is 32: 2 (conv1) * 2 (stem pool) * 2**3 (stages 2-4).
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads, embed_dim, backend=backend)
        self.init_weights()

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def init_weights(self) -> None:
        """open_clip's init: scaled normal attention-pool projections; each residual branch starts at zero
        (bn3 gains), so every bottleneck starts as its shortcut. Convolutions, norms and the attention-pool
        biases keep PyTorch's default init, as in open_clip."""
        pool = self.attnpool
        nn.init.normal_(pool.positional_embedding, std=pool.k_proj.in_features**-0.5)
        std = pool.c_proj.in_features**-0.5
        for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in self.stages:
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the whole tower (open_clip's ModifiedResNet has no partial locking); freeze_bn_stats: its
        BatchNorm layers also stop following the batches (normalize by, and keep, their running statistics)."""
        if unlocked_groups != 0:
            raise ValueError(f"lock_image_unlocked_groups={unlocked_groups}: a ResNet image tower locks whole "
                             "(open_clip supports partial locking of ViT towers only)")
        freeze(self)
        for module in self.modules():
            if isinstance(module, BatchNorm2d):
                module.frozen_stats = freeze_bn_stats

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) with H = W = image_size; returns (B, embed_dim), unnormalized."""
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        x = self.stem(images)
        for stage in self.stages:
            x = stage(x)
        return self.attnpool(x)
