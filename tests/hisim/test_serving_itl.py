"""ITL accounting: every gap between two tokens of a measured request, stalls included.

bench_serving's ITL is the gap between consecutive output chunks of a request, so a request's ITLs
add up to ``E2E - TTFT`` and number ``output_len - 1``: their token-weighted mean over all measured
requests equals the token-weighted mean TPOT, whatever the scheduler did in between (prefill-first
or mixed steps, the overlap scheduler, retractions, warm-up requests running alongside).
"""

import numpy as np
import pytest

from tairstore.hisim import get_gpu, get_model
from tairstore.hisim.engine import Simulator
from tairstore.hisim.metrics import summarize, tpot_ms
from tairstore.hisim.scheduler import default_config
from tairstore.hisim.workload import Request, closed_loop, synthetic


@pytest.fixture(scope="module")
def step_model():
    return Simulator(get_model("qwen3-8b"), get_gpu("h100"), 1,
                     default_config("sglang", 1)).step_model


def _sim(step_model, backend, **overrides):
    return Simulator(step_model.model, step_model.gpu, 1, default_config(backend, 1, **overrides),
                     step_model=step_model)


def _poisson():
    return synthetic(200, rate=20.0, seed=3)


def _closed():
    return closed_loop(48, 1536, 48, num_prompts=144, warmup=48)


def _tight_closed():
    # Long outputs into a small KV pool: decodes outgrow it and requests are retracted.
    return closed_loop(64, 2048, 512, num_prompts=64, warmup=16)


CONFIGS = {
    "sglang prefill-first, closed loop": ("sglang", {}, _closed),
    "sglang without overlap, closed loop": ("sglang", {"overlap": False}, _closed),
    "sglang mixed chunk, poisson": ("sglang", {"mixed_chunk": True}, _poisson),
    "sglang prefill-first, poisson": ("sglang", {}, _poisson),
    "vllm mixed, closed loop": ("vllm", {}, _closed),
    "vllm mixed, poisson": ("vllm", {}, _poisson),
    "vllm retracting": ("vllm", {"mem_fraction": 0.25}, _tight_closed),
    "sglang retracting": ("sglang", {"mem_fraction": 0.25}, _tight_closed),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_token_weighted_mean_itl_equals_mean_tpot(step_model, name):
    backend, overrides, workload = CONFIGS[name]
    res = _sim(step_model, backend, **overrides).run(workload())
    m = summarize(res)
    if "retracting" in name:
        assert res.retractions > 0
    measured = [st for st in res.requests if st.measured and st.req.output_len > 1]
    gaps = sum(st.req.output_len - 1 for st in measured)
    # One ITL per gap between two tokens of a measured request: no more, no fewer.
    assert sum(res.itl_weight) == gaps
    weighted_tpot = sum(tpot_ms(st) * (st.req.output_len - 1) for st in measured) / gaps
    assert m["mean_itl_ms"] == pytest.approx(weighted_tpot, rel=1e-9)
    # Equal outputs (the closed loops): the token weighting is the plain mean of bench_serving.
    if len({st.req.output_len for st in measured}) == 1:
        assert m["mean_itl_ms"] == pytest.approx(m["mean_tpot_ms"], rel=1e-9)


def test_a_prefill_stall_shows_in_p99_itl(step_model):
    sim = _sim(step_model, "sglang")
    # One request decodes; a second one's 8k-token prefill runs alone in between its tokens.
    res = sim.run([Request(0, 0.0, 512, 50), Request(1, 100.0, 8000, 2)])
    m = summarize(res)
    prefill = sim.step_wall_ms([(8000, 0)], 0, 0)
    decode_max = sim.step_wall_ms((), 2, 8000)  # the longest decode step here
    # 50 gaps in all, one of them the stall: it is the p99 (and the maximum).
    assert sum(res.itl_weight) == 49 + 1
    assert prefill < m["p99_itl_ms"] == m["max_itl_ms"] <= prefill + decode_max
    # Without the stall the decode steps are all alike: the median stays a step.
    assert m["median_itl_ms"] <= decode_max
    itl = np.repeat(res.itl_ms, res.itl_weight)
    assert itl.sum() == pytest.approx(sum(st.finish_ms - st.first_ms for st in res.requests))


def test_warmup_requests_leave_no_itl(step_model):
    sim = _sim(step_model, "sglang")
    res = sim.run(closed_loop(8, 256, 16, num_prompts=8, warmup=8))
    assert sum(res.itl_weight) == 8 * 15
