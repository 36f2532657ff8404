"""Shards that look like DFN/DataComp web shards to a decoder, for loader benchmarks and tests.

img2dataset (`resize_mode=keep_ratio_largest`, `image_size=512`) stores images whose long side is at most 512 px;
about half are exactly 512, the rest smaller. Most are baseline JPEGs at quality ~90; a few are PNG or WebP, and
the web's odd ones are kept: grayscale and CMYK JPEGs, palette and RGBA PNGs, JPEGs with an EXIF orientation tag.
Each sample has a `.txt` caption and an img2dataset-style `.json`. The content is smooth colour fields plus fine
noise, so that the compressed sizes (tens of KB at 512 px) and hence decode costs are those of photographs
rather than of flat synthetic scenes. A pure function of the seed.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from .synthetic import add_tar_member

ASPECTS = (4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3)
# (kind, probability): the mix of formats and modes.
KINDS = (
    ("jpeg", 0.78), ("jpeg_exif_rotated", 0.04), ("jpeg_gray", 0.04), ("jpeg_cmyk", 0.02),
    ("png", 0.04), ("png_rgba", 0.01), ("png_palette", 0.01), ("webp", 0.06),
)


def web_like_image(rng: np.random.Generator, long_side: int, aspect: float) -> Image.Image:
    """A photograph-like RGB image: a smooth random colour field, a few soft blobs, fine sensor-like noise."""
    w, h = (long_side, max(16, round(long_side / aspect))) if aspect >= 1 else (max(16, round(long_side * aspect)), long_side)
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8))
    field = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * long_side
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        field = field * (1 - blob) + rng.uniform(0, 255, size=3) * blob
    field += rng.normal(0, 6, size=field.shape)
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))


def encode_web_like(img: Image.Image, kind: str) -> tuple[str, bytes]:
    """(extension, bytes) of `img` stored as `kind` (one of KINDS)."""
    buf = io.BytesIO()
    if kind == "jpeg":
        img.save(buf, "JPEG", quality=90)
    elif kind == "jpeg_exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 CW to display; decoders that ignore EXIF see it sideways
        img.save(buf, "JPEG", quality=90, exif=exif)
    elif kind == "jpeg_gray":
        img.convert("L").save(buf, "JPEG", quality=90)
    elif kind == "jpeg_cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=90)
    elif kind == "png":
        img.save(buf, "PNG")
    elif kind == "png_rgba":
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(img.size))
        rgba.save(buf, "PNG")
    elif kind == "png_palette":
        img.convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "PNG")
    elif kind == "webp":
        img.save(buf, "WEBP", quality=90)
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {[k for k, _ in KINDS]}")
    return ("png" if kind.startswith("png") else "webp" if kind == "webp" else "jpg"), buf.getvalue()


def write_web_like_shards(out_dir: str, num_samples: int, shard_size: int = 100, seed: int = 0,
                          max_side: int = 512, min_side: int = 256) -> str:
    """Write shards under `out_dir`; return their brace pattern. Half the images have the long side `max_side`,
    the rest uniform in [min_side, max_side)."""
    if num_samples <= 0 or shard_size <= 0 or not 16 <= min_side <= max_side:
        raise ValueError(f"need num_samples, shard_size > 0 and 16 <= min_side <= max_side; got {num_samples}, "
                         f"{shard_size}, {min_side}, {max_side}")
    os.makedirs(out_dir, exist_ok=True)
    kinds, probs = zip(*KINDS)
    num_shards = -(-num_samples // shard_size)
    for s in range(num_shards):
        with tarfile.open(os.path.join(out_dir, f"web-{s:06d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * shard_size, min(num_samples, (s + 1) * shard_size)):
                rng = np.random.default_rng([seed, i])
                long_side = max_side if rng.random() < 0.5 else int(rng.integers(min_side, max_side))
                kind = str(rng.choice(kinds, p=probs))
                ext, data = encode_web_like(web_like_image(rng, long_side, float(rng.choice(ASPECTS))), kind)
                key = f"{s:06d}{i % shard_size:04d}"
                caption = f"a photo number {i} of a scene, {kind.replace('_', ' ')}"
                add_tar_member(tar, f"{key}.{ext}", data)
                add_tar_member(tar, f"{key}.txt", caption.encode())
                add_tar_member(tar, f"{key}.json", json.dumps({"key": key, "caption": caption, "kind": kind}).encode())
    return os.path.join(out_dir, f"web-{{000000..{num_shards - 1:06d}}}.tar")
