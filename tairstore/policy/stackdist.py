"""LRU hit rates for every capacity in one pass over a trace, by stack distances.

Theory of operation
-------------------
LRU over equal-sized blocks is a stack algorithm (Mattson et al., 1970): a cache of ``C`` blocks
holds exactly the ``C`` most recently used distinct blocks, whatever happened before, because
every access or insert moves its block to the top and an insert into a full cache drops the
bottom. So with the *depth* of a block (how many distinct blocks were used since it was last
used; 0 for the most recent), "resident in a cache of ``C``" is "depth < ``C``", for all ``C``
at once.

The replay semantics of :mod:`tairstore.policy.prefixreplay` then become:

- a request's block ``i`` is a prefix hit at capacity ``C`` iff every block ``0..i`` had depth
  < ``C`` when the request arrived, i.e. iff the running maximum ``m_i`` of those depths is
  < ``C``;
- a block is inserted (written) at capacity ``C`` iff its depth at the moment it is accessed
  (after the request's earlier blocks moved up) is >= ``C``;
- evictions are inserts less what stays resident at the end: ``inserts - min(C, distinct)``.

Depths come from a Fenwick tree over access times holding a 1 at each block's latest access:
the depth of a block last used at time ``p`` is the number of 1s after ``p``. Each access costs
O(log n). A depth at or beyond the largest capacity asked for is a miss for all of them, so the
lookup stops there.

This agrees exactly with replaying :class:`~tairstore.policy.LRU` through
:func:`~tairstore.policy.prefixreplay.replay_prefix` (the tests check it on the Mooncake traces).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tairstore.policy.prefixreplay import ReplayStats, check_capacity, with_total
from tairstore.policy.traces import Trace

__all__ = ["lru_depths", "lru_sweep"]


def lru_depths(trace: Trace, cutoff: int) -> tuple[np.ndarray, np.ndarray]:
    """Per access, in trace order: the prefix depth ``m_i`` and the depth at access time.

    Both are clamped to ``cutoff`` (a depth >= ``cutoff`` is a miss at every capacity <=
    ``cutoff``); a block never seen before has depth ``cutoff``.
    """
    n = trace.accesses
    tree = [0] * (n + 1)
    last: dict[int, int] = {}
    prefix_depth = [cutoff] * n
    access_depth = [cutoff] * n
    distinct = 0  # the number of 1s in the tree
    t = 0  # 1-based time of the latest access
    for chain in trace.chains:
        # Lookup, on the stack as the request found it.
        run = 0
        i = t
        for key in chain:
            p = last.get(key)
            if p is None:
                break
            s = 0
            while p:
                s += tree[p]
                p &= p - 1
            d = distinct - s
            if d > run:
                run = d
                if run >= cutoff:
                    break
            prefix_depth[i] = run
            i += 1
        # Access / insert: each block moves to the top.
        for key in chain:
            p = last.get(key)
            if p is None:
                distinct += 1
            else:
                s = 0
                j = p
                while j:
                    s += tree[j]
                    j &= j - 1
                d = distinct - s
                if d < cutoff:
                    access_depth[t] = d
                while p <= n:
                    tree[p] -= 1
                    p += p & -p
            t += 1
            last[key] = t
            j = t
            while j <= n:
                tree[j] += 1
                j += j & -j
    return np.asarray(prefix_depth, dtype=np.int64), np.asarray(access_depth, dtype=np.int64)


def lru_sweep(trace: Trace, capacities: Sequence[int]) -> list[list[ReplayStats]]:
    """LRU over one DRAM tier at each of ``capacities`` (blocks), in one pass.

    Returns:
        Per capacity, in the order given: the ``ALL_GROUPS`` row, then one row per group when
        the trace has several (the shape :func:`~tairstore.policy.prefixreplay.replay_prefix`
        returns).
    """
    for c in capacities:
        check_capacity(c)
    if not capacities:
        return []
    cutoff = max(capacities)
    prefix_depth, access_depth = lru_depths(trace, cutoff)
    n_groups = len(trace.group_names)
    sizes = [len(c) for c in trace.chains]
    group = np.repeat(np.asarray(trace.groups, dtype=np.int64), sizes)
    tokens = np.fromiter((x for toks in trace.tokens for x in toks), np.int64, len(group))
    accesses = np.bincount(group, minlength=n_groups)
    token_accesses = np.bincount(group, weights=tokens, minlength=n_groups)
    distinct = len({k for chain in trace.chains for k in chain})
    out = []
    for cap in capacities:
        hit = prefix_depth < cap
        ins = access_depth >= cap
        hits = np.bincount(group[hit], minlength=n_groups)
        tok_hits = np.bincount(group[hit], weights=tokens[hit], minlength=n_groups)
        inserts = np.bincount(group[ins], minlength=n_groups)
        rows = []
        for g, name in enumerate(trace.group_names):
            rows.append(
                ReplayStats(
                    "lru",
                    cap,
                    group=name,
                    block_accesses=int(accesses[g]),
                    dram_hits=int(hits[g]),
                    token_accesses=int(token_accesses[g]),
                    dram_token_hits=int(tok_hits[g]),
                    dram_writes=int(inserts[g]),
                )
            )
        _spread_evictions(rows, cap, distinct)
        out.append(with_total(rows))
    return out


def _spread_evictions(rows: list[ReplayStats], cap: int, distinct: int) -> None:
    """Evictions = inserts - what stays resident; attribute them in proportion to inserts."""
    inserts = sum(r.dram_writes for r in rows)
    evictions = max(0, inserts - min(cap, distinct))
    # The group that caused an eviction is not tracked by the sweep; the shares follow the
    # inserts, which is exact for one group.
    left = evictions
    for r in rows[:-1]:
        share = evictions * r.dram_writes // inserts if inserts else 0
        r.dram_evictions = share
        left -= share
    rows[-1].dram_evictions = left
