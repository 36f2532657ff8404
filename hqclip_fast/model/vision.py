"""ViT image tower with open_clip's layout (class token or average pooling, ln_post, linear projection)."""

from __future__ import annotations

import torch
from torch import nn

from .configs import VisionConfig
from .locking import freeze, unlock_last_groups
from .transformer import Transformer


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, *, quick_gelu: bool, backend: str):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.grid_size**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, causal=False,
                                       quick_gelu=quick_gelu, backend=backend)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        scale = self.cfg.width**-0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        nn.init.normal_(self.proj, std=scale)
        self.transformer.init_weights()

    def drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Keep the class token and a random max(1, int(n * (1 - patch_dropout))) of the n patch tokens per image
        (open_clip's PatchDropout, FLIP); positions were already added, so their order does not matter."""
        patches = x[:, 1:]
        keep = max(1, int(patches.shape[1] * (1.0 - self.cfg.patch_dropout)))
        kept = torch.rand(patches.shape[:2], device=x.device).topk(keep, dim=1).indices
        patches = patches.gather(1, kept[..., None].expand(-1, -1, patches.shape[2]))
        return torch.cat([x[:, :1], patches], dim=1)

    def lock(self, unlocked_groups: int = 0) -> None:
        """Freeze the tower but its last `unlocked_groups` groups, open_clip's groups from the input on: the
        embeddings with ln_pre, each block but the last, the last block with ln_post, the projection."""
        freeze(self)
        blocks = list(self.transformer.resblocks)
        groups = [[self.conv1, self.class_embedding, self.positional_embedding, self.ln_pre],
                  *[[block] for block in blocks[:-1]], [blocks[-1], self.ln_post], [self.proj]]
        unlock_last_groups(groups, unlocked_groups, "lock_image_unlocked_groups")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) with H = W = image_size; returns (B, embed_dim), unnormalized."""
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if self.training and self.cfg.patch_dropout > 0:
            x = self.drop_patches(x)
        x = self.transformer(self.ln_pre(x))
        if self.cfg.pool_type == "avg":  # open_clip's order: ln_post over the tokens, then their mean
            return self.ln_post(x[:, 1:]).mean(dim=1) @ self.proj
        return self.ln_post(x[:, 0]) @ self.proj
