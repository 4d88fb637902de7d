"""The data directory: its layout, its format marker, its identity and its process lock.

Layout::

    DIR/TAIRSTORE     format marker (JSON: {"format": N, "store_id": "<32 hex>", "created_ns": ...})
    DIR/LOCK          flock()ed while a process has the store open
    DIR/index/        LMDB environment (its ``meta`` names the same store_id)
    DIR/wal/          write-ahead log files
    DIR/segments/     SSD segment files
    DIR/lost/         what ``fsck --repair`` / ``--rebuild`` could not place (never deleted)

The store id is a random 128-bit number drawn at creation. It is written into the marker and
into LMDB's meta, so an index that belongs to another store (a copied or swapped ``data.mdb``)
is told apart from this store's own (M1, see ``docs/ARCHITECTURE.md``).

The marker is written to a temporary name, fsynced, renamed into place and the directory fsynced,
so a crash during creation leaves either no marker (an empty directory we may initialise again)
or a whole one.

Every way the path itself can be wrong (empty, a NUL byte, under a file, a dangling link, a
permission the process lacks on the directory, the marker, ``LOCK``, or a subdirectory) is
answered with a :class:`~tairstore.errors.StoreError` subclass that names the path.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import time

from tairstore.errors import (
    DataDirError,
    DataDirPermissionError,
    FormatError,
    InvalidArgumentError,
    StoreLockedError,
)
from tairstore.fileio import FileSystem

__all__ = ["FORMAT_VERSION", "MARKER", "LOST", "SUBDIRS", "DataDir", "check_path", "os_error"]

#: Bumped when a change to any on-disk layout would make an older reader misread the store.
#: 2: the store id in the marker and in LMDB's meta (M1).
FORMAT_VERSION = 2
MARKER = "TAIRSTORE"
LOCK = "LOCK"
LOST = "lost"
SUBDIRS = ("index", "wal", "segments")
# Entries that may exist in a directory we are about to initialise (a crash during creation).
_INIT_LEFTOVERS = {MARKER + ".tmp", LOCK, *SUBDIRS}
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def check_path(path: object) -> str:
    """The data directory path as a ``str``, or :class:`InvalidArgumentError` saying what is wrong."""
    try:
        p = os.fspath(path)
    except TypeError:
        raise InvalidArgumentError(
            f"a data directory path is a str or os.PathLike, got {type(path).__name__}") from None
    if isinstance(p, bytes):
        try:
            p = os.fsdecode(p)
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"data directory path {p!r} does not decode") from None
    if not p:
        raise InvalidArgumentError("the data directory path is empty; name a directory")
    if "\0" in p:
        raise InvalidArgumentError(f"the data directory path {p!r} contains a NUL byte")
    return p


def os_error(exc: OSError, what: str, path: str) -> DataDirError:
    """The typed error for an ``OSError`` met while opening the directory's part ``what``."""
    if isinstance(exc, PermissionError) or exc.errno in _DENIED:
        return DataDirPermissionError(
            f"permission denied on the {what} {path!r} ({exc.strerror or exc}); give this "
            "process read and write access to the whole data directory", path)
    if isinstance(exc, NotADirectoryError) or exc.errno == errno.ENOTDIR:
        return DataDirError(f"the {what} {path!r} is not a directory, or lies under a file", path)
    return DataDirError(f"cannot open the {what} {path!r}: {exc}", path)


class DataDir:
    """Opens (and if asked, creates) a data directory and holds its lock until :meth:`close`.

    Attributes:
        store_id: the store's identity (32 hex digits), from the marker.
        created: True when this call initialised the directory.
    """

    def __init__(self, path: str, fs: FileSystem, *, create: bool = True,
                 readonly: bool = False) -> None:
        self.path = check_path(path)
        self.fs = fs
        # readonly (fsck without flags): an existing store only, and no directory is created.
        self.readonly = readonly
        create = create and not readonly
        self._lock_fd = -1
        self.store_id = ""
        self.created = False
        try:
            self._open(create)
        except OSError as exc:
            self.close()
            raise os_error(exc, "data directory", self.path) from exc
        except BaseException:
            self.close()
            raise

    def _open(self, create: bool) -> None:
        fs, path = self.fs, self.path
        if os.path.islink(path) and not os.path.exists(path):
            raise DataDirError(f"{path!r} is a symbolic link to {os.readlink(path)!r}, which does "
                               "not exist; create the target or point at a directory", path)
        if not fs.exists(path):
            parent = os.path.dirname(os.path.abspath(path))
            if os.path.exists(parent) and not os.path.isdir(parent):
                raise DataDirError(f"{path!r} lies under {parent!r}, which is a file", path)
            if not create:
                raise FormatError(f"{path}: no such store (pass create=True to make one)")
            fs.makedirs(path)
        elif not os.path.isdir(path):
            raise FormatError(f"{path} is a file, not a tairstore data directory")
        marker = os.path.join(path, MARKER)
        if not fs.exists(marker):
            extra = set(fs.listdir(path)) - _INIT_LEFTOVERS
            if extra:
                raise FormatError(
                    f"{path} is not a tairstore data directory (it holds {sorted(extra)[:3]} "
                    "and no TAIRSTORE marker); point at an empty or new directory"
                )
            if not create:
                raise FormatError(f"{path}: no TAIRSTORE marker (pass create=True to make one)")
        self._acquire_lock()
        if not fs.exists(marker):
            self._write_marker(marker)
            self.created = True
        self.store_id = self._check_marker(marker)
        for sub in SUBDIRS:
            d = self.sub(sub)
            if self.readonly and not fs.exists(d):
                continue  # reported by the consistency check, which reads it as empty
            if self.created or not fs.exists(d):
                # A missing subdirectory of an existing store is recreated empty: the open's
                # consistency check (engine.consistency) then decides whether the store can
                # do without what it held.
                try:
                    fs.makedirs(d)
                except OSError as exc:
                    raise os_error(exc, f"{sub}/ directory", d) from exc
            elif not os.path.isdir(d):
                raise DataDirError(f"{d!r} is not a directory", d)
            mode = os.R_OK | os.X_OK | (0 if self.readonly else os.W_OK)
            if not os.access(d, mode):
                raise DataDirPermissionError(
                    f"permission denied on the {sub}/ directory {d!r}; give this process read "
                    "and write access to the whole data directory", d)

    def sub(self, name: str) -> str:
        """Path of a subdirectory."""
        return os.path.join(self.path, name)

    def _acquire_lock(self) -> None:
        # flock, not fcntl record locks: it conflicts between two opens in one process too.
        lock = os.path.join(self.path, LOCK)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise os_error(exc, "lock file", lock) from exc
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
        body = json.dumps({"format": FORMAT_VERSION, "store_id": secrets.token_hex(16),
                           "created_ns": time.time_ns()}).encode()
        f = self.fs.open(tmp, create=True)
        try:
            f.truncate(0)
            f.pwrite(body, 0)
            f.fsync()
        finally:
            f.close()
        self.fs.rename(tmp, marker)
        self.fs.fsync_dir(self.path)

    def _check_marker(self, marker: str) -> str:
        """Validate the marker; return the store id it names."""
        try:
            f = self.fs.open(marker, readonly=True)
        except OSError as exc:
            raise os_error(exc, "format marker", marker) from exc
        try:
            raw = f.pread(4096, 0)
        finally:
            f.close()
        try:
            doc = json.loads(raw)
            version = int(doc["format"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{marker} is damaged ({exc}); restore it or rebuild the store") from None
        if version > FORMAT_VERSION:
            raise FormatError(
                f"{self.path} was written by format {version}; this tairstore reads up to "
                f"{FORMAT_VERSION}: upgrade tairstore"
            )
        if version < FORMAT_VERSION:
            # Format 1 has no store id, so its index cannot be told from a foreign one.
            raise FormatError(
                f"{self.path} was written by format {version}, which has no store identity; this "
                f"tairstore reads format {FORMAT_VERSION}: open it with the tairstore that wrote "
                "it, or make a new store"
            )
        store_id = doc.get("store_id") if isinstance(doc, dict) else None
        if not isinstance(store_id, str) or len(store_id) != 32:
            raise FormatError(f"{marker} is damaged (no valid store_id); restore it")
        return store_id

    def close(self) -> None:
        """Release the lock. Idempotent."""
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1
