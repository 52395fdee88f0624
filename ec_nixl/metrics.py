"""What ec_nixl counts, in one table, and a thread-safe accumulator for it.

The accumulator travels as a plain dict (vLLM ships connector stats between
processes and merges those of several workers); `PromMetrics` turns such dicts
into Prometheus metrics. Labelled counters are keyed "name|label value".
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PREFIX = "ec_nixl:"
# Sub-millisecond buckets: an item's load takes a fraction of a ms; a prefetched item's
# wait is exactly 0 and has a bucket of its own, so that quantiles near 0 stay 0.
LATENCY_BUCKETS = (
    0.0,
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)


@dataclass(frozen=True)
class Metric:
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    label: str | None = None


METRICS: dict[str, Metric] = {
    # consumer (PD scheduler)
    "items_pulled": Metric("counter", "Encoder outputs pulled into this instance"),
    "bytes_pulled": Metric("counter", "Bytes of encoder outputs pulled into this instance"),
    "pull_failures": Metric("counter", "Pulls that failed, by cause", label="cause"),
    "fallbacks": Metric("counter", "Items encoded locally after their pull failed"),
    "failed_requests": Metric("counter", "Requests failed: encoder outputs unobtainable"),
    "refused_params": Metric("counter", "Requests whose ec_transfer_params were refused"),
    "unknown_param_keys": Metric(
        "counter", "Requests whose ec_transfer_params carried keys this version ignores"
    ),
    "unknown_events": Metric(
        "counter", "Encoder events of a kind this version does not know (skipped)"
    ),
    "unmatched_params": Metric(
        "counter", "Requests whose ec_transfer_params named none of their items (encoded here)"
    ),
    "pull_seconds": Metric("histogram", "From the scheduler's order to bytes on every worker"),
    "ready_wait_seconds": Metric(
        "histogram",
        "From a request asking for an item (or its encoder announcing it, if later) to every "
        "worker holding it (0: prefetched)",
    ),
    "announce_wait_seconds": Metric(
        "histogram", "From a request asking for an item still being encoded to its announcement"
    ),
    "announce_transit_seconds": Metric(
        "histogram",
        "From an encoder publishing an export to this instance receiving it (both hosts' "
        "wall clocks: their skew is in it)",
    ),
    "prefetch_hits": Metric("counter", "Items pulled before their request arrived"),
    "prefetches_dropped": Metric(
        "counter", "Prefetched items no request claimed, dropped for room (a worker's arena)"
    ),
    "resolve_seconds": Metric("histogram", "One resolve round trip to an encoder"),
    "claimed_pulls": Metric(
        "counter", "Pulls that READ under the claim in the encoder's announcement (no resolve)"
    ),
    # producer (encoder worker)
    "items_exported": Metric("counter", "Encoder outputs exported for pulling"),
    "bytes_exported": Metric("counter", "Bytes of encoder outputs exported"),
    "evictions": Metric("counter", "Exported items evicted to make room for newer ones"),
    "pool_bytes_in_use": Metric("gauge", "Bytes of the export pool in use"),
    "leases_ended": Metric(
        "counter",
        "Leases ended: every reader's READ done, released, expired, or revoked (a claim "
        "taken back for room, or from a watcher cut off)",
        "how",
    ),
    "watchers": Metric("gauge", "Event streams followed now (PDs, proxies, ec-nixl events)"),
    "watchers_cut_off": Metric(
        "counter", "Event streams ended because their watcher fell 5 s behind"
    ),
    "hints_dropped": Metric(
        "counter", "ENCODING events not sent to a watcher that was behind (hints only)"
    ),
    "leases_live": Metric("gauge", "Leases (claims included) pinning exported items now"),
    "items_read": Metric(
        "counter", "Items read by every rank of a consumer, by consumer_id", "consumer"
    ),
}


class Stats:
    """Counts and observations since the last `take()`; gauges keep their last value."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._observations: dict[str, list[float]] = {}
        self._gauges: dict[str, float] = {}

    def count(self, name: str, amount: float = 1, label: str | None = None) -> None:
        key = name if label is None else f"{name}|{label}"
        with self._lock:
            self._counters[key] += amount

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._observations.setdefault(name, []).append(value)

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def take(self) -> dict[str, Any]:
        """Everything since the last take, as a plain dict; empty when nothing happened."""
        with self._lock:
            data = {
                "counters": dict(self._counters),
                "observations": self._observations,
                "gauges": dict(self._gauges),
            }
            self._counters.clear()
            self._observations = {}
        return data if data["counters"] or data["observations"] else {}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two `take()` results as one (counters add up, observations join, gauges: b wins)."""
    if not a or not b:
        return dict(a or b)
    counters = Counter(a.get("counters", {}))
    counters.update(b.get("counters", {}))
    observations = {k: list(v) for k, v in a.get("observations", {}).items()}
    for name, values in b.get("observations", {}).items():
        observations.setdefault(name, []).extend(values)
    return {
        "counters": dict(counters),
        "observations": observations,
        "gauges": {**a.get("gauges", {}), **b.get("gauges", {})},
    }


def summary(data: dict[str, Any]) -> dict[str, float]:
    """One number per series, for vLLM's periodic log line."""
    out: dict[str, float] = dict(data.get("counters", {}))
    for name, values in data.get("observations", {}).items():
        if values:
            out[f"{name}_avg_ms"] = round(1000 * sum(values) / len(values), 2)
    out.update(data.get("gauges", {}))
    return out


class PromMetrics:
    """Prometheus metrics for the table above, made with the given constructors
    (vLLM passes its multiprocess-aware ones) and labelled per engine."""

    def __init__(self, constructors: dict[str, Callable[..., Any]], labelnames: list[str]) -> None:
        self._metrics = {}
        for name, metric in METRICS.items():
            labels = labelnames + ([metric.label] if metric.label else [])
            kwargs: dict[str, Any] = {"labelnames": labels}
            if metric.kind == "histogram":
                kwargs["buckets"] = LATENCY_BUCKETS
            self._metrics[name] = constructors[metric.kind](PREFIX + name, metric.help, **kwargs)

    def observe(self, data: dict[str, Any], labelvalues: list[object]) -> None:
        for key, amount in data.get("counters", {}).items():
            name, _, label = key.partition("|")
            if name in self._metrics:
                self._series(name, [*labelvalues, *([label] if label else [])]).inc(amount)
        for name, values in data.get("observations", {}).items():
            if name in self._metrics:
                histogram = self._series(name, labelvalues)
                for value in values:
                    histogram.observe(value)
        for name, value in data.get("gauges", {}).items():
            if name in self._metrics:
                self._series(name, labelvalues).set(value)

    def _series(self, name: str, labelvalues: list[object]):
        metric = self._metrics[name]
        return metric.labels(*labelvalues) if labelvalues else metric
