"""What ec_nixl counts, how counts merge across processes, and our own /metrics endpoint."""

import urllib.request

import torch
from prometheus_client.parser import text_string_to_metric_families

from ec_nixl.exporter import Exporter, ExporterConfig
from ec_nixl.metrics import Stats, merge, summary


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
