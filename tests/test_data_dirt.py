"""Dirty shards: every case is skipped and counted by reason, never a crash, and no good sample is lost."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from data_helpers import IMAGE_SIZE, dirty_shards, good_members, write_tar

from hqclip_fast.data import ClipTokenizer, DataConfig, build_eval_dataset, build_train_loader
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
