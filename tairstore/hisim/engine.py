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
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from tairstore.errors import InvalidArgumentError

from .cache import CacheConfig, HierCache
from .hardware import GPU
from .latency import PrefillChunk, Step, StepLatencyModel
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
            t = self.step_model.predict(step)
            ms = self._memo[key] = t.step_ms - t.breakdown.get("scheduler", 0.0)
        if graph is None:
            ms += self.server.overhead.eager_per_layer_ms * self.model.num_layers
        return ms

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


def _grid(x: float) -> int:
    return int(round(math.log2(max(x, 1.0)) * GRID_PER_OCTAVE))


def _ungrid(i: int) -> int:
    return max(1, int(round(2 ** (i / GRID_PER_OCTAVE))))


class _Run:
    """The state of one simulation (kept apart so a Simulator can run many workloads)."""

    def __init__(self, sim: Simulator, workload: Sequence[Request] | ClosedLoop,
                 progress: Callable[[int, int], None] | None) -> None:
        self.sim, self.server, self.progress = sim, sim.server, progress
        if isinstance(workload, ClosedLoop):
            self.closed = workload.concurrency
            self.pending = deque(workload.requests)
            self.arrivals: deque[Request] = deque()
            for _ in range(min(self.closed, len(self.pending))):
                self.arrivals.append(self.pending.popleft())
        else:
            self.closed = None
            self.pending = deque()
            self.arrivals = deque(sorted(workload, key=lambda r: r.arrival_ms))
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
        self.stall = 0.0  # prefill time decoders have waited through since their last token
        self.stalled = 0  # measured decoders that waited through all of it
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

    def arrive(self) -> None:
        while self.arrivals and self.arrivals[0].arrival_ms <= self.now:
            r = self.arrivals.popleft()
            self.waiting.append(ReqState(r, r.input_len))

    def join(self, st: ReqState) -> None:
        """A request finished its prefill: its first (or next) token is out."""
        if st.first_ms < 0:
            st.first_ms = self.now
        self.prefill_kv -= st.target
        if st.prev_out + 1 >= st.req.output_len:
            self.finish(st)
            return
        st.g0 = self.G
        self.decoders[st.req.rid] = st
        self.measured_decoders += st.measured
        self.S += st.target + 1 - st.g0
        self.R += min(st.req.output_len, CLIP_MAX_NEW_TOKENS) - st.prev_out - 1 + st.g0
        fin = st.g0 + st.req.output_len - st.prev_out - 1
        heapq.heappush(self.heap, (fin, st.req.rid, st.run))

    def leave(self, st: ReqState) -> None:
        del self.decoders[st.req.rid]
        self.measured_decoders -= st.measured
        self.S -= st.target + 1 - st.g0
        self.R -= min(st.req.output_len, CLIP_MAX_NEW_TOKENS) - st.prev_out - 1 + st.g0

    def finish(self, st: ReqState) -> None:
        st.finish_ms = self.now
        self.res.requests.append(st)
        if self.closed is not None and self.pending:
            nxt = self.pending.popleft()
            nxt.arrival_ms = self.now
            self.arrivals.append(nxt)
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

    def add_itl(self, first_ms: float, rest_ms: float, k: int) -> None:
        """ITL samples of ``k`` steps: the first one's gap includes any prefill stall, for the
        decoders that waited through it."""
        m, res = self.measured_decoders, self.res
        stalled = min(self.stalled, m) if self.stall else 0
        for value, weight in ((first_ms + self.stall, stalled), (first_ms, m - stalled),
                              (rest_ms, m * (k - 1))):
            if weight > 0:
                res.itl_ms.append(value)
                res.itl_weight.append(weight)
        self.stall = 0.0

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
            self.add_itl(t, 0.0, 1)
            self.G += 1
            self.pop_finished()
        else:
            if not self.stall:
                self.stalled = self.measured_decoders
            self.stall += t
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
            k = min(k, max(1, math.ceil((self.arrivals[0].arrival_ms - self.now) / t0)))
        k = max(k, 1)
        t1 = self.sim.step_wall_ms((), n, kv0 + k - 1) if k > 1 else t0
        self.add_itl(t0, (t0 + t1) / 2, k)
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
            times.append(self.arrivals[0].arrival_ms)
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
