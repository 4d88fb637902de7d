"""The simulated hierarchical KV cache: GPU prefix cache (L1), host DRAM (L2), storage (L3).

Theory of operation
-------------------
The unit is a prompt block of ``block_tokens`` tokens, named by its key in the request's prefix
chain (``hash_ids``). Each level is a capacity in blocks and one of tairstore's own eviction
policy objects (:func:`tairstore.policy.make_policy`), so the simulator and the store evict
alike. Lookups and inserts follow :func:`tairstore.policy.replay.replay` block by block: a
resident block is a hit (``on_access``), a missing one is inserted after evicting victims.

A request's usable prefix is the leading run of blocks that some level holds; each block is
credited to the fastest level holding it. When the request is admitted, its whole chain is
written into L1 (hits refreshed, misses inserted). Below L1:

- ``write_through``: every block inserted into L1 is copied to L2 and on to L3 at once (the
  copies occupy the device-to-host and storage-write links), so an L1 eviction just drops;
- ``write_back``: a block reaches L2 only when L1 evicts it, and L3 only when L2 evicts it.

L2 and L3 hits are loaded into L1 (and L3 hits into L2 on the way, as SGLang's HiCache prefetches
storage hits into host memory), each transfer occupying its :class:`Link` for
``bytes / bandwidth``; the engine delays the request's prefill until its loads are done.

Capacity None means unlimited; 0 disables a level.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Sequence

from tairstore.errors import InvalidArgumentError
from tairstore.policy import make_policy
from tairstore.policy.base import EvictionPolicy

LEVELS = ("gpu", "dram", "ssd")
WRITE_POLICIES = ("write_through", "write_back")
# Links, each one direction of one per-GPU path (bytes are divided over the TP group's GPUs).
LINKS = ("h2d", "d2h", "ssd_read", "ssd_write")


@dataclass
class Link:
    """A transfer path with a bandwidth; transfers queue on it one after another."""

    name: str
    bytes_per_ms: float
    free_at_ms: float = 0.0
    bytes_moved: int = 0

    def transfer(self, now_ms: float, n_bytes: int) -> float:
        """Queue ``n_bytes`` at ``now_ms``; return when they have arrived."""
        if n_bytes <= 0:
            return now_ms
        start = max(now_ms, self.free_at_ms)
        self.free_at_ms = start + n_bytes / self.bytes_per_ms
        self.bytes_moved += n_bytes
        return self.free_at_ms


@dataclass
class Level:
    """One cache level: its capacity in blocks (None = unlimited) and its eviction policy."""

    name: str
    capacity: int | None
    policy: EvictionPolicy
    hits: int = 0

    def has_room(self) -> bool:
        """Whether one more block fits without eviction."""
        return self.capacity is None or len(self.policy) < self.capacity


@dataclass
class CacheConfig:
    """Sizes and policies of the three levels (capacities in blocks; None = unlimited)."""

    gpu_blocks: int | None = None
    dram_blocks: int = 0
    ssd_blocks: int = 0
    gpu_policy: str = "leaf_lru"  # a radix cache evicts leaves first, as SGLang's does
    dram_policy: str = "lru"
    ssd_policy: str = "lru"
    write_policy: str = "write_through"
    block_tokens: int = 512

    def __post_init__(self) -> None:
        if self.write_policy not in WRITE_POLICIES:
            raise InvalidArgumentError(f"write policy must be one of {WRITE_POLICIES}, got "
                                       f"{self.write_policy!r}")
        for name in ("gpu_blocks", "dram_blocks", "ssd_blocks"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidArgumentError(f"{name} must be >= 0, got {value}")
        if self.block_tokens < 1:
            raise InvalidArgumentError(f"block_tokens must be >= 1, got {self.block_tokens}")


@dataclass
class Match:
    """Where a request's usable prefix blocks were found, by level."""

    gpu: int = 0
    dram: int = 0
    ssd: int = 0
    total: int = 0

    @property
    def blocks(self) -> int:
        """Usable prefix blocks in all."""
        return self.gpu + self.dram + self.ssd


@dataclass
class HierCache:
    """The three levels and the links between them.

    Args:
        config: sizes and policies.
        block_bytes: bytes one block moves over a link (per GPU of the TP group).
        link_gbps: GB/s of each link in :data:`LINKS`.
    """

    config: CacheConfig
    block_bytes: int
    link_gbps: dict[str, float]
    levels: list[Level] = field(init=False)
    links: dict[str, Link] = field(init=False)
    lookups: int = 0

    def __post_init__(self) -> None:
        c = self.config
        caps = (c.gpu_blocks, c.dram_blocks, c.ssd_blocks)
        pols = (c.gpu_policy, c.dram_policy, c.ssd_policy)
        self.levels = [Level(n, cap, make_policy(p, capacity_bytes=cap or None))
                       for n, cap, p in zip(LEVELS, caps, pols)]
        self.links = {n: Link(n, self.link_gbps[n] * 1e6) for n in LINKS}

    @property
    def gpu(self) -> Level:
        """The GPU prefix cache (L1)."""
        return self.levels[0]

    def match(self, chain: Sequence[Hashable]) -> Match:
        """Where the leading run of ``chain``'s blocks lives; counts the hits by level."""
        m = Match(total=len(chain))
        self.lookups += len(chain)
        l1, l2, l3 = (lv.policy for lv in self.levels)
        for key in chain:
            if key in l1:
                m.gpu += 1
            elif key in l2:
                m.dram += 1
            elif key in l3:
                m.ssd += 1
            else:
                break
        self.levels[0].hits += m.gpu
        self.levels[1].hits += m.dram
        self.levels[2].hits += m.ssd
        return m

    def load(self, now_ms: float, m: Match) -> float:
        """Bring a match's L3 and L2 blocks up to L1; return when the last one has arrived."""
        t = now_ms
        if m.ssd:
            t = self.links["ssd_read"].transfer(t, m.ssd * self.block_bytes)
        if m.dram or m.ssd:
            t = self.links["h2d"].transfer(t, (m.dram + m.ssd) * self.block_bytes)
        return t

    def admit(self, now_ms: float, chain: Sequence[Hashable], m: Match) -> None:
        """Write a scheduled request's chain into L1 (and below, per the write policy)."""
        through = self.config.write_policy == "write_through"
        parent: Hashable | None = None
        for i, key in enumerate(chain):
            if self._put(0, key, parent, now_ms) and through:
                self._put(1, key, parent, now_ms, demoted=True)
                self._put(2, key, parent, now_ms, demoted=True)
            elif i >= m.gpu + m.dram and i < m.blocks:
                self._put(1, key, parent, now_ms)  # an L3 hit passes through host memory
            parent = key

    def shrink_gpu(self, blocks: int, now_ms: float) -> None:
        """Evict L1 down to ``blocks`` (running requests took the rest of the KV pool)."""
        level = self.levels[0]
        while len(level.policy) > max(blocks, 0):
            victim = level.policy.pop_victim()
            if victim is None:
                break
            self._demote(0, victim, now_ms)

    def _put(self, idx: int, key: Hashable, parent: Hashable | None, now_ms: float,
             demoted: bool = False) -> bool:
        """Insert or refresh ``key`` at level ``idx``; True if it was inserted."""
        level = self.levels[idx]
        if level.capacity == 0:
            return False
        if key in level.policy:
            if not demoted:
                level.policy.on_access(key)
            return False
        while not level.has_room():
            victim = level.policy.pop_victim()
            if victim is None:
                return False
            self._demote(idx, victim, now_ms)
        level.policy.on_insert(key, 1, parent)
        if demoted:
            self.links["d2h" if idx == 1 else "ssd_write"].transfer(now_ms, self.block_bytes)
        return True

    def _demote(self, idx: int, key: Hashable, now_ms: float) -> None:
        """An evicted block moves one level down under write-back (write-through has it)."""
        if self.config.write_policy == "write_back" and idx + 1 < len(self.levels):
            self._put(idx + 1, key, None, now_ms, demoted=True)

    def hit_rates(self) -> dict[str, float]:
        """Blocks found per level over all blocks looked up."""
        n = max(self.lookups, 1)
        return {lv.name: lv.hits / n for lv in self.levels}

    def bytes_per_link(self) -> dict[str, int]:
        """Bytes each link moved."""
        return {n: link.bytes_moved for n, link in self.links.items()}
