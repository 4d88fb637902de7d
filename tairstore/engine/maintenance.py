"""Maintenance and observation: the background thread's work, compaction, stats.

Part of :class:`tairstore.engine.store.Store` (a mixin). One maintenance pass reaps expired write
sessions, expires TTLs, keeps every tier between its watermarks and takes one background
compaction step (:mod:`tairstore.engine.compaction`).
"""

from __future__ import annotations

import logging
import time

from tairstore.engine.capacity import TIERS
from tairstore.errors import ClosedError, StoreError
from tairstore.engine.session import OPEN

__all__ = ["MaintenanceMixin"]

log = logging.getLogger("tairstore.engine.store")

TRUNCATE_EVERY_S = 1.0  # how often a checkpoint may trigger WAL file deletion


class MaintenanceMixin:
    """Background maintenance, compaction and stats of the store."""

    # ---------------------------------------------------------------------- maintenance
    def compact(self, wait: bool = True, *, full: bool = False) -> dict:
        """Run a compaction pass now (``wait``) or ask the background thread to.

        A pass rewrites the live records of every segment whose live ratio is at most
        ``compaction_live_ratio`` (``full``: of every segment holding any dead bytes, after
        closing the head segment) and deletes the old files.

        Returns:
            the compactor's counters.
        """
        self._check_open()
        if self._ssd is None:
            return {}
        if not wait:
            self._wake.set()
            return self.compactor.stats()
        return self.compactor.run(full=full)

    def _maintenance_loop(self) -> None:
        while not self._stop.wait(self.config.maintenance_interval_s):
            self._wake.clear()
            try:
                self.maintain()
            except ClosedError:
                return
            except Exception:  # noqa: BLE001 - the thread must outlive one failed pass
                log.exception("maintenance pass failed")

    def maintain(self) -> None:
        """One maintenance pass: leases, TTLs, watermarks, background compaction."""
        if self._closed:
            return
        self.reap_expired()
        now = time.monotonic()
        if now - self._last_ttl_sweep >= 1.0:
            self._last_ttl_sweep = now
            self._sweep_ttl()
        self._enforce_watermarks()
        if self._ssd is not None and self._fatal is None:
            self.compactor.background_step()

    def _enforce_watermarks(self) -> None:
        with self._lock:
            if self._closed:
                return
            for tier in TIERS:
                frac, capacity = self._usage_fraction(tier)
                if capacity == 0:
                    continue
                state = self._watermarks.update(tier, frac)
                if state == "high":
                    low = self._watermarks.marks[tier].low
                    used = frac * capacity
                    self._counters["watermark_evictions"] += 1
                    self._evict_global(tier, int(used - low * capacity))

    def _usage_fraction(self, tier: str) -> tuple[float, int]:
        if tier == "dram":
            if self._dram is None:
                return 0.0, 0
            return self._dram.used_bytes / self._dram.capacity_bytes, self._dram.capacity_bytes
        if self._ssd is None:
            return 0.0, 0
        return (self._ssd_live + self._ssd_reserved) / self._ssd_live_limit, self._ssd_live_limit

    def _sweep_ttl(self) -> None:
        with self._lock:
            if self._closed or self._fatal is not None:
                return
            now = time.time_ns()
            for ns, st in self._namespaces.items():
                if st.ttl_s is None:
                    continue
                cutoff = now - int(st.ttl_s * 1e9)
                expired = [k for k, b in self._blocks.items() if k[0] == ns and b.created_ns < cutoff]
                if expired:
                    self._remove_locked(expired, tombstones=False)
                    self._counters["expired"] += len(expired)

    def reap_expired(self) -> int:
        """Abort every session whose lease ran out; returns how many (the maintenance thread calls this)."""
        with self._lock:
            expired = [s for s in self._sessions.values() if s.expired]
        n = 0
        for s in expired:
            with s.lock, self._lock:
                if s.state == OPEN and not self._closed:
                    self._abort_locked(s, "expire")
                    n += 1
        return n

    def _on_checkpoint(self, lsn: int) -> None:
        now = time.monotonic()
        if now - self._last_truncate >= TRUNCATE_EVERY_S:
            self._last_truncate = now
            try:
                self._wal.truncate_before(lsn + 1)
            except (StoreError, OSError) as exc:
                log.warning("WAL truncation failed (will retry): %s", exc)

    # ---------------------------------------------------------------------- observability
    def stats(self) -> dict:
        """Usage per tier and namespace, watermark states, counters and configuration facts."""
        with self._lock:
            self._check_open()
            tiers: dict[str, dict] = {}
            ns_totals = {t: sum(st.used[t] for st in self._namespaces.values()) for t in TIERS}
            if self._dram is not None:
                frac, _ = self._usage_fraction("dram")
                tiers["dram"] = {
                    "blocks": sum(1 for b in self._blocks.values() if b.dram is not None),
                    "bytes": ns_totals["dram"], "capacity": self._dram.capacity_bytes,
                    "used_bytes": self._dram.used_bytes, "pinned_bytes": self._dram.pinned_bytes,
                    "usage": frac, "watermark": self._watermarks.state["dram"],
                }
            if self._ssd is not None:
                frac, _ = self._usage_fraction("ssd")
                tiers["ssd"] = {
                    "blocks": sum(1 for b in self._blocks.values() if b.ssd is not None),
                    "bytes": ns_totals["ssd"], "capacity": self.config.ssd_bytes,
                    "usable_bytes": self._ssd_live_limit, "live_record_bytes": self._ssd_live,
                    "reserved_bytes": self._ssd_reserved, "file_bytes": self._ssd.total_bytes,
                    "tombstone_bytes": sum(self._seg_tomb.values()),
                    "dead_bytes": (self._ssd.total_bytes - self._ssd_live - self._ssd_reserved
                                   - sum(self._seg_tomb.values())),
                    "segments": len(self._ssd.segment_ids()), "usage": frac,
                    "watermark": self._watermarks.state["ssd"],
                }
            namespaces = {
                name: {"blocks": st.blocks, "bytes": st.used_total,
                       "tiers": {t: st.used[t] for t in TIERS}, "quota": st.quota_report()}
                for name, st in self._namespaces.items()}
            counters = {name: self._counters.get(name, 0) for name in (
                "hits", "misses", "hits_dram", "hits_ssd", "checksum_errors", "read_errors",
                "puts", "deletes", "trimmed", "expired", "bytes_written", "evictions_dram",
                "evictions_ssd", "watermark_evictions", "promotions", "leases_expired",
                "recovered_blocks", "recovery_dropped")}
            return {
                "blocks": len(self._blocks),
                "tiers": tiers,
                "namespaces": namespaces,
                "counters": counters,
                "compaction": self.compactor.stats() if self._ssd is not None else {},
                "watermark_crossings": dict(self._watermarks.crossings),
                "sessions_open": len(self._sessions),
                "durability": self.config.durability if self._durable else "volatile",
                "volatile": not self._durable,
                "writable": self._fatal is None,
            }

