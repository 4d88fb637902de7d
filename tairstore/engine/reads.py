"""The read path: get, get_into, exists, match, tier_of.

A part of the store: it reads the catalog and the tiers and holds no state of its own but its
collaborators. Lookups and pins happen under the store lock; copies, SSD reads and checksums
outside it. W1 holds because the catalog only lists committed keys. A DRAM hit is a pinned zero-copy view (R2);
an SSD read is verified (header, namespace and key, payload crc32c) and a mismatch is a miss
that drops the block (R1); a read I/O error is a miss and a counter.
"""

from __future__ import annotations

import logging
import operator
import time
from collections import Counter
from itertools import repeat
from typing import TYPE_CHECKING, Any, Callable

from tairstore.config import StoreConfig
from tairstore.engine.catalog import Block, Catalog
from tairstore.engine.lifecycle import Lifecycle
from tairstore.engine.match import MatchResult, match_mask
from tairstore.engine.session import NO_SLOT, PendingBlock
from tairstore.errors import CapacityError, CorruptionError, InvalidArgumentError, StoreError
from tairstore.format.checksum import crc32c
from tairstore.tiers.ssd import ReadIOError, SegmentGoneError

if TYPE_CHECKING:
    from tairstore.engine.placement import Placement
    from tairstore.tiers.dram import DramArena
    from tairstore.tiers.ssd import SegmentLog

__all__ = ["Reads"]

log = logging.getLogger("tairstore.engine.store")

Key = tuple[str, bytes]


class Reads:
    """Reads of the store. Arguments are checked by the store facade; keys arrive as
    ``(namespace, key)`` tuples.

    Args:
        remove: removes whole blocks from the store (``remove(keys, tombstones=False)``).
    """

    def __init__(self, config: StoreConfig, lock: Any, life: Lifecycle, catalog: Catalog,
                 dram: "DramArena | None", ssd: "SegmentLog | None", placement: "Placement",
                 counters: Counter, remove: Callable[..., object]) -> None:
        self.config = config
        self._lock = lock
        self._life = life
        self._catalog = catalog
        self._dram = dram
        self._ssd = ssd
        self._placement = placement
        self._counters = counters
        self._remove = remove
        #: The remote tier's part (:class:`~tairstore.engine.remote.RemotePart`), or None.
        self.remote: Any = None
        #: Copies a remote hit into the local tiers: ``promote(ns, key, view)``.
        self.promote: Callable[..., Any] | None = None
        #: Reads a remote hit straight into a DRAM reservation and commits it:
        #: ``promote_into(ns, key, size, produce)`` (:meth:`Writes.put_produced`).
        self.promote_into: Callable[..., Any] | None = None

    # ---------------------------------------------------------------------------- read path
    def get(self, k: Key) -> memoryview | None:
        """The block's bytes, or None on a miss (see :meth:`tairstore.engine.store.Store.get`)."""
        with self._lock:
            self._life.check_open()
            b = self._lookup(k, count_miss=self.remote is None)
            if b is None and self.remote is None:
                return None
            if b is not None and b.dram is not None:
                # R2: the view pins its slot; eviction skips pinned slots.
                view = self._dram.pinned_view(b.dram)
                if not self.config.verify_dram_reads:
                    self._count_hit("dram")
                    return view
        if b is None:
            return self._get_from_remote(k)
        if b.dram is not None:
            if crc32c(view) == b.crc:
                with self._lock:
                    self._count_hit("dram")
                return view
            view.release()
            self.drop_corrupt(k, b, "DRAM copy")
            return None
        return self._get_from_ssd(k, b)

    def _get_from_remote(self, k: Key) -> memoryview | None:
        """A local miss asked of the remote tier (verified there); a hit is copied into the
        local tiers unless ``promote_on="never"`` — read straight into a DRAM reservation when
        one is to be had, else into a buffer and then copied."""
        if self.promote_into is not None and self.config.promote_on != "never":
            view = self._promote_from_remote(k)
            if view is not NO_SLOT:
                return view
        view = self.remote.read(k[0], k[1])
        with self._lock:
            if view is None:
                self._counters["misses"] += 1
                self._counters["misses_remote"] += 1
                return None
            self._count_hit("remote")
        if self.promote is not None and self.config.promote_on != "never":
            try:
                self.promote(k[0], k[1], view)
            except StoreError as exc:  # full, or failed: the caller still gets its bytes
                log.debug("promotion of a remote hit skipped: %s", exc)
        return view

    def _promote_from_remote(self, k: Key) -> Any:
        """The remote block read into its new DRAM copy and committed; a pinned view of that
        copy, None on a miss, or ``NO_SLOT`` when this path cannot serve it (no DRAM
        reservation, the key written meanwhile, the copy gone again): the caller reads into a
        buffer instead."""
        ns, key = k
        size = self.remote.size(ns, key)
        if size is not None:
            try:
                got = self.promote_into(ns, key, size, lambda view: self.remote.read_into(ns, key, view))
            except StoreError as exc:  # full, or failed: the plain read may still serve it
                log.debug("promotion of a remote hit into DRAM skipped: %s", exc)
                return NO_SLOT
            if got is NO_SLOT:
                return NO_SLOT
            if got == size:
                with self._lock:
                    b = self._catalog.blocks.get(k)
                    if b is None or b.dram is None:
                        return NO_SLOT
                    self._count_hit("remote")
                    return self._dram.pinned_view(b.dram)
        with self._lock:
            self._counters["misses"] += 1
            self._counters["misses_remote"] += 1
        return None

    def get_many(self, ns: str, keys: list[bytes], memory_only: bool) -> list[memoryview | None] | None:
        """:meth:`get` of many keys with one store-lock round for the lookups.

        DRAM hits are pinned views taken under that one lock; SSD-resident blocks are read
        afterwards, one by one, as :meth:`get` reads them. With ``memory_only`` the call answers
        only from memory: it returns None, touching nothing (no policy, no counter), when any
        stored key has no DRAM copy — the caller then asks again without it (the daemon does
        so from a worker thread instead of its event loop).
        """
        out: list[memoryview | None] = [None] * len(keys)
        from_ssd: list[tuple[int, Key, Block]] = []
        to_verify: list[tuple[int, Key, Block]] = []
        verify = self.config.verify_dram_reads
        with self._lock:
            self._life.check_open()
            if memory_only:
                blocks = self._catalog.blocks
                for key in keys:
                    b = blocks.get((ns, key))
                    if (b is not None and b.dram is None) or (b is None and self.remote is not None):
                        return None  # on SSD, or perhaps on the remote tier: not from memory
            remote_misses: list[int] = []
            for i, key in enumerate(keys):
                k = (ns, key)
                b = self._lookup(k, count_miss=self.remote is None)
                if b is None:
                    remote_misses.append(i)
                    continue
                if b.dram is None:
                    from_ssd.append((i, k, b))
                    continue
                out[i] = self._dram.pinned_view(b.dram)
                if verify:
                    to_verify.append((i, k, b))
                else:
                    self._count_hit("dram")
        for i, k, b in to_verify:
            if crc32c(out[i]) == b.crc:
                with self._lock:
                    self._count_hit("dram")
            else:
                out[i].release()
                out[i] = None
                self.drop_corrupt(k, b, "DRAM copy")
        for i, k, b in from_ssd:
            out[i] = self._get_from_ssd(k, b)
        if self.remote is not None:
            for i in remote_misses:
                out[i] = self._get_from_remote((ns, keys[i]))
        return out

    def get_into_many(self, ns: str, keys: list[bytes], dsts: list[memoryview]) -> list[int]:
        """:meth:`get_into` of many keys with one store-lock round for the lookups.

        DRAM copies are pinned under the lock and copied into the caller's buffers outside it.

        Raises:
            InvalidArgumentError: a buffer is smaller than its stored block (nothing is copied).
        """
        n = [0] * len(keys)
        pinned: list[tuple[int, Key, Block, memoryview]] = []
        from_ssd: list[tuple[int, Key, Block]] = []
        with self._lock:
            self._life.check_open()
            blocks = self._catalog.blocks
            for key, dst in zip(keys, dsts):
                b = blocks.get((ns, key))
                if b is not None and len(dst) < b.size:
                    raise InvalidArgumentError(
                        f"out holds {len(dst)} bytes; the block {key.hex()[:16]}… has {b.size}")
            for i, key in enumerate(keys):
                k = (ns, key)
                b = self._lookup(k)
                if b is None:
                    continue
                if b.dram is not None:
                    pinned.append((i, k, b, self._dram.pinned_view(b.dram)))
                else:
                    b.ssd_hits += 1
                    from_ssd.append((i, k, b))
        verify = self.config.verify_dram_reads
        hits = 0
        try:
            for i, k, b, view in pinned:
                dst = dsts[i][: b.size]
                dst[:] = view
                if verify and crc32c(dst) != b.crc:
                    self.drop_corrupt(k, b, "DRAM copy")
                    continue
                n[i] = b.size
                hits += 1
        finally:
            for *_, view in pinned:
                view.release()
        if hits:
            with self._lock:
                self._counters["hits"] += hits
                self._counters["hits_dram"] += hits
        for i, k, b in from_ssd:
            if self._read_ssd(k, b, dsts[i][: b.size]):
                n[i] = b.size
        return n

    def get_pinned(self, k: Key) -> tuple[memoryview, Any] | None:
        """A DRAM-resident block's pinned read-only view and its arena slot, or None.

        None also when the block is stored but has no DRAM copy (the caller reads it another
        way). The slot (offset, size, generation) stays the block's, unchanged, for as long as
        the view — or anything made from it — is alive (R2): that is what lets a daemon hand
        the slot's place in a shared arena to a client on the same host.
        """
        with self._lock:
            self._life.check_open()
            b = self._lookup(k)
            if b is None or b.dram is None:
                return None
            slot = b.dram
            view = self._dram.pinned_view(slot)
            if not self.config.verify_dram_reads:
                self._count_hit("dram")
                return view, slot
        if crc32c(view) != b.crc:
            view.release()
            self.drop_corrupt(k, b, "DRAM copy")
            return None
        with self._lock:
            self._count_hit("dram")
        return view, slot

    def _lookup(self, k: Key, *, count_miss: bool = True) -> Block | None:
        """The block, touching its policies; None (counted unless ``count_miss`` is False: the
        caller asks the remote tier next) on a miss or expiry (store lock held)."""
        b = self._catalog.blocks.get(k)
        if b is not None:
            st = self._catalog.namespaces[k[0]]
            if st.ttl_s is not None and time.time_ns() - b.created_ns > st.ttl_s * 1e9:
                self._counters["expired"] += 1
                self._remove([k], tombstones=False)
                b = None
            else:
                self._catalog.touch(k, b)
                return b
        if count_miss:
            self._counters["misses"] += 1
        return None

    def _count_hit(self, tier: str) -> None:
        self._counters["hits"] += 1
        self._counters["hits_" + tier] += 1

    def _get_from_ssd(self, k: Key, b: Block) -> memoryview | None:
        slot = None
        with self._lock:
            b.ssd_hits += 1
            if self._wants_promotion(b) and self._life.fatal is None and not self._life.closed:
                st = self._catalog.namespaces[k[0]]
                p = PendingBlock(b.size)
                try:
                    self._placement.reserve_dram(st, p, required=False)
                except CapacityError:
                    pass
                slot = p.dram
        if slot is not None:
            dst = self._dram.writable_view(slot)
            ok = self._read_ssd(k, b, dst)
            dst.release()
            with self._lock:
                st = self._catalog.namespaces.get(k[0])
                if ok and self._catalog.blocks.get(k) is b and b.dram is None and not self._life.closed:
                    self._catalog.add_dram_copy(k, b, slot)
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

    def _wants_promotion(self, b: Block) -> bool:
        if self._dram is None or b.size > self._dram.capacity_bytes:
            return False
        mode = self.config.promote_on
        return mode == "first" or (mode == "second" and b.ssd_hits >= 2)

    def _read_ssd(self, k: Key, b: Block, out) -> bool:
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
                nb = self._catalog.blocks.get(k)
            if nb is not None and nb is b and b.ssd != (seg, off, length):
                return self._read_ssd(k, b, out)
            with self._lock:
                self._counters["misses"] += 1
            return False
        except CorruptionError as exc:
            self.drop_corrupt(k, b, f"SSD record ({exc})")
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

    def drop_corrupt(self, k: Key, b: Block, where: str) -> None:
        """R1: a block failing its checksum is a miss, is counted, and leaves the index."""
        log.error("checksum mismatch in %s of block %s/%s: dropped", where, k[0], k[1].hex()[:16])
        with self._lock:
            self._counters["checksum_errors"] += 1
            self._counters["misses"] += 1
            if self._catalog.blocks.get(k) is b:
                self._remove([k], tombstones=False)

    def get_into(self, k: Key, dst: memoryview) -> int:
        """Copy the block into ``dst``; the bytes copied, 0 on a miss.

        Raises:
            InvalidArgumentError: ``dst`` is smaller than the block.
        """
        with self._lock:
            self._life.check_open()
            b = self._catalog.blocks.get(k)
            if b is not None and len(dst) < b.size:
                raise InvalidArgumentError(f"out holds {len(dst)} bytes; the block has {b.size}")
            b = self._lookup(k, count_miss=self.remote is None)
            if b is None and self.remote is None:
                return 0
            slot = b.dram if b is not None else None
            if slot is not None:
                # Pinned by copy_out itself; taking the pin under the store lock means no
                # eviction can release the slot first.
                self._dram.copy_out(slot, dst)
        if b is None:
            view = self._get_from_remote(k)
            if view is None:
                return 0
            if len(dst) < len(view):
                raise InvalidArgumentError(f"out holds {len(dst)} bytes; the block has {len(view)}")
            dst[: len(view)] = view
            return len(view)
        if slot is not None:
            if self.config.verify_dram_reads and crc32c(dst[: b.size]) != b.crc:
                self.drop_corrupt(k, b, "DRAM copy")
                return 0
            with self._lock:
                self._count_hit("dram")
            return b.size
        with self._lock:
            b.ssd_hits += 1
        return b.size if self._read_ssd(k, b, dst[: b.size]) else 0

    def tier_of(self, k: Key) -> str | None:
        """The fastest tier holding ``k`` now, or None; no side effects."""
        with self._lock:
            self._life.check_open()
            b = self._catalog.blocks.get(k)
            return None if b is None else ("dram" if b.dram is not None else "ssd")

    def exists(self, ns: str, keys: list[bytes]) -> list[bool]:
        """Per key, whether it is stored (committed and not deleted)."""
        with self._lock:
            self._life.check_open()
            blocks = self._catalog.blocks
            hits = [(ns, k) in blocks for k in keys]
        if self.remote is not None and not all(hits):
            missing = [i for i, h in enumerate(hits) if not h]
            for i, there in zip(missing, self.remote.exists(ns, [keys[i] for i in missing])):
                hits[i] = there
        return hits

    def match(self, ns: str, keys: list[bytes], mode: str, window: int | None) -> MatchResult:
        """Match a chain of keys (see :mod:`tairstore.engine.match`)."""
        with self._lock:
            self._life.check_open()
            # The lookups as C-level maps: a chain of a thousand keys is a common request.
            found = list(map(self._catalog.blocks.get, zip(repeat(ns), keys)))
        hits = list(map(operator.is_not, found, repeat(None)))
        tiers: list[str | None] = [None if b is None else ("dram" if b.dram is not None else "ssd")
                                   for b in found]
        if self.remote is not None and not all(hits):
            missing = [i for i, h in enumerate(hits) if not h]
            for i, there in zip(missing, self.remote.exists(ns, [keys[i] for i in missing])):
                if there:
                    hits[i], tiers[i] = True, "remote"
        return match_mask(hits, tiers, mode, window)
