"""One raw tar sample -> one training sample (image tensor, positive/negative text, tag ids), or a skip reason.

Shared by the CPU loader, `hqclip-data validate` and the eval datasets, so that all see the same dirt rules.
All randomness comes from the `rng` argument (one numpy Generator per sample), which makes resume exact.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch.utils.data import get_worker_info
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
    image: torch.Tensor  # uint8 [3, S, S] RGB pixels; collate_images normalizes a batch of them
    pos_text: str
    neg_text: str | None
    tag_ids: list[int]


def open_image(raw: dict) -> Image.Image:
    """The image member of a raw sample, opened lazily: size, mode and format are known, no pixel is decoded."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise SkipSample("missing_image")
    try:
        return Image.open(io.BytesIO(raw[ext]))
    except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise SkipSample("corrupt_image") from None


def decode_image(raw: dict) -> Image.Image:
    """The whole image, decoded at full size, in RGB."""
    img = open_image(raw)
    try:
        with img:
            img.load()
            return img.convert("RGB")
    except Exception:
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
JPEG_REDUCTIONS = (8, 4, 2)  # the DCT scales libjpeg decodes at directly (1/8, 1/4, 1/2)


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float, (x / 255 - mean) / std. In numpy: tiny torch ops in a busy loader process pay
    for intra-op thread wake-ups, numpy's do not."""
    pixels = (np.asarray(img, dtype=np.float32) - _MEAN_255) * _INV_STD_255
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _normalize_in_place(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(_MEAN_255, device=images.device).view(3, 1, 1)
    inv_std = torch.tensor(_INV_STD_255, device=images.device).view(3, 1, 1)
    return images.sub_(mean).mul_(inv_std)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [..., 3, H, W] -> float32 (x / 255 - mean) / std, on the images' device (the GPU, or the
    loader's collate). In place on one new buffer: out-of-place ops would allocate (and page-fault) two more,
    15x slower on a CPU."""
    return _normalize_in_place(images.to(torch.float32, copy=True))


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch tensor; in a DataLoader worker, in shared memory, where the worker's queue would
    otherwise copy it (the same trick as torch's default_collate)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(shape)


def collate_images(images: list[torch.Tensor], normalize: bool) -> torch.Tensor:
    """Stack uint8 [3, S, S] crops into [B, 3, S, S]: float32 normalized, or uint8 left for the device."""
    batch = _batch_buffer((len(images), *images[0].shape), torch.float32 if normalize else torch.uint8)
    if not normalize:
        return torch.stack(images, out=batch)
    for row, image in zip(batch, images):
        row.copy_(image)
    return _normalize_in_place(batch)


def jpeg_reduction(crop_width: int, crop_height: int, image_size: int) -> int:
    """The largest DCT reduction at which the crop still has at least image_size pixels on each side, so
    that the resize after it only ever shrinks (or keeps) what the full-size path would shrink."""
    return next((r for r in JPEG_REDUCTIONS if min(crop_width, crop_height) >= r * image_size), 1)


def _pixels(img: Image.Image) -> torch.Tensor:
    """uint8 [C, H, W] of a loaded image, C = 1 for grayscale (converted after the resize, where it is cheap
    and exact: RGB from L repeats the channel), else 3: other modes (CMYK, palette, alpha, 16-bit) are
    converted first, exactly as the full-size path does."""
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    with warnings.catch_warnings():  # the array is read-only, and nothing writes to it: resize makes a new one
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(np.asarray(img))
    return pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)  # a channels-last view


@contextlib.contextmanager
def _one_torch_thread():
    """One image is too small a job for intra-op threads: where the loader runs in the training process
    (workers=0), waking them costs several times the resize itself (DataLoader workers have one thread already)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_crop(raw: dict, image_size: int, scale, rng: np.random.Generator) -> torch.Tensor:
    """open_clip's training augmentation (RandomResizedCrop(scale), bicubic with antialiasing) as uint8
    [3, S, S]. The crop box is drawn on the stored image's size exactly as torchvision draws it; a JPEG is
    then decoded at the smallest DCT scale that keeps the crop at least S pixels on each side (decoding and
    shrinking in one step), and the crop is resized by torch's uint8 antialiased bicubic kernel (PIL's filter,
    vectorized). tests/test_data_fast_path.py bounds the difference to the plain path (full decode, RGB,
    PIL resized_crop)."""
    img = open_image(raw)
    width, height = img.size
    top, left, h, w = random_resized_crop_params(width, height, (scale[0], scale[1]), rng)
    try:
        with img:
            reduction = jpeg_reduction(w, h, image_size) if img.format in ("JPEG", "MPO") else 1
            if reduction > 1:  # PIL picks the largest reduction that keeps the size asked for
                img.draft("RGB", (width // reduction, height // reduction))
            img.load()
            pixels = _pixels(img)
    except Exception:
        raise SkipSample("corrupt_image") from None
    fy, fx = pixels.shape[1] / height, pixels.shape[2] / width
    top, left = round(top * fy), round(left * fx)
    h, w = min(round(h * fy), pixels.shape[1] - top), min(round(w * fx), pixels.shape[2] - left)
    with _one_torch_thread():
        crop = F.resized_crop(pixels, top, left, h, w, [image_size, image_size], InterpolationMode.BICUBIC,
                              antialias=True)
    return crop.expand(3, -1, -1) if crop.shape[0] == 1 else crop


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
    image = train_crop(raw, cfg.image_size, cfg.rrc_scale, rng)
    return TrainSample(raw["__key__"], image, pos_text, neg_text, tag_ids)
