"""One raw tar sample -> one training sample (image tensor, positive/negative text, tag ids), or a skip reason.

Shared by the CPU loader, `hqclip-data validate` and the eval datasets, so that all see the same dirt rules.
All randomness comes from the `rng` argument (one numpy Generator per sample), which makes resume exact.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .config import OPENAI_MEAN, OPENAI_STD, DataConfig
from .records import RecordError, check_record, parse_record
from .tags import TagVocab

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class SkipSample(Exception):
    """The sample is unusable; `reason` is the name it is counted under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class TrainSample:
    key: str
    image: torch.Tensor  # float [3, S, S], normalized
    pos_text: str
    neg_text: str | None
    tag_ids: list[int]


def decode_image(raw: dict) -> Image.Image:
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise SkipSample("missing_image")
    try:
        with Image.open(io.BytesIO(raw[ext])) as img:
            img.load()
            return img.convert("RGB")
    except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise SkipSample("corrupt_image") from None


def random_resized_crop_params(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator,
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng` instead of torch's global RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


_MEAN_255 = np.array(OPENAI_MEAN, dtype=np.float32) * 255
_INV_STD_255 = 1.0 / (np.array(OPENAI_STD, dtype=np.float32) * 255)


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float, (x / 255 - mean) / std. In numpy: tiny torch ops in a busy loader process pay
    for intra-op thread wake-ups, numpy's do not."""
    pixels = (np.asarray(img, dtype=np.float32) - _MEAN_255) * _INV_STD_255
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def train_transform(img: Image.Image, image_size: int, scale, rng: np.random.Generator) -> torch.Tensor:
    """open_clip's training augmentation: RandomResizedCrop(scale), bicubic, OpenAI mean/std."""
    top, left, h, w = random_resized_crop_params(img.width, img.height, (scale[0], scale[1]), rng)
    img = TF.resized_crop(img, top, left, h, w, [image_size, image_size], InterpolationMode.BICUBIC)
    return to_normalized_tensor(img)


def eval_transform(img: Image.Image, image_size: int) -> torch.Tensor:
    """open_clip's eval preprocessing: resize the short side (bicubic), center crop, OpenAI mean/std."""
    img = TF.resize(img, image_size, InterpolationMode.BICUBIC)
    return to_normalized_tensor(TF.center_crop(img, [image_size, image_size]))


def read_record(raw: dict, required: tuple[str, ...]) -> dict:
    """The annotation record of a raw sample: its .json member, with the alt text of a .txt member if any."""
    if "json" in raw:
        try:
            record = parse_record(raw["json"])
        except RecordError as e:
            raise SkipSample(e.reason) from None
    else:
        record = {}
    if "txt" in raw and not record.get("alt_text"):
        try:
            record["alt_text"] = raw["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise SkipSample("invalid_utf8") from None
    if "json" not in raw and any(f not in record for f in required):
        raise SkipSample("missing_json")
    try:
        check_record(record, required)
    except RecordError as e:
        raise SkipSample(e.reason) from None
    return record


def _text(value) -> str:
    if isinstance(value, list):
        return ", ".join(t.strip() for t in value if t.strip())
    return value.strip() if isinstance(value, str) else ""


def choose(record: dict, first: str, second: str, p_first: float, u: float) -> str:
    """`first` field with probability p_first (u ~ U[0,1)), else `second`; an empty pick falls back."""
    a, b = (_text(record.get(first)), _text(record.get(second)))
    preferred, other = (a, b) if u < p_first else (b, a)
    return preferred or other


def decode_train_sample(raw: dict, cfg: DataConfig, rng: np.random.Generator,
                        tag_vocab: TagVocab | None) -> TrainSample:
    """Raises SkipSample(reason) for anything unusable."""
    record = read_record(raw, tuple(cfg.required_fields))
    u_pos, u_neg = rng.random(), rng.random()
    pos_text = choose(record, "positive_description", "alt_text", cfg.p_description, u_pos)
    if not pos_text:
        raise SkipSample("missing_json" if "json" not in raw else "empty_text")
    neg_text = None
    if cfg.use_negatives:
        neg_text = choose(record, "negative_tags", "negative_description", cfg.p_neg_tags, u_neg)
        if not neg_text:
            raise SkipSample("missing_json" if "json" not in raw else "empty_text")
    tag_ids: list[int] = []
    if tag_vocab is not None and cfg.use_tags:
        tag_ids = tag_vocab.encode(record.get("positive_tags") or [])[: cfg.max_tags]
    image = train_transform(decode_image(raw), cfg.image_size, cfg.rrc_scale, rng)
    return TrainSample(raw["__key__"], image, pos_text, neg_text, tag_ids)
