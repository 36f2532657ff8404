"""Which samples each loader slot reads: pure functions of counts, seeds and epochs (no I/O), so that the
arithmetic is tested at the presets' scale (thousands of slots, tens of thousands of shards) without data.

A slot is one (rank, DataLoader worker) pair; `num_slots` = world size x workers. A `Share` is the part of one
shard a slot reads: the samples whose position in the shard is first, first + step, first + 2 step, ...

Without resampling, an epoch's shard order is a permutation drawn from (seed, source, epoch), the same on every
rank. With at least as many shards as slots, slot s reads whole shards s, s + num_slots, ... of that order (the
slots' shard counts differ by at most one). With fewer shards than slots, the slots sharing a shard split it by
sample position: shard p of the order is read by slots p, p + num_shards, ..., each keeping every k-th sample
(k = the number of slots sharing it), so every slot opens exactly one shard and uses its samples; the others'
members are passed over by their tar headers, never decoded. A shard with fewer samples than the slots sharing
it leaves a slot without data: the loader then stops with an error that names the counts and `resampled`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Share:
    """Samples first, first + step, ... (positions in the shard) of shard number `shard` of a source."""

    shard: int
    first: int = 0
    step: int = 1


@lru_cache(maxsize=16)
def shard_order(num_shards: int, seed: int, source: int, epoch: int) -> tuple[int, ...]:
    """The epoch's shard order, identical on every rank (cached: every slot of a process asks for it)."""
    return tuple(int(i) for i in np.random.default_rng([seed, source, epoch]).permutation(num_shards))


def epoch_shares(num_shards: int, num_slots: int, slot: int, *, seed: int, source: int, epoch: int) -> list[Share]:
    """What `slot` reads of one source in one epoch without resampling (see the module docstring)."""
    if num_shards < 1 or not 0 <= slot < num_slots:
        raise ValueError(f"need num_shards >= 1 and 0 <= slot < num_slots, got {num_shards}, {slot}, {num_slots}")
    order = shard_order(num_shards, seed, source, epoch)
    if num_shards >= num_slots:
        return [Share(order[i]) for i in range(slot, num_shards, num_slots)]
    position = slot % num_shards
    sharing = len(range(position, num_slots, num_shards))
    return [Share(order[position], first=slot // num_shards, step=sharing)]


def resampled_shares(num_shards: int, num_slots: int, slot: int, *, seed: int, source: int, epoch: int,
                     generation: int = 0) -> list[Share]:
    """A resampled "epoch" of `slot`: num_shards // num_slots shards (at least one) drawn with replacement from a
    stream seeded by (seed, source, slot, epoch) and, after an elastic resume, its generation (fresh streams)."""
    key = [seed, source, slot, epoch, 1] + ([generation] if generation else [])
    drawn = np.random.default_rng(key).integers(0, num_shards, size=max(1, num_shards // num_slots))
    return [Share(int(i)) for i in drawn]


def distribute(weights: list[float], num_slots: int) -> list[list[int]]:
    """Deal items (by index) to `num_slots` slots, each to the least loaded slot so far (ties: lowest slot), in
    item order: deterministic, every item to exactly one slot, loads within one item's weight of each other."""
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    dealt: list[list[int]] = [[] for _ in range(num_slots)]
    loads = [(0.0, slot) for slot in range(num_slots)]
    for item, weight in enumerate(weights):
        load, slot = heapq.heappop(loads)
        dealt[slot].append(item)
        heapq.heappush(loads, (load + weight, slot))
    return dealt


# Loader state. A slot's state (JSON) says where it is: per source a position {"epoch", "share" (index into
# that epoch's shares), "index" and "offset" (the next sample of that share and the byte where it begins, None
# where unknown), "pending" (work dealt to it by an elastic resume, done first: items {"epoch", "shard", "first",
# "step", "index", "offset"})}, its random generators' states, the shuffle buffer as references
# [source, epoch, shard, sample index, byte offset] and the count of samples that left the buffer ("raw").


def work_item(epoch: int, share: Share, index: int = 0, offset: int | None = None) -> dict:
    return {"epoch": epoch, "shard": share.shard, "first": share.first, "step": share.step, "index": index,
            "offset": offset}


def fresh_slot_state(slot: int, num_slots: int, num_sources: int, *, generation: int = 0,
                     epochs: list[int] | None = None) -> dict:
    epochs = epochs or [0] * num_sources
    return {"slot": slot, "num_slots": num_slots, "generation": generation,
            "streams": [{"epoch": e, "share": 0, "index": 0, "offset": None, "pending": []} for e in epochs],
            "mix": None, "shuffle": None, "buffer": [], "raw": 0}


def remaining_work(state: dict, source: int, num_shards: int, *, seed: int, until_epoch: int) -> list[dict]:
    """The work items `state` (a slot without resampling) has not read of epochs up to `until_epoch`."""
    position = state["streams"][source]
    items = [dict(item) for item in position["pending"]]
    for epoch in range(position["epoch"], until_epoch + 1):
        shares = epoch_shares(num_shards, state["num_slots"], state["slot"], seed=seed, source=source, epoch=epoch)
        for i, share in enumerate(shares):
            if epoch > position["epoch"] or i > position["share"]:
                items.append(work_item(epoch, share))
            elif i == position["share"]:
                items.append(work_item(epoch, share, position["index"], position["offset"]))
    return items


def elastic_slot_states(old: list[dict], num_shards: list[int], num_slots: int, *, seed: int,
                        resampled: bool) -> list[dict]:
    """Slot states for `num_slots` new slots that continue the saved states `old` (any number of slots).

    Without resampling, per source: every old slot's unread work up to the latest epoch any of them reached
    (its current share from its saved offset, its later shares, its pending items) is dealt to the new slots;
    shards an old slot finished stay done. Then every new slot starts the next epoch in the new layout. So within
    each epoch no sample is read twice and none is lost. With resampling, the new slots start fresh streams (a
    new generation in their seeds). The old shuffle buffers are dealt by `deal_buffers`, so `old` may come
    without them (and without the generators' states)."""
    generation = 1 + max(s["generation"] for s in old)
    latest = [max(s["streams"][source]["epoch"] for s in old) for source in range(len(num_shards))]
    new = [fresh_slot_state(slot, num_slots, len(num_shards), generation=generation,
                            epochs=[e + 1 for e in latest]) for slot in range(num_slots)]
    if not resampled:
        for source, shards in enumerate(num_shards):
            items = [item for s in old
                     for item in remaining_work(s, source, shards, seed=seed, until_epoch=latest[source])]
            for slot, dealt in enumerate(distribute([1 / item["step"] for item in items], num_slots)):
                new[slot]["streams"][source]["pending"] = [items[i] for i in dealt]
    return new


def deal_buffers(buffers: Iterable[list], num_slots: int, wanted: range) -> dict[int, list]:
    """The old slots' shuffle buffers (references, in old slot order) dealt round-robin to `num_slots` new slots:
    the reference at position p of their concatenation goes to new slot p % num_slots (samples read but not yet
    trained on are not lost). Returns the `wanted` slots' lists only, holding one old buffer at a time."""
    dealt, position = {slot: [] for slot in wanted}, 0
    for buffer in buffers:
        for ref in buffer:
            if position % num_slots in dealt:
                dealt[position % num_slots].append(ref)
            position += 1
    return dealt
