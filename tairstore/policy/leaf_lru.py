"""Leaf-aware LRU: evict the tails of prefix chains before their prefixes.

A KV-cache block is only reusable behind its whole prefix: block ``i`` of a request is worth
something only while blocks ``0..i-1`` are resident too. Plain LRU happily evicts a popular
system-prompt block while the less popular continuations behind it stay, wasting them all.
Leaf-aware LRU (the rule radix-tree prefix caches such as SGLang's RadixAttention use) only
evicts *leaves*: keys that no resident key names as its parent. Among leaves, the least
recently used goes first.

Theory of operation
-------------------
- Each key records the ``parent`` it was inserted with. ``_children[p]`` counts the resident
  keys whose parent is ``p``, whether or not ``p`` itself is resident, so a parent inserted
  after its children (out of order) still starts as a non-leaf. A key whose parent is not
  resident is simply a root.
- Every insert or hit takes a fresh value of a monotonic tick; a key's tick is its recency.
- Leaves live in a min-heap of ``(tick, key)`` with lazy deletion. ``_heap_tick[key]`` is the
  tick of the one heap entry that may still be live for ``key``; an entry is live iff the key is
  resident, is a leaf, and its tick equals both the key's tick and ``_heap_tick[key]``. Stale
  entries are dropped when they surface, and the heap is rebuilt when they outnumber live keys.
  Ticks are unique, so tuple comparison never reaches the keys (which need not be orderable).
- When a leaf goes, its parent's child count drops; at zero the parent becomes a leaf and is
  pushed with its *own* last-use tick, so a prefix that was used recently outlives a cold one.
- A pinned (skipped) leaf stays a leaf and keeps its ancestors non-leaves: nothing in its chain
  can be evicted until the reader lets go.

Costs: insert / hit / pop O(log n) amortized; remove O(1) (its heap entry dies lazily).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import ClassVar

from tairstore.policy.base import PolicyBase, SkipFn

__all__ = ["LeafLRU"]

#: Rebuild the heap when it holds more than this many entries per resident key: stale entries
#: (one per hit on a leaf) would otherwise grow without bound under a hot working set. Two keeps
#: the rebuild amortized O(1) per operation and the memory within 2x of live entries.
_MAX_HEAP_ENTRIES_PER_KEY = 2
#: ...but never rebuild a tiny heap: below this, stale entries cost less than the rebuild.
_MIN_HEAP_REBUILD = 64


class LeafLRU(PolicyBase):
    """LRU among chain tails: a prefix never leaves while a continuation of it stays."""

    name: ClassVar[str] = "leaf_lru"

    def __init__(self, capacity_bytes: int | None = None) -> None:
        """Args: capacity_bytes: accepted for a uniform factory signature; not needed here."""
        super().__init__(capacity_bytes)
        self._parent: dict[Hashable, Hashable | None] = {}
        self._tick_of: dict[Hashable, int] = {}
        self._children: dict[Hashable, int] = {}
        self._heap: list[tuple[int, Hashable]] = []
        self._heap_tick: dict[Hashable, int] = {}
        self._clock = 0

    # ----------------------------------------------------------------------------- helpers
    def _next_tick(self) -> int:
        self._clock += 1
        return self._clock

    def _push_leaf(self, key: Hashable) -> None:
        """Make the resident leaf ``key`` eligible, ordered by its own last use."""
        tick = self._tick_of[key]
        if self._heap_tick.get(key) != tick:
            self._heap_tick[key] = tick
            heapq.heappush(self._heap, (tick, key))
            limit = max(_MIN_HEAP_REBUILD, _MAX_HEAP_ENTRIES_PER_KEY * len(self._parent))
            if len(self._heap) > limit:
                self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self._heap = [(t, k) for t, k in self._heap if self._live(t, k)]
        heapq.heapify(self._heap)
        self._heap_tick = {k: t for t, k in self._heap}

    def _live(self, tick: int, key: Hashable) -> bool:
        return (
            self._heap_tick.get(key) == tick
            and self._tick_of.get(key) == tick
            and not self._children.get(key)
        )

    def _detach(self, key: Hashable) -> None:
        """Forget resident ``key``; its parent may become a leaf."""
        parent = self._parent.pop(key)
        del self._tick_of[key]
        self._heap_tick.pop(key, None)
        if parent is None:
            return
        left = self._children[parent] - 1
        if left:
            self._children[parent] = left
            return
        del self._children[parent]
        if parent in self._parent:  # resident: it just became a leaf
            self._push_leaf(parent)

    # ------------------------------------------------------------------ policy operations
    def _insert(self, key: Hashable, size: int, parent: Hashable | None) -> None:
        self._parent[key] = parent
        self._tick_of[key] = self._next_tick()
        if parent is not None:
            # The parent (resident or not) now has one more resident child; if it is resident
            # its heap entry goes stale by the _live check, no need to touch the heap.
            self._children[parent] = self._children.get(parent, 0) + 1
        if not self._children.get(key):
            self._push_leaf(key)

    def _access(self, key: Hashable) -> None:
        # A hit refreshes this key only: its prefix blocks were (or will be) hit on their own.
        self._tick_of[key] = self._next_tick()
        if not self._children.get(key):
            self._push_leaf(key)

    def _remove(self, key: Hashable, size: int) -> None:
        self._detach(key)

    def _pop(self, skip: SkipFn | None) -> Hashable | None:
        pinned: list[tuple[int, Hashable]] = []
        victim = None
        while self._heap:
            tick, key = heapq.heappop(self._heap)
            if not self._live(tick, key):
                if self._heap_tick.get(key) == tick:
                    # Its only entry surfaced while it had children; forget the entry so the
                    # key is pushed again when it becomes a leaf.
                    del self._heap_tick[key]
                continue
            if skip is not None and skip(key):
                # Set aside, not re-pushed during this call: each leaf is asked once, so the
                # loop ends even when every leaf is pinned.
                pinned.append((tick, key))
                continue
            victim = key
            break
        for entry in pinned:
            heapq.heappush(self._heap, entry)
        if victim is not None:
            self._detach(victim)
        return victim


def replay_dense(
    chains: list[list[int]], n_keys: int, capacity: int
) -> tuple[list[int], list[int], list[int]]:
    """The prefix-cache replay of :mod:`.prefixreplay` (one tier, unit-size blocks) through
    leaf-aware LRU, as one tight loop: the same decisions as :class:`LeafLRU` driven per
    operation, at several times the speed. The optimizer's fast path; the tests hold it to the
    per-operation replay on random and Mooncake traces.

    Args:
        chains: each request's blocks as dense ints in ``0..n_keys-1``.
        n_keys: the number of distinct blocks.
        capacity: the tier's capacity in blocks (> 0).

    Returns:
        Per request: the prefix-hit blocks (leading run of blocks resident before the request),
        the blocks inserted, the evictions it caused.

    How it stays equal to :class:`LeafLRU`: the victim is, by that class's definition, the
    resident key with no resident child whose last insert or hit is oldest (ticks are unique).
    Here too, with the heap entries packed into one int (``tick << shift | key``) and two
    leaves kept out of the heap (bookkeeping only, the order is the same): the key touched last
    is not pushed until another key is touched (its tick is the newest, so it is the victim only
    when no other leaf exists), and the parent that became a leaf when its last child left is
    held aside, compared with the heap's top at the next eviction, and pushed only when
    another parent takes its place (chains are mostly evicted tail first, so that parent is
    usually the next victim: no heap operation at all).
    """
    shift = max(n_keys, 1).bit_length()
    mask = (1 << shift) - 1
    resident = bytearray(n_keys)
    tick_of = [0] * n_keys
    heap_tick = [0] * n_keys  # tick of the one heap entry that may be live; 0: none
    parent_of = [-1] * n_keys
    children = [0] * n_keys  # resident keys naming this key as parent (resident or not)
    heap: list[int] = []
    push, pop = heapq.heappush, heapq.heappop
    clock = 0
    size = 0
    pending = -1  # the key touched last, when it was a leaf then: not yet in the heap
    held = -1  # a leaf not in the heap (a parent whose last child just left), while it is one
    held_tick = 0
    out_hits: list[int] = []
    out_ins: list[int] = []
    out_ev: list[int] = []
    for chain in chains:
        # Lookup: the prefix resident before the request. Nothing changes residency before the
        # first miss (hits only refresh), so the leading hits of the access pass below are it.
        hits = 0
        inserts = 0
        evictions = 0
        prefix = True
        parent = -1
        for k in chain:
            clock += 1
            if resident[k]:
                hits += prefix
            else:
                prefix = False
                inserts += 1
                if size >= capacity:
                    # The oldest leaf: the heap's first live entry or the held leaf, whichever
                    # is older; else the pending key; else none, when parents form a cycle
                    # (keys reused in another order), and then, as in the reference replay,
                    # the insert goes ahead over capacity.
                    victim = -1
                    while heap:
                        e = heap[0]
                        v = e & mask
                        t = e >> shift
                        if resident[v] and tick_of[v] == t and heap_tick[v] == t:
                            if not children[v]:
                                victim = v
                                break
                            heap_tick[v] = 0
                        pop(heap)
                    if held >= 0 and not (
                        resident[held] and tick_of[held] == held_tick and not children[held]
                    ):
                        held = -1
                    if victim >= 0 and (held < 0 or t < held_tick):
                        pop(heap)
                    elif held >= 0:
                        victim = held
                        held = -1
                    else:
                        victim = pending
                    if victim >= 0:
                        if victim == pending:
                            pending = -1
                        resident[victim] = 0
                        size -= 1
                        evictions += 1
                        heap_tick[victim] = 0
                        p = parent_of[victim]
                        if p >= 0:
                            left = children[p] - 1
                            children[p] = left
                            if not left and resident[p] and p != pending:
                                t = tick_of[p]
                                if heap_tick[p] != t:
                                    # p just became a leaf, with an old tick: most often the
                                    # next victim. Hold it out of the heap; push the leaf held
                                    # before if it still is one.
                                    if held >= 0 and resident[held] and not children[held]:
                                        ht = tick_of[held]
                                        if ht == held_tick and heap_tick[held] != ht:
                                            heap_tick[held] = ht
                                            push(heap, ht << shift | held)
                                    held = p
                                    held_tick = t
                if parent == k:
                    parent = -1
                resident[k] = 1
                size += 1
                parent_of[k] = parent
                if parent >= 0:
                    children[parent] += 1
            # Touch k: the previous pending key goes to the heap if it is still a leaf.
            tick_of[k] = clock
            if pending >= 0 and pending != k:
                if resident[pending] and not children[pending]:
                    t = tick_of[pending]
                    if heap_tick[pending] != t:
                        heap_tick[pending] = t
                        push(heap, t << shift | pending)
            pending = -1 if children[k] else k
            parent = k
        out_hits.append(hits)
        out_ins.append(inserts)
        out_ev.append(evictions)
    return out_hits, out_ins, out_ev
