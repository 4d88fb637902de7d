"""Measured operator tables in the AIConfigurator format, and interpolation over them.

Theory of operation
-------------------
An AIConfigurator performance database is a folder per GPU holding one CSV per operator family
(``gemm/gemm_perf.csv``, ``attention/context_attention_perf.csv``...). Each row is one measured
configuration: some *key* columns that are matched exactly (data type, MoE shape...), some numeric
*axes* that vary over a grid (m, n, k; batch, sequence length...), and a latency in milliseconds.

:class:`Table` answers a query anywhere in the axes' range, and a little outside it, by
interpolating ``log(latency)`` linearly in ``log(axis)`` one axis at a time (recursive linear
interpolation: bracket the first axis, answer both brackets over the remaining axes, blend). On a
full rectilinear grid that is multilinear interpolation in log space; on the partial grids these
databases hold (big batches are only measured at short sequences, for instance) it still answers
from the nearest measured neighbours along each axis. Kernel times are close to power laws in their
sizes, which is why log space interpolates them far better than linear space.

Before interpolating, latencies are made monotone along each size axis (an isotonic fit,
``AxisSpec.direction``): a bigger problem measured faster than a smaller one is measurement noise,
and the step model promises times that grow with batch size and context length.

The :data:`SPECS` table maps each operator family to its file, its key columns and its axes, so
that a new family is a new row, not new code. Tables load from a raw AIConfigurator folder (plain or
gzipped CSV) or from the compact ``.npz`` this package ships (see :mod:`tairstore.hisim.derive`).
"""

from __future__ import annotations

import bisect
import csv
import gzip
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

# Extrapolating a log-log segment outside the grid keeps its slope, but a segment between two noisy
# points can be steep or negative. No kernel here grows faster than quadratically in one size
# (context attention in sequence length), and none gets faster as a size grows once monotone.
MIN_EXTRAPOLATION_SLOPE = 0.0
MAX_EXTRAPOLATION_SLOPE = 2.0


class TableError(ValueError):
    """A table file is missing a column, or a query names a key the table never measured."""


@dataclass(frozen=True)
class AxisSpec:
    """One numeric axis of a table.

    ``column`` is read from the CSV; ``derive`` optionally computes the axis from the whole row
    (the KV length of a decode step is ``isl + step`` in the generation tables). ``direction`` is
    +1 when latency cannot decrease as the axis grows, -1 when it cannot increase (more GPUs
    sharing one MoE), 0 when neither is promised.
    """

    name: str
    column: str
    direction: int = 1
    derive: Callable[[Mapping[str, str]], float] | None = None

    def value(self, row: Mapping[str, str]) -> float:
        """Return this axis' value for one CSV row."""
        if self.derive is not None:
            return float(self.derive(row))
        return float(row[self.column])


@dataclass(frozen=True)
class TableSpec:
    """Where an operator family lives in an AIConfigurator folder and how it is indexed."""

    name: str
    path: str  # relative to the GPU folder, without the ``.gz``
    keys: tuple[str, ...]
    axes: tuple[AxisSpec, ...]
    latency_column: str = "latency"
    row_filter: Callable[[Mapping[str, str]], bool] | None = None


def _kv_len(row: Mapping[str, str]) -> float:
    # Generation rows are measured with ``isl`` (=1) new token after ``step`` cached ones.
    return float(row["isl"]) + float(row["step"])


# One row per operator family HiSim uses. Axis order matters only where the grid has holes: the
# recursion fills a hole from neighbours along the *last* axis, so the attention tables end with the
# head counts, along which latency is closest to a straight line (measured on held-out points).
# Columns not listed (framework, tp_size of the MLA tables, which only restates num_heads) are
# ignored; rows that differ only in them are averaged.
SPECS: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec(
            "gemm", "gemm/gemm_perf.csv", ("gemm_dtype",),
            (AxisSpec("m", "m"), AxisSpec("n", "n"), AxisSpec("k", "k")),
        ),
        TableSpec(
            "context_attention", "attention/context_attention_perf.csv",
            ("attn_dtype", "kv_cache_dtype", "head_dim"),
            (AxisSpec("batch", "batch_size"), AxisSpec("isl", "isl"),
             AxisSpec("num_kv_heads", "num_key_value_heads"), AxisSpec("num_heads", "num_heads")),
        ),
        TableSpec(
            "generation_attention", "attention/generation_attention_perf.csv",
            ("kv_cache_dtype", "head_dim"),
            (AxisSpec("batch", "batch_size"), AxisSpec("kv_len", "step", derive=_kv_len),
             AxisSpec("num_kv_heads", "num_key_value_heads"), AxisSpec("num_heads", "num_heads")),
        ),
        TableSpec(
            "context_mla", "mla/context_mla_perf.csv", ("kv_cache_dtype",),
            (AxisSpec("num_heads", "num_heads"), AxisSpec("batch", "batch_size"),
             AxisSpec("isl", "isl")),
        ),
        TableSpec(
            "generation_mla", "mla/generation_mla_perf.csv", ("kv_cache_dtype",),
            (AxisSpec("num_heads", "num_heads"), AxisSpec("batch", "batch_size"),
             AxisSpec("kv_len", "step", derive=_kv_len)),
        ),
        TableSpec(
            # The per-head products around absorbed MLA decode (q x W_kc before, x W_vc after).
            "mla_bmm", "mla_bmm/mla_bmm_perf.csv", ("op_name", "bmm_dtype"),
            (AxisSpec("num_heads", "num_heads"), AxisSpec("tokens", "num_tokens")),
        ),
        TableSpec(
            "moe", "moe/moe_perf.csv",
            ("moe_dtype", "distribution", "hidden_size", "inter_size", "topk", "num_experts"),
            # More GPUs splitting each expert never makes one GPU's share slower.
            (AxisSpec("moe_tp", "moe_tp_size", direction=-1), AxisSpec("tokens", "num_tokens")),
            row_filter=lambda row: row["moe_ep_size"] == "1",
        ),
        TableSpec(
            "allreduce", "comm/custom_allreduce_perf.csv", ("allreduce_dtype",),
            # message_size counts elements, not bytes (AIConfigurator's convention).
            (AxisSpec("num_gpus", "num_gpus"), AxisSpec("elements", "message_size")),
        ),
    )
}


class Table:
    """Measured latencies of one operator family on one GPU, interpolated in log space.

    Args:
        spec: the family's layout.
        keys: one tuple of key strings per measured point.
        axes: array (points x len(spec.axes)) of axis values, all > 0.
        latency_ms: array of measured latencies in milliseconds, all > 0.
    """

    def __init__(self, spec: TableSpec, keys: Sequence[tuple[str, ...]], axes: np.ndarray,
                 latency_ms: np.ndarray, smoothed_ms: np.ndarray | None = None) -> None:
        axes = np.asarray(axes, dtype=np.float64).reshape(len(keys), len(spec.axes))
        latency_ms = np.asarray(latency_ms, dtype=np.float64)
        if len(keys) != len(latency_ms):
            raise TableError(f"{spec.name}: {len(keys)} keys but {len(latency_ms)} latencies")
        if smoothed_ms is not None and len(smoothed_ms) != len(latency_ms):
            raise TableError(f"{spec.name}: {len(smoothed_ms)} smoothed latencies for "
                             f"{len(latency_ms)} points")
        self.spec = spec
        self.keys = [k if isinstance(k, tuple) else tuple(k) for k in keys]
        self.axes = axes
        self.latency_ms = latency_ms
        self._smoothed = None if smoothed_ms is None else np.asarray(smoothed_ms, np.float64)
        # Trees are built on a key's first lookup: a model touches a handful of the keys a
        # table holds, and building (and smoothing) all of them is what made start-up slow.
        self._trees: dict[tuple[str, ...], object] = {}
        self._groups: dict[tuple[str, ...], list[int]] = {}
        for i, key in enumerate(self.keys):
            self._groups.setdefault(key, []).append(i)

    def _tree(self, key: tuple[str, ...]) -> object | None:
        tree = self._trees.get(key)
        if tree is None:
            idx = self._groups.get(key)
            if idx is None:
                return None
            tree = self._trees[key] = _build(np.log(self.axes[idx]),
                                             np.log(self._smoothed_group(idx)))
        return tree

    def _smoothed_group(self, idx: list[int]) -> np.ndarray:
        if self._smoothed is not None:
            return self._smoothed[idx]
        return _monotone(self.axes[idx], self.latency_ms[idx], self.spec.axes)

    def smoothed_ms(self) -> np.ndarray:
        """The latencies after the monotone fit, one per point (what lookups interpolate)."""
        if self._smoothed is None:
            out = np.empty_like(self.latency_ms)
            for idx in self._groups.values():
                out[idx] = _monotone(self.axes[idx], self.latency_ms[idx], self.spec.axes)
            self._smoothed = out
        return self._smoothed

    def __len__(self) -> int:
        return len(self.latency_ms)

    def key_values(self) -> list[tuple[str, ...]]:
        """Return the distinct key tuples this table measured."""
        return list(self._groups)

    def has(self, key: tuple[str, ...]) -> bool:
        """Whether the table measured this key (exact match on every key column)."""
        return tuple(key) in self._groups

    def lookup(self, key: tuple[str, ...], *point: float) -> float:
        """Interpolated latency in ms at ``point`` (one value per axis) for ``key``.

        Raises:
            TableError: the key was never measured or the point has the wrong arity.
        """
        tree = self._tree(tuple(key))
        if tree is None:
            raise TableError(f"{self.spec.name}: no measurements for key {key}")
        if len(point) != len(self.spec.axes):
            raise TableError(f"{self.spec.name}: expected {len(self.spec.axes)} axes, got {point}")
        logs = [math.log(max(float(p), 1e-12)) for p in point]
        return math.exp(_interp(tree, logs, 0))

    def subset(self, mask: np.ndarray) -> "Table":
        """A new table holding only the points where ``mask`` is true (for hold-out tests)."""
        idx = np.flatnonzero(mask)
        return Table(self.spec, [self.keys[i] for i in idx], self.axes[idx], self.latency_ms[idx])


# A tree is (sorted log axis values, children) per level; a leaf is a float log latency.
def _build(pts: np.ndarray, vals: np.ndarray) -> object:
    if pts.shape[1] == 0:
        return float(vals.mean())  # rows equal on every axis: average repeated measurements
    order = np.argsort(pts[:, 0], kind="stable")
    pts, vals = pts[order], vals[order]
    xs: list[float] = []
    children: list[object] = []
    start = 0
    for end in range(1, len(pts) + 1):
        if end == len(pts) or pts[end, 0] != pts[start, 0]:
            xs.append(float(pts[start, 0]))
            children.append(_build(pts[start:end, 1:], vals[start:end]))
            start = end
    return (xs, children)


def _interp(tree: object, logs: list[float], depth: int) -> float:
    if not isinstance(tree, tuple):
        return tree  # type: ignore[return-value]
    xs, children = tree
    if len(xs) == 1:
        return _interp(children[0], logs, depth + 1)
    x = logs[depth]
    hi = bisect.bisect_left(xs, x)
    if hi < len(xs) and xs[hi] == x:
        return _interp(children[hi], logs, depth + 1)
    lo = min(max(hi - 1, 0), len(xs) - 2)
    x0, x1 = xs[lo], xs[lo + 1]
    y0 = _interp(children[lo], logs, depth + 1)
    y1 = _interp(children[lo + 1], logs, depth + 1)
    secant = (y1 - y0) / (x1 - x0)
    if x < x0 or x > x1:
        slope = min(max(secant, MIN_EXTRAPOLATION_SLOPE), MAX_EXTRAPOLATION_SLOPE)
        return y0 + slope * (x - x0) if x < x0 else y1 + slope * (x - x1)
    # Inside the bracket: a monotone cubic (Fritsch-Carlson) through the neighbours, because
    # kernel times bend (a flat launch floor, then a power law) and a straight segment across a
    # held-out or unmeasured point cuts the bend.
    d0 = d1 = secant
    if lo > 0:
        prev = (y0 - _interp(children[lo - 1], logs, depth + 1)) / (x0 - xs[lo - 1])
        d0 = _pchip_slope(prev, secant)
    if lo + 2 < len(xs):
        nxt = (_interp(children[lo + 2], logs, depth + 1) - y1) / (xs[lo + 2] - x1)
        d1 = _pchip_slope(secant, nxt)
    h = x1 - x0
    t = (x - x0) / h
    return ((2 * t**3 - 3 * t**2 + 1) * y0 + (t**3 - 2 * t**2 + t) * h * d0
            + (-2 * t**3 + 3 * t**2) * y1 + (t**3 - t**2) * h * d1)


def _pchip_slope(left: float, right: float) -> float:
    """Slope at a knot between two secants: zero at an extremum, else their harmonic mean."""
    if left * right <= 0:
        return 0.0
    return 2 * left * right / (left + right)


def _monotone(axes: np.ndarray, lat: np.ndarray, specs: Sequence[AxisSpec]) -> np.ndarray:
    """Isotonic fit of ``log(lat)`` along each axis with a direction, the other axes held fixed.

    Pool-adjacent-violators replaces a run that goes the wrong way by its geometric mean: the
    closest monotone series in the least-squares sense, so noise is averaged, not clipped upward
    (a running maximum would lift a whole flat, noisy region to its worst sample). The isotonic fit
    preserves an order already present between series, so axes fitted earlier stay monotone.
    """
    log_lat = np.log(lat)
    for j, spec in enumerate(specs):
        if spec.direction == 0:
            continue
        others = np.delete(axes, j, axis=1)
        order = np.lexsort((spec.direction * axes[:, j],)
                           + tuple(others[:, c] for c in range(others.shape[1])))
        start = 0
        for end in range(1, len(order) + 1):
            if end == len(order) or not np.array_equal(others[order[end]], others[order[start]]):
                run = order[start:end]
                log_lat[run] = _pool_adjacent_violators(log_lat[run])
                start = end
    return np.exp(log_lat)


def _pool_adjacent_violators(y: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit of ``y`` (equal weights)."""
    sums: list[float] = []
    counts: list[int] = []
    for v in y:
        sums.append(float(v))
        counts.append(1)
        while len(sums) > 1 and sums[-2] / counts[-2] > sums[-1] / counts[-1]:
            s, c = sums.pop(), counts.pop()
            sums[-1] += s
            counts[-1] += c
    return np.repeat(np.array(sums) / np.array(counts), counts)


def _open_csv(path: Path) -> Iterable[dict[str, str]]:
    gz = path.with_name(path.name + ".gz")
    if gz.exists():
        with gzip.open(gz, "rt", newline="") as f:
            yield from csv.DictReader(f)
    elif path.exists():
        with open(path, newline="") as f:
            yield from csv.DictReader(f)


def read_aiconfigurator_table(gpu_dir: Path | str, spec: TableSpec) -> Table | None:
    """Read one operator family from an AIConfigurator GPU folder; None if the file is absent.

    Raises:
        TableError: the file lacks a column the spec needs.
    """
    keys: list[tuple[str, ...]] = []
    axes: list[list[float]] = []
    lat: list[float] = []
    for row in _open_csv(Path(gpu_dir) / spec.path):
        if spec.row_filter is not None and not spec.row_filter(row):
            continue
        try:
            value = float(row[spec.latency_column])
            point = [a.value(row) for a in spec.axes]
            key = tuple(row[k] for k in spec.keys)
        except KeyError as exc:
            raise TableError(f"{spec.path}: missing column {exc}") from None
        if value <= 0 or any(p <= 0 for p in point):
            continue  # a failed measurement; log space cannot hold it
        keys.append(key)
        axes.append(point)
        lat.append(value)
    if not lat:
        return None
    return Table(spec, keys, np.array(axes), np.array(lat))


def read_aiconfigurator_dir(gpu_dir: Path | str) -> dict[str, Table]:
    """Read every family in :data:`SPECS` that an AIConfigurator GPU folder holds."""
    tables = {}
    for name, spec in SPECS.items():
        table = read_aiconfigurator_table(gpu_dir, spec)
        if table is not None:
            tables[name] = table
    return tables


# ---- compact package format: one .npz per GPU, three arrays per family -------------------------

def save_npz(tables: Mapping[str, Table], path: Path | str) -> None:
    """Write tables to a compressed ``.npz`` (keys as strings, axes and latency as float32).

    The monotone-smoothed latencies are stored beside the measured ones, so loading never reruns
    the isotonic fit (seconds of Python for the shipped tables). float32 keeps 7 significant
    digits, far below the run-to-run noise of a kernel timing.
    """
    arrays: dict[str, np.ndarray] = {}
    for name, table in tables.items():
        arrays[f"{name}.keys"] = np.array(["|".join(k) for k in table.keys])
        arrays[f"{name}.axes"] = table.axes.astype(np.float32)
        arrays[f"{name}.latency_ms"] = table.latency_ms.astype(np.float32)
        arrays[f"{name}.smoothed_ms"] = table.smoothed_ms().astype(np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    Path(path).write_bytes(buf.getvalue())


def load_npz(path: Path | str) -> dict[str, Table]:
    """Read tables written by :func:`save_npz`; families unknown to :data:`SPECS` are skipped.

    Files without smoothed latencies (older ones) are smoothed lazily, key by key.
    """
    tables = {}
    with np.load(path, allow_pickle=False) as data:
        names = {f.split(".")[0] for f in data.files}
        for name in sorted(names):
            spec = SPECS.get(name)
            if spec is None:
                continue
            raw_keys = data[f"{name}.keys"]
            # Few distinct keys, many points: split each distinct string once.
            distinct, inverse = np.unique(raw_keys, return_inverse=True)
            parsed = [tuple(str(k).split("|")) if spec.keys else () for k in distinct]
            keys = [parsed[i] for i in inverse.tolist()]
            smoothed = data[f"{name}.smoothed_ms"] if f"{name}.smoothed_ms" in data.files else None
            tables[name] = Table(spec, keys, data[f"{name}.axes"], data[f"{name}.latency_ms"],
                                 smoothed)
    return tables
