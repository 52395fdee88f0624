"""One pull's network work, apart from PD's item table: lease, order every rank, give back.

Every worker (tensor-parallel rank) needs the whole embedding: one lease counts
each rank as a reader, and every rank gets its order at once; E frees the
lease when every rank's READ has completed. The lease is the claim that came
with the encoder's announcement while it has time left (a pull is then one
READ per rank), else a Resolve. A pull fails as a whole: the caller has the
workers drop what they got, and gives the lease back. The item table runs
all of this on its pool, never on vLLM's scheduler thread.
"""

from __future__ import annotations

import time

from ec_nixl.consumer.resolver import Resolution, Resolver
from ec_nixl.consumer.worker_link import PendingPull, PullOrder, PullReport, WorkerClient
from ec_nixl.control.messages import Announcement, PeerInfo
from ec_nixl.errors import ECNixlError, PeerDeadError
from ec_nixl.metrics import Stats

# A claim with less time left is not used: a READ begun on it could outlive it.
CLAIM_MARGIN_S = 0.5


class PullRunner:
    def __init__(
        self,
        resolver: Resolver,
        encoders: dict[str, str],
        workers: list[WorkerClient],
        stats: Stats,
    ) -> None:
        self.resolver = resolver
        self.encoders = encoders
        self.workers = workers
        self.stats = stats

    def meet(self, encoder_id: str) -> PeerInfo:
        """Handshake with the encoder now (what pulls use from then on)."""
        return self.resolver.peer(self.encoders[encoder_id], refresh=True)

    def lease(
        self,
        mm_hash: str,
        encoder_id: str,
        announcement: Announcement | None,
        deadline: float,
    ) -> tuple[Resolution, str]:
        """The announcement's claim while it has time left, else a Resolve for every rank;
        and which it was, for the log."""
        address = self.encoders[encoder_id]
        if announcement is not None and announcement.claim is not None:
            claim = self.resolver.checked(
                address, [announcement.claim], announcement.received_at, deadline
            )
            if claim.valid_until - time.monotonic() > CLAIM_MARGIN_S:
                self.stats.count("claimed_pulls")
                return claim, "claimed when announced"
        asked = time.monotonic()
        resolution = self.resolver.resolve(address, [mm_hash], deadline, len(self.workers))
        resolve_s = time.monotonic() - asked
        self.stats.observe("resolve_seconds", resolve_s)
        return resolution, f"resolve {resolve_s * 1000:.1f} ms"

    def read(
        self,
        encoder_id: str,
        resolution: Resolution,
        num_embeds: int,
        deadline: float,
        pull_id: int,
    ) -> list[PullReport]:
        """Every rank READs the leased item, keeping it under `pull_id`; each rank's
        report, or the first failure once all have answered."""
        order = PullOrder(
            encoder_id,
            resolution.items,
            [num_embeds],
            resolution.valid_until,
            deadline,
            pull_id,
            resolution.peer,
        )
        return _results([worker.pull(order) for worker in self.workers])

    def give_back(self, resolution: Resolution, exc: ECNixlError) -> None:
        """After a failed pull: the lease goes back, unless the encoder is dead (it has no
        leases left). A deadline may be a rank's, not the encoder's."""
        if isinstance(exc, PeerDeadError):
            self.resolver.forget_peer(resolution.address)
        else:
            self.resolver.release(resolution.address, resolution.lease_ids)

    def release_claim(self, announcement: Announcement, encoder_id: str) -> None:
        """An unused claim pins memory at the encoder until it expires: release it now."""
        if announcement.claim is not None:
            address = self.encoders[encoder_id]
            self.resolver.release(address, [announcement.claim.lease_id])


def _results(pending: list[PendingPull]) -> list[PullReport]:
    reports, failure = [], None
    for call in pending:
        try:
            reports.append(call.result())
        except ECNixlError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure
    return reports
