"""The `ec-nixl` command."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from ec_nixl import events
from ec_nixl.proxy import app as proxy

# The benchmarks live with the test harness (`integration/`, installed from a
# checkout), which registers them here as entry points of this group: the
# package never imports the harness.
HARNESS_BENCHES = "ec_nixl.benches"


def build_parser(with_benches: bool = True) -> argparse.ArgumentParser:
    """The whole command; without `with_benches`, `bench` lists none (loading them
    loads torch and NIXL, which a proxy's host needs neither of)."""
    parser = argparse.ArgumentParser(
        prog="ec-nixl",
        description="Move vLLM encoder outputs between instances with NIXL; measure it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    _add(commands, "proxy", proxy, "the EPD proxy: each request to an encoder, then to a PD")
    _add(commands, "events", events, "an encoder's export events as JSON lines")
    bench = commands.add_parser("bench", help="benchmarks against baselines in the same run")
    benches = bench.add_subparsers(dest="bench", required=True)
    found = entry_points(group=HARNESS_BENCHES) if with_benches else ()
    for entry in sorted(found, key=lambda e: e.name):
        module = entry.load()
        summary = (module.__doc__ or "").strip().splitlines()[0]  # "`ec-nixl bench X`: what"
        _add(benches, entry.name, module, summary.split(": ", 1)[-1])
    return parser


def _add(commands, name: str, module, help_text: str) -> None:
    """A command whose module gives its description (docstring), flags and `run`."""
    command = commands.add_parser(
        name,
        help=help_text,
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(command)
    command.set_defaults(run=module.run)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(with_benches=command == "bench").parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
