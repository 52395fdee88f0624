"""Pulls between real processes: NIXL over UCX for the bytes, gRPC on loopback for the rest."""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time
from dataclasses import replace

import pytest
import torch
from conftest import MiB, spec, wait_until

from ec_nixl.arena import Arena
from ec_nixl.consumer.puller import Puller
from ec_nixl.consumer.receiver import ModelShape, Receiver
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.consumer.worker_link import PullOrder
from ec_nixl.errors import (
    DeadlineExceededError,
    NotFoundError,
    PeerDeadError,
    RefusedError,
    StaleDataError,
)
from ec_nixl.producer.exporter import ExporterConfig
from ec_nixl.region import Region
from integration.exporter_process import ExporterProcess, TensorSpec, pull

# Failures must surface well within this, whatever the peer does.
DEADLINE_S = 2.0
PAGE = 4096  # an item's guard takes a page more of the arena when its bytes fill theirs


@pytest.mark.parametrize(
    "dtype, shape",
    [
        (torch.bfloat16, (577, 1024)),
        (torch.float16, (3, 64, 128)),
        (torch.float32, (1,)),
        (torch.float32, (1024, 1153)),
    ],
)
def test_pulled_bytes_equal_the_exported_bytes(producer, resolver, puller, dtype, shape):
    source = spec(shape, dtype, seed=len(shape))
    mm_hash = f"bytes-{dtype}-{shape}"
    producer.export(mm_hash, source)
    [item] = pull(resolver, puller, producer.address, [mm_hash])
    assert item.tensor.dtype == dtype and tuple(item.tensor.shape) == shape
    assert torch.equal(item.tensor, source.make())
    puller.free(item)


def test_several_items_arrive_in_one_pull_in_the_order_asked(producer, resolver, puller):
    specs = {f"multi-{i}": spec((100 + i, 64), seed=100 + i) for i in range(3)}
    for mm_hash, s in specs.items():
        producer.export(mm_hash, s)
    order = ["multi-2", "multi-0", "multi-1"]
    items = pull(resolver, puller, producer.address, order)
    assert [item.mm_hash for item in items] == order
    for item in items:
        assert torch.equal(item.tensor, specs[item.mm_hash].make())
        puller.free(item)


def test_a_pull_ends_its_lease_and_the_item_stays_for_the_next_consumer(producer, resolver, puller):
    producer.export("read-once", spec(seed=7))
    [item] = pull(resolver, puller, producer.address, ["read-once"])
    puller.free(item)
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)
    [again] = pull(resolver, puller, producer.address, ["read-once"])
    assert torch.equal(again.tensor, spec(seed=7).make())
    puller.free(again)


def test_a_read_long_after_its_lease_completes_and_ends_it(producer, resolver, puller):
    """A READ that comes well after its lease (a claim read late) completes, and its
    notification ends the lease."""
    producer.export("read-late", spec(seed=9))
    resolution = resolver.resolve(producer.address, ["read-late"], time.monotonic() + DEADLINE_S)
    time.sleep(0.3)
    [item] = puller.read(resolution, time.monotonic() + DEADLINE_S)
    assert torch.equal(item.tensor, spec(seed=9).make())
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)
    puller.free(item)


def test_a_lease_for_two_ranks_ends_only_when_both_have_read(producer, resolver, puller):
    producer.export("two-ranks", spec(seed=8))
    resolution = resolver.resolve(
        producer.address, ["two-ranks"], time.monotonic() + DEADLINE_S, readers=2
    )
    other_rank = Puller(Arena(8 * MiB))
    [first] = puller.read(resolution, time.monotonic() + DEADLINE_S)
    time.sleep(0.2)  # the exporter took the first READ's notification by now
    assert producer.stats()["live_leases"] == 1
    [second] = other_rank.read(resolution, time.monotonic() + DEADLINE_S)
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)
    assert torch.equal(first.tensor, second.tensor)
    puller.free(first)


def test_a_read_that_lost_its_lease_to_an_eviction_is_thrown_away(resolver, puller):
    with ExporterProcess(ExporterConfig(capacity_bytes=MiB + PAGE, lease_s=0.3)) as producer:
        producer.export("evicted", spec((512, 1024), seed=9))  # the whole arena, with its guard
        deadline = time.monotonic() + DEADLINE_S
        resolution = resolver.resolve(producer.address, ["evicted"], deadline)
        time.sleep(0.5)  # the lease expired: the slot may now be reused ...
        producer.export("newer", spec((512, 1024), seed=10))  # ... and is
        used = puller.arena.bytes_used
        with pytest.raises(StaleDataError):
            puller.read(resolution, deadline)
        assert puller.arena.bytes_used == used


def test_a_read_under_a_claim_taken_back_for_room_fails_its_guard_check(resolver, puller):
    """A claim's item may give way to a newer export before the claim is read; the READ
    that comes anyway, well within the claim's time, gets the newer item's bytes and
    guard, and keeps none of them."""
    with ExporterProcess(ExporterConfig(capacity_bytes=MiB + PAGE)) as producer:
        stream = resolver.clients(producer.address).watch("claimer", claim=True)
        try:
            stream.wait_open()
            producer.export("claimed", spec((512, 1024), seed=11))
            announcement = next(iter(stream))
            deadline = time.monotonic() + DEADLINE_S
            claim = resolver.checked(
                producer.address, [announcement.claim], announcement.received_at, deadline
            )
            producer.export("newer", spec((512, 1024), seed=12))  # takes the claim's room
            used = puller.arena.bytes_used
            with pytest.raises(StaleDataError, match="claimed left .* memory during the READ"):
                puller.read(claim, deadline)
            assert puller.arena.bytes_used == used
        finally:
            stream.close()


def test_unknown_mm_hash_fails_with_not_found_and_keeps_the_local_arena_empty(
    producer, resolver, puller
):
    used = puller.arena.bytes_used
    with pytest.raises(NotFoundError, match="never-exported"):
        pull(resolver, puller, producer.address, ["never-exported"])
    assert puller.arena.bytes_used == used


def _pull_in_child(address, mm_hash, source: TensorSpec, resolved, go, results) -> None:
    resolver, puller = Resolver(consumer_id="second-consumer"), Puller(Arena(8 * MiB))
    resolution = resolver.resolve(address, [mm_hash], time.monotonic() + 30)
    resolved.set()
    go.wait(30)
    [item] = puller.read(resolution, time.monotonic() + 30)
    results.put(torch.equal(item.tensor, source.make()))


def test_two_consumer_processes_read_the_same_item_at_once(producer, resolver, puller):
    source = spec((1024, 1024), seed=11)
    producer.export("shared-item", source)
    context = mp.get_context("spawn")
    resolved, go, results = context.Event(), context.Event(), context.Queue()
    child = context.Process(
        target=_pull_in_child,
        args=(producer.address, "shared-item", source, resolved, go, results),
    )
    child.start()
    try:
        assert resolved.wait(60), "the second consumer did not resolve"
        resolution = resolver.resolve(producer.address, ["shared-item"], time.monotonic() + 30)
        go.set()  # both hold a lease now; both READs run together
        [item] = puller.read(resolution, time.monotonic() + 30)
        assert torch.equal(item.tensor, source.make())
        puller.free(item)
        assert results.get(timeout=30) is True
    finally:
        child.join(10)
        child.kill()
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)


def test_two_consumers_with_leases_keep_the_item_until_both_release(producer, resolver, puller):
    producer.export("twice-leased", spec(seed=12))
    deadline = time.monotonic() + DEADLINE_S
    first = resolver.resolve(producer.address, ["twice-leased"], deadline)
    second = resolver.resolve(producer.address, ["twice-leased"], deadline)
    [a] = puller.read(first, deadline)
    [b] = puller.read(second, deadline)
    assert torch.equal(a.tensor, b.tensor)
    puller.free(a)
    puller.free(b)
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)


def test_two_producers_exporting_the_same_mm_hash_never_mix(resolver, puller):
    config = ExporterConfig(capacity_bytes=16 * MiB)
    with ExporterProcess(config) as one, ExporterProcess(config) as two:
        sources = {one.address: spec(seed=21), two.address: spec(seed=22)}
        for process in (one, two):
            process.export("same-hash", sources[process.address])
        pulls = {}
        threads = [
            threading.Thread(
                target=lambda a=a: pulls.update({a: pull(resolver, puller, a, ["same-hash"])})
            )
            for a in sources
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for address, source in sources.items():
            [item] = pulls[address]
            assert torch.equal(item.tensor, source.make())
            puller.free(item)


def test_lease_expiry_ends_an_abandoned_lease_without_a_release(resolver):
    with ExporterProcess(ExporterConfig(capacity_bytes=4 * MiB, lease_s=0.3)) as producer:
        producer.export("abandoned", spec(seed=31))
        resolver.resolve(producer.address, ["abandoned"], time.monotonic() + DEADLINE_S)
        assert producer.stats()["live_leases"] == 1
        assert wait_until(lambda: producer.stats()["live_leases"] == 0)


def test_descriptor_outside_the_exporters_memory_is_refused_before_any_read(
    producer, resolver, puller
):
    producer.export("forged", spec(seed=41))
    client = resolver.client(producer.address)
    genuine = client.resolve

    def forge(*args, **kwargs):
        [item] = genuine(*args, **kwargs)
        moved = replace(item.region, address=item.region.address + (1 << 40))
        return [replace(item, region=moved)]

    client.resolve = forge
    try:
        with pytest.raises(RefusedError, match="outside the exporter's memory"):
            pull(resolver, puller, producer.address, ["forged"])
    finally:
        del client.resolve
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)


@pytest.mark.parametrize("answer", ["another item's", "none"])
def test_a_resolve_answered_for_other_items_is_refused_before_any_read(
    producer, resolver, puller, answer
):
    producer.export("asked", spec(seed=42))
    producer.export("victim", spec(seed=43))
    client = resolver.client(producer.address)
    genuine = client.resolve

    def rename(mm_hashes, *args, **kwargs):
        return genuine(["victim"], *args, **kwargs) if answer != "none" else []

    client.resolve = rename
    used = puller.arena.bytes_used
    try:
        with pytest.raises(RefusedError, match=r"answered a resolve of \['asked'\]"):
            pull(resolver, puller, producer.address, ["asked"])
    finally:
        del client.resolve
    assert puller.arena.bytes_used == used
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)  # given back


def test_nixl_refuses_a_read_outside_registered_memory(producer, resolver, puller):
    peer = resolver.peer(producer.address)
    exporter_memory = peer.regions[0]
    outside = Region(exporter_memory.address + exporter_memory.length, 4096, "cpu", 0)
    slot = puller.arena.allocate(4096)
    local = Region(puller.arena.address(slot), 4096, "cpu", 0)
    try:
        with pytest.raises(RefusedError, match="NIXL refused"):
            puller.agent.read(peer.agent_name, [outside], [local], deadline=time.monotonic() + 2)
    finally:
        puller.arena.free(slot)


def test_producer_killed_before_the_pull_fails_fast_and_the_consumer_survives(resolver, puller):
    with ExporterProcess(ExporterConfig(capacity_bytes=4 * MiB)) as producer:
        producer.export("orphan", spec(seed=51))
        producer.kill()
        start = time.monotonic()
        with pytest.raises(PeerDeadError):
            pull(resolver, puller, producer.address, ["orphan"], timeout_s=DEADLINE_S)
        assert time.monotonic() - start < DEADLINE_S


def test_producer_killed_during_a_read_fails_fast_and_the_consumer_survives(
    producer, resolver, puller
):
    with ExporterProcess(ExporterConfig(capacity_bytes=80 * MiB)) as victim:
        victim.export("mid-read", spec((32 * MiB,), torch.bfloat16, seed=61))
        resolution = resolver.resolve(victim.address, ["mid-read"], time.monotonic() + DEADLINE_S)
        victim.signal(signal.SIGSTOP)  # the READ cannot finish while the exporter is frozen
        killer = threading.Timer(0.3, victim.kill)
        killer.start()
        start = time.monotonic()
        with pytest.raises(PeerDeadError):
            puller.read(resolution, time.monotonic() + 10)
        assert time.monotonic() - start < DEADLINE_S
        killer.join()
    producer.export("after-the-crash", spec(seed=62))
    [item] = pull(resolver, puller, producer.address, ["after-the-crash"])
    assert torch.equal(item.tensor, spec(seed=62).make())
    puller.free(item)


def test_a_read_past_its_deadline_disconnects_before_its_slot_is_reused(resolver, puller):
    with ExporterProcess(ExporterConfig(capacity_bytes=8 * MiB)) as producer:
        producer.export("stalled", spec(seed=71))
        resolution = resolver.resolve(producer.address, ["stalled"], time.monotonic() + DEADLINE_S)
        producer.signal(signal.SIGSTOP)
        start = time.monotonic()
        try:
            with pytest.raises(DeadlineExceededError):
                puller.read(resolution, start + 0.5)
            assert time.monotonic() - start < 0.5 + 0.5
            # The READ may still be in flight: its connection is gone before its slot is free.
            assert not puller.agent.has_peer(resolution.peer.agent_name)
            assert puller.arena.bytes_used == 0
        finally:
            producer.signal(signal.SIGCONT)
        [item] = pull(resolver, puller, producer.address, ["stalled"])  # met again
        assert torch.equal(item.tensor, spec(seed=71).make())
        puller.free(item)


def test_a_read_past_its_deadline_leaves_a_concurrent_read_from_that_exporter_to_finish(
    resolver, puller, monkeypatch
):
    """The stalled READ's peer goes only once no READ uses it: the other READ, with a
    longer deadline, ends when the exporter wakes (it failed with NIXL's untyped
    nixlNotFoundError when the first one's deadline removed the peer under it).

    The exporter speaks UCX over TCP alone, where a READ is served by the exporter's
    process: a stopped exporter stalls every READ. (Over cma a READ is the reader's
    own copy, and whether one needs the exporter's side at all is up to UCX: 1 in 12
    completed from a stopped exporter.)"""
    big = (2048, 1024)
    monkeypatch.setenv("UCX_TLS", "tcp")  # for the exporter process (this one's UCX is up)
    with ExporterProcess(ExporterConfig(capacity_bytes=16 * MiB)) as producer:
        producer.export("met", spec(seed=73))
        puller.free(pull(resolver, puller, producer.address, ["met"])[0])  # met: no probe now
        for n in (74, 75):
            producer.export(f"stalled-{n}", spec(big, seed=n))
        short, long = (
            resolver.resolve(producer.address, [f"stalled-{n}"], time.monotonic() + DEADLINE_S)
            for n in (74, 75)
        )
        producer.signal(signal.SIGSTOP)
        outcome: list = []
        patient = threading.Thread(
            target=lambda: outcome.append(puller.read(long, time.monotonic() + 4 * DEADLINE_S))
        )
        try:
            patient.start()
            name = long.peer.agent_name
            assert wait_until(lambda: puller._reading[name] == 1)  # in flight first
            with pytest.raises(DeadlineExceededError, match="READ from"):
                puller.read(short, time.monotonic() + 0.5)
            time.sleep(0.5)  # the patient READ is still waiting
            assert puller.agent.has_peer(long.peer.agent_name) and not outcome
        finally:
            producer.signal(signal.SIGCONT)
        patient.join(4 * DEADLINE_S)
        [[item]] = outcome
        assert torch.equal(item.tensor, spec(big, seed=75).make())
        assert not puller.agent.has_peer(long.peer.agent_name)  # gone with the last READ
        assert puller.arena.bytes_used == item.slot.length  # the stalled READ's slot is free
        puller.free(item)


def test_stalled_producer_fails_the_resolve_at_its_deadline(resolver, puller):
    with ExporterProcess(ExporterConfig(capacity_bytes=8 * MiB)) as producer:
        producer.export("stalled-rpc", spec(seed=72))
        [item] = pull(resolver, puller, producer.address, ["stalled-rpc"])  # the peer is now known
        puller.free(item)
        producer.export("stalled-rpc-2", spec(seed=72))
        producer.signal(signal.SIGSTOP)
        start = time.monotonic()
        try:
            with pytest.raises(DeadlineExceededError):
                pull(resolver, puller, producer.address, ["stalled-rpc-2"], timeout_s=0.5)
            assert time.monotonic() - start < 1.0
        finally:
            producer.signal(signal.SIGCONT)


def test_a_worker_order_keeps_its_deadline_with_a_stalled_encoder_not_met_yet(resolver):
    with ExporterProcess(ExporterConfig(capacity_bytes=8 * MiB)) as producer:
        producer.export("unmet", spec(seed=73))
        [item] = resolver.client(producer.address).resolve(["unmet"], "scheduler")
        peer = resolver.peer(producer.address)  # met by the scheduler, as in PD
        model = ModelShape(torch.bfloat16, width=1024)
        fresh = Resolver(consumer_id="worker-that-never-met-it")
        worker = Receiver(Arena(8 * MiB), fresh, {"enc0": producer.address}, model)
        producer.signal(signal.SIGSTOP)
        start = time.monotonic()
        try:
            order = PullOrder("enc0", [item], [0], start + 30, start + 0.5, pull_id=1, peer=peer)
            with pytest.raises(DeadlineExceededError):
                worker.read(order)  # loading the peer and its first READ keep the deadline
            assert time.monotonic() - start < 1.0
        finally:
            producer.signal(signal.SIGCONT)
            fresh.close()
