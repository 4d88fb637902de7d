"""Compaction: asynchronous deletion for the SSD segment log.

Deleting or evicting a block only marks its record dead; the space comes back when the whole
segment file goes. The compactor picks segments by live ratio, copies their live records to the
head (byte for byte: a compressed payload stays compressed), retargets the index, and deletes
the old file once its readers are gone.

Theory of operation — one segment, and why each step is in its place:

When: a segment with no live record is reclaimed at once; otherwise background compaction
starts once the files fill 90% of the usable capacity, taking the emptiest segment whose live
ratio is at most ``compaction_live_ratio``, and above 97% the emptiest segment whatever its
ratio. Waiting lets old segments die whole (deletes and evictions mostly hit old records), so
most space comes back without copying anything.

1. Snapshot, under the store lock, the keys whose records live in the segment.
2. Scan the segment's headers for tombstones. A tombstone is dropped when the key is live
   again with a newer generation, or when every other segment was written by this process
   after the tombstone's generation began (``SsdSpace.oldest_other_generation``): then no older record of the key
   exists anywhere that a rebuild from segments could resurrect. Otherwise it is copied
   forward. Segments from before a restart have an unknown minimum generation, so
   tombstones are kept while any of them exists.
3. Copy each live record (verified first: a record that fails its checksum is dropped — R1 —
   never copied forward).
4. Under the store lock, retarget each key **only if the index still points at the old place**
   (compare-and-swap: the block may have been deleted, evicted or replaced meanwhile; then the
   copy is dead space), and log the new locations as a COMMIT (session 0) plus their index
   changes, in LSN order as every other change.
5. ``wal.sync`` that COMMIT. Its ``pre_sync`` fsyncs the copies first, so a durable relocation
   never points at bytes a power loss could take away — and the old file is deleted only after
   the relocation is durable: a crash at any point leaves the index pointing at a record that
   exists (the old one, or the durable new one).
6. Delete the old segment: ``doom_segment`` under the store lock (no new reads), then, with
   the lock let go, the unlink and the directory fsync (a segment's last reader does them
   instead, if it is still being read). A crash before the unlink leaves a segment with no live
   record, which the next pass reclaims.

Requests never wait for compaction, except a write that finds the SSD files full of dead
records (the background could not keep up): it compacts in its own thread before reserving.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Callable

from tairstore.config import StoreConfig
from tairstore.engine.catalog import Catalog
from tairstore.engine.lifecycle import Journal, Lifecycle
from tairstore.engine.ssd_space import SsdSpace
from tairstore.errors import ClosedError, CorruptionError, StoreError
from tairstore.format.segment import FLAG_TOMBSTONE
from tairstore.index.records import BlockRecord
from tairstore.tiers.ssd import ReadIOError, SegmentGoneError
from tairstore.wal import Commit, CommitEntry

__all__ = ["Compactor"]

log = logging.getLogger(__name__)

# Live ratio "below 1": any segment with a dead byte.
_ANY_DEAD = 0.9999
# Background compaction waits until the SSD files fill this fraction of the usable capacity:
# records die over time (deletes and evictions mostly hit old segments), so waiting lets whole
# segments die and be dropped without copying anything. Segments with no live record at all
# are reclaimed at once whatever the fill, since that costs no copy.
_START = 0.90
# Above this fill, the emptiest segment is compacted whatever its live ratio.
_PRESSURE = 0.97


class Compactor:
    """Compacts the segment log of one store; one pass at a time.

    Args:
        lock: the store lock (guards the catalog and the SSD space).
        drop_corrupt: R1's drop of a block whose record fails its checksum.
    """

    def __init__(self, config: StoreConfig, lock: Any, life: Lifecycle, catalog: Catalog,
                 space: SsdSpace, journal: Journal,
                 drop_corrupt: Callable[[Any, Any, str], None]) -> None:
        self._config = config
        self._store_lock = lock
        self._life = life
        self._catalog = catalog
        self._space = space
        self._journal = journal
        self._drop_corrupt = drop_corrupt
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._running = False

    def stats(self) -> dict:
        """Counters: passes, segments compacted, records and bytes copied, bytes reclaimed."""
        c = self._counters
        return {
            "running": self._running,
            "segments_compacted": c["segments"],
            "records_copied": c["records"],
            "bytes_copied": c["bytes_copied"],
            "bytes_reclaimed": c["bytes_reclaimed"],
            "tombstones_kept": c["tombstones_kept"],
            "tombstones_dropped": c["tombstones_dropped"],
            "corrupt_dropped": c["corrupt"],
        }

    # -- choosing ---------------------------------------------------------------------------
    def candidates(self, max_ratio: float) -> list[tuple[float, int]]:
        """``(live ratio, segment)`` of every compactable segment at or below ``max_ratio``.

        The head (being appended to) and segments with open reservations are not compactable.
        Tombstones that must be kept count as live.
        """
        space = self._space
        with self._store_lock:
            if self._life.closed:
                return []
            head = space.log.head_segment
            out = []
            for sid, s in space.log.segment_stats().items():
                if sid == head or space.pending(sid) or s["inflight"] or s["total"] == 0:
                    continue
                if s["live"] >= s["total"]:
                    continue
                ratio = s["live"] / s["total"]
                if ratio <= max_ratio:
                    out.append((ratio, sid))
        return sorted(out)


    # -- entry points -------------------------------------------------------------------------
    def background_step(self) -> None:
        """Compact the emptiest eligible segment, if any (the maintenance thread calls this)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            fill = self._space.fill()
            if fill >= _PRESSURE:
                threshold = _ANY_DEAD
            elif fill >= _START:
                threshold = self._config.compaction_live_ratio
            else:
                threshold = 0.0
            cands = self.candidates(threshold)
            if cands:
                self._compact_segment(cands[0][1])
        finally:
            self._lock.release()

    def make_room(self, nbytes: int) -> bool:
        """Compact until the SSD files have room for ``nbytes`` more (a writer's fallback).

        Returns True if there is room now or a segment was reclaimed (worth retrying).
        """
        space = self._space
        progressed = False
        with self._lock:
            for _ in range(1024):  # bounded: each pass deletes a segment or the loop ends
                if self._life.closed or not space.files_full(nbytes):
                    return True
                cands = self.candidates(_ANY_DEAD)
                if not cands:
                    # The dead bytes may all be in the head: close it so it can be compacted.
                    space.log.roll()
                    cands = self.candidates(_ANY_DEAD)
                    if not cands:
                        return progressed
                if self._compact_segment(cands[0][1]):
                    progressed = True
        return progressed

    def run(self, *, full: bool = False) -> dict:
        """One pass over every segment at or below the live-ratio threshold (``full``: any dead byte)."""
        with self._lock:
            if full:
                self._space.log.roll()
            threshold = _ANY_DEAD if full else self._config.compaction_live_ratio
            for _, sid in self.candidates(threshold):
                self._compact_segment(sid)
        return self.stats()

    def wait_idle(self) -> None:
        """Wait for a pass in progress to finish (used by close)."""
        with self._lock:
            pass

    # -- the work -----------------------------------------------------------------------------
    def _compact_segment(self, seg: int) -> int:
        """Compact one segment (the steps of the module docstring); returns bytes reclaimed."""
        space, blocks = self._space, self._catalog.blocks
        ssd = space.log
        self._running = True
        try:
            with self._store_lock:
                if self._life.closed or self._life.fatal is not None:
                    return 0
                live = [(k, blocks[k], blocks[k].ssd) for k in space.keys_in(seg) if k in blocks]
                oldest_other = space.oldest_other_generation(seg)
            size = ssd.segment_stats().get(seg, {}).get("total", 0)
            keep = self._tombstones_to_keep(seg, oldest_other)
            moves = []
            for k, b, old in live:
                try:
                    new = ssd.copy_record(old[0], old[1], old[2], namespace=k[0], key=k[1],
                                          expected_crc=b.crc)
                except SegmentGoneError:
                    continue
                except ReadIOError as exc:
                    # The bytes may be intact: leave this segment alone for now.
                    log.warning("compaction of segment %d skipped: %s", seg, exc)
                    return 0
                except CorruptionError as exc:
                    self._counters["corrupt"] += 1
                    self._drop_corrupt(k, b, f"SSD record during compaction ({exc})")
                    continue
                moves.append((k, b, old, new))
                self._counters["records"] += 1
                self._counters["bytes_copied"] += new.length
            for ns, key, gen in keep:
                loc = ssd.write_tombstone(ns, key, gen)
                with self._store_lock:
                    space.note_tombstone(loc, gen)
            lsn = self._retarget(seg, moves)
            if lsn is not None:
                self._journal.wal.sync(lsn)
            with self._store_lock:
                if space.busy(seg) or self._life.closed:
                    return 0
                space.forget(seg)
                doomed = ssd.doom_segment(seg)
            # Unlinking frees the file's cached pages: done after the store lock is let go,
            # so writers do not wait on it.
            ssd.finish_delete(doomed)
            self._counters["segments"] += 1
            self._counters["bytes_reclaimed"] += size
            return size
        except (ClosedError, SegmentGoneError):
            return 0
        except StoreError as exc:
            log.warning("compaction of segment %d stopped: %s", seg, exc)
            return 0
        finally:
            self._running = False

    def _tombstones_to_keep(self, seg: int, oldest_other: int) -> list[tuple[str, bytes, int]]:
        keep = []
        for r in self._space.log.scan(seg, verify_payload=False, reporter=lambda n, why: None):
            if not r.flags & FLAG_TOMBSTONE:
                continue
            with self._store_lock:
                b = self._catalog.blocks.get((r.namespace, r.key))
            if (b is not None and b.generation > r.generation) or r.generation < oldest_other:
                self._counters["tombstones_dropped"] += 1
                continue
            keep.append((r.namespace, r.key, r.generation))
            self._counters["tombstones_kept"] += 1
        return keep

    def _retarget(self, seg: int, moves: list) -> int | None:
        """Point moved keys at their copies if they still point at the originals (step 4)."""
        blocks = self._catalog.blocks
        with self._store_lock:
            entries, ops = [], []
            for k, b, old, new in moves:
                if blocks.get(k) is not b or b.ssd != old:
                    continue  # deleted, evicted or replaced meanwhile: the copy is dead space
                b.ssd = (new.segment, new.offset, new.length)
                self._space.relocate(k, old, b.ssd, b.generation)
                entries.append(CommitEntry(k[0], k[1], b.size, b.crc, b.generation, b.ssd))
                ops.append((k[0], k[1], BlockRecord(b.size, b.crc, b.generation, b.created_ns,
                                                    new.segment, new.offset, new.length)))
            if not entries or self._life.fatal is not None:
                return None
            # Session 0: a relocation, replayed like any COMMIT (verified, then indexed).
            return self._journal.log(Commit(0, tuple(entries)), ops)
