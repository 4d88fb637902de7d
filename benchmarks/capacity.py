"""Capacity: how well the store uses a full tier.

Sections (``--section``, default ``all``):

- ``policies``: the hit rate of each eviction policy (:data:`tairstore.policy.POLICIES`) on the
  Mooncake conversation trace (``../shared/data/traces/mooncake_conversation_trace.jsonl``,
  kvcache-ai/Mooncake FAST'25 release, Apache-2.0), replayed by :func:`tairstore.policy.replay.replay`
  through the same policy objects the store uses. Each ``hash_id`` is one 512-token block; the
  tier holds a fraction (``--capacities``, default 10%, 25%, 50%) of the trace's unique blocks.
  Two rates per policy and capacity: the *prefix* hit rate (blocks in the leading resident run
  of each request, which is what a prefix cache can reuse) and the *block* hit rate (every
  resident block). Both are over all blocks the trace looks up, cold misses included.
  Deterministic: no timing, one run is the answer.
- ``throughput``: sustained put throughput of 1 MiB blocks while the SSD tier is full and
  compaction runs, as a ratio of the same puts on an empty store (see
  :func:`run_throughput_section`).

Run: ``python benchmarks/capacity.py`` (the policy section takes about ten seconds),
``--section policies --capacities 5,10,25,50,100``, ``--limit 2000`` for the first requests only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tairstore.policy import POLICIES, make_policy
from tairstore.policy.replay import load_mooncake_trace, replay

GIB = 1 << 30

#: The trace, relative to the repository (the shared data folder sits beside it).
DEFAULT_TRACE = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "traces"
    / "mooncake_conversation_trace.jsonl"
)
#: Tier sizes in percent of the trace's unique blocks: a tight, a middling and a roomy cache.
DEFAULT_CAPACITY_PCTS = (10, 25, 50)
#: Tokens per block: the Mooncake trace hashes prompts in 512-token blocks.
BLOCK_TOKENS = 512
#: KV bytes per token of an 8B model with grouped-query attention (Llama-3-8B: 32 layers x
#: (K + V) x 8 KV heads x 128 head dim x 2 bytes of bf16). Only scales the GiB column: every
#: block has the same size, so the hit rates depend on the capacity in blocks alone.
KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2
BLOCK_BYTES = BLOCK_TOKENS * KV_BYTES_PER_TOKEN  # 64 MiB


# --------------------------------------------------------------------------- policies section
@dataclass(frozen=True)
class PolicyHitRate:
    """One row of the policy table: one policy replayed at one tier size."""

    policy: str
    capacity_pct: float
    capacity_blocks: int
    capacity_gib: float
    prefix_hit_rate: float
    hit_rate: float
    evictions: int


def policy_hit_rates(
    trace_path: str | Path,
    capacities: Sequence[float],
    *,
    limit: int | None = None,
    policies: Sequence[str] | None = None,
) -> list[PolicyHitRate]:
    """Replay the trace through each policy at each capacity.

    Args:
        trace_path: a Mooncake-format JSONL trace.
        capacities: tier sizes in percent of the trace's unique blocks (e.g. ``[10, 25, 50]``).
        limit: replay only the first ``limit`` requests (None: all).
        policies: registry names to run (None: every policy in :data:`POLICIES`).

    Returns:
        One row per (policy, capacity), policies in registry order, capacities as given.
    """
    trace = load_mooncake_trace(trace_path, limit=limit)
    unique = len({k for chain in trace for k in chain})
    rows: list[PolicyHitRate] = []
    for name in policies if policies is not None else list(POLICIES):
        for pct in capacities:
            blocks = max(1, int(unique * pct / 100))
            cap = blocks * BLOCK_BYTES
            r = replay(trace, make_policy(name, capacity_bytes=cap), cap, BLOCK_BYTES)
            rows.append(
                PolicyHitRate(
                    policy=name,
                    capacity_pct=pct,
                    capacity_blocks=blocks,
                    capacity_gib=cap / GIB,
                    prefix_hit_rate=r.prefix_hit_rate,
                    hit_rate=r.hit_rate,
                    evictions=r.evictions,
                )
            )
    return rows


def format_hit_rate_table(rows: Sequence[PolicyHitRate]) -> str:
    """The rows as an aligned text table, rates in percent."""
    head = (
        f"{'policy':<10}{'capacity':>9}{'blocks':>9}{'GiB':>9}"
        f"{'prefix hit':>12}{'block hit':>11}{'evictions':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.policy:<10}{r.capacity_pct:>8g}%{r.capacity_blocks:>9}{r.capacity_gib:>9.0f}"
            f"{r.prefix_hit_rate * 100:>11.2f}%{r.hit_rate * 100:>10.2f}%{r.evictions:>11}"
        )
    return "\n".join(lines)


def run_policies_section(args: argparse.Namespace) -> list[PolicyHitRate] | None:
    """Print the policy hit-rate table; None when the trace is not there."""
    trace = Path(args.trace)
    print("== policies: hit rate by eviction policy and tier size ==")
    if not trace.exists():
        print(f"policies section: trace not found at {trace}")
        return None
    rows = policy_hit_rates(trace, args.capacities, limit=args.limit, policies=args.policies)
    requests = "all requests" if args.limit is None else f"first {args.limit} requests"
    print(
        f"trace {trace.name}, {requests}; block = {BLOCK_TOKENS} tokens = "
        f"{BLOCK_BYTES // (1 << 20)} MiB (8B model, bf16); capacity in % of unique blocks"
    )
    print(format_hit_rate_table(rows))
    return rows


# ------------------------------------------------------------------------- throughput section
def _put_stream(store, blocks: list, start: int, count: int, churn_live: int | None) -> float:
    """Put ``count`` blocks with fresh keys; with ``churn_live``, delete the block that fell
    out of a sliding window of that many, so compaction always has dead records to reclaim.
    Returns the seconds taken, the final ``store.sync()`` included."""
    t0 = time.perf_counter()
    for i in range(start, start + count):
        store.put(_bench_key(i), blocks[i % len(blocks)])
        if churn_live is not None and i - churn_live >= 0:
            store.delete([_bench_key(i - churn_live)])
    store.sync()
    return time.perf_counter() - t0


def _bench_key(i: int) -> bytes:
    return b"capacity-bench-%012d" % i


def run_throughput_section(args: argparse.Namespace) -> list[dict] | None:
    """Sustained 1 MiB put throughput on a full SSD tier vs the same puts on an empty one.

    Three stores, each ``--ssd-mb`` of SSD tier and no DRAM tier (so the SSD path is measured),
    ``durability="batch"``, in a fresh directory under ``--dir``:

    - *empty*: the measured puts land in a store with room for all of them;
    - *full, evicting*: the store is first filled past capacity; every measured put must evict
      (leaf_lru) and compaction reclaims the dead segments while puts go on;
    - *full, churn*: the store is filled, then each measured put deletes the oldest block, so
      nothing is evicted but compaction must keep reclaiming deleted records.

    The ratio full/empty is the figure of merit (target >= 0.6).
    """
    import shutil
    import tempfile

    import numpy as np

    import tairstore

    block = 1 << 20
    ssd = args.ssd_mb << 20
    n_fill = int(1.2 * ssd / block)
    n_measure = args.measure_blocks
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 256, block, dtype=np.uint8) for _ in range(16)]
    rows = []
    for rnd in range(args.rounds):
        for case in ("empty", "full, evicting", "full, churn"):
            d = tempfile.mkdtemp(prefix=".tairstore-capacity-", dir=args.dir)
            try:
                size = ssd if case != "empty" else max(ssd, 2 * (n_measure + 8) * block)
                with tairstore.open(d, dram_bytes=0, ssd_bytes=size, durability="batch") as s:
                    if case == "full, evicting":
                        _put_stream(s, blocks, 0, n_fill, None)
                    elif case == "full, churn":
                        live = int(0.8 * s.stats()["tiers"]["ssd"]["usable_bytes"] / block)
                        _put_stream(s, blocks, 0, n_fill, live)
                    before = s.stats()
                    secs = _put_stream(s, blocks, n_fill, n_measure,
                                       live if case == "full, churn" else None)
                    after = s.stats()
                rows.append({
                    "round": rnd, "case": case, "blocks": n_measure, "seconds": secs,
                    "gb_s": n_measure * block / secs / 1e9,
                    "evictions": after["counters"]["evictions_ssd"] - before["counters"]["evictions_ssd"],
                    "segments_compacted": (after["compaction"]["segments_compacted"]
                                           - before["compaction"]["segments_compacted"]),
                    "bytes_copied": after["compaction"]["bytes_copied"] - before["compaction"]["bytes_copied"],
                })
            finally:
                shutil.rmtree(d, ignore_errors=True)
    best = {}
    for r in rows:
        if r["case"] not in best or r["gb_s"] > best[r["case"]]["gb_s"]:
            best[r["case"]] = r
    print(f"Put throughput, 1 MiB blocks, SSD tier of {args.ssd_mb} MiB, durability=batch, "
          f"{n_measure} measured puts, best of {args.rounds} rounds")
    print(f"{'case':<16} {'GB/s':>7} {'x empty':>8} {'evictions':>10} {'compacted':>10} {'copied MiB':>11}")
    base = best["empty"]["gb_s"]
    for case, r in best.items():
        print(f"{case:<16} {r['gb_s']:7.2f} {r['gb_s'] / base:8.2f} {r['evictions']:10d} "
              f"{r['segments_compacted']:10d} {r['bytes_copied'] / (1 << 20):11.1f}")
    worst = min(best[c]["gb_s"] for c in best if c != "empty") / base
    print(f"target: full/empty >= 0.60 -> {worst:.2f} {'met' if worst >= 0.6 else 'MISSED'}")
    return rows


# ------------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--section", choices=["policies", "throughput", "all"], default="all")
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="Mooncake-format JSONL trace")
    p.add_argument(
        "--capacities",
        type=lambda s: [float(x) for x in s.split(",")],
        default=list(DEFAULT_CAPACITY_PCTS),
        help="tier sizes, percent of the trace's unique blocks, comma-separated",
    )
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument(
        "--policies",
        type=lambda s: s.split(","),
        default=None,
        help=f"comma-separated subset of: {', '.join(POLICIES)}",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-': stdout)")
    p.add_argument("--ssd-mb", type=int, default=512, help="SSD tier size of the throughput section")
    p.add_argument("--measure-blocks", type=int, default=512, help="measured 1 MiB puts per case")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the throughput section")
    p.add_argument("--dir", default=".", help="where the throughput section's stores go")
    args = p.parse_args(argv)
    if args.policies is not None:
        unknown = sorted(set(args.policies) - set(POLICIES))
        if unknown:
            p.error(f"unknown policies {unknown}; valid: {', '.join(POLICIES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen sections and print their tables."""
    args = parse_args(argv)
    results: dict[str, object] = {}
    if args.section in ("policies", "all"):
        rows = run_policies_section(args)
        results["policies"] = None if rows is None else [asdict(r) for r in rows]
    if args.section in ("throughput", "all"):
        if args.section == "all":
            print()
        samples = run_throughput_section(args)
        if samples is None:
            print("throughput section: not part of this run")
        results["throughput"] = samples
    if args.json:
        text = json.dumps(results, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
