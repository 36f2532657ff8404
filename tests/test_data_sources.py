"""Remote shard sources fail loudly or retry: a `pipe:` command's non-zero exit and an fsspec read error are
counted as 'source_error' (with the command's stderr in the log), retried from the failed byte, and never
counted as an empty or truncated shard; `pipe:` processes are always reaped."""

import io
import logging
import shlex
import subprocess
from collections import Counter

import fsspec
import pytest
from data_helpers import good_members, write_tar

from hqclip_fast.data import shards
from hqclip_fast.data.shards import iter_tar_samples

NUM = 6  # samples in the test shard


@pytest.fixture
def shard(tmp_path):
    return write_tar(str(tmp_path / "s.tar"), [m for i in range(NUM) for m in good_members(i)])


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(shards, "source_retry", shards.SourceRetry(retries=2, backoff_s=0.0))


@pytest.fixture
def popens(monkeypatch):
    """Every pipe: process started during the test."""
    started = []
    real = subprocess.Popen

    def recording(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", recording)
    return started


def _keys(url, stats):
    return [s["__key__"] for s in iter_tar_samples(url, stats)]


def _half(shard):
    with open(shard, "rb") as f:
        return len(f.read()) // 2


def test_pipe_that_exits_1_after_half_a_shard_is_a_source_error(shard, popens, caplog):
    stats = Counter()
    command = f"head -c {_half(shard)} {shlex.quote(shard)}; echo 'aws: connection reset' >&2; exit 1"
    with caplog.at_level(logging.WARNING, logger="hqclip_fast.data.shards"):
        keys = _keys(f"pipe:{command}", stats)
    assert 0 < len(keys) < NUM and len(set(keys)) == len(keys)  # the first half, each sample once
    assert stats == {"source_error": 3, "source_failed": 1}  # 1 try + 2 retries; no empty/truncated count
    assert "exited with status 1" in caplog.text and "aws: connection reset" in caplog.text
    assert len(popens) == 3 and all(p.returncode is not None for p in popens)  # every process reaped


def test_pipe_that_fails_once_is_retried_from_the_failed_byte(shard, tmp_path, popens):
    stats = Counter()
    flag = shlex.quote(str(tmp_path / "failed-once"))
    command = (f"if [ -e {flag} ]; then cat {shlex.quote(shard)}; "
               f"else touch {flag}; head -c {_half(shard)} {shlex.quote(shard)}; exit 3; fi")
    assert _keys(f"pipe:{command}", stats) == [f"train{i:08d}" for i in range(NUM)]
    assert stats == {"source_error": 1}
    assert len(popens) == 2 and all(p.returncode is not None for p in popens)


def test_pipe_that_exits_1_without_output_is_not_an_empty_shard(popens):
    stats = Counter()
    assert _keys("pipe:exit 1", stats) == []
    assert stats == {"source_error": 3, "source_failed": 1}
    assert all(p.returncode == 1 for p in popens)


def test_pipe_left_early_is_killed_and_reaped(shard, popens):
    samples = iter_tar_samples(f"pipe:cat {shlex.quote(shard)}; sleep 60", Counter())
    next(samples)
    samples.close()  # the consumer stops: the command, still running, is killed and waited for
    assert len(popens) == 1 and popens[0].returncode is not None


class FlakyFileSystem(fsspec.AbstractFileSystem):
    """An fsspec filesystem of in-memory files that raise mid-read for their first `failures` opens."""

    protocol = "flaky"
    files: dict = {}
    failures = 0
    opens = 0

    def _open(self, path, mode="rb", **kwargs):
        FlakyFileSystem.opens += 1
        data = self.files[self._strip_protocol(path)]
        if FlakyFileSystem.opens > FlakyFileSystem.failures:
            return io.BytesIO(data)
        return _Breaking(data, len(data) // 2)


class _Breaking(io.BytesIO):
    def __init__(self, data, limit):
        super().__init__(data)
        self.limit = limit

    def read(self, size=-1):
        if self.tell() >= self.limit:
            raise ConnectionResetError("connection reset by peer")
        return super().read(size if 0 <= size <= self.limit - self.tell() else self.limit - self.tell())


@pytest.fixture
def flaky(shard, monkeypatch):
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    with open(shard, "rb") as f:
        monkeypatch.setattr(FlakyFileSystem, "files", {"/data/s.tar": f.read()})
    monkeypatch.setattr(FlakyFileSystem, "opens", 0)
    return FlakyFileSystem


@pytest.mark.parametrize("failures, expected", [
    (1, {"source_error": 1}),                          # retried: every sample, once
    (9, {"source_error": 3, "source_failed": 1}),      # retries spent: the first half, then given up
])
def test_fsspec_read_error_mid_shard(flaky, monkeypatch, failures, expected):
    monkeypatch.setattr(flaky, "failures", failures)
    stats = Counter()
    keys = _keys("flaky:///data/s.tar", stats)
    assert stats == expected  # never 'truncated_tar' or 'truncated_sample'
    if "source_failed" in expected:
        assert 0 < len(keys) < NUM and len(set(keys)) == len(keys)
    else:
        assert keys == [f"train{i:08d}" for i in range(NUM)]
