"""The DALI pipeline, run in DALI's CPU-only mode (device_id=None): contract, rank sharding, resume, dirt."""

import gzip
import itertools
import json
import os
import shutil
import sys
from collections import Counter

import pytest
import torch
from data_helpers import (
    IMAGE_SIZE,
    dali_cpu_unavailable_reason,
    dirty_shards,
    good_members,
    small_synthetic,
    write_tar,
)

from hqclip_fast.data import ClipTokenizer, DataConfig, TagVocab, build_eval_dataset, build_train_loader
from hqclip_fast.data.cli import main as data_cli
from hqclip_fast.data.dali import write_dali_index

_REASON = dali_cpu_unavailable_reason()
needs_dali = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dali"))
    manifest = small_synthetic(root)
    if _REASON is None:
        assert data_cli(["index", manifest["train"]]) == 0
    return manifest


def _cfg(manifest, **kw):
    base = dict(train_data=manifest["train"], image_size=IMAGE_SIZE, context_length=16, decoder="dali",
                dali_device="cpu", workers=1, shuffle_buffer=32)
    return DataConfig(**{**base, **kw})


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


@needs_dali
def test_index_files_written(indexed):
    first = indexed["train"].replace("{000000..000005}", "000000").replace(".tar", ".idx")
    with open(first) as f:
        header = f.readline().split()
    assert header == ["v1.2", "40"]


@needs_dali
def test_batch_contract_and_images_match_cpu_decode(indexed):
    tok = ClipTokenizer(16)
    vocab = TagVocab.load(indexed["tags"])
    loader = build_train_loader(_cfg(indexed, rrc_scale=[1.0, 1.0], shuffle_buffer=0), batch_size=8,
                                tokenizer=tok, tag_vocab=vocab)
    batch = _take(loader, 1)[0]
    assert batch["images"].shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["images"].dtype == torch.float32
    assert batch["pos_tokens"].shape == batch["neg_tokens"].shape == (8, 16)
    assert batch["tag_ids"].dtype == torch.long and batch["keys"] == [f"train{i:08d}" for i in range(8)]
    # scale (1, 1) and a same-size resize: DALI's decode must agree with the PIL eval decode
    reference = [img for _, img, _ in itertools.islice(iter(build_eval_dataset(indexed["train"],
                                                                                image_size=IMAGE_SIZE)), 8)]
    diff = (batch["images"] - torch.stack(reference)).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.6


@needs_dali
def test_ranks_disjoint(indexed):
    keys = []
    for rank in range(2):
        loader = build_train_loader(_cfg(indexed), batch_size=8, rank=rank, world_size=2,
                                    tokenizer=ClipTokenizer(16))
        keys += [k for b in _take(loader, 15) for k in b["keys"]]  # 120 samples per rank = one epoch
    assert len(keys) == len(set(keys)) == 240


@needs_dali
def test_exact_resume(indexed):
    make = lambda: build_train_loader(_cfg(indexed), batch_size=8, seed=4, tokenizer=ClipTokenizer(16))  # noqa: E731
    full = _take(make(), 9)
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    for a, b in zip(head + _take(resumed, 4), full, strict=True):
        assert a["keys"] == b["keys"]
        for name in ("images", "pos_tokens", "neg_tokens"):
            assert torch.equal(a[name], b[name]), name


def _shard(manifest, i):
    return manifest["train"].replace("{000000..000005}", f"{i:06d}")


def _shard_keys(manifest, i):
    return [f"train{n:08d}" for n in range(40 * i, 40 * (i + 1))]  # 40 samples per shard


@needs_dali
def test_resampled_rounds_draw_shards_per_rank(indexed):
    # world_size 3, 6 shards: each rank reads rounds of 2 shards drawn with replacement from (seed, rank, round)
    rounds = {}
    for rank in range(3):
        loader = build_train_loader(_cfg(indexed, resampled=True, shuffle_buffer=4), batch_size=8, rank=rank,
                                    world_size=3, seed=1, tokenizer=ClipTokenizer(16))
        keys = [k for b in _take(loader, 20) for k in b["keys"]]  # two rounds of 80 samples
        assert loader.epoch == 1
        rounds[rank] = [Counter(keys[:80]), Counter(keys[80:])]
        for r in range(2):
            drawn = loader._round(r)[0]
            assert len(drawn) == 2 and rounds[rank][r] == Counter(k for i in drawn for k in _shard_keys(indexed, i))
    assert rounds[0][0] != rounds[0][1] or rounds[1][0] != rounds[1][1]
    assert len({tuple(sorted(rounds[rank][0])) for rank in range(3)}) > 1  # ranks draw differently


@needs_dali
def test_ranks_shuffle_and_crop_differently(indexed):
    # one shard: every resampled round of every rank reads it; only the per-rank seeds make them differ
    cfg = _cfg(indexed, train_data=_shard(indexed, 0), resampled=True, shuffle_buffer=40, rrc_scale=[0.3, 1.0])
    batches = [_take(build_train_loader(cfg, batch_size=8, rank=rank, world_size=2, tokenizer=ClipTokenizer(16)), 5)
               for rank in range(2)]
    keys = [[k for b in rank_batches for k in b["keys"]] for rank_batches in batches]
    assert sorted(keys[0]) == sorted(keys[1]) == _shard_keys(indexed, 0) and keys[0] != keys[1]
    by_key = [{k: img for b in rank_batches for k, img in zip(b["keys"], b["images"], strict=True)}
              for rank_batches in batches]
    assert sum(not torch.equal(by_key[0][k], by_key[1][k]) for k in keys[0]) > 30


@needs_dali
@pytest.mark.parametrize("stop", [3, 5])  # inside a round, and at its end (a round is 5 batches here)
def test_exact_resume_resampled(indexed, stop):
    cfg = _cfg(indexed, train_data=indexed["train"].replace("{000000..000005}", "{000000..000001}"),
               resampled=True, shuffle_buffer=8)
    make = lambda: build_train_loader(cfg, batch_size=8, rank=1, world_size=2, seed=2,  # noqa: E731
                                      tokenizer=ClipTokenizer(16))
    full = _take(make(), 8)
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for a, b in zip(head + _take(resumed, 8 - stop), full, strict=True):
        assert a["keys"] == b["keys"]
        for name in ("images", "pos_tokens", "neg_tokens"):
            assert torch.equal(a[name], b[name]), name


@needs_dali
def test_bad_records_are_dropped_and_batches_stay_full(tmp_path):
    # good images, every third record broken: dropped by the reader-side record check
    members = []
    for i in range(6):
        jpg, rec = good_members(i)
        members += [jpg, (rec[0], b"{broken" if i % 3 == 0 else rec[1])]
    shard = write_tar(str(tmp_path / "records.tar"), members)
    assert data_cli(["index", shard]) == 0
    cfg = DataConfig(train_data=shard, image_size=IMAGE_SIZE, context_length=16, decoder="dali", dali_device="cpu",
                     shuffle_buffer=0)
    loader = build_train_loader(cfg, batch_size=3, tokenizer=ClipTokenizer(16))
    batches = _take(loader, 2)
    assert all(len(b["keys"]) == 3 and b["images"].shape[0] == 3 for b in batches)
    assert {k for b in batches for k in b["keys"]} == {f"train{i:08d}" for i in (1, 2, 4, 5)}
    assert loader.stats()["reasons"]["invalid_json"] >= 2


@needs_dali
def test_dirty_shards_are_skipped_and_counted(tmp_path):
    # corrupt and truncated JPEGs, missing image / json members, bad records, empty and truncated tars:
    # the index leaves out what DALI cannot read, the reader drops bad records, and every reason is counted
    pattern, expected, num_good = dirty_shards(str(tmp_path))
    assert data_cli(["index", pattern]) == 0
    with open(str(tmp_path / "dirty-0.skipped.json")) as f:
        assert json.load(f)["reasons"] == {"corrupt_image": 2, "missing_image": 1, "missing_json": 1}
    cfg = DataConfig(train_data=pattern, image_size=IMAGE_SIZE, context_length=16, decoder="dali", dali_device="cpu",
                     shuffle_buffer=0)
    loader = build_train_loader(cfg, batch_size=7, tokenizer=ClipTokenizer(16))
    batches = _take(loader, 2)  # one epoch: every good sample once (dirty-3 and dirty-4 share their two keys)
    keys = Counter(k for b in batches for k in b["keys"])
    assert keys == Counter([f"train{i:08d}" for i in range(10)] + ["train00000010", "train00000011"] * 2)
    assert sum(keys.values()) == num_good and all(b["images"].isfinite().all() for b in batches)
    stats = loader.stats()
    assert stats["reasons"] == expected and stats["samples_ok"] == num_good
    assert stats["samples_skipped"] == sum(expected.values()) - expected["empty_tar"] - expected["truncated_tar"]
    # other ranks do not repeat the index counts (the sum over ranks is one pass's count)
    other = build_train_loader(cfg, batch_size=7, rank=1, world_size=2, tokenizer=ClipTokenizer(16))
    assert "corrupt_image" not in other.stats()["reasons"]


def test_index_refuses_compressed_and_counts_unreadable_shards(tmp_path):
    shard = write_tar(str(tmp_path / "a.tar"), good_members(0))
    with open(shard, "rb") as f, open(str(tmp_path / "a.tar.gz"), "wb") as g:
        g.write(gzip.compress(f.read()))
    with pytest.raises(ValueError, match="uncompressed tar only"):
        write_dali_index(str(tmp_path / "a.tar.gz"), str(tmp_path / "a.idx"))
    sidecar = write_dali_index(str(tmp_path / "missing.tar"), str(tmp_path / "missing.idx"))
    assert sidecar["samples_indexed"] == 0 and sidecar["reasons"] == {"unreadable_shard": 1}


@needs_dali
def test_index_without_skip_counts_is_refused(tmp_path, indexed):
    # an index from DALI's own wds2idx lists every sample and counts nothing: the loader asks for ours
    shard = os.path.join(str(tmp_path), "x.tar")
    shutil.copy(indexed["train"].replace("{000000..000005}", "000000"), shard)
    from wds2idx import IndexCreator

    with IndexCreator(shard, shard.replace(".tar", ".idx"), verbose=False) as creator:
        creator.create_index()
    with pytest.raises(FileNotFoundError, match="hqclip-data index"):
        build_train_loader(_cfg(indexed, train_data=shard), batch_size=2, tokenizer=ClipTokenizer(16))


@needs_dali
def test_missing_index_is_a_clear_error(tmp_path, indexed):
    shard = os.path.join(str(tmp_path), "x.tar")
    shutil.copy(indexed["train"].replace("{000000..000005}", "000000"), shard)
    with pytest.raises(FileNotFoundError, match="hqclip-data index"):
        build_train_loader(_cfg(indexed, train_data=shard), batch_size=2, tokenizer=ClipTokenizer(16))


def test_dali_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` raise ImportError
    cfg = DataConfig(train_data=str(tmp_path / "a.tar"), decoder="dali")
    with pytest.raises(ImportError, match="decoder='dali' needs NVIDIA DALI"):
        build_train_loader(cfg, batch_size=2, tokenizer=ClipTokenizer(16))


def test_dali_gpu_without_cuda_is_a_clear_error(indexed):
    if _REASON is not None:
        pytest.skip(_REASON)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the error case cannot happen")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        build_train_loader(_cfg(indexed, dali_device="gpu"), batch_size=2, tokenizer=ClipTokenizer(16))
