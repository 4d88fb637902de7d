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

Depths are computed offline, for all accesses at once, with numpy. With ``next[j]`` the next
access of the block accessed at ``j``, the blocks used since an access ``p`` and before time
``q`` are the accesses ``j`` in ``(p, q)`` with ``next[j] >= q`` (each block's latest one), so
a depth is ``(q - p - 1) - #{j > p : next[j] < q}``: one sorted search plus a 2-D dominance
count ``#{j <= p : next[j] < q}``, which a merge-sort tree answers with one vectorised
``searchsorted`` per level (:class:`_DominanceCounter`). O(n log n) in all, no Python loop per
access. The running maximum within each request is one ``maximum.accumulate`` over values
offset per request.

This agrees exactly with replaying :class:`~tairstore.policy.LRU` through
:func:`~tairstore.policy.prefixreplay.replay_prefix` (the tests check it on the Mooncake traces).
"""

from __future__ import annotations

import itertools
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
    sizes = np.fromiter(map(len, trace.chains), np.int64, len(trace.chains))
    n = int(sizes.sum())
    keys = np.fromiter(itertools.chain.from_iterable(trace.chains), np.int64, n)
    t = np.arange(n, dtype=np.int64)
    # prev[t] / nxt[t]: the previous / next access of the same block (-1 / n when none).
    order = np.argsort(keys, kind="stable")
    same = keys[order[1:]] == keys[order[:-1]]
    prev = np.full(n, -1, np.int64)
    nxt = np.full(n, n, np.int64)
    prev[order[1:][same]] = order[:-1][same]
    nxt[order[:-1][same]] = order[1:][same]
    start = np.repeat(np.cumsum(sizes) - sizes, sizes)  # first access of each access's request
    counter = _DominanceCounter(nxt)
    sorted_next = np.sort(nxt)

    def distinct_between(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        # Blocks whose latest access before q is in (p, q): accesses j in (p, q) with
        # nxt[j] >= q, i.e. (q - p - 1) minus those with nxt[j] < q (which implies j < q).
        later = np.searchsorted(sorted_next, q) - counter.count(p, q)
        return q - p - 1 - later

    seen = prev >= 0
    access_depth = np.full(n, cutoff, np.int64)
    access_depth[seen] = np.minimum(distinct_between(prev[seen], t[seen]), cutoff)
    # At request start. A block repeated within its request (prev >= start) was judged at its
    # first occurrence, which comes earlier in the chain: 0 leaves the running maximum alone.
    before = seen & (prev < start)
    start_depth = np.where(seen, 0, cutoff)
    start_depth[before] = np.minimum(distinct_between(prev[before], start[before]), cutoff)
    # Running maximum within each request: offset each request above the previous ones so one
    # global maximum.accumulate never carries a value across a request boundary.
    req = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes) * (cutoff + 1)
    prefix_depth = np.maximum.accumulate(start_depth + req) - req
    return prefix_depth, access_depth


class _DominanceCounter:
    """Counts ``#{j <= p : y[j] < q}`` for many (p, q) at once (an offline merge-sort tree).

    Level k holds ``y`` sorted within aligned blocks of 2**k positions, as one array keyed by
    ``block * (ymax + 1) + y``. The prefix ``[0, p]`` is the union of one block per set bit of
    ``p + 1`` (the Fenwick decomposition), and each block's count is one ``searchsorted``.
    """

    def __init__(self, y: np.ndarray) -> None:
        self.n = len(y)
        self.span = int(y.max()) + 1 if self.n else 1
        self.levels: list[np.ndarray] = []
        xs = np.arange(self.n, dtype=np.int64)
        ys = y.astype(np.int64)
        for k in range(max(1, self.n.bit_length())):
            key = (xs >> k) * self.span + ys
            # The previous level's order leaves two sorted runs per block: a stable sort
            # (timsort) merges them in linear time.
            o = np.argsort(key, kind="stable")
            xs, ys = xs[o], ys[o]
            self.levels.append(key[o])

    def count(self, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        """``#{j <= p[i] : y[j] < q[i]}`` for each i (``p`` may be -1)."""
        length = p + 1
        out = np.zeros(len(p), np.int64)
        for k, level in enumerate(self.levels):
            m = ((length >> k) & 1).astype(bool)
            if not m.any():
                continue
            block = (length[m] >> k) - 1
            out[m] += np.searchsorted(level, block * self.span + q[m]) - (block << k)
        return out


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
    tokens = np.fromiter(itertools.chain.from_iterable(trace.tokens), np.int64, len(group))
    accesses = np.bincount(group, minlength=n_groups)
    token_accesses = np.bincount(group, weights=tokens, minlength=n_groups)
    distinct = len(set(itertools.chain.from_iterable(trace.chains)))
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
