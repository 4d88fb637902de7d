"""Tests for the DRAM arena: allocation, coalescing, accounting, threads and pinned views (R2)."""

from __future__ import annotations

import gc
import random
import sys
import threading

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from tairstore.errors import CapacityError, InvalidArgumentError
from tairstore.tiers.dram import DramArena, Slot

KIB = 1024
MIB = 1024 * KIB
PAGE = 4096
# Operations per thread in the concurrency test: many lock hand-offs, well under a second.
OPS_PER_THREAD = 1000


def fill(arena: DramArena, slot: Slot, byte: int) -> None:
    view = arena.writable_view(slot)
    view[:] = bytes([byte]) * slot.size
    view.release()


# ----------------------------------------------------------------------------- allocation


def test_alloc_rounds_to_granularity_only():
    arena = DramArena(1 * MIB)
    slot = arena.alloc(64 * KIB + 1)
    assert slot.size == 64 * KIB + 1
    # An odd size costs one extra granule, never a power-of-two round-up.
    assert slot.reserved == 64 * KIB + PAGE
    assert arena.used_bytes == slot.reserved
    assert arena.free_bytes == arena.capacity_bytes - slot.reserved
    assert len(arena.writable_view(slot)) == slot.size
    assert len(arena.pinned_view(slot)) == slot.size


def test_slots_are_granularity_aligned_in_memory():
    arena = DramArena(1 * MIB)
    for size in (1, 5000, 70_000):
        slot = arena.alloc(size)
        assert slot.offset % PAGE == 0
        address = np.frombuffer(arena.pinned_view(slot), np.uint8).ctypes.data
        assert address % PAGE == 0


def test_capacity_rounds_down_and_validates():
    assert DramArena(10_000).capacity_bytes == 8192
    with pytest.raises(InvalidArgumentError):
        DramArena(100)
    with pytest.raises(InvalidArgumentError):
        DramArena(MIB, granularity=3000)
    arena = DramArena(MIB)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgumentError):
            arena.alloc(bad)


def test_block_larger_than_arena_is_capacity_error():
    arena = DramArena(MIB)
    with pytest.raises(CapacityError) as info:
        arena.alloc(MIB + 1)
    assert info.value.dimension == "block_size"


def test_exhaustion_returns_none_then_free_makes_room():
    arena = DramArena(256 * KIB)
    slots = [arena.alloc(64 * KIB) for _ in range(4)]
    assert all(slots)
    assert arena.alloc(1) is None
    assert arena.free_bytes == 0 and arena.largest_free_extent == 0
    assert arena.release(slots[2]) is True
    again = arena.alloc(64 * KIB)
    assert again.offset == slots[2].offset


def test_best_fit_picks_the_smallest_hole():
    arena = DramArena(MIB)
    a, _, b, _, c, _ = (arena.alloc(n) for n in (64 * KIB, PAGE, 16 * KIB, PAGE, 32 * KIB, PAGE))
    for slot in (a, b, c):
        arena.release(slot)
    assert arena.alloc(16 * KIB).offset == b.offset
    assert arena.alloc(20 * KIB).offset == c.offset


def test_free_coalesces_with_both_neighbours():
    arena = DramArena(MIB)
    slots = [arena.alloc(64 * KIB) for _ in range(16)]
    for slot in slots[::2]:
        arena.release(slot)
    # Fragmented: half the arena free but in 64 KiB holes.
    assert arena.free_bytes == MIB // 2
    assert arena.largest_free_extent == 64 * KIB
    assert arena.alloc(128 * KIB) is None
    arena.release(slots[5])
    assert arena.largest_free_extent == 3 * 64 * KIB
    for slot in slots[1::2]:
        if slot is not slots[5]:
            arena.release(slot)
    assert arena.largest_free_extent == MIB
    assert arena.used_bytes == 0
    arena.check_invariants()


def test_double_and_stale_release_are_refused():
    arena = DramArena(MIB)
    slot = arena.alloc(PAGE)
    arena.release(slot)
    with pytest.raises(InvalidArgumentError):
        arena.release(slot)
    reused = arena.alloc(PAGE)
    assert reused.offset == slot.offset
    # Same offset and size, different allocation: the stale handle must not free it.
    with pytest.raises(InvalidArgumentError):
        arena.release(slot)
    with pytest.raises(InvalidArgumentError):
        arena.pinned_view(slot)
    assert arena.pin_count(slot) == 0
    arena.release(reused)


def test_threads_alloc_write_verify_free_without_overlap():
    # Switch threads often so that allocator calls really interleave.
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        _run_alloc_threads()
    finally:
        sys.setswitchinterval(old_interval)


def _run_alloc_threads():
    arena = DramArena(4 * MIB)
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[tuple[Slot, int]] = []
        for i in range(OPS_PER_THREAD):
            if mine and (len(mine) > 6 or rng.random() < 0.4):
                slot, byte = mine.pop(rng.randrange(len(mine)))
                data = np.frombuffer(arena.pinned_view(slot), np.uint8)
                if not (data == byte).all():
                    errors.append(f"slot {slot} overwritten")
                del data
                arena.release(slot)
                continue
            slot = arena.alloc(rng.choice((PAGE, 3 * PAGE + 7, 64 * KIB, 100_000)))
            if slot is None:
                continue
            byte = (seed * 31 + i) % 251 + 1
            fill(arena, slot, byte)
            mine.append((slot, byte))
        for slot, byte in mine:
            if bytes(arena.pinned_view(slot)) != bytes([byte]) * slot.size:
                errors.append(f"slot {slot} overwritten at the end")
            arena.release(slot)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert arena.used_bytes == 0 and arena.pinned_bytes == 0
    assert arena.largest_free_extent == arena.capacity_bytes
    arena.check_invariants()


# ------------------------------------------------------------------------ pinned views (R2)


def test_pinned_view_survives_release_and_blocks_reuse():
    arena = DramArena(256 * KIB)
    slots = [arena.alloc(64 * KIB) for _ in range(4)]
    for i, slot in enumerate(slots):
        fill(arena, slot, i + 1)
    view = arena.pinned_view(slots[1])
    assert arena.is_pinned(slots[1]) and arena.pin_count(slots[1]) == 1
    assert arena.release(slots[1]) is False
    assert arena.pending_free_bytes == 64 * KIB
    assert arena.used_bytes == 256 * KIB
    # Free everything else: the only space left that could hold 64 KiB is the pinned extent,
    # and allocations that would need it must fail (and not be handed that extent).
    for slot in (slots[0], slots[2], slots[3]):
        arena.release(slot)
    assert arena.alloc(192 * KIB) is None
    others = [arena.alloc(64 * KIB) for _ in range(3)]
    assert all(others) and arena.alloc(PAGE) is None
    assert slots[1].offset not in {s.offset for s in others}
    for slot in others:
        fill(arena, slot, 0xEE)
    assert bytes(view) == b"\x02" * (64 * KIB)

    del view
    assert not arena.is_pinned(slots[1])
    assert arena.pending_free_bytes == 0
    reused = arena.alloc(64 * KIB)
    assert reused.offset == slots[1].offset
    arena.check_invariants()


def test_view_release_unpins_immediately():
    arena = DramArena(MIB)
    slot = arena.alloc(10_000)
    view = arena.pinned_view(slot)
    arena.release(slot)
    assert arena.used_bytes == 12 * KIB
    view.release()
    assert arena.used_bytes == 0 and arena.pinned_bytes == 0


def test_unreleased_slot_stays_live_after_unpin():
    arena = DramArena(MIB)
    slot = arena.alloc(PAGE)
    views = [arena.pinned_view(slot) for _ in range(3)]
    assert arena.pin_count(slot) == 3 and arena.pinned_bytes == PAGE
    del views
    assert arena.pin_count(slot) == 0 and arena.pinned_bytes == 0
    assert arena.used_bytes == PAGE
    arena.release(slot)
    assert arena.used_bytes == 0


@pytest.mark.parametrize(
    "derive",
    [
        lambda v: np.frombuffer(v, dtype=np.uint8),
        lambda v: np.frombuffer(v, dtype=np.float16).reshape(2, -1),
        lambda v: v[100:200],
        lambda v: memoryview(v).cast("B"),
    ],
    ids=["frombuffer", "frombuffer-reshape", "slice", "memoryview-of-view"],
)
def test_derived_views_keep_the_pin(derive):
    arena = DramArena(MIB)
    slot = arena.alloc(64 * KIB)
    fill(arena, slot, 7)
    view = arena.pinned_view(slot)
    derived = derive(view)
    view.release()
    del view
    arena.release(slot)
    assert arena.is_pinned(slot)
    assert arena.alloc(MIB) is None  # the pinned extent splits the arena
    del derived
    gc.collect()
    assert not arena.is_pinned(slot)
    assert arena.largest_free_extent == MIB


def test_pinned_view_is_read_only():
    arena = DramArena(MIB)
    slot = arena.alloc(PAGE)
    view = arena.pinned_view(slot)
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 1
    array = np.frombuffer(view, np.uint8)
    with pytest.raises(ValueError):
        array[0] = 1
    with pytest.raises(ValueError):
        array.flags.writeable = True


def test_writable_view_pins_until_dropped():
    arena = DramArena(MIB)
    slot = arena.alloc(PAGE)
    view = arena.writable_view(slot)
    assert arena.free(slot) is False  # an aborting writer's stray view holds the extent
    view[:4] = b"abcd"
    del view
    assert arena.used_bytes == 0


def test_view_in_reference_cycle_is_collected():
    arena = DramArena(MIB)
    slot = arena.alloc(PAGE)
    holder: list = [arena.pinned_view(slot)]
    holder.append(holder)  # only the cyclic GC can free this view
    arena.release(slot)
    del holder
    gc.collect()
    assert arena.used_bytes == 0
    arena.check_invariants()


def test_views_dropped_in_other_threads_unpin():
    arena = DramArena(MIB)
    slots = [arena.alloc(PAGE) for _ in range(32)]
    views = [arena.pinned_view(s) for s in slots]
    for s in slots:
        arena.release(s)
    start = threading.Barrier(4)

    def drop(chunk: list) -> None:
        start.wait()
        while chunk:
            chunk.pop()
            # Contend for the lock while other threads unpin.
            slot = arena.alloc(PAGE)
            if slot is not None:
                arena.release(slot)

    chunks = [views[i::4] for i in range(4)]
    del views
    threads = [threading.Thread(target=drop, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    del chunks
    assert arena.pinned_bytes == 0 and arena.pending_free_bytes == 0
    arena.check_invariants()


# ------------------------------------------------------------------------------ properties


class ArenaMachine(RuleBasedStateMachine):
    """Random alloc / pin / release / unpin sequences, checking bytes and accounting."""

    slots = Bundle("slots")
    views = Bundle("views")

    def __init__(self) -> None:
        super().__init__()
        self.arena = DramArena(64 * PAGE, granularity=PAGE)
        self.fill_byte = 0

    @rule(target=slots, size=st.integers(1, 20 * PAGE))
    def alloc(self, size):
        slot = self.arena.alloc(size)
        if slot is None:
            # Best-fit fails only when no single free extent could hold the request.
            assert self.arena.largest_free_extent < -(-size // PAGE) * PAGE
            return multiple()
        self.fill_byte = self.fill_byte % 250 + 1
        fill(self.arena, slot, self.fill_byte)
        return (slot, self.fill_byte)

    @rule(target=views, item=slots)
    def pin(self, item):
        slot, byte = item
        return (self.arena.pinned_view(slot), byte)

    @rule(item=consumes(slots))
    def release(self, item):
        self.arena.release(item[0])

    @rule(item=consumes(views))
    def unpin(self, item):
        item[0].release()

    @rule(item=views)
    def read(self, item):
        view, byte = item
        # R2: a view's bytes never change, whatever happened to its slot since.
        assert np.all(np.frombuffer(view, np.uint8) == byte)

    @invariant()
    def accounting(self):
        arena = self.arena
        assert arena.used_bytes + arena.free_bytes == arena.capacity_bytes
        arena.check_invariants()


ArenaMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestArenaMachine = ArenaMachine.TestCase


# ------------------------------------------------------------------------------- prefault

def _resident_fraction(arena: DramArena) -> float:
    """The fraction of the arena's pages resident in memory (mincore(2) on its range)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    start = arena._base - arena._base % page
    npages = (arena._base + arena.capacity_bytes - start) // page
    vec = np.zeros(npages, np.uint8)
    assert libc.mincore(start, npages * page, vec.ctypes.data) == 0, ctypes.get_errno()
    return float(np.count_nonzero(vec & 1)) / npages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore(2) through libc")
def test_prefault_faults_the_arena_in_without_changing_written_bytes():
    # (Not process RSS: an allocator that reuses memory it zeroed itself makes that move
    # for reasons of its own.)
    arena = DramArena(96 * MIB)
    slot = arena.alloc(3 * MIB)
    fill(arena, slot, 0xA5)
    how = arena.prefault(background=False)
    assert how in ("done", "skipped")
    if how == "done":  # MADV_POPULATE_WRITE (Linux 5.14+): every page is in now
        assert _resident_fraction(arena) == 1.0
    assert bytes(arena.pinned_view(slot)) == b"\xa5" * (3 * MIB)


def test_prefault_before_any_allocation_always_runs():
    arena = DramArena(8 * MIB)
    assert arena.prefault(background=False) == "done"
    slot = arena.alloc(MIB)
    fill(arena, slot, 7)
    assert bytes(arena.pinned_view(slot)) == b"\x07" * MIB


def test_background_prefault_races_writers_without_changing_their_bytes():
    """Blocks written while the populate thread runs keep exactly their bytes (it never writes)."""
    arena = DramArena(320 * MIB)
    how = arena.prefault()
    slots = []
    for i in range(200):
        slot = arena.alloc(MIB)
        fill(arena, slot, i % 251)
        slots.append(slot)
    for i, slot in enumerate(slots):
        assert bytes(arena.pinned_view(slot)) == bytes([i % 251]) * MIB
    arena.stop_prefault()
    assert how in ("background", "done")


def test_store_with_prefault_serves_and_closes(tmp_path):
    import tairstore

    with tairstore.open(tmp_path / "s", dram_bytes=256 * MIB, ssd_bytes=0, prefault_dram=True) as s:
        data = np.random.default_rng(1).bytes(MIB)
        assert s.put(b"k", data)
        assert bytes(s.get(b"k")) == data


# ----------------------------------------------------------------------------- partitions


def test_partitions_never_lend_each_other_memory():
    arena = DramArena(1 * MIB, partitions=[256 * KIB, 128 * KIB])
    assert arena.partitions == 3
    assert [arena.partition_bytes(p) for p in range(3)] == [640 * KIB, 256 * KIB, 128 * KIB]
    assert arena.capacity_bytes == 1 * MIB
    got = {p: [] for p in range(3)}
    for p in range(3):
        while (slot := arena.alloc(64 * KIB, p)) is not None:
            got[p].append(slot)
    # Each partition filled exactly, from its own range, and full does not borrow.
    assert [len(got[p]) for p in range(3)] == [10, 4, 2]
    for p, slots in got.items():
        lo = arena.partition_offset(p)
        assert all(lo <= s.offset < lo + arena.partition_bytes(p) for s in slots)
        assert all(arena.partition_of(s.offset) == p for s in slots)
        assert arena.partition_used(p) == arena.partition_bytes(p)
    # Bytes written in one partition are read back intact after every other one is written.
    for p, slots in got.items():
        for s in slots:
            fill(arena, s, p + 1)
    for p, slots in got.items():
        assert all(np.all(np.frombuffer(arena.pinned_view(s), np.uint8) == p + 1) for s in slots)
    arena.check_invariants()
    # Freeing in partition 1 makes room there only; freed neighbours coalesce within it.
    for s in got[1]:
        arena.release(s)
    assert arena.alloc(64 * KIB, 2) is None and arena.alloc(64 * KIB, 0) is None
    assert arena.alloc(256 * KIB, 1) is not None
    arena.check_invariants()


def test_a_block_larger_than_its_partition_is_a_capacity_error():
    arena = DramArena(1 * MIB, partitions=[128 * KIB])
    with pytest.raises(CapacityError):
        arena.alloc(256 * KIB, 1)
    assert arena.alloc(256 * KIB, 0) is not None


@pytest.mark.parametrize("parts", [[1 * MIB], [600 * KIB, 500 * KIB], [0], [100]])
def test_partitions_that_do_not_fit_are_refused(parts):
    with pytest.raises(InvalidArgumentError):
        DramArena(1 * MIB, partitions=parts)


def test_shared_partitions_are_one_file_each_mapped_in_place(tmp_path):
    import mmap
    import os

    from tairstore.tiers.dram import SharedBacking

    backings = [SharedBacking(str(tmp_path)) for _ in range(3)]
    arena = DramArena(1 * MIB, backing=backings, partitions=[256 * KIB, 128 * KIB])
    assert len({b.path for b in backings}) == 3
    slots = []
    for p in range(3):
        s = arena.alloc(100_000, p)
        fill(arena, s, 10 + p)
        slots.append(s)
    for p, (b, s) in enumerate(zip(backings, slots)):
        assert b.base == arena.partition_offset(p) and b.capacity == arena.partition_bytes(p)
        assert os.stat(b.path).st_mode & 0o777 == 0o600
        # What a client of this partition alone sees: its file, read-only, at offset - base.
        with open(b.path, "rb") as f:
            m = mmap.mmap(f.fileno(), b.mapped_bytes, prot=mmap.PROT_READ)
        local = s.offset - b.base + b.shift
        assert m[local:local + s.size] == bytes([10 + p]) * s.size
        m.close()
    assert arena.prefault() == "done"  # partition by partition: the gaps are not mapped
    for s, p in zip(slots, range(3)):
        assert bytes(arena.pinned_view(s)) == bytes([10 + p]) * s.size
    arena.check_invariants()
    for b in backings:
        b.unlink()


class PartitionedArenaMachine(ArenaMachine):
    """The same random sequences over three partitions."""

    def __init__(self) -> None:
        super().__init__()
        self.arena = DramArena(64 * PAGE, granularity=PAGE, partitions=[16 * PAGE, 8 * PAGE])

    @rule(target=ArenaMachine.slots, size=st.integers(1, 20 * PAGE), part=st.integers(0, 2))
    def alloc(self, size, part):
        if -(-size // PAGE) * PAGE > self.arena.partition_bytes(part):
            with pytest.raises(CapacityError):
                self.arena.alloc(size, part)
            return multiple()
        slot = self.arena.alloc(size, part)
        if slot is None:
            return multiple()
        assert self.arena.partition_of(slot.offset) == part
        self.fill_byte = self.fill_byte % 250 + 1
        fill(self.arena, slot, self.fill_byte)
        return (slot, self.fill_byte)


PartitionedArenaMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestPartitionedArenaMachine = PartitionedArenaMachine.TestCase


def test_shared_files_are_sized_and_placed_in_whole_huge_pages(tmp_path, monkeypatch):
    """On hugetlbfs (a file system whose block is a huge page) a file holds whole huge pages and
    is mapped at a huge-page-aligned address: the arena rounds file sizes and partition starts
    to the directory's unit (here a 2 MiB one, as hugetlbfs reports it, on a plain directory)."""
    import os

    from tairstore.tiers.dram import SharedBacking

    huge = 2 * MIB
    monkeypatch.setattr(SharedBacking, "page_bytes", property(lambda self: huge))
    single = SharedBacking(str(tmp_path))
    arena = DramArena(3 * MIB + 4 * PAGE, backing=single)
    assert os.stat(single.path).st_size % huge == 0 and single.mapped_bytes >= arena.capacity_bytes
    s = arena.alloc(100_000)
    fill(arena, s, 9)
    assert bytes(arena.pinned_view(s)) == bytes([9]) * 100_000
    single.unlink()

    backings = [SharedBacking(str(tmp_path)) for _ in range(3)]
    arena = DramArena(5 * MIB, backing=backings, partitions=[PAGE, 1 * MIB + PAGE])
    for p, b in enumerate(backings):
        assert os.stat(b.path).st_size % huge == 0 and b.mapped_bytes >= arena.partition_bytes(p)
        assert arena.partition_offset(p) % huge == 0 and b.base == arena.partition_offset(p)
        assert (np.frombuffer(arena.memory, np.uint8).ctypes.data + b.base) % huge == 0
    slots = []
    for p in range(3):
        while (slot := arena.alloc(PAGE, p)) is not None:
            fill(arena, slot, p + 1)
            slots.append((p, slot))
    assert [sum(1 for q, _ in slots if q == p) for p in range(3)] == [
        arena.partition_bytes(p) // PAGE for p in range(3)]
    for p, slot in slots:
        assert bytes(arena.pinned_view(slot)) == bytes([p + 1]) * PAGE
        with open(backings[p].path, "rb") as f:
            f.seek(slot.offset - backings[p].base)
            assert f.read(PAGE) == bytes([p + 1]) * PAGE
    arena.check_invariants()
    for b in backings:
        b.unlink()
