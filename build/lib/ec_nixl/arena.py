"""A registered memory arena: one contiguous buffer per process and device.

Registering memory with NIXL pins it on RDMA NICs and GPUs and costs
milliseconds, so each process registers one arena once and hands out aligned
slots of it. The arena knows nothing about NIXL or leases: it owns the bytes
and a first-fit allocator over them, safe to call from several threads.
"""

from __future__ import annotations

import bisect
import mmap
import threading
from dataclasses import dataclass
from math import prod

import torch

DEFAULT_ALIGNMENT = 4096


@dataclass(frozen=True)
class Slot:
    """A byte range of an arena, aligned at its start."""

    offset: int
    length: int


def _allocate(capacity: int, device: torch.device) -> torch.Tensor:
    """The arena's bytes, every page touched now rather than in the first transfer.

    Host memory is asked for in huge pages where the kernel has them (transparent
    huge pages): a READ between processes on one host (UCX's cma transport,
    `process_vm_readv`) pins the source's pages and copies them one page at a time,
    and 512 times fewer pages make that copy faster.
    """
    if device.type != "cpu":
        return torch.zeros(capacity, dtype=torch.uint8, device=device)
    memory = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    buffer = torch.frombuffer(memory, dtype=torch.uint8)
    buffer.zero_()
    return buffer


class Arena:
    """A uint8 buffer on `device` with a first-fit allocator of aligned slots."""

    def __init__(
        self,
        capacity: int,
        device: str | torch.device = "cpu",
        alignment: int = DEFAULT_ALIGNMENT,
    ) -> None:
        if capacity <= 0 or capacity % alignment:
            raise ValueError(
                f"arena capacity {capacity} must be a positive multiple of {alignment}"
            )
        self.buffer = _allocate(capacity, torch.device(device))
        self.capacity = capacity
        self.alignment = alignment
        self._lock = threading.Lock()
        # Free extents as parallel sorted lists of offsets and lengths.
        self._free_offsets = [0]
        self._free_lengths = [capacity]
        self._used = 0

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def base_address(self) -> int:
        return self.buffer.data_ptr()

    @property
    def bytes_used(self) -> int:
        return self._used

    def aligned(self, nbytes: int) -> int:
        return -(-max(nbytes, 1) // self.alignment) * self.alignment

    def allocate(self, nbytes: int) -> Slot | None:
        """A slot of at least `nbytes`, or None when no free extent is large enough."""
        need = self.aligned(nbytes)
        with self._lock:
            for i, length in enumerate(self._free_lengths):
                if length >= need:
                    offset = self._free_offsets[i]
                    if length == need:
                        del self._free_offsets[i], self._free_lengths[i]
                    else:
                        self._free_offsets[i] += need
                        self._free_lengths[i] -= need
                    self._used += need
                    return Slot(offset, need)
        return None

    def free(self, slot: Slot) -> None:
        """Return a slot; neighbouring free extents merge."""
        with self._lock:
            i = bisect.bisect_left(self._free_offsets, slot.offset)
            offsets, lengths = self._free_offsets, self._free_lengths
            if i < len(offsets) and offsets[i] == slot.offset:
                raise ValueError(f"double free of {slot}")
            offsets.insert(i, slot.offset)
            lengths.insert(i, slot.length)
            if i + 1 < len(offsets) and offsets[i] + lengths[i] == offsets[i + 1]:
                lengths[i] += lengths.pop(i + 1)
                offsets.pop(i + 1)
            if i > 0 and offsets[i - 1] + lengths[i - 1] == offsets[i]:
                lengths[i - 1] += lengths.pop(i)
                offsets.pop(i)
            self._used -= slot.length

    def address(self, slot: Slot) -> int:
        return self.base_address + slot.offset

    def view(self, slot: Slot, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of `dtype` and `shape` over the slot's bytes (no copy)."""
        nbytes = prod(shape) * dtype.itemsize
        if nbytes > slot.length:
            raise ValueError(f"{nbytes} bytes of {dtype}{list(shape)} do not fit {slot}")
        raw = self.buffer[slot.offset : slot.offset + nbytes]
        return raw.view(dtype).view(shape)
