"""Export pool lifecycle: a cache of items; leases pin them for their readers until the last
READ, a release or expiry; only a newer export's need for room evicts, LRU first."""

import pytest
import torch

from ec_nixl.arena import Arena
from ec_nixl.control.messages import EventKind
from ec_nixl.errors import NotFoundError, PoolFullError
from ec_nixl.producer.pool import ExportPool
from ec_nixl.region import GUARD_BYTES

KiB = 1024


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_pool(capacity=16 * KiB, **kwargs):
    clock, events = Clock(), []
    pool = ExportPool(Arena(capacity), clock=clock, on_event=events.append, **kwargs)
    return pool, clock, events


def item(kib: int = 4, value: float = 1.0) -> torch.Tensor:
    """An item whose bytes and guard fill `kib` KiB of the arena."""
    return torch.full(((kib * KiB - GUARD_BYTES) // 4,), value, dtype=torch.float32)


def test_export_copies_into_the_arena():
    pool, _, events = make_pool()
    source = item(value=3.0)
    exported = pool.export("h", source)
    source.fill_(0)
    assert torch.equal(
        pool.arena.view(exported.slot, torch.float32, exported.shape), item(value=3.0)
    )
    assert [e.kind for e in events] == [EventKind.EXPORTED]


@pytest.mark.parametrize(
    "source",
    [
        torch.arange(1024, dtype=torch.float32).reshape(32, 32).t(),  # a transposed view
        torch.arange(2048, dtype=torch.bfloat16)[::2],  # every other element
    ],
    ids=["transposed", "strided"],
)
def test_an_export_of_a_view_holds_its_elements_in_order(source):
    pool, _, _ = make_pool()
    exported = pool.export("h-view", source)
    held = pool.arena.view(exported.slot, source.dtype, exported.shape)
    assert held.shape == source.shape and torch.equal(held, source)


def test_an_export_is_announced_only_once_its_bytes_are_in_place():
    arena = Arena(16 * KiB)
    in_place_when_announced = []
    pool = ExportPool(
        arena, on_event=lambda e: in_place_when_announced.append(bool(arena.buffer[:16].any()))
    )
    pool.export("h", item(value=5.0))
    assert in_place_when_announced == [True]


def test_reexport_of_a_held_hash_keeps_the_held_bytes():
    pool, _, _ = make_pool()
    first = pool.export("h", item(value=1.0))
    second = pool.export("h", item(value=2.0))
    assert second is first
    assert pool.arena.view(first.slot, torch.float32, first.shape)[0] == 1.0


def leased(pool: ExportPool, name: str) -> bool:
    """Whether a newer export could evict `name` now."""
    return bool(pool._items[name].leases)


def test_a_released_item_stays_cached_unleased_and_a_second_release_is_harmless():
    pool, _, events = make_pool()
    pool.export("h", item())
    [lease] = pool.lease(["h"])
    assert pool.release([lease.lease_id]) == 1
    assert "h" in pool and not leased(pool, "h") and pool.live_leases == 0
    assert pool.release([lease.lease_id]) == 0
    assert [e.kind for e in events] == [EventKind.EXPORTED]


def test_a_lease_for_several_readers_ends_when_the_last_read_is_done():
    pool, _, _ = make_pool()
    pool.export("h", item())
    [lease] = pool.lease(["h"], readers=2)
    pool.finish_reads([lease.lease_id])
    assert leased(pool, "h")
    pool.finish_reads([lease.lease_id])
    assert not leased(pool, "h") and pool.live_leases == 0
    pool.finish_reads([lease.lease_id])  # a late or forged notification is ignored
    assert "h" in pool


def test_an_item_stays_leased_until_every_lease_has_ended():
    pool, _, _ = make_pool()
    pool.export("h", item())
    [a], [b] = pool.lease(["h"]), pool.lease(["h"])
    pool.release([a.lease_id])
    assert leased(pool, "h")
    pool.finish_reads([b.lease_id])
    assert not leased(pool, "h")


def test_an_expired_lease_ends_without_a_release():
    pool, clock, _ = make_pool(lease_s=5.0)
    pool.export("h", item())
    pool.lease(["h"], readers=2)
    clock.now = 5.0
    pool.expire()
    assert pool.live_leases == 0 and not leased(pool, "h")


def test_a_consumer_past_its_lease_bound_is_refused_and_others_are_not(monkeypatch):
    monkeypatch.setattr("ec_nixl.producer.pool.MAX_LEASES_PER_CONSUMER", 3)
    pool, _, _ = make_pool()
    pool.export("h", item())
    pool.lease(["h", "h"], consumer="greedy")
    with pytest.raises(PoolFullError, match="'greedy' holds 2 leases and asks for 2 more"):
        pool.lease(["h", "h"], consumer="greedy")
    [lease] = pool.lease(["h"], consumer="greedy")  # up to the bound
    pool.lease(["h"], consumer="other")
    pool.release([lease.lease_id])
    pool.lease(["h"], consumer="greedy")  # room again once one ended
    assert pool.live_leases == 4


def test_a_consumer_past_the_bound_on_consumers_is_refused_and_known_ones_are_not(monkeypatch):
    monkeypatch.setattr("ec_nixl.producer.pool.MAX_CONSUMERS", 2)
    pool, _, _ = make_pool()
    pool.export("h", item())
    pool.lease(["h"], consumer="a")
    [lease] = pool.lease(["h"], consumer="b")
    with pytest.raises(PoolFullError, match="2 consumers hold leases here, at most 2"):
        pool.lease(["h"], consumer="c")
    pool.lease(["h"], consumer="a")  # a consumer that holds leases may take more
    pool.release([lease.lease_id])  # "b" holds none now
    pool.lease(["h"], consumer="c")
    assert pool.live_leases == 3


def test_leases_over_all_consumers_are_bounded(monkeypatch):
    monkeypatch.setattr("ec_nixl.producer.pool.MAX_LIVE_LEASES", 3)
    pool, clock, _ = make_pool(lease_s=5.0)
    pool.export("h", item())
    pool.lease(["h", "h"], consumer="a")
    with pytest.raises(PoolFullError, match="2 leases are live here.*at most 3 over all"):
        pool.lease(["h", "h"], consumer="b")
    pool.lease(["h"], consumer="b")
    clock.now = 5.0  # expired leases make room
    pool.lease(["h", "h", "h"], consumer="c")
    assert pool.live_leases == 3


def test_lease_is_all_or_nothing_and_names_what_is_missing():
    pool, _, _ = make_pool()
    pool.export("h", item())
    with pytest.raises(NotFoundError, match="nope") as caught:
        pool.lease(["h", "nope"])
    assert caught.value.missing == ("nope",)
    assert pool.live_leases == 0


def test_eviction_takes_the_least_recently_used_unleased_item():
    pool, _, events = make_pool(capacity=12 * KiB)
    for name in ("a", "b", "c"):
        pool.export(name, item())
    [lease] = pool.lease(["a"])  # leased: never evicted, and now most recently used
    pool.export("d", item())
    assert "b" not in pool and {"a", "c", "d"} <= {n for n in "abcd" if n in pool}
    assert (events[-2].kind, events[-2].mm_hash) == (EventKind.EVICTED, "b")
    pool.release([lease.lease_id])  # read items stay, in the order they were last used
    pool.export("e", item())
    assert "c" not in pool and {"a", "d", "e"} <= {n for n in "acde" if n in pool}


def test_an_item_read_by_all_its_readers_is_evicted_before_one_nobody_has_read():
    pool, _, _ = make_pool(capacity=12 * KiB)
    for name in ("unread", "read", "newest"):
        pool.export(name, item())
    [lease] = pool.lease(["read"])  # now the most recently used ...
    pool.finish_reads([lease.lease_id])  # ... and done with
    pool.export("next", item())
    assert "read" not in pool and {"unread", "newest", "next"} <= set(pool._items)


def test_items_held_by_claims_alone_give_way_to_a_new_export_and_their_guards_are_cleared():
    """A claim is a lease nobody asked for yet: when the arena is full, the least recently
    used item held by claims alone leaves (its claims taken back) rather than the export
    failing; an item a consumer asked for stays. Its guard is cleared before its room is
    reused, so a READ that comes anyway fails its check."""
    pool, _, events = make_pool(capacity=8 * KiB)
    claimed, asked = pool.export("claimed", item()), pool.export("asked", item())
    [claim] = pool.lease(["claimed"], claim=True)
    pool.lease(["asked"])
    guard = pool._guard(claimed)
    assert guard.item() == claimed.guard != 0
    pool.export("newer", item())
    assert "claimed" not in pool and {"asked", "newer"} <= set(pool._items)
    assert claim.lease_id not in pool._leases and pool.live_leases == 1
    assert guard.item() != claimed.guard  # the newer item's own guard now, or cleared
    assert (events[-2].kind, events[-2].mm_hash) == (EventKind.EVICTED, "claimed")
    assert pool._guard(asked).item() == asked.guard


def test_revoked_claims_end_and_unknown_ids_are_ignored():
    pool, _, _ = make_pool()
    pool.export("h", item())
    [claim] = pool.lease(["h"], claim=True)
    assert pool.revoke([claim.lease_id, 12345]) == 1
    assert pool.live_leases == 0 and pool.revoke([claim.lease_id]) == 0


def test_an_item_larger_than_the_arena_is_refused_naming_its_size():
    pool, _, _ = make_pool(capacity=4 * KiB)
    with pytest.raises(PoolFullError, match="more than the arena's 4096"):
        pool.export("huge", torch.zeros(1024, dtype=torch.float32))  # 4 KiB and its guard


def test_a_full_pool_of_leased_items_refuses_with_a_clear_error():
    pool, _, _ = make_pool(capacity=8 * KiB)
    for name in ("a", "b"):
        pool.export(name, item())
    pool.lease(["a", "b"])
    with pytest.raises(PoolFullError, match="all leased"):
        pool.export("c", item())
    assert {"a", "b"} == {n for n in "abc" if n in pool}
