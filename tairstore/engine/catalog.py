"""The catalog: what the store holds — committed blocks, namespaces, blocks being written.

Theory of operation
-------------------
The catalog is the in-memory truth every read, ``exists`` and ``match`` answers from: a key is
in :attr:`Catalog.blocks` exactly when it is committed and not deleted (W1: the store publishes
a key only after its COMMIT is as durable as the durability mode promises). It also keeps, per
namespace, the usage that quotas are checked against (C1) and the eviction policy of each tier,
and the counts that ``stats()`` reports, so that a scrape costs O(namespaces), not O(blocks).

The catalog does no I/O and takes no lock: the store's lock guards it (every method here is
called with it held). What a block's bytes occupy in a tier is released by the caller: the
DRAM slot by the arena, the SSD record by :class:`~tairstore.engine.ssd_space.SsdSpace`.

TTL: namespaces with a TTL keep a heap of ``(created_ns, key)``; the sweep pops what is older
than the cutoff and expires the keys still present with that creation time. Deleted keys leave
stale entries that are dropped when they reach the top, so a sweep costs O(expired · log n).
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Any, Callable

from tairstore.engine.capacity import TIERS, Namespace
from tairstore.index.records import BlockRecord
from tairstore.policy import make_policy

__all__ = ["Block", "Catalog"]

Key = tuple[str, bytes]


class Block:
    """A committed block as the catalog knows it."""

    __slots__ = ("size", "crc", "generation", "created_ns", "ssd", "dram", "parent", "ssd_hits")

    def __init__(self, size: int, crc: int, generation: int, created_ns: int,
                 ssd: tuple[int, int, int] | None, dram: Any, parent: bytes | None = None) -> None:
        self.size = size
        self.crc = crc
        self.generation = generation
        self.created_ns = created_ns
        self.ssd = ssd  # (segment, offset, record length) or None
        self.dram = dram  # arena Slot or None
        self.parent = parent  # the previous key of its chain, when the writer said
        self.ssd_hits = 0  # hits served from SSD since the block was last in DRAM

    def record(self) -> BlockRecord:
        """The block's LMDB record (it must have an SSD copy)."""
        seg, off, length = self.ssd
        return BlockRecord(self.size, self.crc, self.generation, self.created_ns, seg, off, length)


class Catalog:
    """Committed blocks, namespaces (usage, quotas, policies) and keys in flight.

    Args:
        policy: the eviction policy name per tier (``StoreConfig.policy``).
        capacities: each tier's capacity in bytes (None: no such tier), for the policies.
    """

    def __init__(self, policy: dict[str, str], capacities: dict[str, int | None]) -> None:
        self._policy = dict(policy)
        self._capacities = dict(capacities)
        self.blocks: dict[Key, Block] = {}
        self.namespaces: dict[str, Namespace] = {}
        #: Keys being written: key -> session id (0 for a put).
        self.inflight: dict[Key, int] = {}
        # Keys whose continuation (a block naming it as parent) is being written: eviction
        # skips them, so a write that extends a stored prefix never loses that prefix before
        # it commits (a continuation without its prefix is useless to a prefix match).
        self._held: Counter[Key] = Counter()
        #: Committed blocks with a copy in each tier.
        self.tier_blocks: dict[str, int] = {t: 0 for t in TIERS}
        self._ttl_heaps: dict[str, list[tuple[int, bytes]]] = {}

    # -- namespaces ---------------------------------------------------------------------------
    def ns(self, name: str) -> Namespace:
        """The namespace record, created (with its policies) on first use."""
        st = self.namespaces.get(name)
        if st is None:
            st = Namespace(name)
            for tier in TIERS:
                st.policies[tier] = make_policy(self._policy[tier], capacity_bytes=self._capacities[tier])
            self.namespaces[name] = st
        return st

    def set_limits(self, name: str, total: int | None, tiers: dict[str, int], ttl: float | None) -> Namespace:
        """Set a namespace's quotas and TTL; starts (or stops) its TTL index."""
        st = self.ns(name)
        st.total_bytes, st.tier_bytes, st.ttl_s = total, tiers, ttl
        if ttl is None:
            self._ttl_heaps.pop(name, None)
        elif name not in self._ttl_heaps:
            # Once per namespace that gains a TTL: index the blocks it already holds.
            heap = [(b.created_ns, k[1]) for k, b in self.blocks.items() if k[0] == name]
            heapq.heapify(heap)
            self._ttl_heaps[name] = heap
        return st

    # -- keys ---------------------------------------------------------------------------------
    def busy(self, k: Key) -> bool:
        """True if ``k`` is stored or being written."""
        return k in self.blocks or k in self.inflight

    def publish(self, k: Key, b: Block, parent: bytes | None) -> None:
        """Add a committed block: usage was counted at admission; here its policies, counts
        and TTL entry."""
        self.blocks[k] = b
        st = self.namespaces[k[0]]
        st.blocks += 1
        if b.dram is not None:
            st.policies["dram"].on_insert(k[1], b.size, parent)
            self.tier_blocks["dram"] += 1
        if b.ssd is not None:
            st.policies["ssd"].on_insert(k[1], b.size, parent)
            self.tier_blocks["ssd"] += 1
        heap = self._ttl_heaps.get(k[0])
        if heap is not None:
            heapq.heappush(heap, (b.created_ns, k[1]))

    def adopt(self, blocks: dict[Key, Block]) -> None:
        """Take recovered blocks (each with an SSD copy, no DRAM copy): usage and policies."""
        self.blocks.update(blocks)
        # One pass; per-namespace sums are added at the end (a reopen of a million blocks
        # spends its time here and in the policies' inserts).
        counts: dict[str, list[int]] = {}
        last_ns, inserts, tally = None, None, None
        for (ns, key), b in blocks.items():
            if ns != last_ns:
                st = self.namespaces.get(ns) or self.ns(ns)
                inserts, last_ns = st.policies["ssd"].on_insert, ns
                tally = counts.setdefault(ns, [0, 0])
            tally[0] += 1
            tally[1] += b.size
            inserts(key, b.size, None)
        for ns, (n, nbytes) in counts.items():
            st = self.namespaces[ns]
            st.blocks += n
            st.used_total += nbytes
            st.used["ssd"] += nbytes
        self.tier_blocks["ssd"] += len(blocks)
        for name, heap in self._ttl_heaps.items():
            heap.extend((b.created_ns, k[1]) for k, b in blocks.items() if k[0] == name)
            heapq.heapify(heap)

    def unpublish(self, k: Key) -> Block:
        """Remove a committed block from the map, its policies, counts and usage; returns it.

        The caller releases its DRAM slot and its SSD record.
        """
        b = self.blocks.pop(k)
        st = self.namespaces[k[0]]
        st.blocks -= 1
        st.used_total -= b.size
        if b.dram is not None:
            st.policies["dram"].on_remove(k[1])
            st.used["dram"] -= b.size
            self.tier_blocks["dram"] -= 1
        if b.ssd is not None:
            st.policies["ssd"].on_remove(k[1])
            st.used["ssd"] -= b.size
            self.tier_blocks["ssd"] -= 1
        return b

    def add_dram_copy(self, k: Key, b: Block, slot: Any) -> None:
        """A promoted block got a DRAM copy (its usage was counted when the slot was reserved)."""
        b.dram = slot
        self.namespaces[k[0]].policies["dram"].on_insert(k[1], b.size, b.parent)
        self.tier_blocks["dram"] += 1

    def add_ssd_copy(self, k: Key, b: Block, place: tuple[int, int, int]) -> None:
        """A write-back block reached the SSD tier (its usage was counted at admission)."""
        b.ssd = place
        self.namespaces[k[0]].policies["ssd"].on_insert(k[1], b.size, b.parent)
        self.tier_blocks["ssd"] += 1

    def drop_dram_copy(self, k: Key, b: Block) -> Any:
        """Forget a block's DRAM copy (it keeps its SSD copy); returns the slot to release."""
        st = self.namespaces[k[0]]
        st.policies["dram"].on_remove(k[1])
        st.used["dram"] -= b.size
        slot, b.dram, b.ssd_hits = b.dram, None, 0
        self.tier_blocks["dram"] -= 1
        return slot

    def touch(self, k: Key, b: Block) -> None:
        """A hit: tell the policies of the tiers holding it."""
        st = self.namespaces[k[0]]
        if b.dram is not None:
            st.policies["dram"].on_access(k[1])
        if b.ssd is not None:
            st.policies["ssd"].on_access(k[1])

    # -- writes in flight ---------------------------------------------------------------------
    def begin_inflight(self, k: Key, parent: bytes | None, sid: int) -> None:
        """Mark ``k`` as being written and hold its parent against eviction."""
        self.inflight[k] = sid
        if parent is not None:
            self._held[(k[0], parent)] += 1

    def end_inflight(self, k: Key, parent: bytes | None) -> None:
        """``k`` is committed or released: its parent may be evicted again.

        At commit the policy learns the parent link (``on_insert(parent=…)``), which protects
        the parent from then on under ``leaf_lru``.
        """
        if self.inflight.pop(k, None) is None:
            return
        if parent is not None:
            self.release((k[0], parent))

    def hold(self, keys: list[Key]) -> None:
        """Hold ``keys`` against eviction (a write's admission that will name them as parents)."""
        for kp in keys:
            self._held[kp] += 1

    def release(self, kp: Key) -> None:
        """Undo one :meth:`hold` (or the hold of one in-flight key's parent)."""
        held = self._held
        held[kp] -= 1
        if held[kp] <= 0:
            del held[kp]

    def skip_for(self, ns: str, tier: str, pinned: Callable[[Any], bool] | None) -> Callable[[bytes], bool] | None:
        """The policy's ``skip``: keys that must stay now.

        In every tier, a block whose continuation is being written (a held parent); in DRAM,
        also a copy a reader has pinned (R2), as ``pinned(slot)`` says.
        """
        held = self._held
        if tier != "dram" or pinned is None:
            if not held:
                return None
            return lambda key: (ns, key) in held
        blocks = self.blocks

        def skip(key: bytes) -> bool:
            if (ns, key) in held:
                return True
            b = blocks.get((ns, key))
            return b is not None and b.dram is not None and pinned(b.dram)

        return skip

    # -- TTL ----------------------------------------------------------------------------------
    def expired(self, now_ns: int) -> list[Key]:
        """Keys of namespaces with a TTL whose blocks were created before ``now - ttl``.

        Pops them from the TTL index; the caller removes them.
        """
        out: list[Key] = []
        for name, heap in self._ttl_heaps.items():
            cutoff = now_ns - int(self.namespaces[name].ttl_s * 1e9)
            while heap and heap[0][0] < cutoff:
                created, key = heapq.heappop(heap)
                b = self.blocks.get((name, key))
                if b is not None and b.created_ns == created:
                    out.append((name, key))
        return out

    def check(self) -> list[str]:
        """Consistency of the counts with the map (for tests and the fuzz checker)."""
        problems = []
        for tier in TIERS:
            n = sum(1 for b in self.blocks.values() if getattr(b, tier) is not None)
            if n != self.tier_blocks[tier]:
                problems.append(f"catalog: {n} blocks hold a {tier} copy, counted {self.tier_blocks[tier]}")
        per_ns = Counter(k[0] for k in self.blocks)
        for name, st in self.namespaces.items():
            if per_ns.get(name, 0) != st.blocks:
                problems.append(f"catalog: namespace {name!r} holds {per_ns.get(name, 0)} blocks, counted {st.blocks}")
        return problems
