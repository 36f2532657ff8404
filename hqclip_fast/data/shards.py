"""Reading webdataset tar shards: URL expansion, opening (local, fsspec, pipe:), and grouping members into
samples without ever raising on dirty data (shard-level problems are counted in a Counter). A local uncompressed
tar is read by its headers, seeking over the data of the members not extracted; other shards are streamed.

Remote sources (`pipe:` commands, fsspec URLs) fail loudly or retry: a `pipe:` command that exits non-zero, or
an fsspec read that raises, is a `source_error` (logged with the command's stderr tail or the exception), never
an empty or truncated shard. The source is then re-opened after a backoff and read on from the byte where it
failed (seeking where it can, reading and dropping the bytes already delivered otherwise), so the tar reader
never sees the failure; after `SourceRetry.retries` failures in a row the shard is given up (`source_failed`),
keeping the samples read before. Every `pipe:` process is waited for (or killed and waited for when the reader
stops early): no zombies.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import braceexpand

log = logging.getLogger(__name__)

# Reasons that describe a whole shard or a failed read of it, not a lost sample (not added to samples_skipped).
SHARD_REASONS = frozenset({"empty_tar", "truncated_tar", "corrupt_header", "unreadable_shard", "source_error",
                           "source_failed"})
STDERR_TAIL = 2000  # characters of a failed pipe: command's stderr kept in its error


class SourceError(Exception):
    """A remote source failed while being read: a `pipe:` command exited non-zero, or an fsspec read raised.
    Deliberately not an OSError: the tar reader takes OSErrors for a truncated shard."""


@dataclass(frozen=True)
class SourceRetry:
    """How a failed remote read is retried: up to `retries` re-opens, the n-th (from 0) after
    min(backoff_s * 2**n, max_backoff_s) seconds."""

    retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def delay(self, failure: int) -> float:
        return min(self.backoff_s * 2 ** failure, self.max_backoff_s)


# The process-wide policy; the loaders set it from DataConfig (source_retries, source_retry_backoff_s), and
# DataLoader workers, forked after that, inherit it.
source_retry = SourceRetry()


def configure_source_retry(retries: int, backoff_s: float) -> None:
    global source_retry
    source_retry = SourceRetry(retries, backoff_s)


def expand_sources(train_data: str) -> list[list[str]]:
    """'a-{00..02}.tar::b.tar' -> [['a-00.tar', 'a-01.tar', 'a-02.tar'], ['b.tar']] (one list per source).
    Local paths may also be globs ('joined/*.tar', sorted); a glob that matches no file is an error, while a
    listed shard that turns out unreadable is counted when it is read (one lost shard must not stop a run)."""
    sources = [s.strip() for s in train_data.split("::") if s.strip()]
    if not sources:
        raise ValueError("train_data: no shard pattern given")
    return [[url for pattern in braceexpand.braceexpand(s) for url in _glob(pattern)] for s in sources]


def _is_remote(url: str) -> bool:
    """An fsspec URL (s3://, gs://, https://, ...) rather than a local path or file:// URL."""
    return "://" in url and not url.startswith("file://")


def is_local(url: str) -> bool:
    """A local path or file:// URL (seeking in it is cheap), not a pipe: command or a remote URL."""
    return not (url.startswith("pipe:") or _is_remote(url))


def _glob(url: str) -> list[str]:
    if url.startswith("pipe:") or _is_remote(url) or not glob.has_magic(url):
        return [url]
    matches = sorted(glob.glob(url.removeprefix("file://")))
    if not matches:
        raise ValueError(f"shard pattern {url!r} matches no file")
    return matches


class _PipeReader:
    """The stdout of `pipe:COMMAND`; at its end the process is waited for, and a non-zero exit raises
    SourceError with the tail of the command's stderr. close() kills a command still running and reaps it."""

    def __init__(self, command: str):
        self.command = command
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on it
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._stderr)

    def read(self, size: int = -1) -> bytes:
        data = self._proc.stdout.read(size)
        if not data and size != 0:
            status = self._proc.wait()
            if status != 0:
                self._stderr.seek(0)
                tail = self._stderr.read().decode("utf-8", errors="replace")[-STDERR_TAIL:].strip()
                raise SourceError(f"pipe:{self.command} exited with status {status}; stderr: {tail or '(empty)'}")
        return data

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self._proc.stdout.close()
        if self._proc.poll() is None:  # the reader stopped early
            self._proc.kill()
        self._proc.wait()
        self._stderr.close()


def _open_remote(url: str):
    if url.startswith("pipe:"):
        return _PipeReader(url[len("pipe:"):])
    import fsspec  # optional: only needed for remote URLs

    return fsspec.open(url, "rb").open()


class _RetryingReader:
    """A remote shard's bytes, (re-)opened and read on from the failed byte after any error of the source
    (see the module docstring). Each failure is counted in `stats` as 'source_error' and logged."""

    def __init__(self, url: str, stats: Counter, policy: SourceRetry):
        self.url, self.stats, self.policy = url, stats, policy
        self.position, self._failures, self._stream = 0, 0, None

    def read(self, size: int = -1) -> bytes:
        while True:
            try:
                if self._stream is None:
                    self._stream = self._open_at(self.position)
                data = self._stream.read(size)
            except Exception as e:  # fsspec backends raise many types (OSError, aiohttp and botocore errors, ...)
                self._failed(e)
                continue
            self.position += len(data)
            self._failures = 0
            return data

    def _open_at(self, position: int):
        stream = _open_remote(self.url)
        if stream.seekable():
            stream.seek(position)
            return stream
        while position:  # a pipe: the bytes the tar reader already has are read again and dropped
            chunk = stream.read(min(position, 1 << 20))
            if not chunk:
                stream.close()
                raise SourceError(f"{self.url}: the re-opened source ended {position} bytes before byte "
                                  f"{self.position}, where the last read failed")
            position -= len(chunk)
        return stream

    def _failed(self, error: Exception) -> None:
        self.stats["source_error"] += 1
        self.close()
        if self._failures >= self.policy.retries:
            raise SourceError(f"{self.url}: gave up after {self._failures + 1} failed reads; last: {error}") \
                from error
        delay = self.policy.delay(self._failures)
        self._failures += 1
        log.warning("shard source failed at byte %d (retry %d of %d in %.1fs): %s", self.position, self._failures,
                    self.policy.retries, delay, error)
        time.sleep(delay)

    def seekable(self) -> bool:
        return False  # reads resume at the failed byte; the tar reader needs no seeking

    def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            try:
                stream.close()
            except Exception:  # closing a broken remote stream may raise again; the failure is already counted
                pass


def open_url(url: str, stats: Counter | None = None) -> IO[bytes]:
    """A readable binary stream for a local path, `pipe:COMMAND`, or any fsspec URL (s3://, gs://, https://).
    Remote sources retry failed reads (counted in `stats` as 'source_error') and raise SourceError after
    `source_retry.retries` failures."""
    if url.startswith("pipe:") or _is_remote(url):
        return _RetryingReader(url, Counter() if stats is None else stats, source_retry)
    # A small buffer: a local tar is read by its headers (512 bytes) and seeks over the members not extracted,
    # which a larger buffer would read ahead into; longer reads (a member's data) go past the buffer.
    return open(url.removeprefix("file://"), "rb", buffering=tarfile.BLOCKSIZE)


def split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset convention: 'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg'); names without an extension -> None."""
    directory, base = os.path.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return os.path.join(directory, stem) if directory else stem, ext.lower()


class _CountingReader:
    """Counts the bytes read through it (a tar cut inside a header ends silently in tarfile's stream mode;
    the byte count, not a multiple of 512, tells us)."""

    def __init__(self, stream: IO[bytes]):
        self.stream, self.count = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data

    def drain(self) -> int:
        while self.read(1 << 16):
            pass
        return self.count


# A compressed tar is read as a stream (tarfile's "r|*"): it cannot seek over a member's data. A plain tar taken
# for compressed (a first member named "BZh...") is still read right, by the stream path.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def _seekable_tar_size(url: str, stream: IO[bytes]) -> int | None:
    """The size of a local uncompressed tar, which is read by its headers, seeking over the data of the members
    not extracted; None for a compressed or remote one (read as a stream). Leaves `stream` at byte 0."""
    if not is_local(url):
        return None
    compressed = stream.read(6).startswith(_COMPRESSED_MAGIC)  # 6: the longest magic, xz's
    size = None if compressed else stream.seek(0, os.SEEK_END)
    stream.seek(0)
    return size


class _CountedTarInfo(tarfile.TarInfo):
    """A header of a _CountingTarFile: an invalid one starts a corrupt stretch, counted once however many blocks
    it spans (a corrupt header and the data of its member)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            member = super().fromtarfile(tar)
        except tarfile.InvalidHeaderError:
            if not tar.in_corrupt_run:
                tar.corrupt_headers += 1
                tar.stats["corrupt_header"] += 1
                tar.in_corrupt_run = True
            raise
        tar.in_corrupt_run = False
        return member


class _CountingTarFile(tarfile.TarFile):
    """A tar read with ignore_zeros, which passes an invalid header over block by block up to the next valid one
    (plain tarfile ends the shard there without a word), counting each corrupt stretch in `stats` as it meets it
    (open() hands `stats` on to the constructor)."""

    def __init__(self, *args, stats, **kwargs):
        self.stats, self.corrupt_headers, self.in_corrupt_run = stats, 0, False
        super().__init__(*args, ignore_zeros=True, tarinfo=_CountedTarInfo, **kwargs)


def iter_tar_samples(url: str, stats: Counter, offsets: bool = False, *, at: tuple[int, int | None] = (0, None),
                     keep: Callable[[int], bool] | None = None) -> Iterator[dict]:
    """Yield {'__key__', '__url__', '__index__', '__start__', '__end__', ext: bytes, ...} per sample (consecutive
    members sharing a key). '__index__' is the sample's position in the shard; '__start__' and '__end__' are the
    byte offsets of its first header and of the end of its last member (None in a compressed tar).

    offsets=True adds '__offsets__': {ext: (data offset in the uncompressed tar, size, member name)}, which is
    what a DALI index file lists.

    at=(index, offset) starts at sample `index`: a local uncompressed tar seeks to `offset` (where that sample
    begins, from an earlier '__start__' or '__end__'); others (pipe:, remote, compressed, offset None) are read
    from the start. keep(index) False passes a sample over, as the samples before `index` are: its members are
    not extracted, and in a local uncompressed tar their data is not even read (only the headers are), so slots
    that share a shard each read their own samples' bytes. Shard-level counts of a shard entered mid-way leave
    out "empty".

    An unreadable or empty shard is counted and yields nothing; a truncated shard yields every complete sample
    before the cut ('truncated_tar'), and counts a sample that the cut went through as 'truncated_sample'. A
    corrupt header is counted ('corrupt_header') and passed over up to the next valid one: its member is lost
    (its sample comes without it, and the decoder counts what it then lacks), the samples after it are not.
    """
    try:
        stream = open_url(url, stats)
    except OSError:
        stats["unreadable_shard"] += 1
        return
    try:
        size = _seekable_tar_size(url, stream)
    except OSError:
        stream.close()
        stats["unreadable_shard"] += 1
        return
    first_index, base = at if size is not None and at[1] else (0, 0)
    wanted = lambda index: index >= at[0] and (keep is None or keep(index))  # noqa: E731
    index = first_index - 1
    sample: dict | None = None
    sample_wanted = False
    counter = None if size is not None else _CountingReader(stream)
    members_seen = 0
    try:
        if base:
            stream.seek(base)
        try:
            # "r:" reads a header, then seeks to the next one unless the member is extracted; "r|*" reads all.
            tar = _CountingTarFile.open(fileobj=stream if counter is None else counter,
                                        mode="r:" if counter is None else "r|*", stats=stats)
        except tarfile.ReadError as e:
            if "empty" not in str(e):
                stats["truncated_tar"] += 1
            elif not base:  # entered at its end (a resumed, finished shard): nothing to count
                stats["empty_tar"] += 1
            return
        uncompressed = counter is None or tar.fileobj.comptype == "tar"
        ended_cleanly = False
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, EOFError, OSError, ValueError):
                # Cut inside a header (or inside the data of a member passed over): the samples read so far
                # are complete.
                stats["truncated_tar"] += 1
                break
            if member is None:
                ended_cleanly = True
                break
            # tarfile keeps every member it reads (about 460 bytes each: 14 MB per open 10,000-sample shard of
            # 3 members a sample, in every loader worker); members are never looked up again here.
            tar.members.clear()
            members_seen += 1
            parts = split_member_name(member.name) if member.isfile() else None
            if parts is None:
                continue
            key, ext = parts
            if sample is not None and key != sample["__key__"]:
                if sample_wanted:
                    yield sample
                sample = None
            if sample is None:
                index += 1
                sample_wanted = wanted(index)
                sample = {"__key__": key, "__url__": url, "__index__": index,
                          "__start__": member.offset if uncompressed else None, "__end__": None}
                sample |= {"__offsets__": {}} if offsets else {}
            if not sample_wanted:
                continue
            try:
                sample[ext] = tar.extractfile(member).read()
                if uncompressed:
                    sample["__end__"] = member.offset_data + tarfile.BLOCKSIZE * -(-member.size // 512)
                if offsets:
                    sample["__offsets__"][ext] = (member.offset_data, member.size, member.name)
            except (tarfile.TarError, EOFError, OSError, ValueError):
                # Cut inside this member's data: its sample is incomplete and lost.
                stats["truncated_sample"] += 1
                stats["truncated_tar"] += 1
                sample = None
                break
        if ended_cleanly:
            length = size if counter is None else counter.drain()
            if uncompressed and length % 512:
                stats["truncated_tar"] += 1  # cut inside a header: the samples read so far are complete
            elif members_seen == 0 and not base and not tar.corrupt_headers:
                stats["empty_tar"] += 1
        if sample is not None and sample_wanted:
            yield sample
    except SourceError as e:  # retries spent: loud, and never counted as an empty or truncated shard
        stats["source_failed"] += 1
        log.error("shard given up (the samples read before the failure are kept): %s", e)
    finally:
        stream.close()
