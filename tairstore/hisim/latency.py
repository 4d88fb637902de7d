"""The time of one engine step: a batch of prefill chunks and decode tokens, on one TP group.

Theory of operation
-------------------
A step runs every layer once over all of the batch's new tokens (``T`` = prefill tokens + one per
decoding request), so its time is the sum over layers of the layer's operators, plus the LM head,
sampling and the scheduler. Per layer, tensor-parallel degree ``tp``:

- norms and elementwise passes (fused add + RMSNorm twice, q/k norm, rotary, KV-cache write,
  activation) -- the roofline of their bytes, no table measures them;
- QKV, O and MLP GEMMs with ``m = T`` and ``n`` or ``k`` divided by ``tp``;
- context attention for each prefill chunk over its prefix: the table measures fresh sequences,
  and a chunk after ``prefix`` cached tokens does the work of a fresh ``prefix + new`` sequence
  minus that of a fresh ``prefix`` one (it never recomputes the prefix's own rows);
- decode attention over the batch's KV lengths, looked up at their mean: the kernel's work is the
  total KV read, which the mean preserves;
- MoE layers: router GEMM, the fused-MoE table at ``moe_tp = tp``, shared experts as GEMMs;
- MLA layers (DeepSeek-V3): fused q_a/kv_a projection, q_b, kv_b (prefill only), the MLA tables,
  the absorbed-decode batched GEMMs, O;
- two all-reduces of ``T x hidden`` when ``tp > 1``.

Identical layers are timed once and multiplied. An operator split by TP is never credited more than
a 2x speed-up for half the work (``_split``). Every operator goes through
:class:`~tairstore.hisim.kernels.KernelTimer` (table, scaled table or roofline, never below the
hardware floor); the result is reported in milliseconds with a breakdown by operator.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from . import ops
from .hardware import GPU
from .kernels import MLA_LATENT, MLA_QK_DIM, MLA_ROPE, MLA_V_DIM, Estimate, KernelTimer
from .models import ModelConfig
from .ops import OpCost

# CPU-side work per step that the GPU waits for: SGLang overlaps most scheduling with the previous
# step, so what remains is batch bookkeeping. An assumption, not a measurement.
SCHEDULER_OVERHEAD_MS = 0.2
# Per-request share of that bookkeeping (building the batch's index tensors).
SCHEDULER_PER_REQUEST_MS = 0.002
# Sampling reads the fp32 logits about three times (softmax, top-p sort/scan, draw).
SAMPLING_PASSES = 3
# The default token distribution over experts in AIConfigurator's MoE measurements.
MOE_DISTRIBUTION = "power_law_1.01"
TABLE_HEAD_DIM = "128"

# Breakdown categories, in the order the CLI prints them. Communication is kept apart so that
# "compute time" is the sum of the others.
COMM_CATEGORIES = ("tp_allreduce",)
CATEGORIES = (
    "qkv_gemm", "context_attention", "decode_attention", "o_gemm", "mlp_gemm", "moe",
    "mla_gemm", "norm_elementwise", "tp_allreduce", "lm_head", "sampling", "scheduler",
)


class StepSpecError(ValueError):
    """A step description that no engine could run (negative lengths, empty batch...)."""


@dataclass(frozen=True)
class PrefillChunk:
    """``new_tokens`` prompt tokens computed this step after ``prefix`` tokens already cached."""

    new_tokens: int
    prefix: int = 0


@dataclass(frozen=True)
class Step:
    """One engine step: prefill chunks, and the KV length of each decoding request.

    A decoding request's KV length counts the tokens already cached, the new token excluded.
    """

    prefill: tuple[PrefillChunk, ...] = ()
    decode_kv: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.prefill and not self.decode_kv:
            raise StepSpecError("a step needs at least one prefill chunk or decode request")
        for c in self.prefill:
            if c.new_tokens <= 0 or c.prefix < 0:
                raise StepSpecError(f"bad prefill chunk {c}")
        if any(kv < 0 for kv in self.decode_kv):
            raise StepSpecError("decode KV lengths must be >= 0")

    @classmethod
    def of(cls, prefill: Iterable[int | tuple[int, int]] = (), decode: int = 0,
           kv_len: int = 0) -> "Step":
        """Build a step from chunk sizes (or ``(new, prefix)`` pairs) and ``decode x kv_len``."""
        chunks = tuple(PrefillChunk(*c) if isinstance(c, tuple) else PrefillChunk(c)
                       for c in prefill)
        return cls(chunks, (kv_len,) * decode)

    @property
    def num_tokens(self) -> int:
        """New tokens the step computes: all prefill tokens plus one per decoding request."""
        return sum(c.new_tokens for c in self.prefill) + len(self.decode_kv)

    @property
    def num_sequences(self) -> int:
        """Sequences that produce logits this step."""
        return len(self.prefill) + len(self.decode_kv)


@dataclass
class StepTime:
    """A predicted step: total milliseconds, per-category milliseconds, and each one's sources."""

    step_ms: float = 0.0
    breakdown: dict[str, float] = field(default_factory=dict)
    sources: dict[str, set[str]] = field(default_factory=dict)

    def add(self, category: str, ms: float, source: str, times: float = 1.0) -> None:
        """Account ``times`` runs of an operator of ``ms`` under ``category``."""
        self.breakdown[category] = self.breakdown.get(category, 0.0) + ms * times
        self.sources.setdefault(category, set()).add(source)
        self.step_ms += ms * times

    @property
    def compute_ms(self) -> float:
        """Step time without tensor-parallel communication."""
        return self.step_ms - sum(self.breakdown.get(c, 0.0) for c in COMM_CATEGORIES)


class StepLatencyModel:
    """Predicts step times of ``model`` on ``tp`` GPUs whose kernels ``timer`` times.

    Raises:
        StepSpecError: ``tp`` does not divide the model's attention heads.
    """

    def __init__(self, model: ModelConfig, timer: KernelTimer, tp: int = 1) -> None:
        if tp < 1 or model.num_heads % tp:
            raise StepSpecError(f"tp={tp} must divide {model.num_heads} attention heads")
        self.model = model
        self.timer = timer
        self.tp = tp

    @property
    def gpu(self) -> GPU:
        """The GPU being modelled."""
        return self.timer.gpu

    def predict(self, step: Step) -> StepTime:
        """Predicted time of ``step``."""
        m = self.model
        out = StepTime()
        dense_layers = m.num_layers
        if m.moe is not None:
            dense_layers = min(m.moe.first_dense_layers, m.num_layers)
        for is_moe, count in ((False, dense_layers), (True, m.num_layers - dense_layers)):
            if count:
                self._layer(step, is_moe, out, count)
        self._head(step, out)
        out.add("scheduler", SCHEDULER_OVERHEAD_MS
                + SCHEDULER_PER_REQUEST_MS * step.num_sequences, "assumed")
        out.breakdown = {c: out.breakdown[c] for c in CATEGORIES if c in out.breakdown}
        return out

    # ---- one layer -----------------------------------------------------------------------

    def _layer(self, step: Step, is_moe: bool, out: StepTime, n: int) -> None:
        m, T = self.model, step.num_tokens
        self._elementwise(out, n, T * m.hidden, passes=4)  # fused residual add + input RMSNorm
        if m.mla is not None:
            self._mla_attention(step, out, n)
        else:
            self._gqa_attention(step, out, n)
        self._allreduce(out, n, T * m.hidden)
        self._elementwise(out, n, T * m.hidden, passes=4)  # fused residual add + post-attn norm
        if is_moe:
            self._moe(T, out, n)
        else:
            gate = 2 if m.gated_mlp else 1
            self._split(out, "mlp_gemm", n, lambda tp: self._gemm(T, gate * m.intermediate / tp,
                                                                  m.hidden))
            self._split(out, "norm_elementwise", n, lambda tp: self._ew(
                T * m.intermediate / tp, passes=3 if m.gated_mlp else 2))
            self._split(out, "mlp_gemm", n, lambda tp: self._gemm(T, m.hidden,
                                                                  m.intermediate / tp))
        self._allreduce(out, n, T * m.hidden)

    def _heads(self, tp: int) -> tuple[int, int]:
        m = self.model
        # KV heads are replicated, not split, when there are fewer of them than GPUs.
        return m.num_heads // tp, max(1, m.num_kv_heads // tp)

    def _gqa_attention(self, step: Step, out: StepTime, n: int) -> None:
        m, T, d = self.model, step.num_tokens, self.model.head_dim

        def qkv(tp: int) -> Estimate:
            heads, kv_heads = self._heads(tp)
            return self._gemm(T, (heads + 2 * kv_heads) * d, m.hidden)

        def per_head_passes(tp: int) -> Estimate:
            heads, kv_heads = self._heads(tp)
            passes = 4 if m.qk_norm else 2  # rotary (+ q/k RMSNorm), each a read and a write
            rope_norm = self._ew(T * (heads + kv_heads) * d, passes)
            kv_write = self._ew(T * 2 * kv_heads * d, passes=2)
            return Estimate(rope_norm.ms + kv_write.ms, rope_norm.source)

        self._split(out, "qkv_gemm", n, qkv)
        self._split(out, "norm_elementwise", n, per_head_passes)
        key_ctx = ("bfloat16", m.kv_dtype, str(d))
        for (new, prefix), batch in Counter((c.new_tokens, c.prefix) for c in step.prefill).items():
            def ctx(tp: int, new=new, prefix=prefix, batch=batch) -> Estimate:
                heads, kv_heads = self._heads(tp)

                def fresh(length: float) -> Estimate:
                    cost = ops.context_attention(batch, length, 0, heads, kv_heads, d, m.kv_dtype)
                    return self.timer.time("context_attention", key_ctx,
                                           (batch, length, kv_heads, heads), cost)

                done = ops.context_attention(batch, new, prefix, heads, kv_heads, d, m.kv_dtype)
                return self._chunk(fresh, new, prefix, "context_attention", done)

            self._split(out, "context_attention", n, ctx)
        if step.decode_kv:
            b = len(step.decode_kv)
            kv = max(1.0, sum(step.decode_kv) / b + 1)  # + the token being decoded

            def dec(tp: int) -> Estimate:
                heads, kv_heads = self._heads(tp)
                cost = ops.decode_attention(b, kv, heads, kv_heads, d, m.kv_dtype)
                return self.timer.time("generation_attention", (m.kv_dtype, str(d)),
                                       (b, kv, kv_heads, heads), cost)

            self._split(out, "decode_attention", n, dec)
        self._split(out, "o_gemm", n, lambda tp: self._gemm(T, m.hidden, self._heads(tp)[0] * d))

    def _mla_attention(self, step: Step, out: StepTime, n: int) -> None:
        m, T, mla = self.model, step.num_tokens, self.model.mla
        assert mla is not None
        latent = mla.kv_lora_rank + mla.qk_rope_head_dim
        qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        # q_a and kv_a read the same input, run as one GEMM, and are replicated on every GPU.
        est = self._gemm(T, mla.q_lora_rank + latent, m.hidden)
        out.add("mla_gemm", est.ms, est.source, n)
        self._elementwise(out, n, T * (mla.q_lora_rank + mla.kv_lora_rank), passes=2)
        self._split(out, "mla_gemm", n, lambda tp: self._gemm(T, m.num_heads // tp * qk,
                                                               mla.q_lora_rank))
        prefill_tokens = sum(c.new_tokens for c in step.prefill)
        if prefill_tokens:
            width = mla.qk_nope_head_dim + mla.v_head_dim
            self._split(out, "mla_gemm", n, lambda tp: self._gemm(
                prefill_tokens, m.num_heads // tp * width, mla.kv_lora_rank))
        for (new, prefix), batch in Counter((c.new_tokens, c.prefix) for c in step.prefill).items():
            def ctx(tp: int, new=new, prefix=prefix, batch=batch) -> Estimate:
                heads = m.num_heads // tp

                def fresh(length: float) -> Estimate:
                    cost = ops.mla_context(batch, length, 0, heads, MLA_QK_DIM, MLA_V_DIM,
                                           MLA_LATENT + MLA_ROPE, m.kv_dtype)
                    return self.timer.time("context_mla", (m.kv_dtype,), (heads, batch, length),
                                           cost)

                done = ops.mla_context(batch, new, prefix, heads, MLA_QK_DIM, MLA_V_DIM,
                                       MLA_LATENT + MLA_ROPE, m.kv_dtype)
                return self._chunk(fresh, new, prefix, "context_mla", done)

            self._split(out, "context_attention", n, ctx)
        if step.decode_kv:
            b = len(step.decode_kv)
            kv = max(1.0, sum(step.decode_kv) / b + 1)
            for op_name in ("mla_gen_pre", "mla_gen_post"):
                def bmm(tp: int, op_name=op_name) -> Estimate:
                    heads = m.num_heads // tp
                    cost = ops.batched_gemm(heads, b, MLA_LATENT, mla.qk_nope_head_dim)
                    return self.timer.time("mla_bmm", (op_name, "bfloat16"), (heads, b), cost)

                self._split(out, "mla_gemm", n, bmm)

            def dec(tp: int) -> Estimate:
                heads = m.num_heads // tp
                cost = ops.mla_decode(b, kv, heads, latent, mla.kv_lora_rank, m.kv_dtype)
                return self.timer.time("generation_mla", (m.kv_dtype,), (heads, b, kv), cost)

            self._split(out, "decode_attention", n, dec)
        self._split(out, "o_gemm", n, lambda tp: self._gemm(T, m.hidden,
                                                             m.num_heads // tp * mla.v_head_dim))

    def _moe(self, T: int, out: StepTime, n: int) -> None:
        m, moe = self.model, self.model.moe
        assert moe is not None
        # The router is small and replicated on every GPU; it runs in bf16.
        est = self.timer.time("gemm", ("bfloat16",), (T, moe.num_experts, m.hidden),
                              ops.gemm(T, moe.num_experts, m.hidden))
        out.add("moe", est.ms, est.source, n)
        dtype = m.weight_dtype
        key = (dtype, MOE_DISTRIBUTION, str(m.hidden), str(moe.expert_intermediate),
               str(moe.top_k), str(moe.num_experts))

        def experts(tp: int) -> Estimate:
            cost = ops.moe(T, m.hidden, moe.expert_intermediate / tp, moe.top_k, moe.num_experts,
                           dtype)
            return self.timer.time("moe", key, (tp, T), cost)

        self._split(out, "moe", n, experts)
        if moe.num_shared_experts:
            inter = moe.num_shared_experts * moe.expert_intermediate
            self._split(out, "moe", n, lambda tp: self._gemm(T, 2 * inter / tp, m.hidden))
            self._split(out, "moe", n, lambda tp: self._gemm(T, m.hidden, inter / tp))

    # ---- once per step -------------------------------------------------------------------

    def _head(self, step: Step, out: StepTime) -> None:
        m, S = self.model, step.num_sequences
        self._elementwise(out, 1, S * m.hidden, passes=2, category="lm_head")  # final norm
        self._split(out, "lm_head", 1, lambda tp: self.timer.time(
            "gemm", ("bfloat16",), (S, m.vocab / tp, m.hidden),
            ops.gemm(S, m.vocab / tp, m.hidden)))
        if self.tp > 1:
            # Gathering vocab-parallel logits moves (tp-1)/tp of them, half an all-reduce's
            # traffic: time it as an all-reduce of half the elements.
            self._allreduce(out, 1, S * m.vocab / 2, category="lm_head")
        est = self._ew(S * m.vocab * 2, passes=SAMPLING_PASSES)  # fp32 logits = 2 bf16 each
        out.add("sampling", est.ms, est.source)

    # ---- helpers -------------------------------------------------------------------------

    def _split(self, out: StepTime, category: str, n_layers: int,
               time_at: Callable[[int], Estimate]) -> None:
        """Account an operator whose per-GPU share shrinks with TP; ``time_at(tp)`` times it.

        One GPU given half the work is never more than twice as fast: where the tables say
        otherwise (a kernel measured less efficient on the bigger shape), the share at ``tp`` is
        raised to half the share at ``tp / 2``, recursively down to odd ``tp``.
        """
        degrees = [self.tp]
        while degrees[-1] % 2 == 0:
            degrees.append(degrees[-1] // 2)
        est = time_at(degrees[-1])
        ms = est.ms
        for tp in reversed(degrees[:-1]):
            est = time_at(tp)
            ms = max(est.ms, ms / 2)
        out.add(category, ms, est.source, n_layers)

    def _chunk(self, fresh: Callable[[float], Estimate], new: int, prefix: int, family: str,
               done: OpCost) -> Estimate:
        """Causal attention of ``new`` tokens after ``prefix`` from fresh-sequence timings.

        A fresh ``prefix + new`` sequence covers ``(prefix + new)**2 / 2`` query-key pairs; the
        chunk covers its own ``new**2 / 2`` plus the ``new * prefix`` block against the prefix.
        The block is charged at the fresh sequence's average cost per extra pair:
        ``fresh(new) + (fresh(prefix + new) - fresh(new)) * new / (new + prefix / 2)``. Measured
        curves are not exactly convex, so the estimate is also taken at halvings of the prefix
        and the largest kept: a longer prefix never makes a chunk cheaper.
        """
        alone = fresh(new)
        if not prefix:
            return alone
        ms = alone.ms
        p = float(prefix)
        source = alone.source
        while p >= 1:
            full = fresh(p + new)
            ms = max(ms, alone.ms + (full.ms - alone.ms) * new / (new + p / 2))
            source = full.source
            p /= 2
        return Estimate(max(ms, self.timer.floor_ms(family, done)), source)

    def _gemm(self, mm: float, nn: float, kk: float) -> Estimate:
        dtype = self.model.weight_dtype
        return self.timer.time("gemm", (dtype,), (mm, nn, kk), ops.gemm(mm, nn, kk, dtype))

    def _ew(self, elements: float, passes: float) -> Estimate:
        return self.timer.time("elementwise", None, None, ops.elementwise(elements, passes))

    def _elementwise(self, out: StepTime, n_layers: int, elements: float, passes: float,
                     category: str = "norm_elementwise") -> None:
        est = self._ew(elements, passes)
        out.add(category, est.ms, est.source, n_layers)

    def _allreduce(self, out: StepTime, n_layers: int, elements: float,
                   category: str = "tp_allreduce") -> None:
        if self.tp == 1:
            return
        cost = OpCost(0.0, ops.allreduce_bytes(elements, self.tp))
        est = self.timer.time("allreduce", ("bfloat16",), (self.tp, elements), cost)
        out.add(category, est.ms, est.source, n_layers)


def parse_decode(spec: str) -> tuple[int, int]:
    """Parse ``"64x4096"`` (requests x KV length) into ``(64, 4096)``.

    Raises:
        StepSpecError: not of the form ``<count>x<length>``.
    """
    try:
        count, length = spec.lower().split("x")
        result = int(count), int(length)
    except ValueError:
        raise StepSpecError(f"decode spec {spec!r} is not <requests>x<kv_len>") from None
    if result[0] < 0 or result[1] < 0:
        raise StepSpecError(f"decode spec {spec!r} has a negative count")
    return result
