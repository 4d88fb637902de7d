"""The read path: get, get_into, exists, match, tier_of.

Part of :class:`tairstore.engine.store.Store` (a mixin). Lookups and pins happen under the store
lock; copies, SSD reads and checksums outside it. A DRAM hit is a pinned zero-copy view (R2);
an SSD read is verified (header, namespace and key, payload crc32c) and a mismatch is a miss
that drops the block (R1); a read I/O error is a miss and a counter.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from tairstore.config import DEFAULT_NAMESPACE
from tairstore.errors import CapacityError, CorruptionError, InvalidArgumentError, StoreError
from tairstore.format.checksum import crc32c
from tairstore.engine.match import MatchResult, match_mask
from tairstore.engine.session import PendingBlock
from tairstore.tiers.ssd import ReadIOError, SegmentGoneError
from tairstore.validate import check_out

if TYPE_CHECKING:
    from tairstore.engine.store import _Block

__all__ = ["ReadPathMixin"]

log = logging.getLogger("tairstore.engine.store")


class ReadPathMixin:
    """Reads of the store."""

    # ---------------------------------------------------------------------------- read path
    def get(self, key: bytes, *, namespace: str = DEFAULT_NAMESPACE) -> memoryview | None:
        """The block's bytes, or None on a miss.

        From DRAM this is a zero-copy read-only view that pins its slot: the bytes never change
        while the view (or anything made from it) is alive (R2). From SSD the block is read and
        verified; on its first or second SSD hit (``promote_on``) it is copied into DRAM.
        """
        k = (self._ns(namespace), self._key(key))
        with self._lock:
            self._check_open()
            b = self._lookup(k)
            if b is None:
                return None
            if b.dram is not None:
                view = self._dram.pinned_view(b.dram)
                if not self.config.verify_dram_reads:
                    self._count_hit("dram")
                    return view
        if b.dram is not None:
            if crc32c(view) == b.crc:
                with self._lock:
                    self._count_hit("dram")
                return view
            view.release()
            self._drop_corrupt(k, b, "DRAM copy")
            return None
        return self._get_from_ssd(k, b)

    def _lookup(self, k: tuple[str, bytes]) -> _Block | None:
        """The block, touching its policies; None (counted) on a miss or expiry (store lock held)."""
        b = self._blocks.get(k)
        if b is not None:
            st = self._namespaces[k[0]]
            if st.ttl_s is not None and time.time_ns() - b.created_ns > st.ttl_s * 1e9:
                self._counters["expired"] += 1
                self._remove_locked([k], tombstones=False)
                b = None
            else:
                if b.dram is not None:
                    st.policies["dram"].on_access(k[1])
                if b.ssd is not None:
                    st.policies["ssd"].on_access(k[1])
                return b
        self._counters["misses"] += 1
        return None

    def _count_hit(self, tier: str) -> None:
        self._counters["hits"] += 1
        self._counters["hits_" + tier] += 1

    def _get_from_ssd(self, k, b: _Block) -> memoryview | None:
        slot = None
        with self._lock:
            b.ssd_hits += 1
            if self._wants_promotion(b) and self._fatal is None and not self._closed:
                st = self._namespaces[k[0]]
                p = PendingBlock(b.size)
                try:
                    self._reserve_dram(st, p, required=False)
                except CapacityError:
                    pass
                slot = p.dram
        if slot is not None:
            dst = self._dram.writable_view(slot)
            ok = self._read_ssd(k, b, dst)
            dst.release()
            with self._lock:
                st = self._namespaces.get(k[0])
                if ok and self._blocks.get(k) is b and b.dram is None and not self._closed:
                    b.dram = slot
                    st.policies["dram"].on_insert(k[1], b.size, b.parent)
                    self._counters["promotions"] += 1
                    return self._dram.pinned_view(slot)
                self._dram.release(slot)
                if st is not None:
                    st.used["dram"] -= b.size
                if not ok:
                    return None
        buf = bytearray(b.size)
        if not self._read_ssd(k, b, buf):
            return None
        return memoryview(buf).toreadonly()

    def _wants_promotion(self, b: _Block) -> bool:
        if self._dram is None or b.size > self._dram.capacity_bytes:
            return False
        mode = self.config.promote_on
        return mode == "first" or (mode == "second" and b.ssd_hits >= 2)

    def _read_ssd(self, k, b: _Block, out) -> bool:
        """Read and verify a block from SSD into ``out``; count a hit or a miss."""
        seg, off, length = b.ssd
        try:
            self._ssd.read_into(seg, off, length, out, namespace=k[0], key=k[1], expected_crc=b.crc)
        except ReadIOError as exc:
            # The disk failed to return the bytes; they may well be intact: a miss and a
            # counter, and the block stays (a checksum mismatch below drops it).
            with self._lock:
                self._counters["misses"] += 1
                self._counters["read_errors"] += 1
            log.warning("read of block %s failed: %s", k[1].hex()[:16], exc)
            return False
        except SegmentGoneError:
            # Evicted or compacted between our lookup and the read. Compaction may have moved
            # it: look once more before calling it a miss.
            with self._lock:
                nb = self._blocks.get(k)
            if nb is not None and nb is b and b.ssd != (seg, off, length):
                return self._read_ssd(k, b, out)
            with self._lock:
                self._counters["misses"] += 1
            return False
        except CorruptionError as exc:
            self._drop_corrupt(k, b, f"SSD record ({exc})")
            return False
        except (StoreError, OSError) as exc:
            with self._lock:
                self._counters["misses"] += 1
                self._counters["read_errors"] += 1
            log.warning("read of block %s failed: %s", k[1].hex()[:16], exc)
            return False
        with self._lock:
            self._count_hit("ssd")
        return True

    def _drop_corrupt(self, k, b: _Block, where: str) -> None:
        """R1: a block failing its checksum is a miss, is counted, and leaves the index."""
        log.error("checksum mismatch in %s of block %s/%s: dropped", where, k[0], k[1].hex()[:16])
        with self._lock:
            self._counters["checksum_errors"] += 1
            self._counters["misses"] += 1
            if self._blocks.get(k) is b:
                self._remove_locked([k], tombstones=False)

    def get_into(self, key: bytes, out: Any, *, namespace: str = DEFAULT_NAMESPACE) -> int:
        """Copy the block into the writable buffer ``out``; the bytes copied, 0 on a miss.

        Raises:
            InvalidArgumentError: ``out`` is not writable or is smaller than the block.
        """
        k = (self._ns(namespace), self._key(key))
        dst = check_out(out)
        with self._lock:
            self._check_open()
            b = self._blocks.get(k)
            if b is not None and len(dst) < b.size:
                raise InvalidArgumentError(f"out holds {len(dst)} bytes; the block has {b.size}")
            b = self._lookup(k)
            if b is None:
                return 0
            slot = b.dram
            if slot is not None:
                # Pinned by copy_out itself; taking the pin under the store lock means no
                # eviction can release the slot first.
                self._dram.copy_out(slot, dst)
        if slot is not None:
            if self.config.verify_dram_reads and crc32c(dst[: b.size]) != b.crc:
                self._drop_corrupt(k, b, "DRAM copy")
                return 0
            with self._lock:
                self._count_hit("dram")
            return b.size
        with self._lock:
            b.ssd_hits += 1
        return b.size if self._read_ssd(k, b, dst[: b.size]) else 0

    def tier_of(self, key: bytes, *, namespace: str = DEFAULT_NAMESPACE) -> str | None:
        """The fastest tier holding ``key`` now (``"dram"``, ``"ssd"``) or None; no side effects.

        A hint for callers that route reads (the daemon serves DRAM hits on its event loop):
        the answer can change right after it is given.
        """
        k = (self._ns(namespace), self._key(key))
        with self._lock:
            self._check_open()
            b = self._blocks.get(k)
            return None if b is None else ("dram" if b.dram is not None else "ssd")

    @property
    def volatile(self) -> bool:
        """True for a store without SSD tier: nothing it holds survives ``close()``."""
        return not self._durable

    def exists(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE) -> list[bool]:
        """Per key, whether it is stored (committed and not deleted)."""
        ns = self._ns(namespace)
        keys = self._keys(keys)
        with self._lock:
            self._check_open()
            return [(ns, k) in self._blocks for k in keys]

    def match(self, keys: list[bytes], mode: str = "prefix", window: int | None = None, *,
              namespace: str = DEFAULT_NAMESPACE) -> MatchResult:
        """Match a chain of keys: ``prefix``, ``exact`` or ``sliding_window`` (see :mod:`tairstore.engine.match`)."""
        ns = self._ns(namespace)
        keys = self._keys(keys)
        hits: list[bool] = []
        tiers: list[str | None] = []
        with self._lock:
            self._check_open()
            get = self._blocks.get
            for k in keys:
                b = get((ns, k))
                if b is None:
                    hits.append(False)
                    tiers.append(None)
                else:
                    hits.append(True)
                    tiers.append("dram" if b.dram is not None else "ssd")
        return match_mask(hits, tiers, mode, window)

