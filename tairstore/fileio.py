"""The one seam every file operation of the engine goes through.

Theory of operation: the WAL, the segment log, the index's directory handling and recovery never
call ``os`` directly for data files; they ask a :class:`FileSystem` for a :class:`File` and use
its small set of methods. Tests and the fuzz harness substitute a fault-injecting implementation
(crash at the N-th fsync, torn writes, ENOSPC, flipped bits on read) without monkeypatching
``os``. Everything here is thin and synchronous; callers own locking.

LMDB manages its own file I/O; the store only hands it a directory.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Protocol, runtime_checkable

__all__ = ["File", "FileSystem", "OsFile", "OsFileSystem", "MemoryFile", "REAL_FS"]


@runtime_checkable
class File(Protocol):
    """An open file. Offsets are explicit: no shared file position, so threads may share it."""

    path: str

    def pwrite(self, data, offset: int) -> int:
        """Write all of ``data`` at ``offset``; returns ``len(data)`` or raises OSError."""

    def pwritev(self, buffers, offset: int) -> int:
        """Write the buffers back to back at ``offset`` (one syscall where possible)."""

    def pread_into(self, buf, offset: int) -> int:
        """Fill ``buf`` from ``offset``; returns the bytes read (short only at end of file)."""

    def pread(self, n: int, offset: int) -> bytes:
        """Read up to ``n`` bytes at ``offset``."""

    def fsync(self) -> None:
        """Make the file's data durable (fdatasync where the size did not change is enough)."""

    def truncate(self, size: int) -> None:
        """Set the file's length."""

    def size(self) -> int:
        """Current length in bytes."""

    def mmap(self, length: int, offset: int = 0) -> mmap.mmap:
        """A read-only mapping of ``length`` bytes from ``offset``."""

    def close(self) -> None:
        """Close the file; further calls fail."""


@runtime_checkable
class FileSystem(Protocol):
    """Directory-level operations and the factory for :class:`File`."""

    def open(self, path: str, *, create: bool = False, readonly: bool = False) -> File:
        """Open ``path``; with ``create`` make it if missing (the caller fsyncs the directory)."""

    def exists(self, path: str) -> bool:
        """True if ``path`` exists."""

    def listdir(self, path: str) -> list[str]:
        """Names in directory ``path``, sorted."""

    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents if missing."""

    def rename(self, src: str, dst: str) -> None:
        """Atomically rename ``src`` to ``dst`` (durable only after :meth:`fsync_dir`)."""

    def unlink(self, path: str) -> None:
        """Remove a file (durable only after :meth:`fsync_dir`)."""

    def fsync_dir(self, path: str) -> None:
        """Make creations, renames and unlinks in directory ``path`` durable."""


class OsFile:
    """A :class:`File` over a raw file descriptor (``os.pwrite`` / ``os.preadv``)."""

    __slots__ = ("path", "_fd")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    def pwrite(self, data, offset: int) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        done = 0
        while done < total:
            n = os.pwrite(self._fd, view[done:], offset + done)
            if n <= 0:  # pragma: no cover - the kernel reports errors by raising
                raise OSError(errno.EIO, "short write", self.path)
            done += n
        return total

    def pwritev(self, buffers, offset: int) -> int:
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(v) for v in views)
        n = os.pwritev(self._fd, views, offset)
        if n < total:
            # A short vectored write: finish the rest piece by piece.
            skip = n
            pos = offset + n
            for v in views:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                pos += self.pwrite(v[skip:], pos)
                skip = 0
        return total

    def pread_into(self, buf, offset: int) -> int:
        view = memoryview(buf).cast("B")
        total = len(view)
        done = 0
        while done < total:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self._fd, n, offset)

    def fsync(self) -> None:
        os.fdatasync(self._fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def mmap(self, length: int, offset: int = 0) -> mmap.mmap:
        return mmap.mmap(self._fd, length, access=mmap.ACCESS_READ, offset=offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"OsFile({self.path!r})"


class MemoryFile:
    """The read half of :class:`File` over bytes in memory (scans of a segment image, fuzzing)."""

    path = "<memory>"

    def __init__(self, data) -> None:
        self.data = bytes(data)

    def size(self) -> int:
        return len(self.data)

    def pread(self, n: int, offset: int) -> bytes:
        return self.data[offset:offset + n]

    def pread_into(self, buf, offset: int) -> int:
        chunk = self.data[offset:offset + len(buf)]
        memoryview(buf).cast("B")[:len(chunk)] = chunk
        return len(chunk)


class OsFileSystem:
    """The real file system."""

    def open(self, path: str, *, create: bool = False, readonly: bool = False) -> File:
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create and not readonly:
            flags |= os.O_CREAT
        flags |= getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o644)
        return OsFile(path, fd)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: The file system the engine uses unless told otherwise.
REAL_FS: FileSystem = OsFileSystem()
