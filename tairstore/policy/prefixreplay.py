"""Prefix-cache replay through the store's policy objects, over one tier or DRAM + SSD.

The semantics, as an inference engine uses a prefix cache (each request is a prefix chain):

1. **Lookup.** The request's hits are the blocks of its longest cached prefix, judged on the
   cache as it stands before the request: a block after the first miss does not count, even if
   it is cached, because a KV block is only usable behind all of its prefix. A prefix block
   found in DRAM is a DRAM hit; one found only on SSD is an SSD hit.
2. **Access / insert.** Then each block of the request, in order, is accessed (a cached one
   becomes most recently used) or inserted (the engine computed it and writes it back), with
   ``parent`` = the previous block of the request.

The tier model (the store's rules, ``DESIGN.md`` "tier"): new blocks are written to DRAM. A
DRAM victim is demoted to SSD (written there unless SSD already holds a copy; blocks are
immutable, so an old copy is as good); an SSD victim is dropped. A block read from SSD is
promoted to DRAM when ``promote`` is True (SSD keeps its copy), else served from SSD only.
With no SSD tier (``ssd_blocks == 0``) DRAM victims are dropped.

Sizes are in blocks: every block of a trace has the same size, so the policies run with size 1
and capacities in blocks; bytes are blocks times the block size, applied by the caller.
Token hits weigh each hit block by the tokens it holds (the last block of a request holds the
remainder of its input).

:func:`replay_prefix` is the reference: it drives the policy objects one operation at a time.
:func:`replay_prefix_dense` is the optimizer's fast path for one tier: the trace's keys mapped
once to dense ints (:func:`densify`) and each policy's own tight replay loop
(``replay_dense`` in :mod:`.leaf_lru` and :mod:`.s3fifo`), which makes the same decisions as
the policy objects; the tests hold it to the reference, count for count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from tairstore.errors import InvalidArgumentError
from tairstore.policy import make_policy
from tairstore.policy import leaf_lru, s3fifo
from tairstore.policy.base import PolicyBase
from tairstore.policy.traces import Trace

__all__ = [
    "ReplayStats", "replay_prefix", "replay_prefix_dense", "densify", "DenseChains",
    "DENSE_REPLAYS", "ALL_GROUPS",
]

#: ``replay_dense(chains, n_keys, capacity) -> (prefix hits, inserts, evictions) per request``.
DenseReplay = Callable[[list[list[int]], int, int], tuple[list[int], list[int], list[int]]]

#: Policies with a one-tier tight replay loop (LRU has the one-pass sweep, :mod:`.stackdist`).
DENSE_REPLAYS: dict[str, DenseReplay] = {
    "leaf_lru": leaf_lru.replay_dense,
    "s3fifo": s3fifo.replay_dense,
}

#: The group name of the row that sums every group.
ALL_GROUPS = "*"


@dataclass
class ReplayStats:
    """What one replay of one configuration counted, for one group (or :data:`ALL_GROUPS`).

    Counts are in blocks and tokens. ``*_writes`` count blocks written to a tier (inserts into
    DRAM, demotions into SSD); ``*_evictions`` count victims the tier's policy chose, attributed
    to the group whose request caused them.
    """

    policy: str
    capacity_blocks: int
    ssd_blocks: int = 0
    group: str = ALL_GROUPS
    block_accesses: int = 0
    dram_hits: int = 0
    ssd_hits: int = 0
    token_accesses: int = 0
    dram_token_hits: int = 0
    ssd_token_hits: int = 0
    dram_writes: int = 0
    ssd_writes: int = 0
    dram_evictions: int = 0
    ssd_evictions: int = 0

    @property
    def block_hits(self) -> int:
        """Prefix-hit blocks in either tier."""
        return self.dram_hits + self.ssd_hits

    @property
    def token_hits(self) -> int:
        """Tokens of the prefix-hit blocks in either tier."""
        return self.dram_token_hits + self.ssd_token_hits

    @property
    def block_hit_rate(self) -> float:
        """``block_hits / block_accesses`` (0.0 when there were none)."""
        return self.block_hits / self.block_accesses if self.block_accesses else 0.0

    @property
    def token_hit_rate(self) -> float:
        """``token_hits / token_accesses`` (0.0 when there were none)."""
        return self.token_hits / self.token_accesses if self.token_accesses else 0.0

    def add(self, other: ReplayStats) -> None:
        """Add ``other``'s counts into this row (used to sum groups)."""
        for f in fields(self):
            if f.type == "int" and f.name not in ("capacity_blocks", "ssd_blocks"):
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def with_total(rows: list[ReplayStats]) -> list[ReplayStats]:
    """``rows`` (one per group) preceded by their sum as the :data:`ALL_GROUPS` row."""
    first = rows[0]
    total = ReplayStats(first.policy, first.capacity_blocks, first.ssd_blocks)
    for r in rows:
        total.add(r)
    return [total] + (rows if len(rows) > 1 else [])


def check_capacity(capacity_blocks: int, ssd_blocks: int = 0) -> None:
    """Raise :class:`InvalidArgumentError` unless DRAM > 0 and SSD >= 0 blocks."""
    if capacity_blocks <= 0 or ssd_blocks < 0:
        raise InvalidArgumentError(
            f"capacities must be positive (SSD may be 0), got dram={capacity_blocks} "
            f"ssd={ssd_blocks} blocks"
        )


def replay_prefix(
    trace: Trace,
    policy: str,
    capacity_blocks: int,
    ssd_blocks: int = 0,
    promote: bool = True,
) -> list[ReplayStats]:
    """Replay ``trace`` through policy ``policy`` (DRAM and, if ``ssd_blocks``, SSD).

    Returns:
        The :data:`ALL_GROUPS` row, then one row per group when the trace has several.

    Raises:
        InvalidArgumentError: unknown policy, or a capacity that is not positive.
    """
    check_capacity(capacity_blocks, ssd_blocks)
    dram = make_policy(policy, capacity_bytes=capacity_blocks)
    ssd = make_policy(policy, capacity_bytes=ssd_blocks) if ssd_blocks else None
    # Every registered policy derives from PolicyBase, whose live key view the loop uses.
    assert isinstance(dram, PolicyBase) and (ssd is None or isinstance(ssd, PolicyBase))
    rows = [
        ReplayStats(policy, capacity_blocks, ssd_blocks, name) for name in trace.group_names
    ]

    # Hot loop: membership through the policies' live key views (C dict lookups), methods
    # bound once. Every block has size 1, so a full tier frees one block per insert.
    in_dram = dram.resident()
    in_ssd = ssd.resident() if ssd is not None else frozenset()
    dram_access, dram_insert, dram_pop = dram.on_access, dram.on_insert, dram.pop_victim

    def put_ssd(key: object, st: ReplayStats) -> None:
        assert ssd is not None
        if len(in_ssd) >= ssd_blocks and ssd.pop_victim() is not None:
            st.ssd_evictions += 1
        ssd.on_insert(key, 1)
        st.ssd_writes += 1

    def put_dram(key: object, parent: object, st: ReplayStats) -> None:
        if len(in_dram) >= capacity_blocks:
            v = dram_pop()
            if v is not None:
                st.dram_evictions += 1
                if ssd is not None and v not in in_ssd:
                    put_ssd(v, st)
        dram_insert(key, 1, parent)
        st.dram_writes += 1

    for chain, toks, g in zip(trace.chains, trace.tokens, trace.groups):
        st = rows[g]
        st.block_accesses += len(chain)
        st.token_accesses += sum(toks)
        # 1. Lookup: the longest cached prefix, on the cache as the request found it.
        for key, n in zip(chain, toks):
            if key in in_dram:
                st.dram_hits += 1
                st.dram_token_hits += n
            elif key in in_ssd:
                st.ssd_hits += 1
                st.ssd_token_hits += n
            else:
                break
        # 2. Access or insert every block, in order.
        parent = None
        for key in chain:
            if key in in_dram:
                dram_access(key)
            elif key in in_ssd:
                assert ssd is not None
                ssd.on_access(key)
                if promote:
                    put_dram(key, parent, st)
            else:
                put_dram(key, parent, st)
            parent = key
    return with_total(rows)


@dataclass(frozen=True)
class DenseChains:
    """A trace's chains with every block key replaced by a dense int in ``0..n_keys-1``."""

    chains: list[list[int]]
    n_keys: int


def densify(trace: Trace) -> DenseChains:
    """Number the trace's distinct blocks in order of first appearance (done once per trace,
    shared by every replay of it)."""
    ids: dict[int, int] = {}
    number = ids.setdefault
    chains = [[number(k, len(ids)) for k in chain] for chain in trace.chains]
    return DenseChains(chains, len(ids))


def replay_prefix_dense(
    trace: Trace, policy: str, capacity_blocks: int, dense: DenseChains | None = None
) -> list[ReplayStats]:
    """:func:`replay_prefix` over DRAM alone (no SSD tier), through ``policy``'s tight loop.

    Same rows, same counts as ``replay_prefix(trace, policy, capacity_blocks)``.

    Args:
        dense: ``densify(trace)``, when the caller replays the trace more than once.

    Raises:
        InvalidArgumentError: a policy without a dense replay, or a capacity that is not positive.
    """
    check_capacity(capacity_blocks)
    try:
        run = DENSE_REPLAYS[policy]
    except KeyError:
        raise InvalidArgumentError(
            f"no dense replay for policy {policy!r}; these have one: {', '.join(DENSE_REPLAYS)}"
        ) from None
    if dense is None:
        dense = densify(trace)
    hits, inserts, evictions = run(dense.chains, dense.n_keys, capacity_blocks)
    rows = [ReplayStats(policy, capacity_blocks, 0, name) for name in trace.group_names]
    for toks, g, h, i, e in zip(trace.tokens, trace.groups, hits, inserts, evictions):
        st = rows[g]
        st.block_accesses += len(toks)
        st.token_accesses += sum(toks)
        st.dram_hits += h
        st.dram_token_hits += sum(toks[:h])
        st.dram_writes += i
        st.dram_evictions += e
    return with_total(rows)
