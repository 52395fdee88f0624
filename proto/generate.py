"""Generate ec_nixl/v1 stubs from proto/ with grpcio-tools, or check they are current.

python proto/generate.py          # rewrite the stubs
python proto/generate.py --check  # exit 1 if the committed stubs differ
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTOS = sorted(p.relative_to(PROTO_DIR) for p in PROTO_DIR.rglob("*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Write stubs under `out` (mirroring the proto package path); return their paths."""
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
    ]
    if protoc.main(args + [str(PROTO_DIR / p) for p in PROTOS]) != 0:
        raise SystemExit("protoc failed")
    return [p.with_suffix("").with_name(p.stem + s) for p in PROTOS for s in SUFFIXES]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    if not parser.parse_args().check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [
            str(p)
            for p in generate(Path(tmp))
            if not filecmp.cmp(Path(tmp) / p, ROOT / p, shallow=False)
        ]
    if stale:
        print(
            "generated stubs differ from proto/; run python proto/generate.py:", *stale, sep="\n  "
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
