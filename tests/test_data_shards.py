"""Reading tar shards: a local uncompressed tar is read by its headers, seeking over the data of the samples
not wanted (so slots sharing a shard each read their own bytes, counted here at the file), and gives exactly
what the stream reader (pipe:, remote, compressed shards) gives, dirt and truncation counts included."""

import gzip
import io
import itertools
import random
import shlex
import shutil
import tarfile
from collections import Counter

import pytest
from data_helpers import dirty_shards

from hqclip_fast.data import shards
from hqclip_fast.data.loader import SlotStream, read_reference
from hqclip_fast.data.sharding import fresh_slot_state
from hqclip_fast.data.shards import iter_tar_samples
from hqclip_fast.data.synthetic import add_tar_member

NUM_SAMPLES = 32
HEADER_BYTES = 1536  # what reading one member's header may cost at most (buffer fills included)


def _members(num: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Samples of a large (16-48 KB, not block-aligned) 'jpg' and a small 'json'; one key longer than a ustar
    name (a pax header), and a member without extension after sample 9."""
    rng = random.Random(seed)
    members = []
    for i in range(num):
        key = f"s{i:04d}" + ("-" + "long" * 40 if i == 5 else "")
        members += [(f"{key}.jpg", rng.randbytes(rng.randrange(16_000, 48_000))), (f"{key}.json", b'{"i": %d}' % i)]
        if i == 9:
            members.append(("README", b"not a sample member"))
    return members


def _write(path, members) -> str:
    """A pax tar of `members`, then a directory member."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            add_tar_member(tar, name, data)
        directory = tarfile.TarInfo("some/dir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
    return str(path)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("shard") / "big.tar", _members(NUM_SAMPLES))


def _as(kind: str, path: str) -> str:
    """The same shard's bytes by the seek path (a local file) or the stream path (the same bytes through
    `pipe:cat`)."""
    return path if kind == "local" else f"pipe:cat {shlex.quote(path)}"


def _read(url, **kw) -> tuple[list[dict], Counter]:
    """The samples (less '__url__', which names the path) and the counts."""
    stats = Counter()
    return [{k: v for k, v in s.items() if k != "__url__"} for s in iter_tar_samples(url, stats, **kw)], stats


def test_local_and_stream_paths_give_the_same_samples_and_offsets(shard):
    local, local_stats = _read(shard, offsets=True)
    streamed, stream_stats = _read(_as("pipe", shard), offsets=True)
    assert local == streamed and local_stats == stream_stats == {}
    assert [s["__index__"] for s in local] == list(range(NUM_SAMPLES))
    assert local[5]["__key__"].endswith("long" * 40)  # the pax long name
    with open(shard, "rb") as f:
        data = f.read()
    for sample in local:  # '__offsets__' (a DALI index) and '__start__'/'__end__' point at the right bytes
        for ext, (offset, size, _) in sample["__offsets__"].items():
            assert data[offset:offset + size] == sample[ext]
        assert sample["__start__"] < sample["__end__"] and sample["__end__"] % 512 == 0


def test_compressed_local_shard_stays_on_the_stream_path(shard, tmp_path):
    gz = tmp_path / "big.tar.gz"
    with open(shard, "rb") as f, gzip.open(gz, "wb") as out:
        shutil.copyfileobj(f, out)
    named_tar = tmp_path / "really_gzip.tar"  # the magic bytes decide, not the name
    shutil.copy(gz, named_tar)
    plain, _ = _read(shard)
    for url in (str(gz), str(named_tar)):
        samples, stats = _read(url, at=(3, 999), keep=lambda i: i % 2 == 1)  # an offset is never used here
        assert stats == {}
        assert [s["__key__"] for s in samples] == [s["__key__"] for s in plain[3:] if s["__index__"] % 2 == 1]
        assert all(s["__start__"] is None and s["__end__"] is None for s in samples)


@pytest.mark.parametrize("kind", ["local", "pipe"])
def test_at_and_keep(shard, kind):
    full, _ = _read(shard)
    start = full[7]["__start__"]
    for at in ((7, start), (7, None)):
        samples, stats = _read(_as(kind, shard), at=at, keep=lambda i: i % 3 == 1)
        assert samples == [s for s in full[7:] if s["__index__"] % 3 == 1] and stats == {}
    # entered after its last sample, or at its last byte (a resumed, finished shard): nothing yielded or counted
    with open(shard, "rb") as f:
        size = len(f.read())
    for offset in (full[-1]["__end__"], size):
        samples, stats = _read(_as(kind, shard), at=(NUM_SAMPLES, offset))
        assert samples == [] and stats == {}


@pytest.mark.parametrize("kind", ["local", "pipe"])
def test_dirty_shards_count_the_same_on_both_paths(tmp_path, kind):
    pattern, expected, _ = dirty_shards(str(tmp_path))
    stats, keys = Counter(), []
    for number in range(5):
        keys += [s["__key__"] for s in iter_tar_samples(_as(kind, pattern.replace("{0..4}", str(number))), stats)]
    shard_level = {k: expected[k] for k in ("empty_tar", "truncated_tar", "truncated_sample")}
    assert stats == shard_level  # empty file, end blocks only, cut in a member's data, cut in a header
    assert keys.count("train00000010") == keys.count("train00000011") == 2  # kept before both cuts


def _cut(shard, tmp_path, key, where: int) -> str:
    """`shard` cut at byte `where` from the start of the header of `key`'s jpg."""
    with open(shard, "rb") as f:
        data = f.read()
    full, _ = _read(shard)
    start = next(s["__start__"] for s in full if s["__key__"] == key)
    path = tmp_path / f"cut-{key}-{where}.tar"
    path.write_bytes(data[:start + where])
    return str(path)


@pytest.mark.parametrize("kind", ["local", "pipe"])
@pytest.mark.parametrize(("where", "keep", "expected"), [
    (100, None, {"truncated_tar": 1}),                                      # inside a header
    (512 + 3000, None, {"truncated_tar": 1, "truncated_sample": 1}),        # inside a wanted member's data
    (512 + 3000, lambda i: i != 12, {"truncated_tar": 1}),                  # inside the data passed over
    (512 + 3072, lambda i: i != 12, {"truncated_tar": 1}),                  # ... on a block boundary
    (0, None, {}),                                                          # between two samples
])
def test_truncation_counts(shard, tmp_path, kind, where, keep, expected):
    cut = _cut(shard, tmp_path, "s0012", where)
    samples, stats = _read(_as(kind, cut), keep=keep)
    assert [s["__index__"] for s in samples] == [i for i in range(12) if keep is None or keep(i)]
    assert stats == expected
    # entered mid-way, at sample 10's byte: the same samples from there, the same counts
    full, _ = _read(shard)
    samples, stats = _read(_as(kind, cut), at=(10, full[10]["__start__"]), keep=keep)
    assert [s["__index__"] for s in samples] == [i for i in (10, 11) if keep is None or keep(i)]
    assert stats == expected


def _corrupt(shard, tmp_path, key: str, ext: str) -> str:
    """`shard` with the header of `key`'s `ext` member overwritten by bytes that are no header."""
    with open(shard, "rb") as f:
        data = bytearray(f.read())
    sample = next(s for s in _read(shard, offsets=True)[0] if s["__key__"] == key)
    header = sample["__offsets__"][ext][0] - 512  # a short name: one ustar header before the data
    data[header:header + 512] = bytes(range(256)) * 2
    path = tmp_path / f"corrupt-{key}-{ext}.tar"
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize("kind", ["local", "pipe"])
def test_a_corrupt_header_is_counted_and_the_samples_after_it_are_kept(shard, tmp_path, kind):
    """tarfile ends a shard at an invalid header without a word; read with ignore_zeros, it goes on at the next
    valid header: only the corrupt member is lost, and counted."""
    full, _ = _read(shard)
    for key, ext, index in (("s0012", "jpg", 12), ("s0000", "jpg", 0), ("s0020", "json", 20)):
        samples, stats = _read(_as(kind, _corrupt(shard, tmp_path, key, ext)))
        assert stats == {"corrupt_header": 1}
        assert [s["__index__"] for s in samples] == list(range(NUM_SAMPLES))
        assert ext not in samples[index] and samples[index]["__key__"] == key
        assert all(ours == theirs for i, (ours, theirs) in enumerate(zip(samples, full)) if i != index)
        other = "json" if ext == "jpg" else "jpg"
        assert samples[index][other] == full[index][other]


def test_a_file_that_is_no_tar_is_counted_as_corrupt(tmp_path):
    path = tmp_path / "page.tar"
    path.write_bytes(b"<html>" + bytes(range(256)) * 20)  # an error page saved under a shard's name
    assert _read(str(path)) == ([], {"corrupt_header": 1, "truncated_tar": 1})


def test_missing_and_unreadable_local_shards(tmp_path):
    assert _read(str(tmp_path / "missing.tar")) == ([], {"unreadable_shard": 1})
    assert _read(str(tmp_path)) == ([], {"unreadable_shard": 1})  # a directory


class _CountingFile(io.FileIO):
    """A file that counts the bytes the OS delivers (what a buffered reader on top of it really reads)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.count = 0

    def readinto(self, buffer):
        n = super().readinto(buffer)
        self.count += n or 0
        return n

    def read(self, size=-1):
        data = super().read(size)
        self.count += len(data or b"")
        return data

    def readall(self):
        data = super().readall()
        self.count += len(data)
        return data


@pytest.fixture
def opened(monkeypatch):
    """Every file the shard reader opens, in order, each counting the bytes read from it."""
    files = []

    def counting_open(path, mode="r", buffering=-1):
        assert mode == "rb"
        files.append(_CountingFile(path))
        size = buffering if buffering > 0 else io.DEFAULT_BUFFER_SIZE
        return files[-1] if buffering == 0 else io.BufferedReader(files[-1], size)

    monkeypatch.setattr(shards, "open", counting_open, raising=False)
    return files


def _sizes(shard) -> dict[int, int]:
    """Data bytes per sample index."""
    return {s["__index__"]: sum(len(v) for k, v in s.items() if not k.startswith("__")) for s in _read(shard)[0]}


@pytest.mark.parametrize("num_slots", [2, 3, 4])
def test_slots_sharing_a_shard_each_read_their_own_bytes(shard, opened, num_slots):
    sizes, members = _sizes(shard), len(_members(NUM_SAMPLES)) + 1
    shard_bytes = sum(sizes.values())
    for slot in range(num_slots):
        opened.clear()
        stream = SlotStream([shard], 0, fresh_slot_state(slot, num_slots, 1), seed=7, resampled=False,
                            stats=Counter())
        indexes, read_at_last = [], None
        for _epoch, sample in itertools.takewhile(lambda item: item[0] == 0, stream):
            indexes.append(sample["__index__"])
            read_at_last = opened[0].count  # bytes read when this slot's latest sample came out
        assert len(indexes) == len(range(indexes[0], NUM_SAMPLES, num_slots)) >= NUM_SAMPLES // num_slots
        own = sum(sizes[i] for i in indexes)
        read = opened[0].count  # the first open: epoch 0's pass over the shard
        assert read <= own + HEADER_BYTES * members
        assert read < shard_bytes / num_slots * 1.5
        # after its last sample the slot reads the headers left and the end-of-archive padding (at most a tar
        # record: read with ignore_zeros, to go on past a corrupt header), no data
        members_after = 2 * (NUM_SAMPLES - 1 - indexes[-1]) + 1  # + the directory
        assert read - read_at_last <= HEADER_BYTES * members_after + tarfile.RECORDSIZE


def test_reading_one_buffered_sample_reads_that_sample(shard, opened):
    full, _ = _read(shard)
    sizes = _sizes(shard)
    for index in (0, 13, NUM_SAMPLES - 1):
        opened.clear()
        sample = read_reference([[shard]], [0, 0, 0, index, full[index]["__start__"]])
        assert sample["__key__"] == full[index]["__key__"]
        # its 2 members, the header after them; after the last sample, the end-of-archive padding (one record)
        padding = tarfile.RECORDSIZE if index == NUM_SAMPLES - 1 else 0
        assert opened[0].count <= sizes[index] + HEADER_BYTES * 3 + padding


@pytest.mark.parametrize("num_slots", [2, 3])
def test_a_shard_shared_by_slots_counts_its_faults_once(shard, tmp_path, num_slots):
    """A truncated, corrupt shard split among slots: each slot sees the cut and the bad header (it reads every
    header), the slot of its first sample counts them; the sample the cut went through is its slot's."""
    corrupt = _corrupt(shard, tmp_path, "s0003", "json")
    with open(corrupt, "rb") as f:
        data = f.read()
    full, _ = _read(shard)
    (tmp_path / "both.tar").write_bytes(data[:full[12]["__start__"] + 512 + 3000])  # in s0012's jpg data
    totals = Counter()
    for slot in range(num_slots):
        stats = Counter()
        stream = SlotStream([str(tmp_path / "both.tar")], 0, fresh_slot_state(slot, num_slots, 1), seed=7,
                            resampled=False, stats=stats)
        list(itertools.takewhile(lambda item: item[0] == 0, stream))
        assert stats.get("truncated_sample", 0) == (12 % num_slots == slot)
        totals += stats
    assert totals == {"truncated_tar": 1, "corrupt_header": 1, "truncated_sample": 1}


@pytest.mark.parametrize("world_size", [2, 3])
def test_eval_ranks_sharing_a_shard_each_read_their_own_bytes(shard, opened, world_size):
    """Fewer eval shards than ranks: each rank reads the headers and its own samples' data (positions
    p % world_size == rank), so the set's data is read once over the ranks (the 'jpg' here is no image: every
    sample is read, then skipped, as the counts say)."""
    from hqclip_fast.data import build_eval_dataset

    sizes, members = _sizes(shard), len(_members(NUM_SAMPLES)) + 1
    for rank in range(world_size):
        opened.clear()
        dataset = build_eval_dataset(shard, image_size=16, rank=rank, world_size=world_size)
        assert list(dataset) == []
        own = sum(sizes[i] for i in range(rank, NUM_SAMPLES, world_size))
        assert dataset.stats()["samples_skipped"] == len(range(rank, NUM_SAMPLES, world_size))
        assert opened[0].count <= own + HEADER_BYTES * members + tarfile.RECORDSIZE
