"""The arena hands out aligned, non-overlapping slots and takes them back."""

import pytest
import torch

from ec_nixl.arena import Arena


def test_slots_are_aligned_and_disjoint():
    arena = Arena(64 * 1024, alignment=4096)
    a, b = arena.allocate(1), arena.allocate(5000)
    assert (a.offset, a.length) == (0, 4096)
    assert (b.offset, b.length) == (4096, 8192)
    assert arena.bytes_used == 12288


def test_allocation_fails_cleanly_when_no_extent_fits():
    arena = Arena(8192, alignment=4096)
    assert arena.allocate(8192) is not None
    assert arena.allocate(1) is None


def test_freed_neighbours_merge_into_one_extent():
    arena = Arena(3 * 4096, alignment=4096)
    slots = [arena.allocate(4096) for _ in range(3)]
    for slot in (slots[0], slots[2], slots[1]):
        arena.free(slot)
    assert arena.bytes_used == 0
    assert arena.allocate(3 * 4096).offset == 0


def test_double_free_is_an_error():
    arena = Arena(8192, alignment=4096)
    slot = arena.allocate(10)
    arena.free(slot)
    with pytest.raises(ValueError, match="double free"):
        arena.free(slot)


def test_view_shares_the_slot_bytes():
    arena = Arena(8192, alignment=4096)
    slot = arena.allocate(64)
    arena.view(slot, torch.float32, (4, 4)).fill_(1.5)
    assert torch.equal(arena.view(slot, torch.float32, (16,)), torch.full((16,), 1.5))
    with pytest.raises(ValueError, match="do not fit"):
        arena.view(slot, torch.float32, (2048,))
