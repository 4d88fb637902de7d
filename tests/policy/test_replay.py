"""Trace replay: hand-made traces, then the real Mooncake conversation trace (first requests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tairstore.errors import InvalidArgumentError
from tairstore.policy import POLICIES, LeafLRU, make_policy
from tairstore.policy.replay import load_mooncake_trace, replay

TRACE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "traces" / (
    "mooncake_conversation_trace.jsonl"
)
#: Enough requests for shared prefixes and evictions to matter, few enough for a quick test.
N_REQUESTS = 2000


def test_counts_on_a_hand_made_trace() -> None:
    trace = [[1, 2, 3], [1, 2, 4], [9, 2, 3]]
    r = replay(trace, make_policy("lru"), capacity_bytes=100, block_bytes=1)
    # Request 2 hits 1, 2 (prefix); request 3 misses 9, then hits 2, 3 (not a prefix).
    assert (r.total_blocks, r.hit_blocks, r.prefix_hit_blocks, r.evictions) == (9, 4, 2, 0)
    assert r.hit_rate == pytest.approx(4 / 9) and r.prefix_hit_rate == pytest.approx(2 / 9)


def test_replay_records_parents() -> None:
    p = LeafLRU()
    replay([[1, 2, 3]], p, capacity_bytes=3, block_bytes=1)
    assert [p.pop_victim() for _ in range(3)] == [3, 2, 1]


def test_capacity_is_respected_and_evictions_counted() -> None:
    p = make_policy("lru")
    r = replay([[1, 2, 3, 4, 5]], p, capacity_bytes=20, block_bytes=10)
    assert r.evictions == 3 and p.bytes == 20 and list(p._order) == [4, 5]
    # A block larger than the tier is never cached.
    r = replay([[1, 1]], make_policy("lru"), capacity_bytes=5, block_bytes=10)
    assert r.hit_blocks == 0


def test_empty_trace_and_bad_arguments() -> None:
    r = replay([], make_policy("lru"), capacity_bytes=1, block_bytes=1)
    assert r.total_blocks == 0 and r.hit_rate == 0.0
    with pytest.raises(InvalidArgumentError):
        replay([], make_policy("lru"), capacity_bytes=0, block_bytes=1)


@pytest.fixture(scope="module")
def trace() -> list[list[int]]:
    if not TRACE.exists():
        pytest.skip(f"trace data not present: {TRACE}")
    return load_mooncake_trace(TRACE, limit=N_REQUESTS)


def test_real_trace_hit_rates(trace: list[list[int]]) -> None:
    assert len(trace) == N_REQUESTS
    unique = len({k for chain in trace for k in chain})
    capacities = [max(1, unique * pct // 100) for pct in (5, 10, 25, 50, 100)]
    rows = []
    for name in sorted(POLICIES):
        results = [
            replay(trace, make_policy(name, capacity_bytes=cap), cap, block_bytes=1)
            for cap in capacities
        ]
        for cap, r in zip(capacities, results):
            assert 0.0 <= r.prefix_hit_rate <= r.hit_rate <= 1.0
            assert r.total_blocks == sum(map(len, trace))
            rows.append(f"{name:>8} {cap:>7} {r.prefix_hit_rate:8.4f} {r.hit_rate:8.4f}")
        # Every block fits at 100%: nothing is evicted, and every policy sees the same hits.
        assert results[-1].evictions == 0
        if name == "lru":
            # LRU with equal-sized blocks is a stack algorithm (Mattson et al. 1970): a bigger
            # cache holds a superset at every step, so no hit count can drop as it grows. The
            # prefix run is a prefix of the hit set, so it cannot drop either.
            for small, big in zip(results, results[1:]):
                assert big.hit_blocks >= small.hit_blocks
                assert big.prefix_hit_blocks >= small.prefix_hit_blocks
    print(f"\nfirst {N_REQUESTS} requests, {unique} unique blocks")
    print(f"{'policy':>8} {'blocks':>7} {'prefix':>8} {'block':>8}")
    print("\n".join(rows))
