"""What each process loads: the PD scheduler's process coordinates, it never loads NIXL."""

import subprocess
import sys

SCHEDULER_SIDE = "import ec_nixl.connector, ec_nixl.scheduler, ec_nixl.coordinator, ec_nixl.watch"


def test_the_scheduler_side_of_the_connector_does_not_load_nixl():
    loaded = "sorted(m for m in sys.modules if m.startswith('nixl'))"
    probe = f"{SCHEDULER_SIDE}; import sys; print({loaded})"
    loaded = (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    assert loaded == "[]"
