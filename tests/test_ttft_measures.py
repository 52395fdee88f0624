"""How the TTFT benchmark reads and sums up what it measured, against a real /metrics."""

from __future__ import annotations

import prometheus_client
import pytest

from ec_nixl.metrics import LATENCY_BUCKETS
from integration.client import image
from integration.servers import free_port
from integration.ttft_measures import (
    LOAD_LINE,
    SAVE_LINE,
    Histogram,
    Ready,
    histogram,
    p50_ratio,
    per_item_ms,
    timings_in,
)


@pytest.fixture
def endpoint():
    """A Prometheus endpoint with one histogram on ec_nixl's buckets, and its URL."""
    registry = prometheus_client.CollectorRegistry()
    waits = prometheus_client.Histogram("waits_seconds", "", buckets=LATENCY_BUCKETS,
                                        registry=registry)  # fmt: skip
    port = free_port()
    server, thread = prometheus_client.start_http_server(port, "127.0.0.1", registry)
    yield waits, f"http://127.0.0.1:{port}"
    server.shutdown()
    thread.join()


def test_a_histogram_read_twice_covers_only_what_came_between(endpoint):
    waits, url = endpoint
    waits.observe(1.0)
    before = histogram(url, "waits_seconds")
    for seconds in (0.002, 0.004):
        waits.observe(seconds)
    between = histogram(url, "waits_seconds").since(before)
    assert between.count == 2
    assert between.mean_ms() == pytest.approx(3.0)


def test_the_spans_of_several_blocks_add_up(endpoint):
    """A way's blocks are interleaved with other ways' on the same PD: only its own count."""
    waits, url = endpoint
    spans = []
    for own, other in ((0.002, 1.0), (0.004, 2.0)):
        before = histogram(url, "waits_seconds")
        waits.observe(own)
        spans.append(histogram(url, "waits_seconds").since(before))
        waits.observe(other)  # another way's block
    total = spans[0].plus(spans[1])
    assert total.count == 2
    assert total.mean_ms() == pytest.approx(3.0)


def test_waits_that_were_all_zero_have_a_zero_median(endpoint):
    """A prefetched item does not wait; interpolating in (0, 0.1 ms] would say 0.05 ms."""
    waits, url = endpoint
    for _ in range(3):
        waits.observe(0.0)
    waits.observe(0.003)
    assert histogram(url, "waits_seconds").quantile_ms(0.5) == 0.0


def test_embeddings_ready_adds_transit_wait_and_load_and_says_each():
    """With --overlap the announcement's way from E is on the path; otherwise no transit
    is read, and its part is zero."""
    inf = float("inf")
    transits = Histogram({0.001: 2.0, inf: 2.0}, sum_s=0.002)  # two of 1 ms
    waits = Histogram({0.002: 2.0, inf: 2.0}, sum_s=0.004)  # two of 2 ms
    overlap = Ready(transits, waits, load_ms=[0.5, 0.5]).ms()
    assert overlap["mean"] == pytest.approx(1.0 + 2.0 + 0.5)
    assert (overlap["transit_mean"], overlap["wait_mean"], overlap["load_mean"]) == (1, 2, 0.5)
    sequential = Ready(waits=waits, load_ms=[0.5, 0.5]).ms()
    assert sequential["transit_p50"] == sequential["transit_mean"] == 0.0
    assert sequential["mean"] == pytest.approx(2.5)


def test_the_ttft_ratio_interval_holds_1_for_equal_samples_and_not_for_a_clear_win():
    samples = [200.0 + (i * 37) % 50 for i in range(48)]
    ratio, low, high = p50_ratio(samples, samples)
    assert ratio == 1.0 and low <= 1.0 <= high
    ratio, low, high = p50_ratio([s * 1.5 for s in samples], samples)
    assert ratio == pytest.approx(1.5) and low > 1.0


def test_every_seed_gives_a_new_image():
    """A repeated image would be a cache hit, and shared storage's file already on disk."""
    assert len({image(seed) for seed in range(600)}) == 600


def test_save_and_load_times_are_read_from_the_workers_log_lines_per_item():
    log = "\n".join([
        "(Worker pid=2) INFO 11-26 20:00:00 [timed_connectors.py:30] "
        + SAVE_LINE.format(items=1, ms=1.25),
        "(Worker pid=2) INFO 11-26 20:00:01 [timed_connectors.py:40] "
        + LOAD_LINE.format(items=2, ms=0.5),
        "an unrelated line: ec-load of nothing",
    ])  # fmt: skip
    assert timings_in(log, SAVE_LINE) == [(1, 1.25)]
    assert timings_in(log, LOAD_LINE) == [(2, 0.5)]
    assert per_item_ms(timings_in(log, LOAD_LINE)) == [0.25, 0.25]
