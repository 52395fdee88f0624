"""Scheduler-side decisions of ECNixlConnector, per request and item.

Works on vLLM's `Request` objects by their attributes (`request_id`,
`mm_features[i].identifier` and `.data`, `ec_transfer_params`) without
importing vLLM, so it is tested with real requests but runs anywhere.

Consumer, per item a request names in its `ec_transfer_params` (or says is
still being encoded), and per item of a request without params (a proxy that
sends the request to an encoder first, then unchanged to PD) that one of PD's
encoders has announced or said it is encoding:
- start a pull in the background (once the item is announced) and defer the
  request until it ends;
- pulled: report the item as available; vLLM then schedules its load (see
  `has_item` for why that answer must be certain);
- failed: encode locally if the request still carries the media (and the
  load failure policy is "encode"), else fail the request with the reason in
  the log: it is not scheduled again, vLLM ends it with an error at the end of
  the step, and sending it again encodes anew.
Params that are malformed or name an unconfigured encoder are refused before
anything is contacted: the request's items are encoded locally (or, without
media, the request fails), as after a failed pull.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ec_nixl.consumer.items import ItemTable
from ec_nixl.consumer.pull_state import WAITING, PullJob, PullState
from ec_nixl.consumer.worker_link import Load
from ec_nixl.control.messages import Announcement, EventKind
from ec_nixl.errors import RefusedError
from ec_nixl.transfer_params import parse_params

logger = logging.getLogger(__name__)

# vLLM steps an engine whose requests all wait for us as fast as it can (an empty
# step, 1 ms of sleep, again), and every step wakes its workers: on a small host
# that spin takes the CPU the encoder needs. So an empty step parks until a pull
# lands, or this long at most: how late such an engine may notice a new request.
IDLE_PARK_S = 0.01
# Distinct unknown param keys named in the log: the keys come from clients.
MAX_LOGGED_KEYS = 32


@dataclass
class _Noted:
    """What was counted and logged of one live request, so that each is said once; it
    goes when the request ends."""

    refused: bool = False  # its params were refused
    unmatched: bool = False  # its params named none of its items
    unknown_keys: bool = False  # its params carried keys we do not know
    fell_back: set[str] = field(default_factory=set)  # its items encoded here instead


class ConsumerScheduler:
    def __init__(
        self,
        items: ItemTable,
        encoders: dict[str, str],
        *,
        prefetch: bool = False,
        encode_on_failure: bool = True,
    ) -> None:
        self._items = items
        self._encoders = encoders
        self._prefetch = prefetch
        self._encode_on_failure = encode_on_failure
        self._promised: dict[str, PullJob] = {}  # has_item said yes, this scheduling pass
        self._to_load: list[Load] = []
        self._unavailable: set[str] = set()  # request ids to fail at the end of this step
        self._noted: dict[str, _Noted] = {}  # by request id
        self._warned_unmatched = False
        self._logged_keys: set[str] = set()  # unknown keys said in the log (once each)
        self.stats = items.stats
        for encoder_id in encoders:  # now, so that no first pull pays for meeting it
            items.meet(encoder_id)

    def ensure_available(self, request: Any, num_computed_tokens: int) -> bool:
        """False while any item the request still needs is being pulled, and for a
        request being failed: it must not run a step without its item (vLLM fails it
        when this step ends)."""
        try:
            sources = parse_params(request.ec_transfer_params, self._encoders)
        except RefusedError as exc:
            self._refuse(request, exc)
            return request.request_id not in self._unavailable  # else encode locally
        for encoder_id in set(sources.items.values()):
            self._items.meet(encoder_id)
        self._note_if_unmatched(request, sources.items)
        self._note_unknown_keys(request, sources.unknown_keys)
        pending = False
        for feature in request.mm_features:
            mm_hash = feature.identifier
            encoder_id = sources.items.get(mm_hash)
            position = feature.mm_position
            if (
                position.offset + position.length <= num_computed_tokens  # already used
                or self._items.resident(mm_hash)
                or not (
                    encoder_id is not None
                    or sources.announced
                    # no params at all: an item one of our encoders has or is encoding
                    or (request.ec_transfer_params is None and self._items.known(mm_hash))
                )
            ):
                continue
            num_embeds = position.get_num_embeds()
            request_id = request.request_id
            if encoder_id is None:
                job = self._items.expect(mm_hash, num_embeds, request_id)
            else:
                claimed = sources.claimed_for.get(mm_hash) == self._items.consumer_id
                job = self._items.start(mm_hash, encoder_id, num_embeds, request_id, claimed)
            if job.state in WAITING:
                pending = True
            elif job.state is PullState.FAILED:
                self._fall_back(request, feature, str(job.error))
        return not pending and request.request_id not in self._unavailable

    def _note(self, request: Any) -> _Noted:
        return self._noted.setdefault(request.request_id, _Noted())

    def _refuse(self, request: Any, exc: RefusedError) -> None:
        noted = self._note(request)
        if not noted.refused:
            noted.refused = True
            self.stats.count("refused_params")
            logger.warning("request %s: %s", request.request_id, exc)
        for feature in request.mm_features:
            if not self._items.resident(feature.identifier):
                self._fall_back(request, feature, str(exc))

    def _fall_back(self, request: Any, feature: Any, reason: str) -> None:
        """The item is not coming: vLLM encodes it here, if the request still has the media
        and the policy allows."""
        if not self._encode_on_failure:
            self._fail(request, f"{feature.identifier}: {reason}; load_failure_policy is 'fail'")
        elif feature.data is None:
            self._fail(request, f"{feature.identifier}: {reason}; no media to encode locally")
        elif feature.identifier not in (fell_back := self._note(request).fell_back):
            fell_back.add(feature.identifier)
            self.stats.count("fallbacks")

    def has_item(self, mm_hash: str) -> bool:
        """vLLM's `has_cache_item`: may this step load the item instead of encoding it?

        This is where a pulled item is given to vLLM, and the last point where it can
        be refused. Once this says yes, vLLM 0.32 reserves the item's encoder-cache
        entry (`update_state_after_alloc`: `on_alloc`, in this same scheduling pass) and
        schedules its tokens without encoding it; the model runner puts in the entry
        whatever the workers' `start_load_caches` gave, and its `_gather_mm_embeddings`
        raises "Encoder cache miss", ending the engine, if that was nothing. No
        connector hook can take the request back within that step:
        `take_unavailable_requests` and `update_connector_output` are read only after
        the forward pass, and a stand-in tensor would be decoded into the answer and
        kept in the prefix cache under the item's hash.

        So the answer is yes only for a load that is certain: the item's pull, every
        rank having reported holding its copy, relied on by a live request (nothing ends
        such a job before `on_alloc`: requests end between scheduling passes), and
        held by the workers under its pull id, which only orders naming that pull
        remove. Anything else is a no, before any step runs without the item: vLLM
        encodes it here, or the request, failed by the load failure policy, is not
        scheduled (`ensure_available`). `on_alloc` orders the load of exactly the
        pull promised here; a worker that lacks it anyway reads it again from its
        encoder (`Receiver.lend`)."""
        job = self._items.loadable(mm_hash)
        if job is None:
            return False
        self._promised[mm_hash] = job
        return True

    def on_alloc(self, mm_hash: str) -> None:
        """vLLM reserved encoder-cache room for an item: the pull promised for it in this
        pass is loaded this step; an item not promised is encoded by vLLM."""
        load = self._items.allocated(mm_hash, self._promised.pop(mm_hash, None))
        if load is not None:
            self._to_load.append(load)

    def on_event(self, event: Announcement, encoder_id: str) -> None:
        """An encoder exported or dropped an item: a request waiting for it pulls it
        now; so does one yet to come when the item was announced with a claim for this
        PD (its request is routed here) or with prefetch, unless vLLM's encoder cache
        has it."""
        if event.kind is EventKind.EVICTED:
            self._items.evicted(event.mm_hash, encoder_id)
        elif event.kind is EventKind.ENCODING:
            self._items.encoding(event.mm_hash, encoder_id)
        else:
            if event.published_unix_ns and not event.snapshot:
                transit_ns = max(0, time.time_ns() - event.published_unix_ns)
                self.stats.observe("announce_transit_seconds", transit_ns / 1e9)
            # What was held when the stream began is known, not fetched: after a reconnect
            # it would be everything the encoder holds, much of it pulled here before.
            eager = (self._prefetch or event.claim is not None) and not event.snapshot
            self._items.announced(event, encoder_id, prefetch=eager)

    def on_connect(self, encoder_id: str) -> None:
        """An encoder's event stream (re)started: it will announce what it holds anew.
        Meet it now, afresh (it may not have been up when we started, or may have
        restarted since): else its first pull meets it, while a request waits and PD's
        ranks busy-poll the CPU it needs."""
        self._items.reconnected(encoder_id)
        self._items.meet(encoder_id)

    def on_freed(self, mm_hashes: list[str]) -> list[tuple[str, int]]:
        """vLLM evicted these from its encoder cache: pull them again if asked. The
        (mm_hash, pull id) whose slots the workers lent it, for them to free."""
        return self._items.freed(mm_hashes)

    def idle_step(self) -> None:
        """vLLM's scheduler found nothing to run this step: park (IDLE_PARK_S says why),
        the one wait ec_nixl makes on vLLM's scheduler thread."""
        self._items.park(IDLE_PARK_S)

    def take_loads(self) -> list[Load]:
        """This step's loads, at the end of its scheduling pass: its promises end."""
        self._promised.clear()
        loads, self._to_load = self._to_load, []
        return loads

    def take_unavailable(self) -> set[str]:
        failed, self._unavailable = self._unavailable, set()
        return failed

    def request_finished(self, request: Any) -> None:
        """Items pulled for a request that ended without loading them are dropped, unless
        another live request relies on them."""
        self._noted.pop(request.request_id, None)
        for feature in request.mm_features:
            self._items.forget(feature.identifier, request.request_id)

    def _note_if_unmatched(self, request: Any, where: dict[str, str]) -> None:
        if not where or any(feature.identifier in where for feature in request.mm_features):
            return
        noted = self._note(request)
        if noted.unmatched:
            return
        noted.unmatched = True
        self.stats.count("unmatched_params")
        if not self._warned_unmatched:
            self._warned_unmatched = True
            logger.warning(
                "request %s: its ec_transfer_params name none of its items, so they are "
                "encoded here. Were the encoder and this instance started with the same "
                "--model string, and given the same media uuid by the proxy (or none)? Both "
                "make the mm_hash; vLLM's example EPD proxy gives the encoder a uuid and, "
                "for models without placeholder metadata (LLaVA), sends PD the media "
                "without it unless started with --no-rewrite. (Said once.)",
                request.request_id,
            )

    def _note_unknown_keys(self, request: Any, keys: frozenset[str]) -> None:
        """Keys that neither side knows are followed (a newer vLLM on the encoder adds
        some), counted per request, and each named once in the log."""
        if not keys or (noted := self._note(request)).unknown_keys:
            return
        noted.unknown_keys = True
        self.stats.count("unknown_param_keys")
        for key in sorted(keys - self._logged_keys)[: MAX_LOGGED_KEYS - len(self._logged_keys)]:
            self._logged_keys.add(key)
            logger.warning(
                "request %s: its ec_transfer_params carry %r beside the encoder id, a key "
                "this version does not know (an encoder on a newer vLLM?); pulled anyway, "
                "the key ignored. (Said once per key.)",
                request.request_id,
                key[:64],
            )

    def close(self) -> None:
        self._items.close()

    def _fail(self, request: Any, reason: str) -> None:
        if request.request_id not in self._unavailable:
            logger.error(
                "request %s cannot get its encoder outputs: %s", request.request_id, reason
            )
            self._unavailable.add(request.request_id)
            self.stats.count("failed_requests")
