"""vLLM's releases as their source distributions: the one place their pins live.

The compatibility check (`integration.compat`) reads a release's Python sources
and the drop-in tests run its example EPD proxy (`integration.stock_proxy`); both
come from the release's sdist on PyPI, which is fetched once by pinned URL into
`.cache/`, checked against its pinned SHA-256 (before it lands there, and each
time it is read), and read member by member, never extracted or installed.

    python -m integration.vllm_release             # fetch every release's sdist
    python -m integration.vllm_release 0.34.0      # fetch one
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent / ".cache"
DOWNLOAD_TIMEOUT_S = 300  # the whole download; a stalled socket gives up after SOCKET_TIMEOUT_S
SOCKET_TIMEOUT_S = 60
CHUNK = 1 << 20


@dataclass(frozen=True)
class Release:
    version: str
    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"vllm-{self.version}.tar.gz"

    @property
    def top(self) -> str:
        """The folder every member of the sdist sits in."""
        return f"vllm-{self.version}/"


_PYPI = "https://files.pythonhosted.org/packages"
RELEASES: dict[str, Release] = {
    release.version: release
    for release in (
        Release(
            "0.32.0",
            f"{_PYPI}/d5/df/5471312c76e335eaa2b8333e87ea39f0d37bfe24f10a582620e34ff12e33/"
            "vllm-0.32.0.tar.gz",
            "d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad",
        ),
        Release(
            "0.33.0",
            f"{_PYPI}/f7/25/aa5684e9c59d6fc75f78926b7f15e8d9adc7de2d9e6e7575b80776ad8169/"
            "vllm-0.33.0.tar.gz",
            "f4c33c2503d52bb411146afa9618a4f48bed68912f617e6803ac8d76e4c74112",
        ),
        Release(
            "0.34.0",
            f"{_PYPI}/92/21/6e0b077dc4a0b28f5a8ce8bb352a38d7196650d681fd4faa87f8dc622eff/"
            "vllm-0.34.0.tar.gz",
            "fcad848b246a9d8652b47e6425af92334dc02492f9802720f54e27b823cf0113",
        ),
    )
}


class ReleaseError(RuntimeError):
    """A release that is not pinned here, a download that failed or does not match its
    pin, or a member the sdist does not have."""


def release(version: str) -> Release:
    try:
        return RELEASES[version]
    except KeyError:
        known = ", ".join(RELEASES)
        raise ReleaseError(
            f"vLLM {version} is not pinned in integration/vllm_release.py (known: {known})"
        ) from None


def sdist(version: str, cache: Path = CACHE) -> Path:
    """The release's sdist in `cache`, fetched unless a copy with the pinned SHA-256 is there."""
    pinned = release(version)
    path = cache / pinned.filename
    if path.exists():
        if _file_sha256(path) == pinned.sha256:
            return path
        print(f"{path} does not have the pinned SHA-256; fetching it again", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    _download(pinned, path)
    return path


def read_members(
    version: str, wanted: Callable[[str], bool], cache: Path = CACHE
) -> dict[str, bytes]:
    """The sdist's regular files whose path below its top folder (e.g.
    `vllm/config/model.py`) passes `wanted`, in one pass over the archive."""
    pinned = release(version)
    found: dict[str, bytes] = {}
    with tarfile.open(sdist(version, cache), mode="r:gz") as archive:
        for member in archive:
            name = member.name.removeprefix(pinned.top)
            if member.isfile() and name != member.name and wanted(name):
                reader = archive.extractfile(member)
                assert reader is not None  # a regular file
                found[name] = reader.read()
    return found


def read_member(version: str, path: str, cache: Path = CACHE) -> bytes:
    """One file of the sdist, by its path below the top folder."""
    found = read_members(version, lambda name: name == path, cache)
    if path not in found:
        raise ReleaseError(f"{release(version).filename} has no file {path}")
    return found[path]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download(pinned: Release, path: Path) -> None:
    """Into a temporary file beside `path`, renamed onto it only once its SHA-256 matches."""
    start = time.monotonic()
    progress = _Progress(pinned)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(pinned.url, timeout=SOCKET_TIMEOUT_S) as reply,
        ):
            total = int(reply.headers.get("Content-Length") or 0)
            digest = hashlib.sha256()
            done = 0
            while chunk := reply.read(CHUNK):
                if time.monotonic() - start > DOWNLOAD_TIMEOUT_S:
                    raise ReleaseError(
                        f"{pinned.url}: not downloaded within {DOWNLOAD_TIMEOUT_S} s "
                        f"({done >> 20} MiB so far)"
                    )
                digest.update(chunk)
                out.write(chunk)
                done += len(chunk)
                progress.show(done, total)
        progress.end(f"{done >> 20} MiB in {time.monotonic() - start:.1f} s")
        got = digest.hexdigest()
        if got != pinned.sha256:
            raise ReleaseError(
                f"{pinned.url} has SHA-256 {got}, not the pinned {pinned.sha256}: nothing was kept"
            )
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    except (OSError, http.client.HTTPException) as exc:  # urllib's errors and timeouts
        raise ReleaseError(f"{pinned.url}: {exc}") from exc
    finally:
        progress.end("failed")  # unless it ended
        if os.path.exists(partial):
            os.unlink(partial)


class _Progress:
    """One line on stderr per download: rewritten in place on a terminal."""

    def __init__(self, pinned: Release) -> None:
        self._live = sys.stderr.isatty()
        self._line = f"fetching {pinned.filename} from {pinned.url.split('/')[2]}:"
        self._shown = -1
        self._ended = False
        sys.stderr.write(self._line + ("" if self._live else "\n"))
        sys.stderr.flush()

    def show(self, done: int, total: int) -> None:
        percent = done * 100 // total if total else done >> 20
        if self._live and percent != self._shown:
            self._shown = percent
            sys.stderr.write(f"\r{self._line} {done >> 20} / {total >> 20} MiB")
            sys.stderr.flush()

    def end(self, outcome: str) -> None:
        if not self._ended:
            self._ended = True
            erase = "\r\033[K" if self._live else ""
            sys.stderr.write(f"{erase}{self._line} {outcome}\n")
            sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m integration.vllm_release",
        description=(
            "Fetch vLLM releases' source distributions from PyPI into .cache/, each checked "
            "against its pinned SHA-256 (kept only if it matches). A copy already there is "
            "checked and kept."
        ),
    )
    parser.add_argument(
        "versions", nargs="*", metavar="VERSION", help=f"default: all of {', '.join(RELEASES)}"
    )
    args = parser.parse_args(argv)
    try:
        for version in args.versions or RELEASES:
            print(sdist(version))
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
