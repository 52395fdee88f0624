"""Servers started by the harness (integration.servers) die with the process that started
them: on SIGTERM that process stops them as on Ctrl-C, and when it is killed outright
(SIGKILL) their watchdogs kill their process groups.

A command here is a small script that starts one server through integration.servers and
waits, as the demo and the benchmarks do. The stand-in server is a process that starts a
child of its own, as vLLM's API server starts its engine core; one test runs a real vLLM
instance.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import wait_until

from integration import servers

ROOT = Path(__file__).resolve().parent.parent
STAND_IN = textwrap.dedent("""
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    time.sleep(600)
""")
COMMAND = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from integration import servers

    log_dir, kind = Path(sys.argv[1]), sys.argv[2]
    if kind == "vllm":
        server = servers.start_vllm("vllm", workdir=Path(sys.argv[3]), cpu=0, log_dir=log_dir)
    else:
        argv = [sys.executable, "-c", sys.argv[3]]
        server = servers._spawn(kind, argv, cwd=log_dir, env={}, log_dir=log_dir, port=0)
    try:
        servers.wait_healthy([server] if kind == "vllm" else [])
        print(server.process.pid, flush=True)
        time.sleep(600)
    finally:
        server.stop()
        print("stopped", flush=True)
""")


def processes() -> dict[int, tuple[str, int, int]]:
    """Every process: its (state, parent, process group)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def running(pids) -> list[int]:
    """Those of `pids` that still run (a zombie holds nothing)."""
    table = processes()
    return [pid for pid in pids if pid in table and table[pid][0] != "Z"]


def group(pgid: int) -> list[int]:
    """The processes of a process group that still run."""
    return [pid for pid, (state, _, g) in processes().items() if g == pgid and state != "Z"]


class Command:
    """The command, started and past its first line (its server up): `pgid` is the
    server's process group; `helpers`, its other children (the server's watchdog)."""

    def __init__(self, log_dir: Path, kind: str, arg: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", COMMAND, str(log_dir), kind, arg],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pgid = 0
        self.helpers: list[int] = []
        line = self.process.stdout.readline()  # none from a command that failed
        assert line, f"the command failed:\n{self.process.stderr.read()}"
        self.pgid = int(line)
        self.helpers = [
            pid
            for pid, (_, parent, _) in processes().items()
            if parent == self.process.pid and pid != self.pgid
        ]

    def gone(self) -> bool:
        """Whether nothing the command started runs any more."""
        return not group(self.pgid) and not running(self.helpers)

    def clean_up(self) -> None:
        """Whatever the test left running."""
        for pid in running([self.process.pid, *self.helpers]):
            os.kill(pid, signal.SIGKILL)
        if self.pgid and group(self.pgid):
            os.killpg(self.pgid, signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def stand_in(tmp_path):
    command = Command(tmp_path, "stand-in", STAND_IN)
    yield command
    command.clean_up()


def test_a_command_ended_by_sigterm_stops_its_server_as_on_ctrl_c(stand_in):
    assert wait_until(lambda: len(group(stand_in.pgid)) == 2)  # the server and its child
    stand_in.process.send_signal(signal.SIGTERM)
    stand_in.process.wait(60)
    assert "stopped" in stand_in.process.stdout.read()  # its finally block ran
    assert wait_until(stand_in.gone, 30, every_s=0.1)


def test_a_command_killed_outright_takes_its_server_and_the_servers_children_along(stand_in):
    assert wait_until(lambda: len(group(stand_in.pgid)) == 2)
    stand_in.process.kill()
    stand_in.process.wait(10)
    assert wait_until(stand_in.gone, 30, every_s=0.1)


def test_a_server_stopped_by_its_command_ends_its_watchdog(tmp_path):
    argv = [sys.executable, "-c", STAND_IN]
    server = servers._spawn("stand-in", argv, cwd=tmp_path, env={}, log_dir=tmp_path, port=0)
    try:
        assert running([server.watchdog.pid])
    finally:
        server.stop()
    assert not running([server.watchdog.pid]) and not group(server.process.pid)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_vllm_instance_dies_with_its_command(workdirs, tmp_path, signum):
    command = Command(tmp_path, "vllm", str(workdirs[0]))
    try:
        assert len(group(command.pgid)) >= 2  # the API server and its engine core, at least
        command.process.send_signal(signum)
        command.process.wait(60)
        assert wait_until(command.gone, 60, every_s=0.2)
    finally:
        command.clean_up()
