"""Dirty shards: every case is skipped and counted by reason, never a crash, and no good sample is lost."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from data_helpers import IMAGE_SIZE, dirty_shards, good_members, write_tar

from hqclip_fast.data import ClipTokenizer, DataConfig, build_eval_dataset, build_train_loader
from hqclip_fast.data.shards import expand_sources
from hqclip_fast.data.validate import validate_shards


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    return dirty_shards(str(tmp_path_factory.mktemp("dirty")))


def test_validate_counts_every_reason(dirty):
    pattern, expected, num_good = dirty
    result = validate_shards(pattern, progress=False)
    assert result["reasons"] == expected
    assert result["samples_ok"] == num_good
    assert result["samples_skipped"] == 11  # sample-level reasons; empty/truncated tars are shard-level


def test_missing_shard_is_counted(tmp_path, dirty):
    pattern, _, _ = dirty
    result = validate_shards(f"{pattern}::{tmp_path}/does-not-exist.tar", progress=False)
    assert result["reasons"]["unreadable_shard"] == 1


def test_train_loader_survives_dirt_and_keeps_every_good_sample(dirty):
    pattern, expected, num_good = dirty
    cfg = DataConfig(train_data=pattern, image_size=IMAGE_SIZE, context_length=16, workers=0, shuffle_buffer=0)
    loader = build_train_loader(cfg, batch_size=7, tokenizer=ClipTokenizer(16))
    it = iter(loader)
    keys = [k for _ in range(num_good // 7) for k in next(it)["keys"]]
    # shards 3 and 4 (both truncated) each still deliver samples 10 and 11
    expected_keys = Counter({f"train{i:08d}": 1 for i in range(10)} | {f"train{i:08d}": 2 for i in (10, 11)})
    assert Counter(keys) == expected_keys
    # shards are read in a new order each epoch: after 3 more batches (epoch 1 whole, part of epoch 2) every
    # dirt case has been counted twice or three times
    for _ in range(3):
        next(it)
    stats = loader.stats()
    assert stats["samples_ok"] == num_good + 21
    for reason, count in expected.items():
        assert 2 * count <= stats["reasons"][reason] <= 3 * count, reason


@pytest.mark.distributed  # spawns worker processes
def test_train_loader_with_workers_reports_skips(dirty):
    pattern, expected, _ = dirty
    cfg = DataConfig(train_data=pattern, image_size=IMAGE_SIZE, context_length=16, workers=2, shuffle_buffer=4)
    loader = build_train_loader(cfg, batch_size=4, tokenizer=ClipTokenizer(16))
    it = iter(loader)
    for _ in range(8):  # several epochs of the 14 good samples
        next(it)
    stats = loader.stats()
    assert stats["samples_ok"] == 32 and stats["samples_skipped"] >= 11
    assert set(stats["reasons"]) == set(expected)


def test_required_fields(tmp_path):
    members = good_members(0)
    record = json.loads(members[1][1])
    del record["negative_description"]
    write_tar(str(tmp_path / "a.tar"), [members[0], ("train00000000.json", json.dumps(record).encode())])
    lenient = validate_shards(str(tmp_path / "a.tar"), DataConfig(), progress=False)
    assert lenient["samples_ok"] == 1  # negative falls back to the negative tags
    strict = validate_shards(str(tmp_path / "a.tar"), DataConfig(required_fields=["negative_description"]),
                             progress=False)
    assert strict["reasons"] == {"missing_field": 1}


def test_plain_clip_shards_with_txt(tmp_path):
    jpg = good_members(0)[0][1]
    write_tar(str(tmp_path / "raw.tar"), [("a.jpg", jpg), ("a.txt", b"a red thing"), ("b.jpg", jpg)])
    result = validate_shards(str(tmp_path / "raw.tar"), DataConfig(use_negatives=False), progress=False)
    assert result == {"samples_ok": 1, "samples_skipped": 1, "reasons": {"missing_json": 1}}


def test_only_dirt_is_a_clear_error_not_a_hang(tmp_path):
    write_tar(str(tmp_path / "bad.tar"), [("a.jpg", b"xx"), ("a.json", b"{}")])
    cfg = DataConfig(train_data=str(tmp_path / "bad.tar"), image_size=IMAGE_SIZE, workers=0, shuffle_buffer=0)
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(build_train_loader(cfg, batch_size=2, tokenizer=ClipTokenizer(16))))


def test_eval_dataset_skips_dirt(dirty):
    pattern, _, num_good = dirty
    dataset = build_eval_dataset(pattern, image_size=IMAGE_SIZE)
    assert len(list(dataset)) == num_good + 2  # records without text are fine for eval; bad images/json are not
    assert dataset.stats()["reasons"]["corrupt_image"] == 2


@pytest.mark.distributed  # spawns a process
def test_validate_cli(dirty):
    pattern, expected, num_good = dirty
    proc = subprocess.run([sys.executable, "-m", "hqclip_fast.data.cli", "validate", pattern],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == {"samples_ok": num_good, "samples_skipped": 11, "reasons": expected}
    assert "shard" in proc.stderr  # the tqdm progress bar


def _read_eval_share(pattern: str, rank: int, world_size: int, monkeypatch, worker=None):
    """(samples, stats, decoded, opened) of one rank's eval share; decoded: (shard, key) of every decode_image
    call; opened: the shards it opened."""
    from types import SimpleNamespace

    from hqclip_fast.data import loader as data_loader

    decoded, opened = [], []
    real_decode, real_read = data_loader.decode_image, data_loader.iter_tar_samples
    monkeypatch.setattr(data_loader, "decode_image",
                        lambda raw: decoded.append((os.path.basename(raw["__url__"]), raw["__key__"]))
                        or real_decode(raw))
    monkeypatch.setattr(data_loader, "iter_tar_samples",
                        lambda url, *args, **kw: opened.append(os.path.basename(url)) or real_read(url, *args, **kw))
    if worker is not None:  # as a DataLoader worker (id, num_workers) would see it
        monkeypatch.setattr(data_loader, "get_worker_info", lambda: SimpleNamespace(id=worker[0],
                                                                                    num_workers=worker[1]))
    dataset = build_eval_dataset(pattern, image_size=IMAGE_SIZE, rank=rank, world_size=world_size, with_index=True)
    samples = list(dataset)
    monkeypatch.undo()
    return samples, dataset.stats(), decoded, opened


@pytest.mark.parametrize("world_size,shards", [(3, "{0..4}"), (2, "{0..4}"), (3, "{0..1}"), (2, "0")])
def test_eval_shares_of_ranks_partition_the_good_samples(dirty, monkeypatch, world_size, shards):
    """5 shards on 2 or 3 ranks: each rank opens only its own shards; 2 shards on 3 ranks, 1 on 2: every rank
    reads every shard and decodes only its positions. Either way the shares are one process's samples."""
    pattern = dirty[0].replace("{0..4}", shards)
    urls = [os.path.basename(u) for u in expand_sources(pattern)[0]]
    whole, whole_stats, whole_decoded, _ = _read_eval_share(pattern, 0, 1, monkeypatch)
    assert [s[0] for s in whole] == sorted(s[0] for s in whole)
    by_index = {index: (key, image, target) for index, key, image, target in whole}

    shares = [_read_eval_share(pattern, rank, world_size, monkeypatch) for rank in range(world_size)]
    indices = [index for samples, *_ in shares for index, *_ in samples]
    assert sorted(indices) == sorted(by_index)  # every good sample once, no overlap
    for rank, (samples, stats, decoded, opened) in enumerate(shares):
        assert [index for index, *_ in samples] == sorted(index for index, *_ in samples)
        for index, key, image, target in samples:
            assert key == by_index[index][0] and target == by_index[index][2]
            assert torch.equal(image, by_index[index][1])
        if len(urls) >= world_size:  # by shards: this rank's shards only, each byte read by one rank
            assert opened == urls[rank::world_size]
            assert {shard for shard, _ in decoded} <= set(opened)
        else:  # by position: every rank reads every shard (and decodes only its positions)
            assert opened == urls
        assert stats["samples_ok"] == len(samples)
    # each rank decoded only its share: the decode calls partition one process's
    decoded = [call for *_, calls, _ in shares for call in calls]
    assert sorted(decoded) == sorted(whole_decoded) and len(set(decoded)) == len(decoded)
    # the ranks' skip counts (shard-level ones counted once) add up to one process's
    summed = Counter()
    for _, stats, *_ in shares:
        summed.update(stats["reasons"])
    assert dict(summed) == whole_stats["reasons"]
    assert sum(stats["samples_skipped"] for _, stats, *_ in shares) == whole_stats["samples_skipped"]


def test_eval_share_split_among_dataloader_workers(dirty, monkeypatch):
    pattern, _, _ = dirty
    rank_share, *_ = _read_eval_share(pattern, 1, 3, monkeypatch)
    per_worker = [_read_eval_share(pattern, 1, 3, monkeypatch, worker=(w, 2))[0] for w in range(2)]
    assert sorted(s[0] for samples in per_worker for s in samples) == [s[0] for s in rank_share]
    assert {s[0] for s in per_worker[0]}.isdisjoint(s[0] for s in per_worker[1])


def test_eval_share_arguments(dirty):
    pattern, _, _ = dirty
    with pytest.raises(ValueError, match="rank"):
        build_eval_dataset(pattern, image_size=IMAGE_SIZE, rank=3, world_size=3)
    with pytest.raises(ValueError, match="world_size"):
        build_eval_dataset(pattern, image_size=IMAGE_SIZE, world_size=0)
