"""Time one operator on one GPU: from its measured table, else scaled from a measured GPU, else
from the roofline.

Theory of operation
-------------------
Each operator family has a table key (exact-match columns) and a point (numeric axes) in the
AIConfigurator layout, plus a cost (:class:`~tairstore.hisim.ops.OpCost`). :class:`KernelTimer`
tries, in order:

1. ``table``: this GPU's own measured table holds the key -> log-space interpolation.
2. ``scaled``: a *reference* GPU's table holds it (the first of several that does) -> the
   reference's measured time, its part above the fitted start-up cost multiplied by the ratio of
   the two GPUs' fitted roofline times for this cost
   (:meth:`~tairstore.hisim.roofline.RooflineParams.transfer_ms`). The efficiency the reference
   achieved on this exact shape carries over; what changes is the peak and bandwidth it is
   achieved against. This is how an H20 or L20 gets an estimate from the H100 tables.
3. ``roofline``: nobody measured the key (an unusual MoE shape, a head_dim other than 128) -> the
   fitted roofline alone.

Whatever the source, the result is never below the hardware floor of the cost: an interpolated or
scaled time that beats physics is an artefact, not a prediction.

:data:`FAMILY_COSTS` turns a table row back into a cost, which is what fitting the roofline and the
cross-device validation need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from . import ops
from .hardware import GPU
from .ops import OpCost
from .roofline import DEFAULT_PARAMS, RooflineParams
from .tables import Table

# DeepSeek-V3's MLA dimensions, the only MLA the tables measure: 128 + 64 (rope) per-head query /
# key width, 128 value width, 512 latent + 64 rope cached per token.
MLA_QK_DIM, MLA_V_DIM, MLA_LATENT, MLA_ROPE = 192, 128, 512, 64


def _moe_cost(key: tuple[str, ...], p: tuple[float, ...]) -> OpCost:
    dtype, _dist, hidden, inter, topk, experts = key
    moe_tp, tokens = p
    return ops.moe(tokens, float(hidden), float(inter) / moe_tp, float(topk), float(experts), dtype)


def _context_attention_cost(key: tuple[str, ...], p: tuple[float, ...]) -> OpCost:
    attn_dtype, kv_dtype, head_dim = key
    batch, isl, kv_heads, heads = p
    cost = ops.context_attention(batch, isl, 0, heads, kv_heads, float(head_dim), kv_dtype)
    return OpCost(cost.flops, cost.bytes, attn_dtype)  # fp8 attention runs at the fp8 peak


def _allreduce_cost(key: tuple[str, ...], p: tuple[float, ...]) -> OpCost:
    n, elements = p
    return OpCost(0.0, ops.allreduce_bytes(elements, int(n)))


FAMILY_COSTS: dict[str, Callable[[tuple[str, ...], tuple[float, ...]], OpCost]] = {
    "gemm": lambda k, p: ops.gemm(p[0], p[1], p[2], k[0]),
    "context_attention": _context_attention_cost,
    "generation_attention": lambda k, p: ops.decode_attention(
        p[0], p[1], p[3], p[2], float(k[1]), k[0]),
    "context_mla": lambda k, p: ops.mla_context(
        p[1], p[2], 0, p[0], MLA_QK_DIM, MLA_V_DIM, MLA_LATENT + MLA_ROPE, k[0]),
    "generation_mla": lambda k, p: ops.mla_decode(
        p[1], p[2], p[0], MLA_LATENT + MLA_ROPE, MLA_LATENT, k[0]),
    "mla_bmm": lambda k, p: ops.batched_gemm(p[0], p[1], MLA_LATENT, 128, k[1]),
    "moe": _moe_cost,
    "allreduce": _allreduce_cost,
}

LINK_FAMILIES = frozenset({"allreduce"})


@dataclass(frozen=True)
class Estimate:
    """A predicted operator time and where it came from ("table", "scaled:<gpu>", "roofline")."""

    ms: float
    source: str


class KernelTimer:
    """Times operators on ``gpu``.

    Args:
        gpu: the GPU to predict for.
        tables: its own measured tables by family (may be empty).
        params: fitted roofline parameters by family.
        references: measured GPUs and their tables, tried in order when ``tables`` lacks a key.
    """

    def __init__(self, gpu: GPU, tables: Mapping[str, Table], params: Mapping[str, RooflineParams],
                 references: Sequence[tuple[GPU, Mapping[str, Table]]] = ()) -> None:
        self.gpu = gpu
        self.tables = dict(tables)
        self.params = {**DEFAULT_PARAMS, **params}
        self.references = list(references)

    def _params(self, family: str) -> RooflineParams:
        return self.params.get(family) or RooflineParams(
            0.5, 0.7, 0.005, link=family in LINK_FAMILIES)

    def time(self, family: str, key: tuple[str, ...] | None, point: tuple[float, ...] | None,
             cost: OpCost) -> Estimate:
        """Predicted time of one operator; ``key``/``point`` are None for untabulated work."""
        params = self._params(family)
        est = self._lookup(family, key, point, cost, params)
        return Estimate(max(est.ms, params.floor_ms(self.gpu, cost)), est.source)

    def floor_ms(self, family: str, cost: OpCost) -> float:
        """The hardware floor of ``cost`` on this GPU (the link's bandwidth for collectives)."""
        return self._params(family).floor_ms(self.gpu, cost)

    def _lookup(self, family: str, key: tuple[str, ...] | None, point: tuple[float, ...] | None,
                cost: OpCost, params: RooflineParams) -> Estimate:
        if key is not None and point is not None:
            own = self.tables.get(family)
            if own is not None and own.has(key):
                return Estimate(own.lookup(key, *point), "table")
            for ref_gpu, ref_tables in self.references:
                ref = ref_tables.get(family)
                if ref is not None and ref.has(key):
                    measured = ref.lookup(key, *point)
                    return Estimate(params.transfer_ms(measured, ref_gpu, self.gpu, cost),
                                    f"scaled:{ref_gpu.name}")
        return Estimate(params.predict_ms(self.gpu, cost), "roofline")
