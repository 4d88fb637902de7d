"""What goes wrong on a daemon's connections: counted in ``/metrics`` and logged, rate-limited.

Three kinds of event, each a sign of a misbehaving or hostile peer or of a network problem,
and none of them an error of the daemon itself:

- **protocol** errors: a frame or HTTP request that breaks the protocol (bad magic, a header
  over the limit, malformed HTTP, a body over the limit);
- **connection** errors: a peer that resets the connection, or leaves before its answer is
  written, or is too slow;
- **auth** failures: a missing or unknown token, or one that does not cover the request.

Each is counted at once (``tairstore_protocol_errors_total{server,kind}``,
``tairstore_connection_errors_total{server,kind}``, ``tairstore_auth_failures_total{server,kind}``)
and logged at WARNING, but at most once per ``interval_s`` per (kind of event, server): a
client that sends garbage in a loop must not fill the disk with log lines. The line after a
quiet interval says how many were not logged.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

__all__ = ["ConnectionEvents", "LOG_INTERVAL_S"]

log = logging.getLogger("tairstore.daemon")

#: At most one log line per (event category, server) per this many seconds.
LOG_INTERVAL_S = 10.0


class ConnectionEvents:
    """Counts and logs (rate-limited) protocol, connection and auth errors of one daemon.

    Args:
        metrics: a :class:`~tairstore.daemon.metrics.Metrics` (or anything with
            ``observe_error(category, server, kind)``), or None to only log.
        interval_s: the least time between two log lines of one (category, server).
        clock: the time source (monotonic seconds).
        logger: where the lines go.
    """

    def __init__(self, metrics: Any = None, *, interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger = log) -> None:
        self._observe = getattr(metrics, "observe_error", None)
        self.interval_s = interval_s
        self._clock = clock
        self._log = logger
        self._lock = threading.Lock()  # the HTTP API's worker threads may report too
        self._last: dict[tuple[str, str], float] = {}
        self._quiet: dict[tuple[str, str], int] = {}

    def protocol(self, server: str, kind: str, detail: str) -> None:
        """A peer broke the protocol of ``server`` (``"data"`` or ``"http"``)."""
        self._report("protocol", server, kind, detail)

    def connection(self, server: str, kind: str, detail: str) -> None:
        """A connection of ``server`` broke (``kind``: ``"reset"``, ``"timeout"``...)."""
        self._report("connection", server, kind, detail)

    def auth(self, server: str, error: BaseException) -> None:
        """A request to ``server`` was refused for its token: ``unauthenticated`` (missing or
        unknown) or ``forbidden`` (it does not cover the namespace or operation)."""
        from tairstore.daemon.auth import Unauthenticated

        kind = "unauthenticated" if isinstance(error, Unauthenticated) else "forbidden"
        self._report("auth", server, kind, str(error))

    def _report(self, category: str, server: str, kind: str, detail: str) -> None:
        if self._observe is not None:
            self._observe(category, server, kind)
        key = (category, server)
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._quiet[key] = self._quiet.get(key, 0) + 1
                return
            self._last[key] = now
            quiet = self._quiet.pop(key, 0)
        more = f" ({quiet} more not logged in the last {self.interval_s:g} s)" if quiet else ""
        self._log.warning("%s %s error (%s): %s%s", server, category, kind, detail, more)
