"""Maintenance: the background thread's work.

One pass reaps expired write sessions, expires TTLs, writes write-back blocks to SSD, keeps
every tier between its watermarks,
demotes evicted blocks to the remote tier (when there is one) and takes one background
compaction step (:mod:`tairstore.engine.compaction`). The thread runs
a pass every ``maintenance_interval_s``; :meth:`Maintenance.run_pass` runs one now, which is
what tests and tools with ``background=False`` call instead of waiting for the thread.

Requests never wait for any of it: a pass takes the store lock only for metadata.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any, Callable

from tairstore.engine.capacity import TIERS, WatermarkTracker
from tairstore.engine.catalog import Catalog
from tairstore.engine.lifecycle import Journal, Lifecycle
from tairstore.engine.placement import Placement
from tairstore.errors import ClosedError, StoreError

__all__ = ["Maintenance"]

log = logging.getLogger("tairstore.engine.store")

TRUNCATE_EVERY_S = 1.0  # how often a checkpoint may trigger WAL file deletion
TTL_SWEEP_EVERY_S = 1.0  # how often the background thread expires TTLs


class Maintenance:
    """The maintenance thread and the passes it runs.

    Args:
        reap: aborts expired write sessions; returns how many.
        remove: removes whole blocks from the store (``remove(keys, tombstones=False)``).
        compactor: returns the store's compactor (None without an SSD tier).
    """

    def __init__(self, *, interval_s: float, lock: Any, life: Lifecycle, catalog: Catalog,
                 placement: Placement, watermarks: WatermarkTracker, journal: Journal,
                 counters: Counter, reap: Callable[[], int], remove: Callable[..., object],
                 compactor: Callable[[], Any]) -> None:
        self.interval_s = interval_s
        self.watermarks = watermarks
        self._lock = lock
        self._life = life
        self._catalog = catalog
        self._placement = placement
        self._journal = journal
        self._counters = counters
        self._reap = reap
        self._remove = remove
        self._compactor = compactor
        #: Demotes blocks the SSD tier evicted to the remote tier (None without one).
        self.demote: Callable[[], int] | None = None
        #: Writes write-back blocks to SSD (None unless the store has ``write_back``).
        self.flush: Callable[[], int] | None = None
        self._last_truncate = 0.0
        self._last_ttl_sweep = 0.0
        self.wake = threading.Event()
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tairstore-maintenance", daemon=True)

    # -- the thread ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread."""
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the thread and wait for a pass in progress (not from the thread itself)."""
        self.stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _loop(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.wake.clear()
            try:
                self.run_pass()
            except ClosedError:
                return
            except Exception:  # noqa: BLE001 - the thread must outlive one failed pass
                log.exception("maintenance pass failed")

    # -- one pass -----------------------------------------------------------------------------
    def run_pass(self, *, ttl_now: bool = False) -> None:
        """One pass: leases, TTLs (at most once a second unless ``ttl_now``), watermarks,
        background compaction."""
        if self._life.closed:
            return
        self._reap()
        now = time.monotonic()
        if ttl_now or now - self._last_ttl_sweep >= TTL_SWEEP_EVERY_S:
            self._last_ttl_sweep = now
            self.sweep_ttl()
        if self.flush is not None:
            # Before the watermarks: a flushed block's DRAM copy becomes evictable.
            self.flush()
        self.enforce_watermarks()
        if self.demote is not None:
            self.demote()
        compactor = self._compactor()
        if compactor is not None and self._life.fatal is None:
            compactor.background_step()

    def enforce_watermarks(self) -> None:
        """Above ``high``, evict (or drop DRAM copies) down to ``low``; log a ``warn`` crossing."""
        with self._lock:
            if self._life.closed:
                return
            for tier in TIERS:
                frac, capacity = self._placement.usage(tier)
                if capacity == 0:
                    continue
                state = self.watermarks.update(tier, frac)
                if state == "high":
                    self._counters["watermark_evictions"] += 1
                    self._placement.shed(tier, frac, capacity, self.watermarks.marks[tier])

    def sweep_ttl(self) -> int:
        """Remove the blocks whose namespace's TTL has passed; O(expired), not O(blocks)."""
        with self._lock:
            if self._life.closed or self._life.fatal is not None:
                return 0
            expired = self._catalog.expired(time.time_ns())
            if expired:
                self._remove(expired, tombstones=False)
                self._counters["expired"] += len(expired)
            return len(expired)

    def on_checkpoint(self, lsn: int) -> None:
        """The index writer made everything up to ``lsn`` durable: old WAL files may go."""
        now = time.monotonic()
        if now - self._last_truncate >= TRUNCATE_EVERY_S:
            self._last_truncate = now
            try:
                self._journal.wal.truncate_before(lsn + 1)
            except (StoreError, OSError) as exc:
                log.warning("WAL truncation failed (will retry): %s", exc)
