"""The link between a PD scheduler and its workers: orders, answers and typed
failures cross a local socket; a worker still starting is waited for, a stuck
one is given up on at the deadline, and hostile bytes end one connection, not
the worker."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import wait_until

from ec_nixl.consumer import worker_link
from ec_nixl.consumer.worker_link import (
    ANSWER_GRACE_S,
    PullOrder,
    PullReport,
    WorkerClient,
    WorkerServer,
    worker_address,
)
from ec_nixl.control.messages import PeerInfo, RemoteItem
from ec_nixl.errors import (
    ConfigError,
    DeadlineExceededError,
    PeerDeadError,
    RefusedError,
    WorkerLostError,
)
from ec_nixl.region import Region

ITEM = RemoteItem(
    mm_hash="h-link",
    agent_name="ec-nixl-exporter-test",
    epoch=1,
    region=Region(address=4096, length=8192, device="cpu", device_id=0),
    dtype=torch.bfloat16,
    shape=(4, 1024),
    lease_id=7,
    lease_remaining_s=30.0,
    guard=0x5EED,
)
PEER = PeerInfo(
    agent_name="ec-nixl-exporter-test",
    agent_metadata=b"agent metadata",
    epoch=1,
    regions=(Region(address=0, length=1 << 20, device="cpu", device_id=0),),
)


class Worker:
    """A reader that answers as told: what the link carries, not what NIXL does."""

    def __init__(self) -> None:
        self.orders: list[PullOrder] = []
        self.dropped: list[str] = []
        self.met: list[tuple[str, PeerInfo]] = []
        self.failure: Exception | None = None
        self.gate = threading.Event()
        self.gate.set()

    def read(self, order: PullOrder) -> PullReport:
        self.orders.append(order)
        self.gate.wait(10)
        if self.failure is not None:
            raise self.failure
        return PullReport(bytes=order.items[0].region.length, read_s=0.002)

    def drop(self, mm_hashes, pull_id) -> None:
        self.dropped.extend((mm_hash, pull_id) for mm_hash in mm_hashes)

    def meet(self, encoder_id, peer, deadline) -> None:
        self.met.append((encoder_id, peer))


def order(timeout_s: float = 2.0, valid_s: float = 5.0) -> PullOrder:
    now = time.monotonic()
    return PullOrder(
        "enc0", [ITEM], [4], now + valid_s, now + timeout_s, pull_id=(1 << 40) + 3, peer=PEER
    )


@pytest.fixture
def address(tmp_path):
    return f"unix:{tmp_path / 'rank0.sock'}"


@pytest.fixture
def reader():
    return Worker()


@pytest.fixture
def server(reader, address):
    server = WorkerServer(reader, address)
    yield server
    server.stop()


@pytest.fixture
def client(address):
    client = WorkerClient(address)
    yield client
    client.close()


def test_an_order_reaches_the_worker_whole_and_its_report_comes_back(server, reader, client):
    report = client.pull(order()).result()
    assert report == PullReport(8192, 0.002)
    [got] = reader.orders
    assert got.encoder_id == "enc0" and got.items == [ITEM] and got.num_embeds == [4]
    assert got.pull_id == (1 << 40) + 3 and got.peer == PEER
    assert got.deadline - time.monotonic() == pytest.approx(2.0, abs=0.5)
    assert got.valid_until - time.monotonic() == pytest.approx(5.0, abs=0.5)
    client.drop(["h-link"], got.pull_id)
    assert reader.dropped == [("h-link", got.pull_id)]
    client.meet("enc0", PEER, timeout_s=1.0)
    assert reader.met == [("enc0", PEER)]


def test_a_worker_failure_arrives_as_its_own_type_naming_the_worker(server, reader, client):
    reader.failure = RefusedError("h-link: the encoder holds float32[4, 1024]")
    with pytest.raises(RefusedError, match="rank0.sock.*float32"):
        client.pull(order()).result()
    reader.failure = ValueError("a bug")
    with pytest.raises(PeerDeadError, match="INTERNAL: a bug"):
        client.pull(order()).result()
    reader.failure = None
    assert client.pull(order()).result().bytes == 8192  # the link outlives failed calls


def test_orders_to_one_worker_run_side_by_side(server, reader, client):
    reader.gate.clear()
    pending = [client.pull(order()) for _ in range(3)]
    assert wait_until(lambda: len(reader.orders) == 3)  # all three inside read() at once
    reader.gate.set()
    assert [p.result().bytes for p in pending] == [8192] * 3


def test_a_worker_still_starting_is_waited_for(reader, address, client):
    pending = client.pull(order(timeout_s=3.0))
    time.sleep(0.3)
    server = WorkerServer(reader, address)
    try:
        assert pending.result().bytes == 8192
    finally:
        server.stop()


def test_a_worker_never_listening_fails_the_order_at_its_deadline(client):
    start = time.monotonic()
    pending = client.pull(order(timeout_s=0.3))
    with pytest.raises(DeadlineExceededError, match="not listening"):
        pending.result()
    assert 0.3 <= time.monotonic() - start < 1.0


def test_a_worker_that_never_accepts_fails_the_order_at_its_deadline(address, client):
    path = socket_path(address)
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as queued:
        listener.bind(str(path))
        listener.listen(0)  # room for one connection, which nobody accepts
        queued.connect(str(path))  # now full: a blocking connect would wait for ever
        failures: list[Exception] = []

        def pull() -> None:
            try:
                client.pull(order(timeout_s=0.3)).result()
            except Exception as exc:
                failures.append(exc)

        caller = threading.Thread(target=pull, daemon=True)
        caller.start()
        caller.join(10)
        hung = caller.is_alive()
    # (Closing the listener woke a caller that hung.)
    assert not hung, "the order waited past its deadline for a connection"
    [failure] = failures
    assert isinstance(failure, DeadlineExceededError) and "accept" in str(failure)


def test_a_stuck_worker_is_given_up_on_after_the_deadline_and_a_grace(server, reader, client):
    reader.gate.clear()
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="did not answer in time"):
        client.pull(order(timeout_s=0.2)).result()
    assert time.monotonic() - start == pytest.approx(0.2 + ANSWER_GRACE_S, abs=0.5)
    reader.gate.set()
    assert client.pull(order()).result().bytes == 8192  # a fresh connection serves the next


def test_a_stopped_worker_fails_the_call_in_flight_and_leaves_no_socket(
    server, reader, client, address
):
    reader.gate.clear()
    pending = client.pull(order())
    assert wait_until(lambda: reader.orders)
    server.stop()
    reader.gate.set()
    with pytest.raises(WorkerLostError, match="closed the link"):
        pending.result()
    assert not socket_path(address).exists()


@pytest.mark.parametrize(
    "frame",
    [
        (64 << 20).to_bytes(4, "big"),  # a length over the limit
        (5).to_bytes(4, "big") + b"\xff\xff\xff\xff\xff",  # not a WorkerCall
        b"\x00\x00",  # a cut length, then the sender goes
    ],
    ids=["oversized", "malformed", "cut"],
)
def test_hostile_bytes_end_their_connection_not_the_worker(server, client, address, frame):
    with socket.socket(socket.AF_UNIX) as hostile:
        hostile.connect(str(socket_path(address)))
        hostile.sendall(frame)
        if len(frame) > 2:
            hostile.settimeout(5)
            assert hostile.recv(1) == b""  # the worker closed it
    assert client.pull(order()).result().bytes == 8192


def test_another_users_process_may_not_connect(server, client, address, monkeypatch, caplog):
    monkeypatch.setattr(worker_link.os, "getuid", lambda: 12345)  # the worker's user, now
    with socket.socket(socket.AF_UNIX) as stranger:
        stranger.connect(str(socket_path(address)))
        stranger.settimeout(5)
        assert stranger.recv(1) == b""
    assert "refused a worker-link connection from uid" in caplog.text


def socket_path(address: str) -> Path:
    return Path(address.removeprefix("unix:"))


def test_the_scheduler_sends_no_order_to_a_socket_another_user_serves(server, client, monkeypatch):
    monkeypatch.setattr(worker_link.os, "getuid", lambda: 12345)  # the scheduler's user, now
    with pytest.raises(RefusedError, match=r"served by uid \d+, not this user"):
        client.pull(order()).result()


def test_worker_sockets_live_in_a_directory_only_this_user_may_enter(tmp_path, monkeypatch):
    monkeypatch.setattr(worker_link.tempfile, "gettempdir", lambda: str(tmp_path))
    path = socket_path(worker_address("engine-1", 0))
    assert path.parent == tmp_path / f"ec-nixl-{os.getuid()}"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_socket_directory_open_to_others_is_refused(tmp_path, monkeypatch):
    """Another user who made it first could bind PD's worker sockets in it."""
    monkeypatch.setattr(worker_link.tempfile, "gettempdir", lambda: str(tmp_path))
    planted = tmp_path / f"ec-nixl-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    with pytest.raises(ConfigError, match="must be a directory of uid .* with mode 0700"):
        worker_address("engine-1", 0)
