"""The GPU path check runs the same code on the CPU here, and on CUDA where there is one."""

import json
import subprocess
import sys

import pytest
import torch


def run_check(device: str, tmp_path) -> dict:
    out = tmp_path / "check.json"
    result = subprocess.run(
        [sys.executable, "-m", "integration.gpu_pull_check", "--device", device,
         "--sizes", "1M,3M", "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "| 3 MiB |" in result.stdout
    return json.loads(out.read_text())


def test_the_check_pulls_between_cpu_arenas(tmp_path):
    document = run_check("cpu", tmp_path)
    assert [r["size_bytes"] for r in document["results"]] == [1 << 20, 3 << 20]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_check_pulls_between_cuda_arenas(tmp_path):
    assert run_check("cuda", tmp_path)["device"] != "CPU"
