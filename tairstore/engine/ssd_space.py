"""SSD space: the one owner of the segment log's bookkeeping.

Theory of operation
-------------------
The segment log (:class:`~tairstore.tiers.ssd.SegmentLog`) knows files, offsets and bytes; the
store knows which keys live where. This object joins the two and is the only place that
changes either side's accounting, so the counts cannot drift apart:

- per segment: the keys whose live record is in it, the reservations not yet committed or
  abandoned, the oldest generation written into it by this process (tombstone dropping, see
  :mod:`tairstore.engine.compaction`) and the tombstone bytes it keeps;
- in total: live record bytes (committed blocks) and reserved record bytes (open writes).

Two limits come from the configured tier size. The **files** may fill the tier but for one
segment (the room compaction copies into); **live records** stay a further segment below that,
so when the files are full the oldest segment is (nearly) all dead and compaction frees it
without copying much. Records die mostly in age order (deletes and evictions of old blocks).

No lock of its own: the store's lock guards every call (the segment log locks itself).
:meth:`check` recomputes everything from the keys and compares; the fuzz checker calls it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from tairstore.format.segment import record_length
from tairstore.tiers.ssd import Location, Reservation, SegmentLog

__all__ = ["SsdSpace", "MIN_SEGMENT_BYTES", "segment_size"]

Key = tuple[str, bytes]
Place = tuple[int, int, int]  # (segment, offset, record length)

# The SSD tier keeps one segment of headroom that user writes may not use, so compaction can
# always copy the live records of a segment before deleting it.
MIN_SEGMENT_BYTES = 64 << 10


def segment_size(ssd_bytes: int, segment_bytes: int) -> int:
    """The segment size for a tier: at most 1/32 of it, so the two segments of slack stay a
    small part of a small tier."""
    return max(MIN_SEGMENT_BYTES, min(segment_bytes, ssd_bytes // 32))


class SsdSpace:
    """Bookkeeping of the SSD tier's space (store lock held for every call).

    Args:
        log: the open segment log.
        ssd_bytes: the tier's configured capacity.
    """

    def __init__(self, log: SegmentLog, ssd_bytes: int) -> None:
        self.log = log
        self.capacity = ssd_bytes
        seg = log.segment_bytes
        #: What the files may total (all but one segment: compaction's room).
        self.file_limit = ssd_bytes - seg
        #: What live records may total (a further segment below).
        self.live_limit = max(seg, self.file_limit - seg)
        self.live = 0  # record bytes of committed blocks
        self.reserved = 0  # record bytes of open reservations
        self._keys: dict[int, set[Key]] = {}
        self._pending: Counter[int] = Counter()
        self._min_gen: dict[int, int] = {}
        self._tomb: Counter[int] = Counter()
        self.tombstone_bytes = 0

    # -- admission ----------------------------------------------------------------------------
    @staticmethod
    def need(ns: str, todo: Iterable[tuple[bytes, int]]) -> int:
        """Record bytes a batch of (key, size) needs in namespace ``ns``."""
        nsb = len(ns.encode())
        return sum(record_length(nsb, len(key), size) for key, size in todo)

    def live_excess(self, need: int) -> int:
        """Bytes of live records to evict before ``need`` more fit under the live limit."""
        return self.live + self.reserved + need - self.live_limit

    def files_full(self, need: int) -> bool:
        """True when the files have no room for ``need`` bytes until compaction runs."""
        return self.log.total_bytes + need > self.file_limit

    def room_is_coming(self) -> bool:
        """Room is held only for now: reservations that will commit or abort, or deleted
        segments whose last reader (or an fsync in flight) has not let go yet."""
        return self.reserved > 0 or self.log.retiring_bytes > 0

    def reserve(self, ns: str, key: bytes, size: int) -> Reservation:
        """Reserve one record's bytes in the log."""
        res = self.log.reserve(ns, key, size)
        self._pending[res.segment] += 1
        self.reserved += res.length
        return res

    def abandon(self, res: Reservation) -> None:
        """Give back a reservation that will not be committed."""
        self.log.abandon(res)
        self._pending[res.segment] -= 1
        self.reserved -= res.length

    def note_written(self, loc: Location, generation: int) -> None:
        """A record was written into ``loc.segment`` with ``generation``."""
        seg = loc.segment
        self._min_gen[seg] = min(self._min_gen.get(seg, generation), generation)

    # -- committed records --------------------------------------------------------------------
    def commit(self, k: Key, res: Reservation, place: Place) -> None:
        """A reservation became the live record of ``k`` at ``place``."""
        seg, _, length = place
        self._keys.setdefault(seg, set()).add(k)
        self.log.mark_live(seg, length)
        self._pending[res.segment] -= 1
        self.reserved -= res.length
        self.live += length

    def adopt(self, places: Iterable[tuple[Key, Place]]) -> None:
        """Count recovered records as live."""
        per_seg: Counter[int] = Counter()
        for k, (seg, _, length) in places:
            self._keys.setdefault(seg, set()).add(k)
            per_seg[seg] += length
        for seg, length in per_seg.items():
            self.log.mark_live(seg, length)
            self.live += length

    def remove(self, k: Key, place: Place) -> None:
        """``k``'s record at ``place`` is dead (deleted, evicted, replaced)."""
        seg, _, length = place
        keys = self._keys.get(seg)
        if keys is not None:
            keys.discard(k)
        self.log.mark_dead(seg, length)
        self.live -= length

    def relocate(self, k: Key, old: Place, new: Place, generation: int) -> None:
        """Compaction moved ``k``'s live record from ``old`` to ``new``."""
        keys = self._keys.get(old[0])
        if keys is not None:
            keys.discard(k)
        self._keys.setdefault(new[0], set()).add(k)
        self.log.mark_dead(old[0], old[2])
        self.log.mark_live(new[0], new[2])
        self.live += new[2] - old[2]
        self._min_gen[new[0]] = min(self._min_gen.get(new[0], generation), generation)

    def note_tombstone(self, loc: Location, generation: int | None = None) -> None:
        """Count a tombstone record as live space until compaction finds it droppable."""
        self.log.mark_live(loc.segment, loc.length)
        self._tomb[loc.segment] += loc.length
        self.tombstone_bytes += loc.length
        if generation is not None:
            self._min_gen.setdefault(loc.segment, generation)

    # -- segments (compaction) ----------------------------------------------------------------
    def keys_in(self, seg: int) -> list[Key]:
        """Keys whose live record is in ``seg``."""
        return list(self._keys.get(seg, ()))

    def busy(self, seg: int) -> bool:
        """True while ``seg`` holds a live key or an open reservation."""
        return bool(self._keys.get(seg)) or self._pending[seg] > 0

    def pending(self, seg: int) -> int:
        """Open reservations in ``seg``."""
        return self._pending[seg]

    def oldest_other_generation(self, seg: int) -> int:
        """The oldest generation written into any segment but ``seg`` by this process; 0 when
        some segment predates this process (its minimum is unknown)."""
        others = [g for s, g in self._min_gen.items() if s != seg]
        if any(s not in self._min_gen for s in self.log.segment_ids() if s != seg):
            return 0
        return min(others, default=1 << 64)

    def forget(self, seg: int) -> None:
        """``seg`` is being deleted: drop its bookkeeping."""
        self._keys.pop(seg, None)
        self.tombstone_bytes -= self._tomb.pop(seg, 0)
        self._min_gen.pop(seg, None)
        self._pending.pop(seg, None)

    def fill(self) -> float:
        """Files' bytes as a fraction of what they may total."""
        return self.log.total_bytes / self.file_limit

    def usage(self) -> float:
        """Live and reserved record bytes as a fraction of the live limit (the watermarks')."""
        return (self.live + self.reserved) / self.live_limit

    def stats(self) -> dict[str, Any]:
        """The SSD part of ``Store.stats()["tiers"]["ssd"]`` that this object knows."""
        total = self.log.total_bytes
        return {
            "capacity": self.capacity, "usable_bytes": self.live_limit,
            "live_record_bytes": self.live, "reserved_bytes": self.reserved, "file_bytes": total,
            "tombstone_bytes": self.tombstone_bytes,
            "dead_bytes": total - self.live - self.reserved - self.tombstone_bytes,
            "segments": len(self.log.segment_ids()), "usage": self.usage(),
        }

    def check(self, places: dict[Key, Place]) -> list[str]:
        """Recompute the bookkeeping from ``places`` (every live key's record) and compare.

        Returns the problems found (empty when consistent). Only meaningful with no write in
        flight (``reserved`` and the pending counts are then 0).
        """
        problems = []
        live = sum(p[2] for p in places.values())
        if live != self.live:
            problems.append(f"ssd space: live records total {live} bytes, counted {self.live}")
        per_seg: dict[int, set[Key]] = {}
        for k, p in places.items():
            per_seg.setdefault(p[0], set()).add(k)
        for seg in set(per_seg) | {s for s, ks in self._keys.items() if ks}:
            if per_seg.get(seg, set()) != self._keys.get(seg, set()):
                problems.append(f"ssd space: segment {seg}'s key set differs from the index")
        stats = self.log.segment_stats()
        for seg, st in stats.items():
            want = sum(p[2] for p in places.values() if p[0] == seg) + self._tomb.get(seg, 0)
            if st["live"] != want:
                problems.append(f"ssd space: segment {seg} live {st['live']} bytes, expected {want}")
        if self.reserved < 0 or any(v < 0 for v in self._pending.values()):
            problems.append("ssd space: negative reservations")
        if self.tombstone_bytes != sum(self._tomb.values()):
            problems.append("ssd space: tombstone total drifted")
        return problems
