"""`ec-nixl` as a user runs it: help that explains, a benchmark with a table and JSON."""

import json
import subprocess
import sys

METHODS = {"nixl_announced", "nixl", "shared_storage", "memcpy"}


def ec_nixl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ec_nixl.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_explains_the_transfer_benchmark():
    result = ec_nixl("bench", "transfer", "--help")
    assert result.returncode == 0
    assert "shared_storage" in result.stdout and "--json" in result.stdout


def test_transfer_benchmark_prints_ratios_and_writes_the_json_schema(tmp_path):
    out = tmp_path / "bench.json"
    result = ec_nixl("bench", "transfer", "--sizes", "64K,1M", "--repeats", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "[2/2] 1 MiB" in result.stderr  # progress
    assert "| 1 MiB |" in result.stdout and "shared_storage / nixl" in result.stdout
    results = json.loads(out.read_text())["results"]
    assert {(r["size_bytes"], r["method"]) for r in results} == {
        (size, method) for size in (64 << 10, 1 << 20) for method in METHODS
    }
    for r in results:
        assert set(r) == {"size_bytes", "method", "median_ms"} and r["median_ms"] > 0


def test_help_explains_the_ttft_benchmark():
    result = ec_nixl("bench", "ttft", "--help")
    assert result.returncode == 0
    assert "ECExampleConnector" in result.stdout and "--concurrency" in result.stdout
    assert "ECCPUConnector" in result.stdout


def test_help_explains_the_serving_benchmark():
    result = ec_nixl("bench", "serve", "--help")
    assert result.returncode == 0
    assert all(word in result.stdout for word in ("random-mm", "ECExampleConnector", "--images"))


def test_help_explains_the_proxy():
    result = ec_nixl("proxy", "--help")
    assert result.returncode == 0
    flags = ("--encoder", "[NAME=]URL", "--overlap", "--encoder-events", "EC_NIXL_TOKEN")
    flags += ("--max-media-items", "--encoder-concurrency")
    assert all(flag in result.stdout for flag in flags)


def test_a_cap_that_is_not_positive_is_a_clear_usage_error():
    result = ec_nixl("proxy", "--encoder", "http://e", "--pd", "http://p", "--max-media-items", "0")
    assert result.returncode == 2 and "--max-media-items: expected a positive" in result.stderr


def test_help_explains_the_event_stream():
    result = ec_nixl("events", "--help")
    assert result.returncode == 0
    assert all(word in result.stdout for word in ("exported", "evicted", "encoding", "epoch"))


def test_a_bad_size_is_a_clear_usage_error():
    result = ec_nixl("bench", "transfer", "--sizes", "lots")
    assert result.returncode == 2 and "--sizes" in result.stderr
