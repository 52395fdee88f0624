"""Clients that hang up, through the proxy, in front of a real vLLM instance: vLLM aborts
their requests instead of generating answers nobody reads. (vLLM counts an aborted request
under no finished_reason, and logs it only with --enable-log-requests: the test checks
that no answer ran to its max_tokens.)

The proxy's PD is one ordinary instance, and its encoder a port nobody listens on: every
request goes to PD without params (as when the encoders are down). What matters here is
the proxy's connection to PD.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse

import pytest
from conftest import wait_until

from integration.client import chat_body, metric, metric_in, post, scrape
from integration.servers import free_port, start_proxy, start_vllm, wait_healthy

CLIENTS = 3
# Each request asks for 8 answers of 2000 tokens: on one core the instance takes ~15 s
# over the three, and the clients hang up once it has begun.
ANSWERS, TOKENS = 8, 2000
# What the proxy counts as it sends a request on to PD (its encoder never answers).
SENT_ON = "ec_nixl_proxy_local_encodes_total"


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
        post(servers[1].url, chat_body([]))  # first-use costs, out of the way
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
    sent_before = metric(proxy.url, SENT_ON)

    def under_way() -> bool:  # every request sent on to the instance, and it generating
        # them: a token for each of their answers (the warm-up's tokens may be counted late)
        sent_on = metric(proxy.url, SENT_ON) - sent_before
        return sent_on == CLIENTS and counts(server)[1] >= tokens_before + CLIENTS * ANSWERS

    body = chat_body([], max_tokens=TOKENS, ignore_eos=True, n=ANSWERS, temperature=1.0)
    connections = [send(proxy.url, body) for _ in range(CLIENTS)]
    try:
        assert wait_until(under_way, 60, every_s=0.1)
    finally:
        for connection in connections:
            connection.close()  # the clients hang up
    assert wait_until(lambda: metric(server.url, "vllm:num_requests_running") == 0, 300, 0.5)
    full, _ = counts(server)
    assert full == full_before, f"{full - full_before:.0f} answers nobody reads were generated"
