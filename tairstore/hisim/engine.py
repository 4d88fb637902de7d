"""The serving simulator: a discrete-event loop over engine steps on a virtual clock.

Theory of operation
-------------------
The clock jumps from step to step; nothing sleeps. Each iteration the scheduler
(:mod:`tairstore.hisim.scheduler` holds its configuration) chooses the next step:

- a **prefill** step: the chunked request left over from the last step first, then waiting
  requests in arrival order while the token budget, ``max_running_requests`` and the KV pool
  (with SGLang's output reservation) allow; a request whose prefix lives in host DRAM or storage
  is loaded first (:class:`~tairstore.hisim.cache.HierCache`) and waits for its loads;
- with vLLM, or SGLang's mixed chunk, the running decodes ride along in the same step;
- otherwise a **decode run**: while nothing can be admitted, consecutive decode steps of an
  unchanged batch are taken together up to the next event (a finish, an arrival, a load, KV
  exhaustion), timed by the trapezoid of their first and last step. This is what makes a whole
  trace simulate in seconds: work is per event, not per token.

A decoding request is not touched at each step: a global decode-step counter ``G`` advances, each
request keeps the value of ``G`` when it joined, and a heap orders their finishing values. KV in
use, and SGLang's reservation, are kept as sums updated at join, finish and retraction.

A step's time is the GPU time of :class:`~tairstore.hisim.latency.StepLatencyModel` (without its
fixed scheduler term; decode batches padded to the CUDA-graph size, or eager above the limit) and
the fitted CPU overhead (:class:`~tairstore.hisim.scheduler.Overhead`): their maximum with the
overlap scheduler, their sum without. Step times are memoised on a 2% grid of the step's shape.

When the KV pool cannot hold one more token per decoding request, requests are retracted
(SGLang: fewest output tokens; vLLM: latest admitted) and requeued at the front, to be
recomputed (prompt plus the tokens already generated).

A request reaches the engine ``ServerConfig.ingress_ms`` (mean, uniformly spread) after it is
sent; TTFT counts from the send. A closed loop's clients send their first requests at once, or
spread over a window of ``ServerConfig.loop_spread`` prefill times per client
(:func:`first_send_offsets_ms`): with identical requests the simulated loop keeps the phases it
starts with, and this sets them. With ``ClosedLoop.barrier`` the measured requests wait until every
warm-up request has finished, and then the clients start again the same way (the benchmark
client's separate warm-up and profiling phases). ``ServerConfig.loop_jitter`` draws the closed
loop's output lengths around their given value, so that the phases drift.

ITL samples are the gaps between a measured request's tokens: a decoder's gap runs from its
previous token to the end of the next step it decodes in, so the prefill steps it waited through
and a retraction's recompute fall into it, and a request's gaps add up to ``E2E - TTFT``.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from tairstore.errors import InvalidArgumentError

from .cache import CacheConfig, HierCache
from .hardware import GPU
from .latency import COMM_CATEGORIES, PrefillChunk, Step, StepLatencyModel
from .database import make_timer
from .models import ModelConfig
from .scheduler import (CLIP_MAX_NEW_TOKENS, INIT_NEW_TOKEN_RATIO, MIN_NEW_TOKEN_RATIO,
                        NEW_TOKEN_RATIO_DECAY_STEPS, CapacityModelError, ServerConfig,
                        kv_bytes_per_token_per_gpu, kv_pool_tokens)
from .workload import ClosedLoop, Request

# Step shapes are memoised on a log grid of this many points per doubling (2.2% apart).
GRID_PER_OCTAVE = 32
# With requests waiting for room, SGLang's reservation shrinks every decode step; re-check
# admission at least this often.
BLOCKED_RECHECK_STEPS = 16
# Low-discrepancy spreading of the ingress delays (see ingress_delay_ms).
INV_GOLDEN = (math.sqrt(5) - 1) / 2
# Seed of the closed loops' output-length jitter (ServerConfig.loop_jitter).
JITTER_SEED = 0x5EED
# Step-time categories a backend's kernel-efficiency factors leave alone (see _scaled_ms); the
# expert layers have factors of their own.
UNSCALED_CATEGORIES = COMM_CATEGORIES + ("moe",)
SUPPORTED_ATTENTION = "full softmax attention (dense GQA/MHA or MLA)"


class UnsupportedModelError(InvalidArgumentError):
    """A model family the step model does not cover (linear attention, sparse attention...)."""


@dataclass
class ReqState:
    """A request inside the simulator."""

    req: Request
    target: int  # prompt tokens to have computed: the prompt, plus output after a retraction
    done: int = 0
    prev_out: int = 0  # output tokens generated before the last retraction
    g0: int = 0
    first_ms: float = -1.0
    finish_ms: float = -1.0
    ready_ms: float = 0.0
    matched: bool = False
    cached_tokens: int = 0
    hits: tuple[int, int, int] = (0, 0, 0)
    last_tok_ms: float = -1.0  # when its latest output token came out
    admit_seq: int = 0
    run: int = 0  # bumped at each retraction; stale heap entries carry an older value

    @property
    def measured(self) -> bool:
        """Whether the request counts in the metrics."""
        return not self.req.warmup


@dataclass
class SimResult:
    """What a run produced: finished requests, ITL samples, step counts, cache statistics."""

    requests: list[ReqState]
    itl_ms: list[float] = field(default_factory=list)
    itl_weight: list[int] = field(default_factory=list)
    steps: int = 0
    retractions: int = 0
    hit_rates: dict[str, float] = field(default_factory=dict)
    bytes_per_link: dict[str, int] = field(default_factory=dict)
    kv_pool_tokens: int = 0
    concurrency: int | None = None


def check_supported(model: ModelConfig) -> None:
    """Refuse model families the step model would time wrongly.

    Raises:
        UnsupportedModelError: the model's name or config says linear-attention hybrid (Qwen3.5,
            Qwen3-Next, MiniMax-01 lightning attention, Mamba/Jamba hybrids) or DeepSeek sparse
            attention (DeepSeek-V3.2, GLM-5).
    """
    name = model.name.lower()
    for marker, family in (("qwen3.5", "a linear-attention hybrid (Gated DeltaNet)"),
                           ("qwen3-next", "a linear-attention hybrid (Gated DeltaNet)"),
                           ("minimax-01", "a linear-attention hybrid (lightning attention)"),
                           ("minimax-text-01", "a linear-attention hybrid"),
                           ("jamba", "a Mamba hybrid"), ("mamba", "a state-space model"),
                           ("deepseek-v3.2", "DeepSeek sparse attention"),
                           ("glm-5", "DeepSeek sparse attention")):
        if marker in name:
            raise UnsupportedModelError(
                f"{model.name} is {family}; HiSim covers only {SUPPORTED_ATTENTION}")


class Simulator:
    """One serving deployment: a model on ``tp`` GPUs, a backend, a KV cache hierarchy.

    Args:
        model: the model (dtypes as served).
        gpu: the GPU kind.
        tp: tensor-parallel degree.
        server: scheduler configuration (:func:`~tairstore.hisim.scheduler.default_config`).
        cache: cache levels; None: the GPU prefix cache alone, sized by the KV pool.
        step_model: a ready step model (tests share one); built from the shipped tables if None.
    """

    def __init__(self, model: ModelConfig, gpu: GPU, tp: int, server: ServerConfig,
                 cache: CacheConfig | None = None,
                 step_model: StepLatencyModel | None = None) -> None:
        check_supported(model)
        self.model, self.gpu, self.tp, self.server = model, gpu, tp, server
        self.step_model = step_model or StepLatencyModel(model, make_timer(gpu), tp)
        self.pool = kv_pool_tokens(model, gpu, tp, server.mem_fraction)
        self.max_running = server.max_running_requests or self.pool
        cache = cache or CacheConfig()
        self._dynamic_gpu = cache.gpu_blocks is None
        if self._dynamic_gpu:
            cache = CacheConfig(**{**cache.__dict__, "gpu_blocks": self.pool // cache.block_tokens})
        self.block_tokens = cache.block_tokens
        block_bytes = int(kv_bytes_per_token_per_gpu(model, tp) * cache.block_tokens)
        links = {"h2d": gpu.pcie_gbps, "d2h": gpu.pcie_gbps,
                 "ssd_read": gpu.ssd_gbps, "ssd_write": gpu.ssd_gbps}
        self.cache = HierCache(cache, block_bytes, links)
        self._memo: dict[tuple, float] = {}
        self.prefill_scale, self.decode_scale = server.kernel_scales(model.weight_dtype)
        self.moe_prefill_scale, self.moe_decode_scale = (
            server.moe_scales(model.weight_dtype) if model.moe is not None else (1.0, 1.0))
        self.attention_ratio = server.attention_ratio(model.weight_dtype)

    # ---- step times ------------------------------------------------------------------------

    def gpu_ms(self, chunks: Sequence[tuple[int, int]], decode: int, kv: float) -> float:
        """GPU time of a step: prefill ``(new, prefix)`` chunks and ``decode`` requests at mean
        KV length ``kv``; decode-only batches are padded to their CUDA-graph size, and steps
        that do not replay a graph pay the eager launch cost."""
        graph = None if chunks else self.server.graph_batch(decode) if decode else None
        b = graph or decode
        key = (tuple(sorted((_grid(n), _grid(p)) for n, p in chunks)), b,
               _grid(kv) if b else 0)
        ms = self._memo.get(key)
        if ms is None:
            step = Step(tuple(PrefillChunk(_ungrid(n), _ungrid(p) if p else 0)
                              for n, p in key[0]),
                        (_ungrid(key[2]),) * b)
            ms = self._memo[key] = self._scaled_ms(step)
        if graph is None:
            ms += self.server.overhead.eager_per_layer_ms * self.model.num_layers
        return ms

    def _scaled_ms(self, step: Step) -> float:
        """The step model's time of ``step`` (without its fixed scheduler term), its compute
        scaled by the backend's kernel efficiency: the decode batch's compute by
        ``decode_scale``, what the prefill chunks add to it by ``prefill_scale`` (their context
        attention by ``prefill_scale x prefill_attention_ratio``); an MoE model's expert layers
        likewise by ``moe_decode_scale`` and ``moe_prefill_scale``. The TP all-reduce (NCCL or
        custom all-reduce in both engines) is not scaled."""
        t = self.step_model.predict(step)
        ms = t.step_ms - t.breakdown.get("scheduler", 0.0)
        ps, ds = self.prefill_scale, self.decode_scale
        mps, mds = self.moe_prefill_scale, self.moe_decode_scale
        if ps == ds == mps == mds == self.attention_ratio == 1.0:
            return ms
        moe = t.breakdown.get("moe", 0.0)
        comm = sum(t.breakdown.get(c, 0.0) for c in UNSCALED_CATEGORIES) - moe
        compute = ms - comm - moe
        if not step.prefill:
            return comm + ds * compute + mds * moe
        decode = decode_moe = 0.0
        if step.decode_kv:
            d = self.step_model.predict(Step((), step.decode_kv))
            decode_moe = d.breakdown.get("moe", 0.0)
            decode = d.step_ms - sum(d.breakdown.get(c, 0.0)
                                     for c in UNSCALED_CATEGORIES + ("scheduler",))
        prefill = max(0.0, compute - decode)
        attention = min(t.breakdown.get("context_attention", 0.0), prefill)
        return (comm + ds * decode + ps * (prefill - attention)
                + ps * self.attention_ratio * attention
                + mds * decode_moe + mps * max(0.0, moe - decode_moe))

    def step_wall_ms(self, chunks: Sequence[tuple[int, int]], decode: int, kv: float) -> float:
        """Wall time of one step: GPU time and CPU overhead, overlapped or in series."""
        gpu = self.gpu_ms(chunks, decode, kv)
        cpu = self.server.overhead.step_ms(len(chunks) + decode, self.model.num_layers, True)
        return max(gpu, cpu) if self.server.overlap else gpu + cpu

    # ---- the run ---------------------------------------------------------------------------

    def run(self, workload: Sequence[Request] | ClosedLoop,
            progress: Callable[[int, int], None] | None = None) -> SimResult:
        """Simulate ``workload`` to the last completion and return what happened."""
        return _Run(self, workload, progress).go()


def ingress_delay_ms(mean_ms: float, rid: int) -> float:
    """Delay between a client sending request ``rid`` and the engine scheduling it: uniform on
    ``[0, 2 x mean_ms]``, spread by the golden-ratio sequence so that runs are reproducible."""
    return 2.0 * mean_ms * ((rid * INV_GOLDEN) % 1.0) if mean_ms else 0.0


def first_send_offsets_ms(sim: Simulator, first: Sequence[Request]) -> list[float]:
    """When each client of a closed loop sends its first request, relative to the loop's start.

    With ``ServerConfig.loop_spread`` = s > 0 the ``c`` clients start spread over a window of
    ``c x s x`` the wall time of one prefill of the first wave's mean prompt length (the engine
    alone), client ``i`` at ``window x frac(i x 0.618...)``: a low-discrepancy sequence, so the
    offsets are uniform-looking but reproducible. 0: every client at once."""
    spread = sim.server.loop_spread
    if not spread or not first:
        return [0.0] * len(first)
    isl = max(1, round(sum(r.input_len for r in first) / len(first)))
    window = len(first) * spread * sim.step_wall_ms([(isl, 0)], 0, 0.0)
    return [window * ((i * INV_GOLDEN) % 1.0) for i in range(len(first))]


def _jittered(requests: Sequence[Request], jitter: float) -> list[Request]:
    """Copies of a closed loop's requests, their output lengths drawn uniformly from ``osl x
    [1 - jitter, 1 + jitter]`` (at least 1; a fixed-seed stream in request order, so runs are
    reproducible). The measured vLLM loops lose the phases a simulated loop of identical
    requests keeps for good; this lets the simulated ones drift the same way."""
    if not jitter:
        return [replace(r) for r in requests]
    rng = random.Random(JITTER_SEED)
    return [replace(r, output_len=max(1, round(r.output_len
                                               * (1 + jitter * (2 * rng.random() - 1)))))
            for r in requests]


def _grid(x: float) -> int:
    return int(round(math.log2(max(x, 1.0)) * GRID_PER_OCTAVE))


def _ungrid(i: int) -> int:
    return max(1, int(round(2 ** (i / GRID_PER_OCTAVE))))


class _Run:
    """The state of one simulation (kept apart so a Simulator can run many workloads)."""

    def __init__(self, sim: Simulator, workload: Sequence[Request] | ClosedLoop,
                 progress: Callable[[int, int], None] | None) -> None:
        self.sim, self.server, self.progress = sim, sim.server, progress
        self.sent = 0  # requests sent so far: orders equal arrival times
        self.warm_left = 0  # warm-up requests not finished, while a barrier holds the rest
        if isinstance(workload, ClosedLoop):
            self.closed = workload.concurrency
            # Copies: the caller's workload is not changed (it may be run again).
            self.pending = deque(_jittered(workload.requests, sim.server.loop_jitter))
            if workload.barrier and not all(r.warmup for r in workload.requests):
                self.warm_left = sum(r.warmup for r in workload.requests)
            self.arrivals: list[tuple[float, int, Request]] = []
            self.start_phase(0.0)
        else:
            self.closed = None
            self.pending = deque()
            self.arrivals = []
            for r in workload:
                self.send(r)
        self.total = len(self.arrivals) + len(self.pending)
        self.now = 0.0
        self.waiting: deque[ReqState] = deque()
        self.prefilling: list[ReqState] = []
        self.decoders: dict[int, ReqState] = {}
        self.heap: list[tuple[int, int, int]] = []
        self.G = 0
        self.S = 0  # sum over decoders of (target + 1 - g0): KV in use is S + n * G
        self.R = 0  # sum over decoders of (clipped output - prev_out - 1 + g0): reserve R - n*G
        self.prefill_kv = 0  # KV allocated to admitted requests still prefilling
        self.ratio = INIT_NEW_TOKEN_RATIO
        # ITL bookkeeping. A *settled* decoder's latest token came out at the end of the last
        # decode step (``last_end``); a *fresh* one joined (first token, or the token after a
        # retraction's recompute) since then, at its own ``last_tok_ms``. The next step that
        # decodes gives each its gap, prefill steps waited through included.
        self.last_end = 0.0
        self.settled = 0  # measured settled decoders
        self.fresh: dict[int, ReqState] = {}
        self.measured_decoders = 0
        self.admitted = 0
        self.res = SimResult([], kv_pool_tokens=sim.pool, concurrency=self.closed)

    # -- bookkeeping ---------------------------------------------------------------------------

    def kv_used(self) -> int:
        return self.prefill_kv + self.S + len(self.decoders) * self.G

    def reserved(self) -> float:
        if not self.server.reserve_output:
            return 0.0
        return self.ratio * max(0, self.R - len(self.decoders) * self.G)

    def send(self, r: Request) -> None:
        """A client sends ``r``; the engine sees it after the ingress delay."""
        ready = r.arrival_ms + ingress_delay_ms(self.server.ingress_ms, r.rid)
        self.sent += 1
        heapq.heappush(self.arrivals, (ready, self.sent, r))

    def arrive(self) -> None:
        while self.arrivals and self.arrivals[0][0] <= self.now:
            r = heapq.heappop(self.arrivals)[2]
            self.waiting.append(ReqState(r, r.input_len))

    def join(self, st: ReqState) -> None:
        """A request finished its prefill: its first (or next) token is out."""
        if st.first_ms < 0:
            st.first_ms = self.now
        elif st.measured:  # the token after a retraction's recompute: one (long) gap
            self.res.itl_ms.append(self.now - st.last_tok_ms)
            self.res.itl_weight.append(1)
        st.last_tok_ms = self.now
        self.prefill_kv -= st.target
        if st.prev_out + 1 >= st.req.output_len:
            self.finish(st)
            return
        st.g0 = self.G
        self.decoders[st.req.rid] = st
        self.fresh[st.req.rid] = st
        self.measured_decoders += st.measured
        self.S += st.target + 1 - st.g0
        self.R += min(st.req.output_len, CLIP_MAX_NEW_TOKENS) - st.prev_out - 1 + st.g0
        fin = st.g0 + st.req.output_len - st.prev_out - 1
        heapq.heappush(self.heap, (fin, st.req.rid, st.run))

    def leave(self, st: ReqState) -> None:
        del self.decoders[st.req.rid]
        self.measured_decoders -= st.measured
        if self.fresh.pop(st.req.rid, None) is None:
            self.settled -= st.measured
            st.last_tok_ms = self.last_end
        self.S -= st.target + 1 - st.g0
        self.R -= min(st.req.output_len, CLIP_MAX_NEW_TOKENS) - st.prev_out - 1 + st.g0

    def start_phase(self, now: float) -> None:
        """Every client of the closed loop sends at once (or spread by ``loop_spread``)."""
        first = [self.pending.popleft() for _ in range(min(self.closed, len(self.pending)))]
        for r, offset in zip(first, first_send_offsets_ms(self.sim, first)):
            r.arrival_ms = now + offset
            self.send(r)

    def finish(self, st: ReqState) -> None:
        st.finish_ms = self.now
        self.res.requests.append(st)
        if self.closed is not None and self.pending:
            released = False
            if self.warm_left and st.req.warmup:
                self.warm_left -= 1
                if not self.warm_left:  # the warm-up phase has drained: all clients send
                    self.start_phase(self.now)
                    released = True
            # While warm-up requests are out, the measured phase does not start.
            if not released and self.pending and not (self.warm_left
                                                      and not self.pending[0].warmup):
                nxt = self.pending.popleft()
                nxt.arrival_ms = self.now
                self.send(nxt)
        if self.progress is not None:
            self.progress(len(self.res.requests), self.total)

    def pop_finished(self) -> None:
        while self.heap and self.heap[0][0] <= self.G:
            _, rid, run = heapq.heappop(self.heap)
            st = self.decoders.get(rid)
            if st is None or st.run != run:
                continue  # retracted since
            self.leave(st)
            self.finish(st)

    def add_itl(self, first_end_ms: float, rest_ms: float, k: int) -> None:
        """Every decoder emits a token at each of ``k`` steps, the first ending at
        ``first_end_ms`` and the others ``rest_ms`` apart: the first step's gap runs from each
        decoder's previous token (prefill steps it waited through included), the others are
        ``rest_ms``. Only measured requests' gaps are recorded."""
        res = self.res
        gaps: dict[float, int] = {}
        if self.settled:
            gaps[first_end_ms - self.last_end] = self.settled
        for st in self.fresh.values():
            if st.measured:
                gap = first_end_ms - st.last_tok_ms
                gaps[gap] = gaps.get(gap, 0) + 1
        for value, weight in gaps.items():
            res.itl_ms.append(value)
            res.itl_weight.append(weight)
        if k > 1 and self.measured_decoders:
            res.itl_ms.append(rest_ms)
            res.itl_weight.append(self.measured_decoders * (k - 1))
        self.fresh.clear()
        self.settled = self.measured_decoders
        self.last_end = first_end_ms + (k - 1) * rest_ms

    # -- scheduling ----------------------------------------------------------------------------

    def take_prefill(self, budget: int) -> list[tuple[ReqState, int]]:
        chunks: list[tuple[ReqState, int]] = []
        for st in self.prefilling:
            if budget <= 0:
                break
            if st.ready_ms > self.now:
                continue
            n = min(budget, st.target - st.done)
            chunks.append((st, n))
            budget -= n
        sim = self.sim
        while self.waiting and budget > 0:
            st = self.waiting[0]
            if len(self.decoders) + len(self.prefilling) >= sim.max_running:
                break
            reserve = (self.ratio * max(0, min(st.req.output_len, CLIP_MAX_NEW_TOKENS)
                                        - st.prev_out) if self.server.reserve_output else 0)
            busy = bool(self.decoders or self.prefilling)
            if busy and self.kv_used() + st.target + self.reserved() + reserve > sim.pool:
                break
            if st.target > sim.pool:
                break  # never fits; idle() reports it once nothing else can run
            self.waiting.popleft()
            self.admit(st)
            self.prefilling.append(st)
            if st.ready_ms > self.now:
                continue
            n = min(budget, st.target - st.done)
            chunks.append((st, n))
            budget -= n
        return chunks

    def admit(self, st: ReqState) -> None:
        sim, cache = self.sim, self.sim.cache
        self.admitted += 1
        st.admit_seq = self.admitted
        self.prefill_kv += st.target
        if sim._dynamic_gpu:
            cache.shrink_gpu((sim.pool - self.kv_used()) // sim.block_tokens, self.now)
        chain = st.req.hash_ids
        if not st.matched:
            st.matched = True
            m = cache.match(chain)
            st.hits = (m.gpu, m.dram, m.ssd)
            st.ready_ms = cache.load(self.now, m)
            cache.admit(self.now, chain, m)
            # At least the last prompt token is always computed (it yields the first logits).
            st.cached_tokens = min(m.blocks * sim.block_tokens, st.req.input_len - 1)
            st.done = st.cached_tokens
        else:
            st.done = 0  # a retracted request recomputes its prompt and output so far

    def retract(self) -> None:
        """Free KV until every decoding request can write one more token."""
        sglang = self.server.backend == "sglang"
        order = sorted(self.decoders.values(),
                       key=(lambda s: (-(s.prev_out + self.G - s.g0), s.req.input_len))
                       if sglang else (lambda s: s.admit_seq))
        while order and self.kv_used() + len(self.decoders) > self.sim.pool:
            st = order.pop()
            self.leave(st)
            st.prev_out += 1 + self.G - st.g0
            st.target = st.req.input_len + st.prev_out
            st.run += 1
            self.waiting.appendleft(st)
            self.res.retractions += 1
        if sglang:
            self.ratio = INIT_NEW_TOKEN_RATIO

    def prefill_step(self, chunks: list[tuple[ReqState, int]]) -> None:
        sim = self.sim
        shapes = [(n, st.done) for st, n in chunks]
        mixed = self.server.mixed_chunk and self.decoders
        b = len(self.decoders) if mixed else 0
        kv = (self.kv_used() - self.prefill_kv) / b if b else 0.0
        t = sim.step_wall_ms(shapes, b, kv)
        self.now += t
        self.res.steps += 1
        if mixed:
            self.add_itl(self.now, 0.0, 1)
            self.G += 1
            self.pop_finished()
        for st, n in chunks:
            st.done += n
            if st.done >= st.target:
                self.prefilling.remove(st)
                self.join(st)

    def decode_run(self) -> None:
        n = len(self.decoders)
        free = self.sim.pool - self.kv_used()
        if free < n:
            self.retract()
            return
        k = min(self.heap[0][0] - self.G if self.heap else 1, free // n)
        if self.waiting or self.prefilling:
            k = min(k, BLOCKED_RECHECK_STEPS)
        kv0 = (self.kv_used() - self.prefill_kv) / n
        t0 = self.sim.step_wall_ms((), n, kv0)
        if self.arrivals and not self.waiting:
            k = min(k, max(1, math.ceil((self.arrivals[0][0] - self.now) / t0)))
        k = max(k, 1)
        t1 = self.sim.step_wall_ms((), n, kv0 + k - 1) if k > 1 else t0
        self.add_itl(self.now + t0, (t0 + t1) / 2, k)
        self.now += t0 + (k - 1) * (t0 + t1) / 2
        self.res.steps += k
        self.G += k
        if self.server.reserve_output:
            decay = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / NEW_TOKEN_RATIO_DECAY_STEPS
            self.ratio = max(MIN_NEW_TOKEN_RATIO, self.ratio - decay * k)
        self.pop_finished()

    def idle(self) -> None:
        times = [st.ready_ms for st in self.prefilling if st.ready_ms > self.now]
        if self.arrivals:
            times.append(self.arrivals[0][0])
        if not times:
            st = self.waiting[0]
            raise CapacityModelError(
                f"request {st.req.rid} ({st.target} tokens) cannot fit in the KV pool of "
                f"{self.sim.pool} tokens")
        self.now = max(self.now, min(times))

    def go(self) -> SimResult:
        budget = self.server.chunked_prefill_size
        while len(self.res.requests) < self.total:
            self.arrive()
            chunk_budget = budget
            if self.server.mixed_chunk:
                chunk_budget -= len(self.decoders)
            chunks = self.take_prefill(max(chunk_budget, 1)) if (
                self.waiting or self.prefilling) else []
            if chunks:
                self.prefill_step(chunks)
            elif self.decoders:
                self.decode_run()
            else:
                self.idle()
        res = self.res
        res.hit_rates = self.sim.cache.hit_rates()
        res.bytes_per_link = self.sim.cache.bytes_per_link()
        return res
