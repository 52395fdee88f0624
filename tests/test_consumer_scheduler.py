"""The PD scheduler's decisions per request: what it pulls, defers, refuses and falls back
from, with real vLLM Requests, a real exporter process and two worker ranks (tensor
parallel 2) reading with real NIXL (tests/pd_rig.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import wait_until
from pd_rig import ROWS, held, item, load, make_scheduler, request, settle

from ec_nixl.consumer.items import ItemTable
from ec_nixl.consumer.receiver import ModelShape
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.consumer.scheduler import ConsumerScheduler
from ec_nixl.consumer.worker_link import WorkerClient, WorkerServer
from ec_nixl.transfer_params import make_params


def test_a_request_without_params_needs_no_pull(scheduler):
    req = request("plain", ["h-plain"])
    assert scheduler.ensure_available(req, 0)
    assert not scheduler.has_item("h-plain")


def test_a_named_item_defers_the_request_until_every_worker_holds_it(
    scheduler, producer, receiver, other_rank
):
    producer.export("h-pulled", item(seed=1))
    req = request("pulled", ["h-pulled"], make_params("enc0", ["h-pulled"]))
    assert not scheduler.ensure_available(req, 0)  # deferred while the pull runs
    settle(scheduler, req)
    order = load(scheduler, "h-pulled")
    for rank in (receiver, other_rank):
        assert torch.equal(rank[0].take("h-pulled", order.pull_id), item(seed=1).make())
    # One lease for both ranks, ended by their two READs; E keeps the item cached.
    counters = scheduler.stats.take()["counters"]
    assert counters["items_pulled"] == 1 and "pull_failures" not in str(counters)
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)


def test_a_rank_that_cannot_read_fails_the_pull_everywhere_and_the_lease_goes_back(
    scheduler, producer, receiver, other_rank
):
    producer.export("h-one-rank-full", item(seed=18))
    arena = other_rank[0].puller.arena
    filler = arena.allocate(arena.capacity - arena.bytes_used)  # rank 1 has no room
    try:
        req = request("one-full", ["h-one-rank-full"], make_params("enc0", ["h-one-rank-full"]))
        settle(scheduler, req)
    finally:
        arena.free(filler)
    assert not scheduler.has_item("h-one-rank-full")
    assert scheduler.stats.take()["counters"]["pull_failures|PoolFullError"] == 1
    assert wait_until(lambda: "h-one-rank-full" not in held(receiver[0]))  # rank 0 drops its copy
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)  # given back, not expired


def test_a_pulled_item_is_lent_to_the_encoder_cache_uncopied_until_vllm_evicts_it(
    scheduler, producer, receiver
):
    producer.export("h-lent", item(seed=12))
    settle(scheduler, request("lent", ["h-lent"], make_params("enc0", ["h-lent"])))
    order = load(scheduler, "h-lent")
    arena = receiver[0].puller.arena
    used = arena.bytes_used
    tensor = receiver[0].take("h-lent", order.pull_id)
    start = arena.buffer.data_ptr()
    assert start <= tensor.data_ptr() < start + arena.capacity  # the receive slot itself
    assert arena.bytes_used == used
    assert scheduler.on_freed(["h-lent"]) == [("h-lent", order.pull_id)]  # vLLM evicted it
    receiver[0].free_evicted([("h-lent", order.pull_id), ("h-never-lent", order.pull_id)])
    assert arena.bytes_used == used - tensor.nbytes


def test_an_item_in_the_local_encoder_cache_is_not_pulled_again_until_evicted(scheduler, producer):
    scheduler.on_alloc("h-resident")  # vLLM encoded or loaded it earlier
    req = request("resident", ["h-resident"], make_params("enc0", ["h-resident"]))
    assert scheduler.ensure_available(req, 0)
    assert not scheduler.has_item("h-resident")
    scheduler.on_freed(["h-resident"])
    producer.export("h-resident", item(seed=2))
    settle(scheduler, req)
    assert scheduler.has_item("h-resident")


@pytest.mark.parametrize(
    "params",
    [
        {"h-x": {"encoder_id": "elsewhere"}},
        {"h-x": "10.0.0.1:7100"},
        {"h-x": {"encoder_id": ["enc0"]}},
        ["h-x"],
        {"*": {"encoder_id": "enc0"}},
        {"h-x": {"encoder_id": "*"}},
        {"*": "*"},
        {"h-x": {"peer_host": "10.0.0.1", "peer_port": 7100}},  # another connector's
        {"h-x": {"encoder_id": "enc0", "modality": 3}},
        {"h-x": {"encoder_id": "enc0", "modality": ""}},
        {"h-x": {"encoder_id": "enc0", "item_indices": [0, 0]}},  # a repeated index
        {"h-x": {"encoder_id": "enc0", "item_indices": [-1]}},
        {"h-x": {"encoder_id": "enc0", "metadata": ["grid"]}},
        {"h-x": {"encoder_id": "enc0", "claimed_for": "../pd"}},
        {"h-x": {"encoder_id": "enc0", "claimed_for": 7}},
        {"h-x": {"encoder_id": "enc0", **{f"k{i}": i for i in range(16)}}},
    ],
)
def test_forged_params_are_refused_and_the_items_encoded_here_without_any_pull(scheduler, params):
    req = request("forged", ["h-x"], params)
    assert scheduler.ensure_available(req, 0)
    assert scheduler.ensure_available(req, 0)  # asked again: counted once
    assert scheduler.take_unavailable() == set()
    assert not scheduler.has_item("h-x")
    assert scheduler._items.job("h-x") is None
    counters = scheduler.stats.take()["counters"]
    assert counters == {"refused_params": 1, "fallbacks": 1}


def test_forged_params_fail_a_request_that_has_no_media_to_encode(scheduler):
    req = request("forged-no-media", ["h-y"], {"h-y": "10.0.0.1:7100"}, media=False)
    assert not scheduler.ensure_available(req, 0)  # never scheduled: failed as the step ends
    assert scheduler.take_unavailable() == {"forged-no-media"}


@pytest.mark.parametrize(
    "exported",
    [
        item(5, shape=(ROWS + 1, 1024)),
        item(6, shape=(ROWS, 1000)),
        item(23, shape=(ROWS, 2048)),  # a multiple: only a deepstack model takes one
        item(7, dtype=torch.float16),
    ],
    ids=["rows", "width", "twice-the-width", "dtype"],
)
def test_an_item_of_the_wrong_shape_or_dtype_is_refused_unread_and_encoded_here(
    scheduler, producer, receiver, exported
):
    mm_hash = f"h-wrong-{exported.seed}"
    producer.export(mm_hash, exported)
    req = request(mm_hash, [mm_hash], make_params("enc0", [mm_hash]))
    settle(scheduler, req)
    job = scheduler._items.job(mm_hash)
    assert "this model needs torch.bfloat16[8, 1024]" in str(job.error)
    assert mm_hash not in held(receiver[0])
    assert scheduler.take_unavailable() == set()
    assert scheduler.stats.take()["counters"]["fallbacks"] == 1


@pytest.mark.parametrize(
    "entry",
    [
        {"metadata": {}, "item_indices": [0]},  # vLLM 0.32
        {"modality": "image", "metadata": {}, "item_indices": [0]},  # vLLM 0.33 and 0.34
    ],
    ids=["vllm-0.32", "vllm-0.33"],
)
def test_params_with_vllms_item_entries_beside_the_encoder_id_are_followed(
    scheduler, producer, entry
):
    """As vLLM's example EPD proxy forwards them: each item's entry from the encoder's
    answer, and a list of the items."""
    mm_hash = f"h-vllm-shaped-{len(entry)}"
    producer.export(mm_hash, item(seed=28))
    params = {
        mm_hash: {"encoder_id": "enc0", **entry},
        "ec_items": [{"mm_hash": mm_hash, "transfer_id": "t-1"}],
    }
    req = request(f"vllm-shaped-{len(entry)}", [mm_hash], params)
    settle(scheduler, req)
    assert scheduler.has_item(mm_hash)
    assert "refused_params" not in scheduler.stats.take().get("counters", {})
    scheduler.request_finished(req)


def test_keys_neither_side_knows_are_followed_counted_and_named_once_in_the_log(
    scheduler, producer, caplog
):
    """A rolling upgrade: an encoder on a newer vLLM adds a key to each item's entry.
    PD pulls anyway (as protobuf skips an unknown field), counts the request, and
    names each such key once."""
    producer.export("h-newer", item(seed=29))
    entry = {"encoder_id": "enc0", "modality": "image", "frames": [3], "transfer_id": "t"}
    first = request("newer-1", ["h-newer"], {"h-newer": entry})
    second = request("newer-2", ["h-newer"], {"h-newer": entry})
    settle(scheduler, first)
    settle(scheduler, first)  # asked again: counted once
    assert scheduler.has_item("h-newer")
    settle(scheduler, second)
    assert scheduler.stats.take()["counters"]["unknown_param_keys"] == 2
    said = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(said) == 2
    assert "'frames'" in said[0] and "'transfer_id'" in said[1]
    scheduler.request_finished(first)
    scheduler.request_finished(second)


def test_a_failed_pull_falls_back_to_local_encoding_when_the_media_is_there(scheduler):
    req = request("fallback", ["h-never-exported"], make_params("enc0", ["h-never-exported"]))
    settle(scheduler, req)
    assert not scheduler.has_item("h-never-exported")
    assert scheduler.take_unavailable() == set()


def test_a_failed_pull_fails_the_request_when_the_media_is_gone(scheduler):
    params = make_params("enc0", ["h-no-media"])
    req = request("no-media", ["h-no-media"], params, media=False)
    settle(scheduler, req)
    assert scheduler.take_unavailable() == {"no-media"}


def test_with_the_fail_policy_a_failed_pull_fails_the_request_though_the_media_is_there(
    producer, receiver, other_rank, caplog
):
    scheduler = make_scheduler(producer, receiver, other_rank, encode_on_failure=False)
    try:
        params = make_params("enc0", ["h-policy"])
        req = request("must-not-encode", ["h-policy"], params)
        settle(scheduler, req)
        assert not scheduler.ensure_available(req, 0)  # not scheduled, not encoded here
        assert scheduler.take_unavailable() == {"must-not-encode"}
        assert "fallbacks" not in scheduler.stats.take()["counters"]
        assert "h-policy" in caplog.text and "load_failure_policy is 'fail'" in caplog.text
    finally:
        scheduler.close()


def test_a_request_that_ends_before_its_load_frees_the_pulled_item(scheduler, producer, receiver):
    producer.export("h-abandoned", item(seed=3))
    req = request("abandoned", ["h-abandoned"], make_params("enc0", ["h-abandoned"]))
    settle(scheduler, req)
    assert "h-abandoned" in held(receiver[0])
    scheduler.request_finished(req)
    end = time.monotonic() + 5
    while "h-abandoned" in held(receiver[0]) and time.monotonic() < end:
        time.sleep(0.01)
    assert "h-abandoned" not in held(receiver[0])


def test_an_item_the_request_has_already_consumed_is_not_pulled(scheduler, producer):
    producer.export("h-consumed", item(seed=4))
    req = request("consumed", ["h-consumed"], make_params("enc0", ["h-consumed"]))
    assert scheduler.ensure_available(req, num_computed_tokens=20)  # past its placeholder
    assert scheduler._items.job("h-consumed") is None


def test_a_dead_rank_fails_the_pull_within_its_deadline_and_the_lease_goes_back(
    producer, receiver, tmp_path
):
    encoders = {"enc0": producer.address}
    workers = [WorkerClient(receiver[1]), WorkerClient(f"unix:{tmp_path / 'dead-rank.sock'}")]
    items = ItemTable(Resolver(consumer_id="dead-rank"), encoders, workers, 1.0)
    scheduler = ConsumerScheduler(items, encoders)
    try:
        producer.export("h-dead-rank", item(seed=22))
        req = request("dead-rank", ["h-dead-rank"], make_params("enc0", ["h-dead-rank"]))
        start = time.monotonic()
        settle(scheduler, req)
        assert time.monotonic() - start < 1.0 + 2.0  # the pull deadline and its grace second
        assert not scheduler.has_item("h-dead-rank")
        assert scheduler.stats.take()["counters"]["fallbacks"] == 1
        assert wait_until(lambda: "h-dead-rank" not in held(receiver[0]))  # the live rank drops it
        assert wait_until(lambda: producer.stats()["live_leases"] == 0)
    finally:
        scheduler.close()


def test_a_rank_that_dies_mid_read_fails_the_pull_and_the_lease_goes_back_at_once(
    producer, receiver, tmp_path
):
    reading, dying = threading.Event(), threading.Event()

    class DyingRank:
        def read(self, order):
            reading.set()
            dying.wait(10)
            raise AssertionError("its link was cut first")

        def drop(self, mm_hashes, pull_id):
            pass

    address = f"unix:{tmp_path / 'dying-rank.sock'}"
    dying_rank = WorkerServer(DyingRank(), address)
    encoders = {"enc0": producer.address}
    workers = [WorkerClient(receiver[1]), WorkerClient(address)]
    items = ItemTable(Resolver(consumer_id="dying-rank"), encoders, workers, 30.0)
    scheduler = ConsumerScheduler(items, encoders)
    try:
        producer.export("h-dying-rank", item(seed=23))
        req = request("dying-rank", ["h-dying-rank"], make_params("enc0", ["h-dying-rank"]))
        assert not scheduler.ensure_available(req, 0)
        assert reading.wait(10)
        dying_rank.stop()  # the rank's process is gone: its link closes mid-call
        settle(scheduler, req)
        assert not scheduler.has_item("h-dying-rank")
        counters = scheduler.stats.take()["counters"]
        assert counters["fallbacks"] == 1
        assert counters["pull_failures|WorkerLostError"] == 1
        assert wait_until(lambda: "h-dying-rank" not in held(receiver[0]))  # the live rank drops it
        # Given back, not left to expire (30 s): the encoder is not at fault.
        assert wait_until(lambda: producer.stats()["live_leases"] == 0, timeout_s=5)
    finally:
        dying.set()
        scheduler.close()


def test_an_encoder_serving_another_model_is_reported_once(producer, receiver, other_rank, caplog):
    scheduler = make_scheduler(producer, receiver, other_rank, compatibility_hash="model=another")
    try:
        for i in range(3):
            # E hashed with its own model string: none of its hashes match ours.
            req = request(f"mismatch-{i}", [f"ours-{i}"], make_params("enc0", [f"theirs-{i}"]))
            assert scheduler.ensure_available(req, 0)
            assert scheduler.ensure_available(req, 0)  # a request is counted once
        assert scheduler.stats.take()["counters"]["unmatched_params"] == 3
        end = time.monotonic() + 5
        while "cannot serve this instance" not in caplog.text and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        scheduler.close()
    assert caplog.text.count("cannot serve this instance") == 1
    assert "same --model string" in caplog.text
    assert caplog.text.count("name none of its items") == 1


def test_a_deepstack_model_takes_exactly_its_stacked_width():
    shape = ModelShape.of(torch.bfloat16, embeds_width=1024, deepstack_levels=3)
    assert shape.width == 4096
