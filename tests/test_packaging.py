"""What a GPU host installs: the ec-nixl wheel, built here and read back."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ec_nixl.versions import SUPPORTED_VLLM, vllm_supported, warn_if_unsupported

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """Built from a copy of what the sdist holds, so the build leaves nothing here."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(
        ROOT / "ec_nixl", source / "ec_nixl", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(source)],
        check=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("ec_nixl-*.whl")
    return zipfile.ZipFile(built)


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def _requirements(wheel: zipfile.ZipFile) -> list[Requirement]:
    metadata = Parser().parsestr(_dist_info(wheel, "METADATA"))
    return [Requirement(line) for line in metadata.get_all("Requires-Dist")]


def test_the_wheel_installs_only_the_ec_nixl_package(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist() if ".dist-info/" not in name}
    assert tops == {"ec_nixl"}
    assert "ec_nixl.benches" not in _dist_info(wheel, "entry_points.txt")  # the harness's


def test_the_wheel_pins_no_torch_and_takes_nixl_by_cuda_extra(wheel):
    core = {r.name: r for r in _requirements(wheel) if r.marker is None}
    assert "torch" in core and not any(s.operator == "==" for s in core["torch"].specifier)
    assert not any(name.startswith("nixl") for name in core)
    by_extra = {
        extra: {
            r.name for r in _requirements(wheel) if r.marker and r.marker.evaluate({"extra": extra})
        }
        for extra in ("cu12", "cu13")
    }
    assert by_extra == {"cu12": {"nixl-cu12"}, "cu13": {"nixl-cu13"}}


def test_the_wheel_declares_the_vllm_range_the_plugin_checks(wheel):
    (vllm,) = [r for r in _requirements(wheel) if r.name == "vllm"]
    assert vllm.marker.evaluate({"extra": "vllm"})
    assert vllm.specifier == SUPPORTED_VLLM


def test_vllms_plugin_entry_point_and_the_command_are_declared(wheel):
    entry_points = _dist_info(wheel, "entry_points.txt")
    assert "ec_nixl = ec_nixl.plugin:register" in entry_points
    assert "ec-nixl = ec_nixl.cli:main" in entry_points


@pytest.mark.parametrize(
    ("version", "supported"),
    [("0.32.0", True), ("0.33.0", True), ("0.34.1.dev3+gabc", True), ("0.31.2", False),
     ("0.35.0", False), ("0.35.0rc1", False), ("not-a-version", False)],
)  # fmt: skip
def test_a_vllm_outside_the_range_is_named_in_a_warning(version, supported, caplog):
    assert vllm_supported(version) is supported
    assert warn_if_unsupported(version) is supported
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (f"this is vLLM {version}" in " ".join(warned)) is not supported
