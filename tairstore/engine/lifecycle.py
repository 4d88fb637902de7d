"""The store's lifecycle and its write journal: open / closed / failed, and WAL-then-index order.

Two small parts every other part of the engine shares:

- :class:`Lifecycle` says whether the store may be used (not closed) and written (no fatal I/O
  failure, in the foreground or in a background thread). After an fsync failure the
  durability of what was written is unknown, so the store refuses writes until reopened.
- :class:`Journal` appends a record to the WAL and queues its index change under the store
  lock, so LMDB applies changes in LSN order, and makes a record as durable as the durability
  mode promises before the caller acknowledges (W2).
"""

from __future__ import annotations

import logging
from typing import Any

from tairstore.errors import ClosedError, FatalIOError

__all__ = ["Lifecycle", "Journal"]

log = logging.getLogger("tairstore.engine.store")


class Lifecycle:
    """Open, closed, or failed; the WAL and index report background failures through it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.closed = False
        self.fatal: BaseException | None = None
        self.sources: list[Any] = []  # parts with a ``failure`` attribute (WAL, index)

    def check_open(self) -> None:
        """Raise :class:`ClosedError` once the store is closed."""
        if self.closed:
            raise ClosedError("the store is closed; open it again with tairstore.open()")

    def check_writable(self) -> None:
        """Raise if the store is closed or refuses writes after an I/O failure."""
        self.check_open()
        if self.fatal is None:
            # A background thread (WAL flush, index writer) may have hit the I/O error.
            for part in self.sources:
                if part.failure:
                    self.fail(part.failure)
                    break
        if self.fatal is not None:
            raise FatalIOError(
                f"the store refuses writes after an I/O failure ({self.fatal}); close and reopen it"
            )

    def fail(self, exc: BaseException) -> None:
        """Record a fatal I/O failure: no more writes (durability is unknown from here)."""
        if self.fatal is None:
            self.fatal = exc
            log.error("store %s refuses writes from now on: %s", self.path, exc)


class Journal:
    """The WAL plus the index writer's queue, in LSN order.

    Args:
        durability: ``"sync"``, ``"batch"`` or ``"none"`` (see :mod:`tairstore.config`).
    """

    def __init__(self, durability: str) -> None:
        self.durability = durability
        self.wal: Any = None  # WalWriter once recovery has told the next LSN
        self.index: Any = None

    @property
    def enabled(self) -> bool:
        """False for a volatile store (no WAL)."""
        return self.wal is not None

    def log(self, rec: Any, ops: list) -> int:
        """Append to the WAL and queue the index change, in LSN order (store lock held)."""
        lsn = self.wal.append(rec)
        if ops:
            self.index.enqueue(lsn, ops)
        return lsn

    def make_durable(self, lsn: int) -> None:
        """What the durability mode promises before an acknowledgement (no store lock held).

        ``sync``: the record and the payloads it names are fsynced (group commit).
        ``batch`` / ``none``: the record is handed to the OS, so ``kill -9`` cannot take it.
        """
        if self.durability == "sync":
            self.wal.sync(lsn)
        else:
            self.wal.write_through(lsn)
