"""Load a peer's NIXL metadata in a throwaway process before this one loads it.

UCX trusts the worker address inside agent metadata: one changed byte (the
address version) fails an assertion and aborts the process that loads it, and
the checksum beside the metadata proves only that it arrived as sent. So this
process loads only metadata that a short-lived helper process loaded and
survived; each distinct blob is probed once per process, and a blob that
killed its helper stays refused (a hostile peer cannot make us spawn a
process per pull). Metadata NIXL merely
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
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from ec_nixl.errors import DeadlineExceededError, HandshakeError

logger = logging.getLogger(__name__)

# A helper still loading after this long is stuck: its verdict is dropped and a
# later pull probes again.
PROBE_TIMEOUT_S = 30.0

_lock = threading.Lock()
_verdicts: dict[bytes, Future[None]] = {}  # by SHA-256 of the metadata: ends in None or an error


def probe(metadata: bytes, source: str, deadline: float) -> None:
    """Return once a helper process has loaded `metadata` and lived; HandshakeError
    if loading it killed the helper, DeadlineExceededError past `deadline`.

    The helper runs to its verdict whatever the caller's deadline: on a loaded
    host it can take longer than one pull's deadline, and the next pull from
    that exporter gets the verdict at once instead of starting over."""
    digest = hashlib.sha256(metadata).digest()
    with _lock:
        verdict = _verdicts.get(digest)
        if verdict is None:
            verdict = _verdicts[digest] = Future()
            threading.Thread(
                target=_judge, args=(metadata, source, digest, verdict), daemon=True
            ).start()
    try:
        verdict.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout as exc:
        raise DeadlineExceededError(
            f"probing the NIXL metadata from {source} was still running at the deadline "
            "(it goes on: a later pull gets its verdict)"
        ) from exc


def _judge(metadata: bytes, source: str, digest: bytes, verdict: Future[None]) -> None:
    from ec_nixl.transfer import nixl_api  # the helper loads the module this process uses

    try:
        done = subprocess.run(
            [sys.executable, "-m", __name__, nixl_api.__name__],
            input=metadata,
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        with _lock:
            del _verdicts[digest]
        verdict.set_exception(
            DeadlineExceededError(
                f"probing the NIXL metadata from {source} took over {PROBE_TIMEOUT_S:.0f} s"
            )
        )
        return
    if done.returncode < 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        error = HandshakeError(
            f"the NIXL metadata from {source} killed the process that loaded it "
            f"({signal.Signals(-done.returncode).name}: {said[-1][:200] if said else ''}); "
            "not loading it"
        )
        logger.error("%s", error)
        verdict.set_exception(error)
    else:
        verdict.set_result(None)


def _load_stdin(api_module: str) -> None:
    api = importlib.import_module(api_module)
    agent = api.nixl_agent(
        f"ec-nixl-probe-{os.getpid()}",
        api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]),
    )
    agent.add_remote_agent(sys.stdin.buffer.read())


if __name__ == "__main__":
    _load_stdin(sys.argv[1])
