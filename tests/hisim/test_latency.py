"""Sanity of the step-latency model: physical floors, monotonicity, TP scaling, CLI."""

import json

import pytest

from tairstore.hisim import Step, StepSpecError, get_gpu, get_model, step_model
from tairstore.hisim.cli import add_parser, main
from tairstore.hisim.latency import CATEGORIES, parse_decode

GPUS = ("h100", "h200", "h20", "a100", "l20", "b200")
MODELS = ("qwen3-8b", "llama3.1-70b", "qwen3-30b-a3b", "deepseek-v3")
TP = {"qwen3-8b": 1, "llama3.1-70b": 4, "qwen3-30b-a3b": 2, "deepseek-v3": 8}
EPS = 1e-9


def _dense_floor_ms(model_name, gpu_name, tp, prefill, decode, kv_len):
    """Lower bound of a dense GQA model's step: weights + KV once over HBM, or FLOPs at peak."""
    m, gpu = get_model(model_name), get_gpu(gpu_name)
    per_layer = (m.hidden * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
                 + m.num_heads * m.head_dim * m.hidden + 3 * m.hidden * m.intermediate)
    params = (per_layer * m.num_layers + m.vocab * m.hidden) / tp
    tokens = sum(prefill) + decode
    kv_bytes = decode * kv_len * m.kv_bytes_per_token / tp
    bytes_ = params * 2 + kv_bytes
    flops = 2 * params * tokens + decode * 4 * kv_len * m.num_heads * m.head_dim * m.num_layers / tp
    return 1e3 * max(bytes_ / gpu.hbm_bytes_per_s, flops / gpu.peak_flops("bfloat16"))


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("model,tp", [("qwen3-8b", 1), ("llama3.1-70b", 4), ("qwen3-32b", 2)])
@pytest.mark.parametrize("prefill,decode,kv_len",
                         [((), 1, 128), ((), 256, 8192), ((4096,), 0, 0), ((2048,), 64, 4096)])
def test_never_beats_the_hardware_floor(gpu, model, tp, prefill, decode, kv_len):
    t = step_model(model, gpu, tp).predict(Step.of(prefill=prefill, decode=decode, kv_len=kv_len))
    assert t.step_ms >= _dense_floor_ms(model, gpu, tp, prefill, decode, kv_len)


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("model", MODELS)
def test_monotone_in_batch_size(gpu, model):
    sm = step_model(model, gpu, TP[model])
    prev = 0.0
    for batch in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512):
        ms = sm.predict(Step.of(decode=batch, kv_len=2048)).step_ms
        assert ms >= prev - EPS, (batch, ms, prev)
        prev = ms


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("model", MODELS)
def test_monotone_in_context_length(gpu, model):
    sm = step_model(model, gpu, TP[model])
    prev_decode = prev_prefill = prev_prefix = 0.0
    for length in (16, 64, 100, 256, 1000, 1024, 3000, 4096, 10000, 16384, 32768, 65536, 131072):
        decode = sm.predict(Step.of(decode=32, kv_len=length)).step_ms
        prefill = sm.predict(Step.of(prefill=[length])).step_ms
        prefix = sm.predict(Step.of(prefill=[(512, length)])).step_ms
        assert decode >= prev_decode - EPS, ("decode", length)
        assert prefill >= prev_prefill - EPS, ("prefill", length)
        assert prefix >= prev_prefix - EPS, ("prefix", length)
        prev_decode, prev_prefill, prev_prefix = decode, prefill, prefix


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("model,tps", [("qwen3-8b", (1, 2, 4, 8)), ("llama3.1-70b", (1, 2, 4, 8)),
                                       ("qwen3-30b-a3b", (1, 2, 4))])
def test_doubling_tp_never_more_than_halves_compute(gpu, model, tps):
    for step in (Step.of(decode=64, kv_len=4096), Step.of(prefill=[2048]),
                 Step.of(prefill=[2048], decode=64, kv_len=4096), Step.of(decode=1, kv_len=128)):
        times = [step_model(model, gpu, tp).predict(step).compute_ms for tp in tps]
        for small, big in zip(times, times[1:]):
            assert big >= 0.5 * small - EPS, (model, gpu, step, times)


def test_breakdown_sums_to_step_and_is_ordered():
    t = step_model("qwen3-8b", "h100", 2).predict(Step.of(prefill=[2048], decode=64, kv_len=4096))
    assert sum(t.breakdown.values()) == pytest.approx(t.step_ms)
    assert list(t.breakdown) == [c for c in CATEGORIES if c in t.breakdown]
    assert t.sources["qkv_gemm"] == {"table"}
    assert t.breakdown["tp_allreduce"] > 0 and t.compute_ms < t.step_ms


def test_gpus_without_tables_are_scaled_from_measured_ones():
    t = step_model("qwen3-8b", "h20").predict(Step.of(decode=8, kv_len=1024))
    assert all(s.startswith("scaled:") for s in t.sources["qkv_gemm"])


def test_prefix_costs_less_than_recomputing_it():
    sm = step_model("qwen3-8b", "h100")
    with_prefix = sm.predict(Step.of(prefill=[(1024, 8192)])).breakdown["context_attention"]
    fresh = sm.predict(Step.of(prefill=[9216])).breakdown["context_attention"]
    alone = sm.predict(Step.of(prefill=[1024])).breakdown["context_attention"]
    assert alone < with_prefix < fresh


def test_bad_steps_are_rejected():
    with pytest.raises(StepSpecError):
        Step()
    with pytest.raises(StepSpecError):
        Step.of(prefill=[0])
    with pytest.raises(StepSpecError):
        parse_decode("64*4096")
    with pytest.raises(StepSpecError):
        step_model("qwen3-8b", "h100", tp=3)


def test_cli_json(capsys):
    rc = main(["step", "--model", "qwen3-8b", "--gpu", "h100", "--tp", "1",
               "--prefill", "2048", "--decode", "64x4096", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step_ms"] > 0 and set(out["breakdown"]) <= set(CATEGORIES)
    assert sum(out["breakdown"].values()) == pytest.approx(out["step_ms"], rel=1e-3)


def test_cli_text_and_errors(capsys):
    assert main(["step", "--model", "deepseek-v3", "--gpu", "h20", "--tp", "8",
                 "--prefill", "1024@4096", "--decode", "16x2048"]) == 0
    assert "step time" in capsys.readouterr().out
    assert main(["step", "--model", "qwen3-8b", "--gpu", "nonesuch", "--decode", "1x1"]) == 2


def test_add_parser_registers_sim_step():
    import argparse

    parser = argparse.ArgumentParser(prog="tairstore")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sim", "step", "--model", "qwen3-8b", "--gpu", "h200",
                              "--decode", "4x100"])
    assert args.func(args) == 0
