"""State-dict mapping between hqclip-fast's CLIP and open_clip's CLIP.

The towers use open_clip's parameter names, so the mapping is small: open_clip keeps the text tower's
parameters at the top level (``token_embedding``, ``transformer.*``, ...), we keep them under ``text.``;
open_clip's ``logit_scale`` is 0-d (ours may be 1-D after parallelize); the tag head has no open_clip
counterpart. open_clip's ``attn_mask`` buffer (causal mask) is derived, not learned: it is accepted and dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_DERIVED_BUFFERS = ("attn_mask",)  # open_clip's causal-mask buffer (in older checkpoints)
_TAG_PREFIX = "tag_head."


def _ours_to_open_clip(key: str) -> str:
    return key[len("text."):] if key.startswith("text.") else key


def _open_clip_to_ours(key: str) -> str:
    return "text." + key if key.startswith(_TEXT_PREFIXES) else key


def to_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a (full, unsharded) hqclip-fast state dict to open_clip's key names and shapes."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_TAG_PREFIX):
            continue
        if key == "logit_scale":
            value = value.reshape(())
        out[_ours_to_open_clip(key)] = value
    return out


def unwrap_checkpoint(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or open_clip's training checkpoint ({"state_dict": ...}, DDP "module." keys)."""
    sd = checkpoint.get("state_dict", checkpoint)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def resize_image_positional_embedding(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """A ViT's (1 + g*g, width) positional embedding for a grid_size x grid_size grid, as open_clip resizes it
    when it loads weights into a model with another image size: the class token's row kept, the patch rows
    interpolated as an image (bicubic, antialiased, corners not aligned)."""
    old_grid = math.isqrt(pos_embed.shape[0] - 1)
    if old_grid**2 + 1 != pos_embed.shape[0]:
        raise ValueError(f"image positional embedding of {pos_embed.shape[0]} rows is not 1 + a square grid")
    if old_grid == grid_size:
        return pos_embed
    cls, patches = pos_embed[:1], pos_embed[1:]
    patches = patches.float().reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid_size, grid_size), mode="bicubic", antialias=True,
                            align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid_size * grid_size, -1).to(pos_embed.dtype)
    return torch.cat([cls, patches])


def resize_text_positional_embedding(pos_embed: torch.Tensor, context_length: int) -> torch.Tensor:
    """A text tower's (L, width) positional embedding for another context length, as open_clip resizes it:
    linear interpolation along the positions (corners not aligned, no antialiasing)."""
    if pos_embed.shape[0] == context_length:
        return pos_embed
    resized = F.interpolate(pos_embed.float().T[None], size=context_length, mode="linear", antialias=False,
                            align_corners=False)
    return resized[0].T.to(pos_embed.dtype)


def resize_positional_embeddings(state_dict: Mapping, model: nn.Module) -> dict[str, torch.Tensor]:
    """`state_dict` (open_clip's names, or ours) with the ViT image tower's and the text tower's positional
    embeddings resized to `model`'s image size and context length (open_clip's resize_pos_embed and
    resize_text_pos_embed). A ResNet's attention-pool embedding is not resized, as in open_clip."""
    out = dict(state_dict)
    text_key = next((k for k in ("positional_embedding", "text.positional_embedding") if k in out), None)
    if text_key is not None:
        out[text_key] = resize_text_positional_embedding(out[text_key], model.text.positional_embedding.shape[0])
    if "visual.positional_embedding" in out and not model.config.vision_cfg.is_resnet:
        out["visual.positional_embedding"] = resize_image_positional_embedding(
            out["visual.positional_embedding"], model.config.vision_cfg.grid_size)
    return out


def load_open_clip_state_dict(model: nn.Module, state_dict: Mapping, *,
                              resize_positional: bool = False) -> nn.Module:
    """Load open_clip weights into ``model`` strictly: any missing or unexpected key, or a shape mismatch, is a
    ValueError that names them. The tag head (absent from open_clip checkpoints) keeps its values unless the
    state dict carries ``tag_head.*``. resize_positional: first resize the positional embeddings to the model's
    image size and context length (``resize_positional_embeddings``). Returns the model."""
    state_dict = unwrap_checkpoint(state_dict)
    if resize_positional:
        state_dict = resize_positional_embeddings(state_dict, model)
    target = model.state_dict()
    mapped = {}
    unexpected = []
    for key, value in state_dict.items():
        if key.split(".")[-1] in _DERIVED_BUFFERS:
            continue
        ours = _open_clip_to_ours(key)
        if ours not in target:
            unexpected.append(key)
            continue
        mapped[ours] = value
    missing = [_ours_to_open_clip(k) for k in target if k not in mapped and not k.startswith(_TAG_PREFIX)]
    if missing or unexpected:
        raise ValueError(f"open_clip state dict does not match the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    bad_shapes = []
    for key, value in mapped.items():
        want = target[key].shape
        if key == "logit_scale" and value.numel() == 1:
            mapped[key] = value.reshape(want)
        elif value.shape != want:
            bad_shapes.append(f"{_ours_to_open_clip(key)}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
    if bad_shapes:
        raise ValueError("open_clip state dict shapes do not match the model: " + "; ".join(bad_shapes))
    model.load_state_dict(mapped, strict=False)
    return model
