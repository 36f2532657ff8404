"""Causal text transformer with open_clip's layout, pooled at the end-of-text token (the largest token id).

Packed mode drops the padding after each end-of-text token and runs varlen attention over the concatenated
sequences. Because attention is causal and the pooled token is the last kept one, the result equals the
padded path exactly (up to float summation order).
"""

from __future__ import annotations

import torch
from torch import nn

from .configs import TextConfig
from .locking import freeze, unlock_last_groups
from .transformer import Transformer


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, *, quick_gelu: bool, backend: str):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, causal=True,
                                       quick_gelu=quick_gelu, backend=backend)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.cfg.width**-0.5)
        self.transformer.init_weights()

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze the tower but its last `unlocked_layers` groups, open_clip's groups from the input on: the token
        and positional embeddings, each block but the last, the last block with ln_final, the projection."""
        freeze(self)
        blocks = list(self.transformer.resblocks)
        groups = [[self.token_embedding, self.positional_embedding], *[[block] for block in blocks[:-1]],
                  [blocks[-1], self.ln_final], [self.text_projection]]
        unlock_last_groups(groups, unlocked_layers, "lock_text_unlocked_layers")

    def forward(self, tokens: torch.Tensor, *, packed: bool = False) -> torch.Tensor:
        """tokens: (B, L) int ids, L <= context_length; returns (B, embed_dim), unnormalized."""
        if tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be an integer (B, L) tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.context_length:
            raise ValueError(f"tokens has {tokens.shape[1]} positions, more than context_length "
                             f"{self.cfg.context_length}")
        eot = tokens.argmax(dim=-1)  # open_clip's "argmax" pooling: the end-of-text id is the largest
        if packed:
            pooled = self._forward_packed(tokens, eot)
        else:
            x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
            x = self.transformer(x)
            pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        # LayerNorm is per token, so normalizing only the pooled tokens equals open_clip's ln-then-pool.
        return self.ln_final(pooled) @ self.text_projection

    def _forward_packed(self, tokens: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        lengths = eot + 1
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        keep = positions < lengths[:, None]
        x = self.token_embedding(tokens[keep]) + self.positional_embedding[positions[keep]]
        cu_seqlens = torch.zeros(tokens.shape[0] + 1, dtype=torch.int32, device=tokens.device)
        cu_seqlens[1:] = lengths.cumsum(0)
        x = self.transformer(x, cu_seqlens, int(lengths.max()))
        return x[cu_seqlens[1:].long() - 1]
