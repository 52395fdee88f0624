"""`ec-nixl bench pull`: what one pull costs inside vLLM, as PD sees it.

One encoder (E) and one PD with ECNixlConnector (PD prefetches: E's
announcements carry claims), the tiny LLaVA with LLaVA-1.5-7B's embedding
shape (576 x 4096 bf16 = 4.5 MiB per image), for each PD tensor-parallel size
asked. Requests go one at a time, 1.5 s apart (vLLM's workers busy-poll for a
second after a step), through a proxy that sends to PD after E answered, and
through one that sends to PD at once (`--overlap`: PD waits for the
announcement, so the pull is on its critical path). Per way, from PD's own
log: each pull's time from the scheduler's order to the bytes on every rank
(what `ec_nixl:pull_seconds` observes), how its lease was had (the
announcement's claim, or a resolve) and the READ per rank; from PD's /metrics:
the wait for the item once announced (`ec_nixl:ready_wait_seconds`).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from integration.client import answer, image, scrape
from integration.deploy import QUIET_S, deploy, run_rows_bench
from integration.servers import Server, start_proxy, wait_healthy
from integration.tiny_vlm import add_text_hidden_argument, build
from integration.ttft_measures import histogram_in, p50_and_mean

PULL_LINE = re.compile(
    r"pulled \w+ from \w+ in ([\d.]+) ms \((claimed|resolve)[^;]*; READ per rank ([\d./]+) ms"
)
READY_WAIT = "ec_nixl:ready_wait_seconds"


def pulls_in_log(pd: Server) -> list[tuple[float, str, list[float]]]:
    """(ms, "claimed" or "resolve", READ ms per rank) of each pull PD logged."""
    log = pd.log_path.read_text(errors="replace")
    return [
        (float(ms), how, [float(r) for r in reads.split("/")])
        for ms, how, reads in PULL_LINE.findall(log)
    ]


def measure_way(proxy: Server, pd: Server, requests: int, seed: int) -> dict[str, Any]:
    """Distinct images through `proxy`, one at a time; what PD logged and counted meanwhile."""
    before_log, before_metrics = len(pulls_in_log(pd)), scrape(pd.url)
    for n in range(requests):
        time.sleep(QUIET_S)
        answer(proxy.url, image(seed + n))
    pulls = pulls_in_log(pd)[before_log:]
    ready = histogram_in(scrape(pd.url), READY_WAIT).since(histogram_in(before_metrics, READY_WAIT))
    pull_p50, pull_mean = p50_and_mean([ms for ms, _, _ in pulls])
    read_p50, _ = p50_and_mean([max(reads) for _, _, reads in pulls])
    return {
        "pulls": len(pulls),
        "claimed": sum(how == "claimed" for _, how, _ in pulls),
        "pull_ms": {"p50": round(pull_p50, 3), "mean": round(pull_mean, 3)},
        "slowest_rank_read_ms_p50": round(read_p50, 3),
        "ready_wait_ms": {
            "p50": round(ready.quantile_ms(0.5), 3),
            "mean": round(ready.mean_ms(), 3),
        },
    }


def bench(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    build(workdir / "tiny-llava", text_hidden=args.text_hidden)
    rows = []
    for tp in args.tensor_parallel:
        with ExitStack() as stack:
            pair = stack.enter_context(deploy("ECNixlConnector", workdir, pd_tensor_parallel=tp))
            encoder, pd = pair.server("encoder"), pair.server("pd")
            overlap = start_proxy(
                encoders=[encoder.url],
                pd=pd.url,
                log_dir=workdir / "logs" / "overlap",
                overlap=True,
            )
            stack.callback(overlap.stop)
            wait_healthy([overlap])
            answer(pair.url, image(999))  # warm-up: first contact of every rank with E
            for n, (way, proxy) in enumerate(
                (("sequential", pair.server("proxy")), ("overlap", overlap))
            ):
                row = {"pd_tensor_parallel": tp, "way": way}
                row |= measure_way(proxy, pd, args.requests, seed=1000 * tp + 500 * n)
                print(f"[TP {tp}, {way}] {row}", file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| PD TP | proxy | pulls (claimed) | pull ms p50 (mean) | slowest rank's READ ms p50 "
        "| ready wait ms p50 (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pd_tensor_parallel']} | {r['way']} | {r['pulls']} ({r['claimed']}) "
            f"| {r['pull_ms']['p50']} ({r['pull_ms']['mean']}) | {r['slowest_rank_read_ms_p50']} "
            f"| {r['ready_wait_ms']['p50']} ({r['ready_wait_ms']['mean']}) |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tensor-parallel",
        type=lambda t: tuple(int(x) for x in t.split(",")),
        default=(1, 2),
        help="comma-separated PD tensor-parallel sizes (default 1,2; 2 runs a rank per core)",
    )
    parser.add_argument(
        "--requests", type=int, default=20, help="requests per way, one at a time (default 20)"
    )
    add_text_hidden_argument(parser)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows here")


def run(args: argparse.Namespace) -> int:
    return run_rows_bench(args, "pull", bench, table)
