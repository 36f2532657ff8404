"""Model configs: open_clip's names and JSON layout, parsed into dataclasses.

The entries below carry the same numbers as open_clip's ``model_configs/*.json`` so that a model created here
has exactly the state-dict shapes of ``open_clip.create_model(name)``. The ``hqclip-*`` configs are small
CPU-sized towers for the demo and the tests.

The image tower follows open_clip's convention: ``vision_cfg.layers`` an int builds a ViT, a list of 4 ints
builds the ResNet ("ModifiedResNet"; ``width`` is then the stem width and ``patch_size`` is unused).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ATTN_BACKENDS = ("sdpa", "flash_attn", "xformers")
POOL_TYPES = ("tok", "avg")


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int | None = None  # ViT only (required there); None for a ResNet, as in open_clip's json
    width: int = 768  # ViT: the token width; ResNet: the stem width (the final feature map has width * 32)
    layers: int | list[int] = 12  # an int: ViT blocks; 4 ints: ResNet bottleneck blocks per stage
    head_width: int = 64
    mlp_ratio: float = 4.0  # ViT only
    pool_type: str = "tok"  # ViT only; open_clip's: "tok" (class token) or "avg" (mean of the patch tokens)
    # ViT only: fraction of patch tokens dropped in training (FLIP, arXiv:2212.00794; open_clip's field); the class
    # token is always kept; nothing is dropped in eval mode.
    patch_dropout: float = 0.0

    @property
    def is_resnet(self) -> bool:
        return not isinstance(self.layers, int)

    @property
    def heads(self) -> int:
        # ResNet: the attention pool runs over the width * 32 features (open_clip computes heads the same way).
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width

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
        if v.is_resnet:
            _validate_resnet(v)
        else:
            _validate_vit(v)
        if t.width % t.heads:
            raise ValueError(f"text width {t.width} is not a multiple of heads {t.heads}")
        if t.context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {t.context_length}")
        return self


def _validate_vit(v: VisionConfig) -> None:
    if not 0.0 <= v.patch_dropout < 1.0:
        raise ValueError(f"vision_cfg.patch_dropout must be in [0, 1), got {v.patch_dropout}")
    if v.pool_type not in POOL_TYPES:
        raise ValueError(f"vision_cfg.pool_type must be one of {POOL_TYPES}, got {v.pool_type!r}")
    if not isinstance(v.patch_size, int) or v.patch_size < 1:
        raise ValueError(f"vision_cfg.patch_size must be a positive int for a ViT, got {v.patch_size!r}")
    if v.image_size % v.patch_size:
        raise ValueError(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
    if v.width % v.head_width:
        raise ValueError(f"vision width {v.width} is not a multiple of head_width {v.head_width}")


def _validate_resnet(v: VisionConfig) -> None:
    layers = v.layers
    if not isinstance(layers, list) or len(layers) != 4 or not all(isinstance(n, int) and n >= 1 for n in layers):
        raise ValueError(f"vision_cfg.layers must be an int (ViT) or a list of 4 positive ints (ResNet), "
                         f"got {layers!r}")
    if v.patch_size is not None:
        raise ValueError(f"vision_cfg.patch_size must be None for a ResNet tower (it has no patches), "
                         f"got {v.patch_size!r}")
    if v.patch_dropout:
        raise ValueError(f"vision_cfg.patch_dropout applies to ViT towers only, got {v.patch_dropout} for a ResNet")
    if v.image_size < 32 or v.image_size % 32:
        raise ValueError(f"vision_cfg.image_size must be a multiple of 32 for a ResNet tower (its stride), "
                         f"got {v.image_size}")
    if v.width < 2 or v.width % 2:
        raise ValueError(f"vision_cfg.width must be even for a ResNet tower (the stem halves it), got {v.width}")
    if v.width * 32 % v.head_width:
        raise ValueError(f"vision_cfg.width * 32 = {v.width * 32} is not a multiple of head_width {v.head_width}")


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


def _resnet(embed_dim, image_size, layers, width, text_width, text_heads, text_layers):
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": list(layers), "width": width, "patch_size": None},
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
    "RN50": _resnet(1024, 224, (3, 4, 6, 3), 64, 512, 8, 12),
    "RN101": _resnet(512, 224, (3, 4, 23, 3), 64, 512, 8, 12),
    "RN50x4": _resnet(640, 288, (4, 6, 10, 6), 80, 640, 10, 12),
    # CPU-sized towers for the demo and tests (no open_clip counterpart; the layout is the same).
    "hqclip-tiny": _vit(128, 64, 8, 192, 4, 128, 2, 4),
    "hqclip-micro": _vit(64, 32, 8, 64, 2, 64, 2, 2, head_width=32),
    # A tiny ResNet learns shapes on the CPU demo much faster than a tiny ViT.
    "hqclip-rn-micro": _resnet(64, 64, (1, 1, 1, 1), 16, 64, 2, 2),
}
# open_clip ships "-quickgelu" twins (OpenAI-trained weights use QuickGELU; in a ResNet CLIP only the text
# tower has GELUs) for these configs.
_QUICKGELU = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "RN50", "RN101", "RN50x4")
MODEL_CONFIGS: dict[str, dict[str, Any]] = dict(_BASE_CONFIGS)
for _name in _QUICKGELU:
    MODEL_CONFIGS[f"{_name}-quickgelu"] = {**_BASE_CONFIGS[_name], "quick_gelu": True}

# Keyword overrides accepted by create_model(name, **overrides) and the sub-config they land in.
_VISION_KEYS = {"image_size", "patch_size", "patch_dropout"}
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
    layers = vision.get("layers")
    if isinstance(layers, Sequence) and not isinstance(layers, str):  # a json/yaml list (or tuple) of stage depths: a ResNet
        vision["layers"] = list(vision["layers"])
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
