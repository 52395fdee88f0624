"""Byte ranges of registered memory, as both sides of the control plane name them.

Apart from `nixl_agent` so that processes which only coordinate (the PD
scheduler, the proxy) can speak of remote memory without loading NIXL or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Region:
    """A contiguous byte range in some process's registered memory."""

    address: int
    length: int
    device: str  # "cpu" or "cuda"
    device_id: int

    def contains(self, other: Region) -> bool:
        return (
            self.device == other.device
            and self.device_id == other.device_id
            and self.address <= other.address
            and other.address + other.length <= self.address + self.length
        )


# An exported item's guard: this many bytes right after the item's own, 8-aligned.
GUARD_BYTES = 8


def guard_address(region: Region) -> int:
    """Where the guard of the item in `region` lies."""
    end = region.address + region.length
    return end + -end % GUARD_BYTES


def tensor_region(tensor: torch.Tensor) -> Region:
    device = tensor.device
    return Region(
        address=tensor.data_ptr(),
        length=tensor.numel() * tensor.element_size(),
        device=device.type,
        device_id=device.index or 0,
    )
