"""FLOPs and bytes moved by each operator: the inputs of the roofline and of the hardware floor.

Counts are per GPU (shapes already divided by tensor parallelism). A multiply-add is 2 FLOPs.
Bytes are the unavoidable HBM traffic: every operand read once and every result written once; caches
and re-reads only add to it, which is why a time below ``bytes / bandwidth`` is impossible.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import DTYPE_BYTES

ACT_BYTES = 2  # activations are bf16 in every engine modelled here


@dataclass(frozen=True)
class OpCost:
    """Work of one operator: FLOPs, HBM bytes, and the dtype whose tensor-core peak applies."""

    flops: float
    bytes: float
    dtype: str = "bfloat16"

    def __add__(self, other: "OpCost") -> "OpCost":
        return OpCost(self.flops + other.flops, self.bytes + other.bytes, self.dtype)


def gemm(m: float, n: float, k: float, dtype: str = "bfloat16") -> OpCost:
    """``[m, k] x [k, n]``: weights in ``dtype``, activations in and out in bf16."""
    w = DTYPE_BYTES.get(dtype, 2)
    return OpCost(2.0 * m * n * k, m * k * ACT_BYTES + n * k * w + m * n * ACT_BYTES, dtype)


def context_attention(batch: float, new: float, prefix: float, heads: float, kv_heads: float,
                      head_dim: float, kv_dtype: str = "bfloat16") -> OpCost:
    """Causal attention of ``new`` query tokens over ``prefix`` cached plus themselves.

    Query token i (0-based) sees ``prefix + i + 1`` keys, so the score and value products cover
    ``new * prefix + new * (new + 1) / 2`` query-key pairs, each 2 * head_dim MACs (QK and PV).
    """
    pairs = new * prefix + new * (new + 1) / 2.0
    flops = 4.0 * batch * heads * head_dim * pairs
    kv = batch * (prefix + new) * 2 * kv_heads * head_dim * DTYPE_BYTES.get(kv_dtype, 2)
    q_o = batch * new * 2 * heads * head_dim * ACT_BYTES
    return OpCost(flops, kv + q_o)


def decode_attention(batch: float, kv_len: float, heads: float, kv_heads: float,
                     head_dim: float, kv_dtype: str = "bfloat16") -> OpCost:
    """One new token per request attending over ``kv_len`` cached tokens (a KV read per request)."""
    flops = 4.0 * batch * heads * head_dim * kv_len
    kv = batch * kv_len * 2 * kv_heads * head_dim * DTYPE_BYTES.get(kv_dtype, 2)
    return OpCost(flops, kv + batch * 2 * heads * head_dim * ACT_BYTES)


def mla_context(batch: float, new: float, prefix: float, heads: float, qk_dim: float,
                v_dim: float, latent_dim: float, kv_dtype: str = "bfloat16") -> OpCost:
    """Prefill MLA, run as ordinary attention with per-head K (qk_dim) and V (v_dim)."""
    pairs = new * prefix + new * (new + 1) / 2.0
    flops = 2.0 * batch * heads * (qk_dim + v_dim) * pairs
    kv = batch * (prefix + new) * latent_dim * DTYPE_BYTES.get(kv_dtype, 2)
    q_o = batch * new * heads * (qk_dim + v_dim) * ACT_BYTES
    k_v = batch * (prefix + new) * heads * (qk_dim + v_dim) * ACT_BYTES  # decompressed K, V
    return OpCost(flops, kv + q_o + k_v)


def mla_decode(batch: float, kv_len: float, heads: float, latent_dim: float, v_latent_dim: float,
               kv_dtype: str = "bfloat16") -> OpCost:
    """Decode MLA in the absorbed form: every head attends over the shared compressed cache."""
    flops = 2.0 * batch * heads * kv_len * (latent_dim + v_latent_dim)
    kv = batch * kv_len * latent_dim * DTYPE_BYTES.get(kv_dtype, 2)
    return OpCost(flops, kv + batch * heads * (latent_dim + v_latent_dim) * ACT_BYTES)


def batched_gemm(batch: float, m: float, n: float, k: float, dtype: str = "bfloat16") -> OpCost:
    """``batch`` independent ``[m, k] x [k, n]`` products (MLA's per-head absorption)."""
    one = gemm(m, n, k, dtype)
    return OpCost(one.flops * batch, one.bytes * batch, dtype)


def moe(tokens: float, hidden: float, inter: float, top_k: float, experts: float,
        dtype: str = "bfloat16", gated: bool = True) -> OpCost:
    """Routed experts: each token runs ``top_k`` expert MLPs of width ``inter`` (per GPU).

    Weight traffic counts only the experts that receive a token: at most ``experts``, at most one
    per routed (token, expert) pair.
    """
    mats = 3 if gated else 2
    w = DTYPE_BYTES.get(dtype, 2)
    active = min(experts, tokens * top_k)
    flops = 2.0 * tokens * top_k * mats * hidden * inter
    weights = active * mats * hidden * inter * w
    acts = tokens * top_k * (2 * hidden + (mats - 1) * inter) * ACT_BYTES
    return OpCost(flops, weights + acts, dtype)


def elementwise(elements: float, passes: float = 2.0) -> OpCost:
    """A memory-bound pass over bf16 ``elements`` (norm, rotary, activation...).

    ``passes`` counts tensors of that size read or written (an RMSNorm reads one and writes one).
    """
    return OpCost(0.0, elements * passes * ACT_BYTES)


def allreduce_bytes(elements: float, num_gpus: int) -> float:
    """Bytes each GPU sends in a ring all-reduce of ``elements`` bf16 values.

    Reduce-scatter then all-gather: each moves ``(n - 1) / n`` of the buffer.
    """
    if num_gpus <= 1:
        return 0.0
    return 2.0 * (num_gpus - 1) / num_gpus * elements * ACT_BYTES
