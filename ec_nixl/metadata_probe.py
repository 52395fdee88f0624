"""Load a peer's NIXL metadata in a throwaway process before this one loads it.

UCX trusts the worker address inside agent metadata: one changed byte (the
address version) fails an assertion and aborts the process that loads it, and
the checksum beside the metadata proves only that it arrived as sent. So this
process loads only metadata that a short-lived helper process loaded and
survived; each distinct blob is probed once per process. Metadata NIXL merely
refuses (an exception, not a crash) passes the probe: loading it here raises
the same refusal, typed.

The helper is `python -m ec_nixl.metadata_probe NIXL_API_MODULE`, metadata on
stdin. It imports NIXL's backend module itself (e.g. `nixl_cu12._api`): the `nixl`
meta package picks one by importing torch, which would make each probe ~3 s
instead of ~0.7 s here.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import signal
import subprocess
import sys
import threading
import time

from ec_nixl.errors import DeadlineExceededError, HandshakeError

_lock = threading.Lock()
_survived: set[bytes] = set()  # SHA-256 of metadata a helper loaded and lived


def probe(metadata: bytes, source: str, deadline: float) -> None:
    """Return once a helper process has tried to load `metadata` and lived; HandshakeError
    if loading it killed the helper, DeadlineExceededError past `deadline`."""
    digest = hashlib.sha256(metadata).digest()
    with _lock:
        if digest in _survived:
            return
    from nixl import _api  # the backend module this process uses: the helper loads it alike

    try:
        done = subprocess.run(
            [sys.executable, "-m", __name__, _api.__name__],
            input=metadata,
            capture_output=True,
            timeout=max(0.001, deadline - time.monotonic()),
        )
    except subprocess.TimeoutExpired as exc:
        raise DeadlineExceededError(
            f"probing the NIXL metadata from {source} was still running at the deadline"
        ) from exc
    if done.returncode < 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise HandshakeError(
            f"the NIXL metadata from {source} killed the process that loaded it "
            f"({signal.Signals(-done.returncode).name}: {said[-1][:200] if said else ''}); "
            "not loading it"
        )
    with _lock:
        _survived.add(digest)


def _load_stdin(api_module: str) -> None:
    api = importlib.import_module(api_module)
    agent = api.nixl_agent(
        f"ec-nixl-probe-{os.getpid()}",
        api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]),
    )
    agent.add_remote_agent(sys.stdin.buffer.read())


if __name__ == "__main__":
    _load_stdin(sys.argv[1])
