"""Model architectures as the step-latency model needs them: shapes, dtypes, KV bytes per token.

The built-in configs restate the public HuggingFace ``config.json`` of each model (the repository
named in the comment); :func:`from_hf_config` reads any such file from disk, so a model that is not
built in is one file away.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "fp8": 1, "fp8_block": 1, "float32": 4}


class UnknownModelError(KeyError):
    """No built-in model has this name."""


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank query and compressed KV."""

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class MoEConfig:
    """Routed experts, plus always-on shared experts; the first ``first_dense_layers`` are dense."""

    num_experts: int
    top_k: int
    expert_intermediate: int
    num_shared_experts: int = 0
    first_dense_layers: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer.

    ``gated_mlp`` is true for SwiGLU MLPs (gate and up projections, 3 matrices) and false for the
    classic 2-matrix GELU MLP (BLOOM). ``weight_dtype`` is the GEMM input dtype the engine runs
    ("bfloat16", "fp8" per-tensor, "fp8_block" for DeepSeek's 128x128 block scales).
    """

    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool = True
    qk_norm: bool = False
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None
    weight_dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"
    aliases: tuple[str, ...] = field(default=(), compare=False)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token occupies across all layers (whole model, before TP)."""
        per_elem = DTYPE_BYTES[self.kv_dtype]
        if self.mla is not None:
            # MLA caches the compressed latent plus the shared rotary key, not per-head K and V.
            per_layer = self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        else:
            per_layer = 2 * self.num_kv_heads * self.head_dim
        return per_layer * self.num_layers * per_elem

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) uses routed experts."""
        return self.moe is not None and layer >= self.moe.first_dense_layers

    def with_dtypes(self, weight_dtype: str | None = None, kv_dtype: str | None = None
                    ) -> "ModelConfig":
        """A copy running other GEMM and/or KV-cache dtypes."""
        return replace(self, weight_dtype=weight_dtype or self.weight_dtype,
                       kv_dtype=kv_dtype or self.kv_dtype)


def _qwen3(name: str, layers: int, hidden: int, heads: int, inter: int) -> ModelConfig:
    # Qwen/Qwen3-*: 8 KV heads, head_dim 128, vocab 151,936, RMSNorm on q and k.
    return ModelConfig(name, layers, hidden, heads, 8, 128, inter, 151936, qk_norm=True)


BUILTIN_MODELS: tuple[ModelConfig, ...] = (
    _qwen3("qwen3-0.6b", 28, 1024, 16, 3072),     # Qwen/Qwen3-0.6B
    _qwen3("qwen3-1.7b", 28, 2048, 16, 6144),     # Qwen/Qwen3-1.7B
    _qwen3("qwen3-4b", 36, 2560, 32, 9728),       # Qwen/Qwen3-4B
    _qwen3("qwen3-8b", 36, 4096, 32, 12288),      # Qwen/Qwen3-8B
    _qwen3("qwen3-14b", 40, 5120, 40, 17408),     # Qwen/Qwen3-14B
    _qwen3("qwen3-32b", 64, 5120, 64, 25600),     # Qwen/Qwen3-32B
    # Qwen/Qwen3-30B-A3B: 48 layers, 32 q / 4 kv heads, 128 experts, 8 active, 768 wide.
    ModelConfig("qwen3-30b-a3b", 48, 2048, 32, 4, 128, 6144, 151936, qk_norm=True,
                moe=MoEConfig(num_experts=128, top_k=8, expert_intermediate=768)),
    # Qwen/Qwen3-235B-A22B: 94 layers, 64 q / 4 kv heads, 128 experts, 8 active, 1536 wide.
    ModelConfig("qwen3-235b-a22b", 94, 4096, 64, 4, 128, 12288, 151936, qk_norm=True,
                moe=MoEConfig(num_experts=128, top_k=8, expert_intermediate=1536)),
    # meta-llama/Llama-3.1-8B and -70B.
    ModelConfig("llama3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256, aliases=("llama-3.1-8b",)),
    ModelConfig("llama3.1-70b", 80, 8192, 64, 8, 128, 28672, 128256,
                aliases=("llama-3.1-70b",)),
    # meta-llama/Llama-2-70b-hf and bigscience/bloom: the models Splitwise measured.
    ModelConfig("llama2-70b", 80, 8192, 64, 8, 128, 28672, 32000, aliases=("llama-2-70b",)),
    ModelConfig("bloom-176b", 70, 14336, 112, 112, 128, 4 * 14336, 250880, gated_mlp=False),
    # deepseek-ai/DeepSeek-V3: MLA, 256 routed experts (8 active) + 1 shared, first 3 layers
    # dense (18432 wide), FP8 weights with 128x128 block scales.
    ModelConfig("deepseek-v3", 61, 7168, 128, 128, 128, 18432, 129280,
                mla=MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                              qk_rope_head_dim=64, v_head_dim=128),
                moe=MoEConfig(num_experts=256, top_k=8, expert_intermediate=2048,
                              num_shared_experts=1, first_dense_layers=3),
                weight_dtype="fp8_block"),
)

_BY_NAME = {n.lower(): m for m in BUILTIN_MODELS for n in (m.name, *m.aliases)}


def get_model(name: str) -> ModelConfig:
    """Return a built-in model by name (case-insensitive), or load it if ``name`` is a path.

    Raises:
        UnknownModelError: neither a built-in name nor an existing ``config.json`` path.
    """
    model = _BY_NAME.get(name.lower())
    if model is not None:
        return model
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return from_hf_config(path)
    raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(model_names())}")


def model_names() -> list[str]:
    """Names of the built-in models."""
    return [m.name for m in BUILTIN_MODELS]


def from_hf_config(path: Path | str, name: str | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from a HuggingFace ``config.json`` file.

    Understands the Llama / Qwen2 / Qwen3 / Qwen3-MoE / DeepSeek-V3 / BLOOM key names. A
    ``quantization_config`` with ``quant_method == "fp8"`` selects FP8 GEMMs (block-scaled when it
    gives a ``weight_block_size``).
    """
    cfg: dict[str, Any] = json.loads(Path(path).read_text())
    if "text_config" in cfg:  # multimodal wrappers keep the language model one level down
        cfg = {**cfg, **cfg["text_config"]}
    hidden = int(cfg.get("hidden_size") or cfg["n_embed"])
    heads = int(cfg.get("num_attention_heads") or cfg["n_head"])
    layers = int(cfg.get("num_hidden_layers") or cfg["n_layer"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    model_type = str(cfg.get("model_type", ""))
    gated = model_type != "bloom"
    inter = int(cfg.get("intermediate_size") or 4 * hidden)

    moe = None
    n_experts = (cfg.get("n_routed_experts") or cfg.get("num_experts")
                 or cfg.get("num_local_experts"))
    if n_experts:
        moe = MoEConfig(
            num_experts=int(n_experts),
            top_k=int(cfg.get("num_experts_per_tok", 1)),
            expert_intermediate=int(cfg.get("moe_intermediate_size") or inter),
            num_shared_experts=int(cfg.get("n_shared_experts") or 0),
            first_dense_layers=int(cfg.get("first_k_dense_replace") or 0),
        )
    mla = None
    if cfg.get("kv_lora_rank"):
        mla = MLAConfig(
            q_lora_rank=int(cfg.get("q_lora_rank") or 0),
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
            qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
        )
        kv_heads = heads
        head_dim = mla.v_head_dim
    weight_dtype = "bfloat16"
    quant = cfg.get("quantization_config") or {}
    if quant.get("quant_method") == "fp8":
        weight_dtype = "fp8_block" if quant.get("weight_block_size") else "fp8"
    return ModelConfig(
        name=name or str(cfg.get("_name_or_path") or Path(path).parent.name or "model"),
        num_layers=layers, hidden=hidden, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate=inter, vocab=int(cfg.get("vocab_size", 0)),
        gated_mlp=gated, qk_norm=model_type.startswith("qwen3"), moe=moe, mla=mla,
        weight_dtype=weight_dtype,
    )
