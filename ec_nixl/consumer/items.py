"""The PD scheduler's items: one table of what is known of each, and the pulls.

Each item's entry says which encoder holds it or is encoding it (from their
events), our pull of it, and whether vLLM's encoder cache has it; it changes
only here, from announcements, pull results and vLLM's allocations and
evictions, under one lock, and goes once nothing of it is left.

vLLM's scheduler thread never waits on the network: each pull runs as a job on
a small thread pool (its network work is `pull_runner`'s), and so do drops,
give-backs and meetings; the scheduler thread only looks at a job's state. Its
one wait is `park`, on a step with nothing to run (`ConsumerScheduler.idle_step`
says why).

Each job is one pull with an id of its own, and it changes only by the
transitions of `pull_state`. It ends one way, `_end_locked`: FAILED (it fails
as a whole: its requests fall back, the lease goes back) or DROPPED (no request
relies on it: the last one ended, or an unasked prefetch went stale or made
room), and the workers then drop that pull's copies, once. Every order that
removes a copy (drop, load, free) names the pull: a job that ends late (its
request aborted while it ran, the same image asked for again at once) frees
only its own copy, never the one a newer job read.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ec_nixl.config import DEFAULT_RECEIVE_BYTES
from ec_nixl.consumer.pull_runner import PullRunner
from ec_nixl.consumer.pull_state import HOLDING, WAITING, PullJob, PullState
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.consumer.worker_link import Load, WorkerClient
from ec_nixl.control.messages import Announcement
from ec_nixl.errors import DeadlineExceededError, ECNixlError, HandshakeError, RefusedError
from ec_nixl.metrics import Stats

logger = logging.getLogger(__name__)

# Each job mostly waits on the network; a stalled encoder holds one for its whole deadline.
MAX_CONCURRENT_PULLS = 16
# A prefetched item whose request has not come by then is not coming to this instance.
PREFETCH_TTL_S = 30.0
# How long a request that came before its item's claim (the encoder said it announces the
# item to this PD with one) waits for that announcement before the pull resolves instead:
# the announcement left the encoder before its answer did, but may be held up on a busy host.
CLAIM_WAIT_S = 0.5


@dataclass
class Item:
    """What PD's scheduler knows of one item."""

    holder: str | None = None  # the encoder that announced it, until it evicts it
    encoding: tuple[str, float] | None = None  # (the encoder encoding it, since when)
    job: PullJob | None = None  # our pull of it
    resident: bool = False  # in vLLM's encoder cache: never pulled again
    lent: int | None = None  # the pull whose copy vLLM's encoder cache holds (if loaded)

    @property
    def empty(self) -> bool:
        return not (self.holder or self.encoding or self.job or self.resident)


class ItemTable:
    def __init__(
        self,
        resolver: Resolver,
        encoders: dict[str, str],
        workers: list[WorkerClient],
        timeout_s: float,
        stats: Stats | None = None,
        receive_bytes: int = DEFAULT_RECEIVE_BYTES,
    ) -> None:
        self.stats = stats or Stats()
        # Prefetches no request asked for may fill at most this much of each worker's receive arena:
        # the rest stays for the pulls of requests that are here.
        self._prefetch_bytes = receive_bytes // 2
        self._runner = PullRunner(resolver, encoders, workers, self.stats)
        self._timeout_s = timeout_s
        # The table: vLLM's scheduler thread, event watchers and pulls all change it.
        self._lock = threading.Lock()
        self._items: dict[str, Item] = {}
        self._pool = ThreadPoolExecutor(MAX_CONCURRENT_PULLS, thread_name_prefix="ec-nixl-pull")
        self._met: set[str] = set()
        self._incompatible: set[str] = set()
        self._landed = threading.Event()  # a pull ended: a request waiting for it may go on
        self._closing = threading.Event()

    @property
    def consumer_id(self) -> str:
        return self._runner.resolver.consumer_id

    def start(
        self, mm_hash: str, encoder_id: str, num_embeds: int, request_id: str, claimed: bool
    ) -> PullJob:
        """Start pulling `mm_hash` from `encoder_id` for a request, unless a job for it
        exists; a prefetched item is adopted (and its rows checked once pulled). With
        `claimed` (the encoder announces the item to this PD with a claim), the pull waits
        up to CLAIM_WAIT_S for that announcement (`announced` starts it), then resolves;
        not if the item was announced already (its claim, if any, was not ours to keep)."""
        with self._lock:
            item = self._item(mm_hash)
            job = item.job = item.job or PullJob(mm_hash, None, num_embeds)
            pulled = self._add_user_locked(job, num_embeds, request_id)  # before it can fail
            waiting = (
                claimed and item.holder is None and time.monotonic() - job.started_at < CLAIM_WAIT_S
            )
            if job.awaiting and not waiting:
                self._submit_locked(job, encoder_id)
        if pulled and self._rows_fit(job):
            self.stats.count("prefetch_hits")
        return job

    def expect(self, mm_hash: str, num_embeds: int, request_id: str) -> PullJob:
        """Pull `mm_hash` for a request once an encoder announces it (at once if one has);
        the request fails over to local encoding if none has by the pull deadline."""
        with self._lock:
            item = self._item(mm_hash)
            job = item.job
            new = job is None
            if job is None:
                job = item.job = PullJob(mm_hash, None, num_embeds, expected=True)
            pulled = self._add_user_locked(job, num_embeds, request_id)
            if new and item.holder is not None:
                self._submit_locked(job, item.holder)
        if job.awaiting and time.monotonic() - job.started_at > self._timeout_s:
            self._fail(job, DeadlineExceededError(
                f"{mm_hash}: no encoder announced it within {self._timeout_s:.1f} s"
            ))  # fmt: skip
        elif pulled and self._rows_fit(job):
            self.stats.count("prefetch_hits")
        return job

    def announced(self, announcement: Announcement, encoder_id: str, *, prefetch: bool) -> None:
        """An encoder exported an item: pull it for a request expecting it, or, with
        `prefetch`, for the request that will come (unless vLLM's encoder cache has it).
        A claim the announcement carries spares that pull its Resolve; one no pull takes
        goes back to the encoder."""
        with self._lock:
            item = self._item(announcement.mm_hash)
            item.holder, item.encoding = encoder_id, None
            job = item.job
            if job is not None and job.awaiting:
                self._submit_locked(job, encoder_id, announcement)
                return
            wanted = prefetch and job is None and not item.resident
        if not (wanted and self.prefetch(announcement, encoder_id)):
            self._give_back(announcement, encoder_id)

    def _give_back(self, announcement: Announcement, encoder_id: str) -> None:
        if announcement.claim is not None:
            self._pool.submit(self._runner.release_claim, announcement, encoder_id)

    def encoding(self, mm_hash: str, encoder_id: str) -> None:
        """An encoder is about to encode `mm_hash`: its announcement should follow within
        a pull deadline (what is older than that is forgotten)."""
        now = time.monotonic()
        with self._lock:
            for stale, item in list(self._items.items()):
                if item.encoding and item.encoding[1] < now - self._timeout_s:
                    item.encoding = None
                    self._prune(stale)
            self._item(mm_hash).encoding = (encoder_id, now)

    def known(self, mm_hash: str) -> bool:
        """A job for `mm_hash` exists, or an encoder announced it (and has not evicted it)
        or is encoding it."""
        with self._lock:
            item = self._items.get(mm_hash)
            if item is None:
                return False
            encoding = item.encoding
            return bool(
                item.job
                or item.holder
                or (encoding and time.monotonic() - encoding[1] < self._timeout_s)
            )

    def evicted(self, mm_hash: str, encoder_id: str) -> None:
        with self._lock:
            item = self._items.get(mm_hash)
            if item is not None and item.holder == encoder_id:
                item.holder = None
                self._prune(mm_hash)

    def reconnected(self, encoder_id: str) -> None:
        """A new event stream from the encoder starts with everything it holds: forget
        what it announced before, whose evictions the lost stream may not have told."""
        self._met.discard(encoder_id)  # it may be a new generation: meet it again
        with self._lock:
            for mm_hash, item in list(self._items.items()):
                if item.holder == encoder_id:
                    item.holder = None
                if item.encoding and item.encoding[0] == encoder_id:
                    item.encoding = None
                self._prune(mm_hash)

    def resident(self, mm_hash: str) -> bool:
        """vLLM's encoder cache has the item (allocated and not freed since)."""
        with self._lock:
            item = self._items.get(mm_hash)
            return item is not None and item.resident

    def loadable(self, mm_hash: str) -> PullJob | None:
        """The item's pull if vLLM may load it: every worker reported holding its copy,
        and a live request relies on it (so nothing ends the job before it is loaded)."""
        with self._lock:
            item = self._items.get(mm_hash)
            job = item.job if item is not None else None
            if job is not None and job.users and job.state is PullState.READY:
                return job
            return None

    def allocated(self, mm_hash: str, promised: PullJob | None) -> Load | None:
        """vLLM reserved encoder-cache room for the item: it is resident from now on.
        With `promised` (the pull `loadable` gave in this scheduling pass), vLLM loads
        that pull's copy instead of encoding the item: the job ends here and its load
        order is returned. Without, vLLM encodes the item itself."""
        with self._lock:
            item = self._item(mm_hash)
            item.resident = True
            item.lent = promised.pull_id if promised is not None else None
            if promised is None:
                return None
            kept = item.job is promised
            if kept:
                item.job = None
                promised.move(PullState.LOADED)
        if not kept:  # the workers read it again if they dropped it (`Receiver.lend`)
            logger.error("%s: pull %d ended before its promised load", mm_hash, promised.pull_id)
        job = promised
        if job.asked_at is not None and job.ready_at is not None:
            # Waiting for the encoder to announce the item is encoding, not transfer.
            announced = max(job.asked_at, job.started_at)
            if job.expected:
                self.stats.observe("announce_wait_seconds", announced - job.asked_at)
            self.stats.observe("ready_wait_seconds", max(0.0, job.ready_at - announced))
        assert job.encoder_id is not None  # pulled
        return Load(mm_hash, job.pull_id, job.encoder_id, job.rows)

    def freed(self, mm_hashes: list[str]) -> list[tuple[str, int]]:
        """vLLM evicted these from its encoder cache: pull them again if asked. The
        (mm_hash, pull id) of those whose slots the workers lent it, to free."""
        released = []
        with self._lock:
            for mm_hash in mm_hashes:
                item = self._items.get(mm_hash)
                if item is not None:
                    if item.lent is not None:
                        released.append((mm_hash, item.lent))
                    item.resident, item.lent = False, None
                    self._prune(mm_hash)
        return released

    def _item(self, mm_hash: str) -> Item:
        item = self._items.get(mm_hash)
        if item is None:
            item = self._items[mm_hash] = Item()
        return item

    def _prune(self, mm_hash: str) -> None:
        """An entry with nothing left in it goes: the table holds what is live."""
        if self._items[mm_hash].empty:
            del self._items[mm_hash]

    def _submit_locked(
        self, job: PullJob, encoder_id: str, announcement: Announcement | None = None
    ) -> None:
        job.encoder_id = encoder_id
        job.started_at = time.monotonic()
        job.move(PullState.RUNNING)
        job.future = self._pool.submit(self._run, job, announcement)
        job.future.add_done_callback(lambda _: self._landed.set())  # once `state` tells

    def park(self, timeout_s: float) -> None:
        """Block until a pull that a request waits for ends, or `timeout_s`; at once if no
        request waits for one."""
        with self._lock:
            waiting = any(
                item.job.asked_at is not None and item.job.state in WAITING
                for item in self._items.values()
                if item.job is not None
            )
        if waiting:
            self._landed.wait(timeout_s)
        self._landed.clear()

    def _add_user_locked(self, job: PullJob, num_embeds: int, request_id: str) -> bool:
        """`request_id` relies on the job from now on; the first request gives it its rows.
        True if that request found the item already pulled (a prefetch): its rows are then
        checked here (`_rows_fit`), else by the pull when it ends."""
        job.users.add(request_id)
        if job.asked_at is not None:
            return False
        job.asked_at = time.monotonic()
        job.num_embeds = num_embeds
        return job.ready_at is not None

    def _rows_fit(self, job: PullJob) -> bool:
        """Whether a pulled item a request asked for has the rows it needs (the workers
        check them before reading only when a request asked first); if not, it fails."""
        if job.rows == job.num_embeds:
            return True
        self._fail(job, RefusedError(
            f"{job.mm_hash}: the encoder sent {job.rows} rows, the request needs {job.num_embeds}"
        ))  # fmt: skip
        return False

    def prefetch(self, announcement: Announcement, encoder_id: str) -> bool:
        """Pull an item no request has asked for yet (False: a job for it exists). Such
        pulls are dropped after PREFETCH_TTL_S, or, oldest first, when they would hold
        more than half the receive arena (checked whenever another is prefetched)."""
        mm_hash = announcement.mm_hash
        # Its size for the prefetch bound: the claim's descriptor (checked against its
        # dtype and shape) where there is one, else the announced length until the
        # resolve tells (an announced 0 would escape the bound: not prefetched).
        nbytes = announcement.claim.region.length if announcement.claim else announcement.length
        if nbytes <= 0:
            logger.warning(
                "encoder %s announced %s with %d bytes: not prefetched", encoder_id, mm_hash, nbytes
            )
            return False
        now = time.monotonic()
        with self._lock:  # stale ones leave under the lock: no request can ask for them after
            for job in self._unasked_locked():
                if now - job.started_at > PREFETCH_TTL_S:
                    self._end_locked(job, PullState.DROPPED)
            item = self._item(mm_hash)
            started = item.job is None
            if started:
                self._make_room_locked(nbytes)
                job = item.job = PullJob(mm_hash, None, 0, nbytes=nbytes)
                self._submit_locked(job, encoder_id, announcement)
        return started

    def _make_room_locked(self, nbytes: int) -> None:
        """Drop prefetches no request asked for, oldest first, so that `nbytes` more fit."""
        unasked = sorted(  # prefetches (a request's own job has no size: never dropped)
            (job for job in self._unasked_locked() if job.nbytes),
            key=lambda job: job.started_at,
        )
        held = sum(job.nbytes for job in unasked)
        dropped = 0
        while unasked and held + nbytes > self._prefetch_bytes:
            job = unasked.pop(0)
            self._end_locked(job, PullState.DROPPED)
            held -= job.nbytes
            dropped += 1
        if dropped:
            self.stats.count("prefetches_dropped", dropped)

    def _unasked_locked(self) -> list[PullJob]:
        return [i.job for i in self._items.values() if i.job and i.job.asked_at is None]

    def _end_locked(
        self, job: PullJob, ending: PullState, error: ECNixlError | None = None
    ) -> None:
        """The one way a pull ends, if it has not (a READ that fails after its job was
        dropped or loaded changes nothing). FAILED: its requests fall back; a prefetch,
        which no request relies on, is forgotten at once. DROPPED: no request relies on
        it, and the item's entry lets go of it. Workers that may hold its copies drop
        them once its READs are over."""
        holding = job.state in HOLDING
        if not job.move(ending):
            return
        job.error = error or job.error
        if job.state is PullState.FAILED and job.asked_at is None:
            job.move(PullState.DROPPED)
        if job.state is PullState.DROPPED:
            item = self._items.get(job.mm_hash)
            if item is not None and item.job is job:
                item.job = None
                self._prune(job.mm_hash)
        if holding:
            assert job.future is not None  # it ran: `_submit_locked`
            job.future.add_done_callback(lambda _: self._drop_copies(job))

    def _drop_copies(self, job: PullJob) -> None:
        """Workers free the pull's copies (a newer pull's stay), on the pool: never on the
        caller's (scheduler) thread. Not once closing: a job cancelled by the pool's
        shutdown calls this from inside it, where a submit would wait for the shutdown
        itself (and the workers' copies go with the workers)."""
        if self._closing.is_set():
            return
        for worker in self._runner.workers:
            self._pool.submit(worker.drop, [job.mm_hash], job.pull_id)

    def meet(self, encoder_id: str) -> None:
        """Handshake with an encoder once, in the background, and have every worker load
        its agent metadata: the first pull then pays for neither. It also catches a
        mismatch early: an encoder serving another model string shares no mm_hash with
        us, so no pull would ever reach it and tell."""
        if encoder_id not in self._met:
            self._met.add(encoder_id)
            self._pool.submit(self._meet, encoder_id)

    def _meet(self, encoder_id: str) -> None:
        try:
            peer = self._runner.meet(encoder_id)
        except HandshakeError as exc:
            self._report_incompatible(encoder_id, exc)
        except ECNixlError as exc:
            self._met.discard(encoder_id)  # unreachable for now: try again later
            logger.info("encoder %s not met yet (%s); its first pull meets it", encoder_id, exc)
            return
        for worker in self._runner.workers:
            self._pool.submit(worker.meet, encoder_id, peer, self._timeout_s)

    def job(self, mm_hash: str) -> PullJob | None:
        with self._lock:
            item = self._items.get(mm_hash)
            return item.job if item is not None else None

    def forget(self, mm_hash: str, request_id: str) -> None:
        """A request that needed the item ended. Once no request relies on its pull, a
        pull not loaded by then ends, and the workers free that pull's copy; another
        request sharing the item keeps the pull going."""
        with self._lock:
            item = self._items.get(mm_hash)
            job = item.job if item is not None else None
            if job is None or request_id not in job.users:
                return
            job.users.discard(request_id)
            if not job.users:
                self._end_locked(job, PullState.DROPPED)

    def close(self) -> None:
        self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for worker in self._runner.workers:
            worker.close()

    def _run(self, job: PullJob, announcement: Announcement | None) -> None:
        deadline = job.started_at + self._timeout_s
        resolution = None
        try:
            resolution, via = self._runner.lease(
                job.mm_hash, job.encoder_id, announcement, deadline
            )
            reports = self._runner.read(
                job.encoder_id, resolution, job.num_embeds, deadline, job.pull_id
            )
        except Exception as exc:  # a thread boundary: whatever fails here fails this pull only
            if not isinstance(exc, ECNixlError):
                logger.exception("pull of %s failed unexpectedly", job.mm_hash)
                exc = ECNixlError(f"unexpected {type(exc).__name__}: {exc}")
            self._fail(job, exc)
            if resolution is not None:
                # After the request learned of the failure, so a stalled encoder holds
                # this thread (a second at most), not the request.
                self._runner.give_back(resolution, exc)
            return
        with self._lock:
            job.rows = resolution.items[0].shape[0]
            job.ready_at = time.monotonic()
            if job.nbytes:  # a prefetch: what it holds, whatever was announced
                job.nbytes = resolution.items[0].region.length
            asked = job.asked_at is not None
        elapsed = job.ready_at - job.started_at
        self.stats.count("items_pulled")
        self.stats.count("bytes_pulled", reports[0].bytes)
        self.stats.observe("pull_seconds", elapsed)
        logger.info(
            "pulled %s from %s in %.1f ms (%s; READ per rank %s ms; pull %d)",
            job.mm_hash, job.encoder_id, elapsed * 1000, via,
            "/".join(f"{r.read_s * 1000:.1f}" for r in reports), job.pull_id,
        )  # fmt: skip
        # A prefetch asked for while it ran was read without the request's rows.
        if asked and not self._rows_fit(job):
            return
        with self._lock:
            job.move(PullState.READY)

    def _report_incompatible(self, encoder_id: str, exc: HandshakeError) -> None:
        if encoder_id not in self._incompatible:
            self._incompatible.add(encoder_id)
            logger.error(
                "encoder %s cannot serve this instance: %s. Until that changes, none of its "
                "items is pulled. (Said once per encoder.)", encoder_id, exc,
            )  # fmt: skip

    def _fail(self, job: PullJob, exc: ECNixlError) -> None:
        self.stats.count("pull_failures", label=type(exc).__name__)
        with self._lock:
            self._end_locked(job, PullState.FAILED, exc)
            prefetch = job.asked_at is None
        source = job.encoder_id or "any encoder"
        if isinstance(exc, HandshakeError):
            self._report_incompatible(source, exc)
        elif prefetch:
            logger.info("prefetch of %s from %s failed: %s", job.mm_hash, source, exc)
        else:
            logger.warning("pull of %s from %s failed: %s", job.mm_hash, source, exc)
