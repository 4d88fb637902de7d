"""Eviction policies: which resident block of a tier leaves next.

The same objects drive the store, HiSim and the trace replayer (:mod:`tairstore.policy.replay`), so a
simulated hit rate is the store's real hit rate. A policy is pure: no I/O, no locks, no threads;
the store calls it under its own lock.

The contract (:class:`EvictionPolicy`)
--------------------------------------
``on_insert(key, size, parent=None)``
    ``key`` (``size`` bytes) now resides in the tier; ``parent`` is the previous block of its
    chain (its prefix) when known. Inserting a key that is already tracked raises
    :class:`~tairstore.errors.InvalidArgumentError` (a ``ValueError``): the store never double
    inserts, so one would be a bookkeeping bug that treating it as a hit would hide.
``on_access(key)``
    A hit. Unknown keys are ignored.
``on_remove(key)``
    The block left the tier for a reason decided elsewhere (delete, TTL, demotion). Unknown
    keys are ignored.
``pop_victim(skip=None)``
    Choose the next block to evict, forget it and return it; None when nothing is evictable.
    ``skip(key)`` True means the key is pinned (a reader holds it): it is not returned and stays
    tracked. Every policy terminates even when every key is skipped. ``skip`` must not call back
    into the policy.
``victims(n_bytes, skip=None)``
    Pop victims until their sizes sum to ``>= n_bytes`` or nothing more is evictable.
``len(p)``, ``key in p``, ``p.bytes``, ``p.name``
    Resident keys, membership, their total size, the policy's registry name.

Policies (:data:`POLICIES`, built by :func:`make_policy`)
---------------------------------------------------------
- ``"lru"`` (:class:`LRU`): least recently used first.
- ``"leaf_lru"`` (:class:`LeafLRU`): LRU among chain tails only; a prefix never leaves while a
  continuation of it is resident.
- ``"s3fifo"`` (:class:`S3FIFO`): S3-FIFO (Yang et al., SOSP'23); quick demotion of blocks that
  are not reused.

Every constructor takes ``capacity_bytes`` (the tier's capacity, or None), so callers can build
any policy with the same arguments; only S3-FIFO uses it.

The optimizer (``tairstore optimize``, docs/OPTIMIZER.md) lives beside them: :mod:`.traces`
(trace formats), :mod:`.accesslog` (the daemon's access log), :mod:`.prefixreplay` (prefix-cache
replay over DRAM + SSD), :mod:`.stackdist` (LRU at every capacity in one pass),
:mod:`.optimize` (the grid, in parallel), :mod:`.roi` (cost, savings, Pareto frontier, plots).
"""

from __future__ import annotations

from typing import Any

from tairstore.errors import InvalidArgumentError
from tairstore.policy.base import EvictionPolicy, PolicyBase, SkipFn
from tairstore.policy.leaf_lru import LeafLRU
from tairstore.policy.lru import LRU
from tairstore.policy.s3fifo import S3FIFO

__all__ = [
    "EvictionPolicy",
    "PolicyBase",
    "SkipFn",
    "LRU",
    "LeafLRU",
    "S3FIFO",
    "POLICIES",
    "make_policy",
]

#: Registry name -> policy class; the names config files, HiSim and benchmarks use.
POLICIES: dict[str, type[PolicyBase]] = {cls.name: cls for cls in (LRU, LeafLRU, S3FIFO)}


def make_policy(name: str, **kwargs: Any) -> EvictionPolicy:
    """Build the policy registered as ``name`` with the constructor arguments ``kwargs``.

    Raises:
        InvalidArgumentError: ``name`` is not in :data:`POLICIES` (the message lists them).
    """
    try:
        cls = POLICIES[name]
    except KeyError:
        valid = ", ".join(sorted(POLICIES))
        raise InvalidArgumentError(
            f"unknown eviction policy {name!r}; valid policies: {valid}"
        ) from None
    return cls(**kwargs)
