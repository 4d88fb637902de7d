"""``tairstore sim run`` and ``tairstore sim sweep``: serving simulations from the command line.

``run`` simulates one deployment under one workload and writes ``D/metrics.json`` (SGLang
``bench_serving`` key names) and ``D/requests.jsonl``, shows a progress bar and a summary table,
and with ``--plot DIR`` writes PNGs. The workload is a trace (``--trace``, Mooncake JSONL or Azure
CSV), a synthetic ShareGPT-like set (``--synthetic N``), or a closed loop (``--concurrency`` with
``--isl``/``--osl``). ``sweep`` runs every combination of ``--gpus``, ``--tps``, ``--dram-caches``
and ``--request-rates`` and writes ``sweep.csv`` and ``pareto.png`` (cost against SLO attainment).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from tairstore.errors import InvalidArgumentError

from .cache import CacheConfig
from .engine import Simulator
from .hardware import DEFAULT_REGISTRY, UnknownGPUError
from .metrics import summarize, tpot_ms, ttft_ms, write_outputs
from .models import UnknownModelError, get_model
from .scheduler import BACKENDS, default_config
from .workload import BLOCK_TOKENS, closed_loop, load_azure, load_mooncake, synthetic

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp8": "fp8", "fp8_block": "fp8_block"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SUMMARY_KEYS = ("completed", "duration", "request_throughput", "input_throughput",
                "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
                "mean_e2e_latency_ms", "concurrency", "cached_token_ratio")


def parse_size(text: str) -> int:
    """``64GiB``, ``2TiB``, ``500GB``, ``0`` -> bytes.

    Raises:
        InvalidArgumentError: not a number with an optional unit.
    """
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise InvalidArgumentError(f"size {text!r} is not a number with a unit like GiB or TB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _common(p: argparse.ArgumentParser, sweep: bool) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="sglang")
    p.add_argument("--model", required=True, help="built-in model name or config.json path")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="GEMM weight dtype")
    p.add_argument("--kv-dtype", choices=("bfloat16", "fp8"), help="KV-cache dtype")
    if not sweep:
        p.add_argument("--gpu", required=True, help="GPU profile (h100, h200, h20...)")
        p.add_argument("--tp", type=int, default=1)
        p.add_argument("--dram-cache", default="0", help="host DRAM (L2) cache size, e.g. 64GiB")
        p.add_argument("--request-rate", type=float, default=math.inf,
                       help="requests/s for --synthetic (default: all at once)")
    p.add_argument("--ssd-cache", default="0", help="storage (L3) cache size, e.g. 2TiB")
    p.add_argument("--gpu-cache-blocks", type=int,
                   help="fixed GPU prefix-cache size in blocks (default: the free KV pool)")
    p.add_argument("--policy", default="leaf_lru", help="GPU cache eviction policy")
    p.add_argument("--lower-policy", default="lru", help="DRAM and SSD eviction policy")
    p.add_argument("--write-policy", choices=("write_through", "write_back"),
                   default="write_through")
    p.add_argument("--trace", help="Mooncake JSONL or Azure CSV trace")
    p.add_argument("--limit", type=int, help="use only the first N trace requests")
    p.add_argument("--speedup", type=float, default=1.0, help="divide arrival times by this")
    p.add_argument("--synthetic", type=int, metavar="N", help="N ShareGPT-like requests")
    p.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, help="closed loop with this many clients")
    p.add_argument("--isl", type=int, help="closed loop: prompt tokens")
    p.add_argument("--osl", type=int, help="closed loop: output tokens")
    p.add_argument("--num-prompts", type=int, help="closed loop: measured requests")
    p.add_argument("--warmup", type=int, help="closed loop: warm-up requests (2 x concurrency)")
    p.add_argument("--loop-spread", type=float,
                   help="closed loop: start window, in prefill times per client (default: the "
                        "backend's fit)")
    p.add_argument("--loop-jitter", type=float,
                   help="closed loop: output lengths uniform on osl x [1 - j, 1 + j] (default: "
                        "the backend's fit; 0: exactly osl)")
    p.add_argument("--max-running-requests", type=int)
    p.add_argument("--chunked-prefill-size", type=int)
    p.add_argument("--cuda-graph-max-bs", type=int)
    p.add_argument("--disable-overlap", action="store_true", help="no overlap scheduler")
    p.add_argument("--output-dir", required=True, type=Path)


def add_serving_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``run`` and ``sweep`` under the ``sim`` sub-command."""
    run = sub.add_parser("run", help="simulate serving a workload")
    _common(run, sweep=False)
    run.add_argument("--plot", type=Path, metavar="DIR", help="write PNG plots into DIR")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=run_serving)
    sw = sub.add_parser("sweep", help="simulate a grid of deployments; CSV and Pareto plot")
    _common(sw, sweep=True)
    sw.add_argument("--gpus", default="h100", help="comma-separated GPU profiles")
    sw.add_argument("--tps", default="1", help="comma-separated TP degrees")
    sw.add_argument("--dram-caches", default="0", help="comma-separated DRAM cache sizes")
    sw.add_argument("--request-rates", default="inf", help="comma-separated requests/s")
    sw.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    sw.add_argument("--slo-tpot-ms", type=float, default=50.0)
    sw.set_defaults(func=run_sweep)


def _workload(args: argparse.Namespace, rate: float) -> Any:
    if args.trace:
        if args.trace.endswith(".csv"):
            reqs = load_azure(args.trace, args.speedup, args.limit)
        else:
            reqs = load_mooncake(args.trace, args.speedup, args.limit)
        return reqs
    if args.concurrency:
        if not (args.isl and args.osl):
            raise InvalidArgumentError("a closed loop (--concurrency) needs --isl and --osl")
        return closed_loop(args.concurrency, args.isl, args.osl, args.num_prompts, args.warmup)
    if args.synthetic:
        reqs = synthetic(args.synthetic, rate, args.arrival, args.seed)
        for r in reqs:
            r.arrival_ms /= args.speedup
        return reqs
    raise InvalidArgumentError("give a workload: --trace, --synthetic N or --concurrency")


def _simulator(args: argparse.Namespace, gpu_name: str, tp: int, dram: str) -> Simulator:
    gpu = DEFAULT_REGISTRY.get(gpu_name)
    model = get_model(args.model).with_dtypes(DTYPES.get(args.dtype or ""), args.kv_dtype)
    overrides = {k: v for k, v in (("max_running_requests", args.max_running_requests),
                                   ("chunked_prefill_size", args.chunked_prefill_size),
                                   ("cuda_graph_max_bs", args.cuda_graph_max_bs)) if v}
    for name in ("loop_spread", "loop_jitter"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.disable_overlap:
        overrides["overlap"] = False
    server = default_config(args.backend, tp, **overrides)
    block_bytes = model.kv_bytes_per_token * BLOCK_TOKENS
    cache = CacheConfig(gpu_blocks=args.gpu_cache_blocks,
                        dram_blocks=parse_size(dram) // block_bytes,
                        ssd_blocks=parse_size(args.ssd_cache) // block_bytes,
                        gpu_policy=args.policy, dram_policy=args.lower_policy,
                        ssd_policy=args.lower_policy, write_policy=args.write_policy)
    return Simulator(model, gpu, tp, server, cache)


def _fail(exc: Exception) -> int:
    print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
    return 2


def run_serving(args: argparse.Namespace) -> int:
    """``sim run``: simulate, write metrics.json and requests.jsonl, print a summary."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    try:
        sim = _simulator(args, args.gpu, args.tp, args.dram_cache)
        workload = _workload(args, args.request_rate)
        t0 = time.perf_counter()
        with Progress(disable=args.no_progress, transient=True) as bar:
            task = bar.add_task("simulating", total=None)

            def progress(done: int, total: int) -> None:
                if done % 64 == 0 or done == total:
                    bar.update(task, completed=done, total=total)

            res = sim.run(workload, progress)
        wall = time.perf_counter() - t0
    except (UnknownGPUError, UnknownModelError, InvalidArgumentError, OSError) as exc:
        return _fail(exc)
    metrics = summarize(res)
    metrics["sim_wall_s"] = wall
    metrics["simulated_requests_per_s"] = len(res.requests) / max(wall, 1e-9)
    write_outputs(res, metrics, args.output_dir)
    table = Table(title=f"{sim.model.name} on {args.tp} x {sim.gpu.name} ({args.backend})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in SUMMARY_KEYS:
        table.add_row(key, f"{metrics[key]:,.3f}" if isinstance(metrics[key], float)
                      else str(metrics[key]))
    for level, rate in metrics["cache_hit_rate"].items():
        table.add_row(f"hit rate {level}", f"{100 * rate:.1f}%")
    for link, n in metrics["bytes_per_link"].items():
        table.add_row(f"bytes {link}", f"{n / 1e9:,.2f} GB")
    table.add_row("simulated requests/s", f"{metrics['simulated_requests_per_s']:,.0f}")
    Console().print(table)
    if args.plot:
        from .plots import plot_run

        plot_run(res, metrics, args.plot)
    return 0


def _slo_attainment(res: Any, ttft_slo: float, tpot_slo: float) -> float:
    done = [st for st in res.requests if st.measured]
    ok = sum(1 for st in done if ttft_ms(st) <= ttft_slo
             and (tpot_ms(st) or 0.0) <= tpot_slo)
    return ok / len(done) if done else 0.0


def run_sweep(args: argparse.Namespace) -> int:
    """``sim sweep``: every grid point, one CSV row each, and the Pareto plot."""
    rows: list[dict[str, Any]] = []
    try:
        grid = list(itertools.product(args.gpus.split(","), [int(t) for t in args.tps.split(",")],
                                      args.dram_caches.split(","),
                                      [float(r) for r in args.request_rates.split(",")]))
        for gpu, tp, dram, rate in grid:
            sim = _simulator(args, gpu, tp, dram)
            res = sim.run(_workload(args, rate))
            m = summarize(res)
            rows.append({"gpu": sim.gpu.name, "tp": tp, "dram_cache": dram, "request_rate": rate,
                         "mean_ttft_ms": m["mean_ttft_ms"], "mean_tpot_ms": m["mean_tpot_ms"],
                         "p99_ttft_ms": m["p99_ttft_ms"], "p99_tpot_ms": m["p99_tpot_ms"],
                         "request_throughput": m["request_throughput"],
                         "output_throughput": m["output_throughput"],
                         "gpu_seconds_per_request": tp / max(m["request_throughput"], 1e-9),
                         "slo_attainment": _slo_attainment(res, args.slo_ttft_ms,
                                                           args.slo_tpot_ms)})
            print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in rows[-1].items()))
    except (UnknownGPUError, UnknownModelError, InvalidArgumentError, OSError,
            ValueError) as exc:
        return _fail(exc)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with open(args.output_dir / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    from .plots import plot_pareto

    plot_pareto(rows, args.output_dir / "pareto.png")
    return 0

