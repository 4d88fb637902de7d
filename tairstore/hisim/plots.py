"""PNG plots of a simulated run and of a sweep (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .engine import SimResult
from .metrics import tpot_ms, ttft_ms

# Completed requests are counted per bin of this many seconds for the throughput plot.
THROUGHPUT_BINS = 50


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values: Sequence[float], label: str) -> None:
    v = np.sort(np.asarray(values, dtype=float))
    if v.size:
        ax.plot(v, np.arange(1, v.size + 1) / v.size)
    ax.set_xlabel(label)
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)


def plot_run(res: SimResult, metrics: dict[str, Any], out_dir: Path | str) -> list[Path]:
    """Write ``ttft_cdf.png``, ``tpot_cdf.png``, ``throughput.png``, ``hit_rate.png``."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = [st for st in res.requests if st.measured]
    paths = []
    for name, values, label in (
            ("ttft_cdf.png", [ttft_ms(st) for st in done], "TTFT (ms)"),
            ("tpot_cdf.png", [t for t in (tpot_ms(st) for st in done) if t is not None],
             "TPOT (ms)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        _cdf(ax, values, label)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        paths.append(out / name)
    fig, ax = plt.subplots(figsize=(6, 4))
    ends = np.array([st.finish_ms for st in done]) / 1e3
    if ends.size:
        counts, edges = np.histogram(ends, bins=THROUGHPUT_BINS)
        tokens, _ = np.histogram(ends, bins=edges, weights=[st.req.output_len for st in done])
        width = edges[1] - edges[0] if len(edges) > 1 else 1.0
        ax.plot(edges[:-1], tokens / max(width, 1e-9), label="output tokens/s")
        ax2 = ax.twinx()
        ax2.plot(edges[:-1], counts / max(width, 1e-9), color="tab:orange", label="requests/s")
        ax2.set_ylabel("requests/s")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "throughput.png")
    plt.close(fig)
    paths.append(out / "throughput.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    rates = metrics.get("cache_hit_rate", {})
    ax.bar(list(rates), [100 * v for v in rates.values()])
    ax.set_ylabel("blocks hit (%)")
    ax.set_title("prefix hit rate per level")
    fig.tight_layout()
    fig.savefig(out / "hit_rate.png")
    plt.close(fig)
    paths.append(out / "hit_rate.png")
    return paths


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path | str) -> Path:
    """Cost (GPU-seconds per request) against SLO attainment, the Pareto front highlighted."""
    plt = _pyplot()
    cost = np.array([r["gpu_seconds_per_request"] for r in rows], dtype=float)
    slo = np.array([r["slo_attainment"] for r in rows], dtype=float)
    front = pareto_front(cost, slo)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(cost, 100 * slo, s=12, alpha=0.5, label="configurations")
    order = sorted(front, key=lambda i: cost[i])
    ax.plot(cost[order], 100 * slo[order], "o-", color="tab:red", label="Pareto front")
    ax.set_xlabel("GPU-seconds per request")
    ax.set_ylabel("SLO attainment (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def pareto_front(cost: np.ndarray, quality: np.ndarray) -> list[int]:
    """Indices not dominated by another point (no cheaper-or-equal point that is better)."""
    front = []
    for i in range(len(cost)):
        dominated = np.any((cost <= cost[i]) & (quality >= quality[i])
                           & ((cost < cost[i]) | (quality > quality[i])))
        if not dominated:
            front.append(i)
    return front
