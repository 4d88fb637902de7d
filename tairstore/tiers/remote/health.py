"""Health of a remote tier: stop waiting on a dead remote, and notice when it is back.

Theory of operation
-------------------
A remote store that has gone away costs time, not just a failed call: Mooncake's first put
against a dead master waits about 4 s for its RPC to time out. The tier therefore asks
:meth:`HealthTracker.allow` before every batch. While healthy, every call goes through. After
``failure_threshold`` consecutive failed calls the tier is *unhealthy*: calls are refused at once
(the caller treats them as misses, or as puts that did not happen) and counted in ``skipped``.
Every ``retry_s`` one call is let through as a probe; its success puts the tier back in
rotation, its failure waits another ``retry_s``. A store's maintenance pass asks
:meth:`probe_due` and sends a cheap probe itself (``RemoteTier.probe``), so an idle store puts a
recovered tier back in rotation without waiting for a request. Only one caller gets the probe (the next probe
time moves forward when it is handed out), so a burst of requests never stacks up timeouts.

The clock is a parameter so tests drive time by hand instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tairstore.errors import InvalidArgumentError

__all__ = ["HealthTracker", "DEFAULT_RETRY_S", "DEFAULT_FAILURE_THRESHOLD"]

#: Seconds between probes of an unhealthy tier: "back in rotation within seconds".
DEFAULT_RETRY_S = 2.0
#: Consecutive failures that mark a tier unhealthy. One: a failed RPC to the master is not a
#: flake worth another 4 s wait.
DEFAULT_FAILURE_THRESHOLD = 1


class HealthTracker:
    """Counts consecutive failures of a remote tier and gates calls while it is unhealthy."""

    def __init__(self, *, retry_s: float = DEFAULT_RETRY_S,
                 failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not retry_s > 0:
            raise InvalidArgumentError(f"retry_s must be > 0, got {retry_s!r}")
        if not (isinstance(failure_threshold, int) and failure_threshold >= 1):
            raise InvalidArgumentError(f"failure_threshold must be an int >= 1, got {failure_threshold!r}")
        self._retry_s = float(retry_s)
        self._threshold = failure_threshold
        self._clock = clock
        self._lock = threading.Lock()
        self._healthy = True
        self._failures = 0
        self._next_probe = 0.0
        self.skipped = 0
        self.transitions = 0

    @property
    def healthy(self) -> bool:
        """True while calls go through to the remote."""
        return self._healthy

    def allow(self) -> bool:
        """Whether the next call may go to the remote (always while healthy; one probe per
        ``retry_s`` while unhealthy)."""
        with self._lock:
            if self._healthy:
                return True
            now = self._clock()
            if now >= self._next_probe:
                self._next_probe = now + self._retry_s
                return True
            self.skipped += 1
            return False

    def probe_due(self) -> bool:
        """Whether the tier is unhealthy and a probe would be let through now (takes nothing:
        the probe itself still asks :meth:`allow`)."""
        with self._lock:
            return not self._healthy and self._clock() >= self._next_probe

    def success(self) -> None:
        """A call reached the remote and got an answer: back in rotation."""
        with self._lock:
            self._failures = 0
            if not self._healthy:
                self._healthy = True
                self.transitions += 1

    def failure(self) -> None:
        """A call could not reach the remote (RPC error, I/O error, timeout)."""
        with self._lock:
            self._failures += 1
            if self._healthy and self._failures >= self._threshold:
                self._healthy = False
                self.transitions += 1
            if not self._healthy:
                self._next_probe = self._clock() + self._retry_s

    def as_dict(self) -> dict:
        """Health fields for ``stats()``."""
        return {"healthy": self._healthy, "consecutive_failures": self._failures,
                "skipped_calls": self.skipped, "health_transitions": self.transitions}
