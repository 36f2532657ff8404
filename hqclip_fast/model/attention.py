"""The one attention interface the towers call; the backends sit behind it.

Layout everywhere is (batch, seq, heads, head_dim) for dense attention and (total_tokens, heads, head_dim)
plus ``cu_seqlens`` (int32, cumulative lengths starting at 0) for packed (varlen) attention, as in
flash-attention. Backends:

- ``"sdpa"`` (default): ``F.scaled_dot_product_attention`` without float masks, so the flash kernel is eligible
  on the GPU; packed input uses ``torch.nn.attention.varlen.varlen_attn`` on CUDA in fp16/bf16 and an exact
  pad-to-longest dense path otherwise (CPU, fp32).
- ``"flash_attn"``: ``flash_attn_func`` / ``flash_attn_varlen_func`` (package ``flash-attn``).
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` with (block-diagonal) causal biases.

Choosing an optional backend that is not installed is an ImportError that names the package; there is no
silent fallback.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .configs import ATTN_BACKENDS


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"attention backend needs the '{package}' package, which is not installed "
            f"(pip install {package}, or use attn_backend='sdpa')"
        ) from e


def check_backend(backend: str) -> None:
    """Fail early (at model construction) on an unknown or uninstalled backend."""
    if backend == "sdpa":
        return
    if backend == "flash_attn":
        _require("flash_attn", "flash-attn")
    elif backend == "xformers":
        _require("xformers.ops", "xformers")
    else:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {backend!r}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              backend: str = "sdpa") -> torch.Tensor:
    """Dense attention over (B, L, H, D) inputs; returns (B, L, H, D)."""
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal)
        return out.transpose(1, 2)
    if backend == "flash_attn":
        _check_half(q, backend)
        return _require("flash_attn", "flash-attn").flash_attn_func(q, k, v, causal=causal)
    if backend == "xformers":
        xops = _require("xformers.ops", "xformers")
        bias = xops.LowerTriangularMask() if causal else None
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {backend!r}")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, causal: bool = False, backend: str = "sdpa") -> torch.Tensor:
    """Attention within each packed sequence: (T, H, D) inputs, sequence i is rows
    cu_seqlens[i]:cu_seqlens[i+1]; returns (T, H, D)."""
    if backend == "sdpa":
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _torch_varlen() is not None:
            window = (-1, 0) if causal else (-1, -1)
            return _torch_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=window)
        return varlen_attention_by_padding(q, k, v, cu_seqlens, max_seqlen, causal=causal)
    if backend == "flash_attn":
        _check_half(q, backend)
        fa = _require("flash_attn", "flash-attn")
        return fa.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal)
    if backend == "xformers":
        xops = _require("xformers.ops", "xformers")
        fmha = _require("xformers.ops.fmha", "xformers")
        seqlens = cu_seqlens.diff().tolist()
        mask_cls = fmha.attn_bias.BlockDiagonalCausalMask if causal else fmha.attn_bias.BlockDiagonalMask
        out = xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=mask_cls.from_seqlens(seqlens))
        return out[0]
    raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {backend!r}")


def varlen_attention_by_padding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                max_seqlen: int, *, causal: bool) -> torch.Tensor:
    """Exact packed attention through dense SDPA: the portable path (CPU, fp32).

    The packed rows are scattered into a (N, max_seqlen) batch; keys past each sequence's end are masked
    (for causal attention the causal mask already hides them from every real query). Work is that of the
    longest sequence, not of the padded context, and memory stays linear in the number of tokens."""
    n, width = cu_seqlens.numel() - 1, max_seqlen
    valid = torch.arange(width, device=q.device) < cu_seqlens.diff()[:, None]  # (N, width)
    rows = valid.flatten().nonzero().squeeze(1)  # packed row r sits at padded row rows[r] (row-major order)

    def pad(t):
        padded = t.new_zeros(n * width, *t.shape[1:]).index_copy(0, rows, t)
        return padded.unflatten(0, (n, width)).transpose(1, 2)  # (N, H, L, D)

    mask = None if causal else valid[:, None, None, :]
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, is_causal=causal)
    return out.transpose(1, 2).flatten(0, 1).index_select(0, rows)


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # older torch: no native varlen entry point
        return None
    return varlen_attn


def _check_half(q: torch.Tensor, backend: str) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16) or not q.is_cuda:
        raise ValueError(f"attn_backend={backend!r} needs CUDA fp16/bf16 inputs, got {q.dtype} on {q.device}")
