"""Reliability under load, faults and hostile input: real E + PD + proxy, real signals.

Each test is a scenario of docs/RELIABILITY.md: it sends requests with
deadlines, checks that every one ended in an answer or a clear error (none
hung), and records its figures (`make reliability` writes them out). The tests
share one deployment and run in file order: the encoder is flooded, attacked,
stalled, cut off, killed and restarted; then PD is killed and restarted.

The deployment: E exports into a pool of POOL_ITEMS embeddings with LEASE_S
leases, behind a token and TLS; PD reaches E's control plane through a relay
the tests can cut, and gives up on a pull after PULL_DEADLINE_S; the proxy
gives up on a silent encoder after ENCODER_TIMEOUT_S.
"""

from __future__ import annotations

import inspect
import json
import random
import re
import signal
import socket
import time
from functools import partial
from pathlib import Path

import grpc
import pytest
import torch
from conftest import (
    CLEAR,
    FLOOD_CALLS,
    RECOVERED,
    call_raw,
    calls_held_open,
    ucx_address_of_another_version,
    wait_until,
)

from ec_nixl.control.client import MAX_RECONNECT_BACKOFF_MS, ExportClient
from ec_nixl.control.security import Security
from ec_nixl.errors import AuthError, PeerDeadError
from ec_nixl.nixl_agent import TransferAgent
from ec_nixl.producer.exporter import Exporter, ExporterConfig
from integration.client import chat_body, image, metric, post
from integration.faults import TcpRelay
from integration.reliability import Outcome, Row, send_all, write_report
from integration.reliability_rig import PoolWatch, Rig, in_background, results
from integration.servers import PeakRss, free_port, start_proxy, wait_healthy
from integration.tiny_vlm import IMAGE_TOKENS, TEXT_HIDDEN, embedding_bytes

POOL_ITEMS = 4
LEASE_S = 5.0
PULL_DEADLINE_S = 3.0
FROZEN_S = 10.0  # longer than keepalive takes to give up a silent connection (2 + 5 s)
ENCODER_TIMEOUT_S = 3.0
REQUEST_DEADLINE_S = 90.0  # a request still unanswered after this counts as hung
RSS_HEADROOM_MIB = 256  # growth allowed over the warm RSS: vLLM's own caches
TOKEN = "reliability-token"
PROBED = "loaded safely in a helper process"  # PD's log line on a probe's verdict
SETUP = (
    f"Set-up: one encoder (E, export pool of {POOL_ITEMS} embeddings of "
    f"{embedding_bytes() / (1 << 20):.3f} MiB, leases and unclaimed items kept {LEASE_S:.0f} s, "
    f"token + TLS on its control plane), one PD (pull deadline {PULL_DEADLINE_S:.0f} s, "
    f"control plane through a relay the suite can cut), the proxy (encoder timeout "
    f"{ENCODER_TIMEOUT_S:.0f} s); a request unanswered after {REQUEST_DEADLINE_S:.0f} s counts "
    f"as hung. Budget = each instance's RSS after warm-up + {RSS_HEADROOM_MIB} MiB (the arenas "
    "are allocated and touched at start, so growth is vLLM's caches, or a leak)."
)

ROWS: list[Row] = []
ELSEWHERE = [
    ("an encoder that answers a resolve with a descriptor for another item",
     "tests/test_pull.py::test_a_resolve_answered_for_other_items_is_refused_before_any_read"),
    ("a link that dies without a reset, seen from both ends",
     "tests/test_control.py::test_a_link_that_dies_silently_ends_the_watch_on_both_sides_within_seconds"),
    ("one caller taking leases without bound",
     "tests/test_pool.py::test_a_consumer_past_its_lease_bound_is_refused_and_others_are_not"),
    ("a release of millions of lease ids",
     "tests/test_control.py::test_a_release_of_more_leases_than_a_resolve_grants_is_refused"),
    ("a TLS certificate without its key (would serve plaintext)",
     "tests/test_connector_config.py::test_bad_config_fails_at_start_up_naming_the_key"),
    ("unclaimed prefetches filling PD's receive arena",
     "tests/test_announcements.py::test_unclaimed_prefetches_hold_at_most_half_the_receive_arena_oldest_dropped_first"),
    ("a stalled encoder PD had not met yet, against a pull's deadline",
     "tests/test_pull.py::test_a_worker_order_keeps_its_deadline_with_a_stalled_encoder_not_met_yet"),
    ("an item wider than the model (a multiple of its width)",
     "tests/test_consumer_scheduler.py::test_an_item_of_the_wrong_shape_or_dtype_is_refused_unread_and_encoded_here"),
    ("agent metadata naming its agent in bytes that are not UTF-8",
     "tests/test_hostile_input.py::test_peer_metadata_naming_its_agent_in_bytes_that_are_not_utf8_is_refused_unloaded"),
    ("a READ still in flight at its deadline (a hazard over RDMA)",
     "tests/test_pull.py::test_a_read_past_its_deadline_disconnects_before_its_slot_is_reused"),
    ("health checks held open by anyone",
     "tests/test_hostile_input.py::test_health_checks_held_open_leave_the_export_service_its_threads"),
    ("a request aborted while its pull runs, the same image asked for again at once (40 rounds)",
     "tests/test_aborted_pulls.py::test_a_request_aborted_while_its_pull_runs_never_costs_the_next_one_its_item"),
    ("two requests sharing an image, one of them aborted",
     "tests/test_aborted_pulls.py::test_a_request_sharing_an_image_with_an_aborted_one_still_loads_the_same_pull"),
    ("a PD rank told to load an item it does not hold",
     "tests/test_aborted_pulls.py::test_a_rank_told_to_load_a_copy_it_lacks_reads_the_item_again_before_the_step_goes_on"),
    ("one tenant sending media under another's content name (five forms vLLM reads as media)",
     "tests/test_proxy.py::test_one_tenant_cannot_bind_its_image_to_another_tenants_name"),
    ("a request of thousands of media items",
     "tests/test_proxy.py::test_the_default_cap_refuses_thousands_of_items"),
    ("request bodies flooding the proxy's memory",
     "tests/test_proxy.py::test_bodies_past_the_bound_in_flight_are_turned_away_until_room_is_made"),
    ("anonymous callers holding health Watch streams open",
     "tests/test_hostile_input.py::test_health_answers_while_anonymous_callers_hold_watch_streams_open"),
    ("the token in a log line or an error message",
     "tests/test_control.py::test_the_token_is_in_no_log_record_and_no_error_message"),
    ("another local user serving a PD worker's socket",
     "tests/test_worker_link.py::test_the_scheduler_sends_no_order_to_a_socket_another_user_serves"),
    ("connections to E's /metrics that never finish their request",
     "tests/test_metrics.py::test_connections_that_never_finish_their_request_take_no_thread_and_scrapes_go_on"),
    ("leases taken under ever new consumer ids",
     "tests/test_control.py::test_leases_are_bounded_over_all_consumers_whatever_names_a_caller_takes"),
    ("an encoder sending new NIXL metadata at every handshake",
     "tests/test_hostile_input.py::test_an_exporter_sending_new_metadata_each_time_gets_no_helper_past_its_bound"),
    ("NIXL metadata that NIXL refuses half-way (it keeps the agent name)",
     "tests/test_hostile_input.py::test_metadata_nixl_refuses_never_loads_here_and_the_genuine_metadata_loads_after"),
    ("one READ past its deadline beside another READ from the same encoder",
     "tests/test_pull.py::test_a_read_past_its_deadline_leaves_a_concurrent_read_from_that_exporter_to_finish"),
    ("an encoder of a later protocol sending event kinds PD does not know",
     "tests/test_control.py::test_a_watcher_follows_a_newer_exporter_without_reconnecting"),
    ("an encoder announcing an item of 0 bytes (would escape the prefetch bound)",
     "tests/test_item_table.py::test_an_announcement_of_no_bytes_is_not_prefetched"),
    ("a benchmark or test run ended by SIGTERM or killed outright, its vLLM servers left running",
     "tests/test_server_lifetime.py::test_a_vllm_instance_dies_with_its_command"),
    ("clients that hang up on requests that are not streamed (PD generated to the end)",
     "tests/test_proxy.py::test_a_client_that_leaves_ends_its_request_at_pd"),
    ("the same, through the proxy in front of a real vLLM instance",
     "tests/test_hang_ups.py::test_clients_that_hang_up_have_their_requests_dropped"),
    ("a PD worker socket that never accepts (a full backlog hung the scheduler in connect)",
     "tests/test_worker_link.py::test_a_worker_that_never_accepts_fails_the_order_at_its_deadline"),
    ("a request that reaches PD before its claimed item's announcement (a busy host)",
     "tests/test_announcements.py::test_a_request_that_outruns_its_claimed_items_announcement_waits_for_the_claim"),
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    path = request.config.getoption("--reliability-report")
    if path and ROWS:
        write_report(ROWS, Path(path), SETUP, ELSEWHERE)


@pytest.fixture
def record(rig, request):
    """Record this scenario's row; what it does is the test's docstring. Starts the
    scenario's RSS peak afresh."""
    rig.rss.reset()

    def record(scenario: str, outcome: Outcome, fallbacks: float, **kw) -> None:
        what = inspect.cleandoc(request.function.__doc__)
        peak = dict(rig.rss.peak_mib)
        ROWS.append(Row(scenario, what, outcome, int(fallbacks), peak, rig.budget_mib, **kw))

    return record


@pytest.fixture(scope="module")
def rig(workdirs, reference, tls_certificate):
    encoder_dir, pd_dir, logs = workdirs
    logs = logs / "reliability"
    cert, key = tls_certificate
    control, metrics = (f"127.0.0.1:{free_port()}" for _ in range(2))
    relay = TcpRelay(control)
    encoder_config = {
        "ec_connector": "ECNixlConnector", "ec_role": "ec_producer",
        "ec_connector_extra_config": {
            "encoder_id": "enc0", "control_address": control, "metrics_address": metrics,
            "pool_bytes": POOL_ITEMS * embedding_bytes(), "lease_s": LEASE_S,
            "token": TOKEN, "tls_cert_file": str(cert), "tls_key_file": str(key),
        },
    }  # fmt: skip
    pd_config = {
        "ec_connector": "ECNixlConnector", "ec_role": "ec_consumer",
        "ec_connector_extra_config": {
            "encoders": {"enc0": relay.address, "impostor": f"127.0.0.1:{free_port()}"},
            "receive_bytes": 32 << 20,
            "pull_timeout_s": PULL_DEADLINE_S, "token": TOKEN, "tls_ca_file": str(cert),
        },
    }  # fmt: skip
    rig = Rig(
        encoder_dir, pd_dir, logs, encoder_config, pd_config, control, relay,
        f"http://{metrics}", Security(TOKEN, tls_ca_file=cert),
    )  # fmt: skip
    try:
        wait_healthy([rig.launch("encoder"), rig.launch("pd")])
        rig.servers["proxy"] = start_proxy(
            encoders=[rig.encoder.url], pd=rig.pd.url, log_dir=logs,
            encoder_timeout_s=ENCODER_TIMEOUT_S,
        )  # fmt: skip
        wait_healthy([rig.proxy])
        with PeakRss([rig.encoder, rig.pd]) as rig.rss:
            rig.until_pulled(time.monotonic())  # warm-up: every path has run once
            time.sleep(0.5)
            rig.budget_mib = {
                name: mib + RSS_HEADROOM_MIB for name, mib in rig.rss.peak_mib.items()
            }
            yield rig
    finally:
        for server in rig.servers.values():
            server.stop()
        relay.close()


def assert_within_budget(rig: Rig) -> None:
    for name, peak in rig.rss.peak_mib.items():
        assert peak <= rig.budget_mib[name], f"{name}: {peak:.0f} MiB > {rig.budget_mib[name]:.0f}"


def test_load_of_five_times_the_pool_ends_every_request_within_the_memory_budgets(rig, record):
    """Sends 5x as many distinct images as E's pool holds through the proxy, 8 at a
    time (vLLM's batch limit here). E must evict older items for space; a
    pull that finds its item gone falls back to local encoding. Checks: no
    request hangs, E's pool never holds more than its size (exact, from E's event
    stream), both instances stay within their RSS budgets, and E pins nothing
    (no live lease) once the load is over."""
    before = (rig.fallbacks(), rig.pulled(), rig.leases_ended())
    pool = PoolWatch(rig)
    bodies = [chat_body(rig.fresh_image()) for _ in range(5 * POOL_ITEMS)]
    try:
        outcome = send_all(rig.proxy.url, bodies, concurrency=8, deadline_s=REQUEST_DEADLINE_S)
        drained_s = rig.wait_unleased(timeout_s=LEASE_S + 5)
    finally:
        pool.close()
    leases = {k: v - before[2][k] for k, v in rig.leases_ended().items()}
    record(
        "load: 5x the export pool",
        outcome,
        rig.fallbacks() - before[0],
        notes=[
            f"pulled {rig.pulled() - before[1]:.0f} items; E's leases ended: {leases}",
            f"E's pool peaked at {pool.max_bytes / (1 << 20):.2f} MiB of "
            f"{POOL_ITEMS * embedding_bytes() / (1 << 20):.2f} MiB; no lease left "
            f"{drained_s:.1f} s after the last answer",
            f"slowest answer {outcome.slowest_s:.1f} s",
        ],
    )
    assert outcome.hung == 0 and outcome.answered == outcome.sent, outcome.errors
    assert pool.max_bytes <= POOL_ITEMS * embedding_bytes()
    assert_within_budget(rig)


FORGED = {
    "unknown encoder": {"ITEM": {"encoder_id": "not-configured"}},
    "raw address": {"ITEM": "127.0.0.1:PORT"},
    "address as id": {"ITEM": {"encoder_id": "127.0.0.1:PORT"}},
    "sizes and dtype": {"ITEM": {"encoder_id": "enc0", "bytes": -1, "dtype": "float64",
                                 "shape": [1 << 40, 4096]}},
    "nested junk": {"ITEM": {"encoder_id": {"deeply": [[{"nested": "junk"}]]}}},
    "item not in request": {"0" * 64: {"encoder_id": "enc0"}},
    "not an object": ["ITEM"],
}  # fmt: skip


def test_forged_transfer_params_get_a_local_encoding_or_a_4xx_and_contact_no_one(rig, record):
    """Sends PD (directly, as a client bypassing the proxy could) a request for an
    image E has exported, with `ec_transfer_params` forged 7 ways: an unknown
    encoder id, a raw host:port, an address as encoder id, extra size/dtype/shape
    claims, nested junk, an mm_hash not in the request, a list. Each must be
    answered by encoding locally or refused with a 4xx; the size/dtype/shape claims
    beside a configured encoder id are keys PD does not know, followed as a newer
    vLLM's would be (the claims ignored and counted; the image is by then in PD's
    own cache, from the first forgery's local encoding). Nothing is pulled, and
    nothing may connect to the listener whose address the forgeries carry."""
    url = image(2100)
    mm_hash = next(iter(post(rig.encoder.url, chat_body(url, max_tokens=1))["ec_transfer_params"]))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = str(listener.getsockname()[1])
    before = (
        rig.fallbacks(),
        rig.pulled(),
        metric(rig.pd.url, "ec_nixl:refused_params_total"),
        metric(rig.pd.url, "ec_nixl:unknown_param_keys_total"),
    )
    forged = json.dumps(list(FORGED.values())).replace("ITEM", mm_hash).replace("PORT", port)
    bodies = [chat_body(url, ec_transfer_params=params) for params in json.loads(forged)]
    outcome = send_all(rig.pd.url, bodies, concurrency=1, deadline_s=REQUEST_DEADLINE_S)
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()
    refused = metric(rig.pd.url, "ec_nixl:refused_params_total") - before[2]
    record(
        "hostile: forged ec_transfer_params",
        outcome,
        rig.fallbacks() - before[0],
        notes=[
            f"PD refused {refused:.0f} requests' params; pulled {rig.pulled() - before[1]:.0f}; "
            "no connection reached the forged address"
        ],
    )
    assert outcome.hung == 0
    assert all(re.match(r"HTTP 4\d\d", e) for e in outcome.errors), outcome.errors
    # those naming the request's own item but for the claims' (followed, the claims
    # ignored); the others name none of its items
    assert refused == 4
    assert metric(rig.pd.url, "ec_nixl:unknown_param_keys_total") - before[3] == 1
    assert rig.pulled() == before[1]


def test_callers_without_the_token_or_tls_are_turned_away(rig, record):
    """Calls E's control plane as an outsider: over TLS without the token, over TLS
    with a wrong token, with the token over plaintext (E speaks TLS only). Each
    must get UNAUTHENTICATED or a refused connection; E keeps serving PD."""
    ca = rig.security.tls_ca_file
    outsiders = [Security(None, tls_ca_file=ca), Security("wrong", tls_ca_file=ca), Security(TOKEN)]
    outcome = Outcome()
    for security in outsiders:
        client = ExportClient(rig.control, security, timeout_s=5)
        try:
            client.handshake("", "outsider")
            outcome.answered += 1
        except (AuthError, PeerDeadError) as exc:
            outcome.clear_errors += 1
            outcome.errors.append(f"{type(exc).__name__}: {str(exc)[:80]}")
        finally:
            client.close()
    recovery_s, served = rig.until_pulled(time.monotonic())
    record(
        "hostile: unauthenticated callers",
        outcome,
        0,
        notes=[f"E served PD's next pull {recovery_s:.1f} s later"],
    )
    assert outcome.answered == 0 and outcome.clear_errors == 3


def test_garbage_on_the_control_plane_gets_status_codes_and_the_encoder_keeps_serving(rig, record):
    """Sends 50 random byte strings (0-4 KiB, seeded) as the request of each of E's
    three unary methods, with the token over TLS. Each must end with a status code
    that names the problem (never UNKNOWN, never a timeout); afterwards E still
    serves pulls. (tests/test_hostile_input.py fuzzes the same service with
    hypothesis: well-formed nonsense and oversized messages.)"""
    rng = random.Random(5)
    credentials = grpc.ssl_channel_credentials(rig.security.tls_ca_file.read_bytes())
    outcome = Outcome()
    with grpc.secure_channel(rig.control, credentials) as channel:
        for method in ("Handshake", "Resolve", "Release"):
            for _ in range(50):
                payload = rng.randbytes(rng.randrange(4096))
                code = call_raw(channel, method, rig.security.call_metadata(), payload)
                if code is grpc.StatusCode.OK:
                    outcome.answered += 1
                elif code in CLEAR:
                    outcome.clear_errors += 1
                else:
                    outcome.hung += code is grpc.StatusCode.DEADLINE_EXCEEDED
                    outcome.errors.append(code.name)
    recovery_s, served = rig.until_pulled(time.monotonic())
    record(
        "hostile: random bytes to the control plane",
        outcome,
        0,
        notes=[f"E served PD's next pull {recovery_s:.1f} s later"],
    )
    assert not outcome.errors


def test_calls_held_open_without_the_token_take_nothing_from_pd(rig, record):
    """Opens 64 calls to E's control plane over TLS without the token (four times
    E's RPC threads) that send their headers and never their body, and holds
    them while PD pulls. Each must be turned away UNAUTHENTICATED without its
    body; E serves PD's pulls meanwhile."""
    credentials = grpc.ssl_channel_credentials(rig.security.tls_ca_file.read_bytes())
    outcome = Outcome()
    with (
        grpc.secure_channel(rig.control, credentials) as channel,
        calls_held_open(channel, "/ec_nixl.v1.ExportService/Handshake") as held,
    ):
        served_s, _ = rig.until_pulled(time.monotonic())
        for call in held:
            code = call.exception(timeout=1).code()
            outcome.clear_errors += code is grpc.StatusCode.UNAUTHENTICATED
            if code is not grpc.StatusCode.UNAUTHENTICATED:
                outcome.errors.append(code.name)
    record(
        "hostile: calls held open without the token",
        outcome,
        0,
        notes=[f"E served PD's next pull {served_s:.1f} s after the calls were opened"],
    )
    assert outcome.clear_errors == FLOOD_CALLS, outcome.errors


def test_an_impostor_whose_nixl_metadata_would_crash_ucx_costs_one_fallback(
    rig, record, tls_certificate, monkeypatch
):
    """Starts an impostor encoder on an address PD knows as encoder `impostor`
    (it holds the token and E's TLS key, as an insider or anyone on a link
    without TLS could): it exports an item for an image and hands out NIXL
    agent metadata whose UCX address claims another format version, which
    aborts any process that loads it. PD gets the image with params naming the
    impostor. PD must load the metadata in a helper process first, refuse it,
    encode locally and answer, and keep pulling from E."""
    url = rig.fresh_image()
    [mm_hash] = post(rig.encoder.url, chat_body(url, max_tokens=1))["ec_transfer_params"]
    address = rig.pd_config["ec_connector_extra_config"]["encoders"]["impostor"]
    cert, key = tls_certificate
    real = TransferAgent.metadata.fget
    forged = property(lambda agent: ucx_address_of_another_version(real(agent)))
    monkeypatch.setattr(TransferAgent, "metadata", forged)  # what the impostor hands out
    impostor = Exporter(
        ExporterConfig(
            address=address, capacity_bytes=4 * embedding_bytes(),
            compatibility_hash="model=tiny-llava dtype=bfloat16",
            security=Security(TOKEN, tls_cert_file=cert, tls_key_file=key),
        )
    )  # fmt: skip
    monkeypatch.undo()
    before = (rig.fallbacks(), rig.pull_failures())
    try:
        deadline = time.monotonic() + 10
        while not len(impostor.events):  # PD is back from its reconnect backoff: it watches
            assert time.monotonic() < deadline, "PD never connected to the impostor"
            time.sleep(0.1)
        # PD's worker has a channel of its own to that address, refused at start-up: it
        # retries at least this often, and fails a call at once until it connects.
        time.sleep(MAX_RECONNECT_BACKOFF_MS / 1000 + 0.5)
        impostor.export(mm_hash, torch.zeros(IMAGE_TOKENS, TEXT_HIDDEN, dtype=torch.bfloat16))
        body = chat_body(url, ec_transfer_params={mm_hash: {"encoder_id": "impostor"}})
        outcome = send_all(rig.pd.url, [body], concurrency=1, deadline_s=REQUEST_DEADLINE_S)
    finally:
        impostor.close()
    refused = rig.pull_failures() - before[1]
    served_s, served = rig.until_pulled(time.monotonic())
    record(
        "hostile: an impostor's NIXL metadata that crashes UCX",
        outcome.add(served),
        rig.fallbacks() - before[0],
        notes=[
            f"PD refused {refused:.0f} pull (the probe process died of SIGABRT) and pulled "
            f"from E {served_s:.1f} s later"
        ],
    )
    assert outcome.answered == 1 and refused == 1
    # On a loaded host the helper's verdict may come after the pull's deadline: PD logs
    # it when it comes (and a later pull from the impostor gets it at once).
    assert wait_until(
        lambda: "killed the process that loaded it (SIGABRT" in rig.pd.log_path.read_text(), 30
    )


def traffic(url: str, bodies: list[dict], concurrency: int = 2):
    return partial(send_all, url, bodies, concurrency=concurrency, deadline_s=REQUEST_DEADLINE_S)


def test_a_stalled_encoder_costs_one_deadline_then_service_resumes(rig, record):
    """Stops E with SIGSTOP for PULL_DEADLINE_S + 2 s, then SIGCONT. Meanwhile PD
    gets a request naming an item E had exported (its pull waits for the stalled
    E until the pull deadline, then PD encodes locally), and the proxy gets two
    requests (it waits ENCODER_TIMEOUT_S for E, skips it, PD encodes locally).
    Checks: every request answered, none later than a deadline plus the local
    encoding; after SIGCONT, pulls resume (recovery)."""
    url = rig.fresh_image()
    params = post(rig.encoder.url, chat_body(url, max_tokens=1))["ec_transfer_params"]
    before = rig.fallbacks()
    rig.encoder.signal(signal.SIGSTOP)
    try:
        pending = in_background(
            traffic(rig.pd.url, [chat_body(url, ec_transfer_params=params)]),
            traffic(rig.proxy.url, [chat_body(rig.fresh_image()) for _ in range(2)]),
        )
        time.sleep(PULL_DEADLINE_S + 2)
    finally:
        rig.encoder.signal(signal.SIGCONT)
    resumed_at = time.monotonic()
    outcome = results(pending)
    recovery_s, recovering = rig.until_pulled(resumed_at)
    outcome = outcome.add(recovering)
    record(
        "fault: encoder stalled (SIGSTOP) past the deadline",
        outcome,
        rig.fallbacks() - before,
        recovery_s=recovery_s,
        notes=[
            f"slowest answer during the stall {outcome.slowest_s:.1f} s (pull deadline "
            f"{PULL_DEADLINE_S:.0f} s, encoder timeout {ENCODER_TIMEOUT_S:.0f} s)",
        ],
    )
    assert outcome.hung == 0 and outcome.answered == outcome.sent, outcome.errors
    assert outcome.slowest_s < PULL_DEADLINE_S + ENCODER_TIMEOUT_S + 10


def test_a_cut_control_link_falls_back_then_reconnects_within_seconds(rig, record):
    """Cuts the link between PD and E's control plane (the relay resets PD's live
    gRPC connection and refuses new ones) while requests flow through the proxy,
    for 3 s, then restores it. E still encodes; PD's resolve fails at once
    (UNAVAILABLE) and PD encodes locally. After the restore, gRPC reconnects with
    backoff (capped at 2 s) and pulls resume (recovery)."""
    before = rig.fallbacks()
    pending = in_background(
        traffic(rig.proxy.url, [chat_body(rig.fresh_image()) for _ in range(4)])
    )
    time.sleep(0.3)
    rig.relay.cut()
    try:
        cut_outcome = send_all(rig.proxy.url, [chat_body(rig.fresh_image())], concurrency=1,
                               deadline_s=REQUEST_DEADLINE_S)  # fmt: skip
        time.sleep(max(0.0, 3.0 - cut_outcome.slowest_s))
    finally:
        rig.relay.restore()
    restored_at = time.monotonic()
    outcome = results(pending).add(cut_outcome)
    recovery_s, recovering = rig.until_pulled(restored_at)
    outcome = outcome.add(recovering)
    failures = metric(rig.pd.url, "ec_nixl:pull_failures_total", cause="PeerDeadError")
    record(
        "fault: control-plane link cut for 3 s",
        outcome,
        rig.fallbacks() - before,
        recovery_s=recovery_s,
        notes=[
            f"slowest answer {outcome.slowest_s:.1f} s; PD has counted {failures:.0f} "
            "pull failures as PeerDeadError so far"
        ],
    )
    assert outcome.hung == 0 and outcome.answered == outcome.sent, outcome.errors
    assert rig.fallbacks() > before
    assert recovery_s < 10


def test_a_control_link_gone_silent_is_noticed_and_pulls_resume_after(rig, record):
    """Freezes the link between PD and E's control plane (no byte passes and no reset
    comes: a path a broken switch left dead) for FROZEN_S while requests flow through
    the proxy, then thaws it. PD's pulls must fail within their deadline (PD encodes
    locally), its keepalive must give up the silent connection, and pulls resume once
    the link is back (recovery)."""
    before = rig.fallbacks()
    rig.relay.freeze()
    try:
        frozen = send_all(rig.proxy.url, [chat_body(rig.fresh_image()) for _ in range(3)],
                          concurrency=1, deadline_s=REQUEST_DEADLINE_S)  # fmt: skip
        time.sleep(max(0.0, FROZEN_S - 3 * frozen.slowest_s))
    finally:
        rig.relay.thaw()
    thawed_at = time.monotonic()
    recovery_s, recovering = rig.until_pulled(thawed_at)
    record(
        "fault: control-plane link silent (frozen, no reset)",
        frozen.add(recovering),
        rig.fallbacks() - before,
        recovery_s=recovery_s,
        notes=[f"slowest answer while frozen {frozen.slowest_s:.1f} s"],
    )
    assert frozen.hung == 0 and frozen.answered == frozen.sent, frozen.errors
    assert frozen.slowest_s < PULL_DEADLINE_S + 10  # the deadline, then a local encoding


def test_an_encoder_killed_mid_pull_leaves_no_request_unanswered(rig, record):
    """Kills E (SIGKILL, its whole process group) while 16 requests flow through
    the proxy, 4 at a time, as soon as PD has pulled twice: requests inside E fail
    over in the proxy, pulls from the dead E fail at once; either way PD encodes
    locally, and the proxy skips the dead E for the following requests. Every
    request must be answered. (Recovery: the restart scenario that follows.)"""
    rig.orphaned = rig.orphan()
    before = (rig.fallbacks(), rig.pulled(), rig.pull_failures())
    pending = in_background(
        traffic(rig.proxy.url, [chat_body(rig.fresh_image()) for _ in range(16)], concurrency=4)
    )
    while rig.pulled() < before[1] + 2 and not pending[0].done():
        time.sleep(0.02)
    rig.encoder.kill()
    outcome = results(pending)
    failed = rig.pull_failures() - before[2]
    record(
        "fault: encoder killed (SIGKILL) mid-pull", outcome, rig.fallbacks() - before[0],
        notes=[f"PD pulled {rig.pulled() - before[1]:.0f} items before the kill; {failed:.0f} "
               f"pulls failed; slowest answer {outcome.slowest_s:.1f} s"],
    )  # fmt: skip
    assert outcome.hung == 0 and outcome.answered == outcome.sent, outcome.errors
    assert rig.fallbacks() > before[0]  # the kill hit requests in flight


def test_an_encoder_restarted_on_its_address_is_a_new_generation(rig, reference, record):
    """Starts a new E on the killed one's ports. PD meets a new exporter generation
    (epoch) at the same address: a request naming an item of the old E falls back
    (NOT_FOUND: nothing of the old process is ever read), and the next image is
    pulled from the new E and answered exactly as the single-instance reference
    (or, if meeting the new E outlasted that pull's deadline, the one after).
    Recovery: from the restart to that pull (mostly vLLM's start-up)."""
    if rig.orphaned is None:  # run on its own
        rig.orphaned = rig.orphan()
    old_url, old_params = rig.orphaned
    before = rig.fallbacks()
    restarted_at = time.monotonic()
    rig.restart("encoder")
    stale = send_all(rig.pd.url, [chat_body(old_url, ec_transfer_params=old_params)],
                     concurrency=1, deadline_s=REQUEST_DEADLINE_S)  # fmt: skip
    deadlines = rig.deadlines_missed()
    probed = rig.pd.log_path.read_text(errors="replace").count(PROBED)
    for fresh_image in (RECOVERED[0], RECOVERED[2]):
        pulled = rig.pulled()
        fresh = post(rig.proxy.url, chat_body(fresh_image))["choices"][0]["message"]["content"]
        if rig.pulled() == pulled + 1:
            break
        # Meeting a new generation loads its NIXL metadata in a helper process first; on a
        # loaded host that can outlast a pull's deadline (CI: the probe still running 6 s
        # on, over two pulls). That pull misses it, PD encodes, the probe goes on to its
        # verdict, and the next pull from that encoder takes it at once.
        assert rig.deadlines_missed() > deadlines
        assert wait_until(
            lambda: rig.pd.log_path.read_text(errors="replace").count(PROBED) > probed,
            timeout_s=60,
        )
    recovery_s = time.monotonic() - restarted_at
    met = re.escape(f"exporter {rig.relay.address} is agent ")
    log = rig.pd.log_path.read_text(errors="replace")
    epochs = set(re.findall(met + r"\S+ \(epoch (\w+)\)", log))
    record(
        "fault: encoder restarted on the same address",
        stale.add(Outcome(answered=1)),
        rig.fallbacks() - before,
        recovery_s=recovery_s,
        notes=[
            f"PD met {len(epochs)} exporter generations at the encoder's address",
            "stale descriptors of an old generation are refused before any READ "
            "(tests/test_hostile_input.py, exporter restart)",
        ],
    )
    assert stale.answered == 1
    assert fresh == reference[fresh_image] and rig.pulled() == pulled + 1
    assert len(epochs) >= 2


def test_a_pd_killed_while_the_encoder_holds_its_items_gets_them_freed_and_restarts(
    rig, reference, record
):
    """Stops PD (SIGSTOP) while 3 requests go through the proxy: E encodes and
    exports each item for PD, which never comes for them. Then kills PD (SIGKILL):
    the proxy answers the waiting clients 502. E must pin nothing for the dead PD
    after its lease time (its items stay cached, evictable), then a new
    PD on the same port serves again, answering exactly as the reference
    (recovery: from the restart to its first pull)."""
    before = rig.leases_ended()
    pool = PoolWatch(rig)
    try:
        rig.pd.signal(signal.SIGSTOP)
        pending = in_background(
            traffic(rig.proxy.url, [chat_body(rig.fresh_image()) for _ in range(3)], concurrency=3)
        )
        deadline = time.monotonic() + 30
        while pool.items < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        held = pool.in_use
        rig.pd.kill()
        cut_off = results(pending)
        freed_s = rig.wait_unleased(timeout_s=LEASE_S + 5)
    finally:
        pool.close()
    leases = {k: v - before[k] for k, v in rig.leases_ended().items()}
    restarted_at = time.monotonic()
    rig.restart("pd")
    fresh = post(rig.proxy.url, chat_body(RECOVERED[1]))["choices"][0]["message"]["content"]
    recovery_s = time.monotonic() - restarted_at
    outcome = cut_off.add(Outcome(answered=1))
    record(
        "fault: PD killed while E holds items for it",
        outcome,
        0,
        recovery_s=recovery_s,
        notes=[
            f"E held {held / (1 << 20):.2f} MiB for PD when it died; no lease left "
            f"{freed_s:.1f} s after the kill (lease time {LEASE_S:.0f} s); leases ended since: "
            f"{leases}"
        ],
    )
    assert held >= 3 * embedding_bytes()
    assert cut_off.hung == 0 and cut_off.clear_errors == cut_off.sent, cut_off.errors
    assert fresh == reference[RECOVERED[1]] and rig.pulled() == 1


def test_every_check_the_report_points_to_exists():
    root = Path(__file__).resolve().parent.parent
    for _, test in ELSEWHERE:
        path, name = test.split("::")
        assert f"def {name}(" in (root / path).read_text(), test
