"""Replay throughput of ``tairstore optimize`` on the Mooncake conversation trace, and the table.

Measures, on one trace and five capacities:

- the baseline: a plain Python LRU (an OrderedDict, one loop a request, lookups interleaved with
  inserts: the same work as the replay, without its bookkeeping), one replay per capacity;
- the one-pass LRU stack-distance sweep (every capacity at once);
- each policy through the store's policy objects, one replay per capacity (the reference);
- leaf_lru and s3fifo through their dense replay loops, one replay per capacity (the
  optimizer's fast path, the same counts; the time includes numbering the keys once);
- the whole grid as ``tairstore optimize`` runs it (parallel processes).

Prints block accesses per second (accesses x capacities / seconds) and ratios to the baseline,
then the hit-rate table. Usage: ``python benchmarks/optimize.py [TRACE]``.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

from tairstore.policy.optimize import Grid, format_table, run_grid
from tairstore.policy.prefixreplay import DENSE_REPLAYS, densify, replay_prefix, replay_prefix_dense
from tairstore.policy.stackdist import lru_sweep
from tairstore.policy.traces import Trace, load_trace

TRACE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "traces" / (
    "mooncake_conversation_trace.jsonl"
)
CAPACITIES = [1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18]
POLICIES = ["lru", "leaf_lru", "s3fifo"]


def plain_lru(trace: Trace, capacity: int) -> int:
    """The baseline: an OrderedDict LRU, one loop a request, nothing else (prefix hits)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for chain in trace.chains:
        prefix = True
        for key in chain:
            if key in cache:
                cache.move_to_end(key)
                hits += prefix
                continue
            prefix = False
            if len(cache) >= capacity:
                cache.popitem(last=False)
            cache[key] = None
    return hits


def timed(fn, *args):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else TRACE
    trace, load_s = timed(load_trace, path)
    n = trace.accesses * len(CAPACITIES)
    print(f"{path.name}: {len(trace)} requests, {trace.accesses} block accesses, "
          f"capacities {CAPACITIES}; load {load_s:.2f} s; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    _, base = timed(lambda: [plain_lru(trace, c) for c in CAPACITIES])
    rows = [("plain Python LRU (baseline)", base)]
    rows.append(("lru, one-pass stack distances", timed(lru_sweep, trace, CAPACITIES)[1]))
    for p in POLICIES:
        _, s = timed(lambda: [replay_prefix(trace, p, c) for c in CAPACITIES])
        rows.append((f"{p}, policy objects, serial", s))
    for p in DENSE_REPLAYS:
        def dense_all(p: str = p) -> None:
            d = densify(trace)
            for c in CAPACITIES:
                replay_prefix_dense(trace, p, c, d)
        rows.append((f"{p}, dense replay loop, serial", timed(dense_all)[1]))
    grid = Grid(POLICIES, CAPACITIES)
    result, grid_s = timed(run_grid, trace, grid)
    rows.append(("whole grid, as `optimize` runs it", grid_s))
    print(f"\n{'replay':<36} {'seconds':>8} {'accesses/s':>12} {'vs baseline':>12}")
    for name, s in rows:
        print(f"{name:<36} {s:8.2f} {n / s:12,.0f} {base / s:11.2f}x")
    print(f"\nwhole grid ({len(POLICIES)} policies x {len(CAPACITIES)} capacities): {grid_s:.2f} s"
          f" wall, plus {load_s:.2f} s to load the trace\n")
    print(format_table(result))


if __name__ == "__main__":
    main()
