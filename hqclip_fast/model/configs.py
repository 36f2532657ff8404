"""Model configs: open_clip's names and JSON layout, parsed into dataclasses.

The entries below carry the same numbers as open_clip's ``model_configs/*.json`` so that a model created here
has exactly the state-dict shapes of ``open_clip.create_model(name)``. The ``hqclip-*`` configs are small
CPU-sized towers for the demo and the tests.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

ATTN_BACKENDS = ("sdpa", "flash_attn", "xformers")
POOL_TYPES = ("tok", "avg")


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    pool_type: str = "tok"  # open_clip's: "tok" (class token) or "avg" (mean of the patch tokens)

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision_cfg: VisionConfig = field(default_factory=VisionConfig)
    text_cfg: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False
    # hqclip-fast runtime options (not part of open_clip's json):
    attn_backend: str = "sdpa"  # "sdpa" | "flash_attn" | "xformers"
    pack_text: bool = False  # encode_text drops padding and runs varlen attention

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> CLIPConfig:
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        v, t = self.vision_cfg, self.text_cfg
        if v.pool_type not in POOL_TYPES:
            raise ValueError(f"vision_cfg.pool_type must be one of {POOL_TYPES}, got {v.pool_type!r}")
        if v.image_size % v.patch_size:
            raise ValueError(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if v.width % v.head_width:
            raise ValueError(f"vision width {v.width} is not a multiple of head_width {v.head_width}")
        if t.width % t.heads:
            raise ValueError(f"text width {t.width} is not a multiple of heads {t.heads}")
        if t.context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {t.context_length}")
        return self


def _vit(embed_dim, image_size, patch_size, width, layers, text_width, text_heads, text_layers,
         head_width=64, quick_gelu=False):
    return {
        "embed_dim": embed_dim,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width,
                       "patch_size": patch_size, "head_width": head_width},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width,
                     "heads": text_heads, "layers": text_layers},
    }


_BASE_CONFIGS: dict[str, dict[str, Any]] = {
    "ViT-S-16": _vit(384, 224, 16, 384, 12, 384, 6, 12),
    "ViT-M-16": _vit(512, 224, 16, 512, 12, 512, 8, 12),
    "ViT-B-32": _vit(512, 224, 32, 768, 12, 512, 8, 12),
    "ViT-B-32-256": _vit(512, 256, 32, 768, 12, 512, 8, 12),
    "ViT-B-16": _vit(512, 224, 16, 768, 12, 512, 8, 12),
    "ViT-B-16-plus-240": _vit(640, 240, 16, 896, 12, 640, 10, 12),
    "ViT-L-14": _vit(768, 224, 14, 1024, 24, 768, 12, 12),
    "ViT-L-14-336": _vit(768, 336, 14, 1024, 24, 768, 12, 12),
    "ViT-H-14": _vit(1024, 224, 14, 1280, 32, 1024, 16, 24, head_width=80),
    # CPU-sized towers for the demo and tests (no open_clip counterpart; the layout is the same).
    "hqclip-tiny": _vit(128, 64, 8, 192, 4, 128, 2, 4),
    "hqclip-micro": _vit(64, 32, 8, 64, 2, 64, 2, 2, head_width=32),
}
# open_clip ships "-quickgelu" twins (OpenAI-trained weights use QuickGELU) for the ViT-B/L/H configs.
_QUICKGELU = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14")
MODEL_CONFIGS: dict[str, dict[str, Any]] = dict(_BASE_CONFIGS)
for _name in _QUICKGELU:
    MODEL_CONFIGS[f"{_name}-quickgelu"] = {**_BASE_CONFIGS[_name], "quick_gelu": True}

# Keyword overrides accepted by create_model(name, **overrides) and the sub-config they land in.
_VISION_KEYS = {"image_size", "patch_size"}
_TEXT_KEYS = {"context_length", "vocab_size"}
_TOP_KEYS = {"embed_dim", "quick_gelu", "attn_backend", "pack_text"}


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


def config_from_dict(cfg: dict[str, Any]) -> CLIPConfig:
    """Build a CLIPConfig from an open_clip-style dict (unknown fields are an error, not ignored)."""
    cfg = copy.deepcopy(cfg)
    vision = cfg.pop("vision_cfg", {})
    text = cfg.pop("text_cfg", {})
    _check_fields(VisionConfig, vision, "vision_cfg")
    _check_fields(TextConfig, text, "text_cfg")
    _check_fields(CLIPConfig, cfg, "model config")
    return CLIPConfig(vision_cfg=VisionConfig(**vision), text_cfg=TextConfig(**text), **cfg).validate()


def get_config(name: str, **overrides: Any) -> CLIPConfig:
    """The config called ``name``; overrides: image_size, patch_size, context_length, vocab_size, embed_dim,
    quick_gelu, attn_backend, pack_text, or vision_cfg={...} / text_cfg={...} dicts for any sub-field."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(list_models())}")
    cfg = copy.deepcopy(MODEL_CONFIGS[name])
    cfg["vision_cfg"].update(overrides.pop("vision_cfg", None) or {})
    cfg["text_cfg"].update(overrides.pop("text_cfg", None) or {})
    for key, value in overrides.items():
        if key in _VISION_KEYS:
            cfg["vision_cfg"][key] = value
        elif key in _TEXT_KEYS:
            cfg["text_cfg"][key] = value
        elif key in _TOP_KEYS:
            cfg[key] = value
        else:
            allowed = sorted(_VISION_KEYS | _TEXT_KEYS | _TOP_KEYS | {"vision_cfg", "text_cfg"})
            raise ValueError(f"unknown model override {key!r}; allowed: {allowed}")
    return config_from_dict(cfg)


def _check_fields(cls, values: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unsupported {where} field(s) {unknown}; supported: {sorted(known)}")
