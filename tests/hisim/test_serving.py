"""The serving simulator: scheduling behaviour, exact cache accounting, metrics, CLI, refusals."""

import json
from collections import OrderedDict
from pathlib import Path

import pytest

from tairstore.errors import InvalidArgumentError, StoreError
from tairstore.hisim import get_gpu, get_model
from tairstore.hisim.cache import CacheConfig
from tairstore.hisim.cli import main as sim_main
from tairstore.hisim.engine import Simulator, UnsupportedModelError
from tairstore.hisim.latency import PrefillChunk, Step
from tairstore.hisim.metrics import summarize, weighted_percentile
from tairstore.hisim.models import ModelConfig
from tairstore.hisim.scheduler import CapacityModelError, default_config
from tairstore.hisim.workload import (Request, closed_loop, load_azure, load_mooncake,
                                      synthetic)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TRACE = DATA / "traces" / "mooncake_conversation_trace.jsonl"
needs_data = pytest.mark.skipif(not TRACE.exists(), reason="../shared/data not present")
# Enough of the conversation trace for many shared prefixes, few enough for a quick test.
TRACE_REQUESTS = 1500


@pytest.fixture(scope="module")
def sim8b():
    return Simulator(get_model("qwen3-8b"), get_gpu("h100"), 1, default_config("sglang", 1))


def _run(sim, workload):
    res = sim.run(workload)
    return res, summarize(res)


def test_closed_loop_counts_and_excludes_warmup(sim8b):
    res, m = _run(sim8b, closed_loop(8, 512, 16, num_prompts=40, warmup=16))
    assert len(res.requests) == 56
    assert m["completed"] == 40
    assert m["total_input_tokens"] == 40 * 512 and m["total_output_tokens"] == 40 * 16
    # Eight clients: never more than eight requests in flight.
    assert 0 < m["concurrency"] <= 8 + 1e-9
    for st in res.requests:
        assert st.req.arrival_ms <= st.first_ms <= st.finish_ms


def test_one_request_alone_is_prefill_then_decode(sim8b):
    res, m = _run(sim8b, [Request(0, 0.0, 1024, 32)])
    st = res.requests[0]
    prefill = sim8b.step_wall_ms([(1024, 0)], 0, 0)
    assert st.first_ms == pytest.approx(prefill)
    # Every decode step's ITL lies between the steps at the first and the last KV length.
    lo, hi = sim8b.step_wall_ms((), 1, 1024), sim8b.step_wall_ms((), 1, 1024 + 31)
    assert lo * 0.999 <= m["mean_tpot_ms"] <= hi * 1.001
    assert m["mean_itl_ms"] == pytest.approx(m["mean_tpot_ms"], rel=1e-6)


def test_tpot_grows_with_concurrency(sim8b):
    tpots = [_run(sim8b, closed_loop(c, 1024, 64, num_prompts=2 * c, warmup=c))[1]["mean_tpot_ms"]
             for c in (1, 16, 64)]
    assert tpots[0] < tpots[1] < tpots[2]


def test_sglang_prefill_stalls_decodes_vllm_mixes(sim8b):
    def wl():
        return [Request(i, 50.0 * i, 2048, 64) for i in range(40)]

    vllm = Simulator(sim8b.model, sim8b.gpu, 1, default_config("vllm", 1),
                     step_model=sim8b.step_model)
    _, ms = _run(sim8b, wl())
    _, mv = _run(vllm, wl())
    assert ms["completed"] == mv["completed"] == 40
    # SGLang: a decode waits for a whole prefill step; vLLM: the decodes ride along with it.
    prefill = sim8b.step_wall_ms([(2048, 0)], 0, 0)
    assert ms["max_itl_ms"] >= prefill
    assert mv["max_itl_ms"] < ms["max_itl_ms"]


def test_retraction_when_kv_runs_out():
    model = get_model("qwen3-8b")
    small = default_config("vllm", 1, mem_fraction=0.25)  # about 60k tokens of KV
    sim = Simulator(model, get_gpu("h100"), 1, small)
    res, m = _run(sim, closed_loop(64, 2048, 1024, num_prompts=64, warmup=0))
    assert res.retractions > 0
    assert m["completed"] == 64
    assert all(st.finish_ms > 0 for st in res.requests)


def test_request_larger_than_kv_pool_is_a_typed_error():
    sim = Simulator(get_model("qwen3-8b"), get_gpu("h100"), 1,
                    default_config("sglang", 1, mem_fraction=0.25))
    with pytest.raises(CapacityModelError):
        sim.run([Request(0, 0.0, sim.pool + 10, 4)])


def test_weights_that_do_not_fit_are_refused():
    with pytest.raises(CapacityModelError, match="does not fit"):
        Simulator(get_model("qwen3-235b-a22b"), get_gpu("h100"), 1, default_config("vllm", 1))


@pytest.mark.parametrize("name", ["qwen3.5-397b-a17b", "Qwen3-Next-80B-A3B", "glm-5",
                                  "deepseek-v3.2"])
def test_uncovered_families_are_refused(name):
    cfg = ModelConfig(name, 4, 1024, 8, 8, 128, 4096, 32000)
    with pytest.raises(UnsupportedModelError) as err:
        Simulator(cfg, get_gpu("h100"), 1, default_config("sglang", 1))
    assert isinstance(err.value, StoreError)
    assert "covers only" in str(err.value)


def test_cuda_graph_padding_and_eager_limit():
    cfg = default_config("sglang", 1)
    assert [cfg.graph_batch(b) for b in (1, 3, 5, 9, 256)] == [1, 4, 8, 16, 256]
    assert cfg.graph_batch(257) is None
    assert default_config("sglang", 4).cuda_graph_max_bs == 512


def test_overlap_hides_cpu_work(sim8b):
    serial = Simulator(sim8b.model, sim8b.gpu, 1,
                       default_config("sglang", 1, overlap=False), step_model=sim8b.step_model)
    for b in (1, 64):
        assert sim8b.step_wall_ms((), b, 1000) <= serial.step_wall_ms((), b, 1000)


def test_weighted_percentile():
    import numpy as np

    v, w = np.array([1.0, 2.0, 3.0]), np.array([1, 1, 8])
    assert weighted_percentile(v, w, 50) == 3.0
    assert weighted_percentile(v, w, 10) == 1.0


def test_synthetic_shares_prefixes_and_hits_gpu_cache(sim8b):
    reqs = synthetic(200, rate=20.0, seed=1, num_prefixes=4)
    assert len({r.hash_ids[0] for r in reqs}) <= 4
    res, m = _run(sim8b, reqs)
    assert m["completed"] == 200
    assert m["cache_hit_rate"]["gpu"] > 0.2
    assert m["cached_token_ratio"] > 0.2


def test_dram_level_catches_gpu_evictions(sim8b):
    reqs = synthetic(300, rate=50.0, seed=2, num_prefixes=32, prefix_tokens=4096)
    sim = Simulator(sim8b.model, sim8b.gpu, 1, default_config("sglang", 1),
                    CacheConfig(gpu_blocks=16, dram_blocks=100_000, write_policy="write_back"),
                    step_model=sim8b.step_model)
    res, m = _run(sim, reqs)
    assert m["cache_hit_rate"]["dram"] > 0
    assert m["bytes_per_link"]["h2d"] > 0 and m["bytes_per_link"]["d2h"] > 0


def test_bad_workload_inputs_are_typed(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    with pytest.raises(InvalidArgumentError):
        load_mooncake(bad)
    with pytest.raises(InvalidArgumentError):
        Request(0, 0.0, 0, 5)
    with pytest.raises(InvalidArgumentError):
        closed_loop(0, 10, 10)
    with pytest.raises(InvalidArgumentError):
        load_mooncake(bad, speedup=0)


@needs_data
def test_azure_trace_loads_with_speedup():
    path = DATA / "azure" / "AzureLLMInferenceTrace_code.csv"
    a = load_azure(path, limit=50)
    b = load_azure(path, speedup=2.0, limit=50)
    assert a[0].arrival_ms == 0.0 and len(a) == 50
    assert b[-1].arrival_ms == pytest.approx(a[-1].arrival_ms / 2)


# ---- exact cache checks on the Mooncake conversation trace ----------------------------------

def _leading_run(chain, resident):
    n = 0
    for key in chain:
        if key not in resident:
            break
        n += 1
    return n


def _ideal_prefix_hits(chains):
    seen, hits = set(), 0
    for chain in chains:
        hits += _leading_run(chain, seen)
        seen.update(chain)
    return hits


def _plain_lru_prefix_hits(chains, n):
    lru, hits = OrderedDict(), 0
    for chain in chains:
        hits += _leading_run(chain, lru)
        for key in chain:
            if key in lru:
                lru.move_to_end(key)
            else:
                if len(lru) >= n:
                    lru.popitem(last=False)
                lru[key] = None
    return hits


def _gpu_hits(requests, cache):
    # A big pool (H200, TP 8 of a small model): nothing waits for KV, so admission order is
    # arrival order and the cache sees the trace in order.
    sim = Simulator(get_model("qwen3-0.6b"), get_gpu("h200"), 8, default_config("sglang", 8),
                    cache)
    res = sim.run(requests)
    return sum(st.hits[0] for st in res.requests), sum(len(r.hash_ids) for r in requests)


@needs_data
def test_unlimited_gpu_cache_gives_the_ideal_prefix_hit_ratio():
    reqs = load_mooncake(TRACE, limit=TRACE_REQUESTS)
    chains = [r.hash_ids for r in sorted(reqs, key=lambda r: r.arrival_ms)]
    hits, total = _gpu_hits(reqs, CacheConfig(gpu_blocks=10**12))
    assert hits == _ideal_prefix_hits(chains)
    assert hits / total > 0.2  # the trace really shares prefixes


@needs_data
@pytest.mark.parametrize("n", [64, 1000])
def test_lru_of_n_blocks_matches_a_plain_lru(n):
    reqs = load_mooncake(TRACE, limit=TRACE_REQUESTS)
    chains = [r.hash_ids for r in sorted(reqs, key=lambda r: r.arrival_ms)]
    hits, _ = _gpu_hits(reqs, CacheConfig(gpu_blocks=n, gpu_policy="lru"))
    assert hits == _plain_lru_prefix_hits(chains, n)


# ---- CLI ------------------------------------------------------------------------------------

def test_sim_run_closed_loop_writes_bench_serving_keys(tmp_path, capsys):
    out = tmp_path / "d"
    rc = sim_main(["run", "--backend", "sglang", "--model", "llama-3.1-8b", "--dtype", "fp8",
                   "--gpu", "h200", "--tp", "2", "--concurrency", "16", "--isl", "1000",
                   "--osl", "20", "--num-prompts", "32", "--output-dir", str(out),
                   "--no-progress", "--plot", str(tmp_path / "png")])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "mean_e2e_latency_ms",
                "request_throughput", "input_throughput", "output_throughput"):
        assert m[key] > 0, key
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 16 * 2 + 32
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "hit_rate.png", "throughput.png", "tpot_cdf.png", "ttft_cdf.png"]
    assert "mean_ttft_ms" in capsys.readouterr().out


def test_sim_run_closed_loop_phase_options(tmp_path, capsys):
    """--loop-jitter 0 gives exactly OSL output tokens (vLLM's fit may ship a jitter), a jitter
    varies them around OSL, and an out-of-range one is refused."""
    def run(*extra):
        out = tmp_path / "d"
        rc = sim_main(["run", "--backend", "vllm", "--model", "llama-3.1-8b", "--dtype", "fp8",
                       "--gpu", "h200", "--concurrency", "8", "--isl", "1000", "--osl", "50",
                       "--num-prompts", "40", "--output-dir", str(out), "--no-progress",
                       *extra])
        if rc:
            return rc, None
        lines = (out / "requests.jsonl").read_text().splitlines()
        return rc, [json.loads(line)["output_len"] for line in lines]

    rc, lens = run("--loop-jitter", "0", "--loop-spread", "0")
    assert rc == 0 and lens == [50] * (16 + 40)
    rc, lens = run("--loop-jitter", "0.2")
    assert rc == 0 and min(lens) >= 40 and max(lens) <= 60 and len(set(lens)) > 5
    capsys.readouterr()
    assert run("--loop-jitter", "1.5")[0] == 2
    assert "loop_jitter" in capsys.readouterr().err


def test_sim_run_trace_with_cache_levels(tmp_path):
    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": i * 100, "input_length": 1500, "output_length": 8,
             "hash_ids": [0, 1, i + 2]} for i in range(20)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = sim_main(["run", "--model", "qwen3-8b", "--gpu", "h20", "--trace", str(trace),
                   "--dram-cache", "64GiB", "--ssd-cache", "2TiB", "--output-dir",
                   str(tmp_path / "d"), "--no-progress"])
    assert rc == 0
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert m["completed"] == 20
    assert m["cache_hit_rate"]["gpu"] == pytest.approx(38 / 60)


def test_sim_run_refuses_bad_input(tmp_path, capsys):
    rc = sim_main(["run", "--model", "qwen3-8b", "--gpu", "h100", "--dram-cache", "lots",
                   "--concurrency", "2", "--isl", "10", "--osl", "2", "--output-dir",
                   str(tmp_path)])
    assert rc == 2
    assert "size" in capsys.readouterr().err


def test_sim_sweep_writes_csv_and_pareto(tmp_path):
    rc = sim_main(["sweep", "--model", "qwen3-8b", "--gpus", "h100,h200", "--tps", "1",
                   "--request-rates", "5,20", "--synthetic", "40", "--output-dir",
                   str(tmp_path)])
    assert rc == 0
    lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(lines) == 1 + 4
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_sim_step_json_echoes_inputs(capsys):
    assert sim_main(["step", "--model", "qwen3-8b", "--gpu", "h100", "--prefill", "512@128",
                     "--decode", "4x1000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["inputs"]["prefill"] == [[512, 128]]
    assert out["inputs"]["decode"] == [[4, 1000]]
    assert out["step_ms"] > 0


def test_ingress_delay_is_inside_ttft(sim8b):
    from tairstore.hisim.engine import ingress_delay_ms

    slow = Simulator(sim8b.model, sim8b.gpu, 1, default_config("sglang", 1, ingress_ms=5.0),
                     step_model=sim8b.step_model)
    res, _ = _run(slow, [Request(1, 100.0, 1024, 4)])
    st = res.requests[0]
    delay = ingress_delay_ms(5.0, 1)
    assert 0 < delay <= 10.0
    assert st.first_ms - st.req.arrival_ms == pytest.approx(
        delay + slow.step_wall_ms([(1024, 0)], 0, 0))


def test_kernel_scales_apply_to_compute_not_to_allreduce_or_moe():
    """vLLM's kernel-efficiency factors: the decode batch's compute by decode_scale, what the
    prefill adds by prefill_scale; TP all-reduce and MoE layers untouched; 1 = the step model."""
    gpu = get_gpu("h100")

    def sim(model, tp, ps, ds):
        cfg = default_config("vllm", tp, prefill_scale=ps, decode_scale=ds,
                             prefill_attention_ratio=1.0)
        return Simulator(get_model(model), gpu, tp, cfg)

    one, half = sim("qwen3-32b", 4, 1.0, 1.0), sim("qwen3-32b", 4, 0.5, 1.0)
    t = one.step_model.predict(Step.of(prefill=[2048]))
    eager = one.server.overhead.eager_per_layer_ms * one.model.num_layers
    pre1 = one.gpu_ms([(2048, 0)], 0, 0) - eager
    assert pre1 == pytest.approx(t.step_ms - t.breakdown["scheduler"])
    ar = t.breakdown["tp_allreduce"]
    assert half.gpu_ms([(2048, 0)], 0, 0) - eager == pytest.approx(ar + 0.5 * (pre1 - ar))
    # A decode-only step follows decode_scale alone; a mixed step has both parts.
    assert half.gpu_ms((), 16, 1000) == pytest.approx(one.gpu_ms((), 16, 1000))
    slow = sim("qwen3-32b", 4, 1.0, 2.0)
    assert slow.gpu_ms((), 16, 1000) > 1.5 * one.gpu_ms((), 16, 1000)
    mixed_one, mixed_half = one.gpu_ms([(2048, 0)], 16, 1000), half.gpu_ms([(2048, 0)], 16, 1000)
    assert half.gpu_ms([(2048, 0)], 0, 0) < mixed_half < mixed_one
    # The expert layers of an MoE model are not scaled.
    moe1, moe_half = sim("qwen3-30b-a3b", 1, 1.0, 1.0), sim("qwen3-30b-a3b", 1, 1.0, 0.5)
    t = moe1.step_model.predict(Step.of(decode=8, kv_len=1000))
    expected = (t.step_ms - t.breakdown["scheduler"]
                - 0.5 * (t.step_ms - t.breakdown["scheduler"] - t.breakdown["moe"]))
    assert moe_half.gpu_ms((), 8, 1000) == pytest.approx(expected, rel=1e-3)  # KV on the memo grid


def test_prefill_attention_ratio_scales_the_prefills_attention_alone():
    """The prefill's context attention runs at prefill_scale x prefill_attention_ratio, the rest
    of the prefill at prefill_scale; a decode-only step and SGLang (ratio 1) are untouched."""
    gpu = get_gpu("h100")

    def sim(ratio, ps=0.5):
        cfg = default_config("vllm", 4, prefill_scale=ps, decode_scale=1.0,
                             prefill_attention_ratio=ratio)
        return Simulator(get_model("qwen3-32b"), gpu, 4, cfg)

    one, three = sim(1.0), sim(3.0)
    for chunk in ((2048, 0), (4096, 4096)):
        t = one.step_model.predict(Step((PrefillChunk(*chunk),), ()))
        attention = t.breakdown["context_attention"]
        assert attention > 0
        assert three.gpu_ms([chunk], 0, 0) == pytest.approx(
            one.gpu_ms([chunk], 0, 0) + 0.5 * 2.0 * attention)
        assert three.gpu_ms([chunk], 16, 1000) == pytest.approx(
            one.gpu_ms([chunk], 16, 1000) + 0.5 * 2.0 * attention, rel=1e-3)
    # The attention grows faster with the context than the rest of the prefill.
    assert three.gpu_ms([(4096, 4096)], 0, 0) - one.gpu_ms([(4096, 4096)], 0, 0) > 2 * (
        three.gpu_ms([(4096, 0)], 0, 0) - one.gpu_ms([(4096, 0)], 0, 0))
    assert three.gpu_ms((), 16, 1000) == one.gpu_ms((), 16, 1000)
    assert default_config("sglang", 1).attention_ratio("fp8") == 1.0
    assert sim(2.5).server.attention_ratio("bfloat16") == 2.5


def test_moe_scales_apply_to_the_expert_layers_alone():
    """An MoE model's expert layers follow moe_decode_scale (decode batch) and
    moe_prefill_scale (what the prefill adds), the rest of the step the dense factors; a dense
    model ignores the MoE factors."""
    gpu = get_gpu("h100")

    def sim(model, **scales):
        cfg = default_config("vllm", 1, prefill_scale=1.0, decode_scale=1.0,
                             **{"moe_prefill_scale": 1.0, "moe_decode_scale": 1.0, **scales})
        return Simulator(get_model(model), gpu, 1, cfg)

    one = sim("qwen3-30b-a3b")
    t = one.step_model.predict(Step.of(decode=8, kv_len=1024))
    base = one.gpu_ms((), 8, 1024)
    assert sim("qwen3-30b-a3b", moe_decode_scale=2.0).gpu_ms((), 8, 1024) == pytest.approx(
        base + t.breakdown["moe"], rel=1e-3)
    assert sim("qwen3-30b-a3b", moe_prefill_scale=2.0).gpu_ms((), 8, 1024) == pytest.approx(base)
    # A mixed step: the prefill's expert time by moe_prefill_scale, the decode's by
    # moe_decode_scale.
    mixed = one.step_model.predict(Step.of(prefill=[2048], decode=8, kv_len=1024))
    pre_moe = mixed.breakdown["moe"] - t.breakdown["moe"]
    eager = one.server.overhead.eager_per_layer_ms * one.model.num_layers
    both = sim("qwen3-30b-a3b", moe_prefill_scale=3.0, moe_decode_scale=2.0)
    assert both.gpu_ms([(2048, 0)], 8, 1024) - eager == pytest.approx(
        one.gpu_ms([(2048, 0)], 8, 1024) - eager + 2.0 * pre_moe + t.breakdown["moe"], rel=1e-3)
    dense = sim("qwen3-32b")
    assert sim("qwen3-32b", moe_prefill_scale=3.0, moe_decode_scale=2.0).gpu_ms(
        [(2048, 0)], 8, 1024) == pytest.approx(dense.gpu_ms([(2048, 0)], 8, 1024))


def test_kernel_scales_are_validated_and_sglang_ships_none():
    for bad in (0.0, -1.0, float("nan"), float("inf"), "0.7", True):
        for name in ("prefill_scale", "decode_scale", "moe_prefill_scale", "moe_decode_scale",
                     "prefill_attention_ratio"):
            with pytest.raises(InvalidArgumentError):
                default_config("vllm", 1, **{name: bad})
    # SGLang's kernels are the ones the operator tables measured.
    for dtype in ("bfloat16", "fp8", "fp8_block"):
        assert default_config("sglang", 1).kernel_scales(dtype) == (1.0, 1.0)
        assert default_config("sglang", 1).moe_scales(dtype) == (1.0, 1.0)
    # Configured factors win over the shipped fit.
    cfg = default_config("vllm", 1, moe_prefill_scale=2.5, moe_decode_scale=1.5)
    assert cfg.moe_scales("fp8") == (2.5, 1.5)


def test_loop_spread_staggers_first_sends_and_stays_out_of_ttft(sim8b):
    """A closed loop's clients start spread over concurrency x loop_spread prefill times (at
    once with 0); TTFT still counts from each request's own send."""
    from tairstore.hisim.engine import first_send_offsets_ms

    def first_sends(spread):
        cfg = default_config("vllm", 1, loop_spread=spread, ingress_ms=0.0)
        sim = Simulator(sim8b.model, sim8b.gpu, 1, cfg, step_model=sim8b.step_model)
        res = sim.run(closed_loop(8, 1024, 16, num_prompts=8, warmup=8))
        warm = sorted(st.req.arrival_ms for st in res.requests if st.req.warmup)
        return sim, res, warm

    _, _, at_once = first_sends(0.0)
    assert at_once == [0.0] * 8
    sim, res, spread = first_sends(1.0)
    window = 8 * sim.step_wall_ms([(1024, 0)], 0, 0)
    offsets = first_send_offsets_ms(sim, closed_loop(8, 1024, 16, num_prompts=8,
                                                     warmup=0).requests[:8])
    assert spread == sorted(offsets)
    assert spread[0] == 0.0 and len(set(spread)) == 8 and spread[-1] < window
    # Offsets are spread over the window (no two closer than an eighth of a prefill).
    assert min(b - a for a, b in zip(spread, spread[1:])) > window / 64
    for st in res.requests:
        assert st.req.arrival_ms <= st.first_ms <= st.finish_ms
    # Started one at a time, every first request prefills alone: TTFT is one prefill.
    alone = sim.step_wall_ms([(1024, 0)], 0, 0)
    first_ttfts = [st.first_ms - st.req.arrival_ms for st in res.requests if st.req.warmup]
    assert min(first_ttfts) == pytest.approx(alone)


def test_loop_spread_is_validated_and_sglang_ships_none():
    for bad in (-0.5, float("nan"), float("inf"), "1", True):
        with pytest.raises(InvalidArgumentError):
            default_config("vllm", 1, loop_spread=bad)
    assert default_config("sglang", 1).loop_spread == 0.0


def test_loop_spread_leaves_the_workload_unchanged(sim8b):
    """The same closed loop run twice (on fresh simulators: the prefix cache persists within one)
    gives the same result: the start offsets are applied to copies of the first requests."""
    cfg = default_config("vllm", 1, loop_spread=0.75)

    def fresh():
        return Simulator(sim8b.model, sim8b.gpu, 1, cfg, step_model=sim8b.step_model)

    wl = closed_loop(4, 512, 8, num_prompts=8, warmup=4)
    before = [r.arrival_ms for r in wl.requests[:4]]
    a, b = summarize(fresh().run(wl)), summarize(fresh().run(wl))
    assert [r.arrival_ms for r in wl.requests[:4]] == before
    assert a["mean_ttft_ms"] == b["mean_ttft_ms"]


def test_measured_phase_starts_after_the_warmup_phase_drains(sim8b):
    """The benchmark clients run their warm-up phase to completion before the measured phase:
    no measured request is sent before the last warm-up request finished, and then every client
    sends at once. Without the barrier a client's next request follows its last at once."""
    cfg = default_config("vllm", 1, loop_spread=0.5, loop_jitter=0.1, ingress_ms=0.0)
    sim = Simulator(sim8b.model, sim8b.gpu, 1, cfg, step_model=sim8b.step_model)
    res = sim.run(closed_loop(6, 512, 32, num_prompts=30, warmup=12))
    last_warm = max(st.finish_ms for st in res.requests if st.req.warmup)
    sends = sorted(st.req.arrival_ms for st in res.requests if not st.req.warmup)
    assert len(sends) == 30 and sends[0] >= last_warm
    # The six clients start the phase as they started the loop (spread by loop_spread).
    first = sorted(st.req.arrival_ms for st in res.requests if st.req.rid < 6)
    assert [t - last_warm for t in sends[:6]] == pytest.approx(first)
    # Never more than six requests out; the metrics count the measured ones only.
    m = summarize(res)
    assert m["completed"] == 30 and m["concurrency"] <= 6 + 1e-9

    res = sim.run(closed_loop(6, 512, 32, num_prompts=30, warmup=12, barrier=False))
    last_warm = max(st.finish_ms for st in res.requests if st.req.warmup)
    assert min(st.req.arrival_ms for st in res.requests if not st.req.warmup) < last_warm
    for st in res.requests:
        if st.req.rid >= 6:  # every later send is some request's finish
            assert any(o.finish_ms == st.req.arrival_ms for o in res.requests)


def test_loop_jitter_draws_output_lengths_around_osl(sim8b):
    """loop_jitter j: each closed-loop request's output length is uniform on osl x [1 - j, 1 + j],
    reproducibly, on copies (the caller's workload keeps exact lengths); 0 keeps them exact."""
    def run(jitter):
        cfg = default_config("vllm", 1, loop_jitter=jitter)
        sim = Simulator(sim8b.model, sim8b.gpu, 1, cfg, step_model=sim8b.step_model)
        wl = closed_loop(8, 256, 100, num_prompts=200, warmup=16)
        res = sim.run(wl)
        assert all(r.output_len == 100 for r in wl.requests)
        return res

    exact = run(0.0)
    assert {st.req.output_len for st in exact.requests} == {100}
    res = run(0.1)
    lens = [st.req.output_len for st in res.requests]
    assert min(lens) >= 90 and max(lens) <= 110 and len(set(lens)) > 10
    assert sum(lens) / len(lens) == pytest.approx(100, abs=2)
    m = summarize(res)
    assert m["total_output_tokens"] == sum(st.req.output_len for st in res.requests
                                           if not st.req.warmup)
    again = run(0.1)
    assert [st.req.output_len for st in again.requests] == lens
    assert summarize(again)["mean_ttft_ms"] == m["mean_ttft_ms"]
    for bad in (-0.1, 1.0, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(InvalidArgumentError):
            default_config("vllm", 1, loop_jitter=bad)
    assert default_config("sglang", 1).loop_jitter == 0.0
