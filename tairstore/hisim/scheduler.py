"""The serving engine's configuration: scheduler limits, KV memory, CUDA graphs, CPU overhead.

Theory of operation
-------------------
Two backends are modelled, with their defaults on 80-141 GB Hopper GPUs:

- ``sglang`` (0.5.x): a prefill (extend) batch runs alone and the decode batch waits for it
  (``--enable-mixed-chunk`` off); chunked prefill with an 8192-token budget; admission reserves
  ``new_token_ratio`` of each request's remaining output (0.7, decaying to 0.1 over 600 decode
  steps, back to 0.7 after a retraction); a retraction takes the request with the fewest output
  tokens; CUDA graphs up to 256 requests (512 with TP >= 4); the overlap scheduler hides the CPU
  work of a step behind the previous step's GPU work.
- ``vllm`` (V1): every step mixes all decodes with prefill chunks under one token budget
  (``max_num_batched_tokens``: the engine's default is 8192 on Hopper; the budget the measured
  deployments ran with is fitted, see below), decodes first; no output reservation;
  preemption (recompute) of the latest-admitted request when KV runs out; CUDA graphs up to 512
  requests, for decode-only steps.

The KV pool is what is left of ``mem_fraction`` of every GPU's memory after the weights, in tokens
(a token's KV is split over the TP group, replicated where there are fewer KV heads than GPUs).
The CPU time of a step is ``base + per_seq x sequences``, plus ``eager_per_layer x layers`` when
the step does not replay a CUDA graph (a prefill, or a decode batch above the graph limit): the
three parameters (and vLLM's token budget, ingress delay and closed-loop start spread) are fitted
per backend on development rows of measured serving results (:mod:`tairstore.hisim.serving_fit`)
and shipped in ``data/serving_fit.json``.

The step model's operator tables were measured under SGLang. For vLLM a step's GPU compute (TP
all-reduce excepted) is scaled by per-weight-dtype kernel-efficiency factors, ``prefill_scale`` on
what the prefill chunks add and ``decode_scale`` on the decode batch: vLLM compiles its models
(torch.compile fusions of RMSNorm / SiLU-and-mul with the FP8 activation quantisation, CUTLASS
scaled-mm) where the tables time SGLang's kernels. An MoE model's expert layers have factors of
their own (``moe_prefill_scale``, ``moe_decode_scale``): the fused-MoE kernel runs on tile configs
each engine tunes per expert shape, GPU and quantisation. The prefill's context attention is
scaled by ``prefill_scale x prefill_attention_ratio``: it grows with the square of the context
where the GEMMs grow linearly, and vLLM runs its own attention kernels over its paged KV cache.
They are fitted on the same development rows and shipped in the same file; SGLang has none (its
factors are 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from tairstore.errors import InvalidArgumentError

from .hardware import GPU
from .models import DTYPE_BYTES, ModelConfig

BACKENDS = ("sglang", "vllm")
FIT_FILE = Path(__file__).resolve().parent / "data" / "serving_fit.json"
# Activations, CUDA graphs and the NCCL/workspace buffers live outside the KV pool: SGLang's
# --mem-fraction-static and vLLM's --gpu-memory-utilization both default to about 0.9.
DEFAULT_MEM_FRACTION = 0.9
# SGLang's schedule_policy constants (python/sglang/srt/managers/schedule_policy.py).
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY_STEPS = 600
CLIP_MAX_NEW_TOKENS = 4096
# Captured CUDA-graph batch sizes step by 8 up to 256, then by 16 (both engines).
GRAPH_STEP_SMALL, GRAPH_STEP_LARGE, GRAPH_STEP_SWITCH = 8, 16, 256


class CapacityModelError(InvalidArgumentError):
    """The deployment cannot run: the weights do not fit, or no KV memory is left."""


@dataclass(frozen=True)
class Overhead:
    """CPU time of one step, milliseconds: ``base + per_seq x seqs (+ eager x layers)``."""

    base_ms: float = 1.0
    per_seq_ms: float = 0.01
    eager_per_layer_ms: float = 0.05

    def step_ms(self, sequences: int, layers: int, graph: bool) -> float:
        """CPU milliseconds of a step over ``sequences`` sequences."""
        return (self.base_ms + self.per_seq_ms * sequences
                + (0.0 if graph else self.eager_per_layer_ms * layers))


@dataclass(frozen=True)
class ServerConfig:
    """Scheduler limits and engine features of one backend."""

    backend: str = "sglang"
    max_running_requests: int | None = None  # None: as many as KV memory allows
    chunked_prefill_size: int = 8192
    cuda_graph_max_bs: int = 256
    overlap: bool = True
    mixed_chunk: bool = False
    mem_fraction: float = DEFAULT_MEM_FRACTION
    reserve_output: bool = True  # SGLang's new_token_ratio reservation
    # Mean delay (ms) from a client sending a request to the engine scheduling it: HTTP,
    # tokenisation, the hop from the API server to the engine core. It is inside TTFT, and it
    # spreads a closed loop's simultaneous sends over several steps.
    ingress_ms: float = 0.0
    # Closed loops only: the clients' first requests are sent spread over ``concurrency x
    # loop_spread x`` the time of one prompt's prefill alone (low-discrepancy offsets), instead of
    # all at once. A simulated loop of identical requests keeps the phases it starts with; this
    # sets them (see engine.first_send_offsets_ms). 0: all at once.
    loop_spread: float = 0.0
    # Closed loops only: each request's output length is drawn uniformly from ``osl x [1 -
    # loop_jitter, 1 + loop_jitter]`` (a fixed-seed stream), so that identical clients drift out of
    # the phases they start with, as the measured vLLM loops do (see engine._jittered). 0: exact.
    loop_jitter: float = 0.0
    overhead: Overhead = Overhead()
    # Kernel efficiency of this engine against the step model's operator tables (SGLang's), as
    # factors on a step's GPU compute time (TP all-reduce and expert layers excluded):
    # ``prefill_scale`` on the time the prefill tokens add, ``decode_scale`` on the time of the
    # decode batch. None: the shipped fit for the backend and the model's weight dtype
    # (:func:`fitted_kernel_scales`).
    prefill_scale: float | None = None
    decode_scale: float | None = None
    # The same for the expert layers of an MoE model (the fused-MoE kernel, whose tile configs are
    # tuned per expert shape and GPU, apart from the dense GEMMs): ``moe_prefill_scale`` on the
    # expert time the prefill tokens add, ``moe_decode_scale`` on the decode batch's.
    moe_prefill_scale: float | None = None
    moe_decode_scale: float | None = None
    # The prefill's context attention against the rest of the prefill: its time is scaled by
    # ``prefill_scale x prefill_attention_ratio`` (1: the same factor as the GEMMs). None: the
    # shipped fit (:func:`fitted_kernel_scales`), else 1.
    prefill_attention_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.chunked_prefill_size < 1 or not 0 < self.mem_fraction <= 1:
            raise InvalidArgumentError("chunked_prefill_size must be >= 1 and mem_fraction in "
                                       "(0, 1]")
        if isinstance(self.loop_spread, bool) or not (
                isinstance(self.loop_spread, (int, float)) and 0 <= self.loop_spread < math.inf):
            raise InvalidArgumentError("loop_spread must be a finite number >= 0")
        if isinstance(self.loop_jitter, bool) or not (
                isinstance(self.loop_jitter, (int, float)) and 0 <= self.loop_jitter < 1):
            raise InvalidArgumentError("loop_jitter must be a number in [0, 1)")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise InvalidArgumentError("max_running_requests must be >= 1")
        if any(s is not None and (isinstance(s, bool) or not (isinstance(s, (int, float)) and 0 < s < math.inf))
               for s in (self.prefill_scale, self.decode_scale, self.moe_prefill_scale,
                         self.moe_decode_scale, self.prefill_attention_ratio)):
            raise InvalidArgumentError("prefill_scale, decode_scale, moe_prefill_scale, "
                                       "moe_decode_scale and prefill_attention_ratio must be "
                                       "finite numbers > 0")

    def kernel_scales(self, weight_dtype: str) -> tuple[float, float]:
        """``(prefill, decode)`` compute-time factors of the dense kernels for a model with
        ``weight_dtype`` weights: the configured ones, else the shipped fit, else 1."""
        return self._scales(weight_dtype, "")

    def moe_scales(self, weight_dtype: str) -> tuple[float, float]:
        """``(prefill, decode)`` factors of the expert layers, as :meth:`kernel_scales`."""
        return self._scales(weight_dtype, "moe_")

    def attention_ratio(self, weight_dtype: str) -> float:
        """The prefill attention's factor relative to ``prefill_scale`` for a model with
        ``weight_dtype`` weights, as :meth:`kernel_scales`."""
        return self._factor(weight_dtype, "prefill_attention_ratio", "prefill_attention_ratio")

    def _scales(self, weight_dtype: str, prefix: str) -> tuple[float, float]:
        return (self._factor(weight_dtype, f"{prefix}prefill_scale", f"{prefix}prefill"),
                self._factor(weight_dtype, f"{prefix}decode_scale", f"{prefix}decode"))

    def _factor(self, weight_dtype: str, field: str, fit_key: str) -> float:
        """The configured ``field``, else the shipped fit's ``fit_key`` for the dtype, else 1."""
        mine = getattr(self, field)
        if mine is not None:
            return mine
        return float(fitted_kernel_scales(self.backend).get(weight_dtype, {}).get(fit_key, 1.0))

    def graph_batch(self, batch: int) -> int | None:
        """The captured batch size a decode batch is padded to; None above the graph limit."""
        if batch > self.cuda_graph_max_bs:
            return None
        if batch <= 4:
            return 1 << (batch - 1).bit_length()  # 1, 2, 4
        step = GRAPH_STEP_SMALL if batch <= GRAPH_STEP_SWITCH else GRAPH_STEP_LARGE
        return min(-(-batch // step) * step, self.cuda_graph_max_bs)


@lru_cache(maxsize=None)
def fitted_overheads(path: Path = FIT_FILE) -> dict[str, Overhead]:
    """The shipped per-backend overhead fits (defaults where none ship)."""
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {b: Overhead(**v) for b, v in raw.get("overhead", {}).items()}


@lru_cache(maxsize=None)
def fitted_server(backend: str, path: Path = FIT_FILE) -> dict[str, float]:
    """The shipped fit's scheduler settings of ``backend`` (``chunked_prefill_size``,
    ``ingress_ms``, ``loop_spread``, ``loop_jitter``), empty where none ship."""
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text()).get("server", {}).get(backend, {}))


@lru_cache(maxsize=None)
def fitted_kernel_scales(backend: str, path: Path = FIT_FILE) -> dict[str, dict[str, float]]:
    """The shipped fit's kernel-efficiency factors of ``backend``: weight dtype ->
    ``{"prefill": x, "decode": y}`` (and ``"moe_prefill"``, ``"moe_decode"`` where MoE rows were
    fitted), empty where none ship."""
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text()).get("kernel", {}).get(backend, {}))


def default_config(backend: str, tp: int = 1, **overrides: object) -> ServerConfig:
    """The backend's defaults on a Hopper GPU (see the module docstring), with overrides."""
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")
    overhead = fitted_overheads().get(backend, Overhead())
    if backend == "sglang":
        cfg = ServerConfig("sglang", cuda_graph_max_bs=256 if tp < 4 else 512, overlap=True,
                           mixed_chunk=False, reserve_output=True, overhead=overhead)
    else:
        cfg = ServerConfig("vllm", max_running_requests=1024, cuda_graph_max_bs=512,
                           overlap=False, mixed_chunk=True, reserve_output=False,
                           overhead=overhead)
    return replace(cfg, **{**fitted_server(backend), **overrides})  # type: ignore[arg-type]


def weight_bytes(model: ModelConfig) -> float:
    """Bytes of the model's weights (GEMM weights in the model's dtype, embeddings in bf16)."""
    m, w = model, DTYPE_BYTES[model.weight_dtype]
    d = m.head_dim
    if m.mla is not None:
        a = m.mla
        attn = (m.hidden * (a.q_lora_rank + a.kv_lora_rank + a.qk_rope_head_dim)
                + a.q_lora_rank * m.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
                + a.kv_lora_rank * m.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
                + m.num_heads * a.v_head_dim * m.hidden)
    else:
        attn = m.hidden * (m.num_heads + 2 * m.num_kv_heads) * d + m.num_heads * d * m.hidden
    mats = 3 if m.gated_mlp else 2
    dense_mlp = mats * m.hidden * m.intermediate
    total = 0.0
    for layer in range(m.num_layers):
        if m.is_moe_layer(layer):
            moe = m.moe
            assert moe is not None
            experts = moe.num_experts + moe.num_shared_experts
            total += attn + 3 * m.hidden * moe.expert_intermediate * experts
        else:
            total += attn + dense_mlp
    return total * w + 2 * m.vocab * m.hidden * 2


def kv_bytes_per_token_per_gpu(model: ModelConfig, tp: int) -> float:
    """KV bytes one token takes on each GPU of the TP group."""
    if model.mla is not None:
        return float(model.kv_bytes_per_token)  # the latent is replicated on every GPU
    share = max(1, model.num_kv_heads // tp) / model.num_kv_heads
    return model.kv_bytes_per_token * share


def kv_pool_tokens(model: ModelConfig, gpu: GPU, tp: int, mem_fraction: float) -> int:
    """Tokens of KV the pool holds on ``tp`` GPUs.

    Raises:
        CapacityModelError: the weights leave no room for KV.
    """
    per_gpu = gpu.hbm_bytes * mem_fraction - weight_bytes(model) / tp
    tokens = int(per_gpu / kv_bytes_per_token_per_gpu(model, tp))
    if tokens < 1:
        raise CapacityModelError(
            f"{model.name} ({weight_bytes(model) / 1e9:.0f} GB of weights) does not fit on "
            f"{tp} x {gpu.name} ({gpu.hbm_gb:g} GiB each) with room for KV")
    return tokens
