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
