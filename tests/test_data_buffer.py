"""The shuffle buffer holds at most its bounds: `shuffle_buffer` samples and `shuffle_buffer_mib` of their bytes."""

import random

import pytest
from data_helpers import IMAGE_SIZE, small_synthetic

from hqclip_fast.data import ClipTokenizer, DataConfig, build_train_loader
from hqclip_fast.data import loader as loader_module
from hqclip_fast.data.loader import sample_bytes, shuffle_buffer


def _items(sizes):
    return [(0, {"__key__": f"k{i}", "jpg": b"x" * n, "json": b"{}"}) for i, n in enumerate(sizes)]


def _run(items, size, max_bytes):
    """Everything the buffer emits, and the most it held (items, bytes) each time it asked for the next item."""
    emitted, peak = [], [0, 0]

    def source():
        for consumed, item in enumerate(items):
            # every earlier item is now either emitted (the consumer has it) or in the buffer
            held = items[:consumed]
            peak[0] = max(peak[0], len(held) - len(emitted))
            peak[1] = max(peak[1], sum(map(sample_bytes, held)) - sum(map(sample_bytes, emitted)))
            yield item

    for item in shuffle_buffer(source(), size, random.Random(0), [], max_bytes):
        emitted.append(item)
    return emitted, peak


@pytest.mark.parametrize("size, max_bytes", [(50, 0), (50, 20_000), (1000, 20_000), (1000, 3_000)])
def test_buffer_never_holds_more_than_its_bounds(size, max_bytes):
    sizes = [random.Random(i).choice([100, 1_000, 2_500, 9_000]) for i in range(600)]  # web images vary
    items = _items(sizes)
    emitted, (peak_items, peak_bytes) = _run(items, size, max_bytes)
    assert sorted(e[1]["__key__"] for e in emitted) == sorted(i[1]["__key__"] for i in items)  # each once
    assert peak_items <= size and (max_bytes == 0 or peak_bytes <= max_bytes)
    assert emitted != items  # shuffled
    if max_bytes and max_bytes < size * 2_500:
        assert peak_bytes > max_bytes // 2  # the byte bound, not the count, is what limited it


def test_item_larger_than_the_byte_bound_passes_through():
    items = _items([100, 100, 50_000, 100])
    emitted, (_, peak_bytes) = _run(items, 10, 1_000)
    assert len(emitted) == 4 and peak_bytes <= 1_000
    assert emitted[0] is items[2]  # emitted at once: the small ones are still in the buffer


def test_loader_bounds_its_buffer_by_config(tmp_path, monkeypatch):
    manifest = small_synthetic(str(tmp_path))
    seen = []
    real = loader_module.shuffle_buffer

    def recording(stream, size, rng, buffer, max_bytes=0):
        seen.append((size, max_bytes))
        return real(stream, size, rng, buffer, max_bytes)

    monkeypatch.setattr(loader_module, "shuffle_buffer", recording)
    cfg = DataConfig(train_data=manifest["train"], image_size=IMAGE_SIZE, context_length=16, workers=0,
                     shuffle_buffer=64, shuffle_buffer_mib=0.5)
    next(iter(build_train_loader(cfg, batch_size=4, tokenizer=ClipTokenizer(16))))
    assert seen == [(64, 2**19)]


def test_negative_byte_bound_is_an_error():
    with pytest.raises(ValueError, match="shuffle_buffer_mib"):
        DataConfig(shuffle_buffer_mib=-1).validate()
