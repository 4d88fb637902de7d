"""Admission and eviction: fitting a new block into quotas and tiers.

Part of :class:`tairstore.engine.store.Store` (a mixin; the store's lock is held by every method
here). The accounting rules and fair shares are in :mod:`tairstore.engine.capacity`; the store's
module docstring has the theory of operation.

Admission of one key, in order: the namespace's total quota, its SSD quota, its DRAM quota —
each first by evicting the namespace's own blocks — then the tiers' global capacities, where
the namespaces furthest over their fair share lose blocks first. The SSD files get room for a
whole batch before anything of it is reserved (:meth:`PlacementMixin._ssd_room_needed`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tairstore.engine.capacity import Namespace, fair_share_order
from tairstore.errors import CapacityError
from tairstore.format.segment import record_length
from tairstore.engine.session import PendingBlock

if TYPE_CHECKING:
    from tairstore.engine.store import _Block

__all__ = ["PlacementMixin"]


class _NeedSsdRoom(Exception):
    """Internal: the SSD files have no room for a reservation until compaction runs."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(nbytes)
        self.nbytes = nbytes



class PlacementMixin:
    """Admission (quotas, reservations) and eviction (policies, fair shares) of the store."""

    # -- admission (store lock held) -------------------------------------------------------
    def _ssd_room_needed(self, ns: str, todo: list[tuple[bytes, int]]) -> int:
        """SSD file bytes the batch needs that only compaction can free (0 if it fits).

        First evicts blocks if live data leaves no room for the batch, so that what is still
        missing afterwards is dead space for the compactor. Checking the whole batch up front
        keeps a retry from reserving, abandoning and so filling the files with its own waste.
        """
        if self._ssd is None or not todo:
            return 0
        nsb = len(ns.encode())
        need = sum(record_length(nsb, len(key), size) for key, size in todo)
        excess = self._ssd_live + self._ssd_reserved + need - self._ssd_live_limit
        if excess > 0:
            self._evict_global("ssd", excess)
        if self._ssd.total_bytes + need > self._ssd_limit:
            return need
        return 0

    def _admit(self, ns: str, key: bytes, p: PendingBlock, tier: str) -> None:
        """Check quotas and reserve the places a new block will be written.

        On success the reservations are in ``p`` and counted in the namespace's usage; on any
        exception nothing of this block is reserved.
        """
        st = self._ns_state(ns)
        size = p.size
        if st.over(None, size):
            self._evict_own(st, None, size)
            if st.over(None, size):
                raise CapacityError(
                    f"namespace {ns!r} total quota {st.total_bytes} bytes is full "
                    f"({st.used_total} used, block of {size}) and nothing more of it can be evicted",
                    dimension=f"quota:{ns}:total")
        try:
            if self._ssd is not None:
                self._reserve_ssd(st, ns, key, p)
            if self._dram is not None and tier != "ssd":
                self._reserve_dram(st, p, required=(tier == "dram" or self._ssd is None))
        except BaseException:
            self._unreserve(st, p)
            raise
        st.used_total += size

    def _reserve_ssd(self, st: Namespace, ns: str, key: bytes, p: PendingBlock) -> None:
        size = p.size
        if st.over("ssd", size):
            self._evict_own(st, "ssd", size)
            if st.over("ssd", size):
                raise CapacityError(
                    f"namespace {ns!r} SSD quota {st.tier_bytes['ssd']} bytes is full", dimension=f"quota:{ns}:ssd")
        need = record_length(len(ns.encode()), len(key), size)
        if need > self._ssd_live_limit:
            raise CapacityError(
                f"block of {size} bytes cannot fit the SSD tier ({self.config.ssd_bytes} bytes, "
                f"of which {self.config.ssd_bytes - self._ssd_live_limit} are compaction slack)",
                dimension="tier:ssd")
        if self._ssd_live + self._ssd_reserved + need > self._ssd_live_limit:
            self._evict_global("ssd", self._ssd_live + self._ssd_reserved + need - self._ssd_live_limit)
            if self._ssd_live + self._ssd_reserved + need > self._ssd_live_limit:
                raise CapacityError("SSD tier is full of blocks being written or pinned",
                                    dimension="tier:ssd")
        if self._ssd.total_bytes + need > self._ssd_limit:
            # Live bytes fit but the files are full of dead records: compaction must run.
            raise _NeedSsdRoom(need)
        p.ssd = self._ssd.reserve(ns, key, size)
        self._seg_pending[p.ssd.segment] += 1
        self._ssd_reserved += p.ssd.length
        st.used["ssd"] += size

    def _reserve_dram(self, st: Namespace, p: PendingBlock, *, required: bool) -> None:
        size = p.size
        arena = self._dram
        if size > arena.capacity_bytes:
            if required:
                raise CapacityError(f"block of {size} bytes is larger than the DRAM tier",
                                    dimension="tier:dram")
            return
        if st.over("dram", size):
            self._evict_own(st, "dram", size)
            if st.over("dram", size):
                if required:
                    raise CapacityError(f"namespace {st.name!r} DRAM quota is full",
                                        dimension=f"quota:{st.name}:dram")
                return
        slot = arena.alloc(size)
        while slot is None:
            if not self._evict_global("dram", size, one=True):
                break
            slot = arena.alloc(size)
        if slot is None:
            if required:
                raise CapacityError(
                    f"DRAM tier cannot fit a block of {size} bytes (pinned views or reservations "
                    "fill it)", dimension="tier:dram")
            return
        p.dram = slot
        st.used["dram"] += size

    def _unreserve(self, st: Namespace, p: PendingBlock) -> None:
        """Give back ``p``'s reservations and their usage (store lock held)."""
        if p.dram is not None:
            self._dram.release(p.dram)
            p.dram = None
            st.used["dram"] -= p.size
        if p.ssd is not None:
            self._ssd.abandon(p.ssd)
            self._seg_pending[p.ssd.segment] -= 1
            self._ssd_reserved -= p.ssd.length
            p.ssd = None
            st.used["ssd"] -= p.size

    # -- eviction (store lock held) ----------------------------------------------------------
    def _evict_own(self, st: Namespace, tier: str | None, size: int) -> None:
        """Evict a namespace's own blocks until ``size`` more bytes fit its quota of ``tier``."""
        policy_tier = tier or ("ssd" if self._ssd is not None else "dram")
        policy = st.policies[policy_tier]
        skip = self._skip_for(st.name, policy_tier)
        while st.over(tier, size):
            victim = policy.pop_victim(skip)
            if victim is None:
                return
            # A total or SSD quota is freed only by removing blocks; a DRAM quota by dropping copies.
            self._evict_one(policy_tier, st.name, victim, whole=(tier != "dram"))

    def _evict_global(self, tier: str, nbytes: int, *, one: bool = False) -> int:
        """Evict from the namespaces furthest over their fair share of ``tier``.

        Returns the bytes freed (0 when nothing is evictable). With ``one``, stops after one
        block (the DRAM allocator retries its allocation in between).
        """
        capacity = self.config.dram_bytes if tier == "dram" else self._ssd_live_limit
        freed = 0
        exhausted: set[str] = set()
        while freed < nbytes:
            used = {ns: st.used[tier] for ns, st in self._namespaces.items() if ns not in exhausted}
            order = fair_share_order(used, capacity)
            if not order:
                break
            ns = order[0]
            victim = self._namespaces[ns].policies[tier].pop_victim(self._skip_for(ns, tier))
            if victim is None:
                exhausted.add(ns)
                continue
            freed += self._evict_one(tier, ns, victim, whole=(tier == "ssd"))
            if one:
                break
        return freed

    def _skip_for(self, ns: str, tier: str):
        """The policy's ``skip``: keys that must stay now (store lock held).

        In every tier, a block whose continuation is being written (a held parent); in DRAM,
        also a copy a reader has pinned (R2).
        """
        held = self._held_parents
        if tier != "dram":
            if not held:
                return None
            return lambda key: (ns, key) in held
        arena = self._dram
        blocks = self._blocks

        def skip(key: bytes) -> bool:
            if (ns, key) in held:
                return True
            b = blocks.get((ns, key))
            return b is not None and b.dram is not None and arena.is_pinned(b.dram)

        return skip

    def _evict_one(self, tier: str, ns: str, key: bytes, *, whole: bool) -> int:
        """Evict one policy victim: drop its DRAM copy, or the whole block; returns bytes freed."""
        k = (ns, key)
        b = self._blocks.get(k)
        if b is None:
            return 0
        if tier == "dram" and not whole:
            if b.dram is None:
                return 0
            self._counters["evictions_dram"] += 1
            self._drop_dram(k, b)
            return b.size
        self._counters["evictions_" + tier] += 1
        self._remove_locked([k], tombstones=False)
        return b.size

    def _drop_dram(self, k: tuple[str, bytes], b: _Block) -> None:
        """Drop a block's DRAM copy; a block with no SSD copy goes with it (store lock held)."""
        if b.ssd is None:
            self._remove_locked([k], tombstones=False)
            return
        st = self._namespaces[k[0]]
        st.policies["dram"].on_remove(k[1])
        self._dram.release(b.dram)
        b.dram = None
        b.ssd_hits = 0
        st.used["dram"] -= b.size

