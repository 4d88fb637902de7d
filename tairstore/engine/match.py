"""Prefix, exact and sliding-window matching over a hit mask.

Pure functions over a list of booleans, so the store, the daemon and HiSim answer a match the
same way. Keys form a chain (key i covers tokens 0..(i+1)·page_size), so:

- ``prefix``: the length of the leading run of hits — what a prefix cache can reuse.
- ``exact``: the hit mask, nothing more.
- ``sliding_window``: the last run of ``window`` consecutive hits, scanning from the tail —
  what a model with sliding-window attention needs (only the most recent pages matter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tairstore.errors import InvalidArgumentError

__all__ = ["MatchResult", "MATCH_MODES", "match_mask"]

MATCH_MODES = ("prefix", "exact", "sliding_window")


@dataclass
class MatchResult:
    """The answer of :meth:`tairstore.Store.match`.

    Attributes:
        mode: the mode asked for.
        prefix_len: length of the leading run of hits (for every mode).
        hits: per key, whether it is stored.
        tiers: per key, the fastest tier holding it (``"dram"``, ``"ssd"``) or None on a miss.
        window_start: for ``sliding_window``, the index of the first key of the matched window,
            or None when no run of ``window`` hits exists.
        window_len: the number of keys in the matched window (0 when none).
    """

    mode: str
    prefix_len: int
    hits: list[bool]
    tiers: list[str | None] = field(default_factory=list)
    window_start: int | None = None
    window_len: int = 0

    @property
    def hit_count(self) -> int:
        """Number of keys that hit."""
        return sum(self.hits)


def match_mask(hits: list[bool], tiers: list[str | None], mode: str = "prefix",
               window: int | None = None) -> MatchResult:
    """Build a :class:`MatchResult` from a hit mask."""
    if mode not in MATCH_MODES:
        raise InvalidArgumentError(f"unknown match mode {mode!r}; use one of {', '.join(MATCH_MODES)}")
    try:  # C-level scans: a chain of a thousand keys is a common request
        prefix = hits.index(False)
    except ValueError:
        prefix = len(hits)
    result = MatchResult(mode=mode, prefix_len=prefix, hits=hits, tiers=tiers)
    if mode == "sliding_window":
        if window is None or not isinstance(window, int) or window < 1:
            raise InvalidArgumentError("sliding_window matching needs window >= 1 (number of keys)")
        run = 0
        for i in range(len(hits) - 1, -1, -1):
            run = run + 1 if hits[i] else 0
            if run == window:
                result.window_start = i
                result.window_len = window
                break
    return result
