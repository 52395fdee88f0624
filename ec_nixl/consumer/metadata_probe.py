"""Load a peer's NIXL metadata in a throwaway process before this one loads it.

UCX trusts the worker address inside agent metadata: one changed byte (the
address version) fails an assertion and aborts the process that loads it, and
the checksum beside the metadata proves only that it arrived as sent. So this
process loads only metadata that a short-lived helper process loaded and
survived; each distinct blob is probed once per process, and a blob that
killed its helper stays refused (a hostile peer cannot make us spawn a
process per pull: helpers at once, verdicts kept and distinct blobs per
exporter are bounded). Metadata NIXL merely refuses (an exception, not a
crash) is refused here too, without loading it: NIXL may keep the agent name
of metadata it refused half-way, and then refuse that peer's genuine metadata.

The helper is `python -m ec_nixl.consumer.metadata_probe NIXL_API_MODULE`, metadata on
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
from collections import OrderedDict, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from ec_nixl.errors import DeadlineExceededError, HandshakeError

logger = logging.getLogger(__name__)

# A helper still loading after this long is stuck: its verdict is dropped and a
# later pull probes again.
PROBE_TIMEOUT_S = 30.0
# Helpers at once: each is a Python process (~0.7 s of a core here).
MAX_HELPERS = 2
# Verdicts kept: a verdict is per blob, and an exporter sends a new blob per process.
MAX_VERDICTS = 64
# Distinct blobs one exporter may have probed per window: a restart brings one;
# an exporter that sends a new one per handshake must not get a helper per pull.
MAX_BLOBS_PER_SOURCE = 4
SOURCE_WINDOW_S = 60.0
REFUSED_EXIT = 3  # the helper's exit status when NIXL refuses the metadata

_lock = threading.Lock()
_helpers = threading.BoundedSemaphore(MAX_HELPERS)
# by SHA-256 of the metadata, oldest first: ends in None or an error
_verdicts: OrderedDict[bytes, Future[None]] = OrderedDict()
_recent: dict[str, deque[tuple[float, bytes]]] = {}  # source -> (when, digest) probed


def probe(metadata: bytes, source: str, deadline: float) -> None:
    """Return once a helper process has loaded `metadata` and lived; HandshakeError
    if NIXL refused it there or loading it killed the helper, or if `source` sent
    too many distinct blobs of late; DeadlineExceededError past `deadline`.

    The helper runs to its verdict whatever the caller's deadline: on a loaded
    host it can take longer than one pull's deadline, and the next pull from
    that exporter gets the verdict at once instead of starting over."""
    digest = hashlib.sha256(metadata).digest()
    with _lock:
        verdict = _verdicts.get(digest)
        if verdict is None:
            _admit_locked(source, digest)
            verdict = _verdicts[digest] = Future()
            _bound_locked()
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


def _admit_locked(source: str, digest: bytes) -> None:
    now = time.monotonic()
    recent = _recent.setdefault(source, deque())
    while recent and recent[0][0] < now - SOURCE_WINDOW_S:
        recent.popleft()
    if len(recent) >= MAX_BLOBS_PER_SOURCE:
        raise HandshakeError(
            f"{source} sent {len(recent) + 1} different NIXL metadata within "
            f"{SOURCE_WINDOW_S:.0f} s; not probing more of them until that passes"
        )
    recent.append((now, digest))


def _bound_locked() -> None:
    """Forget the oldest settled verdicts past MAX_VERDICTS (a forgotten blob is
    probed again if it comes back)."""
    settled = [digest for digest, verdict in _verdicts.items() if verdict.done()]
    for digest in settled[: max(0, len(_verdicts) - MAX_VERDICTS)]:
        del _verdicts[digest]


def _judge(metadata: bytes, source: str, digest: bytes, verdict: Future[None]) -> None:
    from ec_nixl.nixl_agent import nixl_api  # the helper loads the module this process uses

    started = time.monotonic()
    try:
        with _helpers:
            done = subprocess.run(
                [sys.executable, "-m", __name__, nixl_api.__name__],
                input=metadata,
                capture_output=True,
                timeout=PROBE_TIMEOUT_S,
            )
    except subprocess.TimeoutExpired:
        with _lock:
            _verdicts.pop(digest, None)
        verdict.set_exception(
            DeadlineExceededError(
                f"probing the NIXL metadata from {source} took over {PROBE_TIMEOUT_S:.0f} s"
            )
        )
        return
    said = done.stderr.decode(errors="replace").strip().splitlines()
    last = said[-1][:200] if said else ""
    if done.returncode < 0:
        error = HandshakeError(
            f"the NIXL metadata from {source} killed the process that loaded it "
            f"({signal.Signals(-done.returncode).name}: {last}); not loading it"
        )
        logger.error("%s", error)
        verdict.set_exception(error)
    elif done.returncode == REFUSED_EXIT:
        # Loading refused metadata here could leave its agent name unusable in
        # this process, also for that peer's genuine metadata.
        verdict.set_exception(
            HandshakeError(f"peer metadata from {source} rejected by NIXL: {last}")
        )
    else:
        logger.info(
            "NIXL metadata from %s loaded safely in a helper process (%.1f s)",
            source,
            time.monotonic() - started,
        )
        verdict.set_result(None)


def _load_stdin(api_module: str) -> None:
    """Exit 0 if the metadata loads (or names a peer UCX cannot reach: that is for the
    caller's process to say), REFUSED_EXIT with NIXL's refusal if NIXL refuses it."""
    api = importlib.import_module(api_module)
    errors = importlib.import_module(f"{api_module.rpartition('.')[0]}._bindings")
    agent = api.nixl_agent(
        f"ec-nixl-probe-{os.getpid()}",
        api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]),
    )
    refusals = (
        errors.nixlMismatchError,
        errors.nixlNotAllowedError,
        errors.nixlInvalidParamError,
        errors.nixlNotFoundError,
    )
    try:
        agent.add_remote_agent(sys.stdin.buffer.read())
    except refusals as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(REFUSED_EXIT)
    except errors.nixlBackendError:
        pass


if __name__ == "__main__":
    _load_stdin(sys.argv[1])
