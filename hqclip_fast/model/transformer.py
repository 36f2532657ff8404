"""Pre-norm transformer blocks with open_clip's parameter names (so state dicts map one to one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, varlen_attention


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection.

    Parameter names follow nn.MultiheadAttention (in_proj_weight, in_proj_bias, out_proj), which is what
    open_clip checkpoints hold.
    """

    def __init__(self, width: int, heads: int, *, causal: bool, backend: str):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.backend = backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        """x: (B, L, width), or packed (T, width) with cu_seqlens and max_seqlen."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.unflatten(-1, (3, self.heads, -1))  # (..., 3, H, D)
        q, k, v = qkv.unbind(-3)
        if cu_seqlens is None:
            out = attention(q, k, v, causal=self.causal, backend=self.backend)
        else:
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=self.causal, backend=self.backend)
        return self.out_proj(out.flatten(-2))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, *, causal: bool, quick_gelu: bool,
                 backend: str):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal=causal, backend=backend)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", QuickGELU() if quick_gelu else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, *, causal: bool,
                 quick_gelu: bool, backend: str):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, causal=causal, quick_gelu=quick_gelu,
                                   backend=backend)
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, cu_seqlens, max_seqlen)
        return x

    def init_weights(self) -> None:
        # Scaled normal init in the spirit of CLIP: projections shrink with depth.
        proj_std = self.width**-0.5 * (2 * len(self.resblocks)) ** -0.5
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)
