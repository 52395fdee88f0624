"""Clients that hang up, through the proxy, in front of a real vLLM instance: vLLM aborts
their requests instead of generating answers nobody reads (an aborted request is counted
in no finished_reason of vLLM's, and logged only with --enable-log-requests: no answer
runs to its max_tokens).

The proxy's PD is one ordinary instance, and its encoder a port nobody listens on: every
request goes to PD without params (as when the encoders are down). What matters here is
the proxy's connection to PD.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse

import pytest
from conftest import wait_until

from integration.client import chat_body, metric, metric_in, scrape
from integration.servers import free_port, start_proxy, start_vllm, wait_healthy

CLIENTS = 3
# Each request asks for 8 answers of 2000 tokens: on one core the instance takes ~15 s
# over the three, and its API server answers /metrics only when they are done.
ANSWERS, TOKENS = 8, 2000
# After the proxy has sent a request on, this long for it to reach the instance: the
# requests are then under way there when their clients hang up.
UNDER_WAY_S = 1.0


@pytest.fixture(scope="module")
def proxied(workdirs):
    """(the instance, the proxy in front of it)."""
    model_dir, _, logs = workdirs
    server = start_vllm("hang-ups", workdir=model_dir, cpu=0, log_dir=logs / "hang-ups")
    servers = [server]
    try:
        wait_healthy(servers)
        nobody = f"http://127.0.0.1:{free_port()}"
        servers.append(start_proxy(encoders=[nobody], pd=server.url, log_dir=logs / "hang-ups"))
        wait_healthy(servers[1:])
        yield servers
    finally:
        for one in reversed(servers):
            one.stop()


def send(url: str, body: dict) -> http.client.HTTPConnection:
    """A request sent, its answer not read: the connection, for the caller to close."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    connection.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    return connection


def counts(server) -> tuple[float, float]:
    """(answers that ran to their max_tokens, each of a request's n; tokens generated)."""
    text = scrape(server.url)
    return (
        metric_in(text, "vllm:request_success_total", finished_reason="length"),
        metric_in(text, "vllm:generation_tokens_total"),
    )


def test_clients_that_hang_up_have_their_requests_aborted(proxied):
    server, proxy = proxied
    full_before, tokens_before = counts(server)
    sent_on = metric(proxy.url, "ec_nixl_proxy_local_encodes_total")
    body = chat_body([], max_tokens=TOKENS, ignore_eos=True, n=ANSWERS, temperature=1.0)
    connections = [send(proxy.url, body) for _ in range(CLIENTS)]
    try:
        assert wait_until(
            lambda: metric(proxy.url, "ec_nixl_proxy_local_encodes_total") == sent_on + CLIENTS,
            60,
            every_s=0.05,
        )
        time.sleep(UNDER_WAY_S)
    finally:
        for connection in connections:
            connection.close()  # the clients hang up
    assert wait_until(lambda: metric(server.url, "vllm:num_requests_running") == 0, 300, 0.5)
    full, tokens = counts(server)
    assert tokens > tokens_before  # the requests were under way when their clients left
    assert full == full_before, f"{full - full_before:.0f} answers nobody reads were generated"
