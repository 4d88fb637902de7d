"""Write sessions: the unit of the two-phase write.

A session is created by :meth:`Store.start_write`, which reserves space for every key that is
not stored or being written yet; :meth:`Store.write` fills one reservation; and
:meth:`Store.finish_write` commits the keys the caller names and releases the rest. A session
whose lease runs out is aborted by the store's reaper, and every later use of it raises
:class:`~tairstore.errors.LeaseExpiredError`.

States (the table :data:`TRANSITIONS`, not scattered ifs)::

    open ──finish──▶ finished
      │ └──abort (abort_write, close)──▶ aborted
      └──expire (the lease ran out)──▶ expired

Every transition happens through :meth:`WriteSession.transition`, with the store lock held, and
in the same critical section as the release of the session's reservations: a session is never
expired or aborted while its reservations stay counted. :meth:`WriteSession.check_usable` only
reads the state; the store decides expiry (under its lock) before calling it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tairstore.errors import LeaseExpiredError, SessionError

__all__ = ["WriteSession", "RemoteTierSession", "PendingBlock", "TRANSITIONS", "NO_SLOT"]

#: "This path cannot take the block" (:meth:`Writes.put_produced`): no DRAM reservation, or
#: the key stored or being written already.
NO_SLOT = object()

OPEN, FINISHED, ABORTED, EXPIRED = "open", "finished", "aborted", "expired"

#: (state, event) -> next state. Anything not listed is a bookkeeping bug (SessionError).
TRANSITIONS = {
    (OPEN, "finish"): FINISHED,
    (OPEN, "abort"): ABORTED,
    (OPEN, "expire"): EXPIRED,
}

_USE_ERRORS = {
    FINISHED: (SessionError, "write session {id} is already finished"),
    ABORTED: (SessionError, "write session {id} was aborted"),
    EXPIRED: (LeaseExpiredError, "write session {id}: its lease ran out and it was aborted; "
              "start a new session (or ask for a longer lease_s)"),
}


@dataclass(slots=True)
class PendingBlock:
    """One reserved key of a session."""

    size: int
    dram: Any = None  # DRAM arena slot, or None
    ssd: Any = None  # SSD reservation, or None
    written: bool = False
    crc: int = 0
    generation: int = 0
    location: Any = None  # SSD location once written
    parent: bytes | None = None  # previous key of its chain (for leaf-aware eviction)
    deferred: bool = False  # write-back: committed from DRAM, its SSD write comes later


@dataclass(eq=False)
class WriteSession:
    """A two-phase write in progress.

    Attributes:
        id: the session id (unique within a store's lifetime).
        namespace: the namespace all its keys belong to.
        keys_to_write: the requested keys that were not already stored or being written, in
            request order; only these may be passed to ``write``.
        deadline: ``time.monotonic()`` value after which the store aborts the session.
    """

    id: int
    namespace: str
    keys_to_write: list[bytes]
    lease_s: float
    deadline: float
    pending: dict[bytes, PendingBlock] = field(default_factory=dict, repr=False)
    state: str = OPEN
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def transition(self, event: str) -> str:
        """Move to the state :data:`TRANSITIONS` gives for ``event`` (store lock held).

        The caller releases the session's reservations in the same critical section.

        Raises:
            SessionError: ``event`` is not allowed in the current state.
        """
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise SessionError(f"write session {self.id}: cannot {event} a session that is {self.state}")
        self.state = nxt
        return nxt

    def check_usable(self) -> None:
        """Raise the error for using a session that is not open (caller holds ``lock``).

        Only reads the state: whether the lease ran out is decided by the store, under its
        lock, where expiring also releases the reservations.
        """
        if self.state != OPEN:
            cls, msg = _USE_ERRORS[self.state]
            raise cls(msg.format(id=self.id))

    @property
    def expired(self) -> bool:
        """True once the lease has run out."""
        return time.monotonic() > self.deadline


@dataclass(eq=False)
class RemoteTierSession(WriteSession):
    """A write session of a namespace whose strategy sends its blocks to the remote tier.

    It reserves nothing locally and logs nothing: ``write`` copies each payload into
    :attr:`buffers` (``write_view`` hands out that buffer), and ``finish_write`` puts the
    committed keys to the remote tier in one batch. Its lease is checked on every use, as a
    local session's is; an abandoned one holds only its buffers.
    """

    sizes: dict[bytes, int] = field(default_factory=dict, repr=False)
    buffers: dict[bytes, bytearray] = field(default_factory=dict, repr=False)
    written: set[bytes] = field(default_factory=set, repr=False)

    def check_open(self) -> None:
        """Raise if the session cannot be used; expire it if its lease ran out (lock held)."""
        if self.state == OPEN and self.expired:
            self.transition("expire")
            self.buffers.clear()
        self.check_usable()
