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
announcement; shared storage's file is there when the request arrives) plus
the PD worker's load into the encoder cache (logged by
integration.timed_connectors for both connectors). "Encoder save", per item:
the E worker's save of each output in its step (a file in shared storage, or a
copy into the export pool), logged the same way: with embeddings ready, what a
connector adds to a request's critical path. The time PD spent waiting for E
to encode is shown apart (ec_nixl:announce_wait_seconds).
vLLM's ECCPUConnector runs only where vLLM's V2 model runner does (it needs
Triton with a backend for the device); where it cannot, the table says so.
"""

from __future__ import annotations

import argparse
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

import numpy as np

from integration.client import chat_body, image, metric, scrape, stream_ttft
from integration.deploy import CONNECTORS, QUIET_S, deploy
from integration.servers import Server, start_proxy, wait_healthy
from integration.tiny_vlm import build, embedding_bytes
from integration.ttft_measures import (
    LOAD_LINE,
    PHASES,
    SAVE_LINE,
    Histogram,
    Ready,
    histogram_in,
    p50_ratio,
    per_item_ms,
    phase_means_ms,
    proxy_phases,
    timings_in,
)

DEFAULT_CONCURRENCY = (1, 2, 4)
LLAVA_7B_HIDDEN = 4096
REPEATED_IMAGES, REPEATS = 3, 4
READY_WAIT = "ec_nixl:ready_wait_seconds"
ANNOUNCE_WAIT = "ec_nixl:announce_wait_seconds"
OVERLAP = "ECNixlConnector --overlap"  # ECNixlConnector's E and PD, PD sent to at once
WARM_UP_REQUESTS = 3


@dataclass
class Level:
    connector: str
    concurrency: int
    ttft_ms: list[float] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0
    phases_ms: dict[str, float] = field(default_factory=dict)  # proxy's means, per request

    def percentiles(self) -> dict[str, float]:
        if not self.ttft_ms:
            return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
        p50, p90, p99 = np.percentile(self.ttft_ms, [50, 90, 99])
        return {
            "p50": round(float(p50), 2),
            "p90": round(float(p90), 2),
            "p99": round(float(p99), 2),
        }

    @property
    def requests(self) -> int:
        return len(self.ttft_ms) + self.errors

    def summary(self) -> dict[str, Any]:
        return {
            "connector": self.connector,
            "concurrency": self.concurrency,
            "ttft_ms": self.percentiles(),
            "requests": self.requests,
            "errors": self.errors,
            "phases_ms": self.phases_ms,
        }


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


def cpu_connector_note() -> str | None:
    """Why vLLM's ECCPUConnector cannot run here, or None if it can."""
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        return (
            "ECCPUConnector: not run. It needs vLLM's V2 model runner, which needs Triton "
            "with a backend for this device; this host has none."
        )
    return None


@dataclass
class ConnectorSide:
    """What a way's connector did over its distinct-image blocks, from E's log and PD's
    /metrics and log."""

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
        waits, announced = (
            histogram_in(after, name).since(histogram_in(before, name))
            for name in (READY_WAIT, ANNOUNCE_WAIT)
        )
        self.ready.waits = self.ready.waits.plus(waits)
        self.announce_waits = self.announce_waits.plus(announced)
        self.ready.load_ms += per_item_ms(timings_in_log(pd, LOAD_LINE)[loads:])
        self.save_ms += per_item_ms(timings_in_log(encoder, SAVE_LINE)[saves:])

    def save(self) -> dict[str, float]:
        if not self.save_ms:
            return {"p50": 0.0, "mean": 0.0}
        return {
            "p50": round(float(np.median(self.save_ms)), 3),
            "mean": round(float(np.mean(self.save_ms)), 3),
        }


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
        sides = {name: ConnectorSide() for name in roles}
        for name, url in urls.items():
            send(url, [image(next(seeds)) for _ in range(WARM_UP_REQUESTS)], 1, Level(name, 1))
        for c in args.concurrency:
            phases = {name: proxy_phases(urls[name]) for name in roles}
            blocks = -(-args.requests // block_size(c))
            for block in range(blocks):
                turn = block % len(names)
                for name in names[turn:] + names[:turn]:
                    time.sleep(QUIET_S)
                    pictures = [image(next(seeds)) for _ in range(block_size(c))]
                    with sides[name].measuring(*roles[name]) if name in sides else nullcontext():
                        send(urls[name], pictures, c, levels[name, c])
            for name in roles:
                levels[name, c].phases_ms = phase_means_ms(phases[name], proxy_phases(urls[name]))
            for name in names:
                print(
                    f"[{name}] concurrency {c}: TTFT p50 {levels[name, c].percentiles()['p50']} "
                    f"ms, {levels[name, c].errors} errors",
                    file=sys.stderr,
                    flush=True,
                )
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
    announced = sides[OVERLAP].announce_waits
    return {
        "levels": list(levels.values()),
        "repeated": repeated,
        "embedding_bytes": embedding_bytes(args.text_hidden),
        "embeddings_ready_ms": {name: side.ready.ms() for name, side in sides.items()},
        "encoder_save_ms": {name: side.save() for name, side in sides.items()},
        "announce_wait_ms": {
            "items": int(announced.count),
            "p50": round(announced.quantile_ms(0.5), 2),
            "mean": round(announced.mean_ms(), 2),
        },
        "pulls_repeated": pulls_repeated,
        "peak_rss_mib": peak_rss,
    }


def baseline_ratios(figures: dict[str, dict[str, float]]) -> list[str]:
    """ECExampleConnector's p50 and mean over each of ours (above 1, ours are shorter)."""
    return [
        f"- ECExampleConnector / {ours}: "
        + ", ".join(
            f"{stat} {figures['ECExampleConnector'][stat] / max(figures[ours][stat], 1e-9):.2f}x"
            for stat in ("p50", "mean")
        )
        for ours in ("ECNixlConnector", OVERLAP)
    ]


def table(result: dict[str, Any]) -> str:
    lines = [
        f"One image = {result['embedding_bytes'] / (1 << 20):.2f} MiB of embedding.",
        "",
        "| connector | concurrency | TTFT p50 ms | p90 ms | p99 ms | req/s | requests | errors "
        "| encoder phase ms | PD phase ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in result["levels"]:
        p = level.percentiles()
        rate = level.requests / level.wall_s if level.wall_s else 0
        phases = [str(level.phases_ms.get(phase, "-")) for phase in PHASES]
        lines.append(
            f"| {level.connector} | {level.concurrency} | {p['p50']} | {p['p90']} "
            f"| {p['p99']} | {rate:.2f} | {level.requests} | {level.errors} | "
            + " | ".join(phases)
            + " |"
        )
    by = {(lv.connector, lv.concurrency): lv.ttft_ms for lv in result["levels"]}
    lines += [
        "",
        "Phases (means, from the proxy): encoder = until the encoders answered, PD = from "
        f"forwarding to PD until its first chunk ({OVERLAP}: forwarded at once, the phases "
        "overlap).",
    ]
    for ours in ("ECNixlConnector", OVERLAP):
        lines += [
            "",
            f"TTFT p50, ECExampleConnector / {ours} (above 1: {ours} is faster; 95% bootstrap "
            "interval):",
        ]
        for c in sorted({lv.concurrency for lv in result["levels"]}):
            ratio, low, high = p50_ratio(by["ECExampleConnector", c], by[ours, c])
            lines.append(f"- concurrency {c}: {ratio:.2f}x ({low:.2f}-{high:.2f})")
    lines += ["", "| connector | repeated images: TTFT p50 ms | peak RSS MiB |", "|---|---|---|"]
    for level in result["repeated"]:
        peak = result["peak_rss_mib"].get(level.connector)
        rss = ", ".join(f"{k} {v}" for k, v in peak.items()) if peak else "(ECNixlConnector's)"
        lines.append(f"| {level.connector} | {level.percentiles()['p50']} | {rss} |")
    lines.append("")
    ready = result["embeddings_ready_ms"]
    lines += [
        "Embeddings ready, per item, ms: the scheduler's wait for the item + the PD worker's "
        "load into the encoder cache",
        "",
        "| connector | p50 | (wait p50 + load p50) | mean | (wait mean + load mean) |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {ms['p50']} | {ms['wait_p50']} + {ms['load_p50']} | {ms['mean']} "
            f"| {ms['wait_mean']} + {ms['load_mean']} |"
            for name, ms in ready.items()
        ),
        "",
        "Embeddings ready, shared storage over ours (above 1: ours is shorter):",
        *baseline_ratios(ready),
    ]
    saves = result["encoder_save_ms"]
    path = {
        name: {stat: ms[stat] + ready[name][stat] for stat in ("p50", "mean")}
        for name, ms in saves.items()
    }
    lines += [
        "",
        "Encoder save, per item, ms (E's worker, in the encoder's step), and what the connector "
        "adds to a request's critical path (save + embeddings ready):",
        "",
        "| connector | save p50 | save mean | save + ready, p50 | save + ready, mean |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {ms['p50']} | {ms['mean']} | {path[name]['p50']:.3f} "
            f"| {path[name]['mean']:.3f} |"
            for name, ms in saves.items()
        ),
        "",
        "Save + ready, shared storage over ours:",
        *baseline_ratios(path),
    ]
    announced = result["announce_wait_ms"]
    lines.append("")
    lines.append(
        f"{OVERLAP}: PD had {announced['items']} items' requests before E announced them and "
        f"waited for E to encode them (its front end done): p50 {announced['p50']} ms, mean "
        f"{announced['mean']} ms; not counted in embeddings ready."
    )
    lines.append(
        f"Repeated stream: {REPEATED_IMAGES} distinct images x {REPEATS}: "
        f"ECNixlConnector pulled {result['pulls_repeated']} items"
    )
    if note := cpu_connector_note():
        lines.append(note)
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(lv.connector for lv in result["levels"]):
        mine = [lv for lv in result["levels"] if lv.connector == name]
        p50 = [lv.percentiles()["p50"] for lv in mine]
        p90 = [lv.percentiles()["p90"] for lv in mine]
        x = [lv.concurrency for lv in mine]
        (line,) = axes.plot(x, p50, marker="o", label=f"{name} p50")
        axes.plot(x, p90, linestyle="--", alpha=0.6, color=line.get_color(), label=f"{name} p90")
    axes.set_xlabel("concurrent requests")
    axes.set_ylabel("TTFT (ms)")
    axes.set_title(f"TTFT, {result['embedding_bytes'] / (1 << 20):.1f} MiB per image")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


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
    parser.add_argument(
        "--text-hidden",
        type=int,
        default=LLAVA_7B_HIDDEN,
        help="embedding width; 4096 = LLaVA-1.5-7B, 4.5 MiB per image",
    )
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
        document = {
            "runs": [lv.summary() for lv in result["levels"]],
            "repeated": [lv.summary() for lv in result["repeated"]],
            "embeddings_ready_ms": result["embeddings_ready_ms"],
            "encoder_save_ms": result["encoder_save_ms"],
            "pulls_repeated": result["pulls_repeated"],
            "peak_rss_mib": result["peak_rss_mib"],
            "embedding_bytes": result["embedding_bytes"],
        }
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
