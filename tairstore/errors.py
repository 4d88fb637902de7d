"""The exceptions tairstore raises.

Every failure a caller can act on is a :class:`StoreError`; the subclass says whose fault it is
and what to do next (the idea of py-lmdb's and trio's small exception sets):

- the caller passed something wrong: :class:`InvalidArgumentError`, :class:`SessionError`;
- the store is full: :class:`CapacityError` (and :class:`DiskFullError` for a full disk);
- a namespace's ``always:<tier>`` strategy names a tier that is missing or unhealthy:
  :class:`TierUnavailableError`;
- the bytes on disk are damaged: :class:`CorruptionError`; the store's metadata (index, WAL)
  cannot account for its data and ``open`` refuses: :class:`MetadataMismatchError` (its message
  names the fix, ``tairstore fsck DIR --rebuild``);
- the disk failed to return bytes that may well be intact: :class:`StoreIOError`
  (:class:`ReadIOError`, :class:`SegmentGoneError`) — deliberately *not* a corruption, so no
  caller drops a block because a read failed;
- the data directory cannot be used as given (a file, a dangling link, no permission):
  :class:`DataDirError`, :class:`DataDirPermissionError`;
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
    "TierUnavailableError",
    "CorruptionError",
    "MetadataMismatchError",
    "StoreIOError",
    "ReadIOError",
    "SegmentGoneError",
    "DataDirError",
    "DataDirPermissionError",
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


class TierUnavailableError(StoreError):
    """A namespace's ``always:<tier>`` strategy names a tier that cannot take the write now:
    the store has no such tier, or (the remote tier) it is unhealthy. Nothing was stored.

    Attributes:
        tier: the tier asked for (``"dram"``, ``"ssd"``, ``"remote"``).
    """

    def __init__(self, message: str, tier: str = "") -> None:
        super().__init__(message)
        self.tier = tier


class CorruptionError(StoreError):
    """Bytes on disk failed their checksum or do not parse as the format says."""


class MetadataMismatchError(CorruptionError):
    """The index, the WAL and the segments do not belong together or do not agree.

    ``open`` refuses rather than guess (guessing would let maintenance delete the only copies of
    blocks the index lost). Nothing was deleted or changed; ``tairstore fsck DIR --rebuild``
    rebuilds the index from the segments.

    Attributes:
        path: the data directory.
        problem: a short name of what was found, e.g. ``"index-missing"``, ``"index-foreign"``,
            ``"index-stale"``, ``"index-damaged"``, ``"wal-damaged"``, ``"wal-missing"``.
    """

    def __init__(self, path: str, problem: str, detail: str) -> None:
        super().__init__(
            f"{path}: {detail}. The store was not opened and nothing was changed; run "
            f"`tairstore fsck {path} --rebuild` to rebuild the index from the segments")
        self.path = path
        self.problem = problem


class StoreIOError(StoreError):
    """An I/O operation failed; unlike :class:`CorruptionError` this is no evidence of damage."""


class ReadIOError(StoreIOError):
    """The disk failed to return a record's bytes (``OSError`` on read, e.g. EIO).

    The bytes may be intact: the store answers a miss and counts a read error, and keeps the
    block; recovery and fsck keep it too and say so.
    """


class SegmentGoneError(StoreIOError):
    """The location names a segment that was deleted (or never existed).

    After compaction the index may already point elsewhere: the store should look the key up
    again before dropping it, and drop it only if the index still holds this location.
    """


class DataDirError(StoreError):
    """The data directory path cannot be used: empty, a file, under a file, a dangling link.

    Attributes:
        path: the path that was wrong (the directory, or the entry inside it).
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class DataDirPermissionError(DataDirError):
    """The process may not read or write a part of the data directory (EACCES / EPERM)."""


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
