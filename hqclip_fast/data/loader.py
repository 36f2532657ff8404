"""CPU training loader: webdataset shards -> PIL decode + augmentation in DataLoader workers -> batches.

Determinism (what makes `load_state_dict` exact):
- each (rank, worker) pair is a "slot"; which samples a slot reads in an epoch is a pure function of the shard
  and slot counts, the seed and the epoch (hqclip_fast.data.sharding: whole shards when there are at least as
  many shards as slots, a shard split by sample position among the slots sharing it otherwise);
- the stream of a slot is infinite (epoch after epoch), shuffled by a buffer with an RNG seeded by
  (seed, slot); the n-th sample out of the buffer is augmented with an RNG seeded by (seed, slot, n);
- batches are formed inside the workers; the loader yields batch i from worker i % workers, whatever order
  the DataLoader delivers them in.
The state (per slot, taken when the worker forms a batch, kept when the trainer takes that batch) is where each
source's stream is (epoch, share, sample index and byte offset in the current shard), the generators' states,
the shuffle buffer as sample references and the count of samples out of the buffer: resuming opens only the
current shard (seeking to the next sample's byte where the source can seek) and the shards the buffered
samples come from, whatever the step. `load_elastic` resumes on another number of ranks, workers or batch size
(see sharding.elastic_slot_states).
"""

from __future__ import annotations

import copy
import random
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache

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
from .sharding import (
    Share,
    deal_buffers,
    elastic_slot_states,
    epoch_shares,
    fresh_slot_state,
    resampled_shares,
)
from .shards import SHARD_REASONS, configure_source_retry, expand_sources, is_local, iter_tar_samples
from .tags import TagVocab
from .tokenizer import ClipTokenizer

STATE_VERSION = 2


def summarize(reasons: Counter | dict, samples_ok: int) -> dict:
    """The stats() form: {"samples_ok", "samples_skipped", "reasons"} and, with load-time annotations,
    "samples_unannotated": samples read that no annotation matched (they keep their alt-text). Shard-level counts
    and annotation counts (annotation_*) are not skipped samples."""
    reasons = {k: int(v) for k, v in sorted(reasons.items()) if v}
    skipped = sum(v for k, v in reasons.items() if k not in SHARD_REASONS and not k.startswith("annotation_"))
    summary = {"samples_ok": int(samples_ok), "samples_skipped": skipped, "reasons": reasons}
    if "annotation_matched" in reasons or "annotation_unmatched" in reasons:
        summary["samples_unannotated"] = reasons.get("annotation_unmatched", 0)
    return summary


# A shard's own faults: every slot sharing the shard sees them (each reads all its headers), one counts them.
SHARD_FAULTS = SHARD_REASONS - {"source_error", "source_failed"}  # read failures are each slot's own


class _CountsLessShardFaults:
    """The counts of a slot that shares a shard and does not read its first sample: the shard's faults are the
    first slot's to count, so a truncated shard split among k slots counts once, not k times."""

    def __init__(self, stats: Counter):
        self.stats = stats

    def __getitem__(self, reason: str) -> int:
        return self.stats[reason]

    def __setitem__(self, reason: str, count: int) -> None:
        if reason not in SHARD_FAULTS:
            self.stats[reason] = count


class SlotStream:
    """Infinite (epoch, raw sample) stream of one source for one slot. `position` (JSON, see sharding) is where
    it is, moved past each sample before that sample is yielded; a stream built from a saved position continues
    there without opening the shards before it. With `annotations` (hqclip_fast.data.annotations) each sample
    comes with its annotation merged in, as `hqclip-data join` writes it."""

    def __init__(self, urls: list[str], source: int, state: dict, seed: int, resampled: bool, stats: Counter,
                 annotations=None):
        self.urls, self.source, self.seed, self.resampled, self.stats = urls, source, seed, resampled, stats
        self.annotations = annotations
        self.slot, self.num_slots, self.generation = state["slot"], state["num_slots"], state["generation"]
        self.position = copy.deepcopy(state["streams"][source])

    def shares(self, epoch: int) -> list[Share]:
        if self.resampled:
            return resampled_shares(len(self.urls), self.num_slots, self.slot, seed=self.seed, source=self.source,
                                    epoch=epoch, generation=self.generation)
        return epoch_shares(len(self.urls), self.num_slots, self.slot, seed=self.seed, source=self.source,
                            epoch=epoch)

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        position = self.position
        while position["pending"]:
            item = position["pending"][0]
            yield from self._read(item["epoch"], Share(item["shard"], item["first"], item["step"]), item)
            position["pending"].pop(0)
        while True:
            shares = self.shares(position["epoch"])
            whole_epoch = position["share"] == 0 and position["index"] == 0
            read = 0
            while position["share"] < len(shares):
                for sample in self._read(position["epoch"], shares[position["share"]], position):
                    read += 1
                    yield sample
                position.update(share=position["share"] + 1, index=0, offset=None)
            if read == 0 and whole_epoch:
                raise RuntimeError(
                    f"train_data: slot {self.slot} of {self.num_slots} (ranks x workers) read no sample of source "
                    f"{self.source} in epoch {position['epoch']} from {len(shares)} of its {len(self.urls)} "
                    f"shard(s); with fewer shards than slots each shard is split among the slots sharing it and "
                    f"needs at least that many samples: use more shards, fewer workers or data.resampled=true. "
                    f"Reasons so far: {dict(self.stats)}")
            position.update(epoch=position["epoch"] + 1, share=0)

    def _read(self, epoch: int, share: Share, cursor: dict) -> Iterator[tuple[int, dict]]:
        """The samples of `share` from cursor's index (and byte offset) on; the cursor moves past each one."""
        keep = None if share.step == 1 else lambda index: index % share.step == share.first
        url = self.urls[share.shard]
        shard_annotations = self.annotations.for_shard(url, self.stats) if self.annotations is not None else None
        counts = self.stats if share.first == 0 else _CountsLessShardFaults(self.stats)
        for sample in iter_tar_samples(url, counts, at=(cursor["index"], cursor["offset"]), keep=keep):
            cursor["index"], cursor["offset"] = sample["__index__"] + 1, sample["__end__"]
            sample["__ref__"] = [self.source, epoch, share.shard, sample["__index__"], sample["__start__"]]
            yield epoch, shard_annotations.annotate(sample) if shard_annotations else sample


def buffered_items(sources: list[list[str]], refs: list[list], stats: Counter,
                   annotate: Callable[[dict], dict] | None = None) -> list[tuple[int, dict]]:
    """The shuffle buffer's (epoch, sample) items that references [source, epoch, shard, index, byte offset]
    name, in their order. A sample of a local uncompressed tar stays a reference ({"__ref__": ref}), read when
    it leaves the buffer (`read_reference`: one seek), so a resume does not wait for the whole buffer; the
    others' shards are entered once each, at their first wanted sample, and read up to the last. A sample that
    cannot be read again is counted ('buffered_sample_lost'), not silently dropped. `annotate` merges a sample's
    load-time annotation in again."""
    found, streamed = {}, defaultdict(dict)
    for source, _, shard, index, offset in refs:
        if offset is None or not is_local(sources[source][shard]):
            streamed[source, shard][index] = offset
    for (source, shard), offsets in streamed.items():
        first = min(offsets)
        for sample in iter_tar_samples(sources[source][shard], Counter(), at=(first, offsets[first]),
                                       keep=offsets.__contains__):
            found[source, shard, sample["__index__"]] = annotate(sample) if annotate else sample
            if sample["__index__"] == max(offsets):
                break
    items = []
    for ref in refs:
        if (ref[0], ref[2]) not in streamed:
            items.append((ref[1], {"__ref__": list(ref)}))
        elif (ref[0], ref[2], ref[3]) in found:
            items.append((ref[1], {**found[ref[0], ref[2], ref[3]], "__ref__": list(ref)}))
        else:
            stats["buffered_sample_lost"] += 1
    return items


def read_reference(sources: list[list[str]], ref: list) -> dict | None:
    """The sample a buffer reference names, read from its byte offset in a local tar (None: not there)."""
    source, _, shard, index, offset = ref
    sample = next(iter_tar_samples(sources[source][shard], Counter(), at=(index, offset), keep=index.__eq__), None)
    return None if sample is None else {**sample, "__ref__": list(ref)}


def mix_sources(streams: list[Iterator], weights: list[float], rng: random.Random) -> Iterator[tuple[int, dict]]:
    if len(streams) == 1:
        yield from streams[0]
        return
    while True:
        yield next(streams[rng.choices(range(len(streams)), weights=weights)[0]])


def sample_bytes(item: tuple[int, dict]) -> int:
    """Encoded payload of a buffered (epoch, raw sample): its members' bytes, what dominates its memory (a
    resumed buffer's references to samples not read yet hold none)."""
    return sum(len(v) for v in item[1].values() if isinstance(v, bytes))


def shuffle_buffer(stream: Iterator, size: int, rng: random.Random, buffer: list, max_bytes: int = 0) -> Iterator:
    """Reservoir-style shuffle through a buffer of at most `size` items and (max_bytes > 0) at most `max_bytes`
    of sample payload (`sample_bytes`): each new item goes in, then random items are emitted until both bounds
    hold again; an item larger than max_bytes alone passes straight through. `buffer` (the caller's list, filled
    on resume) holds exactly the items read and not yet emitted whenever an item is emitted: it is part of the
    loader's state."""
    if size <= 1:
        while buffer:
            yield buffer.pop(0)
        yield from stream
        return
    held = sum(map(sample_bytes, buffer)) if max_bytes else 0
    for item in stream:
        nbytes = sample_bytes(item) if max_bytes else 0
        if nbytes > max_bytes > 0:
            yield item
            continue
        buffer.append(item)
        held += nbytes
        while len(buffer) > size or held > max_bytes > 0:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            out = buffer.pop()
            held -= sample_bytes(out) if max_bytes else 0
            yield out
    rng.shuffle(buffer)
    while buffer:
        yield buffer.pop()


def _random(name: str, generation: int, state: list | None) -> random.Random:
    rng = random.Random(name if not generation else f"{name}-{generation}")
    if state is not None:
        version, internal, gauss = state
        rng.setstate((version, tuple(internal), gauss))
    return rng


class ShardStream(IterableDataset):
    """Infinite stream of collated batches for this rank; each worker forms whole batches from its slot state.
    A batch holds images, pos_tokens, keys, epochs (the epoch each sample was read in) and, as configured,
    neg_tokens and tag_ids."""

    def __init__(self, cfg: DataConfig, batch_size: int, seed: int, tokenizer: ClipTokenizer,
                 tag_vocab: TagVocab | None, slot_states: list[dict]):
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.tokenizer, self.tag_vocab, self.slot_states = tokenizer, tag_vocab, slot_states
        self.sources = expand_sources(cfg.train_data)
        weights = cfg.train_data_weights or [1.0] * len(self.sources)
        if len(weights) != len(self.sources) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"train_data_weights: need {len(self.sources)} non-negative weights, got {weights}")
        self.weights = list(weights)
        self.annotations = load_time_annotations(cfg, [u for urls in self.sources for u in urls])

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        state = self.slot_states[worker]
        slot, generation = state["slot"], state["generation"]
        stats: Counter = Counter()
        streams = [SlotStream(urls, i, state, self.seed, self.cfg.resampled, stats, self.annotations)
                   for i, urls in enumerate(self.sources)]
        mix_rng = _random(f"mix-{self.seed}-{slot}", generation, state["mix"])
        shuffle_rng = _random(f"shuffle-{self.seed}-{slot}", generation, state["shuffle"])
        # A resumed buffer's samples are read again raw: their annotations are merged in again. The buffer
        # spans the last few shards each stream read, so a few shards' annotations at a time serve it.
        annotations_of = lru_cache(maxsize=8)(self.annotations.for_shard) if self.annotations is not None else None
        annotate = (lambda sample: annotations_of(sample["__url__"]).annotate(sample)) if annotations_of else None
        buffer = buffered_items(self.sources, state["buffer"], stats, annotate)
        raw = shuffle_buffer(mix_sources([iter(s) for s in streams], self.weights, mix_rng), self.cfg.shuffle_buffer,
                             shuffle_rng, buffer, max_bytes=int(self.cfg.shuffle_buffer_mib * 2**20))
        index = state["raw"]
        augment_key = [self.seed, slot] + ([generation] if generation else [])
        samples, epochs, samples_ok, last_ok_epoch = [], [], 0, None
        for epoch, sample in raw:
            index += 1
            last_ok_epoch = epoch if last_ok_epoch is None else last_ok_epoch
            if "__key__" not in sample:  # a buffered sample of the resumed state: read it now
                sample = read_reference(self.sources, sample["__ref__"])
                if sample is None:
                    stats["buffered_sample_lost"] += 1
                    continue
                if annotate is not None:
                    sample = annotate(sample)
            try:
                samples.append(decode_train_sample(sample, self.cfg, np.random.default_rng(augment_key + [index - 1]),
                                                   self.tag_vocab))
            except SkipSample as e:
                stats[e.reason] += 1
                if epoch - last_ok_epoch >= 2:  # a whole epoch without one usable sample: fail, don't spin
                    raise RuntimeError(f"train_data: no usable sample in a whole epoch for slot {slot}; "
                                       f"skipped: {dict(stats)}") from None
                continue
            samples_ok += 1
            last_ok_epoch = epoch
            epochs.append(epoch)
            if len(samples) == self.batch_size:
                batch = self.collate(samples) | {"epochs": epochs}
                batch["_meta"] = {"worker": worker, "epoch": epoch, "reasons": dict(stats), "samples_ok": samples_ok,
                                  "state": {**state, "streams": [copy.deepcopy(s.position) for s in streams],
                                            "mix": list(mix_rng.getstate()), "shuffle": list(shuffle_rng.getstate()),
                                            "buffer": [item[1]["__ref__"] for item in buffer], "raw": index}}
                samples, epochs = [], []
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
        self._sources = ShardStream(cfg, batch_size, seed, tokenizer, tag_vocab, []).sources  # validates them
        self._slot_states = [fresh_slot_state(rank * self._slots + w, world_size * self._slots, len(self._sources))
                             for w in range(self._slots)]
        self._reasons_base: Counter = Counter()  # counts from before the last (re)start
        self._samples_base = 0
        self._live_reasons: list[dict] = [{} for _ in range(self._slots)]
        self._live_ok = [0] * self._slots
        self.batches = 0
        self.epoch = 0

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
        dataset = ShardStream(self.cfg, self.batch_size, self.seed, self.tokenizer, self.tag_vocab,
                              copy.deepcopy(self._slot_states))
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
            self._slot_states[wanted] = meta["state"]
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
            "epoch": self.epoch, "slots": copy.deepcopy(self._slot_states),
            "samples_ok": stats["samples_ok"], "reasons": stats["reasons"],
        }

    def _check_version(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state: unsupported loader state version {state.get('version')} (this loader reads "
                             f"version {STATE_VERSION})")

    def resumes_exactly(self, state: dict) -> bool:
        """Whether `state` (this rank's) was saved by a loader of the same layout: load_state_dict takes it."""
        return all(state.get(name) == value for name, value in self._layout().items())

    def _layout(self) -> dict:
        return {"seed": self.seed, "world_size": self.world_size, "workers": self.num_workers,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that saved `state` (same layout, this rank) stopped."""
        self._check_version(state)
        for name, mine in self._layout().items():
            if state[name] != mine:
                raise ValueError(f"state: saved {name}={state[name]} but this loader has {name}={mine}; "
                                 "exact resume needs the same value (load_elastic takes every rank's state)")
        self.batches, self.epoch = int(state["batches"]), int(state["epoch"])
        self._slot_states = copy.deepcopy(state["slots"])
        self._restore_counts(state)

    def load_elastic(self, states: Iterable[dict]) -> None:
        """Continue from every rank's saved state, given in rank order, on this loader's layout (another number of
        ranks, workers or another batch size; the seed must match). `states` may be a generator: one state is
        held at a time, less its buffer and generators. See sharding.elastic_slot_states and deal_buffers for
        what is guaranteed. The batch count restarts; this rank's sample counts continue those of the saved ranks
        r with r % world_size == rank, so the counts summed over ranks carry over whole, ranks lost included."""
        mine = range(self.rank * self._slots, (self.rank + 1) * self._slots)
        old, saved = [], {"epoch": 0, "counts": {"reasons": Counter(), "samples_ok": 0}}

        def buffers():  # reads the states one by one, keeping what the new layout needs
            for rank, state in enumerate(states):
                self._check_version(state)
                if state["seed"] != self.seed:
                    raise ValueError(f"state: saved seed={state['seed']} but this loader has seed={self.seed}; "
                                     "the shard orders of the epochs in progress depend on it")
                if state["rank"] != rank:
                    raise ValueError(f"state: rank {state['rank']}'s loader state where rank {rank}'s belongs")
                old.extend({key: slot[key] for key in ("slot", "num_slots", "generation", "streams")}
                           for slot in state["slots"])
                saved["epoch"] = max(saved["epoch"], int(state["epoch"]))
                if rank % self.world_size == self.rank:
                    saved["counts"]["reasons"].update(state["reasons"])
                    saved["counts"]["samples_ok"] += int(state["samples_ok"])
                for slot in state["slots"]:
                    yield slot["buffer"]

        dealt = deal_buffers(buffers(), self.world_size * self._slots, mine)
        new = elastic_slot_states(old, [len(urls) for urls in self._sources], self.world_size * self._slots,
                                  seed=self.seed, resampled=self.cfg.resampled)
        self._slot_states = [new[slot] | {"buffer": dealt[slot]} for slot in mine]
        self.batches, self.epoch = 0, saved["epoch"]
        self._restore_counts(saved["counts"])

    def _restore_counts(self, state: dict) -> None:
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

    A sample's index is (its shard's number in pattern order) * 2**24 + (its position among the samples the tar
    reader finds in that shard, consecutive members sharing a key), counted before anything is decoded: indices
    order the samples as one process reads them, whoever reads them. A damaged sample keeps its index (its
    reader skips it and counts why); a sample the tar cut off (truncated shard) gets none.

    Sharing among ranks (rank, world_size): with at least as many shards as ranks, rank r reads whole shards
    r, r + world_size, ... and opens no other (each byte of the set is read once over the ranks; the shares
    then differ by up to a shard). With fewer shards, every rank reads every shard's headers and keeps the samples
    at positions p (counting all shards' samples in order) with p % world_size == rank, passing the others over
    unread in a local tar (iter_tar_samples' `keep`) and never decoding them; a shard's faults (empty, truncated,
    corrupt, unreadable), which every rank then sees, are counted by rank 0 only, a cut sample by its rank. Either
    way the shares partition exactly the samples one process yields and the
    ranks' stats() sum to one process's; with `with_index` the index orders the gathered results. DataLoader
    workers of a rank split its samples by position the same way.
    """

    INDEX_STRIDE = 1 << 24  # samples a shard may hold

    def __init__(self, pattern: str, image_size: int, *, rank: int = 0, world_size: int = 1,
                 with_index: bool = False):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.urls = [u for source in expand_sources(pattern) for u in source]
        self.image_size = image_size
        self.rank, self.world_size, self.with_index = rank, world_size, with_index
        self.by_shard = len(self.urls) >= world_size
        self._reasons: Counter = Counter()
        self._ok = 0

    def _raw_samples(self, counts, mine: Callable[[int], bool]) -> Iterator[tuple[int, dict]]:
        """(index, raw sample) of the samples at the positions `mine` takes, positions counting the samples of
        the shards read in order; the others are passed over by the shard reader."""
        numbers = range(len(self.urls))
        before = 0  # samples in the shards read before this one
        for number in numbers[self.rank::self.world_size] if self.by_shard else numbers:
            found = 0

            def keep(index: int, start: int = before) -> bool:  # asked once per sample of the shard, in order
                nonlocal found
                found = index + 1
                return mine(start + index)

            for raw in iter_tar_samples(self.urls[number], counts, keep=keep):
                if raw["__index__"] >= self.INDEX_STRIDE:
                    raise ValueError(f"eval shard {self.urls[number]} holds more than {self.INDEX_STRIDE} samples")
                yield number * self.INDEX_STRIDE + raw["__index__"], raw
            before += found

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # the samples are this rank's (its shards'), or every rank's to be split by position
        owners, owner = (1, 0) if self.by_shard else (self.world_size, self.rank)

        def mine(position: int) -> bool:  # not another rank's (or worker's) sample
            share_position, holder = divmod(position, owners)
            return holder == owner and share_position % num_workers == worker

        # a shard's faults: by the only rank reading the shard, or once (rank 0) when every rank reads it
        counts = self._reasons if self.by_shard or self.rank == 0 else _CountsLessShardFaults(self._reasons)
        for index, raw in self._raw_samples(counts, mine):
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
