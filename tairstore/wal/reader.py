"""Replaying the WAL: which records a restart applies, and which bytes it drops and why.

The rules, with the crash that justifies each at the branch that applies it (see also the
theory of operation in ``tairstore.wal.log``):

1. Files are read in first-LSN order. A file is read until its end, its first bad record, or the
   next file's first LSN.
2. Records of a file carry consecutive LSNs starting at the LSN in its name.
3. The next file continues the log only if its first LSN is the next LSN expected; otherwise the
   log ends there, and every later file is reported as dropped.
4. Every byte that is not replayed is reported as ``reporter(bytes_dropped, reason)``. Without a
   reporter the drops are logged as warnings. A reporter that raises turns drops into errors
   (a paranoid mode); the exception propagates out of the iteration.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Callable, Iterator, NamedTuple

from tairstore.errors import CorruptionError
from tairstore.fileio import FileSystem
from tairstore.format.wal import HEADER_SIZE, FrameDecoder, RecordType
from tairstore.wal.records import Record, decode

__all__ = ["LogReplay", "LogCheck", "read_log", "scan_end", "check_log", "list_files",
           "wal_file_name", "wal_path"]

Reporter = Callable[[int, str], None]

_log = logging.getLogger("tairstore.wal")

# 20 digits hold any u64, so lexical order of names is LSN order too (handy with `ls`).
_NAME = re.compile(r"^(\d{20})\.wal$")


def wal_file_name(first_lsn: int) -> str:
    """The name of the WAL file whose first record has LSN ``first_lsn``."""
    return f"{first_lsn:020d}.wal"


def wal_path(directory: str, first_lsn: int) -> str:
    """``directory`` joined with :func:`wal_file_name`."""
    return os.path.join(directory, wal_file_name(first_lsn))


def list_files(fs: FileSystem, directory: str) -> list[tuple[int, str]]:
    """``(first_lsn, path)`` of every WAL file in ``directory``, in LSN order (empty if none)."""
    if not fs.exists(directory):
        return []
    out = []
    for name in fs.listdir(directory):
        m = _NAME.match(name)
        # LSN 0 is never assigned, so a file claiming it is not ours.
        if m and int(m.group(1)) > 0:
            out.append((int(m.group(1)), os.path.join(directory, name)))
    out.sort()
    return out


def _warn(dropped: int, reason: str) -> None:
    _log.warning("WAL replay dropped %d bytes: %s", dropped, reason)


class LogReplay:
    """Iterator of ``(lsn, record)`` returned by :func:`read_log`.

    While and after iterating, :attr:`last_lsn` is the last valid LSN of the chain so far
    (records below ``from_lsn`` are checked but not yielded; a chain with no record yet ends at
    its first file's LSN - 1, and an empty directory at 0), and :attr:`next_lsn` is where a
    writer opened after this replay must start.
    """

    def __init__(self, fs: FileSystem, directory: str, from_lsn: int, reporter: Reporter | None):
        self._fs = fs
        self._dir = directory
        self._from = from_lsn
        self._report = reporter or _warn
        self.last_lsn = 0
        #: Where replay stopped early: ``(path, offset, reason)`` of a bad record inside a
        #: file, or ``(path, -1, reason)`` of each file after a gap. See :func:`check_log`.
        self.stops: list[tuple[str, int, str]] = []
        self._gen = self._walk()

    @property
    def next_lsn(self) -> int:
        """The LSN a writer opened after this replay must assign first.

        ``last_lsn + 1``, but never below ``from_lsn``: if the checkpoint is ahead of the log
        (an unsynced tail was lost in "none" or "batch" mode), reusing the LSNs it covers would
        make replay skip the new records.
        """
        return max(self.last_lsn + 1, self._from, 1)

    def __iter__(self) -> LogReplay:
        return self

    def __next__(self) -> tuple[int, Record]:
        return next(self._gen)

    def _walk(self) -> Iterator[tuple[int, Record]]:
        files = list_files(self._fs, self._dir)
        if not files:
            return
        start = 0
        for i, (first, _) in enumerate(files):
            if first <= self._from:
                start = i  # earlier files hold only records below from_lsn: not even read
        if self._from > 0 and files[start][0] > self._from:
            # Truncation only removes files whose records are all below the checkpoint, so the
            # first remaining file starts at or below checkpoint + 1. Here LSNs from_lsn ..
            # first-1 are in neither the checkpoint nor the log: durable records are lost.
            # That is not a torn tail, and replaying the rest would apply records without
            # their predecessors.
            raise CorruptionError(
                f"WAL starts at LSN {files[start][0]} but replay needs LSN {self._from}"
            )
        expected = files[start][0]
        self.last_lsn = expected - 1
        for i in range(start, len(files)):
            first, path = files[i]
            if first != expected:
                # A gap: the previous file ended (torn or corrupt) before this file's first
                # LSN. A writer that restarted after that tail would have started a file at
                # `expected`, and a roll starts one exactly after the last record. So this file
                # is from beyond lost records. Replaying it would skip them: the log ends here.
                why = f"after the end of the log (expected LSN {expected}, file starts at {first})"
                for _, later in files[i:]:
                    self.stops.append((later, -1, why))
                    self._report(self._size(later), f"{os.path.basename(later)}: {why}")
                return
            cap = files[i + 1][0] if i + 1 < len(files) else None
            data = self._read(path)
            dec = FrameDecoder(data)
            reason = None
            for frame in dec:
                if frame.lsn != expected:
                    # The checksum holds but the LSN does not follow: not a torn write but a
                    # foreign or buggy record. Stop before it, as for any corrupt record.
                    dec.offset = frame.offset
                    reason = f"LSN {frame.lsn} where {expected} was expected"
                    break
                try:
                    rec = decode(frame.type, frame.body)
                except CorruptionError as exc:
                    # A valid frame around an unparseable body: no crash makes one, but ending
                    # the file here like any corrupt record, rather than raising, keeps replay,
                    # scan_end and the next writer's start LSN in agreement.
                    dec.offset = frame.offset
                    reason = f"malformed body at LSN {frame.lsn}: {exc}"
                    break
                expected += 1
                self.last_lsn = frame.lsn
                if frame.lsn >= self._from:
                    yield frame.lsn, rec
                if expected == cap:
                    # Whatever follows in this file was superseded: a writer restarted after
                    # reading exactly this far and went on in the next file (normally this is
                    # the end of the file after a roll and nothing follows).
                    reason = f"superseded by {wal_file_name(cap)}"
                    break
            if reason is None or not reason.startswith("superseded"):
                if dec.dropped:
                    self.stops.append((path, dec.offset, reason or dec.reason or ""))
            reason = reason or dec.reason
            if dec.dropped:
                # A torn or corrupt record ends this file only: a writer restarted after this
                # tail starts the next file at exactly `expected`, which the check above accepts.
                self._report(dec.dropped, f"{os.path.basename(path)}: {reason}")

    def _read(self, path: str) -> bytearray:
        f = self._fs.open(path, readonly=True)
        try:
            buf = bytearray(f.size())
            n = f.pread_into(buf, 0)
        finally:
            f.close()
        # Short only if the file shrank between size() and the read; replay then sees a torn
        # tail, which is what the shorter file holds.
        del buf[n:]
        return buf

    def _size(self, path: str) -> int:
        f = self._fs.open(path, readonly=True)
        try:
            return f.size()
        finally:
            f.close()


def read_log(
    fs: FileSystem, directory: str, *, from_lsn: int = 0, reporter: Reporter | None = None
) -> LogReplay:
    """Replay the records with LSN >= ``from_lsn``, in LSN order, across files.

    Pass ``from_lsn = checkpoint + 1``. After the iteration, ``.next_lsn`` is the ``next_lsn``
    for :class:`~tairstore.wal.log.WalWriter`. It is never below ``from_lsn``, so a checkpoint
    ahead of a lost unsynced tail is not reused.

    Raises:
        CorruptionError: while iterating, if the log no longer holds ``from_lsn`` (its files
            start later). Torn or corrupt records never raise: they end the file or the log
            and go to ``reporter(bytes_dropped, reason)``.
        OSError: reading the directory or a file failed.
    """
    return LogReplay(fs, directory, from_lsn, reporter)


def scan_end(fs: FileSystem, directory: str, *, from_lsn: int = 0) -> int:
    """The last valid LSN of the log as replay from ``from_lsn`` sees it. 0 when empty."""
    replay = LogReplay(fs, directory, from_lsn, reporter=lambda n, why: None)
    for _ in replay:
        pass
    return replay.last_lsn


#: How many LSNs past the point where replay stopped :func:`check_log` looks for a valid
#: record (one search of the rest of the file each): damage that swallowed more records than
#: this inside one file is still found through any later file.
RESYNC_WINDOW = 64


class LogCheck(NamedTuple):
    """What :func:`check_log` found; read-only, nothing is changed."""

    files: int  # WAL files present
    first_lsn: int  # first LSN of the first file (0 without files)
    last_lsn: int  # the end of the valid chain, as replay sees it
    starts_after: bool  # the files start after from_lsn: records from_lsn.. are gone
    dropped_bytes: int  # bytes replay would not replay
    reasons: tuple[str, ...]  # why, per place replay stopped
    valid_after: int  # valid records with LSN >= from_lsn beyond a place replay stopped
    commits_after: int  # COMMIT entries among them (committed blocks replay would drop)
    max_lsn: int  # the highest LSN of any valid record seen

    @property
    def damaged(self) -> bool:
        """A damaged record is followed by valid ones that replay would drop (M1)."""
        return self.valid_after > 0


def check_log(fs: FileSystem, directory: str, *, from_lsn: int = 0) -> LogCheck:
    """Check the log as :func:`read_log` from ``from_lsn`` would replay it, without replaying.

    A torn tail (nothing valid after the bad bytes) is the normal end of a log after a crash.
    Valid records *after* the place replay stops are not: replay would silently drop them,
    and they may be acknowledged writes. They are found by searching the rest of the file for
    a record with one of the next :data:`RESYNC_WINDOW` LSNs, and by decoding the files after
    a gap.
    """
    files = list_files(fs, directory)
    dropped = 0

    def count(n: int, why: str) -> None:
        nonlocal dropped
        dropped += n

    replay = LogReplay(fs, directory, from_lsn, count)
    starts_after = False
    try:
        for _ in replay:
            pass
    except CorruptionError:
        starts_after = True
    max_lsn = replay.last_lsn
    valid = commits = 0
    for path, offset, _why in replay.stops:
        data = replay._read(path)
        start = _resync(data, offset, replay.last_lsn + 1)
        if start is None:
            continue
        for frame in FrameDecoder(data, start):
            max_lsn = max(max_lsn, frame.lsn)
            if frame.lsn < from_lsn:
                continue
            valid += 1
            if frame.type == RecordType.COMMIT:
                commits += _commit_entries(frame)
    return LogCheck(len(files), files[0][0] if files else 0, replay.last_lsn, starts_after,
                    dropped, tuple(why for _, _, why in replay.stops), valid, commits, max_lsn)


def _resync(data: bytearray, offset: int, expected: int) -> int | None:
    """Offset of the first valid record at or after ``offset`` (the file's start for a file
    after a gap) carrying one of the LSNs ``expected`` .. + RESYNC_WINDOW, or None."""
    if offset < 0:
        return 0 if next(iter(FrameDecoder(data)), None) is not None else None
    best = None
    for lsn in range(expected, expected + RESYNC_WINDOW):
        needle = lsn.to_bytes(8, "little")
        pos = data.find(needle, offset + 1)
        while pos >= 0:
            start = pos - (HEADER_SIZE - 8)
            if start > offset and (best is None or start < best):
                frame = next(iter(FrameDecoder(data, start)), None)
                if frame is not None and frame.lsn == lsn:
                    best = start
                    break
            pos = data.find(needle, pos + 1)
        if best is not None:
            break
    return best


def _commit_entries(frame) -> int:
    try:
        return len(decode(frame.type, frame.body).entries)
    except CorruptionError:
        return 0
