"""S3-FIFO: a small probationary FIFO, a main FIFO with CLOCK-style reinsertion, and a ghost FIFO.

Yang, Zhang, Qiu, Yue, Vinayak: "FIFO queues are all you need for cache eviction", SOSP'23
(Algorithm 1), and ``libCacheSim/cache/eviction/S3FIFOv0.c``, the implementation the paper's
results come from. Most objects in cache traces are "one-hit wonders" that are never reused
soon after insertion; S3-FIFO sends them out through a small queue quickly ("quick demotion")
and lets only the reused ones into the large main queue.

The rules, as followed here:

- New keys enter the small queue S, except keys found in the ghost queue G (evicted from S not
  long ago, and now back): those enter the main queue M directly.
- A hit increments the key's frequency, capped at 3 (the paper's two-bit counter).
- Eviction takes from S while S holds at least ``small_ratio`` (10%) of the cache, else from M.
- Evicting from S: the tail goes to M (frequency cleared) if its frequency is > 1, i.e. it was
  hit at least twice while in S (Algorithm 1: ``if t.freq > 1``; S3FIFOv0.c's default
  ``move-to-main-threshold=2``); otherwise it is evicted and its key remembered in G.
- Evicting from M: a tail with frequency > 0 is reinserted at the head with frequency - 1
  (CLOCK with a two-bit counter); a tail with frequency 0 is evicted. Keys evicted from M do not
  enter G.
- G holds keys only and forgets the oldest beyond as many bytes as M may hold (the cache less
  S's share): the paper sizes G to "the same number of entries as M", and S3FIFOv0.c measures
  it in bytes of the evicted objects, as here, which is the same thing for equal-sized blocks.

Size-aware: queue shares and the ghost bound are in bytes. The policy does not know the tier's
capacity unless given ``capacity_bytes``; without it, "the cache" is the bytes tracked now (the
tier is full whenever the store asks for a victim, so that is the capacity at that moment).

Pinned (skipped) keys are rotated from the tail to the head of their own queue with their
frequency unchanged: a reader holds them now, so they get another lap, as a FIFO cannot leave a
hole at its tail. A call stops when every key left in both queues has answered "pinned".
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import ClassVar

from tairstore.errors import InvalidArgumentError
from tairstore.policy.base import PolicyBase, SkipFn

__all__ = ["S3FIFO"]

#: Share of the cache the small queue holds: the paper's 10%, chosen there from experiments on
#: many traces and found to generalize; a constructor argument for tuning by trace replay.
DEFAULT_SMALL_RATIO = 0.10
#: Frequency counter cap: two bits per object in the paper.
MAX_FREQ = 3
#: A key leaves S for M when its frequency reaches this (paper's Algorithm 1: freq > 1).
DEFAULT_MOVE_TO_MAIN_FREQ = 2


class S3FIFO(PolicyBase):
    """S3-FIFO over bytes; see the module docstring for the rules."""

    name: ClassVar[str] = "s3fifo"

    def __init__(
        self,
        capacity_bytes: int | None = None,
        small_ratio: float = DEFAULT_SMALL_RATIO,
        move_to_main_freq: int = DEFAULT_MOVE_TO_MAIN_FREQ,
    ) -> None:
        """Args:
        capacity_bytes: the tier's capacity; None means "the bytes tracked at the time".
        small_ratio: the small queue's share of the cache, in (0, 1).
        move_to_main_freq: hits in S needed to move to M instead of leaving (1..3).
        """
        super().__init__(capacity_bytes)
        if not 0.0 < small_ratio < 1.0:
            raise InvalidArgumentError(f"small_ratio must be in (0, 1), got {small_ratio}")
        if not 1 <= move_to_main_freq <= MAX_FREQ:
            raise InvalidArgumentError(
                f"move_to_main_freq must be in 1..{MAX_FREQ}, got {move_to_main_freq}"
            )
        self.small_ratio = small_ratio
        self.move_to_main_freq = move_to_main_freq
        # FIFO order: insert at the end, evict from the front. Values are frequencies.
        self._small: OrderedDict[Hashable, int] = OrderedDict()
        self._main: OrderedDict[Hashable, int] = OrderedDict()
        self._ghost: OrderedDict[Hashable, int] = OrderedDict()  # key -> its size when evicted
        self._small_bytes = 0
        self._ghost_bytes = 0

    # ------------------------------------------------------------------------ introspection
    @property
    def small_bytes(self) -> int:
        """Bytes in the small (probationary) queue."""
        return self._small_bytes

    def in_ghost(self, key: Hashable) -> bool:
        """Whether ``key`` was evicted from the small queue recently enough to be remembered."""
        return key in self._ghost

    def _cache_bytes(self) -> int:
        return self.capacity_bytes if self.capacity_bytes is not None else self._bytes

    def _trim_ghost(self) -> None:
        limit = self._cache_bytes() - int(self._cache_bytes() * self.small_ratio)
        while self._ghost and self._ghost_bytes > limit:
            _, size = self._ghost.popitem(last=False)
            self._ghost_bytes -= size

    # ------------------------------------------------------------------ policy operations
    def _insert(self, key: Hashable, size: int, parent: Hashable | None) -> None:
        ghost_size = self._ghost.pop(key, None)
        if ghost_size is not None:
            # Reused soon after leaving S: S was too short for it, so skip probation.
            self._ghost_bytes -= ghost_size
            self._main[key] = 0
        else:
            self._small[key] = 0
            self._small_bytes += size

    def _access(self, key: Hashable) -> None:
        if key in self._small:
            self._small[key] = min(self._small[key] + 1, MAX_FREQ)
        else:
            self._main[key] = min(self._main[key] + 1, MAX_FREQ)

    def _remove(self, key: Hashable, size: int) -> None:
        if self._small.pop(key, None) is not None:
            self._small_bytes -= size
        else:
            del self._main[key]

    def on_remove(self, key: Hashable) -> None:
        """Forget ``key``, and its ghost entry if any; unknown keys are otherwise ignored.

        A key the store deleted has no reuse history worth keeping (S3FIFOv0.c's remove also
        clears the ghost), so a later re-put starts on probation in the small queue.
        """
        super().on_remove(key)
        ghost_size = self._ghost.pop(key, None)
        if ghost_size is not None:
            self._ghost_bytes -= ghost_size

    def _pop(self, skip: SkipFn | None) -> Hashable | None:
        # Pinned keys seen in this call, per queue: when a queue holds nothing else, it cannot
        # yield a victim, and when neither can, the call ends.
        pinned: set[Hashable] = set()
        pinned_small = pinned_main = 0
        while True:
            small_open = len(self._small) > pinned_small
            main_open = len(self._main) > pinned_main
            if not small_open and not main_open:
                return None
            use_small = small_open and (
                not main_open or self._small_bytes >= self._cache_bytes() * self.small_ratio
            )
            if use_small:
                key, freq = self._small.popitem(last=False)
                if skip is not None and skip(key):
                    self._small[key] = freq
                    if key not in pinned:
                        pinned.add(key)
                        pinned_small += 1
                    continue
                size = self._sizes[key]
                self._small_bytes -= size
                if freq >= self.move_to_main_freq:
                    self._main[key] = 0  # promoted; its hits in S are spent on the promotion
                    continue
                self._ghost[key] = size
                self._ghost_bytes += size
                self._trim_ghost()
                return key
            key, freq = self._main.popitem(last=False)
            if skip is not None and skip(key):
                self._main[key] = freq
                if key not in pinned:
                    pinned.add(key)
                    pinned_main += 1
                continue
            if freq > 0:
                # CLOCK: a second chance per remaining hit; freq only falls, so this ends.
                self._main[key] = freq - 1
                continue
            return key


def replay_dense(
    chains: list[list[int]],
    n_keys: int,
    capacity: int,
    small_ratio: float = DEFAULT_SMALL_RATIO,
    move_to_main_freq: int = DEFAULT_MOVE_TO_MAIN_FREQ,
) -> tuple[list[int], list[int], list[int]]:
    """The prefix-cache replay of :mod:`.prefixreplay` (one tier, unit-size blocks) through
    S3-FIFO, as one tight loop: the same decisions as :class:`S3FIFO` built with
    ``capacity_bytes=capacity`` and driven per operation, at several times the speed. The
    optimizer's fast path; the tests hold it to the per-operation replay on random and Mooncake
    traces.

    Args:
        chains: each request's blocks as dense ints in ``0..n_keys-1``.
        n_keys: the number of distinct blocks.
        capacity: the tier's capacity in blocks (> 0).

    Returns:
        Per request: the prefix-hit blocks (leading run of blocks resident before the request),
        the blocks inserted, the evictions it caused.

    With no pinned keys and no removals the queues are plain FIFOs (a hit only bumps a
    frequency in place; a reinsertion goes to the tail), so they are deques of keys, with the
    frequencies and queue membership in arrays. The ghost queue drops entries lazily: an entry
    is live while the key's recorded ghost position is the entry's own.
    """
    if not 0.0 < small_ratio < 1.0:
        raise InvalidArgumentError(f"small_ratio must be in (0, 1), got {small_ratio}")
    small: deque[int] = deque()
    main: deque[int] = deque()
    ghost: deque[int] = deque()
    small_append, small_popleft = small.append, small.popleft
    main_append, main_popleft = main.append, main.popleft
    ghost_append, ghost_popleft = ghost.append, ghost.popleft
    where = bytearray(n_keys)  # 0: not resident, 1: small queue, 2: main queue
    freq = bytearray(n_keys)
    ghost_pos = [-1] * n_keys  # position of the key's live ghost entry; -1: none
    ghost_head = ghost_tail = ghost_live = 0
    small_min = capacity * small_ratio  # evict from S while it holds at least this much
    ghost_limit = capacity - int(capacity * small_ratio)
    n_small = 0
    size = 0
    out_hits: list[int] = []
    out_ins: list[int] = []
    out_ev: list[int] = []
    for chain in chains:
        # Hits only bump frequencies, so the leading hits are the prefix found before the request.
        hits = 0
        inserts = 0
        evictions = 0
        prefix = True
        for k in chain:
            if where[k]:
                hits += prefix
                f = freq[k]
                if f < MAX_FREQ:
                    freq[k] = f + 1
                continue
            prefix = False
            inserts += 1
            if size >= capacity:
                while True:
                    if n_small and (not main or n_small >= small_min):
                        v = small_popleft()
                        n_small -= 1
                        if freq[v] >= move_to_main_freq:
                            freq[v] = 0
                            where[v] = 2
                            main_append(v)
                            continue
                        where[v] = 0
                        ghost_pos[v] = ghost_tail
                        ghost_append(v)
                        ghost_tail += 1
                        ghost_live += 1
                        while ghost_live > ghost_limit:
                            g = ghost_popleft()
                            if ghost_pos[g] == ghost_head:
                                ghost_pos[g] = -1
                                ghost_live -= 1
                            ghost_head += 1
                        break
                    v = main_popleft()
                    f = freq[v]
                    if f:
                        freq[v] = f - 1
                        main_append(v)
                        continue
                    where[v] = 0
                    break
                size -= 1
                evictions += 1
            size += 1
            freq[k] = 0
            if ghost_pos[k] >= 0:
                ghost_pos[k] = -1
                ghost_live -= 1
                where[k] = 2
                main_append(k)
            else:
                where[k] = 1
                small_append(k)
                n_small += 1
        out_hits.append(hits)
        out_ins.append(inserts)
        out_ev.append(evictions)
    return out_hits, out_ins, out_ev
