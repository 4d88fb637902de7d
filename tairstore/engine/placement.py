"""Admission and eviction: fitting a new block into quotas and tiers.

A part of the store with no state of its own beyond its collaborators: the catalog (usage,
quotas, policies), the SSD space, the DRAM arena, and the store's remove operation for
evicting whole blocks (which logs a DELETE). Every method runs with the store lock held. The
accounting rules and fair shares are in :mod:`tairstore.engine.capacity`.

Admission of one key, in order: the namespace's total quota, its SSD quota, its DRAM quota —
each first by evicting the namespace's own blocks — then the tiers' global capacities, where
the namespaces furthest over their fair share lose blocks first. C1 is kept here: a block is
admitted only once its bytes are counted in every quota it falls under, so an acknowledged
write can never leave usage above a quota. The SSD files get room for a whole batch before
anything of it is reserved (:meth:`Placement.ssd_room_needed`).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from tairstore.config import StoreConfig, dram_partition_index
from tairstore.engine.capacity import Namespace, fair_share_order
from tairstore.engine.catalog import Block, Catalog
from tairstore.engine.session import PendingBlock
from tairstore.engine.ssd_space import SsdSpace
from tairstore.errors import CapacityError
from tairstore.format.segment import record_length
from tairstore.tiers.dram import DramArena

__all__ = ["Placement", "NeedSsdRoom"]


class NeedSsdRoom(Exception):
    """The SSD files have no room for a reservation until compaction runs."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(nbytes)
        self.nbytes = nbytes


class Placement:
    """Admission (quotas, reservations) and eviction (policies, fair shares) of the store.

    Args:
        remove: removes whole blocks from the store (``remove(keys, tombstones=False)``).
    """

    def __init__(self, config: StoreConfig, catalog: Catalog, dram: DramArena | None,
                 space: SsdSpace | None, counters: Counter,
                 remove: Callable[..., object]) -> None:
        self.config = config
        self.catalog = catalog
        self.dram = dram
        self.space = space
        self.counters = counters
        self.remove = remove
        #: Called with ``(key, block)`` before a block is evicted whole (demotion to remote).
        self.on_evict: Callable[..., None] | None = None
        #: namespace -> its DRAM partition (absent: the default partition, 0).
        self.dram_part = dram_partition_index(config.dram_partitions)

    # -- admission (store lock held) -------------------------------------------------------
    def ssd_room_needed(self, ns: str, todo: list[tuple[bytes, int]]) -> int:
        """SSD file bytes the batch needs that only compaction can free (0 if it fits).

        First evicts blocks if live data leaves no room for the batch, so that what is still
        missing afterwards is dead space for the compactor. Checking the whole batch up front
        keeps a retry from reserving, abandoning and so filling the files with its own waste.
        """
        space = self.space
        if space is None or not todo:
            return 0
        need = space.need(ns, todo)
        excess = space.live_excess(need)
        if excess > 0:
            self.evict_global("ssd", excess)
        return need if space.files_full(need) else 0

    def admit(self, ns: str, key: bytes, p: PendingBlock, tier: str) -> None:
        """Check quotas and reserve the places a new block will be written.

        On success the reservations are in ``p`` and counted in the namespace's usage (C1);
        on any exception nothing of this block is reserved.

        Raises:
            CapacityError: a quota or a tier cannot fit the block (``dimension`` says which).
            NeedSsdRoom: the SSD files are full of dead records: compact, then retry.
        """
        st = self.catalog.ns(ns)
        size = p.size
        if st.over(None, size):
            self._evict_own(st, None, size)
            if st.over(None, size):
                raise CapacityError(
                    f"namespace {ns!r} total quota {st.total_bytes} bytes is full "
                    f"({st.used_total} used, block of {size}) and nothing more of it can be evicted",
                    dimension=f"quota:{ns}:total")
        try:
            if self.space is not None:
                self._reserve_ssd(st, ns, key, p)
            if self.dram is not None and tier != "ssd":
                self.reserve_dram(st, p, required=(tier == "dram" or self.space is None))
        except BaseException:
            self.unreserve(st, p)
            raise
        # C1: the block's bytes are counted in every quota before it is admitted.
        st.used_total += size

    def _reserve_ssd(self, st: Namespace, ns: str, key: bytes, p: PendingBlock) -> None:
        size = p.size
        space = self.space
        if st.over("ssd", size):
            self._evict_own(st, "ssd", size)
            if st.over("ssd", size):
                raise CapacityError(
                    f"namespace {ns!r} SSD quota {st.tier_bytes['ssd']} bytes is full", dimension=f"quota:{ns}:ssd")
        need = record_length(len(ns.encode()), len(key), size)
        if need > space.live_limit:
            raise CapacityError(
                f"block of {size} bytes cannot fit the SSD tier ({space.capacity} bytes, "
                f"of which {space.capacity - space.live_limit} are compaction slack)",
                dimension="tier:ssd")
        excess = space.live_excess(need)
        if excess > 0:
            self.evict_global("ssd", excess)
            if space.live_excess(need) > 0:
                raise CapacityError("SSD tier is full of blocks being written or pinned",
                                    dimension="tier:ssd")
        if space.files_full(need):
            # Live bytes fit but the files are full of dead records: compaction must run.
            raise NeedSsdRoom(need)
        p.ssd = space.reserve(ns, key, size)
        st.used["ssd"] += size

    def reserve_dram(self, st: Namespace, p: PendingBlock, *, required: bool) -> None:
        """Reserve a DRAM slot for ``p`` (evicting as needed); without ``required``, no slot
        is not an error."""
        size = p.size
        arena = self.dram
        part = self.dram_part.get(st.name, 0)
        if size > arena.partition_bytes(part):
            if required:
                where = (f"its DRAM partition ({arena.partition_bytes(part)} bytes)"
                         if arena.partitions > 1 else "the DRAM tier")
                raise CapacityError(f"block of {size} bytes is larger than {where}",
                                    dimension="tier:dram")
            return
        if st.over("dram", size):
            self._evict_own(st, "dram", size)
            if st.over("dram", size):
                if required:
                    raise CapacityError(f"namespace {st.name!r} DRAM quota is full",
                                        dimension=f"quota:{st.name}:dram")
                return
        slot = arena.alloc(size, part)
        while slot is None:
            if not self.evict_global("dram", size, one=True, part=part):
                break
            slot = arena.alloc(size, part)
        if slot is None:
            if required:
                raise CapacityError(
                    f"DRAM tier cannot fit a block of {size} bytes (pinned views or reservations "
                    "fill it)", dimension="tier:dram")
            return
        p.dram = slot
        st.used["dram"] += size

    def unreserve(self, st: Namespace, p: PendingBlock) -> None:
        """Give back ``p``'s reservations and their tier usage."""
        if p.dram is not None:
            self.dram.release(p.dram)
            p.dram = None
            st.used["dram"] -= p.size
        if p.ssd is not None:
            self.space.abandon(p.ssd)
            p.ssd = None
            st.used["ssd"] -= p.size

    # -- eviction (store lock held) ----------------------------------------------------------
    def enforce_quotas(self) -> int:
        """Evict each namespace's own blocks until it is within every quota (C1); returns the
        blocks evicted. Writes keep quotas on admission; this is for what recovery brings back
        beyond them (a rebuild from the segments restores evicted blocks: evictions leave no
        tombstone)."""
        tiers: list[str | None] = [None]
        tiers += (["ssd"] if self.space is not None else []) + (["dram"] if self.dram is not None else [])
        before = len(self.catalog.blocks)
        for st in list(self.catalog.namespaces.values()):
            for tier in tiers:
                if st.over(tier, 0):
                    self._evict_own(st, tier, 0)
        return before - len(self.catalog.blocks)

    def _evict_own(self, st: Namespace, tier: str | None, size: int) -> None:
        """Evict a namespace's own blocks until ``size`` more bytes fit its quota of ``tier``."""
        policy_tier = tier or ("ssd" if self.space is not None else "dram")
        policy = st.policies[policy_tier]
        skip = self._skip_for(st.name, policy_tier)
        while st.over(tier, size):
            victim = policy.pop_victim(skip)
            if victim is None:
                return
            # A total or SSD quota is freed only by removing blocks; a DRAM quota by dropping copies.
            self._evict_one(policy_tier, st.name, victim, whole=(tier != "dram"))

    def usage(self, tier: str) -> tuple[float, int]:
        """``(fraction used, capacity)`` of ``tier`` as the watermarks see it; capacity 0 when
        the store has no such tier."""
        if tier == "dram":
            if self.dram is None:
                return 0.0, 0
            return self.dram.used_bytes / self.dram.capacity_bytes, self.dram.capacity_bytes
        if self.space is None:
            return 0.0, 0
        return self.space.usage(), self.space.live_limit

    def shed(self, tier: str, frac: float, capacity: int, marks) -> int:
        """Watermark eviction: ``tier`` is at ``frac`` of ``capacity``, at or above
        ``marks.high``; evict down to ``marks.low``. Returns the bytes freed.

        With DRAM partitions, each partition at or above ``high`` of its own size (at least
        one is, when the whole arena is) is brought down to ``low`` of it by evicting its own
        namespaces: one partition's blocks free nothing another could use, and other
        namespaces' puts must never evict a partition's blocks.
        """
        if tier == "dram" and self.dram_part:
            freed = 0
            for part in range(self.dram.partitions):
                cap, used = self.dram.partition_bytes(part), self.dram.partition_used(part)
                if used >= marks.high * cap:
                    freed += self.evict_global("dram", used - int(marks.low * cap), part=part)
            return freed
        return self.evict_global(tier, int(frac * capacity - marks.low * capacity))

    def evict_global(self, tier: str, nbytes: int, *, one: bool = False, part: int | None = None) -> int:
        """Evict from the namespaces furthest over their fair share of ``tier``.

        Returns the bytes freed (0 when nothing is evictable). With ``one``, stops after one
        block (the DRAM allocator retries its allocation in between). With ``part``, only
        namespaces of that DRAM partition, over their shares of it (``dram_partitions``).
        """
        capacity = self.config.dram_bytes if tier == "dram" else self.space.live_limit
        namespaces = self.catalog.namespaces
        if part is not None and self.dram_part:
            capacity = self.dram.partition_bytes(part)
            namespaces = {ns: st for ns, st in namespaces.items() if self.dram_part.get(ns, 0) == part}
        freed = 0
        exhausted: set[str] = set()
        while freed < nbytes:
            used = {ns: st.used[tier] for ns, st in namespaces.items() if ns not in exhausted}
            order = fair_share_order(used, capacity)
            if not order:
                break
            ns = order[0]
            victim = namespaces[ns].policies[tier].pop_victim(self._skip_for(ns, tier))
            if victim is None:
                exhausted.add(ns)
                continue
            freed += self._evict_one(tier, ns, victim, whole=(tier == "ssd"))
            if one:
                break
        return freed

    def _skip_for(self, ns: str, tier: str):
        pinned = self.dram.is_pinned if tier == "dram" and self.dram is not None else None
        return self.catalog.skip_for(ns, tier, pinned)

    def _evict_one(self, tier: str, ns: str, key: bytes, *, whole: bool) -> int:
        """Evict one policy victim: drop its DRAM copy, or the whole block; returns bytes freed."""
        k = (ns, key)
        b = self.catalog.blocks.get(k)
        if b is None:
            return 0
        if tier == "dram" and not whole:
            if b.dram is None:
                return 0
            self.counters["evictions_dram"] += 1
            self.drop_dram(k, b)
            return b.size
        self.counters["evictions_" + tier] += 1
        if self.on_evict is not None:
            self.on_evict(k, b)
        self.remove([k], tombstones=False)
        return b.size

    def drop_dram(self, k: tuple[str, bytes], b: Block) -> None:
        """Drop a block's DRAM copy; a block with no SSD copy goes with it (after the remote
        tier, when there is one, has had the chance to demote it)."""
        if b.ssd is None:
            if self.on_evict is not None:
                self.on_evict(k, b)
            self.remove([k], tombstones=False)
            return
        self.dram.release(self.catalog.drop_dram_copy(k, b))
