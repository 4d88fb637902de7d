"""Regenerate the shipped tables and roofline parameters from AIConfigurator-format folders.

Usage::

    python -m tairstore.hisim.derive SRC [--out DIR]
    python -m tairstore.hisim.derive --smooth-only [--out DIR]

``--smooth-only`` rewrites the ``.npz`` files already in ``DIR`` with their smoothed latencies
precomputed (the isotonic fit is the slow part of loading), without the raw data.

``SRC`` holds one folder per GPU named after the AIConfigurator system (``h100_sxm/``,
``h200_sxm/``...), each in the AIConfigurator performance-database layout. For every GPU folder the
families HiSim uses are read (:data:`~tairstore.hisim.tables.SPECS`), rows of GEMM dtypes no engine
here runs are dropped (:data:`KEEP_GEMM_DTYPES`), families that fail the cross-GPU consistency check
are dropped (:func:`inconsistent_families`), and the rest is written as ``aic_<system>.npz``
(float32, compressed). The roofline parameters of each family are then fitted on the first GPU of
:data:`~tairstore.hisim.database.REFERENCE_SYSTEMS` that kept it and written to ``roofline.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .database import DATA_DIR, PARAMS_FILE, REFERENCE_SYSTEMS, table_path
from .hardware import DEFAULT_REGISTRY, GPU
from .kernels import FAMILY_COSTS, LINK_FAMILIES
from .roofline import RooflineParams, fit, save_params
from .tables import Table, load_npz, read_aiconfigurator_dir, save_npz

# int8 weight-only GEMMs are measured too, but no model here runs them.
KEEP_GEMM_DTYPES = frozenset({"bfloat16", "fp8", "fp8_block"})
# Two GPUs' times for the same operator can differ by their peak or bandwidth ratio, not more.
# Beyond this multiple of that ratio a table is taken to be mis-recorded (see docs/HISIM.md: the
# H100 MoE table of SGLang 0.5.6.post2 reads about 10x the H200 one at every point).
CONSISTENCY_SLACK = 3.0


def table_costs(family: str, table: Table) -> list:
    """The cost of every row of ``table`` (for fitting and floor checks)."""
    cost = FAMILY_COSTS[family]
    return [cost(table.keys[i], tuple(table.axes[i])) for i in range(len(table))]


def _median_over_floor(gpu: GPU, family: str, table: Table) -> float:
    params = RooflineParams(1.0, 1.0, 0.0, link=family in LINK_FAMILIES)
    floors = np.array([params.floor_ms(gpu, c) for c in table_costs(family, table)])
    return float(np.median(table.latency_ms / np.maximum(floors, 1e-9)))


def inconsistent_families(gpus: Mapping[str, GPU], tables: Mapping[str, Mapping[str, Table]]
                          ) -> dict[str, set[str]]:
    """Families to drop per system: those far slower than another GPU's on the same points.

    For each pair of systems and each family both measured, the median ratio of their times over
    the points both hold is compared with the largest ratio their peaks and bandwidths allow,
    times :data:`CONSISTENCY_SLACK`. On a violation the system whose times sit further above its
    own hardware floor is the suspect.
    """
    drop: dict[str, set[str]] = {s: set() for s in tables}
    systems = sorted(tables)
    for i, a in enumerate(systems):
        for b in systems[i + 1:]:
            ga, gb = gpus[a], gpus[b]
            allowed = CONSISTENCY_SLACK * max(
                ga.bf16_tflops / gb.bf16_tflops, gb.bf16_tflops / ga.bf16_tflops,
                ga.hbm_tbps / gb.hbm_tbps, gb.hbm_tbps / ga.hbm_tbps)
            for family in set(tables[a]) & set(tables[b]):
                ta, tb = tables[a][family], tables[b][family]
                index = {(k, tuple(p)): v for k, p, v in zip(tb.keys, tb.axes, tb.latency_ms)}
                ratios = [v / index[(k, tuple(p))]
                          for k, p, v in zip(ta.keys, ta.axes, ta.latency_ms)
                          if (k, tuple(p)) in index]
                if not ratios:
                    continue
                ratio = float(np.median(ratios))
                if 1 / allowed <= ratio <= allowed:
                    continue
                suspect = a if (_median_over_floor(ga, family, ta)
                                > _median_over_floor(gb, family, tb)) else b
                drop[suspect].add(family)
    return drop


def derive(src: Path, out: Path = DATA_DIR, log=print) -> dict[str, RooflineParams]:
    """Write ``aic_<system>.npz`` for every GPU folder under ``src`` and ``roofline.json``."""
    gpus: dict[str, GPU] = {}
    tables: dict[str, dict[str, Table]] = {}
    for gpu_dir in sorted(p for p in Path(src).iterdir() if p.is_dir()):
        gpu = DEFAULT_REGISTRY.get(gpu_dir.name)
        read = read_aiconfigurator_dir(gpu_dir)
        if "gemm" in read:
            g = read["gemm"]
            read["gemm"] = g.subset(np.array([k[0] in KEEP_GEMM_DTYPES for k in g.keys]))
        gpus[gpu_dir.name], tables[gpu_dir.name] = gpu, read
    for system, families in inconsistent_families(gpus, tables).items():
        for family in sorted(families):
            log(f"{system}: dropping {family} (inconsistent with the other GPUs)")
            del tables[system][family]
    out.mkdir(parents=True, exist_ok=True)
    for system, kept in tables.items():
        save_npz(kept, table_path(system, out))
        log(f"{system}: " + ", ".join(f"{f} {len(t)}" for f, t in sorted(kept.items())))
    params: dict[str, RooflineParams] = {}
    order = ([s for s in REFERENCE_SYSTEMS if s in tables]
             + sorted(set(tables) - set(REFERENCE_SYSTEMS)))
    fitted_on = {}
    for system in order:
        for family, table in tables[system].items():
            if family in params:
                continue
            params[family] = fit(gpus[system], table_costs(family, table), table.latency_ms,
                                 link=family in LINK_FAMILIES)
            fitted_on[family] = system
    note = "fitted by tairstore.hisim.derive on: " + ", ".join(
        f"{f}={s}" for f, s in sorted(fitted_on.items()))
    save_params(params, out / PARAMS_FILE, note)
    return params


def smooth_only(out: Path = DATA_DIR, log=print) -> None:
    """Rewrite every ``aic_*.npz`` in ``out`` with its smoothed latencies stored."""
    for path in sorted(Path(out).glob("aic_*.npz")):
        save_npz(load_npz(path), path)
        log(f"{path.name}: smoothed latencies stored")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, nargs="?",
                    help="folder with one AIConfigurator GPU folder per GPU")
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="where to write (default: package)")
    ap.add_argument("--smooth-only", action="store_true",
                    help="only precompute the smoothed latencies of the .npz files in --out")
    args = ap.parse_args(argv)
    if args.smooth_only:
        smooth_only(args.out)
    elif args.src is None:
        ap.error("SRC is required unless --smooth-only is given")
    else:
        derive(args.src, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
