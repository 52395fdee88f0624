"""What `ec-nixl bench ttft` reads from the servers' /metrics, and how it sums it up.

Histograms are read whole (cumulative buckets and sum) and differenced between
two scrapes, so a figure covers exactly the requests sent in between. Ratios
of TTFT medians come with a bootstrap interval: on a shared machine one run's
medians move by tens of percent, and a ratio without its spread misleads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from integration.client import metric_in, samples, scrape

BOOTSTRAP_SAMPLES = 2000
INF = float("inf")
# What integration.timed_connectors logs in the E and PD workers, per save and per load.
SAVE_LINE = "ec-save {items} items in {ms:.3f} ms"
LOAD_LINE = "ec-load {items} items in {ms:.3f} ms"


@dataclass(frozen=True)
class Histogram:
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    sum_s: float = 0.0

    @property
    def count(self) -> float:
        return self.buckets.get(INF, 0.0)

    def since(self, before: Histogram) -> Histogram:
        """What was observed after `before` was scraped."""
        return Histogram(
            {le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.sum_s - before.sum_s,
        )

    def plus(self, other: Histogram) -> Histogram:
        """Both sets of observations in one (e.g. the spans of several blocks)."""
        les = self.buckets.keys() | other.buckets.keys()
        return Histogram(
            {le: self.buckets.get(le, 0.0) + other.buckets.get(le, 0.0) for le in les},
            self.sum_s + other.sum_s,
        )

    def mean_ms(self) -> float:
        return 1000 * self.sum_s / self.count if self.count else 0.0

    def quantile_ms(self, q: float) -> float:
        """Interpolated within its bucket, as Prometheus' histogram_quantile."""
        if not self.count:
            return 0.0
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le in sorted(self.buckets):
            if self.buckets[le] >= rank:
                if le == INF:
                    return 1000 * lower
                inside = self.buckets[le] - below
                return 1000 * (lower + (le - lower) * ((rank - below) / inside if inside else 0))
            lower, below = le, self.buckets[le]
        return 1000 * lower


def histogram(url: str, name: str) -> Histogram:
    """A histogram at a Prometheus endpoint, summed over its label sets."""
    return histogram_in(scrape(url), name)


def histogram_in(text: str, name: str) -> Histogram:
    """`histogram` on Prometheus text already fetched."""
    buckets: dict[float, float] = {}
    for sample in samples(text, f"{name}_bucket"):
        le = float(sample.labels["le"])
        buckets[le] = buckets.get(le, 0.0) + sample.value
    return Histogram(buckets, metric_in(text, f"{name}_sum"))


PHASES = ("encode", "pd_first_chunk")  # the proxy's ec_nixl_proxy_<phase>_seconds


def proxy_phases(proxy_url: str) -> dict[str, Histogram]:
    text = scrape(proxy_url)
    return {phase: histogram_in(text, f"ec_nixl_proxy_{phase}_seconds") for phase in PHASES}


def phase_means_ms(before: dict[str, Histogram], after: dict[str, Histogram]) -> dict[str, float]:
    """Mean ms per request of each phase between two `proxy_phases` scrapes."""
    spans = {phase: after[phase].since(before[phase]) for phase in PHASES}
    return {phase: round(span.mean_ms(), 1) for phase, span in spans.items() if span.count}


@dataclass
class Level:
    """One way's requests at one concurrency level."""

    connector: str
    concurrency: int
    ttft_ms: list[float] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0
    phases_ms: dict[str, float] = field(default_factory=dict)  # proxy's means, per request

    def percentiles(self) -> dict[str, float]:
        if not self.ttft_ms:
            return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
        p50, p90, p99 = np.percentile(self.ttft_ms, [50, 90, 99])
        return {
            "p50": round(float(p50), 2),
            "p90": round(float(p90), 2),
            "p99": round(float(p99), 2),
        }

    @property
    def requests(self) -> int:
        return len(self.ttft_ms) + self.errors

    def summary(self) -> dict[str, Any]:
        return {
            "connector": self.connector,
            "concurrency": self.concurrency,
            "ttft_ms": self.percentiles(),
            "requests": self.requests,
            "errors": self.errors,
            "phases_ms": self.phases_ms,
        }


def timings_in(log: str, line: str) -> list[tuple[int, float]]:
    """(items, ms) of each `line` (SAVE_LINE, LOAD_LINE) in a server's log."""
    pattern = line.replace("{items}", r"(\d+)").replace("{ms:.3f}", r"([\d.]+)")
    return [(int(items), float(ms)) for items, ms in re.findall(pattern, log)]


def p50_and_mean(values: list[float]) -> tuple[float, float]:
    """0, 0 for no values: nothing of the kind happened."""
    if not values:
        return 0.0, 0.0
    return float(np.median(values)), float(np.mean(values))


def per_item_ms(timings: list[tuple[int, float]]) -> list[float]:
    """A step's time split evenly over its items."""
    return [ms / items for items, ms in timings for _ in range(items)]


@dataclass
class Ready:
    """What "embeddings ready" is made of, over a connector's distinct-image requests: the
    announcement's transit from E to PD where the request was at PD before it (with
    --overlap; ECNixlConnector's announce_transit_seconds), the scheduler's wait for the
    item once announced (its ready_wait_seconds; nil for shared storage, whose file exists
    when the request arrives) and the worker's load into the encoder cache (the same log
    line for both)."""

    transits: Histogram = field(default_factory=Histogram)
    waits: Histogram = field(default_factory=Histogram)
    load_ms: list[float] = field(default_factory=list)  # per item

    def plus(self, other: Ready) -> Ready:
        return Ready(
            self.transits.plus(other.transits),
            self.waits.plus(other.waits),
            self.load_ms + other.load_ms,
        )

    def ms(self) -> dict[str, float]:
        load_p50, load_mean = p50_and_mean(self.load_ms)
        parts = {
            "transit": (self.transits.quantile_ms(0.5), self.transits.mean_ms()),
            "wait": (self.waits.quantile_ms(0.5), self.waits.mean_ms()),
            "load": (load_p50, load_mean),
        }
        figures = {}
        for stat, index in (("p50", 0), ("mean", 1)):
            figures[stat] = round(sum(part[index] for part in parts.values()), 3)
            figures |= {f"{name}_{stat}": round(part[index], 3) for name, part in parts.items()}
        return figures


def p50_ratio(baseline: list[float], ours: list[float]) -> tuple[float, float, float]:
    """baseline p50 / our p50, and a 95% bootstrap interval: above 1 means we are faster."""
    rng = np.random.default_rng(0)
    a, b = np.asarray(baseline), np.asarray(ours)
    ratios = np.median(rng.choice(a, (BOOTSTRAP_SAMPLES, a.size)), axis=1) / np.median(
        rng.choice(b, (BOOTSTRAP_SAMPLES, b.size)), axis=1
    )
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(np.median(a) / np.median(b)), float(low), float(high)
