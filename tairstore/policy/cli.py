"""``tairstore optimize``: replay a trace over policies and sizes, print hit rates and ROI."""

from __future__ import annotations

import argparse
import sys

from tairstore.policy.traces import FORMATS, MOONCAKE_BLOCK_TOKENS, load_trace

__all__ = ["add_parser", "cmd_optimize"]

#: Block size assumed when none is given: one 512-token block of the KV cache of an 8B model
#: in fp16 (32 layers x 8 KV heads x head dim 128 x K and V x 2 bytes per token): 64 MiB.
DEFAULT_BLOCK_BYTES = 512 * 32 * 8 * 128 * 2 * 2


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``optimize`` subcommand on ``sub``."""
    o = sub.add_parser(
        "optimize", help="replay a block trace to choose cache sizes and eviction policy",
        description="Replay a trace through the store's eviction policies at several capacities "
                    "(see docs/OPTIMIZER.md).")
    o.add_argument("--trace", required=True, help="trace file (or access log)")
    o.add_argument("--format", default="mooncake", choices=sorted(FORMATS))
    o.add_argument("--policies", default="lru,leaf_lru,s3fifo")
    o.add_argument("--capacities", default="1k,4k,16k,64k",
                   help="DRAM sizes: blocks (16k = 16384) or bytes (64GiB)")
    o.add_argument("--ssd", default="0", help="SSD sizes, same units; 0 for no SSD tier")
    o.add_argument("--no-promote", action="store_true",
                   help="serve SSD hits from SSD instead of promoting them to DRAM")
    o.add_argument("--block-bytes", type=int, default=DEFAULT_BLOCK_BYTES,
                   help=f"bytes per block (default {DEFAULT_BLOCK_BYTES})")
    o.add_argument("--block-tokens", type=int, default=MOONCAKE_BLOCK_TOKENS)
    o.add_argument("--output", help="write one CSV row per configuration and group")
    o.add_argument("--groups", action="store_true", help="print the per-namespace rows too")
    o.add_argument("--price", help="dram=..,ssd=..,gpu_hour=.. (per GiB-hour, per GPU-hour)")
    o.add_argument("--prefill-tokens-per-s", type=float, default=None,
                   help="prefill throughput per GPU for --price")
    o.add_argument("--hisim", metavar="MODEL:GPU[:TP]",
                   help="with --price: savings and TTFT from HiSim's step model (e.g. qwen3-8b:h100)")
    o.add_argument("--plot", metavar="DIR", help="write hit_rate.png (and pareto.png) to DIR")
    o.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    o.set_defaults(func=cmd_optimize)


def cmd_optimize(args: argparse.Namespace) -> int:
    """Run ``tairstore optimize``; bad input raises a StoreError (main prints it, exit 2)."""
    from tairstore.policy import optimize, roi

    bb = args.block_bytes
    grid = optimize.Grid(
        policies=optimize.parse_policies(args.policies),
        capacities=[optimize.parse_capacity(c, bb) for c in args.capacities.split(",")],
        ssd_capacities=[optimize.parse_capacity(c, bb) for c in args.ssd.split(",")],
        promote=not args.no_promote,
    )
    grid.check()
    prices = roi.parse_prices(args.price) if args.price else None
    prefill_time = roi.hisim_prefill(args.hisim) if args.hisim and prices else None
    trace = load_trace(args.trace, args.format, args.block_tokens)
    rows = optimize.run_grid(trace, grid, args.workers)
    print(f"{len(trace)} requests, {trace.accesses} block accesses, "
          f"{len(trace.group_names)} group(s)")
    print(optimize.format_table(rows, args.groups))
    if args.output:
        optimize.write_csv(args.output, rows, bb)
        print(f"wrote {args.output}")
    rois = None
    if prices is not None:
        kw = {}
        if args.prefill_tokens_per_s:
            kw["prefill_tokens_per_s"] = args.prefill_tokens_per_s
        rois = roi.evaluate(rows, prices, bb, trace.duration_s, prefill_time=prefill_time,
                            requests=len(trace), **kw)
        print(roi.format_roi(rois))
    if args.plot:
        for p in roi.plot(rows, rois, args.plot):
            print(f"wrote {p}")
    sys.stdout.flush()
    return 0
