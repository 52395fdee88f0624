"""Clients that hang up, through the proxy, in front of a real vLLM instance: the proxy
closes their requests to the instance, and the instance drops them instead of generating
answers nobody reads.

The instance is paused (vLLM's /pause?mode=keep) from before the requests arrive until
the hang-ups have reached it, so no answer can be complete when a client leaves. A test
that hangs up while the instance generates races the model: on a loaded 2-core host a
process can wait 2-12 s for the CPU while the instance generates, and the tiny model
answers a request of 8 x 2000 tokens in 3-5 s; in suite runs the clients hung up on
answers the proxy had already sent. The proxy's side is the same either way: it awaits
PD's answer.

The proxy's PD is one ordinary instance, and its encoder a port nobody listens on: every
request goes to PD without params (as when the encoders are down). What matters here is
the proxy's connection to PD.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
import urllib.request

import pytest
from conftest import wait_until

from integration.client import chat_body, metric, post
from integration.servers import Server, free_port, start_proxy, start_vllm, wait_healthy

CLIENTS = 3
# Each asks for 8 answers of 2000 tokens, were it run: the instance would take seconds
# over each, and the answers would count under finished_reason="length".
ANSWERS, TOKENS = 8, 2000
FULL = "vllm:request_success_total"


@pytest.fixture(scope="module")
def proxied(workdirs):
    """(the instance, the proxy in front of it)."""
    model_dir, _, logs = workdirs
    server = start_vllm(
        "hang-ups", workdir=model_dir, cpu=0, log_dir=logs / "hang-ups", dev_mode=True
    )
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


def call(server: Server, path: str, method: str = "POST") -> bytes:
    request = urllib.request.Request(f"{server.url}{path}", method=method)
    with urllib.request.urlopen(request, timeout=120) as reply:
        return reply.read()


def held(server: Server) -> int:
    """Requests the instance's front end holds: in, not answered, their client still there."""
    return json.loads(call(server, "/load", "GET"))["server_load"]


def test_clients_that_hang_up_have_their_requests_dropped(proxied):
    server, proxy = proxied
    full_before = metric(server.url, FULL, finished_reason="length")
    body = chat_body([], max_tokens=TOKENS, ignore_eos=True, n=ANSWERS, temperature=1.0)
    call(server, "/pause?mode=keep")
    connections = []
    try:
        connections += [send(proxy.url, body) for _ in range(CLIENTS)]
        assert wait_until(lambda: held(server) == CLIENTS, 60, every_s=0.1), held(server)
        for connection in connections:
            connection.close()  # the clients hang up
        assert wait_until(lambda: held(server) == 0, 60, every_s=0.1), (
            f"the proxy kept {held(server)} of {CLIENTS} requests open at PD"
        )
    finally:
        for connection in connections:
            connection.close()
        call(server, "/resume")
    # The instance runs requests first come, first served: had it kept those (8 answers
    # each, as many as it runs at once), answers of theirs would end before this one's.
    post(server.url, chat_body([], ignore_eos=True))
    full = metric(server.url, FULL, finished_reason="length") - full_before
    assert full == 1, f"{full - 1:.0f} answers nobody reads ran to their end"
