"""The CLIP model: image tower, text tower, learnable temperature and the optional short-tag head."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import check_backend
from .configs import CLIPConfig, get_config
from .openclip_compat import to_open_clip_state_dict
from .resnet import ModifiedResNet
from .text import TextTransformer
from .vision import VisionTransformer


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig, num_tags: int = 0, tag_bias_prior: bool = True):
        super().__init__()
        config.validate()
        check_backend(config.attn_backend)
        if num_tags < 0:
            raise ValueError(f"num_tags must be >= 0, got {num_tags}")
        self.config = config
        self.num_tags = num_tags
        kw = dict(quick_gelu=config.quick_gelu, backend=config.attn_backend)
        if config.vision_cfg.is_resnet:  # no GELU in a ResNet: quick_gelu concerns the text tower only
            self.visual = ModifiedResNet(config.vision_cfg, config.embed_dim, backend=config.attn_backend)
        else:
            self.visual = VisionTransformer(config.vision_cfg, config.embed_dim, **kw)
        self.text = TextTransformer(config.text_cfg, config.embed_dim, **kw)
        # Log of the inverse temperature, 0-d like open_clip's (parallelize_model makes it 1-D for FSDP2).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Short-tag classification: multi-label linear head on the normalized image embedding.
        self.tag_head = nn.Linear(config.embed_dim, num_tags) if num_tags > 0 else None
        if self.tag_head is not None and tag_bias_prior:
            # Each tag starts at probability 1/(V+1): the V absent tags of an image then cost about 1 in a loss
            # summed over the vocabulary, not V * log 2 (RetinaNet's prior init).
            nn.init.constant_(self.tag_head.bias, -math.log(num_tags))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor, *, packed: bool | None = None) -> torch.Tensor:
        """packed=None uses config.pack_text."""
        return self.text(tokens, packed=self.config.pack_text if packed is None else packed)

    def forward(self, images: torch.Tensor, texts: torch.Tensor,
                neg_texts: torch.Tensor | None = None) -> dict[str, Any]:
        image_features = F.normalize(self.encode_image(images), dim=-1)
        if neg_texts is None:
            text_features, neg_text_features = F.normalize(self.encode_text(texts), dim=-1), None
        else:
            if neg_texts.shape[1] != texts.shape[1]:
                raise ValueError(f"neg_texts length {neg_texts.shape[1]} != texts length {texts.shape[1]}")
            # One pass over positives and negatives: one set of kernels, and packing sees all of them.
            both = self.encode_text(torch.cat([texts, neg_texts]))
            text_features, neg_text_features = (
                F.normalize(part, dim=-1) for part in both.split([texts.shape[0], neg_texts.shape[0]]))
        out = {
            "image_features": image_features,
            "text_features": text_features,
            "neg_text_features": neg_text_features,
            "logit_scale": torch.exp(self.logit_scale.reshape(())),  # 0-d even when the parameter is 1-D
        }
        if self.tag_head is not None:
            out["tag_features"] = image_features
            # Copies made inside forward (gradients still reach the parameters): a wrapper such as FSDP2 may
            # free its gathered parameters once forward returns, before the loss reads them.
            out["tag_weight"] = self.tag_head.weight.clone()
            out["tag_bias"] = self.tag_head.bias.clone()
        return out

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """open_clip's lock_image_tower (LiT): the image tower frozen but its last `unlocked_groups` groups;
        freeze_bn_stats freezes a ResNet's BatchNorm statistics (a ViT has none)."""
        if isinstance(self.visual, ModifiedResNet):
            self.visual.lock(unlocked_groups, freeze_bn_stats)
        else:
            self.visual.lock(unlocked_groups)

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """open_clip's lock_text_tower: the text tower frozen but its last `unlocked_layers` groups."""
        self.text.lock(unlocked_layers)

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under open_clip's key names (tag head dropped, 0-d logit_scale).

        On a model sharded by FSDP2, gather a full state dict first (see hqclip_fast.parallelize)."""
        return to_open_clip_state_dict(self.state_dict())


def create_model(name: str, num_tags: int = 0, tag_bias_prior: bool = True, **overrides: Any) -> CLIP:
    """A freshly initialized model for an open_clip config name (or an hqclip-* CPU config).

    overrides: image_size, patch_size, context_length, vocab_size, embed_dim, quick_gelu, attn_backend,
    pack_text, or vision_cfg={...} / text_cfg={...} for any sub-field. tag_bias_prior: the tag head's bias starts
    at -log(num_tags) (else nn.Linear's init)."""
    return CLIP(get_config(name, **overrides), num_tags=num_tags, tag_bias_prior=tag_bias_prior)
