"""PD following its encoders' events: items pulled when announced, awaited while being
encoded, prefetched with claims, forgotten on eviction or reconnect, and the idle
scheduler parked until a pull lands (tests/pd_rig.py)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from conftest import MiB, spec, wait_until
from pd_rig import (
    ROWS,
    held,
    item,
    load,
    make_scheduler,
    pulled,
    request,
    serve_rank,
    settle,
    watching,
)

from ec_nixl.consumer.items import ItemTable
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.consumer.scheduler import ConsumerScheduler
from ec_nixl.consumer.worker_link import WorkerClient
from ec_nixl.control.messages import Announcement, EventKind
from ec_nixl.transfer_params import announce_params, make_params


@pytest.fixture
def prefetching(producer, receiver, other_rank):
    """As the connector runs with prefetch: announcements carry claims for both ranks."""
    scheduler = make_scheduler(producer, receiver, other_rank, prefetch=True)
    watcher = watching(scheduler, producer, claim=True)
    yield scheduler
    watcher.close()
    scheduler.close()


@pytest.fixture
def announced(producer, receiver, other_rank):
    """Without prefetch: only what a request waits for is pulled."""
    scheduler = make_scheduler(producer, receiver, other_rank, timeout_s=1.0)
    watcher = watching(scheduler, producer)
    yield scheduler
    watcher.close()
    scheduler.close()


def test_an_item_still_being_encoded_is_pulled_the_moment_its_encoder_announces_it(
    announced, producer, receiver
):
    req = request("early-to-pd", ["h-coming"], announce_params())
    assert not announced.ensure_available(req, 0)  # deferred: nothing to pull yet
    time.sleep(0.2)  # the encoder is still encoding
    assert not announced.ensure_available(req, 0)
    exported_at = time.monotonic()
    producer.export("h-coming", item(seed=12))
    settle(announced, req)
    settled_s = time.monotonic() - exported_at
    order = load(announced, "h-coming")
    assert torch.equal(receiver[0].take("h-coming", order.pull_id), item(seed=12).make())
    waits = announced.stats.take()["observations"]
    assert waits["announce_wait_seconds"][0] >= 0.2  # encoding, counted apart
    assert waits["ready_wait_seconds"][0] <= settled_s  # from the announcement on, not before


def test_an_item_announced_before_its_request_came_is_pulled_at_once(announced, producer, receiver):
    announced.stats.take()
    producer.export("h-before", item(seed=13))
    time.sleep(0.3)  # the announcement has passed
    [transit_s] = announced.stats.take()["observations"]["announce_transit_seconds"]
    assert 0 <= transit_s < 0.3  # published by the encoder, then received here
    req = request("late-to-pd", ["h-before"], announce_params())
    settle(announced, req, timeout_s=0.5)  # well within the 1 s deadline
    assert announced.has_item("h-before")
    assert "h-before" in held(receiver[0])
    announced.request_finished(req)


def test_a_request_without_params_gets_what_an_encoder_announced_pulled(
    announced, producer, receiver
):
    producer.export("h-stock-proxy", item(seed=25))  # the proxy sent the request to E first
    time.sleep(0.3)  # announced
    req = request("no-params", ["h-stock-proxy", "h-never-at-e"])  # then, unchanged, to PD
    settle(announced, req)
    assert announced._items.job("h-never-at-e") is None  # encoded here, at once
    order = load(announced, "h-stock-proxy")
    assert torch.equal(receiver[0].take("h-stock-proxy", order.pull_id), item(seed=25).make())


def test_a_request_without_params_waits_for_an_item_its_encoder_is_encoding(
    announced, producer, receiver
):
    time.sleep(0.3)  # the watcher's stream is open (what is encoding is not replayed)
    producer.encoding(["h-being-encoded"])  # E's step is about to encode it
    time.sleep(0.3)  # the word has passed
    req = request("no-params-early", ["h-being-encoded"])
    assert not announced.ensure_available(req, 0)  # deferred: it is coming
    producer.export("h-being-encoded", item(seed=27))
    settle(announced, req)
    order = load(announced, "h-being-encoded")
    assert torch.equal(receiver[0].take("h-being-encoded", order.pull_id), item(seed=27).make())


def test_a_request_with_params_gets_only_what_they_name(announced, producer):
    producer.export("h-announced-unnamed", item(seed=26))
    time.sleep(0.3)
    params = make_params("enc0", ["h-other"])
    req = request("named", ["h-announced-unnamed", "h-other"], params, media=True)
    announced.ensure_available(req, 0)
    assert announced._items.job("h-announced-unnamed") is None
    announced.request_finished(req)


def test_an_item_the_encoder_dropped_since_announcing_it_is_awaited_afresh(announced, producer):
    producer.export("h-taken", item(seed=16))
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)
    filler = spec((32 * MiB - 4,), seed=17)  # with its guard, E's whole pool: evicts the rest
    producer.export("h-filler", filler)
    time.sleep(0.3)  # the eviction has been announced too
    req = request("after-eviction", ["h-taken"], announce_params())
    assert not announced.ensure_available(req, 0)
    time.sleep(0.3)
    assert not announced.ensure_available(req, 0)  # waiting, not failed on what E dropped
    producer.export("h-taken", item(seed=16))  # E encodes it again
    settle(announced, req)
    assert announced.has_item("h-taken")
    assert "pull_failures" not in str(announced.stats.take()["counters"])
    announced.request_finished(req)


def test_after_a_reconnect_pd_forgets_what_the_encoder_announced_before(announced, producer):
    producer.export("h-before-reconnect", item(seed=24))
    time.sleep(0.3)  # announced
    announced.on_connect("enc0")  # a new stream: E will announce what it still holds
    req = request("after-reconnect", ["h-before-reconnect"], announce_params())
    assert not announced.ensure_available(req, 0)  # waits for the new stream's word
    assert announced._items.job("h-before-reconnect").awaiting
    announced.request_finished(req)


def test_an_item_no_encoder_announces_in_time_is_encoded_here(announced):
    req = request("never-announced", ["h-silent"], announce_params())
    assert not announced.ensure_available(req, 0)
    settle(announced, req, timeout_s=3)  # the 1 s deadline, not forever
    assert not announced.has_item("h-silent")
    assert announced.take_unavailable() == set()
    counters = announced.stats.take()["counters"]
    assert counters == {"pull_failures|DeadlineExceededError": 1, "fallbacks": 1}


def test_an_item_no_encoder_announces_fails_a_request_without_media(announced):
    req = request("silent-no-media", ["h-silent-2"], announce_params(), media=False)
    settle(announced, req, timeout_s=3)
    assert announced.take_unavailable() == {"silent-no-media"}


def test_without_prefetch_an_item_no_request_waits_for_is_not_pulled(announced, producer, receiver):
    producer.export("h-unwanted", item(seed=14))
    time.sleep(0.3)
    assert announced._items.job("h-unwanted") is None
    assert "h-unwanted" not in held(receiver[0])


def test_an_item_announced_with_a_claim_for_this_pd_is_pulled_before_its_request_comes(
    announced, producer, receiver, other_rank
):
    time.sleep(0.3)  # the watcher's stream is open: a claim comes with live exports only
    producer.export("h-routed", item(seed=20), target="test-watch")  # the proxy named us
    producer.export("h-routed-elsewhere", item(seed=21), target="another-pd")
    assert wait_until(lambda: pulled(announced, "h-routed"))
    assert "h-routed" in held(receiver[0]) and "h-routed" in held(other_rank[0])
    assert announced.stats.take()["counters"]["claimed_pulls"] == 1
    assert announced._items.job("h-routed-elsewhere") is None


def test_a_request_that_outruns_its_claimed_items_announcement_waits_for_the_claim(
    announced, producer, receiver, other_rank
):
    """The encoder's answer says it announces the item to this PD with a claim, and the
    request got here first (on a busy host the announcement can lag the answer): the
    pull waits for the announcement and READs under its claim, no resolve. (The rig's
    watcher goes by test-watch, its scheduler by its own id: in PD they are one.)"""
    time.sleep(0.3)  # the watcher's stream is open: a claim comes with live exports only
    params = make_params("enc0", ["h-outran"], claimed_for=announced._items.consumer_id)
    req = request("outran", ["h-outran"], params)
    assert not announced.ensure_available(req, 0)
    assert announced._items.job("h-outran").awaiting  # for the claim
    producer.export("h-outran", item(seed=22), target="test-watch")
    settle(announced, req)
    assert "h-outran" in held(receiver[0]) and "h-outran" in held(other_rank[0])
    data = announced.stats.take()
    assert data["counters"]["claimed_pulls"] == 1
    assert "resolve_seconds" not in data["observations"]


def test_a_claimed_item_announced_without_its_claim_is_resolved_at_once(
    announced, producer, receiver
):
    """The encoder could not lease the item for this PD (a bound, a full pool): its
    announcement came without a claim, and no claim follows it."""
    time.sleep(0.3)  # the watcher's stream is open
    producer.export("h-unclaimed", item(seed=24))  # announced to all, no claim
    assert wait_until(lambda: announced._items.known("h-unclaimed"))
    params = make_params("enc0", ["h-unclaimed"], claimed_for=announced._items.consumer_id)
    req = request("unclaimed", ["h-unclaimed"], params)
    announced.ensure_available(req, 0)
    assert not announced._items.job("h-unclaimed").awaiting  # resolving, not waiting
    settle(announced, req)
    assert "h-unclaimed" in held(receiver[0])


def test_a_claim_that_does_not_come_is_waited_for_a_moment_then_the_item_resolved(
    scheduler, producer, receiver
):
    """No event stream (down, or reconnecting): after CLAIM_WAIT_S the pull resolves."""
    producer.export("h-claim-lost", item(seed=23))
    params = make_params("enc0", ["h-claim-lost"], claimed_for=scheduler._items.consumer_id)
    req = request("claim-lost", ["h-claim-lost"], params)
    assert not scheduler.ensure_available(req, 0)
    assert scheduler._items.job("h-claim-lost").awaiting
    settle(scheduler, req)
    assert "h-claim-lost" in held(receiver[0])
    data = scheduler.stats.take()
    assert "claimed_pulls" not in data["counters"] and data["observations"]["resolve_seconds"]


def test_with_prefetch_an_exported_item_is_pulled_before_its_request_comes(
    prefetching, producer, receiver, other_rank
):
    producer.export("h-early", item(seed=8))
    assert wait_until(lambda: pulled(prefetching, "h-early"))
    assert "h-early" in held(receiver[0]) and "h-early" in held(other_rank[0])
    assert not prefetching.has_item("h-early")  # vLLM loads what a request asked for
    req = request("early", ["h-early"], make_params("enc0", ["h-early"]))
    assert prefetching.ensure_available(req, 0)  # scheduled at once
    order = load(prefetching, "h-early")
    assert torch.equal(receiver[0].take("h-early", order.pull_id), item(seed=8).make())
    data = prefetching.stats.take()
    assert data["counters"]["prefetch_hits"] == 1
    assert data["observations"]["ready_wait_seconds"][0] < 0.5
    # The announcement's claim was the lease: one READ per rank, no resolve. (Items E
    # held before this PD followed it are listed, not prefetched: see below.)
    assert data["counters"]["claimed_pulls"] == 1
    assert "resolve_seconds" not in data["observations"]
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)


def test_what_the_encoder_held_when_the_stream_began_is_known_not_fetched(
    producer, receiver, other_rank
):
    # Held before PD followed the encoder, or before its stream was lost and renewed
    # (the list then holds everything E caches, much of it pulled here before).
    producer.export("h-held-before", item(seed=30))
    leases = producer.stats()["live_leases"]  # earlier tests' claims may still run out
    scheduler = make_scheduler(producer, receiver, other_rank, prefetch=True)
    watcher = watching(scheduler, producer, claim=True)
    try:
        assert wait_until(lambda: scheduler._items.known("h-held-before"))
        time.sleep(0.3)
        assert scheduler._items.job("h-held-before") is None  # not prefetched
        assert producer.stats()["live_leases"] <= leases  # and listed without a claim
        req = request("held-before", ["h-held-before"])  # a request without params asks
        settle(scheduler, req)
        assert scheduler.has_item("h-held-before")
        assert "claimed_pulls" not in scheduler.stats.take()["counters"]  # resolved
        scheduler.request_finished(req)
    finally:
        watcher.close()
        scheduler.close()


def test_a_claim_that_lapsed_before_its_pull_is_resolved_afresh(
    prefetching, producer, other_rank, monkeypatch
):
    monkeypatch.setattr(
        "ec_nixl.consumer.pull_runner.CLAIM_MARGIN_S", 3600.0
    )  # every claim "lapsed"
    producer.export("h-lapsed", item(seed=19))
    assert wait_until(lambda: pulled(prefetching, "h-lapsed"))
    assert "h-lapsed" in held(other_rank[0])
    data = prefetching.stats.take()
    assert "claimed_pulls" not in data["counters"]
    # E's cached items were announced (and prefetched) too; some may still be in flight.
    assert len(data["observations"]["resolve_seconds"]) >= data["counters"]["items_pulled"] >= 1


def test_a_prefetched_item_with_other_rows_than_its_request_needs_is_encoded_here(
    prefetching, producer, receiver
):
    producer.export("h-long", item(seed=9, shape=(ROWS + 2, 1024)))
    assert wait_until(lambda: pulled(prefetching, "h-long"))
    req = request("long", ["h-long"], make_params("enc0", ["h-long"]))
    assert prefetching.ensure_available(req, 0)
    assert not prefetching.has_item("h-long")
    assert prefetching.stats.take()["counters"]["fallbacks"] == 1
    assert wait_until(lambda: "h-long" not in held(receiver[0]))


def test_a_prefetch_claimed_while_it_runs_has_its_rows_checked_when_it_lands(
    prefetching, producer, receiver, monkeypatch
):
    """Read before any request said how many rows it needs: checked when it lands."""
    reading, gate = threading.Event(), threading.Event()
    read = receiver[0].read

    def held_back(order):
        reading.set()
        gate.wait(10)
        return read(order)

    monkeypatch.setattr(receiver[0], "read", held_back)
    producer.export("h-long-claimed", item(seed=36, shape=(ROWS + 2, 1024)))
    assert reading.wait(10)  # the prefetch is reading
    req = request("long-claimed", ["h-long-claimed"], make_params("enc0", ["h-long-claimed"]))
    assert not prefetching.ensure_available(req, 0)  # claimed while it runs
    gate.set()
    settle(prefetching, req)
    assert not prefetching.has_item("h-long-claimed")
    assert prefetching.stats.take()["counters"]["fallbacks"] == 1
    assert wait_until(lambda: "h-long-claimed" not in held(receiver[0]))


def test_a_prefetched_item_no_request_claims_is_dropped_after_a_while(
    prefetching, producer, receiver, monkeypatch
):
    monkeypatch.setattr("ec_nixl.consumer.items.PREFETCH_TTL_S", 0.2)
    producer.export("h-unasked", item(seed=10))
    assert wait_until(lambda: pulled(prefetching, "h-unasked"))
    time.sleep(0.3)
    producer.export("h-next", item(seed=11))  # the next prefetch sweeps
    assert wait_until(lambda: "h-unasked" not in held(receiver[0]))
    assert prefetching._items.job("h-unasked") is None


def test_unclaimed_prefetches_hold_at_most_half_the_receive_arena_oldest_dropped_first(
    prefetching, producer, receiver, other_rank
):
    big = (4 * MiB // 2048, 1024)  # 4 MiB each: half of the 32 MiB arena holds four
    names = [f"h-orphan-{n}" for n in range(6)]
    for n, name in enumerate(names):
        producer.export(name, item(seed=30 + n, shape=big))
        assert wait_until(lambda name=name: pulled(prefetching, name))
    for rank in (receiver, other_rank):  # the two oldest made room for the newest
        assert wait_until(lambda rank=rank: not {"h-orphan-0", "h-orphan-1"} & held(rank[0]))
        assert set(names[2:]) <= held(rank[0])
    assert prefetching.stats.take()["counters"]["prefetches_dropped"] >= 2


def test_an_understated_announcement_counts_at_its_real_size_once_resolved(prefetching, producer):
    """An encoder that announces fewer bytes than it holds does not stretch the
    prefetch bound: a prefetch counts what its resolve described."""
    real = item(seed=36, shape=(4 * MiB // 2048, 1024))
    producer.export("h-understated", real)
    lie = Announcement(EventKind.EXPORTED, "h-understated", 1024)
    prefetching._items.prefetch(lie, "enc0")
    assert wait_until(lambda: pulled(prefetching, "h-understated"))
    assert prefetching._items.job("h-understated").nbytes == 4 * MiB


def test_pd_meets_its_encoders_at_start_once_and_skips_one_that_is_down(
    tmp_path_factory, producer, caplog
):
    """One handshake per PD: the scheduler meets each encoder, and every rank loads the
    agent metadata it was handed, opening no channel to the encoder itself."""
    caplog.set_level(logging.INFO, logger="ec_nixl")
    ranks = [serve_rank(tmp_path_factory, producer, rank) for rank in (7, 8)]
    (first, first_address), (second, second_address) = (next(rank) for rank in ranks)
    encoders = {"enc0": producer.address, "down": "127.0.0.1:1"}
    resolver = Resolver(consumer_id="early")
    workers = [WorkerClient(first_address), WorkerClient(second_address)]
    table = ItemTable(resolver, encoders, workers, timeout_s=2.0)
    scheduler = ConsumerScheduler(table, encoders)
    try:
        peer = resolver.peer(producer.address)  # met by the scheduler at start, cached
        for rank in (first, second):
            assert wait_until(lambda rank=rank: rank.puller.agent.has_peer(peer.agent_name))
            assert not rank.resolver.clients._clients  # no channel of its own to the encoder
        assert wait_until(lambda: "encoder down not met yet" in caplog.text)
    finally:
        scheduler.close()
        resolver.close()
        for rank in ranks:
            next(rank, None)


def test_an_idle_step_parks_until_the_awaited_pull_lands(announced, producer):
    req = request("parked", ["h-parked"], announce_params())
    assert not announced.ensure_available(req, 0)
    threading.Timer(0.1, producer.export, ("h-parked", item(seed=15))).start()
    steps, deadline = 0, time.monotonic() + 5
    while not announced.has_item("h-parked"):
        assert time.monotonic() < deadline
        announced.idle_step()
        announced.ensure_available(req, 0)
        steps += 1
    assert steps < 50  # ~100 ms of encoding in 10 ms parks, then woken by the pull
    announced.request_finished(req)


def test_an_idle_step_with_nothing_awaited_does_not_wait(scheduler):
    start = time.monotonic()
    for _ in range(100):
        scheduler.idle_step()
    assert time.monotonic() - start < 0.5  # 100 parks of 10 ms would take a second
