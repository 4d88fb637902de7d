"""Serving workloads for the simulator: what arrives, when, and which prefix blocks it shares.

A workload is a list of :class:`Request` in arrival order (open loop) or a :class:`ClosedLoop`
description (a fixed number of clients, each sending its next request as soon as the previous one
finished). Every request carries its prompt as a chain of block keys (``hash_ids``), one per
``block_tokens`` prompt tokens: equal keys are equal prefix blocks, as in the Mooncake trace
format, and the prefix cache matches on them.

Sources:

- :func:`load_mooncake` -- Mooncake-format JSONL (``timestamp`` ms, ``input_length``,
  ``output_length``, ``hash_ids``, one id per 512-token block);
- :func:`load_azure` -- Azure LLM inference trace CSV (``TIMESTAMP``, ``ContextTokens``,
  ``GeneratedTokens``); no prefix information, so every block is unique;
- :func:`synthetic` -- ShareGPT-like lengths (log-normal) with shared system-prompt prefixes
  and Poisson or fixed-rate arrivals;
- :func:`random_prompts` -- prompts of exactly ISL tokens and exactly OSL outputs, no sharing
  (the closed-loop benchmark convention of the silicon rows).

``speedup`` divides every arrival time (2.0 replays a trace twice as fast).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable

import numpy as np

from tairstore.errors import InvalidArgumentError

#: Tokens per prefix block in the Mooncake traces (and the default block everywhere here).
BLOCK_TOKENS = 512
# Closed-loop convention of the silicon rows (AIConfigurator's benchmark templates): about
# 10 x concurrency measured requests after 2 x concurrency unmeasured warm-up requests.
WARMUP_PER_CLIENT = 2
MEASURED_PER_CLIENT = 10


@dataclass
class Request:
    """One request: arrival time (ms), prompt and output lengths, prompt block keys."""

    rid: int
    arrival_ms: float
    input_len: int
    output_len: int
    hash_ids: tuple = ()
    warmup: bool = False

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise InvalidArgumentError(
                f"request {self.rid}: input and output lengths must be >= 1, "
                f"got {self.input_len}, {self.output_len}")


@dataclass
class ClosedLoop:
    """``concurrency`` clients, each sending its next request when the last one finished.

    ``requests`` are handed out in order; those flagged ``warmup`` are simulated but excluded
    from the metrics. With ``barrier`` (the benchmark clients' convention: AIPerf runs its
    warm-up phase to completion before its profiling phase starts), no measured request is sent
    until every warm-up request has finished; then all clients send at once, as at the start.
    """

    concurrency: int
    requests: list[Request] = field(default_factory=list)
    barrier: bool = True

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise InvalidArgumentError(f"concurrency must be >= 1, got {self.concurrency}")


def _blocks(n_tokens: int, block_tokens: int) -> int:
    return max(1, math.ceil(n_tokens / block_tokens))


def _check_speedup(speedup: float) -> None:
    if not speedup > 0:
        raise InvalidArgumentError(f"speedup must be > 0, got {speedup}")


def load_mooncake(path: str | Path, speedup: float = 1.0, limit: int | None = None
                  ) -> list[Request]:
    """Requests of a Mooncake-format JSONL trace, arrival times divided by ``speedup``.

    Raises:
        InvalidArgumentError: a line is not a JSON object with the four fields.
    """
    _check_speedup(speedup)
    out: list[Request] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append(Request(len(out), float(row["timestamp"]) / speedup,
                                   int(row["input_length"]), int(row["output_length"]),
                                   tuple(row["hash_ids"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidArgumentError(f"{path}:{lineno}: not a Mooncake trace line "
                                           f"({exc})") from None
    return out


def load_azure(path: str | Path, speedup: float = 1.0, limit: int | None = None,
               block_tokens: int = BLOCK_TOKENS) -> list[Request]:
    """Requests of an Azure LLM inference trace CSV; time 0 is the first request.

    Raises:
        InvalidArgumentError: a missing column or an unparsable row.
    """
    _check_speedup(speedup)
    out: list[Request] = []
    keys = itertools.count()
    t0 = None
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.DictReader(f), 2):
            if limit is not None and len(out) >= limit:
                break
            try:
                # Seven fractional digits: more than datetime parses, so cut to microseconds.
                stamp = row["TIMESTAMP"].strip()
                head, _, frac = stamp.partition(".")
                t = datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}").timestamp() * 1e3
                isl, osl = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (KeyError, ValueError) as exc:
                raise InvalidArgumentError(f"{path}:{lineno}: not an Azure trace row "
                                           f"({exc})") from None
            t0 = t if t0 is None else t0
            chain = tuple(next(keys) for _ in range(_blocks(isl, block_tokens)))
            out.append(Request(len(out), (t - t0) / speedup, isl, max(1, osl), chain))
    return out


def arrival_times(n: int, rate: float, process: str = "poisson", seed: int = 0) -> np.ndarray:
    """``n`` arrival times in ms at ``rate`` requests/s: ``poisson`` or ``fixed`` spacing.

    ``rate`` = inf sends everything at time 0 (bench_serving's default).
    """
    if n < 0 or not rate > 0:
        raise InvalidArgumentError(f"need n >= 0 and rate > 0, got {n}, {rate}")
    if math.isinf(rate):
        return np.zeros(n)
    if process == "fixed":
        return np.arange(n) * (1e3 / rate)
    if process != "poisson":
        raise InvalidArgumentError(f"arrival process must be poisson or fixed, got {process!r}")
    gaps = np.random.default_rng(seed).exponential(1e3 / rate, n)
    return np.cumsum(gaps) - gaps[0]


def synthetic(n: int, rate: float = math.inf, process: str = "poisson", seed: int = 0,
              num_prefixes: int = 16, prefix_tokens: int = 2048, mean_input: int = 1024,
              mean_output: int = 256, block_tokens: int = BLOCK_TOKENS) -> list[Request]:
    """ShareGPT-like requests: a shared system prompt, then a log-normal private part.

    Each request starts with one of ``num_prefixes`` shared prefixes (Zipf-popular) of
    ``prefix_tokens`` tokens; its own prompt and output lengths are log-normal with the given
    means (sigma 1, about ShareGPT's spread), clipped to [1, 16 x mean].
    """
    if n < 0 or num_prefixes < 1 or min(mean_input, mean_output, block_tokens) < 1:
        raise InvalidArgumentError("synthetic workload needs n >= 0 and positive sizes")
    rng = np.random.default_rng(seed)
    times = arrival_times(n, rate, process, seed)
    weights = 1.0 / np.arange(1, num_prefixes + 1)
    groups = rng.choice(num_prefixes, size=n, p=weights / weights.sum())
    sigma = 1.0

    def lognormal(mean: float) -> np.ndarray:
        draws = rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, n)
        return np.clip(np.rint(draws), 1, 16 * mean).astype(int)

    own_in, outs = lognormal(mean_input), lognormal(mean_output)
    prefix_blocks = prefix_tokens // block_tokens
    keys = itertools.count(num_prefixes * prefix_blocks)
    out = []
    for i in range(n):
        shared = tuple(int(groups[i]) * prefix_blocks + b for b in range(prefix_blocks))
        isl = prefix_blocks * block_tokens + int(own_in[i])
        own = tuple(next(keys) for _ in range(_blocks(isl, block_tokens) - prefix_blocks))
        out.append(Request(i, float(times[i]), isl, int(outs[i]), shared + own))
    return out


def random_prompts(n: int, isl: int, osl: int, block_tokens: int = BLOCK_TOKENS,
                   warmup: int = 0) -> list[Request]:
    """``n`` requests of exactly ``isl`` prompt and ``osl`` output tokens, nothing shared.

    The first ``warmup`` of them are flagged as warm-up (simulated, not measured).
    """
    keys = itertools.count()
    nb = _blocks(isl, block_tokens)
    return [Request(i, 0.0, isl, osl, tuple(next(keys) for _ in range(nb)), warmup=i < warmup)
            for i in range(n)]


def closed_loop(concurrency: int, isl: int, osl: int, num_prompts: int | None = None,
                warmup: int | None = None, barrier: bool = True) -> ClosedLoop:
    """The silicon rows' closed loop: random prompts, warm-up requests first.

    Defaults follow the rows' convention: ``2 x concurrency`` warm-up requests and
    ``10 x concurrency`` measured ones, the measured phase starting once the warm-up phase has
    drained (``barrier``, see :class:`ClosedLoop`).
    """
    if warmup is None:
        warmup = WARMUP_PER_CLIENT * concurrency
    if num_prompts is None:
        num_prompts = MEASURED_PER_CLIENT * concurrency
    if num_prompts < 1 or warmup < 0:
        raise InvalidArgumentError(f"num_prompts must be >= 1 and warmup >= 0, got "
                                   f"{num_prompts}, {warmup}")
    return ClosedLoop(concurrency, random_prompts(warmup + num_prompts, isl, osl,
                                                  warmup=warmup), barrier)


def total_tokens(requests: Iterable[Request]) -> tuple[int, int]:
    """Total prompt and output tokens of ``requests``."""
    ins = outs = 0
    for r in requests:
        ins += r.input_len
        outs += r.output_len
    return ins, outs
