"""HiSim serving simulator: end-to-end validation table and simulation speed.

Usage (from the repo root, the data at ../shared/data)::

    python benchmarks/hisim_serving.py            # validation on the test rows + speed
    python benchmarks/hisim_serving.py --quick    # shorter closed loops (1 + 3 waves)
    python benchmarks/hisim_serving.py --rows     # also every test row

Validation: the SGLang and vLLM rows of ``silicon_sample_dev.csv`` on H100 / H200 that the
simulator covers; only *test* rows (``crc32(id) % 4 != 0``) are reported, the overhead, vLLM's
scheduler settings and its kernel-efficiency factors having been fitted on the others
(``tairstore.hisim.serving_fit``). Speed: the whole Mooncake conversation
trace through the simulator, against the same trace through the bare eviction-policy replay
(:func:`tairstore.policy.replay.replay`) measured in the same run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from tairstore.hisim import get_gpu, get_model
from tairstore.hisim.engine import Simulator
from tairstore.hisim.metrics import summarize
from tairstore.hisim.scheduler import default_config
from tairstore.hisim.serving_fit import ape, load_rows, regime, simulate_row
from tairstore.hisim.workload import load_mooncake
from tairstore.policy import make_policy
from tairstore.policy.replay import replay

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SILICON = DATA / "aiconfigurator" / "silicon_sample_dev.csv"
TRACE = DATA / "traces" / "mooncake_conversation_trace.jsonl"


def validation(quick: bool, show_rows: bool) -> None:
    rows, skipped = load_rows(SILICON)
    test = [r for r in rows if not r.fit]
    print(f"covered rows: {len(rows)} ({len(rows) - len(test)} fit, {len(test)} test); skipped: "
          + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
    waves = (1, 3) if quick else (2, 10)
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    failed = 0
    for r in test:
        try:
            ttft, tpot = simulate_row(r, None, *waves)
        except ValueError as exc:
            failed += 1
            if show_rows:
                print(f"  {r.id}: {exc}")
            continue
        e = (ape(ttft, r.ttft_ms), ape(tpot, r.tpot_ms))
        reg = regime(r)
        for key in ((r.backend, reg), (r.backend, "all"), ("all", "all")):
            groups.setdefault(key, []).append(e)
        if show_rows:
            print(f"  {r.backend:6} {r.model:16} {r.system} tp{r.tp} {r.weight_dtype:9} "
                  f"{r.isl}x{r.osl} c{r.concurrency:<4} {reg:5} TTFT {ttft:8.1f}/{r.ttft_ms:8.1f}"
                  f"  TPOT {tpot:6.2f}/{r.tpot_ms:6.2f}")
    print(f"rows the simulator refused (weights do not fit): {failed}")
    print()
    print("| backend | regime | rows | TTFT median % | TTFT p90 % | TPOT median % | TPOT p90 % |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (backend, reg), errs in sorted(groups.items()):
        a = np.array(errs)
        print(f"| {backend} | {reg} | {len(a)} | {np.median(a[:, 0]):.1f} | "
              f"{np.percentile(a[:, 0], 90):.1f} | {np.median(a[:, 1]):.1f} | "
              f"{np.percentile(a[:, 1], 90):.1f} |")


def speed() -> None:
    reqs = load_mooncake(TRACE)
    sim = Simulator(get_model("qwen3-8b"), get_gpu("h200"), 8, default_config("sglang", 8))
    t0 = time.process_time()
    res = sim.run(reqs)
    sim_s = time.process_time() - t0
    m = summarize(res)
    chains = [list(r.hash_ids) for r in reqs]
    t0 = time.process_time()
    replay(chains, make_policy("leaf_lru"), capacity_bytes=sim.cache.gpu.capacity or 1,
           block_bytes=1)
    replay_s = time.process_time() - t0
    print()
    print(f"Mooncake conversation trace, {len(reqs)} requests, qwen3-8b on 8 x H200 (SGLang):")
    print(f"  simulator: {sim_s:.1f} s CPU, {len(reqs) / sim_s:,.0f} simulated requests/s, "
          f"{m['steps']:,} engine steps, GPU prefix hit rate {100 * m['cache_hit_rate']['gpu']:.1f}%")
    print(f"  bare policy replay of the same chains: {replay_s:.2f} s CPU "
          f"(simulator / replay = {sim_s / replay_s:.1f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 measured waves")
    ap.add_argument("--rows", action="store_true", help="print every test row")
    ap.add_argument("--no-speed", action="store_true")
    args = ap.parse_args()
    validation(args.quick, args.rows)
    if not args.no_speed:
        speed()


if __name__ == "__main__":
    main()
