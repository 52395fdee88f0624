"""An aborted request never costs another request its item, and vLLM is never told to load
what a worker might not hold: every copy a worker keeps belongs to one pull, only orders
naming that pull remove it, and a pull lasts while any live request relies on it. Real
vLLM Requests, a real exporter process, two ranks reading with real NIXL over the worker
link (tests/pd_rig.py)."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import wait_until
from pd_rig import ROWS, held, item, load, make_scheduler, request, settle

from ec_nixl.consumer.worker_link import Load, PullOrder
from ec_nixl.errors import LoadLostError, RefusedError
from ec_nixl.transfer_params import make_params

ROUNDS = 40  # the race this guards against was lost in most of 40 rounds before pull ids
SHARED_ROUNDS = 10


@pytest.fixture
def ranks(receiver, other_rank):
    return receiver[0], other_rank[0]


@pytest.fixture
def drops(ranks, monkeypatch):
    """What each rank has dropped, as (mm_hash, pull id), once the drop is done."""
    done = {rank: [] for rank in ranks}
    for rank in ranks:

        def recording(mm_hashes, pull_id, drop=rank.drop, told=done[rank]):
            drop(mm_hashes, pull_id)
            told.extend((mm_hash, pull_id) for mm_hash in mm_hashes)

        monkeypatch.setattr(rank, "drop", recording)
    return done


def evict(scheduler, ranks, mm_hash: str) -> None:
    """vLLM evicts the item from its encoder cache: the ranks free the lent slots."""
    released = scheduler.on_freed([mm_hash])
    for rank in ranks:
        rank.free_evicted(released)


def test_a_request_aborted_while_its_pull_runs_never_costs_the_next_one_its_item(
    scheduler, producer, ranks, drops
):
    """A client that disconnects and asks again, or a proxy that cancels and resends: the
    aborted request's pull ends after the next one began, and drops only its own copy."""
    used = [rank.puller.arena.bytes_used for rank in ranks]
    for n in range(ROUNDS):
        mm_hash, expected = f"h-again-{n}", item(seed=100 + n).make()
        producer.export(mm_hash, item(seed=100 + n))
        params = make_params("enc0", [mm_hash])
        aborted = request(f"aborted-{n}", [mm_hash], params)
        scheduler.ensure_available(aborted, 0)  # its pull starts
        aborted_pull = scheduler._items.job(mm_hash).pull_id
        scheduler.request_finished(aborted)
        again = request(f"again-{n}", [mm_hash], params)  # the same image, at once
        settle(scheduler, again)
        order = load(scheduler, mm_hash)
        assert order.pull_id != aborted_pull
        late_drop = (mm_hash, aborted_pull)
        for rank in ranks:
            assert wait_until(lambda rank=rank, late_drop=late_drop: late_drop in drops[rank])
            tensor = rank.take(mm_hash, order.pull_id)
            assert tensor is not None, f"round {n}: the aborted pull's drop took the item"
            assert torch.equal(tensor, expected)
        scheduler.request_finished(again)
        evict(scheduler, ranks, mm_hash)
    assert [rank.puller.arena.bytes_used for rank in ranks] == used  # every slot freed
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)


@pytest.mark.parametrize("aborted_when", ["pulling", "pulled"])
def test_a_request_sharing_an_image_with_an_aborted_one_still_loads_the_same_pull(
    scheduler, producer, ranks, drops, aborted_when
):
    used = [rank.puller.arena.bytes_used for rank in ranks]
    for n in range(SHARED_ROUNDS):
        mm_hash = f"h-shared-{aborted_when}-{n}"
        producer.export(mm_hash, item(seed=200 + n))
        params = make_params("enc0", [mm_hash])
        aborted = request(f"shared-aborted-{aborted_when}-{n}", [mm_hash], params)
        kept = request(f"shared-kept-{aborted_when}-{n}", [mm_hash], params)
        scheduler.ensure_available(aborted, 0)
        scheduler.ensure_available(kept, 0)
        pull_id = scheduler._items.job(mm_hash).pull_id
        if aborted_when == "pulled":
            settle(scheduler, kept)
        scheduler.request_finished(aborted)
        settle(scheduler, kept)
        order = load(scheduler, mm_hash)
        assert order.pull_id == pull_id  # the pull went on for the request still there
        for rank in ranks:
            assert torch.equal(rank.take(mm_hash, pull_id), item(seed=200 + n).make())
        scheduler.request_finished(kept)
        evict(scheduler, ranks, mm_hash)
    assert scheduler.stats.take()["counters"]["items_pulled"] == SHARED_ROUNDS
    assert drops == {rank: [] for rank in ranks}  # no pull ended unloaded
    assert [rank.puller.arena.bytes_used for rank in ranks] == used


def test_a_pull_every_request_left_is_not_offered_to_vllm(scheduler, producer, ranks, drops):
    producer.export("h-all-gone", item(seed=31))
    req = request("all-gone", ["h-all-gone"], make_params("enc0", ["h-all-gone"]))
    settle(scheduler, req)
    pull_id = scheduler._items.job("h-all-gone").pull_id
    scheduler.request_finished(req)
    assert not scheduler.has_item("h-all-gone")  # vLLM would encode it, not load it
    for rank in ranks:
        assert wait_until(lambda rank=rank: ("h-all-gone", pull_id) in drops[rank])
        assert "h-all-gone" not in held(rank)


def test_vllm_loads_only_what_has_cache_item_promised_in_the_same_pass(scheduler, producer):
    """vLLM asked while the pull ran (no: it encodes the item itself), and the pull landed
    before it reserved the item's room."""
    producer.export("h-landed-late", item(seed=32))
    req = request("landed-late", ["h-landed-late"], make_params("enc0", ["h-landed-late"]))
    settle(scheduler, req)
    scheduler.on_alloc("h-landed-late")  # not asked about in this pass
    assert scheduler.take_loads() == []  # nothing loaded over vLLM's own output
    assert scheduler._items.resident("h-landed-late")
    scheduler.request_finished(req)


@pytest.mark.parametrize("policy", ["encode", "fail"])
def test_an_item_a_rank_could_not_read_is_never_loaded_but_encoded_or_failed_by_policy(
    producer, receiver, other_rank, policy
):
    scheduler = make_scheduler(producer, receiver, other_rank, encode_on_failure=policy == "encode")
    mm_hash = f"h-unread-{policy}"
    producer.export(mm_hash, item(seed=33))
    arena = other_rank[0].puller.arena
    filler = arena.allocate(arena.capacity - arena.bytes_used)  # rank 1 has no room
    try:
        req = request(f"unread-{policy}", [mm_hash], make_params("enc0", [mm_hash]))
        settle(scheduler, req)
    finally:
        arena.free(filler)
    try:
        assert not scheduler.has_item(mm_hash)
        if policy == "encode":  # scheduled now, and vLLM encodes the item here
            assert scheduler.ensure_available(req, 0)
            assert scheduler.take_unavailable() == set()
        else:  # never scheduled: vLLM fails it as the step ends
            assert not scheduler.ensure_available(req, 0)
            assert scheduler.take_unavailable() == {req.request_id}
    finally:
        scheduler.close()


def test_a_rank_told_to_load_a_copy_it_lacks_reads_the_item_again_before_the_step_goes_on(
    scheduler, producer, ranks, caplog
):
    producer.export("h-lost", item(seed=34))
    req = request("lost", ["h-lost"], make_params("enc0", ["h-lost"]))
    settle(scheduler, req)
    order = load(scheduler, "h-lost")
    used = [rank.puller.arena.bytes_used for rank in ranks]
    ranks[1].drop(["h-lost"], order.pull_id)  # as if rank 1 had lost its copy
    for rank in ranks:
        assert torch.equal(rank.lend(order, timeout_s=5.0), item(seed=34).make())
    assert "told to load h-lost" in caplog.text and caplog.text.count("does not hold") == 1
    assert [rank.puller.arena.bytes_used for rank in ranks] == used  # lent, not held twice
    evict(scheduler, ranks, "h-lost")
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)  # ended by its READ


def test_a_load_that_cannot_be_read_again_stops_with_an_error_naming_the_item(receiver):
    lost = Load("h-never-exported", pull_id=1 << 50, encoder_id="enc0", num_embeds=ROWS)
    used = receiver[0].puller.arena.bytes_used
    with pytest.raises(LoadLostError, match="h-never-exported .* not held here .* enc0"):
        receiver[0].lend(lost, timeout_s=5.0)
    assert receiver[0].puller.arena.bytes_used == used


def test_an_order_that_names_no_pull_is_refused_unread(producer, resolver, receiver):
    """Every copy a rank holds belongs to a pull: only orders naming that pull remove it."""
    producer.export("h-unnamed", item(seed=36))
    deadline = time.monotonic() + 5
    leased = resolver.resolve(producer.address, ["h-unnamed"], deadline)
    unnamed = PullOrder(
        "enc0", leased.items, [ROWS], leased.valid_until, deadline, pull_id=0, peer=leased.peer
    )
    used = receiver[0].puller.arena.bytes_used
    try:
        with pytest.raises(RefusedError, match="must name its pull"):
            receiver[0].read(unnamed)
        assert receiver[0].puller.arena.bytes_used == used
    finally:
        resolver.release(producer.address, leased.lease_ids)


def test_a_drop_that_overtakes_its_pull_frees_what_the_pull_reads(
    scheduler, producer, ranks, monkeypatch
):
    """A rank slower than the scheduler waits for: the pull failed, its drop came first."""
    producer.export("h-overtaken", item(seed=35))
    req = request("overtaken", ["h-overtaken"], make_params("enc0", ["h-overtaken"]))
    read = ranks[1].read

    def dropped_first(order):
        ranks[1].drop(["h-overtaken"], order.pull_id)
        return read(order)

    monkeypatch.setattr(ranks[1], "read", dropped_first)
    used = ranks[1].puller.arena.bytes_used
    settle(scheduler, req)
    assert not scheduler.has_item("h-overtaken")  # a rank that did not keep it fails the pull
    assert "h-overtaken" not in held(ranks[1])
    assert ranks[1].puller.arena.bytes_used == used
    scheduler.request_finished(req)
