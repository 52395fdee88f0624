"""The `ec-nixl` command."""

from __future__ import annotations

import argparse
import logging
import sys

from ec_nixl.bench import transfer


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
    bench_ttft = benches.add_parser(
        "ttft",
        help="TTFT with ECNixlConnector vs ECExampleConnector vs one instance (needs vLLM)",
        description=_ttft_module().__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _ttft_module().add_arguments(bench_ttft)
    bench_ttft.set_defaults(run=lambda args: _ttft_module().run(args))
    return parser


def _ttft_module():
    """The TTFT benchmark drives vLLM through the integration harness: import it on demand."""
    from integration import bench_ttft

    return bench_ttft


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
