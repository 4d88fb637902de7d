"""The roofline model with achieved (fitted) efficiencies, and the hardware floor.

A kernel cannot run faster than its FLOPs at the tensor-core peak or its bytes at the memory
bandwidth: ``floor = max(flops / peak, bytes / bandwidth)``. Real kernels reach a fraction of each
and pay a fixed start-up cost, so the roofline estimate is::

    time = overhead + max(flops / (peak * compute_eff), bytes / (bandwidth * memory_eff))

with ``compute_eff``, ``memory_eff`` and ``overhead`` fitted per operator family on measured tables
(:func:`fit`). Collectives use the GPU-to-GPU link instead of HBM as their bandwidth.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .hardware import GPU
from .ops import OpCost

# Search grids for the fit. Efficiencies below 2% would mean the family is not described by a
# roofline at all. A fused MoE runs routing, sorting and two grouped GEMMs, several launches, so its
# fixed cost reaches tens of microseconds; 200 us is beyond any family's fixed cost in the tables.
_EFF_GRID = np.geomspace(0.02, 1.0, 48)
_OVERHEAD_GRID_MS = np.concatenate(([0.0], np.geomspace(0.0005, 0.2, 28)))
# A fit sees at most this many points: enough to pin three parameters, small enough to stay fast.
_FIT_SAMPLE = 4000


@dataclass(frozen=True)
class RooflineParams:
    """Achieved efficiencies of one operator family; ``link`` selects GPU-to-GPU bandwidth."""

    compute_eff: float
    memory_eff: float
    overhead_ms: float
    link: bool = False

    def bandwidth(self, gpu: GPU) -> float:
        """Bytes per second this family's traffic moves at on ``gpu`` (at 100% efficiency)."""
        return gpu.interconnect_bytes_per_s if self.link else gpu.hbm_bytes_per_s

    def predict_ms(self, gpu: GPU, cost: OpCost) -> float:
        """Roofline time of ``cost`` on ``gpu`` in milliseconds."""
        compute = cost.flops / (gpu.peak_flops(cost.dtype) * self.compute_eff)
        memory = cost.bytes / (self.bandwidth(gpu) * self.memory_eff)
        return self.overhead_ms + 1e3 * max(compute, memory)

    def body_ms(self, gpu: GPU, cost: OpCost) -> float:
        """The roofline time without the fixed start-up cost."""
        return self.predict_ms(gpu, cost) - self.overhead_ms

    def transfer_ms(self, measured_ms: float, ref: GPU, target: GPU, cost: OpCost) -> float:
        """Carry a time measured on ``ref`` over to ``target``.

        The fixed start-up cost stays; the rest scales by the ratio of the two roofline bodies,
        so the efficiency ``ref`` achieved on this shape is assumed on ``target`` too. Scaling the
        body rather than the whole time keeps the result monotone in problem size whenever the
        measured time is: the body ratio moves only with arithmetic intensity, from the bandwidth
        ratio towards the peak ratio.
        """
        ref_body = self.body_ms(ref, cost)
        if ref_body <= 0:
            return measured_ms
        body = max(measured_ms - self.overhead_ms, 0.0)
        return self.overhead_ms + body * self.body_ms(target, cost) / ref_body

    def floor_ms(self, gpu: GPU, cost: OpCost) -> float:
        """The hardware floor: the same work at 100% of peak and bandwidth, no start-up cost."""
        return 1e3 * max(cost.flops / gpu.peak_flops(cost.dtype), cost.bytes / self.bandwidth(gpu))


# Families without a measured table. The 0.8 bandwidth factor and 3 us constant latency for
# memory-bound work are the empirical corrections AIConfigurator's system files apply (its
# h100_sxm.yaml: mem_bw_empirical_scaling_factor, mem_empirical_constant_latency).
DEFAULT_PARAMS: dict[str, RooflineParams] = {
    "elementwise": RooflineParams(compute_eff=1.0, memory_eff=0.8, overhead_ms=0.003),
}


def fit(gpu: GPU, costs: Sequence[OpCost], latency_ms: Sequence[float], link: bool = False,
        seed: int = 0) -> RooflineParams:
    """Fit efficiencies and overhead minimising the squared log error against measured times.

    A grid search, not a gradient method: the max() makes the loss piecewise and a coarse grid
    over three bounded parameters finds the global minimum reliably.
    """
    lat = np.asarray(latency_ms, dtype=np.float64)
    idx = np.arange(len(lat))
    if len(idx) > _FIT_SAMPLE:
        idx = np.sort(np.random.default_rng(seed).choice(idx, _FIT_SAMPLE, replace=False))
    bw = gpu.interconnect_bytes_per_s if link else gpu.hbm_bytes_per_s
    comp_ms = np.array([1e3 * costs[i].flops / gpu.peak_flops(costs[i].dtype) for i in idx])
    mem_ms = np.array([1e3 * costs[i].bytes / bw for i in idx])
    target = np.log(lat[idx])
    # Shapes: compute (E,1,1,N), memory (1,E,1,N), overhead (1,1,O,1).
    c = comp_ms[None, :] / _EFF_GRID[:, None]
    m = mem_ms[None, :] / _EFF_GRID[:, None]
    best = (np.inf, 1.0, 1.0, 0.0)
    for oi, overhead in enumerate(_OVERHEAD_GRID_MS):
        pred = overhead + np.maximum(c[:, None, :], m[None, :, :])
        loss = ((np.log(np.maximum(pred, 1e-9)) - target) ** 2).mean(axis=-1)
        ci, mi = np.unravel_index(np.argmin(loss), loss.shape)
        if loss[ci, mi] < best[0]:
            best = (float(loss[ci, mi]), float(_EFF_GRID[ci]), float(_EFF_GRID[mi]),
                    float(overhead))
    _, ce, me, ov = best
    return RooflineParams(compute_eff=ce, memory_eff=me, overhead_ms=ov, link=link)


def save_params(params: dict[str, RooflineParams], path: Path | str, note: str = "") -> None:
    """Write fitted parameters as JSON (with a note saying what they were fitted on)."""
    doc = {"note": note, "families": {k: asdict(v) for k, v in sorted(params.items())}}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def load_params(path: Path | str) -> dict[str, RooflineParams]:
    """Read parameters written by :func:`save_params`, on top of :data:`DEFAULT_PARAMS`."""
    doc = json.loads(Path(path).read_text())
    params = dict(DEFAULT_PARAMS)
    for name, fields in doc["families"].items():
        params[name] = RooflineParams(**fields)
    return params
