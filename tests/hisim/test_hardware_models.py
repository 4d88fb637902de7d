"""GPU profiles, TOML overrides and model configs."""

import json

import pytest

from tairstore.hisim.hardware import BUILTIN_GPUS, GPURegistry, UnknownGPUError, get_gpu
from tairstore.hisim.models import UnknownModelError, from_hf_config, get_model, model_names

REQUIRED_GPUS = ("h20", "h100", "h200", "a100", "l20", "b200")
REQUIRED_MODELS = ("qwen3-0.6b", "qwen3-8b", "qwen3-32b", "qwen3-30b-a3b", "qwen3-235b-a22b",
                   "llama3.1-8b", "llama3.1-70b", "deepseek-v3")


@pytest.mark.parametrize("name", REQUIRED_GPUS)
def test_required_gpus_have_sane_figures(name):
    gpu = get_gpu(name)
    assert gpu.bf16_tflops > 50 and gpu.hbm_tbps > 0.5 and gpu.pcie_gbps > 0
    assert gpu.fp8_tflops is None or gpu.fp8_tflops == pytest.approx(2 * gpu.bf16_tflops)
    assert gpu.host_dram_gbps > 0 and gpu.ssd_gbps > 0 and gpu.network_gbps > 0


def test_fp8_falls_back_to_bf16_rate_without_fp8_cores():
    a100 = get_gpu("a100")
    assert a100.peak_flops("fp8") == a100.peak_flops("bfloat16")


def test_aliases_and_unknown():
    assert get_gpu("H100-SXM") is get_gpu("h100_sxm")
    with pytest.raises(UnknownGPUError):
        get_gpu("tpu-v5")


def test_toml_profiles(tmp_path):
    path = tmp_path / "gpus.toml"
    path.write_text('[gpu.big-h20]\nbase = "h20"\nhbm_gb = 141\nssd_gbps = 28.0\n'
                    '[gpu.toy]\narch = "x"\nbf16_tflops = 100.0\nfp8_tflops = 200.0\n'
                    'hbm_gb = 16\nhbm_tbps = 1.0\nnvlink_gbps = 0.0\npcie_gbps = 32.0\n'
                    'aliases = ["toy-gpu"]\n')
    reg = GPURegistry(BUILTIN_GPUS)
    added = reg.load_toml(path)
    assert {g.name for g in added} == {"big-h20", "toy"}
    big = reg.get("big-h20")
    assert big.hbm_gb == 141 and big.ssd_gbps == 28.0 and big.bf16_tflops == 148.0
    assert big.aic_system is None
    assert reg.get("toy-gpu").interconnect_bytes_per_s == 32e9


def test_hbm_capacity_is_binary_and_sizes_the_kv_pool():
    from tairstore.hisim.scheduler import kv_bytes_per_token_per_gpu, kv_pool_tokens, weight_bytes
    h100, h200 = get_gpu("h100"), get_gpu("h200")
    # An "80 GB" H100 reports 81,559 MiB, a "141 GB" H200 143,771 MiB: the datasheet figures are
    # GiB (to within what the driver keeps).
    assert 81_559 * 2**20 <= h100.hbm_bytes == 80 * 2**30
    assert 143_771 * 2**20 <= h200.hbm_bytes == 141 * 2**30
    model = get_model("llama3.1-70b").with_dtypes("fp8")
    left = 0.9 * 141 * 2**30 - weight_bytes(model)
    assert kv_pool_tokens(model, h200, 1, 0.9) == int(left / kv_bytes_per_token_per_gpu(model, 1))
    # An FP8 KV cache holds twice the tokens of a BF16 one.
    fp8_kv = model.with_dtypes(kv_dtype="fp8")
    assert kv_pool_tokens(fp8_kv, h200, 1, 0.9) == int(left / (model.kv_bytes_per_token / 2))


def test_overrides_are_copies():
    h100 = get_gpu("h100")
    fast = h100.with_overrides(network_gbps=100.0)
    assert fast.network_gbps == 100.0 and h100.network_gbps != 100.0


@pytest.mark.parametrize("name", REQUIRED_MODELS)
def test_required_models_exist(name):
    assert name in model_names()
    m = get_model(name)
    assert m.num_heads % m.num_kv_heads == 0 and m.kv_bytes_per_token > 0


def test_kv_bytes_per_token():
    # Qwen3-8B: 2 (K, V) x 8 heads x 128 x 36 layers x 2 bytes.
    assert get_model("qwen3-8b").kv_bytes_per_token == 2 * 8 * 128 * 36 * 2
    # DeepSeek-V3 caches 512 latent + 64 rope values per layer.
    assert get_model("deepseek-v3").kv_bytes_per_token == (512 + 64) * 61 * 2
    assert get_model("qwen3-8b").with_dtypes(kv_dtype="fp8").kv_bytes_per_token == 2 * 8 * 128 * 36


def test_unknown_model():
    with pytest.raises(UnknownModelError):
        get_model("gpt-17")


def test_hf_config_dense(tmp_path):
    cfg = {"model_type": "qwen3", "hidden_size": 4096, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 36,
           "intermediate_size": 12288, "vocab_size": 151936}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = get_model(str(tmp_path))
    ref = get_model("qwen3-8b")
    assert (m.num_layers, m.hidden, m.num_kv_heads, m.intermediate, m.qk_norm) == (
        ref.num_layers, ref.hidden, ref.num_kv_heads, ref.intermediate, True)
    assert m.kv_bytes_per_token == ref.kv_bytes_per_token


def test_hf_config_deepseek(tmp_path):
    cfg = {"model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128,
           "num_key_value_heads": 128, "num_hidden_layers": 61, "intermediate_size": 18432,
           "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
           "num_experts_per_tok": 8, "first_k_dense_replace": 3, "q_lora_rank": 1536,
           "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
           "v_head_dim": 128, "vocab_size": 129280,
           "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    m = from_hf_config(path, name="dsv3")
    ref = get_model("deepseek-v3")
    assert m.moe == ref.moe and m.mla == ref.mla and m.weight_dtype == "fp8_block"
    assert m.kv_bytes_per_token == ref.kv_bytes_per_token
