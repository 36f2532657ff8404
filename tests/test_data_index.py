"""`hqclip-data index`: the per-image screen keeps DALI crash-free with as little work as that takes, and the
shards are indexed in parallel processes with the same result as one."""

import io
import json
import os
import random

import numpy as np
import pytest
from data_helpers import dali_cpu_unavailable_reason, dirty_shards
from PIL import Image

from hqclip_fast.data.cli import main as data_cli
from hqclip_fast.data.dali import screen_image
from hqclip_fast.data.samples import SkipSample

_REASON = dali_cpu_unavailable_reason()
needs_dali = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

_IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 320, 3), dtype=np.uint8))


def _encode(fmt, **kw):
    out = io.BytesIO()
    _IMAGE.save(out, fmt, **kw)
    return out.getvalue()


JPEG, PROGRESSIVE, PNG = _encode("JPEG", quality=90), _encode("JPEG", quality=90, progressive=True), _encode("PNG")


def _flip(data, at, n):
    return data[:at] + bytes(255 - b for b in data[at:at + n]) + data[at + n:]


CASES = {  # name: (bytes, screen verdict: None = kept, else the reason)
    "jpeg": (JPEG, None),
    "progressive": (PROGRESSIVE, None),
    "png": (PNG, None),
    "entropy_bytes_flipped": (_flip(JPEG, len(JPEG) // 2, 64), None),  # libjpeg warns and goes on
    "junk_after_eoi": (JPEG + b"trailing junk", None),
    "zero_padded": (JPEG + bytes(300), None),
    "garbage": (b"<html>404 not found</html>", "corrupt_image"),
    "empty": (b"", "corrupt_image"),
    "gif": (_encode("GIF"), "unsupported_image"),
    "jpeg_cut_at_90%": (JPEG[: len(JPEG) * 9 // 10], "corrupt_image"),
    "jpeg_cut_at_50%": (JPEG[: len(JPEG) // 2], "corrupt_image"),
    "jpeg_cut_after_header": (JPEG[: JPEG.find(b"\xff\xda") + 20], "corrupt_image"),
    "jpeg_cut_before_scan": (JPEG[: JPEG.find(b"\xff\xda") - 10], "corrupt_image"),
    "progressive_cut_at_50%": (PROGRESSIVE[: len(PROGRESSIVE) // 2], "corrupt_image"),
    "png_cut_at_50%": (PNG[: len(PNG) // 2], "corrupt_image"),
    "png_bytes_flipped": (_flip(PNG, len(PNG) // 2, 64), "corrupt_image"),
}


def _verdict(data):
    try:
        screen_image(data)
    except SkipSample as e:
        return e.reason
    return None


def dali_raises(data: bytes, crops: int = 4) -> bool:
    """Whether DALI's CPU decoder (the training path's random-crop decode) raises on `data`."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=crops, num_threads=1, device_id=None, seed=7)
    def decode():
        encoded = fn.external_source(source=lambda: [np.frombuffer(data, dtype=np.uint8)] * crops, batch=True)
        return fn.decoders.image_random_crop(encoded, device="cpu", output_type=types.RGB,
                                             random_area=[0.3, 1.0])

    try:
        pipe = decode()
        pipe.build()
        pipe.run()
    except RuntimeError:  # DALI's "Critical error in pipeline"
        return True
    return False


@pytest.mark.parametrize("name", list(CASES))
def test_screen_verdicts(name):
    data, expected = CASES[name]
    assert _verdict(data) == expected


@needs_dali
@pytest.mark.parametrize("name", [n for n, (_, verdict) in CASES.items() if verdict is None])
def test_what_the_screen_keeps_dali_decodes(name):
    assert not dali_raises(CASES[name][0])


@needs_dali
def test_dali_raises_on_what_the_screen_drops_for_truncation():
    # the screen's work is needed: DALI's decoder raises on these (a crop that stops before the cut may not)
    for name in ("garbage", "jpeg_cut_at_50%", "jpeg_cut_after_header", "progressive_cut_at_50%", "png_cut_at_50%"):
        assert dali_raises(CASES[name][0]), name


@needs_dali
def test_header_byte_flips_never_reach_dali():
    # One flipped byte in a JPEG's header segments: some still parse as a header yet make DALI raise (so a
    # header check would not do); whatever the screen keeps, DALI decodes.
    scan = JPEG.find(b"\xff\xda")
    rng = random.Random(0)
    header_ok_but_dali_raises = 0
    for _ in range(24):
        at = rng.randrange(2, scan + 12)
        data = JPEG[:at] + bytes([rng.randrange(256)]) + JPEG[at + 1:]
        raises = dali_raises(data)
        assert not (raises and _verdict(data) is None)
        try:
            Image.open(io.BytesIO(data)).close()
            header_ok_but_dali_raises += raises
        except Exception:
            pass
    assert header_ok_but_dali_raises >= 1


def test_jpeg_is_decoded_at_one_eighth_scale_and_garbage_not_at_all(monkeypatch):
    sizes = []
    real = Image.Image.load

    def recording(self):
        sizes.append(self.size)
        return real(self)

    monkeypatch.setattr(Image.Image, "load", recording)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", recording)
    screen_image(JPEG)
    assert sizes and set(sizes) == {(40, 32)}  # 320 x 256 / 8
    sizes.clear()
    with pytest.raises(SkipSample):
        screen_image(b"\x89PNG garbage")
    assert sizes == []


def test_parallel_index_equals_serial(tmp_path):
    pattern, _, _ = dirty_shards(str(tmp_path / "shards"))
    outputs = {}
    for jobs in (1, 2):
        out = tmp_path / f"index-{jobs}"
        assert data_cli(["index", pattern, "--out-dir", str(out), "--jobs", str(jobs), "--no-progress"]) == 0
        outputs[jobs] = {p: (out / p).read_bytes() for p in sorted(os.listdir(out))}
    assert outputs[1] == outputs[2] and len(outputs[1]) == 10  # an .idx and a .skipped.json per shard
    sidecar = json.loads(outputs[2]["dirty-0.skipped.json"])
    assert sidecar["reasons"] == {"corrupt_image": 2, "missing_image": 1, "missing_json": 1}
    header = outputs[2]["dirty-0.idx"].split(b"\n", 1)[0].split()
    assert header[0] == b"v1.2" and int(header[1]) == sidecar["samples_indexed"] == 16
