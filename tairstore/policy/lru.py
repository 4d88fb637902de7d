"""Least-recently-used eviction: the baseline every other policy is measured against."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import ClassVar

from tairstore.policy.base import PolicyBase, SkipFn

__all__ = ["LRU"]


class LRU(PolicyBase):
    """Evict the block whose last insert or hit is oldest. Every operation is O(1).

    A pinned (skipped) key keeps its place: pinning says a reader holds the block, not that the
    block is popular, so it must not jump ahead of keys that were really used later. The scan
    walks past pinned keys, so ``pop_victim`` costs O(1 + pinned keys at the cold end).
    """

    name: ClassVar[str] = "lru"

    def __init__(self, capacity_bytes: int | None = None) -> None:
        """Args: capacity_bytes: accepted for a uniform factory signature; LRU does not need it."""
        super().__init__(capacity_bytes)
        # Oldest first: iteration order is eviction order.
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def _insert(self, key: Hashable, size: int, parent: Hashable | None) -> None:
        self._order[key] = None

    def _access(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def _remove(self, key: Hashable, size: int) -> None:
        del self._order[key]

    def _pop(self, skip: SkipFn | None) -> Hashable | None:
        if skip is None:
            if not self._order:
                return None
            key, _ = self._order.popitem(last=False)
            return key
        # One pass over the keys at most, so it terminates even when every key is pinned.
        for key in self._order:
            if not skip(key):
                break
        else:
            return None
        del self._order[key]
        return key
