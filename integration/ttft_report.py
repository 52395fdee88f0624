"""How `ec-nixl bench ttft` shows what it measured: Markdown tables on stdout, a PNG
of TTFT vs concurrency, and the `--json` document.

Everything comes from the result the bench returns, so the ways it names (ours,
and the shared-storage baseline every ratio is taken against) are its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from integration.stall_gauge import STALL_MS
from integration.ttft_measures import PHASES, p50_ratio

BASELINE = "ECExampleConnector"


def cpu_connector_note() -> str | None:
    """Why vLLM's ECCPUConnector cannot run here, or None if it can."""
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        return (
            "ECCPUConnector: not run. It needs vLLM's V2 model runner, which needs Triton "
            "with a backend for this device; this host has none."
        )
    return None


def baseline_ratios(figures: dict[str, dict[str, float]]) -> list[str]:
    """The baseline's p50 and mean over each of ours (above 1, ours are shorter)."""
    return [
        f"- {BASELINE} / {ours}: "
        + ", ".join(
            f"{stat} {figures[BASELINE][stat] / max(figures[ours][stat], 1e-9):.2f}x"
            for stat in ("p50", "mean")
        )
        for ours in figures
        if ours != BASELINE
    ]


def table(result: dict[str, Any]) -> str:
    announced = result["announce_wait_ms"]
    overlap = announced["way"]
    ready = result["embeddings_ready_ms"]
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
        f"forwarding to PD until its first chunk ({overlap}: forwarded at once, the phases "
        "overlap).",
    ]
    for ours in (name for name in ready if name != BASELINE):
        lines += [
            "",
            f"TTFT p50, {BASELINE} / {ours} (above 1: {ours} is faster; 95% bootstrap interval):",
        ]
        for c in sorted({lv.concurrency for lv in result["levels"]}):
            ratio, low, high = p50_ratio(by[BASELINE, c], by[ours, c])
            lines.append(f"- concurrency {c}: {ratio:.2f}x ({low:.2f}-{high:.2f})")
    lines += ["", "| connector | repeated images: TTFT p50 ms | peak RSS MiB |", "|---|---|---|"]
    for level in result["repeated"]:
        peak = result["peak_rss_mib"].get(level.connector)
        rss = ", ".join(f"{k} {v}" for k, v in peak.items()) if peak else "(ECNixlConnector's)"
        lines.append(f"| {level.connector} | {level.percentiles()['p50']} | {rss} |")
    lines += [
        "",
        "Embeddings ready, per item, ms: the announcement's transit from E to PD where the "
        f"request was first ({overlap}) + the scheduler's wait for the item + the PD worker's "
        "load into the encoder cache",
        "",
        "| connector | p50 | (transit + wait + load) | mean | (transit + wait + load) |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {ms['p50']} | {ms['transit_p50']} + {ms['wait_p50']} + "
            f"{ms['load_p50']} | {ms['mean']} | {ms['transit_mean']} + {ms['wait_mean']} + "
            f"{ms['load_mean']} |"
            for name, ms in ready.items()
        ),
        "",
        "Embeddings ready, shared storage over ours (above 1: ours is shorter):",
        *baseline_ratios(ready),
    ]
    saves, paths = result["encoder_save_ms"], result["critical_path_ms"]
    lines += [
        "",
        "Encoder save, per item, ms (E's worker, in the encoder's step), and what the connector "
        "adds to a request's critical path (save + embeddings ready):",
        "",
        "| connector | save p50 | save mean | save + ready, p50 | save + ready, mean |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {ms['p50']} | {ms['mean']} | {paths['overall'][name]['p50']} "
            f"| {paths['overall'][name]['mean']} |"
            for name, ms in saves.items()
        ),
    ]
    for scope, path in paths.items():
        lines += ["", f"Save + ready, shared storage over ours ({scope}):", *baseline_ratios(path)]
    lines += [
        "",
        "The machine's stalls during each way's blocks (integration.stall_gauge: a process "
        f"that only sleeps, woken over {STALL_MS:.0f} ms late; they lengthen what was running "
        "or waking then, a wait for an event most):",
        *(
            f"- {name}: {n['count']} stalls, longest {n['max_ms']} ms, "
            f"{n['ms_per_minute']} ms lost per minute"
            for name, n in result["stalls"].items()
        ),
    ]
    images, repeats = result["repeated_stream"]
    lines.append("")
    lines.append(
        f"{overlap}: PD had {announced['items']} items' requests before E announced them and "
        f"waited for E to encode them (its front end done): p50 {announced['p50']} ms, mean "
        f"{announced['mean']} ms; not counted in embeddings ready."
    )
    lines.append(
        f"Repeated stream: {images} distinct images x {repeats}: "
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


def document(result: dict[str, Any]) -> dict[str, Any]:
    """What `--json` writes: `runs` as the issue specifies it, and the rest of the figures."""
    return {
        "runs": [lv.summary() for lv in result["levels"]],
        "repeated": [lv.summary() for lv in result["repeated"]],
        "embeddings_ready_ms": result["embeddings_ready_ms"],
        "encoder_save_ms": result["encoder_save_ms"],
        "critical_path_ms": result["critical_path_ms"],
        "pulls_repeated": result["pulls_repeated"],
        "peak_rss_mib": result["peak_rss_mib"],
        "stalls": result["stalls"],
        "embedding_bytes": result["embedding_bytes"],
    }
