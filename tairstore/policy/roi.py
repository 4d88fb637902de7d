"""Return on investment: what a cache configuration costs and what its hits save in prefill.

The model, per hour of the trace's traffic:

- **cost** = DRAM GiB x ``dram`` + SSD GiB x ``ssd`` (prices per GiB per hour);
- **saved** = GPU hours of prefill the token hits avoid x ``gpu_hour``, where a hit token saves
  ``1 / prefill_tokens_per_s`` GPU seconds (the deployment's prefill throughput per GPU; a
  HiSim step model of the deployment gives it, here it is an input);
- **net** = saved - cost.

With HiSim (``--hisim MODEL:GPU[:TP]``, :func:`hisim_prefill`) the saving is instead the step
model's prefill time of the trace's mean request with no cache minus with the configuration's
token hit rate cached (a prefix of that share), per request; that time with the cache is the
configuration's TTFT (prefill only, no queueing), printed beside it.

A per-token figure ignores that attention grows with the context; HiSim's step model (below)
does not. The Pareto
frontier keeps the configurations no other one beats on both cost and token hit rate; the
recommendation is the configuration with the highest net value (ties: the cheaper).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tairstore.errors import InvalidArgumentError
from tairstore.policy.prefixreplay import ALL_GROUPS, ReplayStats

__all__ = [
    "Prices", "Roi", "parse_prices", "evaluate", "pareto", "recommend", "plot", "hisim_prefill",
]

#: ``ttft_ms(new_tokens, prefix_tokens)``: the time to prefill ``new_tokens`` behind a cached
#: prefix of ``prefix_tokens``.
PrefillTime = Callable[[int, int], float]

_GIB = 1 << 30
#: Prefill throughput assumed when none is given, tokens per second per GPU: HiSim's step model
#: prefills a 12k-token prompt of qwen3-8b on one H100 in about 400 ms.
DEFAULT_PREFILL_TOKENS_PER_S = 30_000.0
#: A trace that records no arrival times is taken to span one hour.
_DEFAULT_HOURS = 1.0


@dataclass(frozen=True)
class Prices:
    """Prices: DRAM and SSD per GiB per hour, a GPU per hour (any one currency)."""

    dram: float
    ssd: float
    gpu_hour: float


def parse_prices(text: str) -> Prices:
    """``dram=0.005,ssd=0.0002,gpu_hour=2.5`` -> :class:`Prices` (every key required).

    Raises:
        InvalidArgumentError: a missing, unknown, negative or non-numeric price.
    """
    values: dict[str, float] = {}
    for part in text.split(","):
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep or key not in ("dram", "ssd", "gpu_hour"):
            raise InvalidArgumentError(
                f"bad price {part!r}: use dram=..,ssd=..,gpu_hour=.. (per GiB-hour, per GPU-hour)"
            )
        try:
            values[key] = float(val)
        except ValueError:
            raise InvalidArgumentError(f"price {key} is not a number: {val!r}") from None
        if values[key] < 0:
            raise InvalidArgumentError(f"price {key} is negative")
    missing = {"dram", "ssd", "gpu_hour"} - values.keys()
    if missing:
        raise InvalidArgumentError(f"missing price(s): {', '.join(sorted(missing))}")
    return Prices(**values)


@dataclass(frozen=True)
class Roi:
    """A configuration's economics, per hour of traffic."""

    stats: ReplayStats
    cost_per_hour: float
    saved_gpu_hours_per_hour: float
    saved_per_hour: float
    ttft_ms: float | None = None

    @property
    def net_per_hour(self) -> float:
        """Saved minus cost."""
        return self.saved_per_hour - self.cost_per_hour

    @property
    def label(self) -> str:
        """``policy dram[+ssd]`` in blocks."""
        s = self.stats
        return f"{s.policy} {s.capacity_blocks}" + (f"+{s.ssd_blocks}" if s.ssd_blocks else "")


def evaluate(
    rows: Sequence[ReplayStats],
    prices: Prices,
    block_bytes: int,
    duration_s: float | None,
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S,
    prefill_time: PrefillTime | None = None,
    requests: int = 0,
) -> list[Roi]:
    """The :class:`Roi` of every all-groups row.

    Args:
        prefill_time: a step model (e.g. :func:`hisim_prefill`); when given, with ``requests``
            (the trace's request count), it replaces ``prefill_tokens_per_s``.
    """
    if block_bytes <= 0 or prefill_tokens_per_s <= 0:
        raise InvalidArgumentError("block_bytes and prefill_tokens_per_s must be positive")
    hours = duration_s / 3600 if duration_s else _DEFAULT_HOURS
    out = []
    for r in rows:
        if r.group != ALL_GROUPS:
            continue
        cost = (r.capacity_blocks * prices.dram + r.ssd_blocks * prices.ssd) * block_bytes / _GIB
        ttft = None
        if prefill_time is not None and requests:
            mean = max(1, round(r.token_accesses / requests))
            cached = min(mean - 1, round(mean * r.token_hit_rate))
            ttft = prefill_time(mean - cached, cached)
            gpu_s = max(0.0, prefill_time(mean, 0) - ttft) / 1000 * requests
        else:
            gpu_s = r.token_hits / prefill_tokens_per_s
        gpu_h = gpu_s / 3600 / hours
        out.append(Roi(r, cost, gpu_h, gpu_h * prices.gpu_hour, ttft))
    return out


def hisim_prefill(spec: str) -> PrefillTime:
    """``MODEL:GPU[:TP]`` (e.g. ``qwen3-8b:h100``) -> a prefill time from HiSim's step model.

    Raises:
        InvalidArgumentError: a malformed spec, or a model or GPU HiSim does not know.
    """
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise InvalidArgumentError(f"--hisim {spec!r}: use MODEL:GPU[:TP], e.g. qwen3-8b:h100")
    try:
        # Imported here: HiSim is optional for the optimizer and slow to load its tables.
        from tairstore.hisim import PrefillChunk, Step, step_model

        model = step_model(parts[0], parts[1], int(parts[2]) if len(parts) == 3 else 1)
    except (ImportError, KeyError, ValueError) as exc:
        raise InvalidArgumentError(f"--hisim {spec!r}: {exc}") from None

    def prefill_ms(new_tokens: int, prefix_tokens: int) -> float:
        step = Step(prefill=(PrefillChunk(max(1, new_tokens), prefix_tokens),))
        return float(model.predict(step).step_ms)

    return prefill_ms


def pareto(rois: Sequence[Roi]) -> list[Roi]:
    """The configurations no other one beats on both cost and token hit rate, cheapest first."""
    best = -1.0
    front = []
    for x in sorted(rois, key=lambda x: (x.cost_per_hour, -x.stats.token_hit_rate)):
        if x.stats.token_hit_rate > best:
            front.append(x)
            best = x.stats.token_hit_rate
    return front


def recommend(rois: Sequence[Roi]) -> Roi:
    """The configuration with the highest net value per hour (ties: the cheaper)."""
    if not rois:
        raise InvalidArgumentError("no configuration to recommend")
    return max(rois, key=lambda x: (x.net_per_hour, -x.cost_per_hour))


def format_roi(rois: Sequence[Roi]) -> str:
    """The frontier as a table, the recommended configuration marked with ``*``."""
    front = pareto(rois)
    pick = recommend(rois)
    with_ttft = any(x.ttft_ms is not None for x in front)
    lines = [f"  {'config':>22} {'token_hit':>9} {'cost/h':>10} {'saved/h':>10} {'net/h':>10}"
             + (f" {'ttft_ms':>9}" if with_ttft else "")]
    for x in front:
        mark = "*" if x is pick else " "
        lines.append(
            f"{mark} {x.label:>22} {x.stats.token_hit_rate:9.4f} {x.cost_per_hour:10.4f} "
            f"{x.saved_per_hour:10.4f} {x.net_per_hour:10.4f}"
            + (f" {x.ttft_ms:9.1f}" if x.ttft_ms is not None else "")
        )
    lines.append(f"recommended: {pick.label} (net {pick.net_per_hour:.4f} per hour)")
    if pick.net_per_hour < 0:
        lines.append("no configuration pays for itself at these prices: that is the cheapest loss")
    return "\n".join(lines)


def plot(rows: Sequence[ReplayStats], rois: Sequence[Roi] | None, out_dir: str | os.PathLike[str]
         ) -> list[Path]:
    """Write ``hit_rate.png`` (token hit rate vs DRAM blocks per policy) and, with ``rois``,
    ``pareto.png`` (token hit rate vs cost); returns the paths.

    Raises:
        InvalidArgumentError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgumentError(
            "--plot needs matplotlib (a tairstore dependency): pip install matplotlib"
        ) from None
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple[str, int], list[ReplayStats]] = {}
    for r in rows:
        if r.group == ALL_GROUPS:
            series.setdefault((r.policy, r.ssd_blocks), []).append(r)
    for (policy, ssd), rs in series.items():
        rs.sort(key=lambda r: r.capacity_blocks)
        label = policy + (f" +ssd {ssd}" if ssd else "")
        ax.plot([r.capacity_blocks for r in rs], [r.token_hit_rate for r in rs], "o-", label=label)
    ax.set_xscale("log", base=2)
    paths.append(_finish(plt, fig, ax, "DRAM capacity (blocks)", d / "hit_rate.png"))
    if rois:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([x.cost_per_hour for x in rois], [x.stats.token_hit_rate for x in rois], s=12)
        front = pareto(rois)
        ax.plot([x.cost_per_hour for x in front], [x.stats.token_hit_rate for x in front], "r-",
                label="Pareto frontier")
        pick = recommend(rois)
        ax.annotate(pick.label, (pick.cost_per_hour, pick.stats.token_hit_rate))
        paths.append(_finish(plt, fig, ax, "cache cost per hour", d / "pareto.png"))
    return paths


def _finish(plt, fig, ax, xlabel: str, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """Label, save and close one figure (every plot has token hit rate on y)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("token hit rate")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
