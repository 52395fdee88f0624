"""What `ec-nixl bench ttft` prints and writes, from a result of the bench's own shape."""

from __future__ import annotations

import json

from integration.ttft_measures import Level
from integration.ttft_report import document, table

OURS, OVERLAP, BASELINE = "ECNixlConnector", "ECNixlConnector --overlap", "ECExampleConnector"


def result() -> dict:
    ways = (OURS, OVERLAP, BASELINE)
    per_item = {"p50": 1.0, "mean": 2.0}
    ready = {**per_item, "transit_p50": 0.0, "wait_p50": 0.0, "load_p50": 1.0}
    ready |= {"transit_mean": 0.0, "wait_mean": 1.0, "load_mean": 1.0}
    return {
        "levels": [
            Level(way, c, [100.0 * (2 if way == BASELINE else 1)] * 8, wall_s=1.0)
            for way in ways
            for c in (1, 2)
        ],
        "repeated": [Level(way, 1, [50.0] * 12) for way in ways],
        "embedding_bytes": 4718592,
        "embeddings_ready_ms": {way: ready for way in ways},
        "encoder_save_ms": {way: per_item for way in ways},
        "critical_path_ms": {
            scope: {way: {"p50": 2.0, "mean": 4.0 * (2 if way == BASELINE else 1)} for way in ways}
            for scope in ("overall", "concurrency 1", "concurrency 2")
        },
        "announce_wait_ms": {"way": OVERLAP, "items": 16, "p50": 90.0, "mean": 95.0},
        "repeated_stream": (3, 4),
        "pulls_repeated": 3,
        "peak_rss_mib": {OURS: {"encoder": 2600, "pd": 3100}, BASELINE: {"encoder": 2200}},
        "stalls": {way: {"count": 2, "max_ms": 120.0, "ms_per_minute": 40.0} for way in ways},
    }


def test_every_ratio_is_shared_storage_over_one_of_ours():
    text = table(result())
    for ours in (OURS, OVERLAP):
        assert f"TTFT p50, {BASELINE} / {ours}" in text
        assert f"- {BASELINE} / {ours}: p50 1.00x, mean 1.00x" in text  # embeddings ready
        assert f"- {BASELINE} / {ours}: p50 1.00x, mean 2.00x" in text  # save + ready
    for scope in ("overall", "concurrency 1", "concurrency 2"):  # the connector's share
        assert f"Save + ready, shared storage over ours ({scope}):" in text
    assert f"{BASELINE} / {BASELINE}" not in text
    assert "- concurrency 2: 2.00x" in text
    assert "3 distinct images x 4: ECNixlConnector pulled 3 items" in text
    assert f"{OVERLAP}: PD had 16 items' requests" in text
    assert f"- {OVERLAP}: 2 stalls, longest 120.0 ms, 40.0 ms lost per minute" in text


def test_the_json_document_has_the_runs_the_issue_specifies():
    runs = json.loads(json.dumps(document(result())))["runs"]
    assert {(run["connector"], run["concurrency"]) for run in runs} == {
        (way, c) for way in (OURS, OVERLAP, BASELINE) for c in (1, 2)
    }
    assert all(run.keys() >= {"ttft_ms", "requests", "errors"} for run in runs)
    assert runs[0]["ttft_ms"] == {"p50": 100.0, "p90": 100.0, "p99": 100.0}
