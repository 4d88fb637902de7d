"""The optimizer: exact LRU agreement on the Mooncake traces, hand-computed traces for the other
policies and the tier model, the CSV, the CLI, and typed errors on bad input."""

from __future__ import annotations

import csv
import os
import random
import json
from collections import OrderedDict
from pathlib import Path

import pytest

from tairstore.cli import main
from tairstore.errors import InvalidArgumentError
from tairstore.policy.optimize import Grid, parse_capacity, parse_policies, run_grid, write_csv
from tairstore.policy.prefixreplay import replay_prefix
from tairstore.policy.roi import evaluate, hisim_prefill, parse_prices, pareto, plot, recommend
from tairstore.policy.stackdist import lru_sweep
from tairstore.policy.traces import Trace, TraceFormatError, load_trace

TRACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "traces"
MOONCAKE = ["mooncake_conversation_trace.jsonl", "mooncake_synthetic_trace.jsonl"]


def reference_lru(trace: Trace, capacity: int) -> tuple[int, int, int]:
    """The issue's semantics, as plainly as possible: (block hits, token hits, inserts)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = token_hits = inserts = 0
    for chain, toks in zip(trace.chains, trace.tokens):
        for key, n in zip(chain, toks):
            if key not in cache:
                break
            hits += 1
            token_hits += n
        for key in chain:
            if key in cache:
                cache.move_to_end(key)
            else:
                if len(cache) >= capacity:
                    cache.popitem(last=False)
                cache[key] = None
                inserts += 1
    return hits, token_hits, inserts


def make_trace(chains: list[list[int]], input_tokens: list[int | None] | None = None,
               block_tokens: int = 512) -> Trace:
    t = Trace(group_names=["default"], block_tokens=block_tokens)
    for i, c in enumerate(chains):
        t.add(c, input_tokens[i] if input_tokens else None)
    return t


@pytest.mark.parametrize("name", MOONCAKE)
def test_lru_sweep_agrees_exactly_with_a_reference_lru_on_mooncake(name: str) -> None:
    path = TRACES / name
    if not path.exists():
        pytest.skip(f"trace data not present: {path}")
    trace = load_trace(path, "mooncake")
    caps = [100, 3000, 40000, 10**6]
    for cap, rows in zip(caps, lru_sweep(trace, caps)):
        r = rows[0]
        assert (r.block_hits, r.token_hits, r.dram_writes) == reference_lru(trace, cap)
        assert r.block_accesses == trace.accesses
        assert r.dram_evictions == max(0, r.dram_writes - cap)


def test_lru_sweep_agrees_with_the_policy_object_replay() -> None:
    path = TRACES / MOONCAKE[0]
    if not path.exists():
        pytest.skip(f"trace data not present: {path}")
    trace = load_trace(path)
    trace.chains, trace.tokens, trace.groups = (x[:1500] for x in (trace.chains, trace.tokens,
                                                                   trace.groups))
    for cap, rows in zip([500, 5000], lru_sweep(trace, [500, 5000])):
        assert rows == replay_prefix(trace, "lru", cap)


# Hand-computed: capacity 3. Request 2 hits 1, 2 and must evict for 4: LRU and leaf_lru both
# drop 3 (leaf_lru: the only leaf). Request 3 hits 1 and must evict for 5: LRU drops 2 (oldest:
# 1 was just used), leaf_lru drops 4 (the only leaf; 2 is 4's prefix). So request 4 ([1, 2])
# hits 1 under LRU but 1 and 2 under leaf_lru.
HAND = [[1, 2, 3], [1, 2, 4], [1, 5], [1, 2]]


def test_leaf_lru_on_a_hand_computed_trace() -> None:
    trace = make_trace(HAND, [None, None, None, 700])
    (leaf,) = replay_prefix(trace, "leaf_lru", 3)
    (lru,) = replay_prefix(trace, "lru", 3)
    assert (leaf.block_accesses, leaf.block_hits, leaf.dram_evictions) == (10, 5, 2)
    assert (lru.block_hits, lru.dram_evictions) == (4, 3)
    # The last block of request 4 holds the remainder: 700 - 512 = 188 tokens.
    assert leaf.token_hits == 4 * 512 + 188 and leaf.token_accesses == 9 * 512 + 188
    assert lru.token_hits == 4 * 512


def test_s3fifo_on_a_hand_computed_trace() -> None:
    # Capacity 2: the small queue is 10% (any block in it is over its share), the ghost holds 2.
    # [1] [2] in S; 1 hit (freq 1); [3]: S's tail 1 (freq 1 < 2) goes to the ghost; [1]: S's
    # tail 2 goes to the ghost, 1 (ghost) enters M; [2]: S's tail 3 leaves, 2 (ghost) enters M;
    # [1] hit; [4]: S empty, M's tail 1 (freq 1) gets a second lap, 2 leaves; [1] hit;
    # [2]: S's tail 4 leaves. Hits on requests 3, 7, 9; LRU would also hit request 5.
    trace = make_trace([[1], [2], [1], [3], [1], [2], [1], [4], [1], [2]])
    (s3,) = replay_prefix(trace, "s3fifo", 2)
    (lru,) = replay_prefix(trace, "lru", 2)
    assert (s3.block_hits, s3.dram_evictions, s3.dram_writes) == (3, 5, 7)
    assert (lru.block_hits, lru.dram_evictions) == (4, 4)


def test_a_block_after_the_first_miss_is_not_a_hit() -> None:
    (r,) = replay_prefix(make_trace([[1, 2, 3], [9, 2, 3]]), "lru", 10)
    assert r.block_hits == 0 and r.dram_writes == 4


def test_dram_and_ssd_tiers_with_and_without_promotion() -> None:
    trace = make_trace([[1], [2], [1], [1]])
    # DRAM 1, SSD 2. [2] demotes 1 to SSD; [1] is an SSD hit, promoted (2 is demoted); [1] is
    # then a DRAM hit.
    (r,) = replay_prefix(trace, "lru", 1, ssd_blocks=2)
    assert (r.dram_hits, r.ssd_hits, r.dram_writes, r.ssd_writes, r.dram_evictions) == (
        1, 1, 3, 2, 2)
    # Without promotion 1 stays on SSD and is read from there both times.
    (r,) = replay_prefix(trace, "lru", 1, ssd_blocks=2, promote=False)
    assert (r.dram_hits, r.ssd_hits, r.dram_writes, r.ssd_writes) == (0, 2, 2, 1)


def test_groups_get_their_own_rows_and_key_spaces() -> None:
    t = Trace(group_names=["a", "b"])
    t.add([1, 2], None, 0)
    t.add([10, 11], None, 1)
    t.add([1, 2], None, 0)
    rows = replay_prefix(t, "lru", 10)
    assert [(r.group, r.block_accesses, r.block_hits) for r in rows] == [
        ("*", 6, 2), ("a", 4, 2), ("b", 2, 0)]
    assert lru_sweep(t, [10])[0] == rows


def test_grid_in_parallel_matches_serial_and_csv_has_the_columns(tmp_path: Path) -> None:
    trace = make_trace([[1, 2, 3], [1, 2, 4], [1, 5], [1, 2]] * 20)
    grid = Grid(["lru", "leaf_lru", "s3fifo"], [2, 4], ssd_capacities=[0, 3])
    rows = run_grid(trace, grid, workers=2)
    assert rows == run_grid(trace, grid, workers=1)
    assert len(rows) == 3 * 2 * 2
    out = tmp_path / "r.csv"
    write_csv(out, rows, block_bytes=1000)
    with open(out, newline="") as f:
        got = list(csv.DictReader(f))
    for col in ("policy", "capacity_blocks", "block_accesses", "block_hits", "block_hit_rate",
                "token_hit_rate"):
        assert col in got[0]
    first = got[0]
    assert (first["policy"], first["capacity_blocks"]) == ("lru", "2")
    assert int(first["block_accesses"]) == trace.accesses
    assert int(first["dram_bytes_written"]) == rows[0].dram_writes * 1000


def test_capacities_in_blocks_and_bytes() -> None:
    assert parse_capacity("4096") == 4096 and parse_capacity("16k") == 16384
    assert parse_capacity("64GiB", block_bytes=64 << 20) == 1024
    assert parse_capacity("1GB", block_bytes=3 << 20) == 341  # whole blocks, rounded down
    for bad in ("abc", "1.5", "-4", "", "16q"):
        with pytest.raises(InvalidArgumentError):
            parse_capacity(bad)
    with pytest.raises(InvalidArgumentError, match="block size"):
        parse_capacity("64GiB")
    with pytest.raises(InvalidArgumentError):
        Grid(["lru"], [0]).check()
    with pytest.raises(InvalidArgumentError):
        replay_prefix(make_trace([[1]]), "lru", 0)


def test_unknown_policy_is_a_typed_error() -> None:
    with pytest.raises(InvalidArgumentError, match="valid policies"):
        parse_policies("lru,mru")
    with pytest.raises(InvalidArgumentError):
        replay_prefix(make_trace([[1]]), "mru", 4)


@pytest.mark.parametrize("line", [
    "not json", '{"input_length": 5}', '{"hash_ids": ["x"]}', '{"hash_ids": 5}', "[1, 2]"])
def test_malformed_mooncake_lines_name_file_and_line(tmp_path: Path, line: str) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"hash_ids": [1, 2], "input_length": 900}\n' + line + "\n")
    with pytest.raises(TraceFormatError, match=r"t\.jsonl:2"):
        load_trace(p, "mooncake")


def test_trace_formats_and_their_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="valid formats"):
        load_trace(tmp_path / "x", "csv")
    with pytest.raises(TraceFormatError, match="not found"):
        load_trace(tmp_path / "missing.jsonl")
    az = tmp_path / "az.csv"
    az.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nt,1000,5\nt,600,7\n")
    t = load_trace(az, "azure")
    assert t.chains == [[0, 1], [2, 3]] and t.tokens == [[512, 488], [512, 88]]
    az.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nt,lots,5\n")
    with pytest.raises(TraceFormatError, match="az.csv:2"):
        load_trace(az, "azure")
    az.write_text("a,b\n1,2\n")
    with pytest.raises(TraceFormatError, match="ContextTokens"):
        load_trace(az, "azure")


def test_roi_frontier_and_recommendation(tmp_path: Path) -> None:
    trace = make_trace([[1, 2, 3], [1, 2, 4], [1, 5], [1, 2]] * 50, block_tokens=512)
    rows = run_grid(trace, Grid(["lru", "s3fifo"], [1, 2, 4, 8]), workers=1)
    prices = parse_prices("dram=0.01,ssd=0.001,gpu_hour=3")
    rois = evaluate(rows, prices, block_bytes=1 << 30, duration_s=3600)
    front = pareto(rois)
    assert [x.cost_per_hour for x in front] == sorted(x.cost_per_hour for x in front)
    rates = [x.stats.token_hit_rate for x in front]
    assert rates == sorted(rates) and len(set(rates)) == len(rates)
    best = recommend(rois)
    assert best.net_per_hour == max(x.net_per_hour for x in rois)
    # A hit token saves 1/prefill_tokens_per_s GPU-seconds at the GPU price.
    x = rois[0]
    assert x.saved_per_hour == pytest.approx(x.stats.token_hits / 30_000 / 3600 * 3)
    for bad in ("dram=1,ssd=1", "dram=1,ssd=1,gpu_hour=x", "dram=-1,ssd=1,gpu_hour=1", "cpu=1"):
        with pytest.raises(InvalidArgumentError):
            parse_prices(bad)
    paths = plot(rows, rois, tmp_path / "plots")
    assert [p.name for p in paths] == ["hit_rate.png", "pareto.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_cli_optimize_writes_the_csv_and_rejects_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps({"timestamp": i * 1000, "input_length": 1200,
                                     "hash_ids": [0, 1, i + 2]}) + "\n" for i in range(30)))
    out = tmp_path / "r.csv"
    assert main(["optimize", "--trace", str(p), "--capacities", "2,8", "--ssd", "0,4",
                 "--output", str(out), "--price", "dram=0.01,ssd=0.001,gpu_hour=2",
                 "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "recommended:" in text
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2
    assert main(["optimize", "--trace", str(p), "--policies", "lru,fifo"]) == 2
    assert main(["optimize", "--trace", str(p), "--capacities", "lots"]) == 2
    assert "InvalidArgumentError" in capsys.readouterr().err


def test_a_capacity_holding_every_block_is_read_off_the_sweep_exactly() -> None:
    trace = make_trace(HAND * 5)
    grid = Grid(["leaf_lru", "s3fifo"], [2, 5, 100], ssd_capacities=[0, 3])
    rows = run_grid(trace, grid, workers=1)
    for p in grid.policies:
        for s in grid.ssd_capacities:
            for c in grid.capacities:
                got = [r for r in rows if (r.policy, r.ssd_blocks, r.capacity_blocks) == (p, s, c)]
                assert got == replay_prefix(trace, p, c, s)


def test_lru_sweep_matches_the_reference_on_random_traces_with_repeats() -> None:
    # Small key spaces, blocks repeated inside a request, empty requests: the corner cases of
    # the depth arithmetic (a repeat is judged at its first occurrence).
    rng = random.Random(7)
    for _ in range(30):
        chains = [[rng.randrange(12) for _ in range(rng.randrange(0, 7))] for _ in range(40)]
        trace = make_trace(chains, [rng.randrange(1, 4000) for _ in chains])
        caps = [1, 2, 3, 5, 8, 13]
        for cap, rows in zip(caps, lru_sweep(trace, caps)):
            r = rows[0]
            assert (r.block_hits, r.token_hits, r.dram_writes) == reference_lru(trace, cap)
            assert rows == replay_prefix(trace, "lru", cap)


def test_a_step_model_turns_hit_rates_into_saved_prefill_and_ttft() -> None:
    # Prefill time grows with the new tokens and (less) with the cached prefix.
    def prefill_ms(new: int, prefix: int) -> float:
        return new * 0.1 + prefix * 0.01

    trace = make_trace(HAND * 10, [1000] * 40)
    rows = run_grid(trace, Grid(["lru"], [1, 8]), workers=1)
    prices = parse_prices("dram=0,ssd=0,gpu_hour=3600")  # 1 per GPU-second: saved = seconds
    small, big = evaluate(rows, prices, 1, duration_s=3600, prefill_time=prefill_ms,
                          requests=len(trace))
    mean = round(big.stats.token_accesses / len(trace))
    cached = round(mean * big.stats.token_hit_rate)
    assert big.ttft_ms == pytest.approx(prefill_ms(mean - cached, cached))
    assert big.saved_per_hour == pytest.approx((prefill_ms(mean, 0) - big.ttft_ms) / 1000 * 40)
    assert small.ttft_ms > big.ttft_ms and recommend([small, big]) is big
    with pytest.raises(InvalidArgumentError):
        hisim_prefill("qwen3-8b")


@pytest.mark.skipif(not os.environ.get("TAIRSTORE_HISIM_TESTS"),
                    reason="loads HiSim's tables (seconds); set TAIRSTORE_HISIM_TESTS=1")
def test_hisim_prefill_time_falls_with_a_cached_prefix() -> None:
    f = hisim_prefill("qwen3-8b:h100")
    assert f(4000, 8000) < f(12000, 0)
    with pytest.raises(InvalidArgumentError):
        hisim_prefill("no-such-model:h100")
