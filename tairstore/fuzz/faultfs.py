"""A fault-injecting :class:`~tairstore.fileio.FileSystem`, shipped for users like trio's test doubles.

Theory of operation
-------------------
:class:`FaultFS` wraps a REAL directory: every call goes through to ``os`` on real files, so the
whole engine (and LMDB beside it) runs on real bytes. On the way it keeps a journal of what a
power loss could still take away:

- per file (a *node*, which follows the file through renames): every write since the file's last
  ``fsync``, with the pre-image of the range it overwrote and the file's length before it;
- per directory: every create, rename and unlink since the directory's last ``fsync_dir``
  (an unlinked file is kept alive under a hard link in a stash beside the root, so a crash that
  reverts the unlink can bring it back).

Real ``fsync`` calls are skipped: durability is what the journal says, not what the page cache
did, which also makes a crash run cost microseconds per operation.

A **crash** is armed at the N-th counted operation (:meth:`FaultFS.arm_crash`; which kinds count
is a parameter: fsync / fsync_dir / rename / unlink for the enumerated crash points, writes too
for random ones). That operation is performed, then :class:`SimulatedCrash` is raised out of it,
and from then on every operation of this file system, reads included, raises SimulatedCrash: the
store's background threads cannot change the disk any more. :class:`SimulatedCrash` derives from
``BaseException`` so that the engine's ``except Exception`` paths do not swallow it (the WAL's
group commit does catch BaseException and poisons itself, which is also the right answer).

:meth:`FaultFS.materialise` then rewrites the directory in place into one post-crash disk image
the seeded RNG picks: each unsynced write is *kept*, *dropped* (its pre-image restored) or *torn*
(a prefix kept, the rest garbage, zeros or the old bytes); a file whose unsynced writes grew it
keeps its new length as zeros or shrinks back; for each directory a random prefix of its unsynced
entry operations survives and the rest is reverted (a created file vanishes, a rename reverts, an
unlinked file reappears), the order a journaling file system keeps.

Not modelled, on purpose:

- LMDB's files do not pass through this seam. LMDB is crash-safe per committed transaction (its
  commits fsync), so its files are left exactly as they are at the crash.
- ``makedirs`` is taken as durable at once (the store creates its directories once, at
  initialisation, before any data is acknowledged).
- Reordering between two writes of one file that were both kept does not matter for the bytes,
  so it is not represented; a write that lands partially is the *torn* fate.

**Injected errors** (:meth:`FaultFS.fail_next`): the next matching write / fsync / read raises
``OSError(ENOSPC or EIO)`` without touching the disk. **Bit flips** (:meth:`FaultFS.flip_next_read`):
the next matching read returns its bytes with one bit flipped (the disk is unchanged).

Everything random comes from one ``random.Random(seed)``: a run is replayed by its seed.
"""

from __future__ import annotations

import errno as _errno
import itertools
import mmap
import os
import random
import shutil
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field

__all__ = [
    "SimulatedCrash", "FaultFS", "FaultFile", "CRASH_POINT_KINDS", "ALL_KINDS",
]

#: The operations after which the enumerated crash points are taken: the ones that change what
#: survives a power loss (CrashMonkey's persistence points), plus renames and unlinks.
CRASH_POINT_KINDS = frozenset({"fsync", "fsync_dir", "rename", "unlink"})
#: Random crash points may also fall right after a write, which can then be torn.
ALL_KINDS = CRASH_POINT_KINDS | {"write", "create", "truncate"}

# Fates of an unsynced write at a crash, with their weights: keeping and dropping are the common
# outcomes of a power loss; a torn write (a partial sector run) is rarer but the hardest case.
_FATES = ("keep", "drop", "torn")
_FATE_WEIGHTS = (4, 4, 2)
# What fills the lost part of a torn write.
_TORN_FILLS = ("zeros", "garbage", "old")
# Sector size: a torn write most often breaks at a sector boundary.
_SECTOR = 512
_STASH_SUFFIX = ".faultfs-stash"


class SimulatedCrash(BaseException):
    """The simulated machine lost power. Raised out of the crashing operation and every later one.

    A BaseException, so ``except Exception`` in the engine cannot swallow it: the store must
    stop as a killed process would.
    """


@dataclass
class _Write:
    """One unsynced write (or truncate) of a node: what it covered and what was there before."""

    offset: int
    length: int
    pre: bytes  # the old bytes of [offset, min(offset + length, pre_size))
    pre_size: int  # the file's length before this write


@dataclass
class _Node:
    """A file as the journal sees it; follows the file through renames and unlinks."""

    path: str  # where its bytes are now: its name, or its stash link once unlinked
    durable_size: int = 0
    unsynced: list[_Write] = field(default_factory=list)


@dataclass
class _DirOp:
    """One directory-entry change not yet covered by an ``fsync_dir`` of its directory."""

    kind: str  # "create" | "rename" | "unlink"
    node: _Node
    path: str  # created / unlinked name, or the rename's source
    dst: str = ""  # the rename's destination
    stash: str = ""  # the unlinked file's hard link
    old_dst: bytes | None = None  # the bytes a rename replaced at dst, if it replaced a file


@dataclass
class _ErrorRule:
    kind: str
    errno: int
    count: int
    path_contains: str


class FaultFS:
    """A :class:`~tairstore.fileio.FileSystem` over a real directory that can crash and fail.

    Args:
        root: the directory the store lives in (its parent must be writable: the unlink stash
            lives beside it).
        seed: seeds every random decision (the crash image, torn lengths, flipped bits).

    Attributes:
        ops: operations seen, by kind.
        injected: faults injected, by kind (``crash``, ``write_kept`` / ``write_dropped`` /
            ``write_torn``, ``file_vanished``, ``rename_reverted``, ``unlink_reverted``,
            ``enospc``, ``eio``, ``bitflip``).
        points: counted operations so far (the crash-point clock).
    """

    def __init__(self, root: str, seed: int = 0) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.seed = seed
        self.rng = random.Random(seed)
        self.ops: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.points = 0
        self.crashed = False
        self.materialised = False
        self._lock = threading.RLock()
        self._nodes: dict[str, _Node] = {}
        self._dir_ops: dict[str, list[_DirOp]] = {}
        self._crash_at: int | None = None
        self._crash_kinds: frozenset[str] = CRASH_POINT_KINDS
        self._errors: list[_ErrorRule] = []
        self._flips: list[_ErrorRule] = []
        self._stash = self.root.rstrip(os.sep) + _STASH_SUFFIX
        self._stash_ids = itertools.count()
        # Open files, so an abandoned store's descriptors can be closed (a killed process's
        # would be): a store whose close() died of the crash leaves its files open.
        self._files: weakref.WeakSet = weakref.WeakSet()

    # -- arming ------------------------------------------------------------------------------
    def arm_crash(self, after: int, kinds: frozenset[str] = CRASH_POINT_KINDS) -> None:
        """Crash right after the ``after``-th (1-based, from now) operation of one of ``kinds``."""
        with self._lock:
            self._crash_kinds = frozenset(kinds)
            self.points = 0
            self._crash_at = after

    def count_points(self, kinds: frozenset[str] = CRASH_POINT_KINDS) -> None:
        """Count operations of ``kinds`` in :attr:`points` from zero, without crashing."""
        with self._lock:
            self._crash_kinds = frozenset(kinds)
            self.points = 0
            self._crash_at = None

    def fail_next(self, kind: str, err: int = _errno.ENOSPC, *, count: int = 1,
                  path_contains: str = "") -> None:
        """Make the next ``count`` operations of ``kind`` ("write", "fsync", "read") on paths
        containing ``path_contains`` raise ``OSError(err)`` without touching the disk."""
        with self._lock:
            self._errors.append(_ErrorRule(kind, err, count, path_contains))

    def flip_next_read(self, *, count: int = 1, path_contains: str = "") -> None:
        """Flip one random bit in what the next ``count`` matching reads return."""
        with self._lock:
            self._flips.append(_ErrorRule("read", 0, count, path_contains))

    def clear_faults(self) -> None:
        """Forget pending injected errors and bit flips (not the crash state)."""
        with self._lock:
            self._errors.clear()
            self._flips.clear()

    def close_all(self) -> None:
        """Close every file still open through this FS (what the kernel does for a killed process)."""
        for f in list(self._files):
            f.close()

    def crash(self) -> None:
        """Lose power now: every later operation raises :class:`SimulatedCrash`."""
        with self._lock:
            if not self.crashed:
                self.crashed = True
                self.injected["crash"] += 1

    # -- bookkeeping used by FaultFile --------------------------------------------------------
    def _check_alive(self) -> None:
        if self.crashed:
            raise SimulatedCrash("the simulated machine has crashed")

    def _tick(self, kind: str) -> None:
        """Count one operation; crash right after it if it is the armed point (lock held)."""
        self.ops[kind] += 1
        if kind in self._crash_kinds:
            self.points += 1
            if self._crash_at is not None and self.points >= self._crash_at:
                self._crash_at = None
                self.crash()
                raise SimulatedCrash(f"crash after {kind} #{self.points}")

    def _take(self, rules: list[_ErrorRule], kind: str, path: str) -> _ErrorRule | None:
        for rule in rules:
            if rule.kind == kind and rule.path_contains in path and rule.count > 0:
                rule.count -= 1
                if rule.count == 0:
                    rules.remove(rule)
                return rule
        return None

    def _maybe_fail(self, kind: str, path: str) -> None:
        rule = self._take(self._errors, kind, path)
        if rule is not None:
            self.injected["enospc" if rule.errno == _errno.ENOSPC else "eio"] += 1
            raise OSError(rule.errno, f"injected {os.strerror(rule.errno)}", path)

    def _maybe_flip(self, path: str, buf) -> None:
        if not len(buf) or self._take(self._flips, "read", path) is None:
            return
        view = memoryview(buf).cast("B")
        i = self.rng.randrange(len(view))
        view[i] ^= 1 << self.rng.randrange(8)
        self.injected["bitflip"] += 1

    def _node(self, path: str) -> _Node:
        node = self._nodes.get(path)
        if node is None:
            # A file this FS has not seen change: what is on disk is durable.
            size = os.path.getsize(path) if os.path.exists(path) else 0
            node = self._nodes[path] = _Node(path, size)
        return node

    def _dir_log(self, path: str) -> list[_DirOp]:
        return self._dir_ops.setdefault(os.path.dirname(os.path.abspath(path)), [])

    # -- FileSystem protocol ------------------------------------------------------------------
    def open(self, path: str, *, create: bool = False, readonly: bool = False) -> "FaultFile":
        """Open ``path`` (see :meth:`tairstore.fileio.FileSystem.open`)."""
        path = os.path.abspath(path)
        with self._lock:
            self._check_alive()
            existed = os.path.exists(path)
            flags = os.O_RDONLY if readonly else os.O_RDWR
            if create and not readonly:
                flags |= os.O_CREAT
            fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                node = self._node(path)
                if not existed:
                    node.durable_size = 0
                    self._dir_log(path).append(_DirOp("create", node, path))
                    self._tick("create")  # may crash right after the create: the caller
            except BaseException:          # never gets this file, so nobody else closes it
                os.close(fd)
                raise
            f = FaultFile(self, node, path, fd)
            self._files.add(f)
            return f

    def exists(self, path: str) -> bool:
        """True if ``path`` exists."""
        with self._lock:
            self._check_alive()
            return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        """Names in directory ``path``, sorted."""
        with self._lock:
            self._check_alive()
            return sorted(os.listdir(path))

    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents (taken as durable at once; see the module docstring)."""
        with self._lock:
            self._check_alive()
            os.makedirs(path, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        """Rename, remembering how to revert it until the directory is fsynced."""
        src, dst = os.path.abspath(src), os.path.abspath(dst)
        with self._lock:
            self._check_alive()
            old = None
            if os.path.exists(dst):
                with open(dst, "rb") as f:  # small in practice: markers and stale WAL names
                    old = f.read()
            os.rename(src, dst)
            node = self._nodes.pop(src, None) or _Node(dst, os.path.getsize(dst))
            node.path = dst
            self._nodes[dst] = node
            self._dir_log(dst).append(_DirOp("rename", node, src, dst=dst, old_dst=old))
            self._tick("rename")

    def unlink(self, path: str) -> None:
        """Unlink, keeping a hard link in the stash until the directory is fsynced."""
        path = os.path.abspath(path)
        with self._lock:
            self._check_alive()
            os.makedirs(self._stash, exist_ok=True)
            stash = os.path.join(self._stash, f"{next(self._stash_ids)}")
            os.link(path, stash)
            os.unlink(path)
            node = self._nodes.pop(path, None) or _Node(stash, os.path.getsize(stash))
            node.path = stash
            self._dir_log(path).append(_DirOp("unlink", node, path, stash=stash))
            self._tick("unlink")

    def fsync_dir(self, path: str) -> None:
        """Make the entry changes of ``path`` durable (no real fsync: the journal is the truth)."""
        path = os.path.abspath(path)
        with self._lock:
            self._check_alive()
            self._maybe_fail("fsync", path)
            for op in self._dir_ops.pop(path, []):
                if op.kind == "unlink":
                    _remove_quietly(op.stash)
            self._tick("fsync_dir")

    # -- the crash image ------------------------------------------------------------------------
    def materialise(self, fate: str | None = None) -> dict[str, int]:
        """Turn the directory into one post-crash image (see the module docstring).

        Args:
            fate: ``"keep"``, ``"drop"`` or ``"torn"`` forces that fate on every unsynced
                write and reverts every unsynced directory change (``"keep"``: keeps them);
                None lets the seeded RNG decide each one.

        Enters the crashed state first if not there yet. Single use: the FS stays crashed;
        reopen the store with the real file system or a fresh :class:`FaultFS`.

        Returns:
            what was decided, by kind (also added to :attr:`injected`).
        """
        with self._lock:
            self.crash()
            if self.materialised:
                return {}
            self.materialised = True
            decided: Counter[str] = Counter()
            for node in list(self._live_nodes()):
                if node.unsynced and os.path.exists(node.path):
                    self._settle_file(node, decided, fate)
            for d in sorted(self._dir_ops):
                self._settle_dir(self._dir_ops[d], decided, fate)
            self._dir_ops.clear()
            shutil.rmtree(self._stash, ignore_errors=True)
            self.injected.update(decided)
            return dict(decided)

    def _live_nodes(self):
        seen: set[int] = set()
        for node in self._nodes.values():
            seen.add(id(node))
            yield node
        for ops in self._dir_ops.values():
            for op in ops:
                if id(op.node) not in seen:
                    seen.add(id(op.node))
                    yield op.node

    def _settle_file(self, node: _Node, decided: Counter, forced: str | None) -> None:
        """Decide the fate of each unsynced write of ``node`` and rewrite the file to match."""
        rng = self.rng
        covered: list[tuple[int, int]] = []  # ranges that later surviving writes own
        end = node.durable_size
        with open(node.path, "r+b") as f:
            for w in reversed(node.unsynced):
                fate = forced or rng.choices(_FATES, _FATE_WEIGHTS)[0]
                fate = fate if w.length else "keep"
                keep = w.length if fate == "keep" else 0
                if fate == "torn":
                    keep = _torn_length(rng, w.length)
                decided["write_" + ("kept" if fate == "keep" else
                                    "dropped" if fate == "drop" else "torn")] += 1
                lost_from = w.offset + keep
                lost_to = w.offset + w.length
                if fate == "torn":
                    fill = rng.choice(_TORN_FILLS)
                    if fill != "old":
                        data = (bytes(lost_to - lost_from) if fill == "zeros"
                                else rng.randbytes(lost_to - lost_from))
                        for a, b in _uncovered(lost_from, lost_to, covered):
                            f.seek(a)
                            f.write(data[a - lost_from:b - lost_from])
                        keep = w.length  # the garbage reached the disk too
                        lost_from = lost_to
                for a, b in _uncovered(lost_from, lost_to, covered):
                    # Restore what was there before this write; past the old length there was
                    # nothing, which the final length below cuts off (or leaves as zeros).
                    old = w.pre[a - w.offset:b - w.offset] if a < w.offset + len(w.pre) else b""
                    old = old + bytes((b - a) - len(old))
                    f.seek(a)
                    f.write(old)
                if keep:
                    covered.append((w.offset, w.offset + keep))
                    end = max(end, w.offset + keep)
            size = os.fstat(f.fileno()).st_size
            if size > end and forced is None and rng.random() < 0.5:
                # The length reached the disk before the data (metadata-first ordering): the
                # rest reads as zeros, which is what the zero-filled tail of a scan expects.
                f.seek(end)
                f.write(bytes(size - end))
                decided["zero_tail"] += 1
            else:
                f.truncate(end)
        node.unsynced.clear()

    def _settle_dir(self, ops: list[_DirOp], decided: Counter, forced: str | None) -> None:
        """Keep a random prefix of a directory's unsynced entry changes; revert the rest."""
        cut = (len(ops) if forced == "keep" else 0 if forced else self.rng.randint(0, len(ops)))
        for op in reversed(ops[cut:]):
            if op.kind == "create":
                _remove_quietly(op.node.path)
                decided["file_vanished"] += 1
            elif op.kind == "rename":
                if os.path.exists(op.dst):
                    os.rename(op.dst, op.path)
                    op.node.path = op.path
                if op.old_dst is not None:
                    with open(op.dst, "wb") as f:
                        f.write(op.old_dst)
                decided["rename_reverted"] += 1
            elif op.kind == "unlink":
                if os.path.exists(op.stash) and not os.path.exists(op.path):
                    os.link(op.stash, op.path)
                    op.node.path = op.path
                decided["unlink_reverted"] += 1


class FaultFile:
    """A :class:`~tairstore.fileio.File` of a :class:`FaultFS` (see there)."""

    __slots__ = ("fs", "node", "path", "_fd", "__weakref__")

    def __init__(self, fs: FaultFS, node: _Node, path: str, fd: int) -> None:
        self.fs = fs
        self.node = node
        self.path = path
        self._fd = fd

    def pwrite(self, data, offset: int) -> int:
        """Write all of ``data`` at ``offset``, journaling the pre-image."""
        view = memoryview(data).cast("B")
        fs = self.fs
        with fs._lock:
            fs._check_alive()
            fs._maybe_fail("write", self.path)
            size = os.fstat(self._fd).st_size
            pre = os.pread(self._fd, min(len(view), max(0, size - offset)), offset) if offset < size else b""
            self.node.unsynced.append(_Write(offset, len(view), pre, size))
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
            fs._tick("write")
            return len(view)

    def pwritev(self, buffers, offset: int) -> int:
        """One journaled write of the buffers back to back (one crash point, as one syscall)."""
        return self.pwrite(b"".join(memoryview(b).cast("B") for b in buffers), offset)

    def pread_into(self, buf, offset: int) -> int:
        """Fill ``buf`` from ``offset``; a bit may be flipped on the way."""
        view = memoryview(buf).cast("B")
        fs = self.fs
        with fs._lock:
            fs._check_alive()
            fs._maybe_fail("read", self.path)
            done = 0
            while done < len(view):
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n == 0:
                    break
                done += n
            fs._maybe_flip(self.path, view[:done])
            return done

    def pread(self, n: int, offset: int) -> bytes:
        """Read up to ``n`` bytes at ``offset``; a bit may be flipped on the way."""
        fs = self.fs
        with fs._lock:
            fs._check_alive()
            fs._maybe_fail("read", self.path)
            data = os.pread(self._fd, n, offset)
            if fs._flips:
                buf = bytearray(data)
                fs._maybe_flip(self.path, buf)
                data = bytes(buf)
            return data

    def fsync(self) -> None:
        """Make this file's writes durable (journal only; no real fsync)."""
        fs = self.fs
        with fs._lock:
            fs._check_alive()
            fs._maybe_fail("fsync", self.path)
            self.node.unsynced.clear()
            self.node.durable_size = os.fstat(self._fd).st_size
            fs._tick("fsync")

    def truncate(self, size: int) -> None:
        """Set the length, journaled like a write of the cut (or added) range."""
        fs = self.fs
        with fs._lock:
            fs._check_alive()
            cur = os.fstat(self._fd).st_size
            lo, hi = min(cur, size), max(cur, size)
            pre = os.pread(self._fd, hi - lo, lo) if cur > size else b""
            self.node.unsynced.append(_Write(lo, hi - lo, pre, cur))
            os.ftruncate(self._fd, size)
            fs._tick("truncate")

    def size(self) -> int:
        """Current length in bytes."""
        with self.fs._lock:
            self.fs._check_alive()
            return os.fstat(self._fd).st_size

    def mmap(self, length: int, offset: int = 0) -> mmap.mmap:
        """A read-only mapping (not subject to bit flips)."""
        with self.fs._lock:
            self.fs._check_alive()
            return mmap.mmap(self._fd, length, access=mmap.ACCESS_READ, offset=offset)

    def close(self) -> None:
        """Close the descriptor. Allowed after a crash: closing changes nothing on disk."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"FaultFile({self.path!r})"


def _torn_length(rng: random.Random, length: int) -> int:
    """How much of a torn write landed: a sector multiple most of the time, any byte otherwise."""
    if length > _SECTOR and rng.random() < 0.7:
        return rng.randrange(1, (length + _SECTOR - 1) // _SECTOR) * _SECTOR
    return rng.randrange(0, length)


def _uncovered(a: int, b: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``[a, b)`` that no range in ``covered`` overlaps."""
    parts = [(a, b)] if a < b else []
    for c0, c1 in covered:
        nxt = []
        for p0, p1 in parts:
            if c1 <= p0 or c0 >= p1:
                nxt.append((p0, p1))
                continue
            if p0 < c0:
                nxt.append((p0, c0))
            if c1 < p1:
                nxt.append((c1, p1))
        parts = nxt
    return parts


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
