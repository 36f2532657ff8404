"""CPU training loader: webdataset shards -> PIL decode + augmentation in DataLoader workers -> batches.

Determinism (what makes `load_state_dict` exact):
- each (rank, worker) pair is a "slot"; an epoch's shard order is a permutation drawn from (seed, source,
  epoch), identical on every rank, and slot s reads shards s, s + num_slots, ... of it (no overlap; with fewer
  shards than slots every slot reads all shards and keeps every num_slots-th sample instead);
- the stream of a slot is infinite (epoch after epoch), shuffled by a buffer with an RNG seeded by
  (seed, slot); the n-th sample out of the buffer is augmented with an RNG seeded by (seed, slot, n);
- batches are formed inside the workers; the loader yields batch i from worker i % workers, whatever order
  the DataLoader delivers them in.
The state is therefore (per worker: how many raw samples left its shuffle buffer; batches yielded). Resuming
fast-forwards each worker through that many raw samples without decoding them.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .annotations import load_time_annotations
from .config import DataConfig
from .samples import (
    SkipSample,
    collate_images,
    decode_image,
    decode_train_sample,
    eval_transform,
    read_record,
)
from .shards import SHARD_REASONS, configure_source_retry, expand_sources, iter_tar_samples
from .tags import TagVocab
from .tokenizer import ClipTokenizer

STATE_VERSION = 1


def summarize(reasons: Counter | dict, samples_ok: int) -> dict:
    """The stats() form: {"samples_ok", "samples_skipped", "reasons"}."""
    reasons = {k: int(v) for k, v in sorted(reasons.items()) if v}
    skipped = sum(v for k, v in reasons.items() if k not in SHARD_REASONS)
    return {"samples_ok": int(samples_ok), "samples_skipped": skipped, "reasons": reasons}


def slot_stream(urls: list[str], source: int, slot: int, num_slots: int, seed: int, resampled: bool,
                stats: Counter, annotations=None) -> Iterator[tuple[int, dict]]:
    """Infinite (epoch, raw sample) stream of one source for one slot; with `annotations`
    (hqclip_fast.data.annotations), each sample comes with its annotation merged in, as `hqclip-data join` writes."""
    epoch = 0
    while True:
        read = 0
        if resampled:
            rng = np.random.default_rng([seed, source, slot, epoch, 1])
            shards = [urls[i] for i in rng.integers(0, len(urls), size=max(1, len(urls) // num_slots))]
            keep_every = 1
        else:
            order = np.random.default_rng([seed, source, epoch]).permutation(len(urls))
            if len(urls) >= num_slots:
                shards, keep_every = [urls[i] for i in order[slot::num_slots]], 1
            else:
                shards, keep_every = [urls[i] for i in order], num_slots
        position = 0
        for url in shards:
            shard_annotations = annotations.for_shard(url) if annotations is not None else None
            for sample in iter_tar_samples(url, stats):
                mine = keep_every == 1 or position % keep_every == slot
                position += 1
                if mine:
                    read += 1
                    yield epoch, shard_annotations.annotate(sample) if shard_annotations else sample
        if read == 0:
            raise RuntimeError(
                f"train_data: no readable sample in {len(shards)} shard(s) of source {source} for slot {slot} "
                f"(epoch {epoch}); reasons so far: {dict(stats)}")
        epoch += 1


def mix_sources(streams: list[Iterator], weights: list[float], rng: random.Random) -> Iterator[tuple[int, dict]]:
    if len(streams) == 1:
        yield from streams[0]
        return
    while True:
        yield next(streams[rng.choices(range(len(streams)), weights=weights)[0]])


def sample_bytes(item: tuple[int, dict]) -> int:
    """Encoded payload of a buffered (epoch, raw sample): its members' bytes, what dominates its memory."""
    return sum(len(v) for v in item[1].values() if isinstance(v, bytes))


def shuffle_buffer(stream: Iterator, size: int, rng: random.Random, max_bytes: int = 0) -> Iterator:
    """Reservoir-style shuffle through a buffer of at most `size` items and (max_bytes > 0) at most `max_bytes`
    of sample payload (`sample_bytes`): each new item first evicts random items, which are emitted, until it
    fits; an item larger than max_bytes alone passes straight through."""
    if size <= 1:
        yield from stream
        return
    buffer: list = []
    held = 0
    for item in stream:
        nbytes = sample_bytes(item) if max_bytes else 0
        if nbytes > max_bytes > 0:
            yield item
            continue
        while len(buffer) >= size or held + nbytes > max_bytes > 0:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            out = buffer.pop()
            held -= sample_bytes(out) if max_bytes else 0
            yield out
        buffer.append(item)
        held += nbytes
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Infinite stream of collated batches for this rank; each worker forms whole batches."""

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int, world_size: int, seed: int,
                 tokenizer: ClipTokenizer, tag_vocab: TagVocab | None, skip_raw: list[int]):
        self.cfg, self.batch_size, self.rank, self.world_size, self.seed = cfg, batch_size, rank, world_size, seed
        self.tokenizer, self.tag_vocab, self.skip_raw = tokenizer, tag_vocab, skip_raw
        self.sources = expand_sources(cfg.train_data)
        weights = cfg.train_data_weights or [1.0] * len(self.sources)
        if len(weights) != len(self.sources) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"train_data_weights: need {len(self.sources)} non-negative weights, got {weights}")
        self.weights = list(weights)
        self.annotations = load_time_annotations(cfg, [u for urls in self.sources for u in urls])

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        slot, num_slots = self.rank * num_workers + worker, self.world_size * num_workers
        stats: Counter = Counter()
        streams = [slot_stream(urls, i, slot, num_slots, self.seed, self.cfg.resampled, stats, self.annotations)
                   for i, urls in enumerate(self.sources)]
        raw = mix_sources(streams, self.weights, random.Random(f"mix-{self.seed}-{slot}"))
        raw = shuffle_buffer(raw, self.cfg.shuffle_buffer, random.Random(f"shuffle-{self.seed}-{slot}"),
                             max_bytes=int(self.cfg.shuffle_buffer_mib * 2**20))
        skip = self.skip_raw[worker]
        samples, samples_ok, last_ok_epoch = [], 0, 0
        for index, (epoch, sample) in enumerate(raw):
            if index < skip:
                if index == skip - 1:
                    stats.clear()  # the resumed state already counted everything read up to here
                last_ok_epoch = epoch
                continue
            try:
                samples.append(decode_train_sample(sample, self.cfg, np.random.default_rng([self.seed, slot, index]),
                                                   self.tag_vocab))
            except SkipSample as e:
                stats[e.reason] += 1
                if epoch - last_ok_epoch >= 2:  # a whole epoch without one usable sample: fail, don't spin
                    raise RuntimeError(f"train_data: no usable sample in a whole epoch for rank {self.rank} "
                                       f"worker {worker}; skipped: {dict(stats)}") from None
                continue
            samples_ok += 1
            last_ok_epoch = epoch
            if len(samples) == self.batch_size:
                batch = self.collate(samples)
                batch["_meta"] = {"worker": worker, "raw": index + 1, "epoch": epoch,
                                  "reasons": dict(stats), "samples_ok": samples_ok}
                samples = []
                yield batch

    def collate(self, samples: list) -> dict:
        batch = {
            "images": collate_images([s.image for s in samples], normalize=not self.cfg.normalize_on_device),
            "pos_tokens": self.tokenizer([s.pos_text for s in samples]),
            "keys": [s.key for s in samples],
        }
        if self.cfg.use_negatives:
            batch["neg_tokens"] = self.tokenizer([s.neg_text for s in samples])
        if self.tag_vocab is not None and self.cfg.use_tags:
            width = max(1, max(len(s.tag_ids) for s in samples))
            tag_ids = torch.full((len(samples), width), -1, dtype=torch.long)
            for row, s in enumerate(samples):
                tag_ids[row, : len(s.tag_ids)] = torch.tensor(s.tag_ids, dtype=torch.long)
            batch["tag_ids"] = tag_ids
        return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class TrainLoader:
    """Iterable of batches (infinite: the trainer stops after its step budget) with exact resume and stats."""

    def __init__(self, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                 tokenizer: ClipTokenizer, tag_vocab: TagVocab | None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        self.cfg, self.batch_size, self.rank, self.world_size, self.seed = cfg, batch_size, rank, world_size, seed
        self.tokenizer, self.tag_vocab = tokenizer, tag_vocab
        self.num_workers = cfg.workers
        self._slots = max(1, cfg.workers)
        self._raw_consumed = [0] * self._slots
        self._reasons_base: Counter = Counter()  # counts from before the last (re)start
        self._samples_base = 0
        self._live_reasons: list[dict] = [{} for _ in range(self._slots)]
        self._live_ok = [0] * self._slots
        self.batches = 0
        self.epoch = 0
        ShardStream(cfg, batch_size, rank, world_size, seed, tokenizer, tag_vocab, [0])  # validates sources

    @property
    def samples(self) -> int:
        return self.batches * self.batch_size

    def _checkpoint_live_counts(self) -> None:
        for reasons in self._live_reasons:
            self._reasons_base.update(reasons)
        self._samples_base += sum(self._live_ok)
        self._live_reasons = [{} for _ in range(self._slots)]
        self._live_ok = [0] * self._slots

    def __iter__(self) -> Iterator[dict]:
        self._checkpoint_live_counts()
        dataset = ShardStream(self.cfg, self.batch_size, self.rank, self.world_size, self.seed, self.tokenizer,
                              self.tag_vocab, list(self._raw_consumed))
        if self.num_workers == 0:
            source = iter(dataset)
            pull = lambda: next(source)  # noqa: E731
        else:
            loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                prefetch_factor=self.cfg.prefetch_factor, pin_memory=self.cfg.pin_memory,
                                worker_init_fn=_worker_init, persistent_workers=False)
            source = iter(loader)
            pull = lambda: next(source)  # noqa: E731
        pending = {w: deque() for w in range(self._slots)}
        while True:
            wanted = self.batches % self._slots
            while not pending[wanted]:
                try:
                    batch = pull()
                except StopIteration:
                    return
                pending[batch["_meta"]["worker"]].append(batch)
            batch = pending[wanted].popleft()
            meta = batch.pop("_meta")
            self._raw_consumed[wanted] = meta["raw"]
            self._live_reasons[wanted] = meta["reasons"]
            self._live_ok[wanted] = meta["samples_ok"]
            self.epoch = max(self.epoch, meta["epoch"])
            self.batches += 1
            yield batch

    def stats(self) -> dict:
        reasons = Counter(self._reasons_base)
        for r in self._live_reasons:
            reasons.update(r)
        return summarize(reasons, self._samples_base + sum(self._live_ok))

    def state_dict(self) -> dict:
        stats = self.stats()
        return {
            "version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "workers": self.num_workers, "batch_size": self.batch_size, "batches": self.batches,
            "epoch": self.epoch, "raw_consumed": list(self._raw_consumed),
            "samples_ok": stats["samples_ok"], "reasons": stats["reasons"],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state: unsupported loader state version {state.get('version')}")
        for name in ("seed", "world_size", "workers", "batch_size"):
            mine = {"workers": self.num_workers}.get(name, getattr(self, name, None))
            if state[name] != mine:
                raise ValueError(f"state: saved {name}={state[name]} but this loader has {name}={mine}; "
                                 "exact resume needs the same value")
        self.batches, self.epoch = int(state["batches"]), int(state["epoch"])
        self._raw_consumed = [int(x) for x in state["raw_consumed"]]
        self._reasons_base = Counter(state["reasons"])
        self._samples_base = int(state["samples_ok"])
        self._live_reasons = [{} for _ in range(self._slots)]
        self._live_ok = [0] * self._slots


def build_train_loader(cfg: DataConfig, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                       tokenizer: ClipTokenizer | None = None, tag_vocab: TagVocab | None = None):
    """The training loader chosen by cfg.decoder ("cpu" | "dali"); see the module docstring for semantics."""
    cfg.validate()
    configure_source_retry(cfg.source_retries, cfg.source_retry_backoff_s)
    tokenizer = tokenizer or ClipTokenizer(cfg.context_length)
    if cfg.decoder == "dali":
        from .dali import DaliTrainLoader

        return DaliTrainLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                               tokenizer=tokenizer, tag_vocab=tag_vocab)
    return TrainLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                       tokenizer=tokenizer, tag_vocab=tag_vocab)


class EvalDataset(IterableDataset):
    """Deterministic single pass over eval shards, yielding (key, image tensor, target), or
    (index, key, image, target) with `with_index`.

    target is the int class of a `.cls` member, else the parsed `.json` record (dict). Works with a plain
    DataLoader(batch_size=B): keys collate to a list, images to [B, 3, S, S], cls to a LongTensor, dicts of
    strings to dicts of lists. Dirty samples are skipped and counted in `stats()` (per process).

    Sharing among ranks (rank, world_size): a sample's index is its position among the samples the tar reader
    finds (consecutive members sharing a key), shards in pattern order, counted before anything is decoded.
    This rank yields the samples with index % world_size == rank and never decodes the others. Because the
    index depends only on the tar structure, every rank that reads the same bytes assigns the same index to
    the same sample: a sample whose image, json or cls is damaged keeps its index (its rank skips it and
    counts why), and a sample the tar cut off (truncated shard) gets no index on any rank. The shares therefore
    partition exactly the samples one process yields, but are not i % world_size shares of them: with
    `with_index` the index orders the gathered results. Shard-level counts (empty, truncated, unreadable
    shards and cut samples), which every rank sees, are counted by rank 0 only, so the ranks' stats() sum to
    one process's.
    """

    def __init__(self, pattern: str, image_size: int, *, rank: int = 0, world_size: int = 1,
                 with_index: bool = False):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.urls = [u for source in expand_sources(pattern) for u in source]
        self.image_size = image_size
        self.rank, self.world_size, self.with_index = rank, world_size, with_index
        self._reasons: Counter = Counter()
        self._ok = 0

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        shard_reasons = self._reasons if self.rank == 0 else Counter()  # seen by every rank: count them once
        raw_samples = (raw for url in self.urls for raw in iter_tar_samples(url, shard_reasons))
        for index, raw in enumerate(raw_samples):
            share_position, owner = divmod(index, self.world_size)
            if owner != self.rank or share_position % num_workers != worker:
                continue  # another rank's (or worker's) sample: not decoded here
            try:
                target = self._target(raw)
                image = eval_transform(decode_image(raw), self.image_size)
            except SkipSample as e:
                self._reasons[e.reason] += 1
                continue
            self._ok += 1
            sample = raw["__key__"], image, target
            yield (index, *sample) if self.with_index else sample

    @staticmethod
    def _target(raw: dict):
        if "cls" in raw:
            try:
                return int(raw["cls"].decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError):
                raise SkipSample("invalid_cls") from None
        return read_record(raw, ())

    def stats(self) -> dict:
        return summarize(self._reasons, self._ok)


def build_eval_dataset(pattern: str, *, image_size: int, rank: int = 0, world_size: int = 1,
                       with_index: bool = False) -> EvalDataset:
    """The eval samples of `pattern`; with rank/world_size only this rank's share is decoded and yielded
    (see EvalDataset for the rule); with_index yields (index, key, image, target)."""
    return EvalDataset(pattern, image_size, rank=rank, world_size=world_size, with_index=with_index)
