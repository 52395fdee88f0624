"""GPU path check: an exporter's CUDA arena, pulled by another process into a CUDA arena.

Registers CUDA memory with NIXL on both sides (producer in a child process,
consumer here), pulls items of several sizes, checks every byte, and reports
pull bandwidth beside a device-to-device copy of the same bytes on one GPU.
Then, per size, exports the output of a kernel still running when `export` is
called and pulls it at once: every byte must be the finished result (the
exporter announces an item only once its copy into the arena completed).
Needs only torch, NIXL and the ec_nixl core (no vLLM), so it runs on a bare
GPU machine; `--device cpu` runs the same code on a CPU-only host.

    python -m integration.gpu_pull_check [--device cuda] [--sizes 9M,64M,256M] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ec_nixl.arena import Arena
from ec_nixl.consumer.puller import Puller
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.producer.exporter import ExporterConfig
from integration.bench_transfer import human, size_list
from integration.exporter_process import ExporterProcess, TensorSpec, pull


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def local_copy_ms(size: int, device: str, repeats: int) -> float:
    source = torch.randn(size // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000


def check(device: str, sizes: tuple[int, ...], repeats: int) -> list[dict]:
    capacity = -(-(max(sizes) + (4 << 20)) // 4096) * 4096
    rows = []
    with ExporterProcess(ExporterConfig(capacity_bytes=capacity, device=device)) as producer:
        resolver, puller = Resolver(consumer_id="gpu-check"), Puller(Arena(capacity, device))
        try:
            for n, size in enumerate(sizes):
                spec = TensorSpec(torch.bfloat16, (size // 2,), seed=n)
                expected = spec.make()
                times = []
                for i in range(repeats + 1):
                    producer.export(f"{n}-{i}", spec)
                    start = time.perf_counter()
                    [item] = pull(resolver, puller, producer.address, [f"{n}-{i}"])
                    synchronize(device)
                    times.append(time.perf_counter() - start)
                    assert item.tensor.device.type == device
                    assert torch.equal(item.tensor.cpu(), expected), f"{human(size)}: bytes differ"
                    puller.free(item)
                pull_ms = statistics.median(times[1:]) * 1000
                running = TensorSpec(torch.float32, (size // 4,), seed=100 + n)
                producer.export_running(f"{n}-running", running)
                [item] = pull(resolver, puller, producer.address, [f"{n}-running"])
                synchronize(device)
                assert torch.equal(item.tensor.cpu(), running.made_running()), (
                    f"{human(size)}: pulled before the kernel that made it had finished"
                )
                puller.free(item)
                copy_ms = local_copy_ms(size, device, repeats)
                rows.append(
                    {
                        "size_bytes": size,
                        "pull_ms": round(pull_ms, 3),
                        "pull_gbps": round(size / pull_ms / 1e6, 2),
                        "local_copy_ms": round(copy_ms, 3),
                        "local_copy_gbps": round(size / copy_ms / 1e6, 2),
                    }
                )
                print(
                    f"{human(size)}: pull {pull_ms:.2f} ms, local copy {copy_ms:.3f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            resolver.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--sizes", type=size_list, default=size_list("9M,64M,256M"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu to run the same code on the CPU")
    rows = check(args.device, args.sizes, args.repeats)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"| size | pull ms | pull GB/s | local copy GB/s ({name}) | pull / copy bandwidth |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = r["pull_gbps"] / r["local_copy_gbps"]
        print(
            f"| {human(r['size_bytes'])} | {r['pull_ms']} | {r['pull_gbps']} "
            f"| {r['local_copy_gbps']} | {ratio:.0%} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": name, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
