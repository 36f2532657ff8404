"""Open_clip-compatible CLIP towers: ViT or ResNet image tower (plain nn.Modules; parallelism from outside).

    model = create_model("ViT-B-16", num_tags=0, **overrides)   # list_models() for the names
    model.encode_image(images), model.encode_text(tokens)      # unnormalized, like open_clip
    out = model(images, texts, neg_texts=None)                 # normalized features, logit_scale, tag head
    load_open_clip_state_dict(model, open_clip_sd)             # strict; names missing/unexpected keys
    model.open_clip_state_dict()                               # loads into open_clip.create_model(name)

Attention goes through ``attention.attention`` / ``attention.varlen_attention`` (sdpa, flash_attn, xformers).
"""

from .attention import attention, varlen_attention
from .clip import CLIP, create_model
from .configs import CLIPConfig, TextConfig, VisionConfig, get_config, list_models
from .openclip_compat import load_open_clip_state_dict, to_open_clip_state_dict

__all__ = [
    "CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "attention", "create_model", "get_config",
    "list_models", "load_open_clip_state_dict", "to_open_clip_state_dict", "varlen_attention",
]
