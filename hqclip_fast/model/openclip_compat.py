"""State-dict mapping between hqclip-fast's CLIP and open_clip's CLIP.

The towers use open_clip's parameter names, so the mapping is small: open_clip keeps the text tower's
parameters at the top level (``token_embedding``, ``transformer.*``, ...), we keep them under ``text.``;
open_clip's ``logit_scale`` is 0-d (ours may be 1-D after parallelize); the tag head has no open_clip
counterpart. open_clip's ``attn_mask`` buffer (causal mask) is derived, not learned: it is accepted and dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
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


def load_open_clip_state_dict(model: nn.Module, state_dict: Mapping) -> nn.Module:
    """Load open_clip weights into ``model`` strictly: any missing or unexpected key, or a shape mismatch, is a
    ValueError that names them. The tag head (absent from open_clip checkpoints) keeps its values unless the
    state dict carries ``tag_head.*``. Returns the model."""
    state_dict = unwrap_checkpoint(state_dict)
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
