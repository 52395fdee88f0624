"""The `ec-nixl` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ec_nixl.bench import transfer

# (command, integration module, help): benchmarks that start vLLM instances
HARNESS_BENCHES = (
    (
        "ttft",
        "bench_ttft",
        "TTFT with ECNixlConnector vs ECExampleConnector vs one instance (needs vLLM)",
    ),
    (
        "pull",
        "bench_pull",
        "one pull inside vLLM (PD's view), at each PD tensor-parallel size (needs vLLM)",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ec-nixl",
        description="Move vLLM encoder outputs between instances with NIXL; measure it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmarks against baselines in the same run")
    benches = bench.add_subparsers(dest="bench", required=True)
    bench_transfer = benches.add_parser(
        "transfer",
        help="NIXL pull (announced, cold) vs safetensors via /tmp vs memcpy, two processes",
        description=transfer.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    transfer.add_arguments(bench_transfer)
    bench_transfer.set_defaults(run=transfer.run)
    for name, module, help_text in HARNESS_BENCHES:
        sub = benches.add_parser(
            name,
            help=help_text,
            description=_harness(module).__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _harness(module).add_arguments(sub)
        sub.set_defaults(run=lambda args, module=module: _harness(module).run(args))
    return parser


def _harness(module: str):
    """Benchmarks that drive vLLM live in the integration harness: imported on demand."""
    return importlib.import_module(f"integration.{module}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
