"""Validation of the latency model against measurements (used by tests and benchmarks).

Nothing here runs in a simulation; every function takes the path of a data set, so the package
never depends on one being present.

- :func:`holdout_errors`: hide a random share of a table, interpolate the hidden points from the
  rest, return the absolute percentage errors.
- :func:`cross_device_errors`: predict one GPU's table from another's (scaled roofline, pure
  roofline, and the measured reference time unchanged as the baseline to beat).
- :func:`splitwise_rows`: measured prompt and token times (Splitwise, ``perf_model.csv``) next to
  the model's predictions.
- :func:`infersim_rows`: InferSim's H20 kernel benchmarks next to the model's H20 predictions.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from . import ops
from .hardware import GPU
from .kernels import FAMILY_COSTS, KernelTimer
from .latency import Step, StepLatencyModel
from .models import get_model
from .roofline import RooflineParams
from .tables import Table

HOLDOUT_FRACTION = 0.2


def holdout_errors(table: Table, fraction: float = HOLDOUT_FRACTION, seed: int = 0
                   ) -> np.ndarray:
    """Absolute relative errors of interpolating a random ``fraction`` of points from the rest.

    Points whose key loses every measurement to the hold-out are skipped (no interpolation is
    possible for them; the roofline path would answer instead).
    """
    hidden = np.random.default_rng(seed).random(len(table)) < fraction
    train = table.subset(~hidden)
    errs = [abs(train.lookup(table.keys[i], *table.axes[i]) / table.latency_ms[i] - 1)
            for i in np.flatnonzero(hidden) if train.has(table.keys[i])]
    return np.array(errs)


def summary(errors: np.ndarray) -> tuple[float, float]:
    """(median, p90) of absolute relative errors, in percent."""
    if len(errors) == 0:
        return float("nan"), float("nan")
    return float(np.median(errors) * 100), float(np.percentile(errors, 90) * 100)


def cross_device_errors(family: str, params: RooflineParams, ref_gpu: GPU, ref: Table,
                        target_gpu: GPU, target: Table) -> dict[str, np.ndarray]:
    """Errors predicting ``target`` from ``ref``, over the points both tables measured.

    Returns arrays under "scaled" (reference time carried over by the roofline ratio, the path
    HiSim uses for GPUs without tables), "roofline" (fitted roofline alone) and "unchanged"
    (reference time as is).
    """
    index = {(k, tuple(p)): v for k, p, v in zip(ref.keys, ref.axes, ref.latency_ms)}
    out: dict[str, list[float]] = {"scaled": [], "roofline": [], "unchanged": []}
    for key, point, measured in zip(target.keys, target.axes, target.latency_ms):
        ref_ms = index.get((key, tuple(point)))
        if ref_ms is None:
            continue
        cost = FAMILY_COSTS[family](key, tuple(point))
        tgt_roof = params.predict_ms(target_gpu, cost)
        scaled = params.transfer_ms(ref_ms, ref_gpu, target_gpu, cost)
        out["scaled"].append(abs(scaled / measured - 1))
        out["roofline"].append(abs(tgt_roof / measured - 1))
        out["unchanged"].append(abs(ref_ms / measured - 1))
    return {k: np.array(v) for k, v in out.items()}


# ---- Splitwise ------------------------------------------------------------------------------

SPLITWISE_GPUS = {"a100-80gb": "a100_sxm_80g", "h100-80gb": "h100_sxm"}


@dataclass(frozen=True)
class StepComparison:
    """One measured configuration next to its prediction (milliseconds)."""

    label: str
    phase: str
    measured_ms: float
    predicted_ms: float

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        return self.predicted_ms / self.measured_ms - 1


def splitwise_rows(csv_path: Path | str, make_model) -> Iterator[StepComparison]:
    """Compare with Splitwise's ``perf_model.csv`` (repeats averaged).

    ``prompt_time`` is one step prefilling ``batch_size`` prompts of ``prompt_size`` tokens;
    ``token_time`` is the mean decode step over ``token_size`` tokens, so its KV length is taken
    at the middle, ``prompt_size + token_size / 2``. Power-capped runs are skipped.
    ``make_model(model_name, gpu_name, tp)`` returns a :class:`StepLatencyModel`.
    """
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            if r["hardware"] not in SPLITWISE_GPUS:
                continue
            key = (r["model"], r["hardware"], int(r["tensor_parallel"]), int(r["prompt_size"]),
                   int(r["batch_size"]), int(r["token_size"]))
            groups[key].append((float(r["prompt_time"]), float(r["token_time"])))
    models: dict[tuple, StepLatencyModel] = {}
    for (model, hw, tp, prompt, batch, tokens), times in sorted(groups.items()):
        sm = models.get((model, hw, tp))
        if sm is None:
            sm = models[(model, hw, tp)] = make_model(model, SPLITWISE_GPUS[hw], tp)
        label = f"{model} {hw} tp{tp} p{prompt} b{batch} t{tokens}"
        prefill = sm.predict(Step.of(prefill=[prompt] * batch)).step_ms
        decode = sm.predict(Step.of(decode=batch, kv_len=prompt + tokens // 2)).step_ms
        yield StepComparison(label, "prompt", float(np.mean([t[0] for t in times])), prefill)
        yield StepComparison(label, "token", float(np.mean([t[1] for t in times])), decode)


# ---- InferSim (H20 kernels) -------------------------------------------------------------------

def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def infersim_rows(bench_dir: Path | str, timer: KernelTimer, device: str = "h20"
                  ) -> Iterator[StepComparison]:
    """Compare ``timer``'s predictions with InferSim's kernel benchmarks on ``device``.

    Families: ``gemm`` (DeepGEMM FP8, m x k x n), ``mha_prefill`` and ``mha_decode``
    (FlashAttention, files named heads-kv_heads-head_dim), ``moe`` (DeepGEMM grouped GEMMs, up plus
    down projections, one GPU holding every expert). InferSim's grouped GEMMs exclude routing and
    permutation, which the SGLang fused-MoE tables include.
    """
    root = Path(bench_dir)
    gemm = root / "gemm" / device / "data.csv"
    if gemm.exists():
        for r in _read(gemm):
            m, k, n = float(r["m"]), float(r["k"]), float(r["n"])
            est = timer.time("gemm", ("fp8",), (m, n, k), ops.gemm(m, n, k, "fp8"))
            yield StepComparison(f"gemm m{int(m)} k{int(k)} n{int(n)}", "gemm",
                                 float(r["latency_us"]) / 1e3, est.ms)
    for phase in ("prefill", "decode"):
        for path in sorted((root / "mha" / phase / device).glob("*.csv")):
            heads, kv_heads, head_dim = (int(x) for x in path.stem.split("-"))
            # Some files lack their header line; the columns are the same in every file.
            with open(path, newline="") as f:
                lines = [ln for ln in csv.reader(f) if ln and ln[0] != "dtype"]
            for ln in lines:
                if phase == "prefill":
                    seq = float(ln[1])
                    cost = ops.context_attention(1, seq, 0, heads, kv_heads, head_dim)
                    est = timer.time("context_attention", ("bfloat16", "bfloat16", str(head_dim)),
                                     (1, seq, kv_heads, heads), cost)
                    us = float(ln[2])
                    label = f"mha {path.stem} s{int(seq)}"
                else:
                    kv_dtype = "fp8" if ln[1].startswith("fp8") else "bfloat16"
                    batch, kv = float(ln[2]), float(ln[3])
                    cost = ops.decode_attention(batch, kv, heads, kv_heads, head_dim, kv_dtype)
                    est = timer.time("generation_attention", (kv_dtype, str(head_dim)),
                                     (batch, kv, kv_heads, heads), cost)
                    us = float(ln[4])
                    label = f"mha {path.stem} {kv_dtype} b{int(batch)} kv{int(kv)}"
                yield StepComparison(label, f"mha_{phase}", us / 1e3, est.ms)
    for phase, tokens_col in (("prefill", "seq_len_per_gpu"), ("decode", "batch_size_per_gpu")):
        path = root / "grouped_gemm" / phase / device / "data.csv"
        if not path.exists():
            continue
        for r in _read(path):
            if r["num_gpus"] != "1":
                continue
            tokens, hidden = float(r[tokens_col]), r["hidden_size"]
            inter, topk, experts = r["intermediate_size"], r["topk"], r["num_experts"]
            key = ("fp8_block", "power_law_1.01", hidden, inter, topk, experts)
            cost = ops.moe(tokens, float(hidden), float(inter), float(topk), float(experts),
                           "fp8_block")
            est = timer.time("moe", key, (1, tokens), cost)
            us = float(r["up_proj_us"]) + float(r["down_proj_us"])
            yield StepComparison(f"moe e{experts} h{hidden} i{inter} k{topk} t{int(tokens)}",
                                 f"moe_{phase}", us / 1e3, est.ms)


def qwen3_8b_h20_step(bench_dir: Path | str, timer: KernelTimer, batch: int, kv_len: int
                      ) -> StepComparison | None:
    """A Qwen3-8B FP8 decode step on H20 composed of InferSim-measured kernels.

    The operators InferSim measured for this model (QKV, gate/up and down GEMMs, decode attention)
    summed over the 36 layers, against the model's prediction of the same operators. None when a
    kernel was not measured at this batch and KV length.
    """
    m = get_model("qwen3-8b")
    root = Path(bench_dir)
    heads, kv_heads, d = m.num_heads, m.num_kv_heads, m.head_dim
    shapes = [((heads + 2 * kv_heads) * d, m.hidden), (2 * m.intermediate, m.hidden),
              (m.hidden, m.intermediate)]
    gemm = {(int(r["m"]), int(r["n"]), int(r["k"])): float(r["latency_us"])
            for r in _read(root / "gemm" / "h20" / "data.csv")}
    attn = {}
    with open(root / "mha" / "decode" / "h20" / f"{heads}-{kv_heads}-{d}.csv", newline="") as f:
        for ln in csv.reader(f):
            if ln and ln[0] != "dtype" and ln[1] == "bf16":
                attn[(int(ln[2]), int(ln[3]))] = float(ln[4])
    measured = 0.0
    predicted = 0.0
    for n, k in shapes:
        us = gemm.get((batch, n, k))
        if us is None:
            return None
        measured += us / 1e3
        predicted += timer.time("gemm", ("fp8",), (batch, n, k), ops.gemm(batch, n, k, "fp8")).ms
    us = attn.get((batch, kv_len))
    if us is None:
        return None
    measured += us / 1e3
    cost = ops.decode_attention(batch, kv_len, heads, kv_heads, d)
    predicted += timer.time("generation_attention", ("bfloat16", str(d)),
                            (batch, kv_len, kv_heads, heads), cost).ms
    return StepComparison(f"qwen3-8b fp8 h20 decode b{batch} kv{kv_len}", "step",
                          measured * m.num_layers, predicted * m.num_layers)


def by_phase(rows: list[StepComparison]) -> Mapping[str, tuple[float, float, float, int]]:
    """Per phase: (median |error| %, p90 |error| %, median signed error %, count)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        groups[r.phase].append(r.error)
    out = {}
    for phase, errs in groups.items():
        e = np.array(errs)
        out[phase] = (float(np.median(np.abs(e)) * 100), float(np.percentile(np.abs(e), 90) * 100),
                      float(np.median(e) * 100), len(e))
    return out
