"""CPU loader: batch contract, text sampling, tag ids, disjoint sharding, exact resume, sources and weights."""

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from data_helpers import IMAGE_SIZE, NUM_TRAIN, small_synthetic

from hqclip_fast.data import ClipTokenizer, DataConfig, TagVocab, build_train_loader
from hqclip_fast.data.loader import ShardStream, SlotStream
from hqclip_fast.data.samples import choose, random_resized_crop_params
from hqclip_fast.data.sharding import fresh_slot_state
from hqclip_fast.data.shards import expand_sources, iter_tar_samples


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return small_synthetic(str(tmp_path_factory.mktemp("syn")))


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer(context_length=32)


@pytest.fixture(scope="module")
def records(manifest):
    stats = Counter()
    return {raw["__key__"]: json.loads(raw["json"])
            for url in expand_sources(manifest["train"])[0] for raw in iter_tar_samples(url, stats)}


def _cfg(manifest, **kw):
    base = dict(train_data=manifest["train"], image_size=IMAGE_SIZE, context_length=32, workers=0,
                shuffle_buffer=16)
    return DataConfig(**{**base, **kw})


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_batch_contract(manifest, tokenizer, records):
    vocab = TagVocab.load(manifest["tags"])
    loader = build_train_loader(_cfg(manifest), batch_size=8, seed=1, tokenizer=tokenizer, tag_vocab=vocab)
    batch = _take(loader, 1)[0]
    assert batch["images"].shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["images"].dtype == torch.float32
    assert -2.0 < batch["images"].mean() < 2.5 and batch["images"].min() < -1.0  # normalized, not [0, 1]
    for name in ("pos_tokens", "neg_tokens"):
        assert batch[name].shape == (8, 32) and batch[name].dtype == torch.long
    assert batch["tag_ids"].dtype == torch.long and len(batch["keys"]) == 8
    for row, key in enumerate(batch["keys"]):
        record = records[key]
        pos = {tokenizer([t])[0].tolist() == batch["pos_tokens"][row].tolist()
               for t in (record["alt_text"], record["positive_description"])}
        neg = {tokenizer([t])[0].tolist() == batch["neg_tokens"][row].tolist()
               for t in (record["negative_description"], ", ".join(record["negative_tags"]))}
        assert True in pos and True in neg
        ids = batch["tag_ids"][row]
        expected = vocab.encode(record["positive_tags"])
        assert ids[: len(expected)].tolist() == expected and (ids[len(expected):] == -1).all()
    assert loader.stats() == {"samples_ok": 8, "samples_skipped": 0, "reasons": {}}


def test_plain_clip_mode_without_tags(manifest, tokenizer):
    cfg = _cfg(manifest, use_negatives=False, p_description=0.0)
    batch = _take(build_train_loader(cfg, batch_size=4, tokenizer=tokenizer), 1)[0]
    assert "neg_tokens" not in batch and "tag_ids" not in batch


@pytest.mark.parametrize("p", [0.0, 0.3, 0.8, 1.0])
def test_sampling_probability(p):
    record = {"alt_text": "alt", "positive_description": "desc"}
    rng = np.random.default_rng(0)
    picks = Counter(choose(record, "positive_description", "alt_text", p, rng.random()) for _ in range(4000))
    assert abs(picks["desc"] / 4000 - p) < 0.03
    # an absent or empty preferred field falls back to the other one
    assert choose({"alt_text": "alt", "positive_description": " "}, "positive_description", "alt_text", 1.0, 0.0) \
        == "alt"
    assert choose({"negative_tags": ["a", "b"]}, "negative_tags", "negative_description", 0.0, 0.5) == "a, b"


def test_sampling_probability_in_loader(manifest, tokenizer, records):
    loader = build_train_loader(_cfg(manifest, p_description=0.25, p_neg_tags=0.75), batch_size=40,
                                tokenizer=tokenizer)
    pos_desc = neg_tags = total = 0
    for batch in _take(loader, 6):
        for row, key in enumerate(batch["keys"]):
            r = records[key]
            pos_desc += tokenizer([r["positive_description"]])[0].tolist() == batch["pos_tokens"][row].tolist()
            neg_tags += tokenizer([", ".join(r["negative_tags"])])[0].tolist() == batch["neg_tokens"][row].tolist()
            total += 1
    assert abs(pos_desc / total - 0.25) < 0.08 and abs(neg_tags / total - 0.75) < 0.08


def test_random_resized_crop_params_within_scale():
    rng = np.random.default_rng(0)
    for w, h in [(64, 64), (97, 31), (5, 300)]:
        for _ in range(50):
            top, left, ch, cw = random_resized_crop_params(w, h, (0.9, 1.0), rng)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
            if (w, h) == (64, 64):
                assert 0.85 <= ch * cw / (w * h) <= 1.0


@pytest.mark.parametrize("num_shards_used", [6, 2])
def test_slots_disjoint_and_complete(manifest, num_shards_used):
    """World 2 x 2 workers = 4 slots: one epoch of every slot covers each sample exactly once
    (6 shards: shard-level split; 2 shards < 4 slots: sample-level split)."""
    urls = expand_sources(manifest["train"])[0][:num_shards_used]
    seen = []
    for slot in range(4):
        stream = SlotStream(urls, 0, fresh_slot_state(slot, 4, 1), seed=7, resampled=False, stats=Counter())
        seen += [s["__key__"] for epoch, s in itertools.takewhile(lambda x: x[0] == 0, stream)]
    assert len(seen) == len(set(seen)) == num_shards_used * 40


def test_fewer_shards_than_slots_each_slot_opens_one_shard(manifest, monkeypatch):
    """2 shards, 5 slots: each slot opens one shard, extracts only its own samples, and the slots together
    read each sample of the epoch once."""
    from hqclip_fast.data import loader

    opened, extracted = [], []

    def counting(url, stats, offsets=False, **kw):
        opened.append(url)
        for sample in iter_tar_samples(url, stats, offsets, **kw):
            if len(opened) == 1:  # epoch 0 (the second open is epoch 1's)
                extracted.append(sample["__key__"])
            yield sample

    monkeypatch.setattr(loader, "iter_tar_samples", counting)
    urls = expand_sources(manifest["train"])[0][:2]
    keys = []
    for slot in range(5):
        opened.clear()
        stream = SlotStream(urls, 0, fresh_slot_state(slot, 5, 1), seed=7, resampled=False, stats=Counter())
        keys += [s["__key__"] for epoch, s in itertools.takewhile(lambda x: x[0] == 0, stream)]
        assert len(opened) == 2 and opened[0] == opened[1]  # its shard, then epoch 1's first look
    assert sorted(extracted) == sorted(set(extracted))  # no sample extracted by two slots in epoch 0 ...
    assert len(keys) == len(set(keys)) == 80  # ... and every one of the 80 samples read once


def test_shard_smaller_than_its_slot_share_is_a_clear_error(manifest):
    urls = expand_sources(manifest["train"])[0][:1]  # 40 samples shared by 64 slots: slot 50 gets none
    stream = SlotStream(urls, 0, fresh_slot_state(50, 64, 1), seed=0, resampled=False, stats=Counter())
    with pytest.raises(RuntimeError, match=r"slot 50 of 64.*1 shard\(s\).*resampled"):
        next(iter(stream))


@pytest.mark.distributed  # spawns worker processes
def test_ranks_and_workers_disjoint(manifest, tokenizer):
    """Real DataLoader workers on two ranks: the first epoch's keys never repeat across ranks and workers."""
    keys = []
    for rank in range(2):
        loader = build_train_loader(_cfg(manifest, workers=2, shuffle_buffer=0), batch_size=10, rank=rank,
                                    world_size=2, seed=3, tokenizer=tokenizer)
        # 6 shards over 4 slots: slots hold 2, 2, 1, 1 shards; 4 batches per worker stay inside epoch 0
        keys += [k for b in _take(loader, 8) for k in b["keys"]]
    assert len(keys) == 160 and len(set(keys)) == 160


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        assert x.keys() == y.keys()
        for name in ("images", "pos_tokens", "neg_tokens", "tag_ids"):
            if name in x:
                assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.distributed)])  # 2: worker processes
def test_exact_resume(manifest, tokenizer, workers):
    vocab = TagVocab.load(manifest["tags"])
    cfg = _cfg(manifest, workers=workers, shuffle_buffer=32)
    make = lambda: build_train_loader(cfg, batch_size=12, seed=5, tokenizer=tokenizer, tag_vocab=vocab)  # noqa: E731
    uninterrupted = _take(make(), 30)  # 360 samples: crosses the 240-sample epoch boundary
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(17)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    del it
    resumed = make()
    resumed.load_state_dict(state)
    tail = _take(resumed, 13)
    _same_batches(head + tail, uninterrupted)
    assert resumed.batches == 30 and resumed.stats()["samples_ok"] == 360 and resumed.epoch >= 1


def test_resume_state_mismatch_is_an_error(manifest, tokenizer):
    loader = build_train_loader(_cfg(manifest), batch_size=4, tokenizer=tokenizer)
    state = loader.state_dict()
    other = build_train_loader(_cfg(manifest), batch_size=8, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_shuffle_differs_by_seed_and_epoch(manifest, tokenizer):
    cfg = _cfg(manifest, shuffle_buffer=64)
    a = [k for b in _take(build_train_loader(cfg, batch_size=40, seed=0, tokenizer=tokenizer), 12) for k in b["keys"]]
    b = [k for b in _take(build_train_loader(cfg, batch_size=40, seed=1, tokenizer=tokenizer), 6) for k in b["keys"]]
    assert a[:240] != b[:240]
    assert sorted(a[:240]) != a[:240]  # shuffled
    assert a[:240] != a[240:480]        # a new order in epoch 1
    # no repeats before epoch-1 samples can enter the 64-sample buffer (after 240 - 64 outputs)
    assert len(set(a[:176])) == 176


def test_several_sources_with_weights(manifest, tokenizer, tmp_path):
    other = small_synthetic(str(tmp_path / "other"))
    # same keys in both sources: tell them apart by their shard URL through a different seed's texts
    urls = expand_sources(manifest["train"])[0]
    cfg = _cfg(manifest, train_data=f"{urls[0]}::{other['train']}", train_data_weights=[1.0, 3.0],
               shuffle_buffer=0)
    dataset = ShardStream(cfg, 1, 0, tokenizer, None, [])
    assert [len(s) for s in dataset.sources] == [1, NUM_TRAIN // 40]
    batches = _take(build_train_loader(cfg, batch_size=50, tokenizer=tokenizer), 4)
    first_shard = {f"train{i:08d}" for i in range(40)}
    from_first = sum(k in first_shard for b in batches for k in b["keys"])
    # source 0 has weight 1/4; source 1 also holds keys train00000000..39 in 1 of its 6 shards
    assert 0.15 < from_first / 200 < 0.45
    with pytest.raises(ValueError, match="train_data_weights"):
        build_train_loader(_cfg(manifest, train_data_weights=[1.0, 2.0]), batch_size=2, tokenizer=tokenizer)


def test_resampled_mode_runs_and_is_deterministic(manifest, tokenizer):
    cfg = _cfg(manifest, resampled=True)
    a = _take(build_train_loader(cfg, batch_size=16, seed=2, tokenizer=tokenizer), 3)
    b = _take(build_train_loader(cfg, batch_size=16, seed=2, tokenizer=tokenizer), 3)
    _same_batches(a, b)


def test_bad_config_values(manifest, tokenizer):
    for field, value in [("decoder", "gpu"), ("p_description", 1.5), ("image_size", 0), ("rrc_scale", [0.5])]:
        with pytest.raises(ValueError, match=field):
            build_train_loader(_cfg(manifest, **{field: value}), batch_size=2, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="batch_size"):
        build_train_loader(_cfg(manifest), batch_size=0, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="train_data"):
        build_train_loader(_cfg(manifest, train_data=""), batch_size=2, tokenizer=tokenizer)


def test_urls_pipe_file_and_fsspec(manifest, tokenizer):
    fsspec = pytest.importorskip("fsspec", reason="fsspec not installed (remote URLs)")
    shard = expand_sources(manifest["train"])[0][0]
    with fsspec.open("memory://bench/shard.tar", "wb") as f, open(shard, "rb") as src:
        f.write(src.read())
    for url in (f"pipe:cat {shard}", f"file://{shard}", "memory://bench/shard.tar"):
        loader = build_train_loader(_cfg(manifest, train_data=url, shuffle_buffer=0), batch_size=40,
                                    tokenizer=tokenizer)
        keys = _take(loader, 1)[0]["keys"]
        assert sorted(keys) == [f"train{i:08d}" for i in range(40)], url
