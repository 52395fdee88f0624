"""`ec-nixl bench fanout`: one encoder's announcements and pulls, to many PDs at once.

One exporter process and N consumer processes, each with its own NIXL agent,
watching with claims (one reader each) and pulling every item announced to it
under its claim, the bytes checked on every tenth. The exporter exports
--items items of --size, --rate a second. Per N: watchers accepted (the rest
were refused), fan-out from an event's publication to its receipt (the two
processes' wall clocks: one host) p50/p99/max, export() inside the exporter
p50/p99, pulls a second, the exporter's CPU per export and per pull, its
threads and RSS at the end, how busy the host's CPUs were (all processes: near
100%, every latency is queueing), and errors. With --stall, consumer 0 stops reading
its stream after its fifth event, for the rest of the run: the run reports
exports that failed and how long after it stopped the encoder cut it off.
With --pull resolve, the consumers watch without claims and pull each item with
a Resolve (as PD does when an announcement carries no claim, or none came): with
--rate, what E spends per resolved pull. With --pull none, they pull nothing (a
router, or the proxy's directory): the fan-out alone.
Takes about a minute per N; not part of CI.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ec_nixl.arena import Arena
from ec_nixl.config import DEFAULT_PULL_TIMEOUT_S
from ec_nixl.consumer.puller import Puller
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.control.messages import EventKind
from ec_nixl.errors import ECNixlError
from ec_nixl.producer.exporter import ExporterConfig
from integration.bench_transfer import human, parse_size
from integration.exporter_process import ExporterProcess, TensorSpec

STALL_AFTER = 5  # events a stalled consumer reads before it stops
SEEDS = 10  # distinct contents, made before the run: making one is not the connector's cost
START_TIMEOUT_S = 180.0  # N consumer processes importing torch and NIXL on a small host
CHECK_EVERY = 10


def spec(index: int, size: int) -> TensorSpec:
    return TensorSpec(torch.bfloat16, (size // 2048, 1024), seed=index % SEEDS)


def _consume(
    index: int,
    address: str,
    items: int,
    size: int,
    run_s: float,
    stall_s: float,
    pull: str,
    out,
):
    """One consumer process: follow, pull (`pull`: "claim", "resolve" or "none") and
    check; put its figures on `out`. With `stall_s`, stop reading after STALL_AFTER
    events for that long."""
    consumer_id = f"fanout-{index}"
    resolver = Resolver(consumer_id=consumer_id)
    puller = Puller(Arena(4 * size + (1 << 20)))
    deadline = time.monotonic() + DEFAULT_PULL_TIMEOUT_S
    puller.meet(address, resolver.peer(address, deadline=deadline), deadline)  # as PD at start
    stream = resolver.client(address).watch(consumer_id, claim=pull == "claim", readers=1)
    result: dict[str, Any] = {"accepted": False, "fanout_ms": [], "pulls": 0, "errors": []}
    stream.wait_open()
    out.put(("open", index))
    threading.Timer(run_s, stream.close).start()  # no consumer outlives the run
    seen = 0
    try:
        for event in stream:
            result["accepted"] = True
            if event.kind is not EventKind.EXPORTED or event.snapshot:
                continue
            result["fanout_ms"].append((time.time_ns() - event.published_unix_ns) / 1e6)
            seen += 1
            if stall_s and seen == STALL_AFTER:
                out.put(("stalled", index, time.monotonic()))
                time.sleep(stall_s)  # the stream stays open, unread
                break
            if pull == "claim" and event.claim is None:
                result["errors"].append("announced without a claim")
            elif pull != "none":
                _pull(resolver, puller, address, event, size, result)
            if seen == items:
                break
    except ECNixlError as exc:
        result["errors"].append(f"stream: {type(exc).__name__}: {str(exc)[:120]}")
    stream.close()
    resolver.close()
    out.put(("result", index, result))


def _pull(resolver, puller, address: str, event, size: int, result: dict[str, Any]) -> None:
    deadline = time.monotonic() + DEFAULT_PULL_TIMEOUT_S
    try:
        if event.claim is None:
            resolution = resolver.resolve(address, [event.mm_hash], deadline)
        else:
            resolution = resolver.checked(address, [event.claim], event.received_at, deadline)
        [item] = puller.read(resolution, deadline)
    except ECNixlError as exc:
        result["errors"].append(f"pull: {type(exc).__name__}")
        return
    number = int(event.mm_hash.rsplit("-", 1)[1])
    if number % CHECK_EVERY == 0 and not torch.equal(item.tensor, spec(number, size).make()):
        result["errors"].append(f"{event.mm_hash}: bytes differ")
    puller.free(item)
    result["pulls"] += 1


def _cpu_s(pid: int) -> float:
    """User + system CPU of every thread of `pid`, in seconds."""
    ticks = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _host_jiffies() -> tuple[int, int]:
    """(busy, all) CPU time of the whole host since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(n) for n in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def _status(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as status:
        lines = dict(line.split(":", 1) for line in status if ":" in line)
    return {"threads": int(lines["Threads"]), "rss_mib": int(lines["VmRSS"].split()[0]) // 1024}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(consumers: int, args: argparse.Namespace) -> dict[str, Any]:
    run_s = args.items / args.rate + 30
    context = mp.get_context("spawn")
    out = context.Queue()
    config = ExporterConfig(capacity_bytes=args.pool_mib << 20)
    with ExporterProcess(config) as exporter:
        for seed in range(SEEDS):  # before any consumer: they see these in the opening list
            exporter.export(f"warm-{seed}", spec(seed, args.size))
        stall_s = args.items / args.rate + 2 if args.stall else 0.0
        procs = [
            context.Process(
                target=_consume,
                args=(
                    i,
                    exporter.address,
                    args.items,
                    args.size,
                    run_s,
                    stall_s * (i == 0),
                    args.pull,
                    out,
                ),
                daemon=True,
            )
            for i in range(consumers)
        ]
        for proc in procs:
            proc.start()
        messages = [out.get(timeout=START_TIMEOUT_S)]  # until each stream is open (or refused)
        while sum(m[0] == "open" for m in messages) < consumers:
            messages.append(out.get(timeout=START_TIMEOUT_S))
        cpu_before, host_before, started = _cpu_s(exporter.pid), _host_jiffies(), time.monotonic()
        export_ms, failed = [], 0
        watching, stalled_at, cut_off_s = exporter.stats()["watchers"], None, None
        for n in range(args.items):
            try:
                export_ms.append(exporter.export(f"item-{n}", spec(n, args.size)) * 1000)
            except RuntimeError as exc:
                failed += 1
                if failed == 1:
                    print(f"  export {n} failed: {str(exc)[:160]}", file=sys.stderr)
            if args.stall and cut_off_s is None:  # the stalled watcher's stream ended yet?
                while not out.empty():
                    messages.append(out.get())
                    if messages[-1][0] == "stalled":
                        stalled_at = messages[-1][2]
                if stalled_at is not None and exporter.stats()["watchers"] < watching:
                    cut_off_s = time.monotonic() - stalled_at
            time.sleep(max(0.0, started + (n + 1) / args.rate - time.monotonic()))
        while sum(m[0] == "result" for m in messages) < consumers:
            messages.append(out.get(timeout=run_s + 30))
        results = [m[2] for m in sorted(m for m in messages if m[0] == "result")]
        elapsed = time.monotonic() - started
        cpu = _cpu_s(exporter.pid) - cpu_before
        host = [after - before for after, before in zip(_host_jiffies(), host_before, strict=True)]
        status = _status(exporter.pid)
    for proc in procs:
        proc.join(timeout=10)
    fanout = [ms for r in results for ms in r["fanout_ms"]]
    pulls = sum(r["pulls"] for r in results)
    row = {
        "consumers": consumers,
        "watchers_accepted": sum(r["accepted"] for r in results),
        "fanout_ms": {q: round(_percentile(fanout, v), 2) for q, v in PERCENTILES.items()},
        "export_ms": {q: round(_percentile(export_ms, v), 2) for q, v in PERCENTILES.items()},
        "exports_failed": failed,
        "pulls": pulls,
        "pulls_per_s": round(pulls / elapsed, 1),
        "e_cpu_ms_per_export": round(cpu * 1000 / max(1, len(export_ms)), 2),
        "e_cpu_ms_per_pull": round(cpu * 1000 / max(1, pulls), 2),
        "e_threads": status["threads"],
        "e_rss_mib": status["rss_mib"],
        "host_cpu_busy_pct": round(100 * host[0] / max(1, host[1])),
        "errors": sorted({e for r in results for e in r["errors"]})[:10],
    }
    if args.stall:
        row["stalled_watcher_cut_off_s"] = None if cut_off_s is None else round(cut_off_s, 2)
    return row


PERCENTILES = {"p50": 0.5, "p99": 0.99, "max": 1.0}


def table(rows: list[dict[str, Any]], stall: bool) -> str:
    head = (
        "| consumers | watchers accepted | fan-out ms p50 / p99 / max | export() ms p50 / p99 "
        "| exports failed | pulls/s | E CPU ms per export / per pull | E threads | E RSS MiB "
        "| host CPU busy % |"
    )
    lines = [
        head + (" stalled watcher cut off after s |" if stall else ""),
        "|---" * (10 + stall) + "|",
    ]
    for r in rows:
        f, e = r["fanout_ms"], r["export_ms"]
        line = (
            f"| {r['consumers']} | {r['watchers_accepted']} | {f['p50']} / {f['p99']} / "
            f"{f['max']} | {e['p50']} / {e['p99']} | {r['exports_failed']} | {r['pulls_per_s']} "
            f"| {r['e_cpu_ms_per_export']} / {r['e_cpu_ms_per_pull']} | {r['e_threads']} "
            f"| {r['e_rss_mib']} | {r['host_cpu_busy_pct']} |"
        )
        cut_off = r.get("stalled_watcher_cut_off_s")
        lines.append(line + (f" {'never' if cut_off is None else cut_off} |" if stall else ""))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--consumers",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 4, 16],
        help="comma-separated numbers of consumer processes, one run each (default: 1,4,16)",
    )
    parser.add_argument("--items", type=int, default=100, help="items exported per run")
    parser.add_argument("--size", type=parse_size, default=1 << 20, help="bytes per item (1M)")
    parser.add_argument("--rate", type=float, default=10.0, help="exports a second (10)")
    parser.add_argument("--pool-mib", type=int, default=64, help="the exporter's pool (64)")
    parser.add_argument(
        "--stall", action="store_true", help="consumer 0 stops reading after its 5th event"
    )
    parser.add_argument(
        "--pull",
        choices=("claim", "resolve", "none"),
        default="claim",
        help="how consumers pull each item: under the claim its announcement carries "
        "(default), with a Resolve, or not at all (the fan-out alone)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows here")


def run(args: argparse.Namespace) -> int:
    rows = []
    for n in args.consumers:
        print(
            f"[{n} consumers] {args.items} items of {human(args.size)}, {args.rate:g}/s ...",
            file=sys.stderr,
            flush=True,
        )
        rows.append(measure(n, args))
        print(f"[{n} consumers] {rows[-1]}", file=sys.stderr, flush=True)
    print(table(rows, args.stall))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0
