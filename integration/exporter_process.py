"""An Exporter in a child process, driven over a pipe, and a pull in one process.

Benchmarks and tests need a real process boundary between producer and
consumer (NIXL between processes, signals, crashes). The child makes its
tensors from a `TensorSpec` (seeded, so both sides know the expected bytes
without shipping them) and answers one command at a time.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from ec_nixl.config import DEFAULT_PULL_TIMEOUT_S
from ec_nixl.consumer.puller import PulledItem, Puller
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.producer.exporter import Exporter, ExporterConfig

READY_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    seed: int = 0

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize

    def make(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.shape, generator=generator, dtype=torch.float32).to(self.dtype)

    def made_running(self) -> torch.Tensor:
        """What `make_running` makes, once its kernels are done."""
        return self.make() + 1

    def make_running(self, device: torch.device) -> torch.Tensor:
        """`made_running()` on `device`, returned while a GPU may still be computing it
        (a spin kernel first, then the add), as an encoder's output reaches `save_caches`."""
        tensor = self.make().to(device)
        if tensor.is_cuda:
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles before the add may run
        return tensor.add_(1)


def _serve(conn, config: ExporterConfig) -> None:
    exporter = Exporter(config)
    conn.send(("ready", exporter.address))
    made: dict[TensorSpec, torch.Tensor] = {}  # so that a timed command never pays for randn

    def tensor(spec: TensorSpec) -> torch.Tensor:
        if spec not in made:
            made[spec] = spec.make()
        return made[spec]

    while True:
        command, *args = conn.recv()
        try:
            if command == "stop":
                exporter.close()
                conn.send(("ok", None))
                return
            if command == "export":
                mm_hash, spec, target = args
                source = tensor(spec)
                started = time.perf_counter()
                exporter.export(mm_hash, source, target)
                reply = time.perf_counter() - started
            elif command == "encoding":
                exporter.encoding(args[0])
                reply = None
            elif command == "export_running":
                mm_hash, spec = args
                exporter.export(mm_hash, spec.make_running(exporter.arena.device))
                reply = None
            elif command == "save":
                from safetensors.torch import save_file

                path, spec = args
                path.parent.mkdir(parents=True, exist_ok=True)  # one folder per mm_hash
                save_file({"ec_cache": tensor(spec)}, str(path))
                reply = None
            elif command == "stats":
                reply = {
                    "items": len(exporter.pool),
                    "bytes_used": exporter.arena.bytes_used,
                    "live_leases": exporter.pool.live_leases,
                    "watchers": len(exporter.events),
                }
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send(("ok", reply))
        except Exception as exc:  # report to the parent, keep serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ExporterProcess:
    """`with ExporterProcess(config) as producer:`; `producer.address` is its gRPC address."""

    def __init__(self, config: ExporterConfig = ExporterConfig()) -> None:
        self.config = config

    def __enter__(self) -> ExporterProcess:
        context = mp.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_conn, self.config), daemon=True)
        self.process.start()
        if not self._conn.poll(READY_TIMEOUT_S):
            self.kill()
            raise TimeoutError("exporter process did not start in time")
        _, self.address = self._conn.recv()
        return self

    def __exit__(self, *exc) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError, EOFError, RuntimeError):
                self._command("stop")
        self.kill()

    @property
    def pid(self) -> int:
        return self.process.pid

    def export(self, mm_hash: str, spec: TensorSpec, target: str = "") -> float:
        """Export (for consumer `target`, if given: it gets a claim with the announcement);
        the seconds `Exporter.export` took in the child."""
        return self._command("export", mm_hash, spec, target)

    def encoding(self, mm_hashes: list[str]) -> None:
        """Announce that these items are about to be encoded, as an encoder's step does."""
        self._command("encoding", mm_hashes)

    def export_running(self, mm_hash: str, spec: TensorSpec) -> None:
        """Export a tensor its device is still computing (see `TensorSpec.make_running`)."""
        self._command("export_running", mm_hash, spec)

    def save_safetensors(self, path: Path, spec: TensorSpec) -> None:
        self._command("save", path, spec)

    def stats(self) -> dict[str, int]:
        return self._command("stats")

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def kill(self) -> None:
        if self.process.is_alive():
            self.signal(signal.SIGKILL)
        self.process.join(5)

    def _command(self, *message):
        self._conn.send(message)
        if not self._conn.poll(COMMAND_TIMEOUT_S):
            raise RuntimeError(f"exporter process did not answer {message[0]!r} in time")
        status, reply = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"exporter process failed {message[0]!r}: {reply}")
        return reply


def pull(
    resolver: Resolver,
    puller: Puller,
    address: str,
    mm_hashes: list[str],
    timeout_s: float = DEFAULT_PULL_TIMEOUT_S,
) -> list[PulledItem]:
    """Resolve and read in one process (no PD scheduler between); a failed read gives
    its leases back."""
    deadline = time.monotonic() + timeout_s
    resolution = resolver.resolve(address, mm_hashes, deadline)
    try:
        return puller.read(resolution, deadline)
    except BaseException as exc:
        resolver.abandon(address, resolution.lease_ids, exc)
        raise
