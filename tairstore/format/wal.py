"""WAL record framing: the one place the write-ahead log's bytes are defined.

A WAL file is a sequence of records laid end to end, with no file header and no padding::

    offset  size  field
    0       4     masked_crc32c   u32 LE  mask(crc32c(bytes 4..17 of the header + body))
    4       4     body_length     u32 LE  bytes of body that follow the header
    8       1     type            u8      a :class:`RecordType`
    9       8     lsn             u64 LE  log sequence number, +1 per record, never 0
    17      n     body                    the record body (msgpack, see ``tairstore.wal.records``)

The checksum covers the length, type, LSN and body: everything but itself. Covering the length
means a flipped bit in it that still points inside the file is caught as a checksum mismatch
rather than silently re-framing the rest of the file. The checksum is masked (as LevelDB does)
because bodies may embed CRCs of their own.

Type 0 is never written, and LSN 0 is never assigned, so a header of zeros (a tail the file
system extended but never filled, which ext4 and XFS can leave after a power loss) is always
recognised as such. Types 5..255 are reserved for later formats; a reader that meets one treats
it as corruption, because replaying past a record it does not understand could apply later
records without an earlier one.

Decoding never raises on bad bytes: :class:`FrameDecoder` stops at the first record that does not
check out and records why and where, and the log reader (``tairstore.wal.log``) decides what that
means for the log as a whole.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from tairstore.errors import InvalidArgumentError
from tairstore.format.checksum import crc32c, mask, unmask

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAX_BODY_LENGTH",
    "MAX_LSN",
    "RecordType",
    "Frame",
    "FrameDecoder",
    "encode_record",
]

#: masked_crc32c, body_length, type, lsn.
HEADER = struct.Struct("<IIBQ")
HEADER_SIZE = HEADER.size  # 17
assert HEADER_SIZE == 17

# WAL bodies are metadata: a COMMIT of a few thousand keys is a few hundred KiB. A declared
# length above this is a corrupt length field, and refusing it keeps a reader from trying to
# allocate or wait for gigabytes because of one flipped bit.
MAX_BODY_LENGTH = 64 << 20

#: LSNs are u64 on disk.
MAX_LSN = (1 << 64) - 1

# The checksummed part of the header (body_length, type, lsn) starts after the crc.
_CRC_FROM = 4
_CRC = struct.Struct("<I")
_HEADER_TAIL = struct.Struct("<IBQ")
_ZERO_HEADER = bytes(HEADER_SIZE)


class RecordType(enum.IntEnum):
    """The record types. 0 is reserved (zeroed space); 5..255 are free for later formats."""

    PREPARE = 1
    COMMIT = 2
    ABORT = 3
    DELETE = 4


_KNOWN_TYPES = frozenset(int(t) for t in RecordType)


class Frame(NamedTuple):
    """One record that passed every check: its type, LSN, body and place in the buffer."""

    type: int
    lsn: int
    body: memoryview
    offset: int
    end: int


def encode_record(rtype: int, lsn: int, body) -> bytes:
    """Frame ``body`` as one record of type ``rtype`` with ``lsn``; returns header + body.

    Raises:
        InvalidArgumentError: unknown type, LSN outside 1..2**64-1, or body over the limit.
    """
    if rtype not in _KNOWN_TYPES:
        raise InvalidArgumentError(f"unknown WAL record type {rtype!r}")
    if not 0 < lsn <= MAX_LSN:
        raise InvalidArgumentError(f"WAL LSN {lsn!r} out of range")
    n = len(body)
    if n > MAX_BODY_LENGTH:
        raise InvalidArgumentError(f"WAL body of {n} bytes exceeds {MAX_BODY_LENGTH}")
    # The checksummed part of the header is packed apart, so the body is copied once, by join.
    tail = _HEADER_TAIL.pack(n, rtype, lsn)
    crc = crc32c(body, crc32c(tail))
    return b"".join((_CRC.pack(mask(crc)), tail, body))


class FrameDecoder:
    """Walks a buffer of records, yielding :class:`Frame` until the end or the first bad one.

    After iteration stops, :attr:`offset` is the first byte not consumed, :attr:`reason` says why
    iteration stopped early (``None`` for a clean end of buffer) and :attr:`dropped` is how many
    bytes were left unread. The caller may also stop early (e.g. at an LSN it does not want);
    :attr:`offset` is then just past the last frame it received.

    Every step either consumes at least :data:`HEADER_SIZE` bytes or stops, so any input ends.
    """

    __slots__ = ("_view", "offset", "reason")

    def __init__(self, buf, offset: int = 0) -> None:
        self._view = memoryview(buf).cast("B")
        self.offset = offset
        self.reason: str | None = None

    @property
    def dropped(self) -> int:
        """Bytes from :attr:`offset` to the end of the buffer."""
        return len(self._view) - self.offset

    def __iter__(self) -> FrameDecoder:
        return self

    def __next__(self) -> Frame:
        view = self._view
        pos = self.offset
        left = len(view) - pos
        if self.reason is not None or left == 0:
            raise StopIteration
        if left < HEADER_SIZE:
            # The writer crashed while the header was going out (or the tail is zeroed space).
            # Nothing after this can be a record: stop, the caller reports the bytes.
            zero = not any(view[pos:])
            return self._stop("zero-filled tail" if zero else "truncated header")
        header = view[pos : pos + HEADER_SIZE]
        if header == _ZERO_HEADER:
            # Type 0 / LSN 0 are never written: the file system extended the file but the data
            # never reached the disk (power loss after a size update). End of the log.
            return self._stop("zero-filled tail")
        stored, length, rtype, lsn = HEADER.unpack(header)
        if length > MAX_BODY_LENGTH:
            # No writer produces this: the length field itself is damaged.
            return self._stop(f"bad length {length}")
        end = pos + HEADER_SIZE + length
        if end > len(view):
            # Either the writer crashed mid-record (a torn write, the common case) or the length
            # is damaged and points past the end; the two cannot be told apart, and both mean
            # nothing valid follows in this buffer.
            return self._stop(f"truncated record (length {length}, {left} bytes left)")
        if crc32c(view[pos + _CRC_FROM : end]) != unmask(stored):
            # A torn write that happened to leave a plausible length, or bit rot.
            return self._stop("checksum mismatch")
        if rtype not in _KNOWN_TYPES:
            # The checksum holds, so a writer meant this: a newer format. Replaying past it
            # could apply later records without this one, so it ends the log like corruption.
            return self._stop(f"unknown record type {rtype}")
        self.offset = end
        return Frame(rtype, lsn, view[pos + HEADER_SIZE : end], pos, end)

    def _stop(self, reason: str):
        self.reason = reason
        raise StopIteration

