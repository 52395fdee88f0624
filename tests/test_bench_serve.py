"""What `ec-nixl bench serve` prints from vLLM's benchmark results."""

from integration.bench_serve import BASELINE, PD_COUNTS, table

OURS = "ECNixlConnector"


def row(connector: str, case: int, images: int, ttft_ms: float) -> dict:
    return {
        "connector": connector, "case": case, "images": images, "completed": 4, "failed": 0,
        "mean_ttft_ms": ttft_ms, "median_ttft_ms": ttft_ms, "p99_ttft_ms": ttft_ms,
        "mean_tpot_ms": 1.0, "request_throughput": 1.0, PD_COUNTS[0]: 8, PD_COUNTS[1]: 1,
    }  # fmt: skip


def test_each_row_compares_with_the_baseline_of_its_own_case_and_counts_pd_pulls():
    text = table([
        row(OURS, 0, 2, 50.0), row(BASELINE, 0, 2, 100.0),
        row(OURS, 1, 2, 100.0), row(BASELINE, 1, 2, 100.0),
    ])  # fmt: skip
    ours = [line for line in text.splitlines() if line.startswith(f"| {OURS} ")]
    assert [line.split(" | ")[8] for line in ours] == ["2.00x", "1.00x"]
    assert all(line.endswith("| 8 (1) |") for line in ours)
    assert all(line.endswith("| - |") for line in text.splitlines() if BASELINE in line)
