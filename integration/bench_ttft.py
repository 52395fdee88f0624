"""`ec-nixl bench ttft`: time to first token, ECNixlConnector vs shared storage vs one instance.

Same model, same request stream, one run: every way of serving (E + PD +
proxy with ECNixlConnector, the same with vLLM's ECExampleConnector, and one
ordinary instance) is up at once, and each concurrency level's distinct-image
stream is served in short blocks that take turns between the ways, so the
drift of a shared machine hits every way alike; then a stream that repeats
images (cache reuse). TTFT ratios come with a bootstrap confidence interval,
and the proxy's phase timings say where each TTFT went (encoder; PD).
The proxies send each request to PD after E answered; "ECNixlConnector
--overlap" is the same E and PD behind a proxy that sends to PD at the same
time as to E (PD's front end runs while E encodes, and PD pulls each item when
E announces it; shared storage has no announcements to wait for). The model is
the tiny LLaVA with LLaVA-1.5-7B's embedding shape by default: 576 x 4096 bf16
= 4.5 MiB per image. "Embeddings ready", per item: how long PD's scheduler
waited for the item once it existed (ECNixlConnector's
ec_nixl:ready_wait_seconds, counted from the later of the request and E's
announcement reaching PD; with --overlap, where the request is always first,
plus the announcement's transit from E, ec_nixl:announce_transit_seconds;
shared storage's file is there when the request arrives) plus the PD worker's
load into the encoder cache (logged by integration.timed_connectors for both
connectors). "Encoder save", per item:
the E worker's save of each output in its step (a file in shared storage, or a
copy into the export pool), logged the same way: with embeddings ready, what a
connector adds to a request's critical path. The time PD spent waiting for E
to encode is shown apart (ec_nixl:announce_wait_seconds, which ends when the
announcement reaches PD: the transit is in it too).
A process that only sleeps runs beside the blocks (integration.stall_gauge):
its stalls per way say how much time the machine itself took from each.
vLLM's ECCPUConnector runs only where vLLM's V2 model runner does (it needs
Triton with a backend for the device); where it cannot, the table says so.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from integration.client import chat_body, image, metric, scrape, stream_ttft
from integration.deploy import CONNECTORS, QUIET_S, deploy
from integration.servers import Server, start_proxy, wait_healthy
from integration.stall_gauge import StallGauge, summary
from integration.tiny_vlm import add_text_hidden_argument, build, embedding_bytes
from integration.ttft_measures import (
    LOAD_LINE,
    SAVE_LINE,
    Histogram,
    Level,
    Ready,
    histogram_in,
    p50_and_mean,
    per_item_ms,
    phase_means_ms,
    proxy_phases,
    timings_in,
)
from integration.ttft_report import document, plot, table

DEFAULT_CONCURRENCY = (1, 2, 4)
REPEATED_IMAGES, REPEATS = 3, 4
ANNOUNCE_TRANSIT = "ec_nixl:announce_transit_seconds"
READY_WAIT = "ec_nixl:ready_wait_seconds"
ANNOUNCE_WAIT = "ec_nixl:announce_wait_seconds"
OVERLAP = "ECNixlConnector --overlap"  # ECNixlConnector's E and PD, PD sent to at once
WARM_UP_REQUESTS = 3


def block_size(concurrency: int) -> int:
    """Requests a way serves before the next takes its turn: enough to keep
    `concurrency` requests in flight most of the block."""
    return max(4, 2 * concurrency)


def send(url: str, images: list[str], concurrency: int, level: Level) -> None:
    def one(picture: str) -> float | None:
        try:
            return stream_ttft(url, chat_body(picture, max_tokens=4))[0] * 1000
        except OSError:
            return None

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for ttft in pool.map(one, images):
            if ttft is None:
                level.errors += 1
            else:
                level.ttft_ms.append(ttft)
    level.wall_s += time.perf_counter() - start


def pulls(pd_url: str) -> float:
    return metric(pd_url, "ec_nixl:items_pulled_total")


def timings_in_log(server: Server, line: str) -> list[tuple[int, float]]:
    return timings_in(server.log_path.read_text(errors="replace"), line)


@dataclass
class ConnectorSide:
    """What a way's connector did over its distinct-image blocks, from E's log and PD's
    /metrics and log."""

    # With --overlap every request is at PD before its item's announcement: the
    # announcement's way from E to PD is then on the critical path (otherwise it is not).
    announced_after_request: bool = False
    ready: Ready = field(default_factory=Ready)
    announce_waits: Histogram = field(default_factory=Histogram)
    save_ms: list[float] = field(default_factory=list)  # per item, in E's worker

    @contextmanager
    def measuring(self, encoder: Server, pd: Server) -> Iterator[None]:
        """Adds what E and PD did while the body ran."""
        before = scrape(pd.url)
        saves = len(timings_in_log(encoder, SAVE_LINE))
        loads = len(timings_in_log(pd, LOAD_LINE))
        yield
        after = scrape(pd.url)
        transits, waits, announced = (
            histogram_in(after, name).since(histogram_in(before, name))
            for name in (ANNOUNCE_TRANSIT, READY_WAIT, ANNOUNCE_WAIT)
        )
        if self.announced_after_request:
            self.ready.transits = self.ready.transits.plus(transits)
        self.ready.waits = self.ready.waits.plus(waits)
        self.announce_waits = self.announce_waits.plus(announced)
        self.ready.load_ms += per_item_ms(timings_in_log(pd, LOAD_LINE)[loads:])
        self.save_ms += per_item_ms(timings_in_log(encoder, SAVE_LINE)[saves:])

    def save(self) -> dict[str, float]:
        p50, mean = p50_and_mean(self.save_ms)
        return {"p50": round(p50, 3), "mean": round(mean, 3)}

    def critical_path(self) -> dict[str, float]:
        """What the connector adds to a request's critical path, per item: save + ready."""
        save, ready = self.save(), self.ready.ms()
        return {stat: round(save[stat] + ready[stat], 3) for stat in ("p50", "mean")}

    def plus(self, other: ConnectorSide) -> ConnectorSide:
        return ConnectorSide(
            self.announced_after_request,
            self.ready.plus(other.ready),
            self.announce_waits.plus(other.announce_waits),
            self.save_ms + other.save_ms,
        )


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every way up at once; each level's stream in blocks that take turns between them."""
    build(workdir / "tiny-llava", text_hidden=args.text_hidden)
    ways = [*CONNECTORS, None]
    seeds = itertools.count(1)
    with ExitStack() as stack:
        started = (stack.enter_context(deploy(way, workdir, timed=True)) for way in ways)
        deployments = {deployment.name: deployment for deployment in started}
        nixl = deployments["ECNixlConnector"]
        overlap = start_proxy(
            encoders=[nixl.server("encoder").url], pd=nixl.server("pd").url,
            log_dir=workdir / "logs" / "overlap", overlap=True,
        )  # fmt: skip
        stack.callback(overlap.stop)
        wait_healthy([overlap])
        urls = {
            "ECNixlConnector": nixl.url,
            OVERLAP: overlap.url,
            "ECExampleConnector": deployments["ECExampleConnector"].url,
            "single-instance": deployments["single-instance"].url,
        }
        names = list(urls)
        roles = {name: (deployments[name].server("encoder"), deployments[name].server("pd"))
                 for name in CONNECTORS}  # fmt: skip
        roles[OVERLAP] = roles["ECNixlConnector"]
        levels = {(name, c): Level(name, c) for name in names for c in args.concurrency}
        sides = {
            (name, c): ConnectorSide(announced_after_request=name == OVERLAP)
            for name in roles
            for c in args.concurrency
        }
        for name, url in urls.items():
            send(url, [image(next(seeds)) for _ in range(WARM_UP_REQUESTS)], 1, Level(name, 1))
        gauge = stack.enter_context(StallGauge())
        blocks_of: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
        for c in args.concurrency:
            phases = {name: proxy_phases(urls[name]) for name in roles}
            blocks = -(-args.requests // block_size(c))
            for block in range(blocks):
                turn = block % len(names)
                for name in names[turn:] + names[:turn]:
                    time.sleep(QUIET_S)
                    pictures = [image(next(seeds)) for _ in range(block_size(c))]
                    side = sides.get((name, c))
                    began = time.time_ns()
                    with side.measuring(*roles[name]) if side else nullcontext():
                        send(urls[name], pictures, c, levels[name, c])
                    blocks_of[name].append((began, time.time_ns()))
            for name in roles:
                levels[name, c].phases_ms = phase_means_ms(phases[name], proxy_phases(urls[name]))
            for name in names:
                print(
                    f"[{name}] concurrency {c}: TTFT p50 {levels[name, c].percentiles()['p50']} "
                    f"ms, {levels[name, c].errors} errors",
                    file=sys.stderr,
                    flush=True,
                )
        stalls = {
            name: summary(
                [stall for block in blocks for stall in gauge.between(*block)],
                sum(end - began for began, end in blocks) / 1e9,
            )
            for name, blocks in blocks_of.items()
        }
        repeated = [Level(name, 1) for name in names]  # ECNixlConnector's first: fresh images
        first = next(seeds)
        pictures = [image(first + i % REPEATED_IMAGES) for i in range(REPEATED_IMAGES * REPEATS)]
        nixl_pd = nixl.server("pd").url
        pulled = pulls(nixl_pd)
        send(urls["ECNixlConnector"], pictures, 1, repeated[0])
        pulls_repeated = int(pulls(nixl_pd) - pulled)
        for level in repeated[1:]:
            send(urls[level.connector], pictures, 1, level)
        peak_rss = {
            name: {server: round(mib) for server, mib in deployment.peak_rss_mib.items()}
            for name, deployment in deployments.items()
        }
    overall = {
        name: functools.reduce(ConnectorSide.plus, (sides[name, c] for c in args.concurrency))
        for name in roles
    }
    announced = overall[OVERLAP].announce_waits
    return {
        "levels": list(levels.values()),
        "repeated": repeated,
        "embedding_bytes": embedding_bytes(args.text_hidden),
        "embeddings_ready_ms": {name: side.ready.ms() for name, side in overall.items()},
        "encoder_save_ms": {name: side.save() for name, side in overall.items()},
        "critical_path_ms": {
            "overall": {name: side.critical_path() for name, side in overall.items()},
            **{
                f"concurrency {c}": {name: sides[name, c].critical_path() for name in roles}
                for c in args.concurrency
            },
        },
        "announce_wait_ms": {
            "way": OVERLAP,
            "items": int(announced.count),
            "p50": round(announced.quantile_ms(0.5), 2),
            "mean": round(announced.mean_ms(), 2),
        },
        "repeated_stream": (REPEATED_IMAGES, REPEATS),
        "pulls_repeated": pulls_repeated,
        "peak_rss_mib": peak_rss,
        "stalls": stalls,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--concurrency",
        type=lambda t: tuple(int(c) for c in t.split(",")),
        default=DEFAULT_CONCURRENCY,
        help="comma-separated levels (default 1,2,4)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=48,
        help="requests per way and level (default 48), served in blocks that take turns",
    )
    add_text_hidden_argument(parser)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    parser.add_argument(
        "--plot", type=Path, default=Path("ttft.png"), help="PNG of TTFT vs concurrency"
    )


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="ec-nixl-ttft-") as tmp:
        result = bench(args, Path(tmp))
    print(table(result))
    plot(result, args.plot)
    print(f"plot: {args.plot}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(document(result), indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
