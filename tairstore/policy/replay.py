"""Trace replay: the hit rate an eviction policy gives a block trace, without a store.

The simulator drives the very policy objects the store uses (:mod:`tairstore.policy`), so the
rates it reports are the store's own. Each request is a prefix chain of block keys (block ``i``
continues block ``i-1``). For each request, in chain order:

- a resident block is a hit and gets ``on_access``;
- a missing block is inserted, with ``parent`` = the previous block of the request, after
  evicting victims until it fits (a block that cannot fit is not cached: the policy has nothing
  evictable, or the block is larger than the tier);
- the *prefix* hits are the leading run of hits: what a prefix cache can actually reuse, since
  a KV block is only usable behind all of its prefix. Every hit counts towards the block hits.

Blocks are looked up one at a time, as an engine matches a prefix and then writes the blocks it
computed; a block inserted earlier in the same request counts if the request repeats it.

Pure apart from :func:`load_mooncake_trace`, which reads the Mooncake trace format (one JSON
object a line with ``hash_ids``, each one 512-token block; equal ids are shared prefix blocks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from tairstore.errors import InvalidArgumentError
from tairstore.policy.base import EvictionPolicy

__all__ = ["ReplayResult", "replay", "load_mooncake_trace"]


@dataclass(frozen=True)
class ReplayResult:
    """What a replay counted.

    Attributes:
        hit_blocks: lookups that found the block resident.
        total_blocks: lookups in all.
        prefix_hit_blocks: hits in the leading resident run of each request.
        hit_rate: ``hit_blocks / total_blocks`` (0.0 for an empty trace).
        prefix_hit_rate: ``prefix_hit_blocks / total_blocks`` (0.0 for an empty trace).
        evictions: blocks the policy chose as victims.
    """

    hit_blocks: int
    total_blocks: int
    prefix_hit_blocks: int
    hit_rate: float
    prefix_hit_rate: float
    evictions: int


def replay(
    requests: Iterable[list[Hashable]],
    policy: EvictionPolicy,
    capacity_bytes: int,
    block_bytes: int,
) -> ReplayResult:
    """Replay ``requests`` against ``policy`` managing a tier of ``capacity_bytes``.

    Args:
        requests: each a prefix chain of block keys.
        policy: a policy, normally empty; blocks it already tracks count as resident (they
            must fit in ``capacity_bytes`` with the inserts, or the first misses evict them).
        capacity_bytes: the tier's capacity. Count blocks by passing ``block_bytes=1``.
        block_bytes: the size of every block.

    Raises:
        InvalidArgumentError: a non-positive capacity or block size.
    """
    if capacity_bytes <= 0 or block_bytes <= 0:
        raise InvalidArgumentError(
            f"capacity_bytes and block_bytes must be positive, got {capacity_bytes}, {block_bytes}"
        )
    hits = total = prefix_hits = evictions = 0
    for chain in requests:
        parent: Hashable | None = None
        in_prefix = True
        for key in chain:
            total += 1
            if key in policy:
                hits += 1
                prefix_hits += in_prefix
                policy.on_access(key)
            else:
                in_prefix = False
                if block_bytes <= capacity_bytes:
                    need = policy.bytes + block_bytes - capacity_bytes
                    if need > 0:
                        evictions += len(policy.victims(need))
                    if policy.bytes + block_bytes <= capacity_bytes:
                        policy.on_insert(key, block_bytes, parent)
            parent = key
    return ReplayResult(
        hit_blocks=hits,
        total_blocks=total,
        prefix_hit_blocks=prefix_hits,
        hit_rate=hits / total if total else 0.0,
        prefix_hit_rate=prefix_hits / total if total else 0.0,
        evictions=evictions,
    )


def load_mooncake_trace(path: str | os.PathLike[str], limit: int | None = None) -> list[list[int]]:
    """The ``hash_ids`` chains of a Mooncake-format JSONL trace, in file order.

    Args:
        path: the ``.jsonl`` file.
        limit: read at most this many requests (None: all).
    """
    chains: list[list[int]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(chains) >= limit:
                break
            if line.strip():
                chains.append([int(h) for h in json.loads(line)["hash_ids"]])
    return chains
