"""The main job: an encoder and a PD instance on this machine, ECNixlConnector vs shared storage.

Build the tiny model; for each connector start E (encoder only), PD and the
EPD proxy, both pairs up at once; send each one untimed warm-up request, then
the same image requests one at a time (streamed, so TTFT is the time to the
first generated token), each image to both connectors in turn (the first
alternating, each after a pause that lets the other go quiet), so that the
drift of a shared machine hits both alike; print each answer and TTFT, then
shut everything down. The table compares the two connectors; the answers must
be the same.

    python -m integration.demo [--requests N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from integration.client import chat_body, image, stream_ttft
from integration.deploy import CONNECTORS, QUIET_S, deploy
from integration.tiny_vlm import build, embedding_bytes


@dataclass
class Run:
    connector: str
    startup_s: float = 0.0
    ttft_ms: list[float] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)


def ask(run: Run, url: str, i: int, requests: int) -> None:
    ttft, text = stream_ttft(url, chat_body(image(100 + i)))
    run.ttft_ms.append(ttft * 1000)
    run.answers.append(text)
    print(f"[{run.connector}] request {i + 1}/{requests}: TTFT {ttft * 1000:.1f} ms, "
          f"answer {text!r}", file=sys.stderr, flush=True)  # fmt: skip


def serve(workdir: Path, requests: int) -> list[Run]:
    runs = [Run(name) for name in CONNECTORS]
    with ExitStack() as stack:
        deployments = [stack.enter_context(deploy(run.connector, workdir)) for run in runs]
        for run, deployment in zip(runs, deployments, strict=True):
            run.startup_s = deployment.startup_s
            stream_ttft(deployment.url, chat_body(image(99)))  # warm-up, untimed: first-use costs
        turns = [(run, deployment.url) for run, deployment in zip(runs, deployments, strict=True)]
        for i in range(requests):
            for run, url in turns[i % 2 :] + turns[: i % 2]:
                time.sleep(QUIET_S)
                ask(run, url, i, requests)
        for run, deployment in zip(runs, deployments, strict=True):
            run.peak_rss_mib = dict(deployment.peak_rss_mib)
    return runs


def report(runs: list[Run]) -> str:
    nixl, storage = runs
    lines = [
        f"One image = {embedding_bytes()} bytes of embedding (576 tokens x 1024, bf16).",
        "",
        "| request | answer | TTFT ECNixlConnector ms | TTFT ECExampleConnector ms |",
        "|---|---|---|---|",
    ]
    for i, (a, b) in enumerate(zip(nixl.ttft_ms, storage.ttft_ms, strict=True)):
        same = "" if nixl.answers[i] == storage.answers[i] else " (answers differ!)"
        lines.append(f"| {i + 1} | `{nixl.answers[i]!r}`{same} | {a:.1f} | {b:.1f} |")
    lines += [
        "",
        "| connector | median TTFT ms | start-up s | peak RSS MiB (E / PD) |",
        "|---|---|---|---|",
    ]
    for run in runs:
        rss = " / ".join(f"{run.peak_rss_mib.get(n, 0):.0f}" for n in ("encoder", "pd"))
        median = statistics.median(run.ttft_ms)
        lines.append(f"| {run.connector} | {median:.1f} | {run.startup_s:.1f} | {rss} |")
    ratio = statistics.median(storage.ttft_ms) / statistics.median(nixl.ttft_ms)
    lines += ["", f"Median TTFT, ECExampleConnector / ECNixlConnector: {ratio:.2f}x"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=8, help="image requests per connector")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the raw figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ec-nixl-demo-") as tmp:
        workdir = Path(tmp)
        print("building the tiny model ...", file=sys.stderr, flush=True)
        build(workdir / "tiny-llava")
        started = time.monotonic()
        runs = serve(workdir, args.requests)
    print(report(runs))
    print(f"\n(total {time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(r) for r in runs]}, indent=2))
    return 0 if runs[0].answers == runs[1].answers else 1


if __name__ == "__main__":
    sys.exit(main())
