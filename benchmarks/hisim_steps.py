"""Step-level validation of the HiSim latency model.

1. Splitwise (``splitwise/perf_model.csv``): measured prompt (prefill) and token (decode) times of
   Llama-2-70B and BLOOM-176B on A100 and H100 at TP 2/4/8, next to HiSim's predictions.
2. InferSim (``infersim/bench_data``): H20 kernel benchmarks (FP8 GEMM, attention, grouped-GEMM
   MoE) next to HiSim's H20 predictions -- HiSim has no H20 table, so these test the scaled
   roofline path -- and Qwen3-8B decode steps composed of those kernels.

Usage: python benchmarks/hisim_steps.py [--data ../shared/data] [--rows]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tairstore.hisim import get_gpu, make_timer, step_model
from tairstore.hisim.validate import by_phase, infersim_rows, qwen3_8b_h20_step, splitwise_rows

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STEP_BATCHES = (16, 32, 64, 128, 256)
STEP_KV = (1024, 4096, 8192)


def _table(rows, show_rows: bool) -> None:
    if show_rows:
        print("| configuration | phase | measured ms | predicted ms | error % |")
        print("|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r.label} | {r.phase} | {r.measured_ms:.3f} | {r.predicted_ms:.3f} "
                  f"| {100 * r.error:+.1f} |")
        print()
    print("| phase | n | median abs % | p90 abs % | median signed % |")
    print("|---|---:|---:|---:|---:|")
    for phase, (med, p90, signed, n) in sorted(by_phase(rows).items()):
        print(f"| {phase} | {n} | {med:.1f} | {p90:.1f} | {signed:+.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rows", action="store_true", help="print every configuration")
    args = ap.parse_args(argv)
    splitwise = args.data / "splitwise" / "perf_model.csv"
    infersim = args.data / "infersim" / "bench_data"
    if not splitwise.exists() or not infersim.exists():
        print(f"validation data missing under {args.data}", file=sys.stderr)
        return 1

    rows = list(splitwise_rows(splitwise, step_model))
    for model in sorted({r.label.split()[0] for r in rows}):
        for hw in sorted({r.label.split()[1] for r in rows}):
            sub = [r for r in rows if r.label.startswith(f"{model} {hw} ")]
            if sub:
                print(f"\n## Splitwise: {model} on {hw} (predicted vs measured)\n")
                _table(sub, args.rows)

    timer = make_timer(get_gpu("h20"))
    print("\n## InferSim H20 kernels (HiSim: scaled from the H100/H200 tables)\n")
    _table(list(infersim_rows(infersim, timer)), args.rows)

    steps = [s for b in STEP_BATCHES for kv in STEP_KV
             if (s := qwen3_8b_h20_step(infersim, timer, b, kv)) is not None]
    print("\n## Qwen3-8B FP8 decode step on H20 from InferSim kernels "
          "(QKV + gate/up + down GEMMs + attention, 36 layers)\n")
    print("| batch x KV | measured ms | predicted ms | error % |")
    print("|---|---:|---:|---:|")
    for s in steps:
        print(f"| {s.label.split()[-2][1:]} x {s.label.split()[-1][2:]} | {s.measured_ms:.2f} "
              f"| {s.predicted_ms:.2f} | {100 * s.error:+.1f} |")
    _table(steps, False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
