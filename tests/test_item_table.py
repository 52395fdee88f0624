"""PD's item table (`ItemTable`): what its scheduler knows of each item, changed by
encoders' events and vLLM's encoder cache, and emptied of whatever is no longer live.
No vLLM, no worker, no encoder: these transitions contact nobody."""

from __future__ import annotations

import time

import pytest
from conftest import wait_until

from ec_nixl.consumer.items import ItemTable
from ec_nixl.consumer.pull_state import HOLDING, TRANSITIONS, PullJob, PullState
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.control.messages import Announcement, EventKind

TIMEOUT_S = 0.2


@pytest.fixture
def table():
    encoders = {"enc0": "127.0.0.1:1", "enc1": "127.0.0.1:2"}
    items = ItemTable(Resolver(consumer_id="table"), encoders, [], TIMEOUT_S)
    yield items
    items.close()


class Rank:
    """A worker that holds nothing and says what it was told to drop: its orders fail."""

    def __init__(self) -> None:
        self.dropped: list[tuple[str, int]] = []

    def pull(self, order):
        raise AssertionError("no pull reaches a rank here: the encoder is unreachable")

    def drop(self, mm_hashes: list[str], pull_id: int) -> None:
        self.dropped.extend((mm_hash, pull_id) for mm_hash in mm_hashes)

    def close(self) -> None:
        pass


@pytest.fixture
def ranked():
    """A table with two ranks, its encoders unreachable: every pull that runs fails."""
    ranks = [Rank(), Rank()]
    encoders = {"enc0": "127.0.0.1:1"}
    items = ItemTable(Resolver(consumer_id="ranked"), encoders, ranks, TIMEOUT_S)
    yield items, ranks
    items.close()


def exported(mm_hash: str) -> Announcement:
    return Announcement(EventKind.EXPORTED, mm_hash, 1024)


def test_an_announced_item_is_known_until_its_holder_evicts_it(table):
    table.announced(exported("h"), "enc0", prefetch=False)
    assert table.known("h") and table.job("h") is None  # known, not pulled
    table.evicted("h", "enc1")  # another encoder's copy
    assert table.known("h")
    table.evicted("h", "enc0")
    assert not table.known("h") and table._items == {}


def test_an_item_being_encoded_is_known_for_a_pull_deadline(table):
    table.encoding("h", "enc0")
    assert table.known("h")
    time.sleep(TIMEOUT_S + 0.05)
    assert not table.known("h")
    table.encoding("other", "enc0")  # the next event clears what went stale
    assert set(table._items) == {"other"}


def test_the_announcement_ends_the_encoding(table):
    table.encoding("h", "enc0")
    table.announced(exported("h"), "enc0", prefetch=False)
    assert table._items["h"].encoding is None and table._items["h"].holder == "enc0"


def test_a_reconnected_encoder_is_forgotten_until_it_announces_again(table):
    table.announced(exported("a"), "enc0", prefetch=False)
    table.encoding("b", "enc0")
    table.announced(exported("c"), "enc1", prefetch=False)
    table.reconnected("enc0")
    assert (table.known("a"), table.known("b"), table.known("c")) == (False, False, True)
    assert set(table._items) == {"c"}


def test_an_allocated_item_is_resident_until_vllm_frees_it(table):
    assert table.allocated("h", None) is None  # nothing pulled: vLLM encodes it
    assert table.resident("h")
    assert table.freed(["h"]) == []  # nothing lent to it: nothing to free
    assert not table.resident("h") and table._items == {}


def test_a_resident_item_is_not_prefetched_when_announced(table):
    table.allocated("h", None)
    table.announced(exported("h"), "enc0", prefetch=True)
    assert table.job("h") is None and table.resident("h")


def test_a_pull_lasts_while_any_request_that_asked_for_it_is_live(table):
    first = table.expect("h", 8, "first")
    assert table.expect("h", 8, "second") is first  # one pull for both
    table.forget("h", "never-asked")  # a request that did not claim it changes nothing
    table.forget("h", "first")  # aborted: the other still waits for the same pull
    assert table.job("h") is first
    table.forget("h", "second")
    assert table.job("h") is None and table._items == {}


def test_every_pull_has_an_id_of_its_own(table):
    first = table.expect("h", 8, "first")
    table.forget("h", "first")
    again = table.expect("h", 8, "again")  # the same item asked for again: a new pull
    assert again is not first and again.pull_id != first.pull_id


def test_an_announcement_of_no_bytes_is_not_prefetched(table, caplog):
    """Its size is what bounds unclaimed prefetches: 0 would let them fill the arena."""
    assert not table.prefetch(Announcement(EventKind.EXPORTED, "h-empty", 0), "enc0")
    assert table.job("h-empty") is None
    assert "announced h-empty with 0 bytes: not prefetched" in caplog.text


def test_a_pull_moves_from_awaiting_through_running_to_ready_then_loaded():
    job = PullJob("h-life", None, 4)
    assert job.state is PullState.AWAITING
    for state in (PullState.RUNNING, PullState.READY, PullState.LOADED):
        assert job.move(state) and job.state is state


@pytest.mark.parametrize("ending", [PullState.LOADED, PullState.DROPPED])
def test_an_ended_pull_takes_no_transition(ending):
    """A READ that ends, or fails, after its job was dropped or loaded changes nothing."""
    job = PullJob("h-ended", "enc0", 4, state=PullState.READY)
    assert job.move(ending)
    assert TRANSITIONS[ending] == frozenset()
    for late in PullState:
        assert not job.move(late) and job.state is ending


def test_a_failed_pull_is_never_ready_or_loaded_only_dropped():
    job = PullJob("h-failed", "enc0", 4, state=PullState.RUNNING)
    assert job.move(PullState.FAILED)
    assert not job.move(PullState.READY) and not job.move(PullState.LOADED)
    assert job.move(PullState.DROPPED)


def test_only_a_ready_pull_is_loaded_and_every_state_but_an_ended_one_may_be_dropped():
    loadable_from = {state for state, nexts in TRANSITIONS.items() if PullState.LOADED in nexts}
    droppable_from = {state for state, nexts in TRANSITIONS.items() if PullState.DROPPED in nexts}
    assert loadable_from == {PullState.READY}
    assert droppable_from == set(PullState) - {PullState.LOADED, PullState.DROPPED}


def test_a_pull_that_ends_after_it_ran_has_every_rank_drop_its_copies_once(ranked):
    """Failed, then forgotten by its request: one drop per rank, naming the pull."""
    table, ranks = ranked
    job = table.start("h-ran", "enc0", 8, "asker", claimed=False)
    assert wait_until(lambda: job.state is PullState.FAILED, 5)
    table.forget("h-ran", "asker")
    assert job.state is PullState.DROPPED and table._items == {}
    assert wait_until(lambda: all(rank.dropped for rank in ranks), 5)
    table.close()  # every submitted drop has run
    assert [rank.dropped for rank in ranks] == [[("h-ran", job.pull_id)]] * 2


def test_a_pull_that_ends_before_it_ran_orders_no_drop(ranked):
    table, ranks = ranked
    job = table.expect("h-never-announced", 8, "asker")
    table.forget("h-never-announced", "asker")
    assert job.state is PullState.DROPPED
    table.close()
    assert [rank.dropped for rank in ranks] == [[], []]


def test_the_workers_may_hold_copies_only_of_a_running_or_ready_pull_and_lose_them_by_its_end():
    assert {PullState.RUNNING, PullState.READY} == HOLDING
    for state in HOLDING:  # any of them may end, and drop its copies
        assert {PullState.FAILED, PullState.DROPPED} <= TRANSITIONS[state]
    assert PullState.LOADED in TRANSITIONS[PullState.READY]  # or be lent to vLLM instead
