"""`ec-nixl bench transfer`: one encoder output from a producer process to a consumer.

Four ways, same bytes, same run, medians over repeats:
- nixl_announced: the consumer already holds the exporter's announcement with
  its claim (a leased descriptor, as a prefetching PD gets it); the timer runs
  from its decision to pull: check the claim, one NIXL READ into its registered
  arena, whose notification ends the lease;
- nixl: the consumer resolves the item over gRPC (a cold pull: nothing was
  announced to it), then READs it the same way;
- shared_storage: what vLLM's ECExampleConnector does; the producer saves a
  safetensors file under a temporary directory, the consumer loads it and
  materializes it in its own memory (safetensors maps the file lazily);
- memcpy: a local torch copy of the same bytes, the physical reference.
The timer stops when the consumer holds the bytes in its own memory; every
repetition is then checked against the expected tensor, outside the timer.
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ec_nixl.arena import Arena
from ec_nixl.config import DEFAULT_PULL_TIMEOUT_S
from ec_nixl.consumer.puller import Puller
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.control.messages import Announcement
from ec_nixl.errors import ECNixlError
from ec_nixl.producer.exporter import ExporterConfig
from integration.exporter_process import ExporterProcess, TensorSpec, pull

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_SIZES = (64 * KiB, 1 * MiB, 9 * MiB, 64 * MiB)
METHODS = ("nixl_announced", "nixl", "shared_storage", "memcpy")
ANNOUNCEMENT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Result:
    size_bytes: int
    method: str
    median_ms: float


def parse_size(text: str) -> int:
    units = {"K": KiB, "M": MiB, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def size_list(text: str) -> tuple[int, ...]:
    return tuple(parse_size(s) for s in text.split(","))


def human(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def _median_ms(
    run: Callable[[int], tuple[float, torch.Tensor]], expected: torch.Tensor, repeats: int
) -> float:
    """Median of `repeats` runs after one warm-up; `run(i)` returns (seconds, consumer's bytes)."""
    times = []
    for i in range(repeats + 1):
        elapsed, got = run(i)
        if not torch.equal(got.view(torch.uint8), expected.view(torch.uint8)):
            raise AssertionError(f"repetition {i}: bytes differ from what was exported")
        if i:
            times.append(elapsed)
    return statistics.median(times) * 1000


def _timed(work: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    got = work()
    return time.perf_counter() - start, got


class Claims:
    """The announcements of one exporter, with claims, as a prefetching PD follows them."""

    def __init__(self, resolver: Resolver, address: str) -> None:
        self._announced: queue.Queue[Announcement] = queue.Queue()
        self._stream = resolver.client(address).watch(resolver.consumer_id, claim=True)
        self._stream.wait_open()  # exports from now on come with claims
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        try:
            for announcement in self._stream:
                if announcement.claim is not None:
                    self._announced.put(announcement)
        except ECNixlError:
            pass  # the exporter stopped

    def next(self, mm_hash: str) -> Announcement:
        announcement = self._announced.get(timeout=ANNOUNCEMENT_TIMEOUT_S)
        if announcement.mm_hash != mm_hash:
            raise AssertionError(f"announced {announcement.mm_hash}, expected {mm_hash}")
        return announcement


def measure(sizes: tuple[int, ...], repeats: int, workdir: Path) -> list[Result]:
    # Room for two of the largest: an item's lease ends when the exporter takes the READ's
    # notification, which may come just after the next export.
    capacity = 2 * max(sizes) + 4 * MiB
    config = ExporterConfig(capacity_bytes=capacity)
    results = []
    # The announcing exporter is a process of its own: its claims never pin the others' bytes.
    with ExporterProcess(config) as producer, ExporterProcess(config) as announcer:
        resolver, puller = Resolver(consumer_id="bench"), Puller(Arena(capacity))
        claims = Claims(resolver, announcer.address)
        try:
            for n, size in enumerate(sizes, 1):
                spec = TensorSpec(torch.bfloat16, (size // 2,), seed=n)
                expected = spec.make()
                destination = torch.zeros_like(expected)

                def nixl_announced(i: int, spec=spec) -> tuple[float, torch.Tensor]:
                    mm_hash = f"{spec.seed}-{i}"
                    announcer.export(mm_hash, spec)  # the encoder's side, not timed
                    announcement = claims.next(mm_hash)  # held before the decision to pull

                    def read() -> list:
                        deadline = time.monotonic() + DEFAULT_PULL_TIMEOUT_S
                        claim = resolver.checked(
                            announcer.address, [announcement.claim], announcement.received_at,
                            deadline,
                        )  # fmt: skip
                        return puller.read(claim, deadline)

                    elapsed, [item] = _timed(read)
                    got = item.tensor.clone()  # for the check, outside the timer
                    puller.free(item)
                    return elapsed, got

                def nixl(i: int, spec=spec) -> tuple[float, torch.Tensor]:
                    mm_hash = f"{spec.seed}-{i}"
                    producer.export(mm_hash, spec)  # the encoder's side, not timed
                    elapsed, [item] = _timed(
                        lambda: pull(resolver, puller, producer.address, [mm_hash])
                    )
                    got = item.tensor.clone()  # for the check, outside the timer
                    puller.free(item)
                    return elapsed, got

                def shared_storage(i: int, spec=spec) -> tuple[float, torch.Tensor]:
                    path = workdir / f"{spec.seed}-{i}" / "encoder_cache.safetensors"

                    def save_and_load() -> torch.Tensor:
                        producer.save_safetensors(path, spec)
                        return load_file(path)["ec_cache"].clone()

                    elapsed_and_got = _timed(save_and_load)
                    shutil.rmtree(path.parent)
                    return elapsed_and_got

                def memcpy(i: int, expected=expected, destination=destination):
                    return _timed(lambda: destination.copy_(expected))

                runs = {
                    "nixl_announced": nixl_announced,
                    "nixl": nixl,
                    "shared_storage": shared_storage,
                    "memcpy": memcpy,
                }
                medians = {m: _median_ms(runs[m], expected, repeats) for m in METHODS}
                results += [Result(size, m, medians[m]) for m in METHODS]
                print(
                    f"[{n}/{len(sizes)}] {human(size)}: "
                    + ", ".join(f"{m} {medians[m]:.2f} ms" for m in METHODS),
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            resolver.close()
    return results


def table(results: list[Result]) -> str:
    by = {(r.size_bytes, r.method): r.median_ms for r in results}
    sizes = sorted({r.size_bytes for r in results})
    lines = [
        "| size | nixl_announced ms | nixl ms | shared_storage ms | memcpy ms "
        "| shared_storage / nixl_announced | shared_storage / nixl "
        "| nixl_announced GB/s | nixl_announced bandwidth vs memcpy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        announced, cold, storage, copy = (by[size, m] for m in METHODS)
        lines.append(
            f"| {human(size)} | {announced:.2f} | {cold:.2f} | {storage:.2f} | {copy:.2f} "
            f"| {storage / announced:.1f}x | {storage / cold:.1f}x "
            f"| {size / announced / 1e6:.2f} | {copy / announced:.0%} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        type=size_list,
        default=DEFAULT_SIZES,
        help="comma-separated item sizes, e.g. 64K,1M,9M,64M (default: %(default)s bytes)",
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per size and method")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")


def run(args: argparse.Namespace) -> int:
    print(
        f"moving {', '.join(human(s) for s in args.sizes)} between two processes, "
        f"{args.repeats} repeats each ...",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="ec-nixl-bench-") as workdir:
        results = measure(args.sizes, args.repeats, Path(workdir))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results]}, indent=2))
    return 0
