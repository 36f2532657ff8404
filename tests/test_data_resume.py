"""Loader resume in O(one shard) and elastic resume: a resumed loader opens only its current shard (entered at
its saved byte offset) and the shards its buffered samples come from, whatever the step; on 4 -> 2 -> 3 ranks
(and other worker counts and batch sizes) no sample of an epoch is trained on twice and none is lost."""

import itertools
import json
from collections import Counter

import pytest

from hqclip_fast.data import ClipTokenizer, DataConfig, build_train_loader
from hqclip_fast.data import loader as loader_module
from hqclip_fast.data.shards import iter_tar_samples
from hqclip_fast.data.synthetic import write_synthetic

SHARDS, SHARD_SIZE = 12, 10


@pytest.fixture(scope="module")
def twelve_shards(tmp_path_factory):
    return write_synthetic(str(tmp_path_factory.mktemp("syn")), SHARDS * SHARD_SIZE, SHARD_SIZE, seed=4,
                           image_size=32, num_zeroshot=4, num_hardneg=4)["train"]


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer(context_length=16)


def _loader(pattern, tokenizer, *, rank=0, world_size=1, batch_size=4, workers=0, shuffle_buffer=4, **kw):
    cfg = DataConfig(train_data=pattern, image_size=32, context_length=16, workers=workers,
                     shuffle_buffer=shuffle_buffer, use_tags=False, **kw)
    return build_train_loader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=6,
                              tokenizer=tokenizer)


@pytest.fixture
def reads(monkeypatch):
    """Every opening of a shard by the loader: (url, byte offset it was entered at)."""
    opened = []

    def counting(url, stats, offsets=False, **kw):
        opened.append((url, kw.get("at", (0, None))[1]))
        return iter_tar_samples(url, stats, offsets, **kw)

    monkeypatch.setattr(loader_module, "iter_tar_samples", counting)
    return opened


def test_resume_opens_only_the_current_shard_and_the_buffered_ones(twelve_shards, tokenizer, reads):
    first = _loader(twelve_shards, tokenizer, batch_size=5, shuffle_buffer=3)
    it = iter(first)
    head = [next(it) for _ in range(17)]  # 85 samples: 8 or 9 shards opened so far
    assert len(reads) >= 9
    state = json.loads(json.dumps(first.state_dict()))
    uninterrupted = head + [next(it) for _ in range(6)]
    reads.clear()
    resumed = _loader(twelve_shards, tokenizer, batch_size=5, shuffle_buffer=3)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), 6))
    assert [b["keys"] for b in head + tail] == [b["keys"] for b in uninterrupted]
    # on resume: the current shard and each buffered sample, entered at byte offsets (no shard read from its
    # start before it), then the next shards (30 more samples: 3 or 4 shards, entered at 0)
    buffered = {tuple(ref) for ref in state["slots"][0]["buffer"]}
    assert len(buffered) == 3
    from_start = [url for url, offset in reads if not offset]
    assert len(reads) - len(from_start) <= 1 + 3 and len(set(from_start)) <= 4


def _take(loader, batches):
    return [(e, k) for b in itertools.islice(iter(loader), batches) for e, k in zip(b["epochs"], b["keys"])]


def test_elastic_four_then_two_then_three_ranks_reads_each_sample_once_per_epoch(twelve_shards, tokenizer):
    read = []
    stage = [_loader(twelve_shards, tokenizer, rank=r, world_size=4, batch_size=3) for r in range(4)]
    for loader in stage:
        read += _take(loader, 4)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in stage]
    stage = [_loader(twelve_shards, tokenizer, rank=r, world_size=2, batch_size=5) for r in range(2)]
    for loader in stage:
        loader.load_elastic(states)
    # the counts summed over ranks carry over whole, those of the two ranks lost included
    assert sum(loader.stats()["samples_ok"] for loader in stage) == 4 * 4 * 3
    for loader in stage:
        read += _take(loader, 3)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in stage]
    stage = [_loader(twelve_shards, tokenizer, rank=r, world_size=3, batch_size=4) for r in range(3)]
    streams = []
    for loader in stage:
        loader.load_elastic(iter(states))  # as the checkpointer gives them: one file at a time
        streams.append(iter(loader))
    assert sum(loader.stats()["samples_ok"] for loader in stage) == 4 * 4 * 3 + 2 * 3 * 5
    for _ in range(30):  # until every sample of epoch 0 is read (the buffers hold a few back)
        if sum(epoch == 0 for epoch, _ in read) >= SHARDS * SHARD_SIZE:
            break
        for stream in streams:
            batch = next(stream)
            read += list(zip(batch["epochs"], batch["keys"]))
    per_epoch = {e: [k for epoch, k in read if epoch == e] for e in {epoch for epoch, _ in read}}
    assert len(per_epoch[0]) == len(set(per_epoch[0])) == SHARDS * SHARD_SIZE  # each sample once, none lost
    assert len(per_epoch[1]) == len(set(per_epoch[1])) > 0  # the next epoch in the 3-rank layout: no repeats
    assert stage[0].stats()["samples_ok"] > 0


@pytest.mark.distributed  # spawns worker processes
def test_elastic_across_worker_counts_and_batch_sizes(twelve_shards, tokenizer):
    """2 ranks x 2 workers -> 1 rank x 3 workers: each sample of epoch 0 once."""
    read, states = [], []
    for rank in range(2):
        loader = _loader(twelve_shards, tokenizer, rank=rank, world_size=2, workers=2, batch_size=4)
        read += _take(loader, 6)
        states.append(json.loads(json.dumps(loader.state_dict())))
    resumed = _loader(twelve_shards, tokenizer, workers=3, batch_size=7)
    resumed.load_elastic(states)
    stream = iter(resumed)
    while sum(epoch == 0 for epoch, _ in read) < SHARDS * SHARD_SIZE and len(read) < 400:
        batch = next(stream)
        read += list(zip(batch["epochs"], batch["keys"]))
    epoch0 = Counter(k for epoch, k in read if epoch == 0)
    assert len(epoch0) == SHARDS * SHARD_SIZE and set(epoch0.values()) == {1}


def test_elastic_needs_the_same_seed(twelve_shards, tokenizer):
    state = _loader(twelve_shards, tokenizer).state_dict()
    cfg = DataConfig(train_data=twelve_shards, image_size=32, context_length=16, workers=0, use_tags=False)
    other = build_train_loader(cfg, batch_size=4, seed=7, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="seed"):
        other.load_elastic([state])


def test_resampled_elastic_draws_fresh_streams(twelve_shards, tokenizer):
    loaders = [_loader(twelve_shards, tokenizer, rank=r, world_size=2, resampled=True) for r in range(2)]
    before = [_take(loader, 3) for loader in loaders]
    states = [loader.state_dict() for loader in loaders]
    resumed = _loader(twelve_shards, tokenizer, rank=0, world_size=2, resampled=True, batch_size=3)
    resumed.load_elastic(states)
    after = _take(resumed, 4)
    fresh = _take(_loader(twelve_shards, tokenizer, rank=0, world_size=2, resampled=True, batch_size=3), 4)
    assert [k for _, k in after] != [k for _, k in fresh] and before[0]
