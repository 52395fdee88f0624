"""The PD scheduler's side of a pull: order every worker to pull, track the outcome.

vLLM's scheduler must never block, so each pull runs as a job on a small thread
pool and the scheduler only looks at its state. Every worker (tensor-parallel
rank) needs the whole embedding, so each pulls it under a lease of its own. A
job fails as a whole: workers that did pull drop the item. The scheduler only
meets encoders itself (a handshake each) to report a model mismatch early.

A job starts in one of three ways: a request names where its item is
(`start`); a request says its item is still being encoded (`expect`: the pull
starts when an encoder announces the item, and the wait has the pull's
deadline); or, with prefetch, an encoder announced an item no request asked
for yet (`prefetch`).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

from ec_nixl.errors import DeadlineExceededError, ECNixlError, HandshakeError, RefusedError
from ec_nixl.metrics import Stats
from ec_nixl.receiver import WorkerClient
from ec_nixl.resolver import Resolver

logger = logging.getLogger(__name__)

# Each job mostly waits on the network; a stalled encoder holds one for its whole deadline.
MAX_CONCURRENT_PULLS = 16
# A prefetched item whose request has not come by then is not coming to this instance.
PREFETCH_TTL_S = 30.0


class PullState(Enum):
    RUNNING = "running"
    READY = "ready"  # held by every worker, waiting to be loaded
    FAILED = "failed"


@dataclass
class PullJob:
    mm_hash: str
    encoder_id: str | None  # None: waiting for an encoder to announce the item
    num_embeds: int  # the rows the model expects (0: a prefetch, no request yet)
    started_at: float = field(default_factory=time.monotonic)
    # When a request first asked for the item: a prefetch is claimed later, or never.
    claimed_at: float | None = None
    expected: bool = False  # asked for before any encoder announced it
    future: Future | None = None
    error: ECNixlError | None = None
    rows: int = 0  # what was pulled
    ready_at: float | None = None

    @property
    def state(self) -> PullState:
        if self.error is not None:
            return PullState.FAILED
        if self.future is None or not self.future.done():
            return PullState.RUNNING
        return PullState.READY

    @property
    def awaiting(self) -> bool:
        return self.encoder_id is None and self.error is None


class PullCoordinator:
    def __init__(
        self,
        resolver: Resolver,
        encoders: dict[str, str],
        workers: list[WorkerClient],
        timeout_s: float,
        stats: Stats | None = None,
    ) -> None:
        self.stats = stats or Stats()
        self._resolver = resolver
        self._encoders = encoders
        self._workers = workers
        self._timeout_s = timeout_s
        self._lock = threading.Lock()  # jobs: the scheduler's thread and prefetch watchers
        self._jobs: dict[str, PullJob] = {}
        self._pool = ThreadPoolExecutor(MAX_CONCURRENT_PULLS, thread_name_prefix="ec-nixl-pull")
        self._met: set[str] = set()
        self._incompatible: set[str] = set()
        self._exported: dict[str, str] = {}  # mm_hash -> the encoder that announced it
        self._landed = threading.Event()  # a pull ended: a request waiting for it may go on

    def start(self, mm_hash: str, encoder_id: str, num_embeds: int) -> PullJob:
        """Start pulling `mm_hash` from `encoder_id` for a request, unless a job for it
        exists; a prefetched item is claimed (and its rows checked once pulled)."""
        with self._lock:
            job = self._jobs.get(mm_hash)
            if job is None:
                job = self._jobs[mm_hash] = PullJob(mm_hash, None, num_embeds)
            if job.awaiting:
                self._submit_locked(job, encoder_id)
        return self._claim(job, num_embeds)

    def expect(self, mm_hash: str, num_embeds: int) -> PullJob:
        """Pull `mm_hash` for a request once an encoder announces it (at once if one has);
        the request fails over to local encoding if none has by the pull deadline."""
        with self._lock:
            job = self._jobs.get(mm_hash)
            if job is None:
                job = self._jobs[mm_hash] = PullJob(mm_hash, None, num_embeds, expected=True)
                if mm_hash in self._exported:
                    self._submit_locked(job, self._exported[mm_hash])
        if job.awaiting and time.monotonic() - job.started_at > self._timeout_s:
            self.stats.count("pull_failures", label=DeadlineExceededError.__name__)
            self._fail(job, DeadlineExceededError(
                f"{mm_hash}: no encoder announced it within {self._timeout_s:.1f} s"
            ))  # fmt: skip
        return self._claim(job, num_embeds)

    def announced(self, mm_hash: str, encoder_id: str, *, prefetch: bool) -> None:
        """An encoder exported `mm_hash`: pull it for a request expecting it, or, with
        `prefetch`, for the request that will come."""
        with self._lock:
            self._exported[mm_hash] = encoder_id
            job = self._jobs.get(mm_hash)
            if job is not None and job.awaiting:
                self._submit_locked(job, encoder_id)
                return
        if prefetch and job is None:
            self.prefetch(mm_hash, encoder_id)

    def evicted(self, mm_hash: str, encoder_id: str) -> None:
        with self._lock:
            if self._exported.get(mm_hash) == encoder_id:
                del self._exported[mm_hash]

    def _submit_locked(self, job: PullJob, encoder_id: str) -> None:
        job.encoder_id = encoder_id
        job.started_at = time.monotonic()
        job.future = self._pool.submit(self._run, job)
        job.future.add_done_callback(lambda _: self._landed.set())  # once `state` tells

    def park(self, timeout_s: float) -> None:
        """Block until a pull that a request waits for ends, or `timeout_s`; at once if no
        request waits for one."""
        with self._lock:
            waiting = any(
                job.claimed_at is not None and job.state is PullState.RUNNING
                for job in self._jobs.values()
            )
        if waiting:
            self._landed.wait(timeout_s)
        self._landed.clear()

    def _claim(self, job: PullJob, num_embeds: int) -> PullJob:
        with self._lock:
            claiming = job.claimed_at is None
            if claiming:
                job.claimed_at = time.monotonic()
                job.num_embeds = num_embeds
        if claiming and job.state is PullState.READY:
            if job.rows == num_embeds:
                self.stats.count("prefetch_hits")
            else:
                self.stats.count("pull_failures", label=RefusedError.__name__)
                self._fail(job, RefusedError(
                    f"{job.mm_hash}: the encoder sent {job.rows} rows, "
                    f"the request needs {num_embeds}"
                ))  # fmt: skip
        return job

    def prefetch(self, mm_hash: str, encoder_id: str) -> None:
        """Pull an item no request has asked for yet; unclaimed ones are dropped after
        PREFETCH_TTL_S (checked whenever another is prefetched)."""
        now = time.monotonic()
        with self._lock:  # stale ones leave under the lock: no request can claim them after
            stale = [
                job
                for job in self._jobs.values()
                if job.claimed_at is None and now - job.started_at > PREFETCH_TTL_S
            ]
            for job in stale:
                del self._jobs[job.mm_hash]
            if mm_hash not in self._jobs:
                job = self._jobs[mm_hash] = PullJob(mm_hash, None, num_embeds=0)
                self._submit_locked(job, encoder_id)
        for job in stale:
            self._drop_when_done(job)

    def meet(self, encoder_id: str) -> None:
        """Handshake with an encoder once, in the background, to catch a mismatch early:
        an encoder serving another model string shares no mm_hash with us, so no
        pull would ever reach it and tell."""
        if encoder_id not in self._met:
            self._met.add(encoder_id)
            self._pool.submit(self._meet, encoder_id)

    def _meet(self, encoder_id: str) -> None:
        try:
            self._resolver.peer(self._encoders[encoder_id])
        except HandshakeError as exc:
            self._report_incompatible(encoder_id, exc)
        except ECNixlError as exc:
            self._met.discard(encoder_id)  # unreachable for now: try again later
            logger.warning("cannot reach encoder %s: %s", encoder_id, exc)

    def job(self, mm_hash: str) -> PullJob | None:
        with self._lock:
            return self._jobs.get(mm_hash)

    def forget(self, mm_hash: str, *, drop: bool) -> None:
        """Stop tracking an item; with `drop`, workers free it if they hold it."""
        with self._lock:
            job = self._jobs.pop(mm_hash, None)
        if job is not None and drop:
            self._drop_when_done(job)

    def _drop_when_done(self, job: PullJob) -> None:
        if job.future is not None:
            job.future.add_done_callback(lambda _: self._drop(job.mm_hash))

    def _drop(self, mm_hash: str) -> None:
        for worker in self._workers:
            worker.drop([mm_hash])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for worker in self._workers:
            worker.close()

    def _run(self, job: PullJob) -> None:
        deadline = job.started_at + self._timeout_s
        try:
            reports = [
                worker.pull(job.encoder_id, [job.mm_hash], [job.num_embeds], deadline)
                for worker in self._workers
            ]
            job.rows = reports[0].rows[0]
            job.ready_at = time.monotonic()
        except Exception as exc:  # a thread boundary: whatever fails here fails this pull only
            if not isinstance(exc, ECNixlError):
                logger.exception("pull of %s failed unexpectedly", job.mm_hash)
                exc = ECNixlError(f"unexpected {type(exc).__name__}: {exc}")
            self.stats.count("pull_failures", label=type(exc).__name__)
            self._fail(job, exc)
            return
        elapsed = time.monotonic() - job.started_at
        self.stats.count("items_pulled")
        self.stats.count("bytes_pulled", reports[0].bytes)
        self.stats.observe("pull_seconds", elapsed)
        for report in reports:
            self.stats.observe("resolve_seconds", report.resolve_s)
        logger.info(
            "pulled %s from %s in %.1f ms (worker 0: resolve %.1f ms, read %.1f ms)",
            job.mm_hash, job.encoder_id, elapsed * 1000,
            reports[0].resolve_s * 1000, reports[0].read_s * 1000,
        )  # fmt: skip

    def _report_incompatible(self, encoder_id: str, exc: HandshakeError) -> None:
        if encoder_id not in self._incompatible:
            self._incompatible.add(encoder_id)
            logger.error(
                "encoder %s cannot serve this instance: %s. Start the encoder and this "
                "instance with the same --model string (it is part of every mm_hash): "
                "until then every item is encoded locally.",
                encoder_id, exc,
            )  # fmt: skip

    def _fail(self, job: PullJob, exc: ECNixlError) -> None:
        if job.future is not None:  # some workers may hold it
            self._drop(job.mm_hash)
        with self._lock:  # a failed prefetch is forgotten: a request will try afresh
            prefetch = job.claimed_at is None and self._jobs.get(job.mm_hash) is job
            if prefetch:
                del self._jobs[job.mm_hash]
            job.error = exc
        source = job.encoder_id or "any encoder"
        if isinstance(exc, HandshakeError):
            self._report_incompatible(source, exc)
        elif prefetch:
            logger.info("prefetch of %s from %s failed: %s", job.mm_hash, source, exc)
        else:
            logger.warning("pull of %s from %s failed: %s", job.mm_hash, source, exc)
