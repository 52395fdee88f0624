"""`ec-nixl` as a user runs it: help that explains, a benchmark with a table and JSON, and
where a command takes the control-plane token from."""

import json
import logging
import os
import subprocess
import sys

import pytest

from ec_nixl.cli import build_parser
from ec_nixl.control.security import TOKEN_ENV, client_security

METHODS = {"nixl_announced", "nixl", "shared_storage", "memcpy"}


TOKEN = "cl1-t0ken"
AWAY = "10.0.0.5:7100"  # an encoder on another host


def ec_nixl(
    *args: str, timeout: float = 300, token: str | None = None
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if token is not None:
        env[TOKEN_ENV] = token
    return subprocess.run(
        [sys.executable, "-m", "ec_nixl.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
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


def test_help_explains_the_fan_out_benchmark():
    result = ec_nixl("bench", "fanout", "--help")
    assert result.returncode == 0
    assert all(word in result.stdout for word in ("--consumers", "--stall", "claims", "fan-out"))


def test_help_explains_the_proxy():
    result = ec_nixl("proxy", "--help")
    assert result.returncode == 0
    flags = ("--encoder", "[NAME=]URL", "--overlap", "--encoder-events", "EC_NIXL_TOKEN")
    flags += ("--max-media-items", "--encoder-concurrency", "--token-file", "--require-tls")
    flags += ("--max-body-bytes", "--max-body-bytes-in-flight")
    assert all(flag in result.stdout for flag in flags)


def test_a_cap_that_is_not_positive_is_a_clear_usage_error():
    result = ec_nixl("proxy", "--encoder", "http://e", "--pd", "http://p", "--max-media-items", "0")
    assert result.returncode == 2 and "--max-media-items: expected a positive" in result.stderr


def test_a_bound_on_bodies_in_flight_below_the_body_bound_is_a_clear_error():
    result = ec_nixl(
        "proxy", "--encoder", "http://e", "--pd", "http://p", "--max-body-bytes", "2000",
        "--max-body-bytes-in-flight", "1000", timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "--max-body-bytes-in-flight (1000) is below" in result.stderr


def test_help_explains_the_event_stream():
    result = ec_nixl("events", "--help")
    assert result.returncode == 0
    assert all(word in result.stdout for word in ("exported", "evicted", "encoding", "epoch"))


def test_a_bad_size_is_a_clear_usage_error():
    result = ec_nixl("bench", "transfer", "--sizes", "lots")
    assert result.returncode == 2 and "--sizes" in result.stderr


def test_help_says_where_the_token_comes_from():
    result = ec_nixl("events", "--help")
    assert result.returncode == 0
    said = " ".join(result.stdout.split())
    assert "--token, else --token-file, else $EC_NIXL_TOKEN" in said and "--require-tls" in said


@pytest.mark.parametrize("command", [["events", "--encoder", AWAY], ["proxy", "--encoder",
    "http://e", "--pd", "http://p", "--encoder-events", f"enc0={AWAY}"]])  # fmt: skip
def test_require_tls_refuses_to_send_the_token_to_another_host_in_plaintext(command):
    result = ec_nixl(*command, "--require-tls", timeout=60, token=TOKEN)
    assert result.returncode == 2 and f"require_tls is set, and the control plane on {AWAY}" in (
        result.stderr
    )
    assert TOKEN not in result.stderr + result.stdout


def test_a_token_file_open_to_others_is_refused(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    result = ec_nixl("events", "--encoder", "127.0.0.1:1", "--token-file", str(path), timeout=60)
    assert result.returncode == 2 and "chmod 600" in result.stderr
    assert TOKEN not in result.stderr + result.stdout


def test_a_token_bound_for_another_host_in_plaintext_draws_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    args = build_parser().parse_args(["events", "--encoder", AWAY])
    with caplog.at_level(logging.WARNING, logger="ec_nixl"):
        security = client_security(args, [args.encoder])
    assert security.token == TOKEN
    [warning] = caplog.records
    assert f"plaintext on {AWAY}" in warning.getMessage()
    assert TOKEN not in warning.getMessage()


def test_a_token_on_the_command_line_draws_a_warning_naming_the_safer_sources(caplog):
    args = build_parser().parse_args(["events", "--encoder", "127.0.0.1:7100", "--token", TOKEN])
    with caplog.at_level(logging.WARNING, logger="ec_nixl"):
        assert client_security(args, [args.encoder]).token == TOKEN
    [warning] = caplog.records
    assert "process list" in warning.getMessage() and "--token-file" in warning.getMessage()
    assert TOKEN not in warning.getMessage()
