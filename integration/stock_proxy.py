"""vLLM 0.32's example EPD proxy, fetched (not vendored) for the drop-in tests.

Users run vLLM's `examples/disaggregated/disaggregated_encoder/disagg_epd_proxy.py`
in front of E and PD; ECNixlConnector must work behind it unchanged. The file
ships only in vLLM's source distribution (the wheel has no examples), so it is
fetched from PyPI by pinned URL and SHA-256, once, into `.cache/`: 1640 lines
of Apache-2.0 code that are not ours to keep in step with vLLM.

    python -m integration.stock_proxy    # fetch it (`make test` does, first)
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

SDIST_URL = (
    "https://files.pythonhosted.org/packages/d5/df/"
    "5471312c76e335eaa2b8333e87ea39f0d37bfe24f10a582620e34ff12e33/vllm-0.32.0.tar.gz"
)
SDIST_SHA256 = "d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad"
MEMBER = "vllm-0.32.0/examples/disaggregated/disaggregated_encoder/disagg_epd_proxy.py"
PROXY_SHA256 = "59c842c5b127f9008c64cc770c450a2d4b9a9f63c7139603bb20a95b80845460"
CACHED = Path(__file__).resolve().parent.parent / ".cache" / "vllm-0.32.0-disagg_epd_proxy.py"
DOWNLOAD_TIMEOUT_S = 120


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(path: Path = CACHED) -> Path:
    """The proxy's source at `path`, downloaded (44 MB) and checked unless it is there."""
    if path.exists() and _sha256(path.read_bytes()) == PROXY_SHA256:
        return path
    print(f"fetching vLLM 0.32.0's example EPD proxy from {SDIST_URL} ...", file=sys.stderr)
    with (
        urllib.request.urlopen(SDIST_URL, timeout=DOWNLOAD_TIMEOUT_S) as reply,
        tempfile.TemporaryFile() as sdist,
    ):
        digest = hashlib.sha256()
        while chunk := reply.read(1 << 20):
            digest.update(chunk)
            sdist.write(chunk)
        if digest.hexdigest() != SDIST_SHA256:
            raise RuntimeError(f"{SDIST_URL} does not have the pinned SHA-256 {SDIST_SHA256}")
        sdist.seek(0)
        with tarfile.open(fileobj=sdist, mode="r:gz") as archive:
            member = archive.extractfile(MEMBER)
            if member is None:
                raise RuntimeError(f"{MEMBER} is not a file in {SDIST_URL}")
            source = member.read()
    if _sha256(source) != PROXY_SHA256:
        raise RuntimeError(f"{MEMBER} does not have the pinned SHA-256 {PROXY_SHA256}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(source)
    os.replace(partial, path)
    return path


if __name__ == "__main__":
    print(fetch())
