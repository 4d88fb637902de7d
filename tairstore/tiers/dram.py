"""The DRAM tier's arena: one preallocated byte array and a best-fit extent allocator over it.

Theory of operation
-------------------
The arena is a single numpy ``uint8`` array; a block lives in a *slot*, a contiguous extent of
it. There are no per-block Python objects holding bytes, so a block of 8 MiB costs one slot
record, and readers get zero-copy ``memoryview`` s into the array.

Allocator: best-fit over free extents, rounded to ``granularity`` (a page, 4 KiB by default),
coalescing neighbours on free. Free extents are indexed three ways:

- ``(length, offset)`` in a sorted list, so the smallest extent that fits is one ``bisect``
  away (ties go to the lowest offset, which keeps the low end of the arena dense);
- ``offset -> length`` and ``end -> offset`` dicts, so freeing finds both neighbours in O(1).

Search is O(log n) in the number of free extents; an insert into or removal from the sorted
list is a C ``memmove`` of pointers, cheap next to copying even the smallest block.

Why not a buddy allocator: KV blocks are mostly power-of-two sizes, but not always (a model
with an odd head count, or a block carrying extra parts), and buddy rounding wastes up to half
of every such block. Here the waste inside a slot is below one granule (< 6.25 % for a 64 KiB
block, < 0.05 % for 8 MiB).

Fragmentation: with uniform block sizes, a freed slot is an exact fit for the next block, so
best-fit reuses holes exactly and the free space stays in few extents. With mixed sizes, free
bytes can be split into holes smaller than a request; then ``alloc`` returns None although
``free_bytes`` would suffice, and the caller evicts more (``largest_free_extent`` shows the
gap). Blocks are never moved to compact the arena: readers hold zero-copy views into it.

Pinning (invariant R2): every view this module hands out is backed by a tiny per-view exporter
object (``_Pin``) that numpy keeps as the array's ``base``. Anything derived from the view (a
slice, ``np.frombuffer``) keeps the exporter alive. While it lives, the slot is pinned:
``release`` only marks the slot, and its extent returns to the free list when the last pin goes.
The exporter also holds the arena, so the backing array outlives every view into it.

Shared memory: by default the arena is anonymous memory, private to the process (embedded
use). A daemon that lends blocks to clients on the same host backs it with a file instead
(:class:`SharedBacking`: a file under ``/dev/shm`` or a hugetlbfs directory, created
owner-only ``0600``, or ``0640`` with a configured group), mapped ``MAP_SHARED``; clients map
the same file read-only and read slots in place. The daemon passes it to the store as
``StoreConfig.dram_backing``.

Partitions: an arena may be cut into partitions, each its own range of offsets with its own
free extents, so blocks of one partition never take memory of another (the store maps each
namespace to one partition: ``StoreConfig.dram_partitions``). Partition 0 is the default one.
Between two partitions lies a gap of at least one page that belongs to neither, so free extents
never coalesce across a boundary. A shared arena with partitions is one file per partition,
each mapped at its partition's offset into one reserved address range (``MAP_FIXED``), so
offsets stay arena-wide while a client maps only the files of the partitions it may read.

Locking: one ``threading.Lock`` guards everything. An exporter's ``__del__`` may run in any
thread at any allocation point, including inside this module while the lock is held (the cyclic
GC can collect a view there). So ``__del__`` never blocks on the lock: it appends its slot to a
deque (atomic under the GIL) and drains the deque only if the lock is free at once. Every public
method drains the deque first, so no caller ever observes a pin that has been dropped.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import ctypes
import itertools
import logging
import mmap
import operator
import os
import sys
import tempfile
import threading
import weakref
from typing import NamedTuple

import numpy as np

from tairstore.errors import CapacityError, InvalidArgumentError

__all__ = ["DEFAULT_GRANULARITY", "DramArena", "SharedBacking", "Slot"]

# One OS page: slots start page-aligned (usable for O_DIRECT I/O to the SSD tier) and the
# rounding waste stays small next to the 64 KiB minimum typical block.
DEFAULT_GRANULARITY = 4096
#: From this size on a slot is filled with ``np.copyto``, which releases the GIL while it copies;
#: below it with a ``memoryview`` assignment, which holds the GIL but costs about 1 µs less.
COPY_RELEASES_GIL_BYTES = 256 * 1024

#: Linux madvise advice values (uapi/asm-generic/mman-common.h).
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable without touching their bytes
#: Bytes populated per madvise call of the background prefault (a stop request is seen
#: between two calls).
PREFAULT_CHUNK = 64 << 20

_log = logging.getLogger(__name__)


def _madvise():
    """libc's ``madvise`` through ctypes (which releases the GIL during the call), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class Slot(NamedTuple):
    """A live allocation in a :class:`DramArena`.

    Attributes:
        offset: byte offset of the slot in the arena (a multiple of the granularity).
        size: the number of bytes requested; views are exactly this long.
        reserved: ``size`` rounded up to the granularity; what the slot takes from the arena.
        generation: unique per allocation, so a stale handle to a reused offset is refused.
    """

    offset: int
    size: int
    reserved: int
    generation: int


_new_tuple = tuple.__new__


class SharedBacking:
    """Where a shared arena lives: a file others on the host may map (see the module doc).

    Args:
        directory: where the file is created (``/dev/shm``, or a hugetlbfs mount).
        group: a group name or id allowed to map it read-only (mode ``0640``); None: owner
            only (``0600``).

    Attributes (once an arena uses it): ``path``, ``mapped_bytes`` (the file's size),
    ``shift`` (where the arena's offset ``base`` is in the file), ``capacity`` (bytes of the
    arena in the file) and ``base`` (the arena offset of the file's first arena byte: 0 unless
    the file holds a partition other than the first).
    """

    def __init__(self, directory: str = "/dev/shm", group: str | int | None = None) -> None:
        self.directory = directory
        self.group = group
        self.path = ""
        self.mapped_bytes = 0
        self.shift = 0
        self.capacity = 0
        self.base = 0

    @property
    def page_bytes(self) -> int:
        """The unit files in ``directory`` are sized and mapped in: its file system's block
        size when larger than a page (hugetlbfs: the huge page size), else a page."""
        try:
            bsize = os.statvfs(self.directory).f_bsize
        except OSError:
            return mmap.PAGESIZE
        if bsize > mmap.PAGESIZE and not bsize & (bsize - 1):
            return bsize
        return mmap.PAGESIZE

    def map(self, nbytes: int) -> np.ndarray:
        """Create the file (O_EXCL, owner-only), size it, and map it shared read-write."""
        fd = self.create(nbytes)
        try:
            mm = mmap.mmap(fd, self.mapped_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self.unlink()
            raise
        os.close(fd)  # the mapping keeps the pages; clients open the file by its path
        return np.frombuffer(mm, dtype=np.uint8)

    def create(self, nbytes: int) -> int:
        """Create the file (O_EXCL, owner-only or the group's), size it (``nbytes`` rounded up
        to :attr:`page_bytes`: a hugetlbfs file holds whole huge pages); returns its open fd."""
        if self.path:
            raise InvalidArgumentError("a shared backing holds one arena")
        unit = self.page_bytes
        nbytes = -(-nbytes // unit) * unit
        try:
            fd, path = tempfile.mkstemp(prefix="tairstore-arena-", dir=self.directory)
        except OSError as exc:
            raise InvalidArgumentError(f"cannot create a shared arena in {self.directory!r}: {exc}") from None
        try:
            if self.group is not None:
                os.fchown(fd, -1, _gid(self.group))
                os.fchmod(fd, 0o640)
            os.ftruncate(fd, nbytes)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        self.path, self.mapped_bytes = path, nbytes
        return fd

    def unlink(self) -> None:
        """Remove the file (mappings stay valid until unmapped); clients can no longer attach."""
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __repr__(self) -> str:
        return f"SharedBacking(path={self.path!r}, bytes={self.mapped_bytes})"


def _gid(group: str | int) -> int:
    if isinstance(group, int):
        return group
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidArgumentError(f"no such group {group!r} for the shared arena") from None


class _FixedMapping:
    """One reserved address range with a shared file mapped at each partition's offset.

    numpy keeps this object as the base of every array made from it; the range is unmapped
    when the last of them is gone (never while a view could still read it).
    """

    def __init__(self, span: int, align: int, backings: list, starts: list[int], caps: list[int],
                 unit: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        mmap_fn, munmap = libc.mmap, libc.munmap
        mmap_fn.restype, mmap_fn.argtypes = ctypes.c_void_p, [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        munmap.restype, munmap.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]
        # Reserved: up to the end of the last file's mapping (whole units), plus room to align.
        total = starts[-1] + -(-caps[-1] // unit) * unit + align
        noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000)
        # PROT_NONE (0): the gaps between the partitions stay unreadable.
        raw = mmap_fn(None, total, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve, -1, 0)
        if raw in (None, ctypes.c_void_p(-1).value):
            raise InvalidArgumentError(f"cannot reserve {total} bytes of address space for the "
                                       f"DRAM arena: errno {ctypes.get_errno()}")
        # Not at interpreter exit (atexit=False): daemon threads may still read views then,
        # and the process's end unmaps the range anyway.
        weakref.finalize(self, munmap, raw, total).atexit = False
        base = -(-raw // align) * align
        for backing, start, cap in zip(backings, starts, caps):
            fd = backing.create(cap)  # rounded up to the directory's page_bytes
            try:
                got = mmap_fn(base + start, backing.mapped_bytes, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_SHARED | 0x10, fd, 0)  # 0x10: MAP_FIXED
            finally:
                os.close(fd)
            if got != base + start:
                raise InvalidArgumentError(f"cannot map the DRAM arena file {backing.path!r}: "
                                           f"errno {ctypes.get_errno()}")
            backing.shift, backing.capacity, backing.base = 0, cap, start
        self.__array_interface__ = {"shape": (span,), "typestr": "|u1", "data": (base, False),
                                    "version": 3}


class _Entry:
    """Bookkeeping for one live slot (mutable, unlike the Slot handed to callers)."""

    __slots__ = ("slot", "pins", "released")

    def __init__(self, slot: Slot) -> None:
        self.slot = slot
        self.pins = 0
        self.released = False


class _Pin:
    """Exports one slot's bytes to numpy; its lifetime is the pin's lifetime."""

    __slots__ = ("__array_interface__", "_arena", "_entry")

    def __init__(self, arena: DramArena, entry: _Entry, address: int, readonly: bool) -> None:
        self.__array_interface__ = {
            "shape": (entry.slot.size,),
            "typestr": "|u1",
            "data": (address, readonly),
            "version": 3,
        }
        self._arena = arena
        self._entry = entry

    def __del__(self) -> None:
        # Minimal work, no blocking: see "Locking" in the module docstring.
        arena = self._arena
        arena._unpinned.append(self._entry)
        arena._try_drain()


class DramArena:
    """A fixed-size byte arena with a best-fit allocator and pinned zero-copy views.

    Args:
        capacity_bytes: the arena size; rounded down to a multiple of ``granularity``.
        granularity: allocation unit and alignment in bytes; a power of two.
        backing: a :class:`SharedBacking` to map the arena from (the store passes
            ``StoreConfig.dram_backing``), or with ``partitions`` one per partition (the
            default partition's first); None: anonymous private memory.
        partitions: the sizes of partitions 1, 2, ... (see the module doc); partition 0, the
            default, holds the rest of ``capacity_bytes``. None or empty: one partition.

    Raises:
        InvalidArgumentError: granularity not a positive power of two, a capacity below it,
            or partitions that leave the default one less than a granule.
    """

    def __init__(self, capacity_bytes: int, *, granularity: int = DEFAULT_GRANULARITY,
                 backing: "SharedBacking | list[SharedBacking] | None" = None,
                 partitions: "list[int] | None" = None) -> None:
        capacity_bytes = _as_int(capacity_bytes, "capacity_bytes")
        granularity = _as_int(granularity, "granularity")
        if granularity < 1 or granularity & (granularity - 1):
            raise InvalidArgumentError(f"granularity must be a power of two, got {granularity}")
        capacity = capacity_bytes - capacity_bytes % granularity
        if capacity < granularity:
            raise InvalidArgumentError(
                f"capacity_bytes {capacity_bytes} is below the granularity {granularity}"
            )
        self._granularity = granularity
        caps = [0] + [_as_int(n, "partition bytes") // granularity * granularity for n in partitions or ()]
        if any(n < granularity for n in caps[1:]):
            raise InvalidArgumentError(f"every DRAM partition needs at least {granularity} bytes")
        caps[0] = capacity - sum(caps[1:])
        if caps[0] < granularity:
            raise InvalidArgumentError(
                f"the DRAM partitions ({sum(caps[1:])} bytes) leave the default partition less "
                f"than {granularity} of the {capacity} bytes")
        backings = list(backing) if isinstance(backing, (list, tuple)) else [backing]
        # Partition i starts at _starts[i]; a gap of at least a page (and a granule) follows
        # each, so no free extent can reach into the next. Shared partitions are files mapped
        # in place: starts and mapped lengths in the files' unit (a huge page on hugetlbfs).
        unit = max((b.page_bytes for b in backings if b is not None), default=mmap.PAGESIZE)
        align = max(granularity, mmap.PAGESIZE, unit)
        starts, pos = [], 0
        for n in caps:
            starts.append(pos)
            pos = -(-(pos + -(-n // unit) * unit + align) // align) * align
        span = starts[-1] + caps[-1]
        self._capacity = capacity = sum(caps)
        self._caps, self._starts = caps, starts
        # np.zeros maps pages lazily, so a large arena costs memory only once written. One
        # extra granule lets the usable part start on a granularity boundary.
        if backing is not None and len(backings) != len(caps):
            raise InvalidArgumentError(f"{len(caps)} DRAM partitions need as many shared backings, "
                                       f"got {len(backings)}")
        self.backing = backings[0]
        self.backings = backings if backing is not None else []
        if backing is None:
            raw = np.zeros(span + granularity, dtype=np.uint8)
        elif len(caps) == 1:  # a fresh file reads as zeros too, and is paged in as lazily
            raw = self.backing.map(capacity + granularity)
        else:
            raw = np.asarray(_FixedMapping(span, align, backings, starts, caps, unit))
        shift = -raw.ctypes.data % granularity
        self._buf = raw[shift : shift + span]
        if backing is not None and len(caps) == 1:
            self.backing.shift, self.backing.capacity = shift, capacity
        self._base = self._buf.ctypes.data
        self._bytes = memoryview(self._buf)  # slice assignment: the cheapest copy into a slot

        self._lock = threading.Lock()
        self._unpinned: collections.deque[_Entry] = collections.deque()
        self._generations = itertools.count(1)
        self._live: dict[int, _Entry] = {}
        self._used = 0
        self._pinned = 0
        self._pending = 0
        self._used_in = [0] * len(caps)  # reserved bytes per partition
        # (length, start) of free extents, sorted, one list per partition.
        self._free_lists: list[list[tuple[int, int]]] = [[] for _ in caps]
        self._free_by_start: dict[int, int] = {}
        self._free_by_end: dict[int, int] = {}
        for start, n in zip(starts, caps):
            self._insert_free(start, n)
        self._prefault_stop: threading.Event | None = None

    # ----------------------------------------------------------------------------- allocation

    def alloc(self, size: int, part: int = 0) -> Slot | None:
        """Reserve a slot of at least ``size`` bytes in partition ``part``.

        Returns:
            the slot, or None when no free extent is large enough (evict, then retry).

        Raises:
            InvalidArgumentError: ``size`` is not a positive integer.
            CapacityError: ``size`` exceeds the whole partition (``dimension="block_size"``),
                so no amount of eviction would help.
        """
        if type(size) is not int:  # the store passes checked ints: skip the conversion then
            size = _as_int(size, "size")
        if size < 1:
            raise InvalidArgumentError(f"size must be positive, got {size}")
        g = self._granularity
        reserved = (size + g - 1) // g * g
        if reserved > self._caps[part]:
            what = "DRAM arena" if len(self._caps) == 1 else f"DRAM partition {part}"
            raise CapacityError(
                f"block of {size} bytes exceeds the {what} ({self._caps[part]} bytes)",
                dimension="block_size",
            )
        free = self._free_lists[part]
        with self._lock:
            if self._unpinned:
                self._drain()
            i = bisect.bisect_left(free, (reserved,))
            if i == len(free):
                return None
            length, start = free[i]
            rest = length - reserved
            if rest and (i == 0 or free[i - 1] < (rest, start + reserved)):
                # The tail keeps its place in the size order (the common case: carving from
                # the largest extent): update it in place. Its neighbours are this slot and a
                # live slot (free extents are always coalesced), so it needs no merging.
                free[i] = (rest, start + reserved)
                del self._free_by_start[start]
                self._free_by_start[start + reserved] = rest
                self._free_by_end[start + length] = start + reserved
            else:
                self._remove_free(start, length)
                if rest:
                    self._insert_free(start + reserved, rest)
            # tuple.__new__ skips the NamedTuple's Python-level constructor (one per put).
            slot = _new_tuple(Slot, (start, size, reserved, next(self._generations)))
            self._live[start] = _Entry(slot)
            self._used += reserved
            self._used_in[part] += reserved
            return slot

    def release(self, slot: Slot) -> bool:
        """Give a slot back: at once if no view pins it, else when its last view goes.

        Returns:
            True if the extent is free now, False if freeing waits for pinned views.

        Raises:
            InvalidArgumentError: the slot is not live in this arena or was already released.
        """
        with self._lock:
            self._drain()
            entry = self._entry_of(slot)
            entry.released = True
            if entry.pins:
                self._pending += slot.reserved
                return False
            self._reclaim(entry)
            return True

    def free(self, slot: Slot) -> bool:
        """Same as :meth:`release`; the name a writer aborting its slot reaches for."""
        return self.release(slot)

    # ----------------------------------------------------------------------------------- views

    def writable_view(self, slot: Slot) -> memoryview:
        """A writable view of exactly ``slot.size`` bytes, for the writer to fill.

        It pins the slot like a read view does, so a writer that outlives an abort cannot
        scribble over a block allocated later in the same place.
        """
        return self._view(slot, readonly=False)

    def pinned_view(self, slot: Slot) -> memoryview:
        """A read-only, zero-copy view of exactly ``slot.size`` bytes that pins the slot.

        The bytes do not change while the view, or anything derived from it, is alive (R2).

        Raises:
            InvalidArgumentError: the slot is not live or was already released.
        """
        return self._view(slot, readonly=True)

    def _pin_locked(self, slot: Slot) -> _Entry:
        """Pin a live slot (lock held); the pin goes through ``_unpinned`` like a view's."""
        self._drain()
        entry = self._entry_of(slot)
        if entry.pins == 0:
            self._pinned += slot.reserved
        entry.pins += 1
        return entry

    def pin(self, slot: Slot) -> object:
        """Pin a live slot without a view; returns the token :meth:`unpin` takes.

        A pinned slot is never evicted by the store (its policies skip pinned copies) and its
        extent is not reused until the pin goes, even after :meth:`release`.
        """
        with self._lock:
            return self._pin_locked(slot)

    def unpin(self, token: object) -> None:
        """Drop a pin taken by :meth:`pin` (a released slot is reclaimed with its last pin)."""
        self._unpinned.append(token)  # type: ignore[arg-type]
        self._try_drain()

    def held_view(self, slot: Slot) -> memoryview:
        """A read-only view of a slot whose pin the caller holds (no pin of its own)."""
        return memoryview(self._buf[slot.offset : slot.offset + slot.size]).toreadonly()

    def _view(self, slot: Slot, *, readonly: bool) -> memoryview:
        with self._lock:
            entry = self._pin_locked(slot)
            pin = _Pin(self, entry, self._base + slot.offset, readonly)
        # Outside the lock: if numpy fails here, dropping `pin` unpins through the normal path.
        return memoryview(np.asarray(pin))

    def copy_in(self, slot: Slot, src) -> None:
        """Copy ``src`` (exactly ``slot.size`` bytes) into a slot its writer owns.

        No view and no pin: the caller guarantees nobody can release the slot meanwhile (the
        store holds the write session's lock, which an abort also takes).
        """
        if slot.size < COPY_RELEASES_GIL_BYTES:
            try:  # a flat byte buffer (what the store passes): one memcpy, little call overhead
                self._bytes[slot.offset : slot.offset + slot.size] = src
                return
            except (TypeError, ValueError):  # another format or shape: numpy sorts it out
                pass
        # numpy releases the GIL while it copies: another thread can copy or checksum meanwhile.
        np.copyto(self._buf[slot.offset : slot.offset + slot.size], np.frombuffer(src, np.uint8))

    def copy_out(self, slot: Slot, dst) -> int:
        """Copy a slot's bytes into the writable buffer ``dst``; returns ``slot.size``.

        The slot is pinned for the duration of the copy (a release meanwhile waits), without
        building a view object: the cheap path for ``get_into``.

        Raises:
            InvalidArgumentError: the slot is not live or was already released.
        """
        with self._lock:
            entry = self._pin_locked(slot)
        try:
            np.copyto(np.frombuffer(dst, np.uint8, count=slot.size),
                      self._buf[slot.offset : slot.offset + slot.size])
        finally:
            self._unpinned.append(entry)
            self._try_drain()
        return slot.size

    def crc32c(self, slot: Slot) -> int:
        """crc32c of a slot's bytes (the caller keeps the slot live)."""
        from tairstore.format.checksum import crc32c

        return crc32c(self._buf[slot.offset : slot.offset + slot.size])

    def prefault(self, *, background: bool = True) -> str:
        """Fault the whole arena in, so that puts do not pay first-touch page faults.

        A first write to a fresh anonymous page costs a fault and the zeroing of the page (on
        a virtual machine, often a fault in the hypervisor too): measured at 15-150 us per
        64 KiB block put, several times the copy itself. On Linux 5.14+ the arena is advised
        for transparent huge pages and populated with ``MADV_POPULATE_WRITE``, which never
        changes a byte, so it may run in a background thread while blocks are written (in
        PREFAULT_CHUNK steps, the GIL released). Elsewhere every page is written once, which
        is only safe before the first allocation: then it runs now, whatever ``background``.

        Returns ``"background"``, ``"done"`` or ``"skipped"`` (slots already allocated and no
        populate support).
        """
        madvise = _madvise()
        page = mmap.PAGESIZE
        # Each partition's whole pages (the gaps between partitions are not mapped when the
        # arena is shared); one range when the arena is not partitioned.
        ranges = []
        for pstart, n in zip(self._starts, self._caps):
            start = -(-(self._base + pstart) // page) * page
            end = (self._base + pstart + n) // page * page
            if end > start:
                ranges.append((start, end))
        if madvise is not None and ranges:
            for start, end in ranges:
                madvise(start, end - start, MADV_HUGEPAGE)  # a hint: failure changes nothing
            # The first PREFAULT_CHUNK bytes now (the first call tells whether populate
            # works), the rest in the background.
            now, later, budget = [], [], PREFAULT_CHUNK
            for start, end in ranges:
                cut = min(end, start + budget)
                if cut > start:
                    now.append((start, cut))
                    budget -= cut - start
                if end > cut:
                    later.append((cut, end))
            (start, first), rest = now[0], now[1:]
            if madvise(start, first - start, MADV_POPULATE_WRITE) == 0:
                if not later or not background:
                    self._populate(madvise, rest + later)
                    return "done"
                self._populate(madvise, rest)
                self._prefault_stop = threading.Event()
                threading.Thread(target=self._populate, args=(madvise, later),
                                 name="tairstore-dram-prefault", daemon=True).start()
                return "background"
        return self._prefault_by_writing(page)

    def _prefault_by_writing(self, page: int) -> str:
        with self._lock:
            if self._live or self._used or self._pending:
                return "skipped"  # writing pages now could overwrite a block's bytes
            for start, n in zip(self._starts, self._caps):
                self._buf[start : start + n : page] = 0
        return "done"

    def _populate(self, madvise, ranges: list[tuple[int, int]]) -> None:
        stop = self._prefault_stop
        for start, end in ranges:
            for off in range(start, end, PREFAULT_CHUNK):
                if stop is not None and stop.is_set():
                    return
                if madvise(off, min(PREFAULT_CHUNK, end - off), MADV_POPULATE_WRITE) != 0:
                    _log.info("DRAM prefault stopped: madvise errno %d", ctypes.get_errno())
                    return

    def stop_prefault(self) -> None:
        """Stop a background prefault (at close); the pages already in stay in."""
        if self._prefault_stop is not None:
            self._prefault_stop.set()

    # ------------------------------------------------------------------------------ inspection

    def pin_count(self, slot: Slot) -> int:
        """The number of live views of ``slot``; 0 once the slot has been reclaimed."""
        with self._lock:
            self._drain()
            entry = self._live.get(slot.offset)
            return entry.pins if entry is not None and entry.slot == slot else 0

    def is_pinned(self, slot: Slot) -> bool:
        """Whether any view of ``slot`` is alive (eviction must skip such slots)."""
        return self.pin_count(slot) > 0

    @property
    def memory(self) -> np.ndarray:
        """The whole arena as a writable uint8 array (to register it with a transfer engine;
        never to write blocks through: slots are written by their owners only)."""
        return self._buf

    @property
    def capacity_bytes(self) -> int:
        """The usable arena size in bytes (a multiple of the granularity)."""
        return self._capacity

    @property
    def granularity(self) -> int:
        """The allocation unit and slot alignment in bytes."""
        return self._granularity

    @property
    def used_bytes(self) -> int:
        """Bytes held by slots, counted by reserved length, including released-but-pinned ones."""
        with self._lock:
            self._drain()
            return self._used

    @property
    def free_bytes(self) -> int:
        """Bytes on the free list; ``used_bytes + free_bytes == capacity_bytes``."""
        with self._lock:
            self._drain()
            return self._capacity - self._used

    @property
    def largest_free_extent(self) -> int:
        """The largest size ``alloc`` can satisfy right now in any partition (after rounding)."""
        with self._lock:
            self._drain()
            return max((free[-1][0] for free in self._free_lists if free), default=0)

    @property
    def partitions(self) -> int:
        """The number of partitions (1: the arena is not partitioned)."""
        return len(self._caps)

    def partition_bytes(self, part: int) -> int:
        """The usable size of partition ``part``."""
        return self._caps[part]

    def partition_offset(self, part: int) -> int:
        """The arena offset where partition ``part`` starts."""
        return self._starts[part]

    def partition_used(self, part: int) -> int:
        """Reserved bytes of partition ``part`` (``used_bytes`` counts all of them)."""
        with self._lock:
            self._drain()
            return self._used_in[part]

    def partition_of(self, offset: int) -> int:
        """The partition an arena offset lies in (the one before it, for an offset in a gap)."""
        return bisect.bisect_right(self._starts, offset) - 1

    @property
    def pinned_bytes(self) -> int:
        """Reserved bytes of slots with at least one live view."""
        with self._lock:
            self._drain()
            return self._pinned

    @property
    def pending_free_bytes(self) -> int:
        """Reserved bytes of released slots still waiting for their views to go."""
        with self._lock:
            self._drain()
            return self._pending

    def check_invariants(self) -> None:
        """Verify the allocator's bookkeeping; raises AssertionError on the first violation."""
        with self._lock:
            self._drain()
            extents = sorted(
                [(e.slot.offset, e.slot.reserved, "live") for e in self._live.values()]
                + [(s, n, "free") for s, n in self._free_by_start.items()]
            )
            # Live and free extents tile each partition exactly: no gap, no overlap.
            for pstart, cap in zip(self._starts, self._caps):
                pos, prev_kind = pstart, ""
                for start, length, kind in extents:
                    if not pstart <= start < pstart + cap:
                        continue
                    assert start == pos, f"{kind} extent at {start}, expected {pos}"
                    # Free space is always coalesced.
                    assert not (kind == prev_kind == "free"), f"uncoalesced free extent at {start}"
                    pos, prev_kind = start + length, kind
                assert pos == pstart + cap, f"extents end at {pos}, partition ends at {pstart + cap}"
            assert all(any(s <= start < s + n for s, n in zip(self._starts, self._caps))
                       for start, _, _ in extents), "an extent outside every partition"
            for part, free in enumerate(self._free_lists):
                assert sorted((n, s) for s, n in self._free_by_start.items()
                              if self.partition_of(s) == part) == free
                assert self._used_in[part] == sum(e.slot.reserved for e in self._live.values()
                                                  if self.partition_of(e.slot.offset) == part)
            assert {s + n: s for s, n in self._free_by_start.items()} == self._free_by_end
            assert self._used == sum(e.slot.reserved for e in self._live.values())
            assert self._pinned == sum(e.slot.reserved for e in self._live.values() if e.pins)
            assert self._pending == sum(e.slot.reserved for e in self._live.values() if e.released)

    def __repr__(self) -> str:
        return (
            f"DramArena(capacity={self._capacity}, used={self._used}, "
            f"slots={len(self._live)}, free_extents={sum(map(len, self._free_lists))})"
        )

    # ------------------------------------------------------------------------------- internals

    def _entry_of(self, slot: Slot) -> _Entry:
        """The live, unreleased entry for ``slot`` (lock held)."""
        entry = self._live.get(slot.offset)
        if entry is None or entry.slot != slot:
            raise InvalidArgumentError(f"{slot!r} is not a live slot of this arena")
        if entry.released:
            raise InvalidArgumentError(f"{slot!r} was already released")
        return entry

    def _try_drain(self) -> None:
        # Non-blocking on purpose: the lock may be held by this very thread (see docstring).
        if self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        """Apply the unpins queued by views that died (lock held)."""
        while self._unpinned:
            entry = self._unpinned.popleft()
            entry.pins -= 1
            if entry.pins == 0:
                self._pinned -= entry.slot.reserved
                if entry.released:
                    self._pending -= entry.slot.reserved
                    self._reclaim(entry)

    def _reclaim(self, entry: _Entry) -> None:
        """Return an unpinned slot's extent to the free list, merging neighbours (lock held)."""
        start, length = entry.slot.offset, entry.slot.reserved
        del self._live[start]
        self._used -= length
        self._used_in[self.partition_of(start)] -= length
        before = self._free_by_end.get(start)
        if before is not None:
            self._remove_free(before, start - before)
            length += start - before
            start = before
        after_len = self._free_by_start.get(start + length)
        if after_len is not None:
            self._remove_free(start + length, after_len)
            length += after_len
        self._insert_free(start, length)

    def _free_list(self, start: int) -> list[tuple[int, int]]:
        return self._free_lists[self.partition_of(start)]

    def _insert_free(self, start: int, length: int) -> None:
        bisect.insort(self._free_list(start), (length, start))
        self._free_by_start[start] = length
        self._free_by_end[start + length] = start

    def _remove_free(self, start: int, length: int) -> None:
        free = self._free_list(start)
        i = bisect.bisect_left(free, (length, start))
        del free[i]
        del self._free_by_start[start]
        del self._free_by_end[start + length]


def _as_int(value: int, name: str) -> int:
    """``value`` as an int, refusing bools and floats with InvalidArgumentError."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}") from None
