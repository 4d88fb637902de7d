"""The optimizer: replay a trace over a grid of (policy, DRAM size, SSD size) and tabulate it.

LRU over DRAM alone is computed for every capacity in one pass (:mod:`.stackdist`); every other
configuration is one replay (:mod:`.prefixreplay`): over DRAM alone through the policy's tight
loop on the trace's keys numbered densely once (``replay_prefix_dense``, the same counts as the
policy objects), with an SSD tier through the store's policy objects. The replays run in
parallel processes (fork: the workers inherit the loaded trace, nothing is pickled but the
results). A capacity that holds every distinct block of the trace evicts
nothing under any policy, so it is read off the LRU sweep, not replayed.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import multiprocessing
import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from tairstore.errors import InvalidArgumentError
from tairstore.policy import POLICIES
from tairstore.policy.prefixreplay import (
    ALL_GROUPS,
    DENSE_REPLAYS,
    DenseChains,
    ReplayStats,
    check_capacity,
    densify,
    replay_prefix,
    replay_prefix_dense,
)
from tairstore.policy.stackdist import lru_sweep
from tairstore.policy.traces import Trace

__all__ = ["Grid", "parse_capacity", "parse_policies", "run_grid", "write_csv", "CSV_COLUMNS"]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_CAPACITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)

#: CSV columns, in order. The first six are the contract the issue names; bytes are blocks
#: times the block size.
CSV_COLUMNS = (
    "policy", "capacity_blocks", "block_accesses", "block_hits", "block_hit_rate",
    "token_hit_rate", "ssd_blocks", "group", "dram_hits", "ssd_hits", "token_accesses",
    "token_hits", "dram_token_hit_rate", "ssd_token_hit_rate", "dram_bytes_written",
    "ssd_bytes_written", "dram_evictions", "ssd_evictions",
)


def parse_capacity(text: str, block_bytes: int | None = None) -> int:
    """A capacity in blocks: ``4096``, ``16k`` (x1024) are blocks; ``64GiB``, ``512MB`` are bytes.

    Byte sizes (a ``B`` / ``iB`` suffix; units are powers of 1024) need ``block_bytes`` and
    round down to whole blocks. ``0`` is allowed (an absent SSD tier); the caller decides.

    Raises:
        InvalidArgumentError: not a size, or bytes without a block size.
    """
    m = _CAPACITY.match(text)
    if not m:
        raise InvalidArgumentError(f"not a capacity: {text!r} (use e.g. 16k blocks or 64GiB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if m.group(3):
        if not block_bytes or block_bytes <= 0:
            raise InvalidArgumentError(f"capacity {text!r} is in bytes: give the block size")
        return int(value // block_bytes)
    if value != int(value):
        raise InvalidArgumentError(f"capacity {text!r} is not a whole number of blocks")
    return int(value)


def parse_policies(text: str) -> list[str]:
    """``lru,leaf_lru`` -> the list, each checked against the policy registry."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in POLICIES:
            raise InvalidArgumentError(
                f"unknown eviction policy {n!r}; valid policies: {', '.join(sorted(POLICIES))}"
            )
    if not names:
        raise InvalidArgumentError("no policy given")
    return names


@dataclass(frozen=True)
class Grid:
    """The configurations to replay: every policy x DRAM capacity x SSD capacity (blocks)."""

    policies: Sequence[str]
    capacities: Sequence[int]
    ssd_capacities: Sequence[int] = (0,)
    promote: bool = True

    def check(self) -> None:
        """Raise :class:`InvalidArgumentError` on an unknown policy or a bad capacity."""
        parse_policies(",".join(self.policies))
        if not self.capacities:
            raise InvalidArgumentError("no capacity given")
        for c in self.capacities:
            for s in self.ssd_capacities:
                check_capacity(c, s)


# The trace the workers replay, and its dense form when a job uses it; set before the pool
# forks, so they are shared, not pickled.
_TRACE: Trace | None = None
_DENSE: DenseChains | None = None


def _dense_job(policy: str, ssd: int) -> bool:
    return ssd == 0 and policy in DENSE_REPLAYS


def _job(policy: str, capacity: int, ssd: int, promote: bool) -> list[ReplayStats]:
    assert _TRACE is not None
    if _dense_job(policy, ssd):
        return replay_prefix_dense(_TRACE, policy, capacity, _DENSE)
    return replay_prefix(_TRACE, policy, capacity, ssd, promote)


def _sweep(capacities: list[int]) -> list[list[ReplayStats]]:
    assert _TRACE is not None
    return lru_sweep(_TRACE, capacities)


def run_grid(trace: Trace, grid: Grid, workers: int | None = None) -> list[ReplayStats]:
    """Replay every configuration of ``grid``; rows in (policy, ssd, capacity, group) order.

    Args:
        workers: processes; None uses every CPU, 1 replays in this process.
    """
    global _TRACE, _DENSE
    grid.check()
    caps = sorted(set(grid.capacities))
    ssds = sorted(set(grid.ssd_capacities))
    # A DRAM tier that holds every distinct block never evicts, so every policy keeps every
    # block and replays alike (and no SSD is ever written): those configurations are read
    # off the LRU sweep instead of replayed.
    dense = (densify(trace) if 0 in ssds and any(p in DENSE_REPLAYS for p in grid.policies)
             else None)
    distinct = (dense.n_keys if dense is not None
                else len(set(itertools.chain.from_iterable(trace.chains))))
    unbounded = [c for c in caps if c >= distinct]
    sweep_caps = sorted(set(unbounded) | (set(caps) if "lru" in grid.policies and 0 in ssds
                                          else set()))
    jobs = [(p, c, s) for p in grid.policies for s in ssds for c in caps
            if c < distinct and not (p == "lru" and s == 0)]
    workers = workers or os.cpu_count() or 1
    _TRACE = trace
    _DENSE = dense
    try:
        results: dict[tuple[str, int, int], list[ReplayStats]] = {}
        swept: list[list[ReplayStats]] = []
        if workers == 1 or len(jobs) + bool(sweep_caps) <= 1:
            swept = _sweep(sweep_caps)
            for j in jobs:
                results[j] = _job(*j, grid.promote)
        else:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                # The sweep is the longest single task: start it first.
                sweep_f = pool.submit(_sweep, sweep_caps)
                futs = {j: pool.submit(_job, *j, grid.promote) for j in jobs}
                swept = sweep_f.result()
                for j, f in futs.items():
                    results[j] = f.result()
    finally:
        _TRACE = _DENSE = None
    by_cap = dict(zip(sweep_caps, swept))
    for p in grid.policies:
        for s in ssds:
            for c in caps:
                if (p, c, s) not in results:
                    results[(p, c, s)] = [
                        dataclasses.replace(r, policy=p, ssd_blocks=s) for r in by_cap[c]
                    ]
    out: list[ReplayStats] = []
    for p in grid.policies:
        for s in ssds:
            for c in caps:
                out.extend(results[(p, c, s)])
    return out


def csv_row(r: ReplayStats, block_bytes: int) -> dict[str, object]:
    """One CSV row (see :data:`CSV_COLUMNS`) for ``r``."""
    ta = r.token_accesses or 1
    return {
        "policy": r.policy,
        "capacity_blocks": r.capacity_blocks,
        "block_accesses": r.block_accesses,
        "block_hits": r.block_hits,
        "block_hit_rate": f"{r.block_hit_rate:.6f}",
        "token_hit_rate": f"{r.token_hit_rate:.6f}",
        "ssd_blocks": r.ssd_blocks,
        "group": r.group,
        "dram_hits": r.dram_hits,
        "ssd_hits": r.ssd_hits,
        "token_accesses": r.token_accesses,
        "token_hits": r.token_hits,
        "dram_token_hit_rate": f"{r.dram_token_hits / ta:.6f}",
        "ssd_token_hit_rate": f"{r.ssd_token_hits / ta:.6f}",
        "dram_bytes_written": r.dram_writes * block_bytes,
        "ssd_bytes_written": r.ssd_writes * block_bytes,
        "dram_evictions": r.dram_evictions,
        "ssd_evictions": r.ssd_evictions,
    }


def write_csv(path: str | os.PathLike[str], rows: Sequence[ReplayStats], block_bytes: int) -> None:
    """Write one row per (policy, capacity, SSD capacity, group) to ``path``."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(csv_row(r, block_bytes))


def format_table(rows: Sequence[ReplayStats], all_groups: bool = False) -> str:
    """A plain-text table of the rows (only the all-groups rows unless ``all_groups``)."""
    head = (
        f"{'policy':>8} {'dram':>8} {'ssd':>8} {'group':>10} {'accesses':>9} {'hits':>8} "
        f"{'block':>7} {'token':>7} {'dram':>7} {'ssd':>7} {'evict':>8}"
    )
    lines = [head]
    for r in rows:
        if r.group != ALL_GROUPS and not all_groups:
            continue
        ta = r.token_accesses or 1
        lines.append(
            f"{r.policy:>8} {r.capacity_blocks:>8} {r.ssd_blocks:>8} {r.group:>10} "
            f"{r.block_accesses:>9} {r.block_hits:>8} {r.block_hit_rate:7.4f} "
            f"{r.token_hit_rate:7.4f} {r.dram_token_hits / ta:7.4f} {r.ssd_token_hits / ta:7.4f} "
            f"{r.dram_evictions + r.ssd_evictions:>8}"
        )
    return "\n".join(lines)
