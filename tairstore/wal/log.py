"""The write-ahead log: a group-committing writer and the replaying reader.

Theory of operation. The log is a chain of files ``<first_lsn:020d>.wal`` in one directory.
Records carry consecutive LSNs (+1 each). A file holds the records from its first LSN up to the
next file's first LSN minus one. The writer creates a file in exactly two situations:

- a roll: the current file is full. The old file is fsynced and closed first, so the new file
  begins exactly one past the old file's last record.
- opening: the writer never appends after an old tail, which may be torn. The store replays the
  log, and the writer starts a fresh file at the LSN after the last valid record. Files that
  would otherwise follow it, with first LSN >= next_lsn, belong to no chain and are moved aside.

So a reader follows one rule. It reads a file until the file ends, until a bad record, or until
the next file's first LSN, whichever comes first. The next file continues the log only if its
first LSN is exactly the next LSN expected. A torn tail that a restarted writer stepped over
therefore joins up cleanly. A gap, meaning lost durable records, ends the log.

Group commit (``sync``): callers append records into an in-memory buffer under a lock. Whoever
calls ``sync`` first becomes the leader. It takes the whole buffer, releases the lock, calls
``pre_sync`` (the store fsyncs segment files there, so a durable COMMIT never points at bytes
that are not durable), writes the batch with one pwrite, fsyncs once, then publishes
``durable_lsn`` and wakes everyone. Callers that arrive while a leader works wait on the
condition. When it finishes they are either covered or one of them leads the next batch.

This file holds the writer; the reader lives in ``tairstore.wal.reader`` and is re-exported here.
"""

from __future__ import annotations

import threading
from typing import Callable

from tairstore.config import DURABILITY_MODES
from tairstore.errors import ClosedError, FatalIOError, InvalidArgumentError
from tairstore.fileio import File, FileSystem
from tairstore.format.wal import encode_record
from tairstore.wal.reader import LogReplay, list_files, read_log, scan_end, wal_path
from tairstore.wal.records import Record, encode

__all__ = ["DURABILITY_MODES", "WalWriter", "read_log", "scan_end", "LogReplay", "drop_applied"]

#: Durability modes and what a crash does under each:
#: - "sync": ``sync(lsn)`` returns only after the records are fsynced. Acknowledged records
#:   survive kill -9 and power loss.
#: - "batch": a background thread fsyncs every ``batch_interval_s``. A power loss loses at most
#:   the last interval; ``sync(lsn)`` still blocks until durable for callers that need it.
#: - "none": records reach the OS (background flush, ``flush``, ``sync``) but are never fsynced.
#:   kill -9 loses only unflushed records; a power loss can lose anything not yet written back.
#: (The names are :data:`tairstore.config.DURABILITY_MODES`.)

# Above this many buffered bytes, ``append`` writes the buffer out itself. This bounds memory
# when nobody calls sync (modes "batch"/"none" between ticks) without adding an fsync.
_FLUSH_PENDING_BYTES = 4 << 20

_STALE_SUFFIX = ".stale"


class WalWriter:
    """Appends records to the WAL directory with group commit. Thread-safe.

    Args:
        fs: the file system seam (:data:`tairstore.fileio.REAL_FS` in production; tests pass
            a fault-injecting one).
        directory: the WAL directory (created if missing).
        durability: "sync", "batch" or "none" (see :data:`DURABILITY_MODES`).
        batch_interval_s: flush period of the background thread in "batch" and "none" modes.
        file_bytes: roll to a new file before one would grow past this.
        next_lsn: the LSN of the first record this writer appends (>= 1). Use
            ``read_log(...).next_lsn`` after replaying, or ``max(scan_end(...), checkpoint) + 1``.
        pre_sync: called by the leader before it writes a batch (not in "none" mode).

    Raises:
        InvalidArgumentError: a bad argument.
        FatalIOError: the directory or the first file could not be set up.
    """

    def __init__(
        self,
        fs: FileSystem,
        directory: str,
        *,
        durability: str = "sync",
        batch_interval_s: float = 0.005,
        file_bytes: int = 64 << 20,
        next_lsn: int,
        pre_sync: Callable[[], None] | None = None,
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise InvalidArgumentError(f"durability must be one of {DURABILITY_MODES}")
        if not directory:
            raise InvalidArgumentError("a WAL directory is required")
        if type(next_lsn) is not int or next_lsn < 1:
            raise InvalidArgumentError(f"next_lsn must be an int >= 1, got {next_lsn!r}")
        if file_bytes <= 0 or batch_interval_s <= 0:
            raise InvalidArgumentError("file_bytes and batch_interval_s must be positive")
        self._fs = fs
        self._dir = directory
        self._durability = durability
        self._fsync_data = durability != "none"
        self._file_bytes = file_bytes
        self._pre_sync = pre_sync if self._fsync_data else None

        self._cond = threading.Condition(threading.Lock())
        # All of the following are guarded by _cond.
        self._next_lsn = next_lsn
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._taken_lsn = next_lsn - 1  # last LSN a leader has taken out of _pending
        self._written_lsn = next_lsn - 1
        self._durable_lsn = next_lsn - 1
        self._leading = False
        self._error: BaseException | None = None
        # Records written through without pre_sync bump _owe_gen; a pre_sync that started
        # after generation g was taken pays everything up to g (_paid_gen).
        self._owe_gen = 0
        self._paid_gen = 0
        self._sync_lock = threading.Lock()  # one fsync at a time; also keeps rolls out of it
        self._closing = False
        self._closed = False
        # Owned by the current leader (and the constructor): the open file and its append offset.
        self._file: File
        self._file_first = next_lsn
        self._offset = 0

        try:
            fs.makedirs(directory)
            self._retire_stale(next_lsn)
            self._file = fs.open(wal_path(directory, next_lsn), create=True)
        except OSError as exc:
            raise FatalIOError(f"cannot open the WAL in {directory!r}: {exc}") from exc
        try:
            # The new file must survive a crash before any record in it is acknowledged;
            # otherwise a reader could find the old torn tail and no continuation.
            fs.fsync_dir(directory)
        except BaseException as exc:
            self._file.close()  # a writer that was never made keeps no descriptor
            if isinstance(exc, OSError):
                raise FatalIOError(f"cannot open the WAL in {directory!r}: {exc}") from exc
            raise

        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if durability != "sync":
            self._thread = threading.Thread(
                target=self._background, args=(batch_interval_s,), name="tairstore-wal", daemon=True
            )
            self._thread.start()

    # --- public API -------------------------------------------------------------------------

    @property
    def failure(self) -> BaseException | None:
        """The error that poisoned the writer, or None."""
        return self._error

    @property
    def last_lsn(self) -> int:
        """The LSN of the last appended record (``next_lsn - 1`` before any append)."""
        return self._next_lsn - 1

    @property
    def written_lsn(self) -> int:
        """Every record up to this LSN has been handed to the OS."""
        return self._written_lsn

    @property
    def durable_lsn(self) -> int:
        """Every record up to this LSN has been fsynced (never advances in "none" mode)."""
        return self._durable_lsn

    def append(self, rec: Record) -> int:
        """Buffer ``rec`` and return its LSN (previous + 1). Not durable until :meth:`sync`.

        Raises:
            InvalidArgumentError: ``rec`` is not a valid record.
            ClosedError: the writer was closed.
            FatalIOError: an earlier write or fsync failed.
        """
        rtype, body = encode(rec)
        with self._cond:
            self._check_open()
            lsn = self._next_lsn
            frame = encode_record(rtype, lsn, body)
            self._next_lsn = lsn + 1
            self._pending.append(frame)
            self._pending_bytes += len(frame)
            spill = self._pending_bytes >= _FLUSH_PENDING_BYTES and not self._leading
        if spill:
            self._group(lsn, durable=False)
        return lsn

    def sync(self, lsn: int) -> None:
        """Block until every record <= ``lsn`` is durable (written, in "none" mode).

        Raises:
            InvalidArgumentError: ``lsn`` was never appended.
            ClosedError: the writer was closed.
            FatalIOError: the write or fsync failed; the writer is now unusable.
        """
        with self._cond:
            self._check_open()
            if lsn >= self._next_lsn:
                raise InvalidArgumentError(f"LSN {lsn} was not appended (last {self.last_lsn})")
        self._group(lsn, durable=self._fsync_data)

    def flush(self) -> None:
        """Hand every buffered record to the OS, without fsync."""
        with self._cond:
            self._check_open()
            last = self._next_lsn - 1
        self._group(last, durable=False)

    def write_through(self, lsn: int) -> None:
        """Hand every record up to ``lsn`` to the OS now, without fsync and without ``pre_sync``.

        What ``batch`` and ``none`` durability acknowledge after: a record the OS holds
        survives ``kill -9``. Skipping ``pre_sync`` (the segment fsync) keeps fsyncs off the
        request path. Power-loss safety is kept twice over: recovery verifies the payload of
        every COMMIT it replays (one that reached the disk before its segment bytes is
        dropped, not trusted), and the next durable :meth:`sync` runs ``pre_sync`` before its
        fsync even if it has no new records to write.
        """
        with self._cond:
            self._check_open()
            if lsn >= self._next_lsn:
                raise InvalidArgumentError(f"LSN {lsn} was not appended (last {self.last_lsn})")
        self._group(lsn, durable=False, pre_sync=False)

    def truncate_before(self, lsn: int) -> None:
        """Delete whole files whose records all have LSN < ``lsn``. The current file is kept.

        Call it with ``checkpoint + 1`` once a checkpoint made state up to ``checkpoint``
        durable elsewhere.

        Raises:
            ClosedError: the writer was closed.
            FatalIOError: unlink or the directory fsync failed. The writer is not poisoned:
                a file that comes back after a crash only holds records older than the
                checkpoint, which replay skips.
        """
        with self._cond:
            self._check_open(allow_poisoned=True)
            # Read before listing: every file that starts below this one is finished. A roll
            # during the listing only makes us keep one more file.
            current_first = self._file_first
        try:
            files = list_files(self._fs, self._dir)
            victims = [
                path
                for (first, path), (next_first, _) in zip(files, files[1:])
                if next_first <= lsn and first < current_first
            ]
            for path in victims:
                self._fs.unlink(path)
            if victims:
                self._fs.fsync_dir(self._dir)
        except OSError as exc:
            raise FatalIOError(f"WAL truncation failed: {exc}") from exc

    def close(self) -> None:
        """Write and fsync what is buffered (no fsync in "none"), stop the thread, close the file.

        Idempotent. Raises :class:`FatalIOError` if that last write or fsync failed, and does
        not raise again if the writer was already poisoned.
        """
        with self._cond:
            if self._closing:
                while not self._closed:
                    self._cond.wait()
                return
            self._closing = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        failure: FatalIOError | None = None
        try:
            if self._error is None:
                try:
                    self._group(self._next_lsn - 1, durable=self._fsync_data)
                except FatalIOError as exc:
                    failure = exc
        finally:
            # Also when the last flush raised something else: waiters wake, the file closes.
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            try:
                self._file.close()
            except OSError:
                pass  # the data is already durable or already reported as lost
        if failure is not None:
            raise failure

    def __enter__(self) -> WalWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- group commit -----------------------------------------------------------------------

    def _group(self, lsn: int, durable: bool, pre_sync: bool = True) -> None:
        """Make records up to ``lsn`` written (and with ``durable``, fsynced): group commit.

        Two phases with separate leaders, so handing records to the OS never waits behind an
        fsync in progress (``batch``-mode acknowledgements write through while the background
        flush fsyncs):

        - write phase (leader flag ``_leading``): one thread takes everything buffered, runs
          ``pre_sync`` first when asked, and writes it with one ``pwrite``;
        - sync phase (``_sync_lock``): one thread fsyncs everything written so far, first
          paying ``pre_sync`` if records were written without it.
        """
        self._write_phase(lsn, pre_sync)
        if durable:
            self._sync_phase(lsn)

    def _write_phase(self, lsn: int, pre_sync: bool) -> None:
        cond = self._cond
        with cond:
            while True:
                if self._error is not None:
                    raise self._fatal()
                if self._written_lsn >= lsn:
                    return
                if self._closed:
                    raise ClosedError("the WAL writer is closed")
                if not self._leading:
                    break
                cond.wait()
            # Leader: take everything buffered so far, not just up to lsn, so followers that
            # appended meanwhile ride along in the same pwrite.
            self._leading = True
            frames, self._pending, self._pending_bytes = self._pending, [], 0
            first = self._taken_lsn + 1
            last = self._taken_lsn = self._next_lsn - 1
            run_pre_sync = bool(frames) and pre_sync and self._pre_sync is not None
            if frames and not pre_sync:
                self._owe_gen += 1
            gen = self._owe_gen
        try:
            if run_pre_sync:
                # Before the WAL bytes reach the OS at all: once written, the kernel may
                # persist them at any moment, and a COMMIT must never be durable before the
                # payload it points at.
                self._pre_sync()
                self._paid(gen)
            if frames:
                self._write(frames, first)
        except BaseException as exc:
            # The batch is out of the buffer and its LSNs are spent: later records would leave
            # a hole. Nothing is safe but to refuse all further work.
            self._poison(exc)
            raise self._fatal() from exc
        with cond:
            self._written_lsn = last
            self._leading = False
            cond.notify_all()

    def _sync_phase(self, lsn: int) -> None:
        with self._sync_lock:
            with self._cond:
                if self._error is not None:
                    raise self._fatal()
                if self._durable_lsn >= lsn:
                    return
                target = self._written_lsn
                owed = self._owe_gen > self._paid_gen and self._pre_sync is not None
                gen = self._owe_gen
                f = self._file
            try:
                if owed:
                    # Records were handed to the OS without the segment fsync (write_through):
                    # pay it before the fsync that makes them durable.
                    self._pre_sync()
                    self._paid(gen)
                f.fsync()
            except BaseException as exc:
                # Retrying an fsync can report success for pages the kernel already dropped.
                self._poison(exc)
                raise self._fatal() from exc
            with self._cond:
                self._durable_lsn = max(self._durable_lsn, target)
                self._cond.notify_all()

    def _paid(self, gen: int) -> None:
        """``pre_sync`` covered every record taken up to owe generation ``gen``."""
        with self._cond:
            self._paid_gen = max(self._paid_gen, gen)

    def _poison(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._leading = False
            self._cond.notify_all()

    def _write(self, frames: list[bytes], first_lsn: int) -> None:
        nbytes = sum(map(len, frames))
        if self._offset + nbytes <= self._file_bytes or (self._offset == 0 and len(frames) == 1):
            self._pwrite(frames)
            return
        # The batch crosses the size limit: split it at a record boundary and roll there, so
        # each file starts exactly at the LSN of its first record.
        chunk: list[bytes] = []
        chunk_bytes = 0
        lsn = first_lsn
        for frame in frames:
            used = self._offset + chunk_bytes
            if used and used + len(frame) > self._file_bytes:
                if chunk:
                    self._pwrite(chunk)
                    chunk, chunk_bytes = [], 0
                self._roll(lsn)
            chunk.append(frame)
            chunk_bytes += len(frame)
            lsn += 1
        self._pwrite(chunk)

    def _pwrite(self, frames: list[bytes]) -> None:
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        self._file.pwrite(data, self._offset)
        self._offset += len(data)

    def _roll(self, first_lsn: int) -> None:
        # The old file's tail must be durable before any record lands in the new one: a reader
        # only crosses into the new file if the old one ends exactly at first_lsn - 1. The
        # sync lock keeps a concurrent sync phase from fsyncing the file being closed.
        with self._sync_lock:
            if self._fsync_data:
                self._file.fsync()
            self._file.close()
            new_file = self._fs.open(wal_path(self._dir, first_lsn), create=True)
            with self._cond:
                # Owned from here on, so close() closes it also when the fsync below fails;
                # nothing is written to it before that fsync returns.
                self._file = new_file
            self._fs.fsync_dir(self._dir)
        self._offset = 0
        with self._cond:
            self._file_first = first_lsn

    def _background(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                # Written as write_through writes (no pre_sync while leading the write phase),
                # so acknowledgements arriving meanwhile never wait behind the segment fsync:
                # the sync phase pays that fsync, under its own lock, before the WAL's.
                lsn = self._next_lsn - 1
                self._write_phase(lsn, pre_sync=False)
                if self._fsync_data:
                    self._sync_phase(lsn)
            except (FatalIOError, ClosedError):
                return  # poisoned: the next append or sync reports it to a caller

    # --- helpers ----------------------------------------------------------------------------

    def _check_open(self, allow_poisoned: bool = False) -> None:
        if self._closing:
            raise ClosedError("the WAL writer is closed")
        if self._error is not None and not allow_poisoned:
            raise self._fatal()

    def _fatal(self) -> FatalIOError:
        exc = FatalIOError(f"the WAL writer failed and refuses further work: {self._error!r}")
        exc.__cause__ = self._error
        return exc

    def _is_empty(self, path: str) -> bool:
        f = self._fs.open(path, readonly=True)
        try:
            return f.size() == 0
        finally:
            f.close()

    def _retire_stale(self, next_lsn: int) -> None:
        # A file starting at or after next_lsn was made by an earlier writer beyond the point
        # where replay ended (a torn tail, or a gap before it). If it stayed, a later reader
        # that reaches its first LSN through our new records would replay old records as
        # ours. Empty ones go; others are kept aside for inspection.
        retired = False
        for first, path in list_files(self._fs, self._dir):
            if first < next_lsn:
                continue
            if first == next_lsn and self._is_empty(path):
                # The end marker a clean close leaves (drop_applied): exactly the file about to
                # be opened. Keeping it means the directory never passes through a state with
                # no WAL file, which open would take for a lost WAL.
                continue
            retired = True
            if self._is_empty(path):
                self._fs.unlink(path)
            else:
                self._fs.rename(path, path + _STALE_SUFFIX)
        if retired:
            # Durable before the new file exists: a crash must not leave the new file beside
            # an old one that still claims LSNs after it.
            self._fs.fsync_dir(self._dir)


def drop_applied(fs: FileSystem, directory: str, next_lsn: int) -> None:
    """After a clean close (every record is in the index, up to ``next_lsn - 1``), replace the
    log by one empty file named ``next_lsn``.

    The next open then replays nothing, and the empty file still says where the log stands:
    an index whose checkpoint is older than ``next_lsn - 1`` (a stale copy) is refused instead
    of silently missing what happened since (M1). The marker is made durable before the old
    files go, so no crash leaves a directory without a WAL file.

    Raises:
        OSError: a file operation failed (the caller logs it; the next open replays the files).
    """
    f = fs.open(wal_path(directory, next_lsn), create=True)
    f.close()
    fs.fsync_dir(directory)
    files = [path for first, path in list_files(fs, directory) if first != next_lsn]
    for path in files:
        fs.unlink(path)
    if files:
        fs.fsync_dir(directory)
