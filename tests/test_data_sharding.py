"""Sharding arithmetic at the presets' scale (pure functions, no data): 1 to 4,096 loader slots, 1 to 20,000
shards; one epoch gives every sample to exactly one slot and no slot opens a shard it takes nothing from; an
elastic resume deals every unread part of the epochs in progress to exactly one new slot."""

import random
from collections import Counter, defaultdict

import pytest

from hqclip_fast.data.sharding import (
    Share,
    deal_buffers,
    distribute,
    elastic_slot_states,
    epoch_shares,
    fresh_slot_state,
    remaining_work,
    resampled_shares,
)

SLOTS = [1, 2, 3, 8, 64, 513, 4096]
SHARDS = [1, 2, 7, 100, 4095, 4096, 4097, 12800, 20000]


@pytest.mark.parametrize("num_slots", SLOTS)
def test_one_epoch_gives_every_sample_to_exactly_one_slot(num_slots):
    for num_shards in SHARDS:
        per_shard: dict[int, list[Share]] = defaultdict(list)
        opened = []
        for slot in range(num_slots):
            shares = epoch_shares(num_shards, num_slots, slot, seed=3, source=0, epoch=5)
            assert shares, (num_shards, num_slots, slot)  # every slot has work
            assert len({s.shard for s in shares}) == len(shares)  # never opens a shard twice in an epoch
            opened.append(len(shares))
            for share in shares:
                per_shard[share.shard].append(share)
        assert sorted(per_shard) == list(range(num_shards))  # every shard is read
        for shares in per_shard.values():
            # the shares of a shard partition its sample positions: i % k == first, first = 0..k-1, whatever
            # the shard's length (a slot keeps only samples of its residue: it uses what it opens)
            k = len(shares)
            assert {s.step for s in shares} == {k} and sorted(s.first for s in shares) == list(range(k))
        if num_shards >= num_slots:
            assert all(len(s) == 1 for s in per_shard.values())  # whole shards: nobody reads another's bytes
            assert max(opened) - min(opened) <= 1
        else:
            assert opened == [1] * num_slots  # each slot opens exactly one shard
            steps = [len(s) for s in per_shard.values()]
            assert max(steps) - min(steps) <= 1


def test_epochs_reshuffle_and_ranks_agree():
    a = [epoch_shares(20000, 4096, 17, seed=1, source=0, epoch=e) for e in range(2)]
    assert a[0] != a[1]
    assert a[0] == epoch_shares(20000, 4096, 17, seed=1, source=0, epoch=0)  # what every rank computes
    assert epoch_shares(20000, 4096, 17, seed=1, source=1, epoch=0) != a[0]  # sources are shuffled apart


def test_resampled_generations_draw_fresh_streams():
    first = resampled_shares(20000, 64, 3, seed=0, source=0, epoch=0)
    assert len(first) == 20000 // 64
    assert resampled_shares(20000, 64, 3, seed=0, source=0, epoch=0, generation=1) != first
    assert resampled_shares(20000, 64, 3, seed=0, source=0, epoch=0) == first


def test_bad_counts_are_errors():
    with pytest.raises(ValueError, match="num_shards"):
        epoch_shares(0, 4, 0, seed=0, source=0, epoch=0)
    with pytest.raises(ValueError, match="slot"):
        epoch_shares(10, 4, 4, seed=0, source=0, epoch=0)
    with pytest.raises(ValueError, match="num_slots"):
        distribute([1.0], 0)


def test_distribute_deals_every_item_once_and_balances():
    weights = [1.0] * 20000 + [0.5] * 3001
    dealt = distribute(weights, 4096)
    assert sorted(i for d in dealt for i in d) == list(range(len(weights)))
    loads = [sum(weights[i] for i in d) for d in dealt]
    assert max(loads) - min(loads) <= 1.0


def _advanced(num_shards, num_slots, rng, latest_epoch):
    """Old slot states somewhere in epochs 0..latest_epoch: shares finished, one entered at some offset."""
    states = []
    for slot in range(num_slots):
        state = fresh_slot_state(slot, num_slots, 1)
        epoch = rng.randint(0, latest_epoch)
        shares = epoch_shares(num_shards, num_slots, slot, seed=9, source=0, epoch=epoch)
        state["streams"][0].update(epoch=epoch, share=rng.randrange(len(shares)), index=rng.randrange(50),
                                   offset=rng.choice([None, 512 * rng.randrange(1, 100)]))
        state["buffer"] = [[0, epoch, 0, i, None] for i in range(rng.randrange(3))]
        states.append(state)
    return states


@pytest.mark.parametrize("old_slots,new_slots,num_shards", [(4096, 3000, 20000), (64, 4096, 12800), (8, 3, 7),
                                                            (4, 6, 2)])
def test_elastic_resume_deals_every_unread_part_once(old_slots, new_slots, num_shards):
    rng = random.Random(old_slots)
    old = _advanced(num_shards, old_slots, rng, latest_epoch=1)
    new = elastic_slot_states(old, [num_shards], new_slots, seed=9, resampled=False)
    assert [s["slot"] for s in new] == list(range(new_slots)) and {s["num_slots"] for s in new} == {new_slots}
    assert {s["streams"][0]["epoch"] for s in new} == {2}  # the new layout starts after the latest epoch
    dealt = [item for s in new for item in s["streams"][0]["pending"]]
    # what the old slots read (finished shares, and the current one up to its index) plus what is dealt covers
    # each share of epochs 0 and 1 exactly once, and a partly read share resumes at its saved index and offset
    covered = Counter((i["epoch"], i["shard"], i["first"], i["step"]) for i in dealt)
    for state in old:
        position = state["streams"][0]
        for epoch in range(position["epoch"] + 1):
            shares = epoch_shares(num_shards, old_slots, state["slot"], seed=9, source=0, epoch=epoch)
            done = shares if epoch < position["epoch"] else shares[:position["share"]]
            covered.update((epoch, s.shard, s.first, s.step) for s in done)
    expected = Counter((e, s.shard, s.first, s.step) for e in range(2) for slot in range(old_slots)
                       for s in epoch_shares(num_shards, old_slots, slot, seed=9, source=0, epoch=e))
    assert covered == expected
    partial = {(i["epoch"], i["shard"], i["first"]): (i["index"], i["offset"]) for i in dealt if i["index"]}
    for state in old:
        position = state["streams"][0]
        share = epoch_shares(num_shards, old_slots, state["slot"], seed=9, source=0,
                             epoch=position["epoch"])[position["share"]]
        if position["index"]:
            assert partial[position["epoch"], share.shard, share.first] == (position["index"], position["offset"])
    loads = [sum(1 / i["step"] for i in s["streams"][0]["pending"]) for s in new]
    assert max(loads) - min(loads) <= 1.0
    # the buffers: every reference to exactly one new slot, whichever slots a rank asks for
    dealt = [deal_buffers((s["buffer"] for s in old), new_slots, range(first, min(first + 8, new_slots)))
             for first in range(0, new_slots, 8)]
    assert sorted(ref for d in dealt for refs in d.values() for ref in refs) == \
        sorted(ref for s in old for ref in s["buffer"])
    assert sorted(slot for d in dealt for slot in d) == list(range(new_slots))


def test_elastic_twice_keeps_pending_work():
    """4 -> 2 -> 3 slots before the dealt work is read: the second resume deals the first one's pending items."""
    old = _advanced(10, 4, random.Random(0), latest_epoch=0)
    middle = elastic_slot_states(old, [10], 2, seed=9, resampled=False)
    last = elastic_slot_states(middle, [10], 3, seed=9, resampled=False)
    first_items = sorted(map(str, (i for s in middle for i in s["streams"][0]["pending"])))
    # nothing of epoch 0 was read in between; epoch 1 (the middle layout's first epoch) is now dealt as well
    last_items = [i for s in last for i in s["streams"][0]["pending"]]
    assert sorted(str(i) for i in last_items if i["epoch"] == 0) == first_items
    epoch1 = [(i["shard"], i["first"], i["step"]) for i in last_items if i["epoch"] == 1]
    assert sorted(epoch1) == sorted((s.shard, s.first, s.step) for slot in range(2)
                                    for s in epoch_shares(10, 2, slot, seed=9, source=0, epoch=1))
    assert {s["generation"] for s in last} == {2} and {s["streams"][0]["epoch"] for s in last} == {2}


def test_remaining_work_of_a_fresh_slot_is_its_whole_epoch():
    state = fresh_slot_state(5, 8, 1)
    items = remaining_work(state, 0, 100, seed=1, until_epoch=0)
    assert [(i["shard"], i["index"], i["offset"]) for i in items] == \
        [(s.shard, 0, None) for s in epoch_shares(100, 8, 5, seed=1, source=0, epoch=0)]


def test_resampled_elastic_starts_fresh():
    old = _advanced(100, 4, random.Random(1), latest_epoch=3)
    new = elastic_slot_states(old, [100], 3, seed=9, resampled=True)
    assert all(not s["streams"][0]["pending"] for s in new) and {s["generation"] for s in new} == {1}


def test_deal_buffers_round_robin_holds_only_the_wanted_slots():
    buffers = [[("a", i) for i in range(5)], [], [("b", i) for i in range(4)]]
    assert deal_buffers(iter(buffers), 4, range(1, 3)) == {1: [("a", 1), ("b", 0)], 2: [("a", 2), ("b", 1)]}
