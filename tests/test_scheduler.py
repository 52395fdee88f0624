"""The PD scheduler's decisions, with real vLLM Requests, a real exporter process,
and two worker ranks (tensor parallel 2), each a real worker service on a local
socket with real NIXL READs behind it."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from conftest import MiB, spec, wait_until
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItem, PlaceholderRange
from vllm.sampling_params import SamplingParams
from vllm.v1.request import Request

from ec_nixl.arena import Arena
from ec_nixl.control.worker_link import WorkerClient, serve_worker
from ec_nixl.coordinator import PullCoordinator
from ec_nixl.receiver import ModelShape, Receiver
from ec_nixl.resolver import Resolver
from ec_nixl.scheduler import ConsumerScheduler, ProducerScheduler
from ec_nixl.transfer_params import announce_params, consumer_params, make_params
from ec_nixl.watch import ExportWatcher


def serve_rank(tmp_path_factory, producer, rank: int):
    resolver = Resolver(consumer_id=f"test-worker-{rank}")
    model = ModelShape(torch.bfloat16, width=1024)
    receiver = Receiver(Arena(32 * MiB), resolver, {"enc0": producer.address}, model)
    receiver.meet_encoders()  # as a PD worker does when it starts
    address = f"unix:{tmp_path_factory.mktemp('sock') / f'worker-{rank}.sock'}"
    server = serve_worker(receiver, address)
    yield receiver, address
    server.stop(grace=0)
    resolver.close()


@pytest.fixture(scope="module")
def receiver(tmp_path_factory, producer):
    """Rank 0: (its Receiver, its socket)."""
    yield from serve_rank(tmp_path_factory, producer, 0)


@pytest.fixture(scope="module")
def other_rank(tmp_path_factory, producer):
    yield from serve_rank(tmp_path_factory, producer, 1)


def make_scheduler(
    producer,
    receiver,
    other_rank,
    *,
    prefetch=False,
    timeout_s=5.0,
    encode_on_failure=True,
    **resolver_args,
) -> ConsumerScheduler:
    encoders = {"enc0": producer.address}
    workers = [WorkerClient(rank[1]) for rank in (receiver, other_rank)]
    resolver = Resolver(consumer_id="test-scheduler", **resolver_args)
    coordinator = PullCoordinator(resolver, encoders, workers, timeout_s, receive_bytes=32 * MiB)
    return ConsumerScheduler(
        coordinator, encoders, prefetch=prefetch, encode_on_failure=encode_on_failure
    )


@pytest.fixture
def scheduler(producer, receiver, other_rank):
    scheduler = make_scheduler(producer, receiver, other_rank)
    yield scheduler
    scheduler.close()


def watching(scheduler: ConsumerScheduler, producer, *, claim: bool = False) -> ExportWatcher:
    """The encoder's events reach the scheduler, as in the connector (which asks for
    claims for its two ranks when it prefetches)."""
    resolver = Resolver(consumer_id="test-watch")
    encoders = {"enc0": producer.address}
    return ExportWatcher(
        resolver, encoders, scheduler.on_event, scheduler.on_connect, claim=claim, readers=2
    )


ROWS = 8  # each test item's placeholder: ROWS x 1024 bf16, what the exports below hold


def item(seed: int, shape=(ROWS, 1024), dtype=torch.bfloat16):
    return spec(shape, dtype, seed)


def request(request_id: str, hashes: list[str], params=None, media: bool = True) -> Request:
    features = [
        MultiModalFeatureSpec(
            data=MultiModalKwargsItem.dummy() if media else None,
            modality="image",
            identifier=mm_hash,
            mm_position=PlaceholderRange(offset=1 + 10 * i, length=ROWS),
        )
        for i, mm_hash in enumerate(hashes)
    ]
    extra = {"ec_transfer_params": params} if params is not None else None
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(50)),
        sampling_params=SamplingParams(max_tokens=4, extra_args=extra),
        pooling_params=None,
        mm_features=features,
    )


def settle(scheduler: ConsumerScheduler, req: Request, timeout_s: float = 10) -> None:
    end = time.monotonic() + timeout_s
    while not scheduler.ensure_available(req, 0):
        assert time.monotonic() < end, "pull never finished"
        time.sleep(0.01)


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
    assert scheduler.has_item("h-pulled")
    scheduler.on_alloc("h-pulled")
    assert scheduler.take_loads() == ["h-pulled"]
    for rank in (receiver, other_rank):
        assert torch.equal(rank[0].take("h-pulled"), item(seed=1).make())
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
    assert wait_until(lambda: "h-one-rank-full" not in receiver[0].held)  # rank 0 drops its copy
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)  # given back, not expired


def test_a_pulled_item_is_lent_to_the_encoder_cache_uncopied_until_vllm_evicts_it(
    scheduler, producer, receiver
):
    producer.export("h-lent", item(seed=12))
    settle(scheduler, request("lent", ["h-lent"], make_params("enc0", ["h-lent"])))
    arena = receiver[0].puller.arena
    used = arena.bytes_used
    tensor = receiver[0].take("h-lent")
    start = arena.buffer.data_ptr()
    assert start <= tensor.data_ptr() < start + arena.capacity  # the receive slot itself
    assert arena.bytes_used == used
    receiver[0].release(["h-lent", "h-never-lent"])
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
        {"h-x": {"encoder_id": "enc0", "peer_host": "10.0.0.1"}},  # another connector's
    ],
)
def test_forged_params_are_refused_and_the_items_encoded_here_without_any_pull(scheduler, params):
    req = request("forged", ["h-x"], params)
    assert scheduler.ensure_available(req, 0)
    assert scheduler.ensure_available(req, 0)  # asked again: counted once
    assert scheduler.take_unavailable() == set()
    assert not scheduler.has_item("h-x")
    assert scheduler._coordinator.job("h-x") is None
    counters = scheduler.stats.take()["counters"]
    assert counters == {"refused_params": 1, "fallbacks": 1}


def test_forged_params_fail_a_request_that_has_no_media_to_encode(scheduler):
    req = request("forged-no-media", ["h-y"], {"h-y": "10.0.0.1:7100"}, media=False)
    assert scheduler.ensure_available(req, 0)  # let vLLM reach the failure
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
    job = scheduler._coordinator.job(mm_hash)
    assert "this model needs torch.bfloat16[8, 1024]" in str(job.error)
    assert mm_hash not in receiver[0].held
    assert scheduler.take_unavailable() == set()
    assert scheduler.stats.take()["counters"]["fallbacks"] == 1


def test_params_with_vllms_item_entries_beside_the_encoder_id_are_followed(scheduler, producer):
    """As vLLM's example EPD proxy forwards them: each item's entry from the encoder's
    answer, and a list of the items."""
    producer.export("h-vllm-shaped", item(seed=28))
    params = {
        "h-vllm-shaped": {"encoder_id": "enc0", "metadata": {}, "item_indices": [0]},
        "ec_items": [{"mm_hash": "h-vllm-shaped", "transfer_id": "t-1"}],
    }
    req = request("vllm-shaped", ["h-vllm-shaped"], params)
    settle(scheduler, req)
    assert scheduler.has_item("h-vllm-shaped")
    scheduler.request_finished(req)


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
        settle(scheduler, request("must-not-encode", ["h-policy"], params))
        assert scheduler.take_unavailable() == {"must-not-encode"}
        assert "fallbacks" not in scheduler.stats.take()["counters"]
        assert "h-policy" in caplog.text and "load_failure_policy is 'fail'" in caplog.text
    finally:
        scheduler.close()


def test_a_request_that_ends_before_its_load_frees_the_pulled_item(scheduler, producer, receiver):
    producer.export("h-abandoned", item(seed=3))
    req = request("abandoned", ["h-abandoned"], make_params("enc0", ["h-abandoned"]))
    settle(scheduler, req)
    assert "h-abandoned" in receiver[0].held
    scheduler.request_finished(req)
    end = time.monotonic() + 5
    while "h-abandoned" in receiver[0].held and time.monotonic() < end:
        time.sleep(0.01)
    assert "h-abandoned" not in receiver[0].held


def test_an_item_the_request_has_already_consumed_is_not_pulled(scheduler, producer):
    producer.export("h-consumed", item(seed=4))
    req = request("consumed", ["h-consumed"], make_params("enc0", ["h-consumed"]))
    assert scheduler.ensure_available(req, num_computed_tokens=20)  # past its placeholder
    assert scheduler._coordinator.job("h-consumed") is None


def test_a_dead_rank_fails_the_pull_within_its_deadline_and_the_lease_goes_back(
    producer, receiver, tmp_path
):
    encoders = {"enc0": producer.address}
    workers = [WorkerClient(receiver[1]), WorkerClient(f"unix:{tmp_path / 'dead-rank.sock'}")]
    coordinator = PullCoordinator(Resolver(consumer_id="dead-rank"), encoders, workers, 1.0)
    scheduler = ConsumerScheduler(coordinator, encoders)
    try:
        producer.export("h-dead-rank", item(seed=22))
        req = request("dead-rank", ["h-dead-rank"], make_params("enc0", ["h-dead-rank"]))
        start = time.monotonic()
        settle(scheduler, req)
        assert time.monotonic() - start < 1.0 + 2.0  # the pull deadline and its grace second
        assert not scheduler.has_item("h-dead-rank")
        assert scheduler.stats.take()["counters"]["fallbacks"] == 1
        assert wait_until(lambda: "h-dead-rank" not in receiver[0].held)  # the live rank drops it
        assert wait_until(lambda: producer.stats()["live_leases"] == 0)
    finally:
        scheduler.close()


def test_an_encoder_serving_another_model_is_reported_once(producer, receiver, other_rank, caplog):
    scheduler = make_scheduler(producer, receiver, other_rank, compatibility_hash="model=another")
    try:
        for i in range(3):
            # E hashed with its own model string: none of its hashes match ours.
            req = request(f"mismatch-{i}", [f"ours-{i}"], make_params("enc0", [f"theirs-{i}"]))
            assert scheduler.ensure_available(req, 0)
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


def test_the_encoder_names_itself_for_every_item_of_a_request():
    encoder = ProducerScheduler("enc0")
    req = request("on-encoder", ["h1", "h2"])
    assert encoder.finished(req) == {
        "h1": {"encoder_id": "enc0"},
        "h2": {"encoder_id": "enc0"},
    }
    assert encoder.finished(request("text-only", [])) is None


def test_the_encoders_answer_carries_vllms_item_entries_beside_its_id():
    grid = {"image_grid_thw": [1, 4, 4]}
    encoder = ProducerScheduler("enc0", lambda features: {"h1": {"metadata": grid}})
    assert encoder.finished(request("described", ["h1", "h2"])) == {
        "h1": {"metadata": grid, "encoder_id": "enc0"},
        "h2": {"encoder_id": "enc0"},
    }


class NewRequest:
    """What vLLM's scheduler output says of a request scheduled for the first time."""

    def __init__(self, req: Request) -> None:
        self.req_id, self.mm_features = req.request_id, req.mm_features


def test_the_encoder_claims_a_requests_items_for_the_pd_the_proxy_names():
    encoder = ProducerScheduler("enc0")
    routed = request("routed", ["h-r1", "h-r2"], consumer_params("pd-a"))
    plain = request("plain", ["h-p"])
    for req in (routed, plain):
        encoder.note(req)
    uses = encoder.uses([NewRequest(routed), NewRequest(plain)])
    assert uses == {"h-r1": "pd-a", "h-r2": "pd-a", "h-p": ""}


@pytest.mark.parametrize(
    "params", [{"consumer_id": "../etc"}, {"consumer_id": ""}, {"consumer_id": 7}, ["pd-a"]]
)
def test_the_encoder_claims_for_no_pd_when_the_named_one_is_malformed(params, caplog):
    encoder = ProducerScheduler("enc0")
    req = request("forged-consumer", ["h-f"], params)
    encoder.note(req)
    assert encoder.uses([NewRequest(req)]) == {"h-f": ""}
    assert "announcing its items to no PD in particular" in caplog.text


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
    producer.export("h-coming", item(seed=12))
    settle(announced, req)
    announced.on_alloc("h-coming")
    assert announced.take_loads() == ["h-coming"]
    assert torch.equal(receiver[0].take("h-coming"), item(seed=12).make())
    waits = announced.stats.take()["observations"]
    assert waits["announce_wait_seconds"][0] >= 0.2  # encoding, counted apart
    assert waits["ready_wait_seconds"][0] < 0.2  # the transfer alone


def test_an_item_announced_before_its_request_came_is_pulled_at_once(announced, producer, receiver):
    producer.export("h-before", item(seed=13))
    time.sleep(0.3)  # the announcement has passed
    req = request("late-to-pd", ["h-before"], announce_params())
    settle(announced, req, timeout_s=0.5)  # well within the 1 s deadline
    assert announced.has_item("h-before")
    assert "h-before" in receiver[0].held
    announced.request_finished(req)


def test_a_request_without_params_gets_what_an_encoder_announced_pulled(
    announced, producer, receiver
):
    producer.export("h-stock-proxy", item(seed=25))  # the proxy sent the request to E first
    time.sleep(0.3)  # announced
    req = request("no-params", ["h-stock-proxy", "h-never-at-e"])  # then, unchanged, to PD
    settle(announced, req)
    assert announced.has_item("h-stock-proxy")
    assert announced._coordinator.job("h-never-at-e") is None  # encoded here, at once
    announced.on_alloc("h-stock-proxy")
    assert torch.equal(receiver[0].take("h-stock-proxy"), item(seed=25).make())


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
    announced.on_alloc("h-being-encoded")
    assert torch.equal(receiver[0].take("h-being-encoded"), item(seed=27).make())


def test_a_request_with_params_gets_only_what_they_name(announced, producer):
    producer.export("h-announced-unnamed", item(seed=26))
    time.sleep(0.3)
    params = make_params("enc0", ["h-other"])
    req = request("named", ["h-announced-unnamed", "h-other"], params, media=True)
    announced.ensure_available(req, 0)
    assert announced._coordinator.job("h-announced-unnamed") is None
    announced.request_finished(req)


def test_an_item_the_encoder_dropped_since_announcing_it_is_awaited_afresh(announced, producer):
    producer.export("h-taken", item(seed=16))
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)
    producer.export("h-filler", spec((32 * MiB,), seed=17))  # E's whole pool: evicts the rest
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
    assert announced._coordinator.job("h-before-reconnect").awaiting
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
    assert announced._coordinator.job("h-unwanted") is None
    assert "h-unwanted" not in receiver[0].held


def test_an_item_announced_with_a_claim_for_this_pd_is_pulled_before_its_request_comes(
    announced, producer, receiver, other_rank
):
    time.sleep(0.3)  # the watcher's stream is open: a claim comes with live exports only
    producer.export("h-routed", item(seed=20), target="test-watch")  # the proxy named us
    producer.export("h-routed-elsewhere", item(seed=21), target="another-pd")
    assert wait_until(lambda: announced.has_item("h-routed"))
    assert "h-routed" in receiver[0].held and "h-routed" in other_rank[0].held
    assert announced.stats.take()["counters"]["claimed_pulls"] == 1
    assert announced._coordinator.job("h-routed-elsewhere") is None


def test_with_prefetch_an_exported_item_is_pulled_before_its_request_comes(
    prefetching, producer, receiver, other_rank
):
    producer.export("h-early", item(seed=8))
    assert wait_until(lambda: prefetching.has_item("h-early"))
    assert "h-early" in receiver[0].held and "h-early" in other_rank[0].held
    req = request("early", ["h-early"], make_params("enc0", ["h-early"]))
    assert prefetching.ensure_available(req, 0)  # scheduled at once
    prefetching.on_alloc("h-early")
    assert prefetching.take_loads() == ["h-early"]
    assert torch.equal(receiver[0].take("h-early"), item(seed=8).make())
    data = prefetching.stats.take()
    assert data["counters"]["prefetch_hits"] == 1
    assert data["observations"]["ready_wait_seconds"][0] < 0.5
    # Each announcement's claim was the lease (E's cached items are announced, and
    # prefetched, too): one READ per rank, no resolve.
    assert data["counters"]["claimed_pulls"] >= 1  # more may still be in flight
    assert "resolve_seconds" not in data["observations"]
    assert wait_until(lambda: producer.stats()["live_leases"] == 0)


def test_a_claim_that_lapsed_before_its_pull_is_resolved_afresh(
    prefetching, producer, other_rank, monkeypatch
):
    monkeypatch.setattr("ec_nixl.coordinator.CLAIM_MARGIN_S", 3600.0)  # every claim "lapsed"
    producer.export("h-lapsed", item(seed=19))
    assert wait_until(lambda: prefetching.has_item("h-lapsed"))
    assert "h-lapsed" in other_rank[0].held
    data = prefetching.stats.take()
    assert "claimed_pulls" not in data["counters"]
    # E's cached items were announced (and prefetched) too; some may still be in flight.
    assert len(data["observations"]["resolve_seconds"]) >= data["counters"]["items_pulled"] >= 1


def test_a_prefetched_item_with_other_rows_than_its_request_needs_is_encoded_here(
    prefetching, producer, receiver
):
    producer.export("h-long", item(seed=9, shape=(ROWS + 2, 1024)))
    assert wait_until(lambda: prefetching.has_item("h-long"))
    req = request("long", ["h-long"], make_params("enc0", ["h-long"]))
    assert prefetching.ensure_available(req, 0)
    assert not prefetching.has_item("h-long")
    assert prefetching.stats.take()["counters"]["fallbacks"] == 1
    assert wait_until(lambda: "h-long" not in receiver[0].held)


def test_a_prefetched_item_no_request_claims_is_dropped_after_a_while(
    prefetching, producer, receiver, monkeypatch
):
    monkeypatch.setattr("ec_nixl.coordinator.PREFETCH_TTL_S", 0.2)
    producer.export("h-unasked", item(seed=10))
    assert wait_until(lambda: prefetching.has_item("h-unasked"))
    time.sleep(0.3)
    producer.export("h-next", item(seed=11))  # the next prefetch sweeps
    assert wait_until(lambda: "h-unasked" not in receiver[0].held)
    assert prefetching._coordinator.job("h-unasked") is None


def test_unclaimed_prefetches_hold_at_most_half_the_receive_arena_oldest_dropped_first(
    prefetching, producer, receiver, other_rank
):
    big = (4 * MiB // 2048, 1024)  # 4 MiB each: half of the 32 MiB arena holds four
    names = [f"h-orphan-{n}" for n in range(6)]
    for n, name in enumerate(names):
        producer.export(name, item(seed=30 + n, shape=big))
        assert wait_until(lambda name=name: prefetching.has_item(name))
    for rank in (receiver, other_rank):  # the two oldest made room for the newest
        assert wait_until(lambda rank=rank: not {"h-orphan-0", "h-orphan-1"} & set(rank[0].held))
        assert set(names[2:]) <= set(rank[0].held)
    assert prefetching.stats.take()["counters"]["prefetches_dropped"] >= 2


def test_a_worker_meets_its_encoders_at_start_and_skips_one_that_is_down(producer, caplog):
    caplog.set_level(logging.INFO, logger="ec_nixl")
    resolver = Resolver(consumer_id="early")
    encoders = {"enc0": producer.address, "down": "127.0.0.1:1"}
    receiver = Receiver(Arena(MiB), resolver, encoders, ModelShape(torch.bfloat16, width=1024))
    try:
        receiver.meet_encoders()
        peer = resolver.peer(producer.address)  # cached by the meeting: no new handshake
        assert receiver.puller.agent.has_peer(peer.agent_name)
        assert "encoder down not met at start" in caplog.text
    finally:
        resolver.close()


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
