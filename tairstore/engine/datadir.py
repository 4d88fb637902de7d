"""The data directory: its layout, its format marker and its process lock.

Layout::

    DIR/TAIRSTORE     format marker (JSON: {"format": N, "created_ns": ...})
    DIR/LOCK          flock()ed while a process has the store open
    DIR/index/        LMDB environment
    DIR/wal/          write-ahead log files
    DIR/segments/     SSD segment files

The marker is written to a temporary name, fsynced, renamed into place and the directory fsynced,
so a crash during creation leaves either no marker (an empty directory we may initialise again)
or a whole one.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

from tairstore.errors import FormatError, StoreLockedError
from tairstore.fileio import FileSystem

__all__ = ["FORMAT_VERSION", "MARKER", "DataDir"]

#: Bumped when a change to any on-disk layout would make an older reader misread the store.
FORMAT_VERSION = 1
MARKER = "TAIRSTORE"
LOCK = "LOCK"
# Entries that may exist in a directory we are about to initialise (a crash during creation).
_INIT_LEFTOVERS = {MARKER + ".tmp", LOCK, "index", "wal", "segments"}


class DataDir:
    """Opens (and if asked, creates) a data directory and holds its lock until :meth:`close`."""

    def __init__(self, path: str, fs: FileSystem, *, create: bool = True) -> None:
        self.path = os.fspath(path)
        self.fs = fs
        self._lock_fd = -1
        if not fs.exists(self.path):
            if not create:
                raise FormatError(f"{self.path}: no such store (pass create=True to make one)")
            fs.makedirs(self.path)
        elif not os.path.isdir(self.path):
            raise FormatError(f"{self.path} is a file, not a tairstore data directory")
        marker = os.path.join(self.path, MARKER)
        if not fs.exists(marker):
            extra = set(fs.listdir(self.path)) - _INIT_LEFTOVERS
            if extra:
                raise FormatError(
                    f"{self.path} is not a tairstore data directory (it holds {sorted(extra)[:3]} "
                    "and no TAIRSTORE marker); point at an empty or new directory"
                )
            if not create:
                raise FormatError(f"{self.path}: no TAIRSTORE marker (pass create=True to make one)")
        self._acquire_lock()
        try:
            if not fs.exists(marker):
                self._write_marker(marker)
            self._check_marker(marker)
            for sub in ("index", "wal", "segments"):
                fs.makedirs(self.sub(sub))
        except BaseException:
            self.close()
            raise

    def sub(self, name: str) -> str:
        """Path of a subdirectory."""
        return os.path.join(self.path, name)

    def _acquire_lock(self) -> None:
        # flock, not fcntl record locks: it conflicts between two opens in one process too.
        fd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"{self.path} is open in another process or handle; close it there first"
            ) from None
        self._lock_fd = fd

    def _write_marker(self, marker: str) -> None:
        tmp = marker + ".tmp"
        body = json.dumps({"format": FORMAT_VERSION, "created_ns": time.time_ns()}).encode()
        f = self.fs.open(tmp, create=True)
        try:
            f.truncate(0)
            f.pwrite(body, 0)
            f.fsync()
        finally:
            f.close()
        self.fs.rename(tmp, marker)
        self.fs.fsync_dir(self.path)

    def _check_marker(self, marker: str) -> None:
        f = self.fs.open(marker, readonly=True)
        try:
            raw = f.pread(4096, 0)
        finally:
            f.close()
        try:
            version = int(json.loads(raw)["format"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{marker} is damaged ({exc}); restore it or rebuild the store") from None
        if version > FORMAT_VERSION:
            raise FormatError(
                f"{self.path} was written by format {version}; this tairstore reads up to "
                f"{FORMAT_VERSION}: upgrade tairstore"
            )

    def close(self) -> None:
        """Release the lock. Idempotent."""
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1
