"""End-to-end validation against measured serving rows (skipped only without the data).

Only test rows are checked (the CPU overhead, vLLM's scheduler settings and its kernel-efficiency
factors were fitted on the declared fit rows, ``crc32(id) % 4 == 0``; see
tairstore.hisim.serving_fit), on the rows' full closed loops (two warm-up and ten measured requests
per client, the measured phase starting after the warm-up phase has drained);
``benchmarks/hisim_serving.py`` runs every row and prints the table in docs/HISIM.md.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tairstore.hisim import serving_fit
from tairstore.hisim.serving_fit import SiliconRow, ape, load_rows, regime, simulate_row

SILICON = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "aiconfigurator"
           / "silicon_sample_dev.csv")
needs_data = pytest.mark.skipif(not SILICON.exists(), reason="../shared/data not present")

# The targets: met by the SGLang rows in every regime, by the vLLM rows overall and below
# and near saturation. vLLM's five test rows above saturation are not held to them (TTFT 67%:
# three Qwen3-235B-A22B rows at 40-48 clients predicted 1.6x, two Llama-3.1-8B rows whose
# throughput no full recompute of their prompts reaches; docs/HISIM.md).
TTFT_TARGET_PCT = 15.0
TPOT_TARGET_PCT = 10.0


def _errors(backend):
    rows, _ = load_rows(SILICON, backends=(backend,))
    out = {}
    for r in [r for r in rows if not r.fit]:
        try:
            ttft, tpot = simulate_row(r)
        except ValueError:
            continue  # weights that do not fit: counted in the benchmark
        for key in (regime(r), "all"):
            out.setdefault(key, []).append((ape(ttft, r.ttft_ms), ape(tpot, r.tpot_ms)))
    return {k: np.median(np.array(v), axis=0) for k, v in out.items()}


@needs_data
def test_sglang_meets_the_targets_per_regime():
    med = _errors("sglang")
    assert set(med) >= {"all", "below", "near"}
    for key, (ttft, tpot) in med.items():
        assert ttft <= TTFT_TARGET_PCT, (key, ttft)
        assert tpot <= TPOT_TARGET_PCT, (key, tpot)


@needs_data
def test_vllm_meets_the_targets_overall_and_below_and_near_saturation():
    med = _errors("vllm")
    for key in ("all", "below", "near"):
        ttft, tpot = med[key]
        assert ttft <= TTFT_TARGET_PCT, (key, ttft)
        assert tpot <= TPOT_TARGET_PCT, (key, tpot)


def test_fits_never_simulate_a_test_row(monkeypatch):
    """Both fit stages see fit rows only (a one-point grid keeps this instant); stage 1 runs on
    its fixed settings, not the shipped ones, the expert factors on MoE rows only."""
    rows = [SiliconRow(f"row{i}", "vllm", "qwen3-32b", "h100_sxm", dtype, 1024, 128, 8, 4,
                       100.0, 10.0) for i in range(40) for dtype in ("bfloat16", "fp8")]
    moe_rows = [SiliconRow(f"moe{i}", "vllm", "qwen3-235b-a22b", "h200_sxm", "fp8", 1024, 128,
                           8, 4, 100.0, 10.0) for i in range(20)]
    assert {r.fit for r in rows} == {r.fit for r in moe_rows} == {True, False}
    rows += moe_rows
    seen = []

    def fake(row, overhead=None, warmup=1, measured=3, settings=None):
        seen.append((row, overhead, settings))
        return 100.0, 10.0

    monkeypatch.setattr(serving_fit, "simulate_row", fake)
    monkeypatch.setattr(serving_fit, "KERNEL_GRID", {"prefill_scale": (1.0,),
                                                     "decode_scale": (1.0,)})
    one_point = {k: v[:1] for k, v in serving_fit.GRID.items()}
    monkeypatch.setattr(serving_fit, "SERVER_GRID", {"vllm": {}})
    monkeypatch.setattr(serving_fit, "ATTENTION_GRID", {"prefill_scale": (0.8,),
                                                        "prefill_attention_ratio": (2.0,)})
    monkeypatch.setattr(serving_fit, "MOE_KERNEL_GRID", {"moe_prefill_scale": (2.0,),
                                                         "moe_decode_scale": (1.5,)})
    kernel = serving_fit.fit_kernel_scales(rows, log=lambda *_: None)
    assert set(kernel["vllm"]) == {"bfloat16", "fp8"}
    # The attention ratio is searched with the prefill factor on the dense rows, with the decode
    # factor found; the expert factors on MoE rows only, with the dtype's dense factors.
    assert kernel["vllm"]["fp8"] == {"prefill": 0.8, "decode": 1.0,
                                     "prefill_attention_ratio": 2.0, "moe_prefill": 2.0,
                                     "moe_decode": 1.5}
    assert kernel["vllm"]["bfloat16"] == {"prefill": 0.8, "decode": 1.0,
                                          "prefill_attention_ratio": 2.0}
    moe_seen = [(r, s) for r, _, s in seen if "moe_prefill_scale" in s]
    assert {r.model for r, _ in moe_seen} == {"qwen3-235b-a22b"}
    assert all(s["prefill_scale"] == 0.8 and s["prefill_attention_ratio"] == 2.0
               for _, s in moe_seen)
    assert len(moe_seen) == sum(r.fit for r in moe_rows)
    attention_seen = [(r, s) for r, _, s in seen
                      if s.get("prefill_attention_ratio") == 2.0 and "moe_prefill_scale" not in s]
    assert {r.model for r, _ in attention_seen} == {"qwen3-32b"}
    assert all(s["decode_scale"] == 1.0 for _, s in attention_seen)
    # The dense search runs at ratio 1, whatever the shipped file holds.
    dense_seen = [s for r, _, s in seen if s.get("prefill_attention_ratio") == 1.0]
    assert len(dense_seen) == sum(r.fit for r in rows if r.model == "qwen3-32b")
    assert all(oh == serving_fit.STAGE1_OVERHEAD["vllm"]
               and settings["chunked_prefill_size"] == 4096 for _, oh, settings in seen)
    serving_fit.fit_overheads(rows, log=lambda *_: None, grid=one_point)
    assert seen and all(r.fit for r, _, _ in seen)
    dense_fit = sum(r.fit for r in rows if r.model == "qwen3-32b")
    # Dense rows: the dense and the attention search; MoE rows: the expert search; then stage 2.
    assert len(seen) == 2 * dense_fit + len(moe_seen) + sum(r.fit for r in rows)


def test_the_shipped_fit_is_a_fixed_point_of_the_two_stages():
    """Stage 1 runs on stage 2's shipped result: the settings it assumes are the ones the shipped
    file holds (a refit that moves them must move STAGE1_* too, or stage 1's factors are fitted to
    a scheduler the file no longer has)."""
    from tairstore.hisim.scheduler import fitted_overheads, fitted_server

    for backend, overhead in serving_fit.STAGE1_OVERHEAD.items():
        assert fitted_overheads()[backend] == overhead
        assert fitted_server(backend) == serving_fit.STAGE1_SERVER[backend]


def test_vllm_fp8_rows_run_with_an_fp8_kv_cache(tmp_path):
    """The rows' convention (serving_fit.FP8_KV_BACKENDS): vLLM rows of fp8 precision ran with an
    FP8 KV cache, which halves a token's KV and so doubles the simulated pool; SGLang's and BF16
    rows keep a BF16 one."""
    cols = ["id", "backend", "model_path", "system", "precision", "mode", "isl", "osl",
            "gemm_quant_mode", "batch_size", "tp_size", "silicon_ttft_ms", "silicon_tpot_ms"]
    lines = [",".join(cols),
             "a,vllm,meta-llama/Llama-3.1-70B,h200_sxm,fp8,agg,1024,128,fp8,8,1,100,10",
             "b,vllm,Qwen/Qwen3-32B,h100_sxm,,agg,1024,128,,8,2,100,10",
             "c,sglang,Qwen/Qwen3-32B,h100_sxm,fp8,agg,1024,128,fp8_block,8,2,100,10"]
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(lines) + "\n")
    rows, skipped = load_rows(path)
    assert not skipped
    assert {r.id: r.kv_dtype for r in rows} == {"a": "fp8", "b": "bfloat16", "c": "bfloat16"}
    llama = rows[0]
    fp8 = serving_fit._row_step_model(llama)
    bf16 = serving_fit._row_step_model(replace(llama, kv_dtype="bfloat16"))
    assert fp8.model.kv_bytes_per_token * 2 == bf16.model.kv_bytes_per_token
