"""The NIXL agent: register memory, meet peers, READ remote slots into local ones.

A thin layer over NIXL's `_api` with a few verbs and typed errors. It starts no
threads: NIXL runs without its progress thread (which busy-polls a core) and
the caller drives progress, the reader by waiting on its transfer, the owner
of exported memory by calling `progress()` while reads may be in flight
(without it a READ over UCX never completes).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence

import torch

from ec_nixl.errors import DeadlineExceededError, HandshakeError, PeerDeadError, RefusedError
from ec_nixl.region import Region, tensor_region

logger = logging.getLogger(__name__)


def _nixl_package() -> str:
    """The wheel NIXL's API comes from: the `nixl` meta package where it is installed
    (vLLM's NIXL extra brings it; it picks the host's CUDA variant), else the one
    variant that `ec-nixl[cu12]` or `ec-nixl[cu13]` installed."""
    for package in ("nixl", "nixl_cu13", "nixl_cu12"):
        if importlib.util.find_spec(package) is not None:
            return package
    raise ImportError(
        "NIXL is not installed: pip install 'ec-nixl[cu13]' (or [cu12]: the host's CUDA major)"
    )


_NIXL = _nixl_package()
nixl_api = importlib.import_module(f"{_NIXL}._api")
_bindings = importlib.import_module(f"{_NIXL}._bindings")
nixl_agent = nixl_api.nixl_agent
nixl_agent_config = nixl_api.nixl_agent_config
nixl_thread_sync_t = nixl_api.nixl_thread_sync_t
nixlBackendError = _bindings.nixlBackendError
nixlInvalidParamError = _bindings.nixlInvalidParamError
nixlMismatchError = _bindings.nixlMismatchError
nixlNotAllowedError = _bindings.nixlNotAllowedError
nixlNotFoundError = _bindings.nixlNotFoundError
nixlRemoteDisconnectError = _bindings.nixlRemoteDisconnectError
# Every error NIXL's bindings raise (they share no base class but Exception).
NIXL_ERRORS = tuple(
    error
    for name, error in vars(_bindings).items()
    if name.startswith("nixl") and isinstance(error, type) and issubclass(error, Exception)
)

# How long a waiting reader sleeps between polls: short enough to add little
# latency, long enough to leave the CPU to the other side on a small host.
POLL_INTERVAL_S = 50e-6


def _mem_type(device: str) -> str:
    return "VRAM" if device == "cuda" else "DRAM"


class TransferAgent:
    """One NIXL agent per process, named uniquely per process generation.

    NIXL refuses new metadata under a known agent name, and damaged metadata can
    poison a name for good, so names are never reused.
    """

    def __init__(self, role: str) -> None:
        self.name = f"ec-nixl-{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        config = nixl_agent_config(
            enable_prog_thread=False,
            backends=["UCX"],
            sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        self._agent = nixl_agent(self.name, config)
        self._peers: set[str] = set()
        self.regions: list[Region] = []

    def register(self, tensor: torch.Tensor) -> Region:
        """Register a tensor's memory once; reads can then target any part of it."""
        self._agent.register_memory(tensor)
        region = tensor_region(tensor)
        self.regions.append(region)
        return region

    @property
    def metadata(self) -> bytes:
        return self._agent.get_agent_metadata()

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's metadata (once per peer name) and return the name. Metadata NIXL
        cannot use is a HandshakeError; NIXL may keep the name of metadata it refused
        half-way and refuse that peer's genuine metadata after it, which is why
        pullers probe metadata in a helper process first (`metadata_probe`)."""
        try:
            name = self._agent.add_remote_agent(metadata)
        except (
            nixlMismatchError,
            nixlNotAllowedError,
            nixlInvalidParamError,
            nixlNotFoundError,
        ) as exc:
            raise HandshakeError(f"peer metadata rejected by NIXL: {exc}") from exc
        except nixlBackendError as exc:  # UCX cannot reach the peer: it is gone
            raise PeerDeadError(f"cannot connect to the peer in this metadata: {exc}") from exc
        if isinstance(name, bytes):
            try:
                name = name.decode()
            except UnicodeDecodeError as exc:
                self._agent.remove_remote_agent(name)
                raise HandshakeError(
                    f"peer metadata names its agent {name[:32]!r}, not UTF-8; unloaded it"
                ) from exc
        self._peers.add(name)
        return name

    def has_peer(self, name: str) -> bool:
        return name in self._peers

    def remove_peer(self, name: str) -> None:
        if name in self._peers:
            self._peers.discard(name)
            self._agent.remove_remote_agent(name)

    def read(
        self,
        peer: str,
        remote: Sequence[Region],
        local: Sequence[Region],
        *,
        deadline: float,
        notification: bytes = b"",
    ) -> None:
        """READ each remote region into the local region at the same index.

        Returns when every byte arrived; raises RefusedError (NIXL rejected the
        descriptors), PeerDeadError or DeadlineExceededError. After an error the
        local regions hold garbage: a cut READ leaves partial data.
        """
        if not remote or len(remote) != len(local):
            raise RefusedError(
                f"{len(remote)} remote and {len(local)} local regions do not pair up"
            )
        remote_descs = self._descs(remote)
        local_descs = self._descs(local)
        try:
            handle = self._agent.initialize_xfer(
                "READ", local_descs, remote_descs, peer, notification
            )
        except (nixlNotFoundError, nixlInvalidParamError) as exc:
            raise RefusedError(f"NIXL refused a READ from {peer}: {exc}") from exc
        except nixlRemoteDisconnectError as exc:
            raise PeerDeadError(f"peer {peer} disconnected: {exc}") from exc
        try:
            # Over UCX's cma transport the copy mostly happens inside transfer(): look
            # once before sleeping.
            state = self._agent.transfer(handle)
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise DeadlineExceededError(f"READ from {peer} still in flight at its deadline")
                state = self._agent.check_xfer_state(handle)
                if state == "PROC":
                    time.sleep(POLL_INTERVAL_S)
            if state != "DONE":
                raise PeerDeadError(f"READ from {peer} failed (state {state})")
        except nixlRemoteDisconnectError as exc:
            raise PeerDeadError(f"peer {peer} disconnected during a READ: {exc}") from exc
        except NIXL_ERRORS as exc:
            raise PeerDeadError(f"READ from {peer} failed in NIXL: {exc!r}") from exc
        finally:
            self._agent.release_xfer_handle(handle)

    def progress(self) -> list[bytes]:
        """Drive NIXL on this side and return notifications that arrived."""
        notifs = self._agent.get_new_notifs()
        return [msg for messages in notifs.values() for msg in messages]

    def _descs(self, regions: Sequence[Region]):
        mem_type = _mem_type(regions[0].device)
        return self._agent.get_xfer_descs(
            [(r.address, r.length, r.device_id) for r in regions], mem_type
        )
