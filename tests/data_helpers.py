"""Shared helpers for tests/test_data_*.py: small synthetic data sets and hand-made dirty shards."""

from __future__ import annotations

import io
import json
import os
import tarfile

from hqclip_fast.data.synthetic import add_tar_member, make_train_record, write_synthetic

NUM_TRAIN, SHARD_SIZE, IMAGE_SIZE = 240, 40, 32


def dali_cpu_unavailable_reason() -> str | None:
    """Why DALI's CPU-only mode cannot run here (not installed, or its backend fails), or None when it can."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def
    except ImportError:
        return "NVIDIA DALI (nvidia-dali-cuda130) is not installed"

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def probe():
        return fn.random.uniform(range=[0, 1])

    try:
        pipe = probe()
        pipe.build()
        pipe.run()
    except Exception as e:  # DALI raises RuntimeError with backend messages
        return f"DALI cannot run CPU-only on this machine: {e}"
    return None


def small_synthetic(root: str) -> dict:
    """240 training samples in 6 shards of 32x32 images (cached per directory)."""
    manifest_path = os.path.join(root, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            return json.load(f)
    return write_synthetic(root, NUM_TRAIN, SHARD_SIZE, seed=3, image_size=IMAGE_SIZE, num_zeroshot=48,
                           num_hardneg=20)


def write_tar(path: str, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add_tar_member(tar, name, data)
    return path


def good_members(index: int) -> list[tuple[str, bytes]]:
    jpg, record = make_train_record(index, seed=11, image_size=IMAGE_SIZE)
    return [(f"{record['key']}.jpg", jpg), (f"{record['key']}.json", json.dumps(record).encode())]


def dirty_shards(root: str) -> tuple[str, dict, int]:
    """Shards holding every dirt case; returns (pattern, expected reason counts, number of good samples)."""
    os.makedirs(root, exist_ok=True)
    good = [good_members(i) for i in range(12)]
    jpg0, rec0 = make_train_record(100, seed=11, image_size=IMAGE_SIZE)

    def rec(**changes) -> bytes:
        return json.dumps({**rec0, **changes}).encode()

    dirty = [
        [("bad1.jpg", b"not a jpeg at all"), ("bad1.json", rec())],                      # corrupt_image
        [("bad2.jpg", jpg0[: len(jpg0) // 2]), ("bad2.json", rec())],                    # corrupt_image (truncated)
        [("bad3.json", rec())],                                                         # missing_image
        [("bad4.jpg", jpg0)],                                                           # missing_json
        [("bad5.jpg", jpg0), ("bad5.json", b'{"alt_text": "x", ')],                     # invalid_json
        [("bad6.jpg", jpg0), ("bad6.json", b'{"alt_text": "\xff\xfe"}')],               # invalid_utf8
        [("bad7.jpg", jpg0), ("bad7.json", rec(positive_tags="red"))],                  # wrong_type
        [("bad8.jpg", jpg0), ("bad8.json", rec(alt_text=5))],                           # wrong_type
        [("bad9.jpg", jpg0), ("bad9.json", rec(alt_text=" ", positive_description=""))],  # empty_text
        [("bad10.jpg", jpg0), ("bad10.json", b"[1, 2]")],                               # not_an_object
    ]
    # shard 0: good and dirty samples interleaved
    members = []
    for g, d in zip(good[:10], dirty):
        members += g + d
    write_tar(os.path.join(root, "dirty-0.tar"), members)
    # shard 1: empty file; shard 2: zero-length tar archive body (only end blocks)
    open(os.path.join(root, "dirty-1.tar"), "wb").close()
    write_tar(os.path.join(root, "dirty-2.tar"), [])
    # shard 3: cut inside the data of the third sample's json: the first two samples survive
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in good[10] + good[11] + good_members(50):
            add_tar_member(tar, name, data)
    data = full.getvalue()
    cut = data.rfind(b"train00000050.json") + 512 + 20  # into the json's data block
    with open(os.path.join(root, "dirty-3.tar"), "wb") as f:
        f.write(data[:cut])
    # shard 4: cut inside the header of the third sample: the first two samples survive
    cut = data.find(b"train00000050.jpg") + 100
    with open(os.path.join(root, "dirty-4.tar"), "wb") as f:
        f.write(data[:cut])
    expected = {"corrupt_image": 2, "missing_image": 1, "missing_json": 1, "invalid_json": 1, "invalid_utf8": 1,
                "wrong_type": 2, "empty_text": 1, "not_an_object": 1, "empty_tar": 2, "truncated_sample": 1,
                "truncated_tar": 2}
    return os.path.join(root, "dirty-{0..4}.tar"), expected, 14
