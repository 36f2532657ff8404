"""Open_clip-compatible CLIP towers (plain nn.Modules; parallelism is applied from outside)."""

from .attention import attention, varlen_attention
from .clip import CLIP, create_model
from .configs import CLIPConfig, TextConfig, VisionConfig, get_config, list_models
from .openclip_compat import load_open_clip_state_dict, to_open_clip_state_dict

__all__ = [
    "CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "attention", "create_model", "get_config",
    "list_models", "load_open_clip_state_dict", "to_open_clip_state_dict", "varlen_attention",
]
