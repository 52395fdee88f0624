"""What ec_nixl counts, how counts merge across processes, and our own /metrics endpoint."""

import socket
import threading
import urllib.request

import pytest
import torch
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families

from ec_nixl.metrics import Stats, merge, summary
from ec_nixl.producer.exporter import Exporter, ExporterConfig
from ec_nixl.producer.metrics_endpoint import MAX_CONNECTIONS

HALF_SENT = b"GET /metrics HTTP/1.1\r\nHost: encoder\r\n"  # the blank line never comes


def test_take_returns_what_happened_since_the_last_take():
    stats = Stats()
    stats.count("items_pulled")
    stats.count("pull_failures", label="PeerDeadError")
    stats.observe("pull_seconds", 0.004)
    stats.set("pool_bytes_in_use", 4096)
    data = stats.take()
    assert data["counters"] == {"items_pulled": 1, "pull_failures|PeerDeadError": 1}
    assert data["observations"] == {"pull_seconds": [0.004]}
    assert stats.take() == {}


def test_counts_of_two_workers_merge():
    a, b = Stats(), Stats()
    a.count("items_pulled", 2)
    b.count("items_pulled", 3)
    b.observe("pull_seconds", 0.002)
    merged = merge(a.take(), b.take())
    assert merged["counters"] == {"items_pulled": 5}
    assert summary(merged) == {"items_pulled": 5, "pull_seconds_avg_ms": 2.0}


def test_an_exporter_serves_its_counts_on_its_own_metrics_endpoint():
    exporter = Exporter(ExporterConfig(capacity_bytes=8 << 10, metrics_address="127.0.0.1:0"))
    try:
        for name in "abc":  # two fit: the third evicts the first
            exporter.export(name, torch.ones(16))
        exporter.metrics.flush()
        url = f"http://127.0.0.1:{exporter.metrics.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(reply.read().decode())
                for s in family.samples
            }
    finally:
        exporter.close()
    assert samples["ec_nixl:items_exported_total", ()] == 3
    assert samples["ec_nixl:bytes_exported_total", ()] == 3 * 64
    assert samples["ec_nixl:evictions_total", ()] == 1
    assert samples["ec_nixl:pool_bytes_in_use", ()] == 8 << 10


@pytest.fixture
def metered():
    """An exporter with its /metrics endpoint, and the endpoint's port."""
    exporter = Exporter(ExporterConfig(capacity_bytes=8 << 10, metrics_address="127.0.0.1:0"))
    yield exporter, exporter.metrics.port
    exporter.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        return reply.read().decode()


def held_open(port: int, count: int, request: bytes = HALF_SENT) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(request)
        sockets.append(sock)
    return sockets


def closed_by_the_server(sock: socket.socket) -> bool:
    sock.settimeout(30)  # a deadline, far past the server's
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connections_that_never_finish_their_request_take_no_thread_and_scrapes_go_on(metered):
    exporter, port = metered
    threads = threading.active_count()
    held = held_open(port, 300)
    try:
        assert wait_until(lambda: exporter.metrics.endpoint.open_connections == MAX_CONNECTIONS)
        assert "ec_nixl:items_exported_total" in scrape(port)
        assert threading.active_count() <= threads
        assert exporter.metrics.endpoint.open_connections <= MAX_CONNECTIONS
    finally:
        for sock in held:
            sock.close()


def test_a_connection_that_sends_nothing_or_half_a_request_is_closed_after_the_deadline(
    monkeypatch,
):
    monkeypatch.setattr("ec_nixl.producer.metrics_endpoint.REQUEST_TIMEOUT_S", 0.5)
    exporter = Exporter(ExporterConfig(capacity_bytes=8 << 10, metrics_address="127.0.0.1:0"))
    port = exporter.metrics.port
    held = held_open(port, 4) + held_open(port, 4, request=b"")
    try:
        assert all(closed_by_the_server(sock) for sock in held)
        assert wait_until(lambda: exporter.metrics.endpoint.open_connections == 0)
        assert "ec_nixl:items_exported_total" in scrape(port)
    finally:
        for sock in held:
            sock.close()
        exporter.close()
