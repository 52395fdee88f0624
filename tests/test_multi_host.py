"""The multi-node role scripts on three hosts: network namespaces joined by a bridge.

E, PD and the proxy each run in a namespace of their own (10.77.0.0/24 on veth
pairs, the bridge in a fourth namespace), so gRPC and NIXL cross a real network
hop. UCX is forced onto TCP: namespaces alone do not stop its same-host cma
path. Nothing is sent to an address outside these namespaces; health checks
and the request run inside the proxy's namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ACROSS_HOSTS, PREFETCHED

from integration.client import chat_body, metric_in

ROOT = Path(__file__).resolve().parent.parent
ROLES = ROOT / "examples" / "multi_node"
TAG = f"ec{os.getpid() % 100000}"
HOSTS = {"e": "10.77.0.1", "pd": "10.77.0.2", "px": "10.77.0.3"}
VLLM_ARGS = "--max-model-len 2048 --kv-cache-memory-bytes 64M --enforce-eager --max-num-seqs 4"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def ns(host: str) -> str:
    return f"{TAG}{host}"


def in_ns(host: str, *command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns(host), *command], **kwargs)


@pytest.fixture(scope="module")
def hosts():
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("network namespaces need root and iproute2's ip command")
    switch = f"{TAG}sw"
    try:
        ip("netns", "add", switch)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.decode().strip()}")
    made = [switch]
    try:
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for host, address in HOSTS.items():
            ip("netns", "add", ns(host))
            made.append(ns(host))
            inside, outside = f"{TAG}{host}i", f"{TAG}{host}o"
            ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            ip("link", "set", inside, "netns", ns(host))
            ip("link", "set", outside, "netns", switch)
            ip("-n", switch, "link", "set", outside, "master", "br0", "up")
            ip("-n", ns(host), "addr", "add", f"{address}/24", "dev", inside)
            ip("-n", ns(host), "link", "set", inside, "up")
            ip("-n", ns(host), "link", "set", "lo", "up")
        yield {host: f"{TAG}{host}i" for host in HOSTS}
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def start_role(host: str, script: str, env: dict[str, str], cwd: Path, log: Path):
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns(host), str(ROLES / script)],
            env={**os.environ, **env, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"},
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def post_from_proxy_host(url: str, body: dict, timeout_s: float) -> tuple[int, str]:
    """GET /health (no body) or POST a chat request, from inside the proxy's namespace."""
    payload = json.dumps(body) if body else ""
    done = in_ns(
        "px", sys.executable, "-m", "integration.client", url, payload, str(timeout_s),
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    status, _, text = done.stdout.partition("\n")
    return int(status or 0), text


def wait_healthy(urls: list[str], processes, timeout_s: float = 300) -> None:
    end = time.monotonic() + timeout_s
    for url in urls:
        while post_from_proxy_host(f"{url}/health", {}, 2)[0] != 200:
            assert all(p.poll() is None for p in processes), "a role exited early; see its log"
            assert time.monotonic() < end, f"{url} not healthy in time"
            time.sleep(1)


def pd_counter(pd: str, name: str) -> float:
    status, text = post_from_proxy_host(f"http://{pd}:8200/metrics", {}, 10)
    assert status == 200, text
    return metric_in(text, name)


def test_a_request_crosses_three_hosts_and_matches_the_single_instance(hosts, workdirs, reference):
    encoder_dir, pd_dir, logs = workdirs
    logs = logs / "multi_host"
    e, pd, px = HOSTS["e"], HOSTS["pd"], HOSTS["px"]
    common = {"MODEL": "tiny-llava", "UCX_TLS": "tcp", "EXTRA_ARGS": VLLM_ARGS}
    roles = [
        start_role("e", "encoder.sh", {
            **common, "ENCODER_ID": "enc0", "CONTROL_ADDRESS": f"{e}:7100", "CPU_BIND": "0",
            "UCX_NET_DEVICES": hosts["e"], "VLLM_HOST_IP": e,
        }, encoder_dir, logs / "e.log"),
        start_role("pd", "pd.sh", {
            **common, "ENCODERS": f"enc0={e}:7100", "CPU_BIND": "1", "PREFETCH": "true",
            "UCX_NET_DEVICES": hosts["pd"], "VLLM_HOST_IP": pd,
        }, pd_dir, logs / "pd.log"),
    ]  # fmt: skip
    try:
        wait_healthy([f"http://{e}:8100", f"http://{pd}:8200"], roles)
        roles.append(
            start_role(
                "px",
                "proxy.sh",
                {
                    "ENCODER_URLS": f"http://{e}:8100",
                    "PD_URL": f"http://{pd}:8200",
                    "OVERLAP": "1",  # PD waits for E's announcement across the hop
                    "ENCODERS": f"enc0={e}:7100",  # follows E's events across it too
                },
                ROOT,
                logs / "proxy.log",
            )  # fmt: skip
        )
        wait_healthy([f"http://{px}:8000"], roles)
        status, text = post_from_proxy_host(
            f"http://{px}:8000/v1/chat/completions", chat_body(ACROSS_HOSTS), 120
        )
        assert status == 200, text
        assert json.loads(text)["choices"][0]["message"]["content"] == reference[ACROSS_HOSTS]
        assert "pulled" in (logs / "pd.log").read_text()

        # Prefetch: PD pulls what E exports before any request reaches PD.
        hits = pd_counter(pd, "ec_nixl:prefetch_hits_total")
        status, text = post_from_proxy_host(
            f"http://{e}:8100/v1/chat/completions", chat_body(PREFETCHED, max_tokens=1), 120
        )
        assert status == 200, text
        params = json.loads(text)["ec_transfer_params"]
        end = time.monotonic() + 30
        while f"pulled {next(iter(params))} " not in (logs / "pd.log").read_text():
            assert time.monotonic() < end, "PD did not prefetch"
            time.sleep(0.2)
        status, text = post_from_proxy_host(
            f"http://{pd}:8200/v1/chat/completions",
            chat_body(PREFETCHED, ec_transfer_params=params), 120,
        )  # fmt: skip
        assert status == 200, text
        assert json.loads(text)["choices"][0]["message"]["content"] == reference[PREFETCHED]
        assert pd_counter(pd, "ec_nixl:prefetch_hits_total") == hits + 1
    finally:
        for process in roles:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in roles:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
