"""The exceptions tairstore raises.

Every failure a caller can act on is a :class:`StoreError`; the subclass says whose fault it is
and what to do next (the idea of py-lmdb's and trio's small exception sets):

- the caller passed something wrong: :class:`InvalidArgumentError`, :class:`SessionError`;
- the store is full: :class:`CapacityError` (and :class:`DiskFullError` for a full disk);
- the bytes on disk are damaged: :class:`CorruptionError`;
- the store was closed, or is held by another process: :class:`ClosedError`,
  :class:`StoreLockedError`;
- the directory is not a store, or of a newer format: :class:`FormatError`;
- the disk failed in a way that makes further durability promises a lie: :class:`FatalIOError`;
- a peer spoke the wire protocol wrongly: :class:`ProtocolError`;
- the caller's token does not allow the operation: :class:`PermissionDeniedError`;
- a named thing (namespace, instance) does not exist: :class:`NotFoundError`.
"""

from __future__ import annotations

__all__ = [
    "StoreError",
    "InvalidArgumentError",
    "SessionError",
    "LeaseExpiredError",
    "CapacityError",
    "DiskFullError",
    "CorruptionError",
    "ClosedError",
    "StoreLockedError",
    "FormatError",
    "FatalIOError",
    "ProtocolError",
    "PermissionDeniedError",
    "NotFoundError",
]


class StoreError(Exception):
    """Base class of every error tairstore raises on purpose."""


class InvalidArgumentError(StoreError, ValueError):
    """The caller passed a value the store cannot accept (key length, block size, mode...)."""


class SessionError(StoreError):
    """A write session was used wrongly: unknown session, key not in it, wrong size, reused."""


class LeaseExpiredError(SessionError):
    """The write session's lease ran out and the store aborted it; start a new session."""


class CapacityError(StoreError):
    """The write cannot fit.

    Attributes:
        dimension: which limit is full, e.g. ``"tier:dram"``, ``"tier:ssd"``, ``"block_size"``.
    """

    def __init__(self, message: str, dimension: str = "") -> None:
        super().__init__(message)
        self.dimension = dimension


class DiskFullError(CapacityError):
    """The file system returned ENOSPC; the write failed cleanly and reads keep working."""


class CorruptionError(StoreError):
    """Bytes on disk failed their checksum or do not parse as the format says."""


class ClosedError(StoreError):
    """The store (or client) was closed; open it again to go on."""


class StoreLockedError(StoreError):
    """Another process holds the data directory."""


class FormatError(StoreError):
    """The directory is not a tairstore data directory, or was written by a newer version."""


class FatalIOError(StoreError):
    """An fsync or write failed in a way that leaves durability unknown.

    The store refuses further writes after this (retrying an fsync can report success for data
    that was dropped); close and reopen it, which recovers from the log.
    """


class ProtocolError(StoreError):
    """A frame broke the wire protocol.

    Attributes:
        remote: True when the peer sent the bad bytes, False when we were asked to send them.
        code: the error code to answer with on the wire.
    """

    def __init__(self, message: str, *, remote: bool = True, code: int = 0) -> None:
        super().__init__(message)
        self.remote = remote
        self.code = code


class PermissionDeniedError(StoreError):
    """The credentials are missing, unknown, or do not cover this namespace or operation."""


class NotFoundError(StoreError):
    """A named object (namespace, instance group, session id) does not exist."""
