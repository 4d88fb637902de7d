"""Capacity bookkeeping: namespaces, quotas, watermarks and fair shares.

Pure data and arithmetic; the store calls it under its lock and does the evicting.

Accounting (bytes are block payload sizes, reservations of open write sessions included, so a
write that was admitted can never push usage past a quota when it commits — invariant C1):

- ``used["dram"]``: blocks with a DRAM copy, plus DRAM reservations;
- ``used["ssd"]``: blocks with an SSD record, plus SSD reservations;
- ``used_total``: every block once, whatever its copies, plus reservations.

Fair share: when a tier is over its *global* capacity, the namespace evicted from next is the
one furthest above ``capacity / active namespaces``, so under sustained pressure each namespace
loses blocks in proportion to how far it is over its fair share. A namespace below its share
never loses blocks to make room for another.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tairstore.config import TIERS
from tairstore.errors import InvalidArgumentError
from tairstore.validate import check_int, check_real, check_ttl

__all__ = ["TIERS", "Namespace", "Watermarks", "WatermarkTracker", "parse_watermarks", "fair_share_order"]

log = logging.getLogger(__name__)


@dataclass
class Namespace:
    """A tenant: its limits, its usage, and its eviction policy per tier."""

    name: str
    total_bytes: int | None = None
    tier_bytes: dict[str, int] = field(default_factory=dict)
    ttl_s: float | None = None
    #: The backend strategy for puts without a tier (tairstore.engine.strategy); None: "auto".
    strategy: str | None = None
    used_total: int = 0
    used: dict[str, int] = field(default_factory=lambda: {t: 0 for t in TIERS})
    blocks: int = 0
    policies: dict[str, Any] = field(default_factory=dict, repr=False)

    def limit(self, tier: str | None) -> int | None:
        """The quota of ``tier`` (None = the total quota), or None when unlimited."""
        return self.total_bytes if tier is None else self.tier_bytes.get(tier)

    def over(self, tier: str | None, extra: int) -> bool:
        """Whether adding ``extra`` bytes would exceed the quota of ``tier`` (None = total)."""
        # On every admission: no helper calls, and no work at all for an unlimited namespace.
        if tier is None:
            lim = self.total_bytes
            return lim is not None and self.used_total + extra > lim
        lim = self.tier_bytes.get(tier)
        return lim is not None and self.used[tier] + extra > lim

    def settings(self) -> dict:
        """The persisted part: limits, TTL and strategy."""
        return {"total_bytes": self.total_bytes, "tier_bytes": dict(self.tier_bytes), "ttl_s": self.ttl_s,
                "strategy": self.strategy}

    def quota_report(self) -> dict:
        """The shape ``Store.quota()`` returns."""
        return {
            "total_bytes": self.total_bytes,
            "used_bytes": self.used_total,
            "ttl_s": self.ttl_s,
            "strategy": self.strategy,
            "blocks": self.blocks,
            "tiers": {t: {"limit": self.tier_bytes.get(t), "used": self.used[t]} for t in TIERS},
        }


def check_limits(total_bytes: Any, tier_bytes: Any, ttl_s: Any) -> tuple[int | None, dict[str, int], float | None]:
    """Validate quota arguments; raise :class:`InvalidArgumentError` naming the bad one.

    A TTL must be finite: it is saved with the namespace and used by every TTL sweep, where a
    ``nan`` or ``inf`` would fail (or never expire anything) from then on.
    """
    if total_bytes is not None:
        total_bytes = check_int("total_bytes", total_bytes, 0)
    if tier_bytes is not None and not isinstance(tier_bytes, dict):
        raise InvalidArgumentError(f"tier_bytes must be a dict of tier -> bytes, got {tier_bytes!r}")
    tiers: dict[str, int] = {}
    for tier, v in (tier_bytes or {}).items():
        if tier not in TIERS:
            raise InvalidArgumentError(f"unknown tier {tier!r} in tier_bytes; tiers are {TIERS}")
        if v is None:
            continue
        tiers[tier] = check_int(f"tier_bytes[{tier!r}]", v, 0)
    return total_bytes, tiers, check_ttl(ttl_s)


@dataclass(frozen=True)
class Watermarks:
    """Fractions of a tier's capacity: ``warn`` logs, ``high`` starts eviction, down to ``low``."""

    warn: float = 0.85
    high: float = 0.90
    low: float = 0.75

    def __post_init__(self) -> None:
        for name in ("warn", "high", "low"):
            check_real(f"watermark {name}", getattr(self, name), 0, 1)
        if not self.low < self.high:
            raise InvalidArgumentError(f"watermarks need low < high, got low={self.low} high={self.high}")


def parse_watermarks(spec: Any) -> dict[str, Watermarks]:
    """``{"warn":…, "high":…, "low":…}`` for every tier, or ``{"dram": {...}, "ssd": {...}}``."""
    if spec is None:
        return {t: Watermarks() for t in TIERS}
    if isinstance(spec, Watermarks):
        return {t: spec for t in TIERS}
    if not isinstance(spec, dict):
        raise InvalidArgumentError("watermarks must be a dict")
    if set(spec) <= set(TIERS):
        out = {t: Watermarks() for t in TIERS}
        for t, v in spec.items():
            out[t] = v if isinstance(v, Watermarks) else Watermarks(**_wm_kwargs(v))
        return out
    wm = Watermarks(**_wm_kwargs(spec))
    return {t: wm for t in TIERS}


def _wm_kwargs(v: Any) -> dict:
    if not isinstance(v, dict) or not set(v) <= {"warn", "high", "low"}:
        raise InvalidArgumentError(f"a watermark spec has keys warn/high/low, got {v!r}")
    return v


class WatermarkTracker:
    """Remembers each tier's watermark state so a crossing is logged once.

    Hysteresis: after a crossing of ``warn`` is logged, the next one is logged only once usage
    has gone back below ``low``. A tier hovering around ``warn`` (a full cache under steady
    traffic) logs once, not at every maintenance pass.
    """

    def __init__(self, marks: dict[str, Watermarks]) -> None:
        self.marks = marks
        self.state = {t: "ok" for t in TIERS}
        self.crossings = {t: 0 for t in TIERS}
        self._armed = {t: True for t in TIERS}

    def update(self, tier: str, fraction: float) -> str:
        """Record ``tier``'s usage fraction; returns ``"ok"``, ``"warn"`` or ``"high"``."""
        wm = self.marks[tier]
        new = "high" if fraction >= wm.high else "warn" if fraction >= wm.warn else "ok"
        if new != "ok" and self._armed[tier]:
            self._armed[tier] = False
            self.crossings[tier] += 1
            log.warning("%s tier at %.0f%% of capacity (warn watermark %.0f%%)",
                        tier, fraction * 100, wm.warn * 100)
        elif fraction < wm.low:
            self._armed[tier] = True
        self.state[tier] = new
        return new


def fair_share_order(used: dict[str, int], capacity: int) -> list[str]:
    """Namespaces in the order to evict from under global pressure: furthest over share first.

    Only namespaces holding bytes in the tier are listed; ties break by name for determinism.
    """
    active = [ns for ns, u in used.items() if u > 0]
    if not active:
        return []
    share = capacity / len(active)
    return sorted(active, key=lambda ns: (-(used[ns] - share), ns))
