"""The SSD tier: an append-only, self-describing segment log.

Theory of operation
-------------------
Blocks are records (layout: :mod:`tairstore.format.segment`) appended to segment files
``<directory>/<id:012d>.seg``. Only the newest segment, the *head*, is written; a process that
opens the log always starts a new head, so segments of earlier runs are read-only and a torn
tail left in one by a crash is only dead space.

Writing is two steps, matching the store's two-phase write. :meth:`SegmentLog.reserve` takes the
lock only to hand out the next ``header + namespace + key + raw_len`` bytes of the head (rolling
to a new segment when it is full) and to check capacity. :meth:`SegmentLog.write` then builds the
header and issues one positional ``pwritev`` of header and payload, straight from the caller's
buffer, without the lock: many threads write different reservations at once. A payload that
compresses leaves the rest of its reservation unwritten; such gaps, like abandoned
reservations, read as zeros and :func:`scan_records` steps over them.

Durability is the caller's to order: :meth:`SegmentLog.sync` fdatasyncs every segment written
since the last call and then fsyncs the directory if segments were created, so the WAL's group
commit calls it right before it fsyncs a COMMIT and a durable COMMIT never names bytes, or a
segment file, that a power loss can take away. Segment creation itself does not fsync the
directory: that would stall every reservation behind a disk flush at each roll.

Readers pin a segment for the length of a read; :meth:`SegmentLog.delete_segment` marks it
doomed (no new pins) and the last reader out closes, unlinks and fsyncs the directory, so a file
is never removed under a reader (invariant R2) and requests never wait for deletion. A read checks
the header crc, that the record holds the namespace and key asked for (a stale location never
returns another key's bytes), and the crc of the raw payload (invariant R1).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from tairstore.errors import (
    CapacityError, ClosedError, CorruptionError, DiskFullError, FatalIOError,
    InvalidArgumentError, ReadIOError, SegmentGoneError,
)
from tairstore.fileio import REAL_FS, File, FileSystem
from tairstore.format.checksum import crc32c
from tairstore.format.codec import compress, decompress_into
from tairstore.format.segment import (
    FLAG_COMMITTED, FLAG_TOMBSTONE, FLAG_ZSTD, HEADER_SIZE, MAGIC, MAX_HEADER_LEN, MAX_KEY_LEN, MAX_NAMESPACE_LEN,
    MAX_PAYLOAD_LEN, decode_header, encode_header, header_length, record_length,
)

__all__ = [
    "SegmentLog", "Reservation", "Location", "ScannedRecord", "SegmentGoneError", "ReadIOError",
    "scan_records", "segment_file_name", "DEFAULT_SEGMENT_BYTES", "CAPACITY_DIMENSION",
]

_log = logging.getLogger(__name__)

#: Big enough that per-file costs (directory entries, fds, fsyncs) stay small, small enough that
#: compaction rewrites little live data to free one.
DEFAULT_SEGMENT_BYTES = 256 << 20
#: The dimension that :class:`CapacityError` and :class:`DiskFullError` carry for this tier.
CAPACITY_DIMENSION = "tier:ssd"
_SEGMENT_NAME = re.compile(r"^(\d{12})\.seg$")
# Gaps are stepped over in reads of this size: large enough to cost few syscalls, small enough
# not to matter for memory.
_ZERO_SKIP_CHUNK = 64 << 10
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
#: Records per pwritev in write_many: two buffers each, well below IOV_MAX (1024).
_IOV_RUN = 256
_NEW, _OPEN, _CLOSED = "new", "open", "closed"

Reporter = Callable[[int, str], None]
"""Called with ``(bytes_dropped, reason)`` for each stretch of a segment a scan could not use."""


def segment_file_name(segment_id: int) -> str:
    """The file name of segment ``segment_id``."""
    return f"{segment_id:012d}.seg"


class Location(NamedTuple):
    """Where a record landed. The store persists ``(segment, offset, length)``; reading the
    header gives the rest back."""

    segment: int
    offset: int
    length: int
    flags: int
    stored_len: int
    raw_len: int
    crc: int


class ScannedRecord(NamedTuple):
    """One record found by a scan. ``verified`` is True when its payload crc was checked."""

    namespace: str
    key: bytes
    generation: int
    flags: int
    raw_len: int
    crc: int
    location: Location
    verified: bool


class _Segment:
    """One segment file and its accounting; fields change only under the log's lock."""

    __slots__ = ("id", "path", "file", "size", "live", "inflight", "pins", "doomed", "retired")

    def __init__(self, sid: int, path: str, file: File, size: int) -> None:
        self.id = sid
        self.path = path
        self.file = file
        self.size = size  # bytes handed out: the file's length plus unwritten reservations
        self.live = 0  # bytes the store declared live (mark_live - mark_dead)
        self.inflight = 0  # bytes reserved but not yet written or abandoned
        self.pins = 0  # readers and pending reservations
        self.doomed = False  # delete requested: no new pins; the last unpin unlinks
        self.retired = False  # file closed (and unlinked if doomed); exactly once


class Reservation:
    """Space handed out by :meth:`SegmentLog.reserve`; write it once or abandon it."""

    __slots__ = ("segment", "offset", "length", "raw_len", "_seg", "_done")

    def __init__(self, seg: _Segment, offset: int, length: int, raw_len: int) -> None:
        self.segment = seg.id
        self.offset = offset
        self.length = length
        self.raw_len = raw_len
        self._seg = seg
        self._done = False

    def __repr__(self) -> str:
        return f"Reservation(segment={self.segment}, offset={self.offset}, length={self.length})"


@functools.lru_cache(maxsize=4096)
def _namespace_bytes(namespace: str) -> bytes:
    if not isinstance(namespace, str):
        raise InvalidArgumentError("namespace must be a str")
    ns = namespace.encode("utf-8")
    if not 1 <= len(ns) <= MAX_NAMESPACE_LEN:
        raise InvalidArgumentError(f"namespace must be 1..{MAX_NAMESPACE_LEN} utf-8 bytes")
    return ns


def _key_bytes(key) -> bytes:
    key = bytes(key)
    if not 1 <= len(key) <= MAX_KEY_LEN:
        raise InvalidArgumentError(f"key must be 1..{MAX_KEY_LEN} bytes, got {len(key)}")
    return key


def _write_error(exc: OSError, what: str) -> Exception:
    if exc.errno in _DISK_FULL_ERRNOS:
        return DiskFullError(f"{what}: disk full ({exc})", dimension=CAPACITY_DIMENSION)
    return FatalIOError(f"{what}: {exc}")


class SegmentLog:
    """The append-only segment log of the SSD tier (see the module docstring).

    Args:
        fs: the file system seam; tests pass a fault-injecting one.
        directory: where segment files live; created if missing.
        capacity_bytes: the most bytes all segment files together may hold, reservations
            included; :meth:`reserve` refuses beyond it.
        segment_bytes: a segment rolls over once the next record would pass this size.
        compression: ``None`` or ``"zstd"``.
        zstd_level: zstd level when compressing.
        shuffle: byte-plane shuffle 16-bit elements before zstd (fp16/bf16 KV pages).
    """

    def __init__(
        self,
        fs: FileSystem = REAL_FS,
        directory: str = ".",
        *,
        capacity_bytes: int,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        compression: str | None = None,
        zstd_level: int = 3,
        shuffle: bool = True,
    ) -> None:
        if compression not in (None, "zstd"):
            raise InvalidArgumentError(f"unknown compression {compression!r}")
        if capacity_bytes <= 0 or segment_bytes <= 0:
            raise InvalidArgumentError("capacity_bytes and segment_bytes must be positive")
        self._fs = fs
        self._dir = directory
        self._capacity = capacity_bytes
        self._segment_bytes = segment_bytes
        self._compress = compression == "zstd"
        self._level = zstd_level
        self._shuffle = shuffle
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # one sync at a time; see sync()
        self._segments: dict[int, _Segment] = {}
        self._head: _Segment | None = None
        self._total = 0
        self._dirty: dict[int, _Segment] = {}
        self._dir_dirty = False
        self._failed: FatalIOError | None = None
        self._state = _NEW

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> SegmentLog:
        """List the existing segments and start a new head segment; returns ``self``.

        Costs one open and one size query per segment: records are not scanned.
        """
        if self._state != _NEW:
            raise InvalidArgumentError("SegmentLog.open() called twice")
        fs = self._fs
        f = None
        try:
            fs.makedirs(self._dir)
            max_id = 0
            removed = False
            for name in fs.listdir(self._dir):
                m = _SEGMENT_NAME.match(name)
                if not m:
                    continue
                sid = int(m.group(1))
                max_id = max(max_id, sid)
                path = os.path.join(self._dir, name)
                f = fs.open(path, readonly=True)
                size = f.size()
                if size == 0:
                    # A head that never got a record before the process ended holds nothing
                    # anything can point at; removing it keeps restarts from piling up files.
                    f.close()
                    fs.unlink(path)
                    removed = True
                    continue
                self._segments[sid] = _Segment(sid, path, f, size)
                self._total += size
            if removed:
                fs.fsync_dir(self._dir)
            with self._lock:
                self._new_head_locked(max_id + 1)
        except BaseException as exc:
            for seg in self._segments.values():
                seg.file.close()
            if f is not None:
                f.close()  # the one being sized when it failed (closing twice is harmless)
            if isinstance(exc, OSError):
                raise _write_error(exc, f"opening segment log in {self._dir!r}") from exc
            raise
        self._state = _OPEN
        return self

    def __enter__(self) -> SegmentLog:
        return self if self._state == _OPEN else self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Sync what was written, then close every segment file (after its last reader).

        Idempotent. Every other method raises :class:`ClosedError` afterwards. Raises
        :class:`FatalIOError` if the final sync failed (the files are closed anyway).
        """
        if self._state == _CLOSED:
            return
        error: BaseException | None = None
        try:
            if self._state == _OPEN and self._failed is None:
                try:
                    self.sync()
                except FatalIOError as exc:
                    error = exc
        finally:
            # Whatever the final sync raised (also an exception that is not an I/O error),
            # the files are closed: a store that failed to open must not keep descriptors.
            with self._lock:
                self._state = _CLOSED
                idle = [s for s in self._segments.values() if s.pins == 0 and not s.retired]
                for seg in idle:
                    seg.retired = True
            for seg in idle:
                seg.file.close()
        if error is not None:
            raise error

    def _check_open_locked(self) -> None:
        if self._state != _OPEN:
            raise ClosedError(f"segment log is {self._state}")

    def _check_writable_locked(self) -> None:
        self._check_open_locked()
        if self._failed is not None:
            raise FatalIOError(f"segment log refuses writes after a failed sync: {self._failed}")

    # -- accounting --------------------------------------------------------------------------

    @property
    def head_segment(self) -> int:
        """Id of the segment new reservations go to."""
        return self._head.id if self._head is not None else 0

    @property
    def total_bytes(self) -> int:
        """Bytes of all segment files, outstanding reservations included."""
        return self._total

    @property
    def retiring_bytes(self) -> int:
        """Bytes of deleted segments still counted in :attr:`total_bytes`.

        A deleted segment's file goes, and its bytes leave the total, when its last pin (a
        reader, or ``sync`` fsyncing it) is dropped; until then the room is coming, not gone.
        """
        with self._lock:
            return sum(s.size for s in self._segments.values() if s.doomed and not s.retired)

    @property
    def segment_bytes(self) -> int:
        """The size at which the head segment rolls over."""
        return self._segment_bytes

    @property
    def capacity_bytes(self) -> int:
        """The limit :meth:`reserve` enforces on :attr:`total_bytes`."""
        return self._capacity

    def segment_ids(self) -> list[int]:
        """Ids of the segments not being deleted, oldest first."""
        with self._lock:
            return sorted(s.id for s in self._segments.values() if not s.doomed)

    def segment_stats(self) -> dict[int, dict[str, int]]:
        """Per segment: ``total`` bytes, ``live`` bytes (as the store declared them), ``dead``
        bytes (neither live nor being written) and ``inflight`` reserved bytes."""
        with self._lock:
            return {
                s.id: {"total": s.size, "live": s.live, "inflight": s.inflight,
                       "dead": max(0, s.size - s.live - s.inflight)}
                for s in self._segments.values() if not s.doomed
            }

    def dead_bytes(self, segment: int) -> int:
        """Bytes of ``segment`` that are neither live nor reserved (0 for an unknown id)."""
        with self._lock:
            s = self._segments.get(segment)
            return 0 if s is None else max(0, s.size - s.live - s.inflight)

    def mark_live(self, segment: int, length: int) -> bool:
        """Count ``length`` bytes of ``segment`` as live (a committed, indexed record).

        Returns False when the segment is unknown, i.e. the index points at a lost file.
        """
        with self._lock:
            s = self._segments.get(segment)
            if s is None or s.doomed:
                return False
            s.live += length
            return True

    def mark_dead(self, segment: int, length: int) -> None:
        """Stop counting ``length`` bytes of ``segment`` as live (deleted, replaced, moved)."""
        with self._lock:
            s = self._segments.get(segment)
            if s is not None:
                s.live = max(0, s.live - length)

    # -- writing -----------------------------------------------------------------------------

    def reserve(self, namespace: str, key: bytes, raw_len: int) -> Reservation:
        """Allocate the on-disk bytes of one record of ``raw_len`` payload bytes.

        Raises:
            CapacityError: (dimension ``"tier:ssd"``) the log would exceed ``capacity_bytes``.
            InvalidArgumentError: bad namespace, key or length.
            FatalIOError, DiskFullError: a new segment file could not be created.
        """
        ns = _namespace_bytes(namespace)
        key = _key_bytes(key)
        if not 0 <= raw_len <= MAX_PAYLOAD_LEN:
            raise InvalidArgumentError(f"payload length {raw_len} out of range")
        # Compression only ever shrinks a payload, so the raw size always fits what is written.
        return self._reserve_length(record_length(len(ns), len(key), raw_len), raw_len)

    def _reserve_length(self, length: int, raw_len: int) -> Reservation:
        with self._lock:
            self._check_writable_locked()
            if self._total + length > self._capacity:
                raise CapacityError(
                    f"ssd tier full: {self._total} + {length} > {self._capacity} bytes",
                    dimension=CAPACITY_DIMENSION)
            seg = self._head
            # A record larger than a segment gets one of its own: only a non-empty head rolls.
            if seg.size and seg.size + length > self._segment_bytes:
                seg = self._new_head_locked(seg.id + 1)
            offset = seg.size
            seg.size += length
            seg.inflight += length
            seg.pins += 1  # held until write/abandon, so deletion waits for the writer too
            self._total += length
        return Reservation(seg, offset, length, raw_len)

    def roll(self) -> int:
        """Start a new head segment if the current one holds anything; returns the head id.

        Compaction rolls before a full pass, so the records of the old head can be compacted
        too (the head itself is never a compaction candidate: writers are appending to it).
        """
        with self._lock:
            self._check_writable_locked()
            if self._head.size:
                self._new_head_locked(self._head.id + 1)
            return self._head.id

    def _new_head_locked(self, sid: int) -> _Segment:
        path = os.path.join(self._dir, segment_file_name(sid))
        try:
            f = self._fs.open(path, create=True)
        except OSError as exc:
            raise _write_error(exc, f"creating segment {path!r}") from exc
        seg = self._head = self._segments[sid] = _Segment(sid, path, f, 0)
        # Not durable until sync() fsyncs the directory, which happens before any COMMIT that
        # could name a record in it.
        self._dir_dirty = True
        return seg

    def write(self, res: Reservation, namespace: str, key: bytes, data, *, generation: int,
              crc: int | None = None, committed: bool = False) -> Location:
        """Write one record into ``res`` with a single ``pwritev`` from ``data``'s buffer.

        ``crc`` is the crc32c of ``data`` when the caller already has it (it is trusted; a wrong
        one makes every read of the record fail). After an I/O error the reservation is released
        as dead space and :meth:`abandon` on it is a no-op; after an argument error it is
        untouched.

        Raises:
            DiskFullError: ENOSPC / EDQUOT; the log keeps working.
            FatalIOError: any other write error, or the log failed a sync earlier.
        """
        ns = _namespace_bytes(namespace)
        key = _key_bytes(key)
        view = memoryview(data).cast("B")
        raw_len = len(view)
        if res._done:
            raise InvalidArgumentError(f"{res!r} was already written or abandoned")
        if record_length(len(ns), len(key), raw_len) > res.length:
            raise InvalidArgumentError(f"record of {raw_len} payload bytes exceeds {res!r}")
        if crc is None:
            crc = crc32c(view)
        stored, flags = compress(view, self._level, self._shuffle) if self._compress else (view, 0)
        if committed:
            flags |= FLAG_COMMITTED
        header = encode_header(flags=flags, namespace=ns, key=key, generation=generation,
                               raw_len=raw_len, stored_len=len(stored), payload_crc=crc)
        return self._put(res, header, stored, flags, raw_len, crc)

    def write_many(self, records: list[tuple[Reservation, str, bytes, Any, int, int]], *,
                   committed: bool = False) -> list[Location]:
        """Write many records, one ``pwritev`` per run of adjacent reservations.

        ``records`` are ``(reservation, namespace, key, data, generation, crc)``, with the
        crc32c of ``data`` computed by the caller. Reservations taken one after another from
        the same head segment are adjacent, so a batch of uncompressed blocks is usually one
        system call. A compressed record is shorter than its reservation and ends its run (the
        gap after it stays zeros, which a scan steps over). Errors as for :meth:`write`; on one,
        every reservation not yet written is released as dead space.
        """
        encoded = []
        for res, namespace, key, data, generation, crc in records:
            ns = _namespace_bytes(namespace)
            key = _key_bytes(key)
            view = memoryview(data).cast("B")
            if res._done:
                raise InvalidArgumentError(f"{res!r} was already written or abandoned")
            if record_length(len(ns), len(key), len(view)) > res.length:
                raise InvalidArgumentError(f"record of {len(view)} payload bytes exceeds {res!r}")
            stored, flags = compress(view, self._level, self._shuffle) if self._compress else (view, 0)
            if committed:
                flags |= FLAG_COMMITTED
            header = encode_header(flags=flags, namespace=ns, key=key, generation=generation,
                                   raw_len=len(view), stored_len=len(stored), payload_crc=crc)
            encoded.append((res, header, stored, flags, len(view), crc))
        out: list[Location] = []
        i = 0
        try:
            while i < len(encoded):
                j = i + 1
                # A run: same segment, each record filling its reservation and the next one
                # starting where it ends; at most IOV_RUN records (two buffers each) per call.
                while (j < len(encoded) and j - i < _IOV_RUN
                       and encoded[j][0]._seg is encoded[i][0]._seg
                       and encoded[j - 1][0].offset + encoded[j - 1][0].length == encoded[j][0].offset
                       and len(encoded[j - 1][1]) + len(encoded[j - 1][2]) == encoded[j - 1][0].length):
                    j += 1
                out += self._put_run(encoded[i:j])
                i = j
        except BaseException:
            for rec in encoded[len(out):]:
                self._finish(rec[0], dirty=False)
            raise
        return out

    def _put_run(self, run: list) -> list[Location]:
        """One ``pwritev`` of adjacent records (see :meth:`write_many`)."""
        first = run[0][0]
        written = False
        try:
            if self._failed is not None or self._state != _OPEN:
                with self._lock:
                    self._check_writable_locked()
            iov = []
            for _, header, stored, _, _, _ in run:
                iov.append(header)
                iov.append(stored)
            first._seg.file.pwritev(iov, first.offset)
            written = True
        except OSError as exc:
            raise _write_error(exc, f"writing segment {first.segment}") from exc
        finally:
            for rec in run:
                self._finish(rec[0], dirty=written)
        return [Location(res.segment, res.offset, len(header) + len(stored), flags, len(stored),
                         raw_len, crc)
                for res, header, stored, flags, raw_len, crc in run]

    def mark_committed(self, loc: Location, namespace: str, key: bytes, generation: int) -> None:
        """Rewrite ``loc``'s header in place with ``FLAG_COMMITTED`` set.

        Same length, new header crc. The caller (``finish_write``) does this before logging
        COMMIT, and the next :meth:`sync` makes it durable together with the payload. A crash
        that tears this small write leaves a header that fails its crc: a rebuild from segments
        then skips the record, while normal recovery goes by the WAL and never needs the flag.
        """
        header = encode_header(flags=loc.flags | FLAG_COMMITTED, namespace=_namespace_bytes(namespace),
                               key=_key_bytes(key), generation=generation, raw_len=loc.raw_len,
                               stored_len=loc.stored_len, payload_crc=loc.crc)
        seg = self._pin(loc.segment)
        try:
            with self._lock:
                self._check_writable_locked()
            try:
                seg.file.pwrite(header, loc.offset)
            except OSError as exc:
                raise _write_error(exc, f"writing segment {loc.segment}") from exc
            with self._lock:
                if self._state == _OPEN:
                    self._dirty[seg.id] = seg
        finally:
            self._unpin(seg)

    def write_tombstone(self, namespace: str, key: bytes, generation: int) -> Location:
        """Append a delete marker for ``key``, so a rebuild from segments does not resurrect it."""
        res = self.reserve(namespace, key, 0)
        try:
            header = encode_header(flags=FLAG_TOMBSTONE, namespace=_namespace_bytes(namespace),
                                   key=_key_bytes(key), generation=generation, raw_len=0,
                                   stored_len=0, payload_crc=crc32c(b""))
        except BaseException:
            self.abandon(res)
            raise
        return self._put(res, header, b"", FLAG_TOMBSTONE, 0, 0)

    def _put(self, res: Reservation, header: bytes, stored, flags: int, raw_len: int,
             crc: int) -> Location:
        length = len(header) + len(stored)
        written = False
        try:
            if self._failed is not None or self._state != _OPEN:
                with self._lock:
                    self._check_writable_locked()
            res._seg.file.pwritev((header, stored), res.offset)
            written = True
        except OSError as exc:
            raise _write_error(exc, f"writing segment {res.segment}") from exc
        finally:
            self._finish(res, dirty=written)
        return Location(res.segment, res.offset, length, flags, len(stored), raw_len, crc)

    def copy_record(self, segment: int, offset: int, length: int, *, namespace: str, key: bytes,
                    expected_crc: int | None = None) -> Location:
        """Compaction: verify a record, then append a byte-identical copy at the head.

        The copy keeps the record's generation and flags (a compressed payload is copied as is,
        not re-encoded). The caller retargets its index to the returned location only if the
        index still points at the old one, and otherwise treats the copy as dead space.

        Raises:
            CorruptionError: the record does not verify (it is not copied).
            SegmentGoneError: the segment was deleted meanwhile.
            CapacityError, DiskFullError, FatalIOError: as for :meth:`reserve` / :meth:`write`.
        """
        self._read(segment, offset, length, None, namespace, key, expected_crc)
        seg = self._pin(segment)
        try:
            raw = seg.file.pread(length, offset)
        except OSError as exc:
            raise ReadIOError(f"reading segment {segment}: {exc}") from exc
        finally:
            self._unpin(seg)
        if len(raw) != length:
            raise CorruptionError(f"record at {segment}:{offset} runs past the end of file")
        h = decode_header(raw)
        res = self._reserve_length(length, h.raw_len)
        written = False
        try:
            res._seg.file.pwrite(raw, res.offset)
            written = True
        except OSError as exc:
            raise _write_error(exc, f"writing segment {res.segment}") from exc
        finally:
            self._finish(res, dirty=written)
        return Location(res.segment, res.offset, length, h.flags, h.stored_len, h.raw_len,
                        h.payload_crc)

    def abandon(self, res: Reservation) -> None:
        """Give up a reservation that will never be written; its bytes become dead space.

        Nothing is written: the bytes stay a zero gap, which a scan steps over. A no-op on a
        reservation already written or released.
        """
        self._finish(res, dirty=False)

    def _finish(self, res: Reservation, *, dirty: bool) -> None:
        seg = res._seg
        with self._lock:
            if res._done:
                return
            res._done = True
            seg.inflight -= res.length
            if dirty and self._state == _OPEN:
                # Marked only after pwritev returned, so a sync() that starts after write()
                # returns always sees it.
                self._dirty[seg.id] = seg
            retire = self._unpin_locked(seg)
        if retire:
            self._retire(seg)

    # -- reading -----------------------------------------------------------------------------

    def _pin(self, segment: int) -> _Segment:
        with self._lock:
            self._check_open_locked()
            seg = self._segments.get(segment)
            if seg is None or seg.doomed:
                raise SegmentGoneError(f"segment {segment} does not exist or is being deleted")
            seg.pins += 1
            return seg

    def _unpin_locked(self, seg: _Segment) -> bool:
        """Drop one pin; True when the caller must now retire the segment (outside the lock)."""
        seg.pins -= 1
        if seg.pins == 0 and not seg.retired and (seg.doomed or self._state == _CLOSED):
            seg.retired = True
            return True
        return False

    def _unpin(self, seg: _Segment) -> None:
        with self._lock:
            retire = self._unpin_locked(seg)
        if retire:
            self._retire(seg)

    def read_into(self, segment: int, offset: int, length: int, out, *, namespace: str,
                  key: bytes, expected_crc: int | None = None) -> int:
        """Read and verify one record; its raw payload lands in the writable buffer ``out``.

        Uncompressed payloads are read straight into ``out`` (one copy). On error the content
        of ``out`` is unspecified.

        Returns:
            The raw payload length.

        Raises:
            CorruptionError: the bytes at the location fail a check (header crc, namespace/key,
                length, payload crc, decoding).
            ReadIOError: the disk failed to return the bytes (not a corruption: they may be
                intact). SegmentGoneError: the segment is gone.
            InvalidArgumentError: ``out`` is read-only or shorter than the payload.
        """
        dst = memoryview(out).cast("B")
        if dst.readonly:
            raise InvalidArgumentError("read_into needs a writable buffer")
        return len(self._read(segment, offset, length, dst, namespace, key, expected_crc))

    def read(self, segment: int, offset: int, length: int, *, namespace: str, key: bytes,
             expected_crc: int | None = None) -> bytearray:
        """Like :meth:`read_into`, into a new buffer of exactly the payload's length."""
        return self._read(segment, offset, length, None, namespace, key, expected_crc)

    def _read(self, segment: int, offset: int, length: int, dst, namespace: str, key: bytes,
              expected_crc: int | None):
        """Verify the record and fill ``dst`` (or a new bytearray); returns the filled part."""
        ns = _namespace_bytes(namespace)
        key = _key_bytes(key)
        hlen = header_length(len(ns), len(key))
        if length < hlen:
            raise CorruptionError(f"location length {length} is shorter than its header")
        seg = self._pin(segment)
        try:
            buf = seg.file.pread(hlen, offset)
            if len(buf) >= HEADER_SIZE and (buf[6], buf[7]) != (len(ns), len(key)):
                # Another record's header is longer or shorter: read all of it, so damage is
                # told apart from a stale location by the precise reason below.
                buf = seg.file.pread(MAX_HEADER_LEN, offset)
            h = decode_header(buf)
            if h.namespace != namespace or h.key != key:
                raise CorruptionError(
                    f"stale location: segment {segment} offset {offset} holds "
                    f"{h.namespace!r}/{h.key.hex()}, not {namespace!r}/{key.hex()}")
            if h.flags & FLAG_TOMBSTONE or hlen + h.stored_len != length:
                raise CorruptionError(f"stale location: record at {segment}:{offset} is a "
                                      f"tombstone or {hlen + h.stored_len} bytes, not {length}")
            if expected_crc is not None and h.payload_crc != expected_crc:
                raise CorruptionError(f"stale location: payload crc 0x{h.payload_crc:08x} "
                                      f"!= expected 0x{expected_crc:08x}")
            raw_len = h.raw_len
            if dst is None:
                result = target = bytearray(raw_len)
            elif len(dst) < raw_len:
                raise InvalidArgumentError(f"buffer of {len(dst)} bytes < payload of {raw_len}")
            else:
                result = target = dst[:raw_len]
            if h.flags & FLAG_ZSTD:
                stored = bytearray(h.stored_len)
                got = seg.file.pread_into(stored, offset + hlen)
                if got == h.stored_len and decompress_into(stored, h.flags, target) != raw_len:
                    raise CorruptionError("payload decoded to the wrong length")
            else:
                got = seg.file.pread_into(target, offset + hlen)
            if got != h.stored_len:
                raise CorruptionError(f"record at {segment}:{offset} runs past the end of file")
            if crc32c(target) != h.payload_crc:
                raise CorruptionError(f"payload crc mismatch at {segment}:{offset}")
            return result
        except OSError as exc:
            # A media error makes this block unreadable now, which is not proof its bytes are
            # bad: a distinct error lets the store answer a miss and count it, not stop.
            raise ReadIOError(f"reading segment {segment}: {exc}") from exc
        finally:
            self._unpin(seg)

    # -- deletion and durability -------------------------------------------------------------

    def delete_segment(self, segment: int) -> None:
        """Delete a segment file once its readers and writers are done; returns at once.

        New reads of it fail with :class:`SegmentGoneError` from now on. The file is closed,
        unlinked and the directory fsynced by the last reader out (or here, if none).
        """
        self.finish_delete(self.doom_segment(segment))

    def doom_segment(self, segment: int) -> "_Segment | None":
        """The first half of :meth:`delete_segment`: from now on new reads of ``segment`` fail
        with :class:`SegmentGoneError`. Returns what :meth:`finish_delete` must be given (None
        when a reader will remove the file, or it is gone already).

        The halves let a caller mark a segment deleted under its own lock and leave the unlink
        (which frees the file's cached pages: milliseconds for a large segment) and the
        directory fsync to after it lets go of that lock.
        """
        with self._lock:
            self._check_open_locked()
            seg = self._segments.get(segment)
            if seg is None or seg.doomed:
                return None
            if seg is self._head:
                raise InvalidArgumentError("cannot delete the head segment")
            seg.doomed = True
            self._dirty.pop(segment, None)
            if seg.pins != 0 or seg.retired:
                return None  # the last reader out retires it
            seg.retired = True
            return seg

    def finish_delete(self, doomed: "_Segment | None") -> None:
        """Close and unlink a segment :meth:`doom_segment` returned, then fsync the directory."""
        if doomed is not None:
            self._retire(doomed)

    def _retire(self, seg: _Segment) -> None:
        """Close a segment's file and, when doomed, remove it. Runs outside the lock."""
        try:
            seg.file.close()
            if seg.doomed:
                self._fs.unlink(seg.path)
                # Until the directory is fsynced a crash may bring the file back; that is safe
                # (nothing in the index points at it any more, it is dead space to reclaim).
                self._fs.fsync_dir(self._dir)
        except OSError as exc:
            # This may run in a reader's thread: log rather than fail the read that drained it.
            _log.warning("deleting segment %s failed: %s", seg.path, exc)
        if seg.doomed:
            with self._lock:
                self._segments.pop(seg.id, None)
                self._total -= seg.size

    def sync(self) -> None:
        """Make every record written so far durable, and created segment files with them.

        Raises:
            FatalIOError: an fsync failed; the log refuses writes from now on (a retried fsync
                may report success for data the kernel already dropped).
        """
        # Serialised: a caller arriving during another sync must run its own pass, because its
        # writes may have been marked dirty after that pass took its list.
        with self._sync_lock:
            with self._lock:
                self._check_writable_locked()
                segs = [s for s in self._dirty.values() if not s.doomed]
                self._dirty.clear()
                dir_dirty, self._dir_dirty = self._dir_dirty, False
                for s in segs:
                    s.pins += 1
            try:
                for s in segs:
                    s.file.fsync()
                if dir_dirty:
                    self._fs.fsync_dir(self._dir)
            except OSError as exc:
                self._failed = FatalIOError(f"fsync of segment log failed: {exc}")
                raise self._failed from exc
            finally:
                for s in segs:
                    self._unpin(s)

    # -- scanning ----------------------------------------------------------------------------

    def scan(self, segment_id: int, *, reporter: Reporter | None = None,
             verify_payload: bool = True) -> Iterator[ScannedRecord]:
        """Walk the records of one segment (for ``fsck`` and rebuilding the index).

        See :func:`scan_records`. The segment stays pinned until the iterator is exhausted or
        closed.
        """
        seg = self._pin(segment_id)
        try:
            yield from scan_records(seg.file, segment_id, reporter=reporter,
                                    verify_payload=verify_payload)
        finally:
            self._unpin(seg)


def _skip_zeros(file: File, pos: int, size: int) -> int:
    """Offset of the first non-zero byte at or after ``pos`` (``size`` if none)."""
    while pos < size:
        chunk = file.pread(min(_ZERO_SKIP_CHUNK, size - pos), pos)
        if not chunk:
            return size
        rest = chunk.lstrip(b"\0")
        if rest:
            return pos + len(chunk) - len(rest)
        pos += len(chunk)
    return size


_MAGIC_BYTES = MAGIC.to_bytes(4, "little")


def _next_header(file: File, pos: int, size: int) -> int | None:
    """Offset of the first record header at or after ``pos`` that verifies (None if none): a
    resync after damage. A payload would have to hold the magic followed by a header whose
    crc32c matches to be taken for one."""
    while pos < size:
        chunk = file.pread(min(_ZERO_SKIP_CHUNK, size - pos), pos)
        if not chunk:
            return None
        at = chunk.find(_MAGIC_BYTES)
        while at >= 0:
            cand = pos + at
            try:
                decode_header(file.pread(min(MAX_HEADER_LEN, size - cand), cand))
                return cand
            except CorruptionError:
                at = chunk.find(_MAGIC_BYTES, at + 1)
        if len(chunk) < 4:
            return None
        pos += len(chunk) - 3  # a magic across the chunk boundary is found in the next one
    return None


def _payload_error(file: File, h, payload_offset: int) -> str:
    """Why the payload of verified header ``h`` is bad, or '' if its crc matches."""
    stored = bytearray(h.stored_len)
    if file.pread_into(stored, payload_offset) != h.stored_len:
        return "payload shorter than its header says"
    raw = stored
    if h.flags & FLAG_ZSTD:
        raw = bytearray(h.raw_len)
        try:
            decompress_into(stored, h.flags, raw)
        except CorruptionError as exc:
            return str(exc)
    if crc32c(raw) != h.payload_crc:
        return "payload crc mismatch"
    return ""


def scan_records(file: File, segment_id: int, *, reporter: Reporter | None = None,
                 verify_payload: bool = True) -> Iterator[ScannedRecord]:
    """Yield the records of one segment file, in file order.

    A record is yielded only if its header verifies and, with ``verify_payload``, its payload
    crc too (``ScannedRecord.verified``). Everything else goes to ``reporter`` as
    ``(bytes_dropped, reason)``; the scan never raises CorruptionError.
    """
    report = reporter or (lambda n, reason: None)
    size = file.size()
    pos = 0
    while pos < size:
        head = file.pread(min(MAX_HEADER_LEN, size - pos), pos)
        if head[:1] == b"\0":
            nxt = _skip_zeros(file, pos, size)
            if nxt >= size:
                # Zeros up to the end: the file's length reached the disk but the data behind it
                # did not (a crash mid-write on a file system that orders metadata first). It is
                # the end of what was written, reported so fsck can show it.
                report(size - pos, "zero-filled tail")
                return
            # A gap between records: an abandoned reservation, the unused tail of a compressed
            # one, or a reservation whose writer had not finished at a crash. Never written, so
            # zeros; the next record starts at the first non-zero byte (a magic never starts
            # with a zero byte).
            pos = nxt
            continue
        try:
            h = decode_header(head)
        except CorruptionError as exc:
            # No verified header, so no length to find the next record by. At the tail this is
            # the writer crashing mid-header (a torn write, the end of the log); in the middle,
            # damage, or a write-back flush into an earlier reservation that a crash tore while
            # later records were durable. Those later records are intact: resume at the next
            # offset where a header verifies (magic and header crc).
            nxt = _next_header(file, pos + 1, size)
            report((size if nxt is None else nxt) - pos, str(exc))
            if nxt is None:
                return
            pos = nxt
            continue
        end = pos + h.length
        if end > size:
            # The header reached the disk and the payload's end did not: the writer crashed in
            # the middle of this record, so it is the end of what was written.
            report(size - pos, f"torn record: {h.length} bytes at {pos}, file ends at {size}")
            return
        verified = False
        if verify_payload:
            reason = _payload_error(file, h, pos + h.header_length)
            if reason:
                # The header's crc holds, so its length does and the next record can be found:
                # drop only this one (torn by a crash while later reservations were written,
                # or rotted) and go on.
                report(h.length, reason)
                pos = end
                continue
            verified = True
        loc = Location(segment_id, pos, h.length, h.flags, h.stored_len, h.raw_len,
                       h.payload_crc)
        yield ScannedRecord(h.namespace, h.key, h.generation, h.flags, h.raw_len,
                            h.payload_crc, loc, verified)
        pos = end
