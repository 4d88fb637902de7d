"""Which measured tables and fitted roofline parameters describe a GPU.

The package ships, under ``data/``, a compact table per measured GPU (``aic_<system>.npz``) and the
roofline parameters fitted on them (``roofline.json``); :mod:`tairstore.hisim.derive` writes both
from an AIConfigurator-format folder. Nothing here reads the raw data set at run time; a user may
point :func:`make_timer` at their own AIConfigurator GPU folder instead.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Mapping

from .hardware import GPU, GPURegistry, DEFAULT_REGISTRY
from .kernels import KernelTimer
from .roofline import RooflineParams, load_params
from .tables import Table, load_npz, read_aiconfigurator_dir

DATA_DIR = Path(__file__).resolve().parent / "data"
PARAMS_FILE = "roofline.json"
# Measured GPUs, in the order a GPU without tables borrows from them: H100 first, as the most
# widely deployed Hopper part and the one the roofline parameters are fitted on.
REFERENCE_SYSTEMS = ("h100_sxm", "h200_sxm")


def table_path(system: str, data_dir: Path = DATA_DIR) -> Path:
    """Path of the shipped compact table of an AIConfigurator system name."""
    return data_dir / f"aic_{system}.npz"


@lru_cache(maxsize=None)
def shipped_tables(system: str) -> Mapping[str, Table]:
    """The shipped tables of ``system`` (empty if none ship)."""
    path = table_path(system)
    return load_npz(path) if path.exists() else {}


@lru_cache(maxsize=None)
def shipped_params() -> Mapping[str, RooflineParams]:
    """The shipped fitted roofline parameters by operator family."""
    return load_params(DATA_DIR / PARAMS_FILE)


def make_timer(gpu: GPU, tables_dir: Path | str | None = None,
               registry: GPURegistry = DEFAULT_REGISTRY) -> KernelTimer:
    """A :class:`KernelTimer` for ``gpu``.

    Args:
        gpu: the GPU to predict for.
        tables_dir: an AIConfigurator GPU folder measured on ``gpu`` (plain or gzipped CSVs);
            None uses the shipped table of ``gpu.aic_system``, if any.
        registry: where the reference GPUs' profiles are looked up.
    """
    if tables_dir is not None:
        own: Mapping[str, Table] = read_aiconfigurator_dir(tables_dir)
    elif gpu.aic_system is not None:
        own = shipped_tables(gpu.aic_system)
    else:
        own = {}
    references = []
    for system in REFERENCE_SYSTEMS:
        if system == gpu.aic_system and tables_dir is None:
            continue
        tables = shipped_tables(system)
        if tables:
            references.append((registry.get(system), tables))
    return KernelTimer(gpu, own, shipped_params(), references)
