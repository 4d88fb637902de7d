"""Per-namespace backend strategies: which tier a put without an explicit tier goes to.

Theory of operation
-------------------
A namespace may carry a strategy, as Tair KVCache's manager offers them (persisted with its
quota, :meth:`Store.set_strategy`):

- ``always:<tier>`` — every put goes to ``<tier>``; when the store has no such tier, or (the
  remote tier) it is unhealthy, the put fails with :class:`~tairstore.errors.TierUnavailableError`
  and nothing is stored;
- ``prefer:<tier>`` — puts go to ``<tier>`` while it is present, healthy and its usage ratio is
  below ``prefer_max_usage`` (``[remote] prefer_max_usage``, default 0.9); otherwise to the
  local tiers as without a strategy (``"auto"``);
- no strategy (None) — ``"auto"``: the local tiers; the remote tier receives what the SSD tier
  evicts.

The decision reads only flags and counters (the tier's health flag, its usage), never calls
the remote: routing a put costs no network round trip and never waits on a dead remote.
An explicit ``tier=`` argument of ``put`` / ``put_many`` overrides the strategy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tairstore.errors import InvalidArgumentError, TierUnavailableError

__all__ = ["STRATEGIES", "DEFAULT_PREFER_MAX_USAGE", "check_strategy", "Router", "build_router"]

#: Every strategy a namespace may have (None: no strategy).
STRATEGIES = ("prefer:remote", "always:remote", "prefer:dram", "prefer:ssd", "always:dram", "always:ssd")
#: Usage ratio at or above which a ``prefer:<tier>`` namespace falls back to the local tiers.
DEFAULT_PREFER_MAX_USAGE = 0.9


def check_strategy(strategy: Any) -> str | None:
    """``strategy`` if it is one of :data:`STRATEGIES` or None.

    Raises:
        InvalidArgumentError: anything else; the message lists the allowed values.
    """
    if strategy is None or (isinstance(strategy, str) and strategy in STRATEGIES):
        return strategy
    raise InvalidArgumentError(f"strategy must be one of {', '.join(STRATEGIES)} or None, got {strategy!r}")


class Router:
    """Decides the tier of a put from a namespace's strategy, tier health and usage.

    Args:
        present: the tiers the store has (``{"dram", "ssd"}`` and ``"remote"`` when configured).
        usage: ``usage(tier)`` -> the tier's used fraction (0.0 .. 1.0+).
        healthy: ``healthy(tier)`` -> whether the tier takes writes now.
        prefer_max_usage: the usage ratio at which ``prefer:<tier>`` falls back.
    """

    def __init__(self, present: set[str], usage: Callable[[str], float], healthy: Callable[[str], bool],
                 prefer_max_usage: float = DEFAULT_PREFER_MAX_USAGE) -> None:
        self.present = set(present)
        self._usage = usage
        self._healthy = healthy
        self.prefer_max_usage = prefer_max_usage

    def unavailable(self, tier: str) -> str | None:
        """Why ``tier`` cannot take a write now (``"not configured"``, ``"unhealthy"``), or None."""
        if tier not in self.present:
            return "not configured"
        if not self._healthy(tier):
            return "unhealthy"
        return None

    def route(self, strategy: str | None) -> str:
        """The tier for a put: ``"auto"``, ``"dram"``, ``"ssd"`` or ``"remote"``.

        Raises:
            TierUnavailableError: an ``always:<tier>`` strategy whose tier is unavailable.
        """
        if strategy is None:
            return "auto"
        mode, tier = strategy.split(":", 1)
        why = self.unavailable(tier)
        if mode == "always":
            if why is not None:
                raise TierUnavailableError(
                    f"the namespace's strategy is {strategy!r} but the {tier} tier is {why}; "
                    f"nothing was stored", tier=tier)
            return tier
        if why is None and self._usage(tier) < self.prefer_max_usage:
            return tier
        return "auto"


def build_router(dram: Any, ssd: Any, remote: Any, placement: Any, life: Any,
                 remote_config: dict | None) -> Router:
    """The router of a store's parts: the tiers it has, their usage as the watermarks see it
    (the remote tier's own ratio), the remote tier's health flag, and ``prefer_max_usage``."""
    present = {t for t, part in (("dram", dram), ("ssd", ssd), ("remote", remote)) if part is not None}

    def usage(tier: str) -> float:
        return remote.usage_ratio() if tier == "remote" else placement.usage(tier)[0]

    def healthy(tier: str) -> bool:
        return bool(remote.tier.healthy) if tier == "remote" else life.fatal is None

    limit = remote_config["prefer_max_usage"] if remote_config else DEFAULT_PREFER_MAX_USAGE
    return Router(present, usage, healthy, limit)
