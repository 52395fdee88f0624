"""python -m integration.compat: see integration/compat/__init__.py, or --help."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import integration.compat as compat
from integration import vllm_release
from integration.compat.source_tree import SourceTree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m integration.compat",
        description=compat.__doc__.split("\n\n")[0],
        epilog=(
            "Each release's sdist is fetched from PyPI by pinned URL and SHA-256 once, into "
            ".cache/ (see integration.vllm_release); nothing of vLLM is installed, built or "
            "imported. Checks: a. the classes we extend (abstract methods, signatures of our "
            "overrides, attributes we use); b. the vLLM names we import and our calls to them; "
            "c. the attributes we read from vLLM's objects; d. vLLM's item entries "
            "(collect_ec_item_metadata) through E's answer and PD's parser; e. who calls our "
            "hooks and with what (a table), and the V1/V2 model runners. Exit status 0 only if "
            "every check passes."
        ),
    )
    parser.add_argument(
        "--vllm",
        action="append",
        choices=list(vllm_release.RELEASES),
        metavar="VERSION",
        help=f"a pinned release to check ({', '.join(vllm_release.RELEASES)}); repeatable; "
        "default: all of them",
    )
    parser.add_argument(
        "--sources",
        type=Path,
        metavar="DIR",
        help="check a vLLM source tree instead (the folder that holds vllm/, e.g. a checkout)",
    )
    args = parser.parse_args(argv)
    if args.sources is not None and args.vllm:
        parser.error("--sources and --vllm are exclusive")
    ours = compat.our_tree()
    passed = True
    try:
        if args.sources is not None:
            trees = [SourceTree.from_directory(args.sources, "vllm", f"vLLM at {args.sources}")]
        else:
            trees = (compat.release_tree(version) for version in args.vllm or vllm_release.RELEASES)
        for index, tree in enumerate(trees):
            report = compat.check(tree, ours)
            print(("\n" if index else "") + report.render())
            passed = passed and report.passed
    except vllm_release.ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
