"""The CPU loader's fast decode path (train_crop: crop box drawn on the stored size, JPEG DCT-scaled decode, torch
uint8 antialiased bicubic, grayscale expanded after the resize, normalization in the collate or on the device)
against the plain path it replaces (full decode, convert to RGB, PIL resized_crop, float per sample).

Tolerances, in 8-bit levels: without a DCT reduction the two paths differ only by rounding (mean absolute
difference <= 0.05); with one (crops at least twice the output side) by the DCT filter (<= 3, about 1%), the crop's
per-channel mean by <= 1 and its standard deviation by <= 2%.
"""

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from data_helpers import small_synthetic
from PIL import Image
from torchvision.transforms import InterpolationMode

from hqclip_fast.data import DataConfig, build_train_loader, normalize_images
from hqclip_fast.data.samples import (
    SkipSample,
    collate_images,
    decode_image,
    jpeg_reduction,
    random_resized_crop_params,
    to_normalized_tensor,
    train_crop,
)
from hqclip_fast.data.web_like import ASPECTS, KINDS, encode_web_like, web_like_image

SCALE = (0.9, 1.0)


def _plain_crop(raw: dict, size: int, rng: np.random.Generator, shift: int = 0) -> torch.Tensor:
    img = decode_image(raw)
    top, left, h, w = random_resized_crop_params(img.width, img.height, SCALE, rng)
    crop = TF.resized_crop(img, top + shift, left + shift, h, w, [size, size], InterpolationMode.BICUBIC)
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1)


def _raw(kind: str, index: int, long_side: int) -> dict:
    img = web_like_image(np.random.default_rng(index), long_side, ASPECTS[index % len(ASPECTS)])
    ext, data = encode_web_like(img, kind)
    return {ext: data, "__key__": f"{kind}{index}"}


@pytest.mark.parametrize("kind", [k for k, _ in KINDS])
@pytest.mark.parametrize("size", [64, 224])
def test_fast_crop_matches_plain_path(kind, size):
    for index, long_side in enumerate((256, 384, 512)):
        raw = _raw(kind, index, long_side)
        rng_plain, rng_fast = np.random.default_rng(index), np.random.default_rng(index)
        plain = _plain_crop(raw, size, rng_plain).float()
        fast = train_crop(raw, size, SCALE, rng_fast)
        assert fast.dtype == torch.uint8 and fast.shape == (3, size, size)
        assert rng_plain.random() == rng_fast.random()  # the same draws: the same crop-box distribution
        fast = fast.float()
        reduced = kind.startswith("jpeg") and size * 2 <= min(Image.open(io.BytesIO(raw["jpg"])).size)
        assert (plain - fast).abs().mean() <= (3.0 if reduced else 0.05), (kind, long_side)
        assert torch.allclose(plain.mean((1, 2)), fast.mean((1, 2)), atol=1.0)
        assert torch.allclose(plain.std((1, 2)), fast.std((1, 2)), rtol=0.02)


def test_tolerance_would_catch_a_shifted_crop_box():
    """The same box moved by 2 px is far outside the unreduced tolerance: the pixel match checks the box too."""
    raw = _raw("jpeg", 0, 384)
    plain = _plain_crop(raw, 224, np.random.default_rng(0)).float()
    shifted = _plain_crop(raw, 224, np.random.default_rng(0), shift=2).float()
    assert (plain - shifted).abs().mean() > 20 * 0.05


def test_reduction_keeps_at_least_the_output_side():
    assert jpeg_reduction(447, 900, 224) == 1
    assert jpeg_reduction(448, 900, 224) == 2
    assert jpeg_reduction(1800, 1792, 224) == 8
    assert jpeg_reduction(5000, 5000, 224) == 8
    raw = _raw("jpeg", 1, 512)  # aspect 3/2: 512 x 341
    crop = train_crop(raw, 64, SCALE, np.random.default_rng(0))  # reduced 4x: 128 x 86, still >= 64
    assert crop.shape == (3, 64, 64)


@pytest.mark.parametrize("data", [
    b"not an image at all",
    b"\xff\xd8\xff\xe0" + b"\x00" * 50,  # a JPEG signature and nothing decodable
], ids=["garbage", "jpeg-signature-only"])
def test_corrupt_image_is_a_counted_skip(data):
    with pytest.raises(SkipSample) as e:
        train_crop({"jpg": data, "__key__": "k"}, 64, SCALE, np.random.default_rng(0))
    assert e.value.reason == "corrupt_image"


@pytest.mark.parametrize("kind", ["jpeg", "jpeg_cmyk", "png", "webp"])
def test_truncated_image_is_a_counted_skip(kind):
    """Header intact, pixels cut: the size is known, the crop is drawn, the decode (also DCT-scaled) fails."""
    raw = _raw(kind, 2, 512)
    ext = next(iter(k for k in raw if k != "__key__"))
    raw[ext] = raw[ext][: len(raw[ext]) // 2]
    for size in (64, 224):
        with pytest.raises(SkipSample) as e:
            train_crop(raw, size, SCALE, np.random.default_rng(0))
        assert e.value.reason == "corrupt_image"


def test_missing_image_is_a_counted_skip():
    with pytest.raises(SkipSample) as e:
        train_crop({"txt": b"a caption", "__key__": "k"}, 64, SCALE, np.random.default_rng(0))
    assert e.value.reason == "missing_image"


@pytest.mark.parametrize("mode", ["I;16", "1", "LA"])
def test_odd_modes_decode_like_the_plain_path(mode):
    img = web_like_image(np.random.default_rng(3), 300, 4 / 3).convert("L" if mode != "LA" else "LA")
    img = img.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(img, dtype=np.uint16) * 257)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    raw = {"png": buf.getvalue(), "__key__": "k"}
    plain = _plain_crop(raw, 64, np.random.default_rng(0)).float()
    fast = train_crop(raw, 64, SCALE, np.random.default_rng(0)).float()
    assert (plain - fast).abs().mean() <= 0.05


def test_collate_normalizes_like_the_per_sample_float_path():
    crops = [train_crop(_raw("jpeg", i, 300), 64, SCALE, np.random.default_rng(i)) for i in range(3)]
    expected = torch.stack([to_normalized_tensor(Image.fromarray(c.permute(1, 2, 0).numpy())) for c in crops])
    batch = collate_images(crops, normalize=True)
    assert batch.dtype == torch.float32 and batch.shape == (3, 3, 64, 64)
    torch.testing.assert_close(batch, expected, rtol=1e-5, atol=1e-5)
    uint8 = collate_images(crops, normalize=False)
    assert uint8.dtype == torch.uint8
    torch.testing.assert_close(normalize_images(uint8), expected, rtol=1e-5, atol=1e-5)


def test_loader_normalize_on_device_yields_the_same_batches_as_uint8(tmp_path):
    """In the process and in a worker (whose batch is built in shared memory), float32 batches and uint8 ones
    normalized afterwards are the same images."""
    manifest = small_synthetic(str(tmp_path))
    batches = {}
    for workers in (0, 1):
        for on_device in (False, True):
            cfg = DataConfig(train_data=manifest["train"], image_size=32, context_length=32, workers=workers,
                             shuffle_buffer=16, normalize_on_device=on_device, use_tags=False)
            batches[workers, on_device] = next(iter(build_train_loader(cfg, batch_size=8, seed=1)))["images"]
    expected = batches[0, False]
    assert expected.dtype == torch.float32 and expected.shape == (8, 3, 32, 32)
    for workers in (0, 1):
        assert batches[workers, True].dtype == torch.uint8
        torch.testing.assert_close(normalize_images(batches[workers, True]), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batches[1, False], expected, rtol=1e-5, atol=1e-5)


def test_train_step_normalizes_uint8_batches_on_its_device():
    """data.normalize_on_device: the train step sees the same float images as from a float loader."""
    import copy

    from hqclip_fast.loss import HQCLIPLoss
    from hqclip_fast.model import create_model
    from hqclip_fast.train import TrainStep

    torch.manual_seed(0)
    model = create_model("hqclip-micro")
    size, context = model.config.vision_cfg.image_size, model.config.text_cfg.context_length
    pixels = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
    tokens = torch.randint(1, 400, (4, context))
    losses = []
    for images in (pixels, normalize_images(pixels)):
        copy_ = copy.deepcopy(model)
        optimizer = torch.optim.SGD(copy_.parameters(), lr=0.0)
        step = TrainStep(copy_, HQCLIPLoss(), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                         device=torch.device("cpu"), grad_clip=0.0, bf16_autocast=False, use_negatives=False,
                         use_tags=False)
        losses.append(step({"images": images, "pos_tokens": tokens})["loss"])
    torch.testing.assert_close(losses[0], losses[1])
