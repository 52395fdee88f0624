"""Hostile and broken input to the export service, and an exporter that restarts under us:
clear status codes, a server that stays up, and never a read of memory that changed owner."""

from __future__ import annotations

import time
from dataclasses import replace

import grpc
import pytest
import torch
from conftest import (
    CLEAR,
    FLOOD_CALLS,
    MiB,
    call_raw,
    calls_held_open,
    spec,
    ucx_address_of_another_version,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ec_nixl.arena import Arena
from ec_nixl.consumer import metadata_probe
from ec_nixl.consumer.metadata_probe import MAX_BLOBS_PER_SOURCE, probe
from ec_nixl.consumer.puller import Puller
from ec_nixl.control.client import ExportClient
from ec_nixl.control.security import Security
from ec_nixl.errors import DeadlineExceededError, HandshakeError, PeerDeadError, RefusedError
from ec_nixl.nixl_agent import TransferAgent
from ec_nixl.producer.exporter import Exporter, ExporterConfig
from ec_nixl.v1 import export_pb2 as pb
from integration.exporter_process import ExporterProcess, pull

TOKEN = "fuzz-token"
METADATA = Security(TOKEN).call_metadata()
METHODS = ("Handshake", "Resolve", "Release")
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def exporter():
    exporter = Exporter(ExporterConfig(capacity_bytes=4 * MiB, security=Security(TOKEN)))
    exporter.export("resident", torch.ones(1024))
    yield exporter
    exporter.close()


@pytest.fixture(scope="module")
def channel(exporter):
    with grpc.insecure_channel(
        exporter.address, options=[("grpc.max_send_message_length", 16 << 20)]
    ) as channel:
        yield channel


def assert_alive(exporter) -> None:
    client = ExportClient(exporter.address, Security(TOKEN))
    assert client.handshake("", "after-fuzz").epoch == exporter.epoch
    client.close()


@FUZZ
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=4096))
def test_random_bytes_get_a_clear_status_code(exporter, channel, method, payload):
    assert call_raw(channel, method, METADATA, payload) in CLEAR | {grpc.StatusCode.OK}


@FUZZ
@given(
    hashes=st.lists(st.text(max_size=300), max_size=40),
    lease_ms=st.integers(min_value=0, max_value=2**32 - 1),
    lease_ids=st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=40),
)
def test_well_formed_nonsense_gets_a_clear_status_code(channel, hashes, lease_ms, lease_ids):
    requests = {
        "Resolve": pb.ResolveRequest(mm_hashes=hashes, lease_ms=lease_ms),
        "Release": pb.ReleaseRequest(lease_ids=lease_ids),
        "Handshake": pb.HandshakeRequest(
            protocol_version=lease_ms, compatibility_hash="".join(hashes)
        ),
    }
    for method, request in requests.items():
        assert call_raw(channel, method, METADATA, request.SerializeToString()) in CLEAR | {
            grpc.StatusCode.OK
        }


def test_an_oversized_message_is_refused_and_the_server_stays_up(exporter, channel):
    request = pb.ResolveRequest(mm_hashes=["x" * 1024] * 6000)  # ~6 MiB
    assert (
        call_raw(channel, "Resolve", METADATA, request.SerializeToString())
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert_alive(exporter)


def test_fuzzing_leaves_the_exporter_serving_and_its_items_intact(exporter):
    assert_alive(exporter)
    assert "resident" in exporter.pool


def test_an_exporter_restarted_on_the_same_address_is_met_anew_and_old_descriptors_fail(
    resolver, puller
):
    config = ExporterConfig(capacity_bytes=8 * MiB, address="127.0.0.1:0")
    with ExporterProcess(config) as first:
        address = first.address
        first.export("before-restart", spec(seed=1))
        stale = resolver.resolve(address, ["before-restart"], time.monotonic() + 5)
        old_epoch = stale.peer.epoch
    with ExporterProcess(ExporterConfig(capacity_bytes=8 * MiB, address=address)) as second:
        # Descriptors of the dead process are never read: its agent is gone.
        with pytest.raises((PeerDeadError, RefusedError)):
            puller.read(stale, time.monotonic() + 5)
        second.export("after-restart", spec(seed=2))
        [item] = pull(resolver, puller, address, ["after-restart"])
        assert torch.equal(item.tensor, spec(seed=2).make())
        assert resolver.peer(address).epoch != old_epoch
        puller.free(item)
    assert puller.arena.bytes_used == 0


def test_leases_a_caller_was_not_given_cannot_be_released_or_renewed(exporter):
    exporter.export("leased", torch.ones(256))
    holder = ExportClient(exporter.address, Security(TOKEN))
    intruder = ExportClient(exporter.address, Security(TOKEN))
    try:
        (item,) = holder.resolve(["leased"], "holder")
        # Lease ids are random 63-bit numbers: neighbours and small ids name nothing.
        guesses = [item.lease_id - 1, item.lease_id + 1, *range(64)]
        assert intruder.release(guesses) == 0
        assert "leased" in exporter.pool
        assert holder.release([item.lease_id]) == 1
    finally:
        holder.close()
        intruder.close()


def test_peer_metadata_naming_its_agent_in_bytes_that_are_not_utf8_is_refused_unloaded():
    source, target = TransferAgent("named"), TransferAgent("loader")
    bad = source.metadata.replace(source.name.encode(), b"\xff" * len(source.name))
    for _ in range(2):  # the second load is refused the same way: nothing was left loaded
        with pytest.raises(HandshakeError, match="not UTF-8; unloaded"):
            target.add_peer(bad)


def test_agent_metadata_that_would_crash_ucx_is_refused_and_pulls_go_on(producer, resolver):
    puller = Puller(Arena(MiB))  # has never met this producer
    peer = resolver.peer(producer.address)
    forged = replace(peer, agent_metadata=ucx_address_of_another_version(peer.agent_metadata))
    with pytest.raises(HandshakeError, match=f"exporter {producer.address} killed.*SIGABRT"):
        puller.meet(producer.address, forged, time.monotonic() + 10)
    producer.export("after-a-forgery", spec(seed=5))
    [item] = pull(resolver, puller, producer.address, ["after-a-forgery"])
    assert torch.equal(item.tensor, spec(seed=5).make())


def test_a_probe_slower_than_its_pull_goes_on_and_later_pulls_get_its_verdict():
    forged = ucx_address_of_another_version(TransferAgent("slow-probe").metadata)
    with pytest.raises(DeadlineExceededError, match="a later pull gets its verdict"):
        probe(forged, "exporter slow", time.monotonic() + 0.01)  # a helper takes ~0.7 s
    with pytest.raises(HandshakeError, match="killed the process that loaded it .SIGABRT"):
        probe(forged, "exporter slow", time.monotonic() + 30)
    start = time.monotonic()
    with pytest.raises(HandshakeError, match="SIGABRT"):
        probe(forged, "exporter slow", time.monotonic() + 30)
    assert time.monotonic() - start < 0.1  # the refusal stands: no helper each time


def test_a_call_without_the_token_is_turned_away_before_its_body_arrives(exporter, channel):
    with calls_held_open(channel, "/ec_nixl.v1.ExportService/Handshake") as held:
        start = time.monotonic()
        assert_alive(exporter)
        assert time.monotonic() - start < 2
        codes = {call.exception(timeout=1).code() for call in held}
    assert codes == {grpc.StatusCode.UNAUTHENTICATED}


def test_health_checks_held_open_leave_the_export_service_its_threads(exporter, channel):
    with calls_held_open(channel, "/grpc.health.v1.Health/Check"):
        start = time.monotonic()
        assert_alive(exporter)
        assert time.monotonic() - start < 2


def test_health_answers_while_anonymous_callers_hold_watch_streams_open(exporter, channel):
    """Orchestrators' liveness probes call Check; anyone may open Watch streams, which
    never end: those must not take the threads Check runs on."""
    stub = health_pb2_grpc.HealthStub(channel)
    service = health_pb2.HealthCheckRequest(service="ec_nixl.v1.ExportService")
    watches = [stub.Watch(service) for _ in range(FLOOD_CALLS)]
    try:
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert stub.Check(service, timeout=2).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for watch in watches:
            watch.cancel()


def damaged_sections(metadata: bytes) -> bytes:
    """The metadata with its memory-section count made huge: NIXL refuses it, and a
    process that loads it keeps its agent name, refusing its genuine metadata after.
    (NIXL serializes a field as tag, 8-byte length, bytes; the count opens the field.)"""
    at = metadata.index(b"nixlSecElms") + len(b"nixlSecElms") + 8 + 6
    return metadata[:at] + bytes([metadata[at] ^ 0xFF]) + metadata[at + 1 :]


def test_metadata_nixl_refuses_never_loads_here_and_the_genuine_metadata_loads_after(
    producer, resolver
):
    puller = Puller(Arena(MiB))  # has never met this producer
    peer = resolver.peer(producer.address)
    forged = replace(peer, agent_metadata=damaged_sections(peer.agent_metadata))
    with pytest.raises(HandshakeError, match="rejected by NIXL"):
        puller.meet(producer.address, forged, time.monotonic() + 10)
    assert not puller.agent.has_peer(peer.agent_name)
    producer.export("after-refused-metadata", spec(seed=6))
    [item] = pull(resolver, puller, producer.address, ["after-refused-metadata"])
    assert torch.equal(item.tensor, spec(seed=6).make())


def test_an_exporter_sending_new_metadata_each_time_gets_no_helper_past_its_bound():
    blobs = [f"not nixl metadata {n}".encode() for n in range(MAX_BLOBS_PER_SOURCE + 1)]
    for blob in blobs[:-1]:
        with pytest.raises(HandshakeError, match="rejected by NIXL"):
            probe(blob, "exporter shifty", time.monotonic() + 30)
    start = time.monotonic()
    with pytest.raises(HandshakeError, match="different NIXL metadata within"):
        probe(blobs[-1], "exporter shifty", time.monotonic() + 30)
    assert time.monotonic() - start < 0.1  # refused without a helper
    with pytest.raises(HandshakeError, match="rejected by NIXL"):  # known: its verdict
        probe(blobs[0], "exporter shifty", time.monotonic() + 30)


def test_settled_verdicts_are_kept_up_to_a_bound(monkeypatch):
    monkeypatch.setattr(metadata_probe, "MAX_VERDICTS", 2)
    for n in range(4):
        with pytest.raises(HandshakeError, match="rejected by NIXL"):
            probe(f"junk {n}".encode(), f"exporter {n}", time.monotonic() + 30)
    assert len(metadata_probe._verdicts) <= 3  # the bound, and the newest while it settled
