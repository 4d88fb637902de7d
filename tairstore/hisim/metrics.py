"""Serving metrics as SGLang's ``bench_serving`` defines them, and the run's output files.

Per measured (not warm-up) request: TTFT is first token minus arrival; E2E is completion minus
arrival; TPOT is ``(E2E - TTFT) / (output tokens - 1)`` for requests with more than one output
token; ITL is every gap between consecutive tokens of a request, pooled over requests (the
simulator hands them over as weighted step durations). Throughputs divide by the benchmark
duration, from the first measured arrival to the last measured completion; ``concurrency`` is the
sum of E2E latencies over the duration (bench_serving's mean number of requests in flight).
Percentiles are numpy's linear ones, as bench_serving computes them.

Key names are bench_serving's (``mean_ttft_ms``, ``median_tpot_ms``, ``p99_itl_ms``,
``request_throughput``...), plus the simulator's own: hit rate per cache level, bytes per link.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .engine import ReqState, SimResult

PERCENTILES = (90, 99)


def _stats(name: str, values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        values = np.zeros(1)
    out = {f"mean_{name}_ms": float(values.mean()), f"median_{name}_ms": float(np.median(values)),
           f"std_{name}_ms": float(values.std())}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(values, p))
    return out


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The ``q``-th percentile of ``values`` each repeated ``weights`` times."""
    if values.size == 0:
        return 0.0
    order = np.argsort(values)
    v, cum = values[order], np.cumsum(weights[order])
    return float(v[min(np.searchsorted(cum, q / 100 * cum[-1]), len(v) - 1)])


def ttft_ms(st: ReqState) -> float:
    """Time to first token of a request."""
    return st.first_ms - st.req.arrival_ms


def e2e_ms(st: ReqState) -> float:
    """End-to-end latency of a request."""
    return st.finish_ms - st.req.arrival_ms


def tpot_ms(st: ReqState) -> float | None:
    """Time per output token after the first; None for one-token outputs."""
    if st.req.output_len <= 1:
        return None
    return (e2e_ms(st) - ttft_ms(st)) / (st.req.output_len - 1)


def summarize(res: SimResult) -> dict[str, Any]:
    """bench_serving's metrics of the measured requests, plus cache and link statistics."""
    done = [st for st in res.requests if st.measured]
    ttft = np.array([ttft_ms(st) for st in done])
    e2e = np.array([e2e_ms(st) for st in done])
    tpot = np.array([t for t in (tpot_ms(st) for st in done) if t is not None])
    start = min((st.req.arrival_ms for st in done), default=0.0)
    end = max((st.finish_ms for st in done), default=0.0)
    duration_s = max(end - start, 1e-9) / 1e3
    total_in = sum(st.req.input_len for st in done)
    total_out = sum(st.req.output_len for st in done)
    out: dict[str, Any] = {
        "completed": len(done),
        "duration": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration_s,
        "input_throughput": total_in / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    out.update(_stats("ttft", ttft))
    out.update(_stats("tpot", tpot))
    itl = np.array(res.itl_ms, dtype=float)
    w = np.array(res.itl_weight, dtype=float)
    total_w = w.sum()
    out["mean_itl_ms"] = float((itl * w).sum() / total_w) if total_w else 0.0
    out["median_itl_ms"] = weighted_percentile(itl, w, 50)
    out["std_itl_ms"] = (float(np.sqrt(((itl - out["mean_itl_ms"]) ** 2 * w).sum() / total_w))
                         if total_w else 0.0)
    for p in (*PERCENTILES, 95):
        out[f"p{p}_itl_ms"] = weighted_percentile(itl, w, p)
    out["max_itl_ms"] = float(itl.max()) if itl.size else 0.0
    out.update(_stats("e2e_latency", e2e))
    out["concurrency"] = float(e2e.sum() / 1e3 / duration_s)
    if res.concurrency is not None:
        out["max_concurrency"] = res.concurrency
    cached = sum(st.cached_tokens for st in done)
    out["cache_hit_rate"] = {k: float(v) for k, v in res.hit_rates.items()}
    out["cached_token_ratio"] = cached / total_in if total_in else 0.0
    out["bytes_per_link"] = dict(res.bytes_per_link)
    out["kv_pool_tokens"] = res.kv_pool_tokens
    out["retractions"] = res.retractions
    out["steps"] = res.steps
    return out


def request_record(st: ReqState) -> dict[str, Any]:
    """One line of ``requests.jsonl``."""
    tpot = tpot_ms(st)
    return {"id": st.req.rid, "arrival_ms": round(st.req.arrival_ms, 3),
            "input_len": st.req.input_len, "output_len": st.req.output_len,
            "cached_tokens": st.cached_tokens,
            "hit_blocks": dict(zip(("gpu", "dram", "ssd"), st.hits)),
            "ttft_ms": round(ttft_ms(st), 3), "tpot_ms": None if tpot is None else round(tpot, 4),
            "e2e_ms": round(e2e_ms(st), 3), "warmup": st.req.warmup}


def write_outputs(res: SimResult, metrics: dict[str, Any], out_dir: Path | str) -> None:
    """Write ``metrics.json`` and ``requests.jsonl`` (finish order) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / "requests.jsonl", "w", encoding="utf-8") as f:
        for st in res.requests:
            f.write(json.dumps(request_record(st)) + "\n")
