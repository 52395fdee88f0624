"""What each process loads: the PD scheduler's process coordinates, it never loads NIXL;
the proxy and the events command load neither NIXL nor torch; and what ships: the
package never imports the test harness."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ec_nixl"

SCHEDULER_SIDE = (
    "import ec_nixl.connector, ec_nixl.consumer.scheduler, ec_nixl.consumer.items, "
    "ec_nixl.consumer.resolver, ec_nixl.producer.scheduler"
)


def test_the_scheduler_side_of_the_connector_does_not_load_nixl():
    loaded = "sorted(m for m in sys.modules if m.startswith('nixl'))"
    probe = f"{SCHEDULER_SIDE}; import sys; print({loaded})"
    loaded = (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    assert loaded == "[]"


@pytest.mark.parametrize("command", ["proxy", "events"])
def test_the_proxy_and_events_commands_load_neither_torch_nor_nixl(command):
    probe = (
        "import sys\nfrom ec_nixl import cli\n"
        f"try:\n    cli.main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'nixl', 'nixl_cu12', 'nixl_cu13', 'vllm'}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_imports_nothing_from_the_test_harness():
    harness = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            harness += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "integration"]
    assert harness == []
