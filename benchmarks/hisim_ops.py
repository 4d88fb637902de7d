"""Operator-level validation of the HiSim latency tables.

1. Hold out a random 20% of every AIConfigurator table (H100 and H200, SGLang 0.5.6.post2),
   interpolate the held-out points from the rest, and print the median and p90 absolute
   percentage error.
2. Cross-device: fit the roofline on the H100 tables and predict the H200 tables from them, with
   the scaled path HiSim uses for GPUs without tables, the fitted roofline alone, and the H100
   time unchanged (the baseline the model has to beat).

Usage: python benchmarks/hisim_ops.py [--data ../shared/data] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tairstore.hisim.derive import table_costs
from tairstore.hisim.hardware import get_gpu
from tairstore.hisim.kernels import LINK_FAMILIES
from tairstore.hisim.roofline import fit
from tairstore.hisim.tables import read_aiconfigurator_dir
from tairstore.hisim.validate import cross_device_errors, holdout_errors, summary

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RELEASE = "sglang_0.5.6.post2"
SYSTEMS = ("h100_sxm", "h200_sxm")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root = args.data / "aiconfigurator" / RELEASE
    if not root.exists():
        print(f"no AIConfigurator data at {root}", file=sys.stderr)
        return 1
    tables = {s: read_aiconfigurator_dir(root / s) for s in SYSTEMS}

    print("## Interpolation on a random 20% held out (absolute % error)\n")
    print("| GPU | table | points | held out | median % | p90 % |")
    print("|---|---|---:|---:|---:|---:|")
    for system, fams in tables.items():
        for family, table in sorted(fams.items()):
            errs = holdout_errors(table, seed=args.seed)
            med, p90 = summary(errs)
            print(f"| {system} | {family} | {len(table)} | {len(errs)} | {med:.2f} | {p90:.2f} |")

    print("\n## Cross-device: roofline fitted on H100, predicting H200 (absolute % error)\n")
    print("| table | points | scaled median % | scaled p90 % | roofline median % "
          "| roofline p90 % | H100 unchanged median % |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    h100, h200 = get_gpu("h100_sxm"), get_gpu("h200_sxm")
    for family in sorted(set(tables["h100_sxm"]) & set(tables["h200_sxm"])):
        ref, tgt = tables["h100_sxm"][family], tables["h200_sxm"][family]
        params = fit(h100, table_costs(family, ref), ref.latency_ms,
                     link=family in LINK_FAMILIES)
        errs = cross_device_errors(family, params, h100, ref, h200, tgt)
        s_med, s_p90 = summary(errs["scaled"])
        r_med, r_p90 = summary(errs["roofline"])
        u_med, _ = summary(errs["unchanged"])
        print(f"| {family} | {len(errs['scaled'])} | {s_med:.1f} | {s_p90:.1f} | {r_med:.1f} "
              f"| {r_p90:.1f} | {u_med:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
