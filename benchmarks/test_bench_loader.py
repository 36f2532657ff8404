"""Training loaders on web-like shards: open_clip's pipeline (open_clip_train.data.get_wds_dataset, its transform
and tokenizer) against hqclip-fast's CPU loader with the same crop scale, size and normalization (float32
batches, and uint8 batches for normalization on the device), and the per-image decode + augment (train) and
preprocessing (eval) functions of both. The same functions as `python benchmarks/bench_loader.py --compare`,
which runs them interleaved in one process and writes the committed result; here each runs on its own."""

import os
import tempfile

import pytest
import torch
from bench_loader import (
    WarmIterator,
    hqclip_loader,
    open_clip_loader,
    per_sample_functions,
    raw_samples,
    web_like_pattern,
)

from hqclip_fast.data.web_like import write_web_like_shards

LOADERS = {
    "open_clip": lambda pattern, size, batch, workers: open_clip_loader(pattern, size, batch, workers),
    "hqclip": lambda pattern, size, batch, workers: hqclip_loader(pattern, size, batch, workers),
    "hqclip_uint8": lambda pattern, size, batch, workers: hqclip_loader(pattern, size, batch, workers, True),
}
# full: 800 samples, 224 px crops, batches of 32, 6 timed per round; smoke: 16 tiny images, one batch of 4
FULL, SMOKE = (224, 32, 6), (32, 4, 1)


@pytest.fixture(scope="module")
def shards(smoke, tmp_path_factory) -> str:
    """The benchmark's web-like shards (cached across runs), or two tiny shards for a smoke run."""
    if smoke:
        out = tmp_path_factory.mktemp("web_like")
        return write_web_like_shards(str(out), 16, shard_size=8, max_side=64, min_side=40)
    return web_like_pattern(os.path.join(tempfile.gettempdir(), "hqclip_bench_loader"), 800)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("name", list(LOADERS))
def test_loader(benchmark, shards, smoke, name, workers):
    pattern = shards
    size, batch, batches = SMOKE if smoke else FULL
    benchmark.group = f"loader, {workers} worker(s), batch {batch}, {size} px"
    benchmark.extra_info.update(images_per_round=batch * batches, workers=workers)
    warm = []

    def setup():
        warm.append(WarmIterator(LOADERS[name](pattern, size, batch, workers), warmup=2 * workers))
        return (warm[-1], batches), {}

    benchmark.pedantic(WarmIterator.pull, setup=setup, teardown=lambda w, _: w.close(), rounds=1 if smoke else 3)
    warm[-1].close()  # a disabled benchmark runs no teardown


@pytest.fixture
def one_thread():
    """As in a DataLoader worker (and bench_loader --compare): torch ops on one image are too small for threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["open_clip_train", "hqclip_train_float", "hqclip_train_uint8",
                                  "open_clip_eval", "hqclip_eval"])
def test_per_image(benchmark, shards, smoke, one_thread, name):
    size = (SMOKE if smoke else FULL)[0]
    samples = raw_samples(shards, 16 if smoke else 100)
    kind = "eval" if name.endswith("eval") else "train"
    function = per_sample_functions(size, kind)[name]
    benchmark.group = f"per image {kind}, {len(samples)} images, {size} px"

    def run():
        for raw in samples:
            function(raw)

    benchmark.pedantic(run, rounds=1 if smoke else 3, iterations=1)
