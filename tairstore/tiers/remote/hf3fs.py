"""The 3FS remote tier: blocks in slots of large preallocated files on a shared mount.

Theory of operation
-------------------
The tier's directory (``path``, on the 3FS mount) holds::

    index/                  LMDB environment shared by every process using the directory
    data/<slot>-<n>.dat     data files; every file holds slots of one size

A block of ``L`` bytes goes into a slot of the smallest power of two ``>= max(L, 64 KiB)``
(as SGLang's HF3FS backend keeps fixed-size pages, but with a few size classes so 256 KiB and
4 MiB blocks both fit without waste). Files are ``file_bytes`` long (a few hundred MiB by
default) and created when a class runs out of free slots: the tier grows as needed, up to
``capacity_bytes`` when set. The payload sits in its slot as it is; its crc32c and length are
in the index record, so an operator can read a block with ``dd`` at the offset the index names.

LMDB is the one lock: its write transactions serialise every process on the directory (LMDB
locks across processes through its lock file), so allocating a slot, creating a file and
publishing a block never race. A put takes three steps, and the payload I/O holds no lock:

1. in one write transaction, keys already present are done, and each other key pops a free slot
   of its class (creating a new data file when there is none);
2. ``os.pwritev`` of each payload into its slot, outside any transaction;
3. in one write transaction, each record is published — unless another process published the
   same key meanwhile, in which case our slot goes back to the free list.

A reader looks the record up, ``preadv``\\ s the slot straight into the caller's buffer and
checks the crc32c. A mismatch is a miss; it counts as a corruption (and the record is dropped)
only if the record is still the same when looked up again — a slot freed and reused by another
process while we read it is just a miss. Nothing is fsynced: the tier is a cache, and a crash
that loses payload bytes the index names leaves a record that fails its checksum, i.e. a miss.
A crash between steps 1 and 3 leaks a slot (neither free nor used) until the files are removed.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Sequence
from typing import Any

import lmdb

from tairstore.errors import InvalidArgumentError
from tairstore.format.checksum import crc32c
from tairstore.parallel import split_run
from tairstore.tiers.remote.base import RemoteTier, check_crcs
from tairstore.tiers.remote.config import MIN_SLOT_BYTES

__all__ = ["Hf3fsTier", "slot_class", "RECORD"]

_log = logging.getLogger(__name__)

#: Index record: ``slot size u64 | file number u32 | slot u32 | payload length u64 | crc32c u32``.
RECORD = struct.Struct("<QIIQI")
#: Free-list key: ``slot size u64 | file u32 | slot u32``, big-endian so a cursor walks one class.
_FREE = struct.Struct(">QII")
_CLASS = struct.Struct(">Q")
_U64 = struct.Struct("<Q")
_USED, _FILE_BYTES = b"used_bytes", b"file_bytes"


def slot_class(length: int) -> int:
    """The slot size for a payload of ``length`` bytes."""
    return max(MIN_SLOT_BYTES, 1 << max(0, length - 1).bit_length())


def _index_key(namespace: str, key: bytes) -> bytes:
    ns = namespace.encode()
    return bytes([len(ns)]) + ns + key


# LMDB allows one environment per file per process: stores of one process that share a
# directory share its environment (counted), as stores of different processes share its file.
_ENVS: dict[str, list] = {}
_ENVS_LOCK = threading.Lock()


def _open_index(path: str, map_size: int) -> "lmdb.Environment":
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None:
            # sync off: a cache; the crc32c in each record catches what a crash loses.
            env = lmdb.open(path, map_size=map_size, max_dbs=4, sync=False, metasync=False)
            entry = _ENVS[key] = [env, 0]
        entry[1] += 1
        return entry[0]


def _close_index(env: "lmdb.Environment") -> None:
    with _ENVS_LOCK:
        for key, entry in list(_ENVS.items()):
            if entry[0] is env:
                entry[1] -= 1
                if entry[1] == 0:
                    del _ENVS[key]
                    env.close()
                return


class Hf3fsTier(RemoteTier):
    """Blocks in slots of shared files under ``path`` (see the module docstring)."""

    kind = "hf3fs"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._dir = config["path"]
        self._data = os.path.join(self._dir, "data")
        try:
            os.makedirs(self._data, exist_ok=True)
            os.makedirs(os.path.join(self._dir, "index"), exist_ok=True)
        except OSError as exc:
            raise InvalidArgumentError(f"hf3fs path {self._dir!r} is not usable: {exc}") from None
        self._env = _open_index(os.path.join(self._dir, "index"), config["index_map_bytes"])
        self._blocks = self._env.open_db(b"blocks")
        self._free = self._env.open_db(b"free")
        self._files = self._env.open_db(b"files")
        self._meta = self._env.open_db(b"meta")
        self._fds: dict[tuple[int, int], int] = {}
        self._fd_lock = threading.Lock()

    # -- files -----------------------------------------------------------------------------------

    def _file_path(self, cls: int, number: int) -> str:
        return os.path.join(self._data, f"{cls}-{number:06d}.dat")

    def _fd(self, cls: int, number: int) -> int:
        with self._fd_lock:
            fd = self._fds.get((cls, number))
            if fd is None:
                fd = self._fds[(cls, number)] = os.open(self._file_path(cls, number), os.O_RDWR | os.O_CREAT, 0o644)
            return fd

    def _slots_per_file(self, cls: int) -> int:
        return max(1, self.config["file_bytes"] // cls)

    def _alloc(self, txn: lmdb.Transaction, cur: Any, cls: int) -> tuple[int, int] | None:
        """Pop a free slot of class ``cls``, creating a data file when the class has none
        (``cur``: a cursor on the free list of ``txn``, one for a whole batch)."""
        prefix = _CLASS.pack(cls)
        if cur.set_range(prefix) and cur.key().startswith(prefix):
            _, number, slot = _FREE.unpack(cur.key())
            cur.delete()
            return number, slot
        per_file = self._slots_per_file(cls)
        total = _U64.unpack(txn.get(_FILE_BYTES, _U64.pack(0), db=self._meta))[0]
        limit = self.config["capacity_bytes"]
        if limit and total + per_file * cls > limit:
            return None
        raw = txn.get(prefix, None, db=self._files)
        number = _U64.unpack(raw)[0] if raw else 0
        # Created inside the write transaction: no other process can pick the same number.
        os.ftruncate(self._fd(cls, number), per_file * cls)
        txn.put(prefix, _U64.pack(number + 1), db=self._files)
        txn.put(_FILE_BYTES, _U64.pack(total + per_file * cls), db=self._meta)
        for slot in range(1, per_file):
            txn.put(_FREE.pack(cls, number, slot), b"", db=self._free)
        return number, 0

    def _release(self, txn: lmdb.Transaction, cls: int, number: int, slot: int) -> None:
        txn.put(_FREE.pack(cls, number, slot), b"", db=self._free)

    def _add_used(self, txn: lmdb.Transaction, delta: int) -> None:
        if not delta:
            return
        used = _U64.unpack(txn.get(_USED, _U64.pack(0), db=self._meta))[0]
        txn.put(_USED, _U64.pack(max(0, used + delta)), db=self._meta)

    # -- the interface ---------------------------------------------------------------------------

    def put(self, namespace: str, keys: Sequence[bytes], blocks: Sequence[Any],
            crcs: Sequence[int] | None = None) -> list[bool]:
        """See :meth:`RemoteTier.put`; a block over ``max_block_bytes`` raises InvalidArgumentError."""
        keys, views = self._check_put(namespace, keys, blocks)
        known = check_crcs(crcs, len(views))
        limit = self.config["max_block_bytes"]
        for v in views:
            if len(v) > limit:
                raise InvalidArgumentError(f"block of {len(v)} bytes exceeds the hf3fs tier's {limit} (max_block_bytes)")
        done = [False] * len(keys)
        if not keys or not self.health.allow():
            self._count(put_failures=len(keys))
            return done
        ikeys = [_index_key(namespace, k) for k in keys]
        placed: dict[int, tuple[int, int, int]] = {}
        try:
            with self._env.begin(write=True) as txn:                       # step 1
                free = txn.cursor(db=self._free)
                for i, ik in enumerate(ikeys):
                    if txn.get(ik, db=self._blocks) is not None:
                        done[i] = True
                        continue
                    cls = slot_class(len(views[i]))
                    where = self._alloc(txn, free, cls)
                    if where is not None:
                        placed[i] = (cls, *where)
            order = list(placed.items())
            fds = [self._fd(cls, number) for _, (cls, number, _) in order]

            def write(j: int) -> int | None:  # checksum (unless given), then write it out
                i, (cls, _, slot) = order[j]
                crc = known[i] if known is not None else crc32c(views[i])
                return crc if os.pwritev(fds[j], [views[i]], slot * cls) == len(views[i]) else None

            # Checksums to compute: two threads, each checksumming then writing its half. Given
            # (a demotion's): one thread, as two writers of one file only queue on its lock.
            crcs_out = (split_run(write, [len(views[i]) for i, _ in order]) if known is None
                        else [write(j) for j in range(len(order))])
            written = {i: crc for (i, _), crc in zip(order, crcs_out) if crc is not None}
            with self._env.begin(write=True) as txn:                       # step 3
                added = 0
                blocks_db = self._blocks
                for i, (cls, number, slot) in placed.items():
                    # overwrite=False: False when another process published the key meanwhile.
                    if i not in written or not txn.put(
                            ikeys[i], RECORD.pack(cls, number, slot, len(views[i]), written[i]),
                            db=blocks_db, overwrite=False):
                        self._release(txn, cls, number, slot)
                        done[i] = i in written
                        continue
                    added += len(views[i])
                    done[i] = True
                self._add_used(txn, added)
        except (OSError, lmdb.Error) as exc:
            _log.warning("hf3fs put under %s failed: %s", self._dir, exc)
            self.health.failure()
            done = [False] * len(keys)
        else:
            self.health.success()
        self._count_puts(views, done)
        return done

    def get_into(self, namespace: str, keys: Sequence[bytes], outs: Sequence[Any]) -> list[int | None]:
        """See :meth:`RemoteTier.get_into`."""
        keys, views = self._check_get(namespace, keys, outs)
        found: list[int | None] = [None] * len(keys)
        corrupt = 0
        if keys and self.health.allow():
            ikeys = [_index_key(namespace, k) for k in keys]
            try:
                with self._env.begin() as txn:
                    records = [txn.get(ik, db=self._blocks) for ik in ikeys]
                too_small = [keys[i].hex() for i, r in enumerate(records)
                             if r is not None and RECORD.unpack(r)[3] > len(views[i])]
                if too_small:
                    raise InvalidArgumentError(f"output buffer too small for remote block(s) {too_small[:4]}")
                todo = []  # (index, fd, offset, record, length, crc)
                for i, raw in enumerate(records):
                    if raw is not None:
                        cls, number, slot, length, crc = RECORD.unpack(raw)
                        todo.append((i, self._fd(cls, number), slot * cls, raw, length, crc))

                def read(j: int) -> bool:  # on two threads: each checksums what it just read
                    i, fd, offset, _, length, crc = todo[j]
                    view = views[i][:length]
                    return os.preadv(fd, [view], offset) == length and crc32c(view) == crc

                suspects = []
                for (i, _, _, raw, length, _), ok in zip(todo, split_run(read, [t[4] for t in todo])):
                    if ok:
                        found[i] = length
                    else:
                        suspects.append((ikeys[i], raw))
                if suspects:
                    corrupt = self._drop_if_unchanged(suspects)
            except (OSError, lmdb.Error) as exc:
                _log.warning("hf3fs read under %s failed: %s", self._dir, exc)
                self.health.failure()
            else:
                self.health.success()
        self._count_reads(found, corrupt)
        return found

    def _drop_if_unchanged(self, suspects: list[tuple[bytes, bytes]]) -> int:
        """Drop records whose slot failed its checksum, unless another process changed them
        meanwhile (then the slot was reused under us: a miss, not damage)."""
        dropped = 0
        with self._env.begin(write=True) as txn:
            for ik, raw in suspects:
                if txn.get(ik, db=self._blocks) != raw:
                    continue
                cls, number, slot, length, _ = RECORD.unpack(raw)
                txn.delete(ik, db=self._blocks)
                self._release(txn, cls, number, slot)
                self._add_used(txn, -length)
                _log.warning("hf3fs block in %s slot %d failed its checksum; dropped",
                             self._file_path(cls, number), slot)
                dropped += 1
        return dropped

    def sizes(self, namespace: str, keys: Sequence[bytes]) -> list[int | None]:
        """See :meth:`RemoteTier.sizes`."""
        keys = self._check_keys(namespace, keys)
        with self._env.begin() as txn:
            raws = [txn.get(_index_key(namespace, k), db=self._blocks) for k in keys]
        return [RECORD.unpack(r)[3] if r is not None else None for r in raws]

    def locate(self, namespace: str, key: bytes) -> tuple[str, int, int] | None:
        """``(file, offset, length)`` of a block, for operators and tests; None if absent."""
        with self._env.begin() as txn:
            raw = txn.get(_index_key(namespace, self._check_keys(namespace, [key])[0]), db=self._blocks)
        if raw is None:
            return None
        cls, number, slot, length, _ = RECORD.unpack(raw)
        return self._file_path(cls, number), slot * cls, length

    def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        """See :meth:`RemoteTier.delete`; the slots go back to the free lists."""
        keys = self._check_keys(namespace, keys)
        removed = freed = 0
        with self._env.begin(write=True) as txn:
            for k in keys:
                ik = _index_key(namespace, k)
                raw = txn.pop(ik, db=self._blocks)
                if raw is None:
                    continue
                cls, number, slot, length, _ = RECORD.unpack(raw)
                self._release(txn, cls, number, slot)
                freed += length
                removed += 1
            self._add_used(txn, -freed)
        self._count(deletes=removed)
        return removed

    def _probe(self) -> None:
        """A cheap probe: the data directory answers ``stat`` and the index a read."""
        if not self.health.allow():
            return
        try:
            os.stat(self._data)
            with self._env.begin() as txn:
                txn.get(_USED, db=self._meta)
        except (OSError, lmdb.Error) as exc:
            _log.warning("hf3fs probe of %s failed: %s", self._dir, exc)
            self.health.failure()
        else:
            self.health.success()

    def usage_ratio(self) -> float:
        """Used over ``capacity_bytes``; 0.0 without a limit (files grow as needed)."""
        cap = self.config["capacity_bytes"]
        return self.usage()["used_bytes"] / cap if cap else 0.0

    def usage(self) -> dict[str, int]:
        """Bytes of payload stored by every process on the directory, and the size of its files
        (or ``capacity_bytes`` when set)."""
        with self._env.begin() as txn:
            used = _U64.unpack(txn.get(_USED, _U64.pack(0), db=self._meta))[0]
            files = _U64.unpack(txn.get(_FILE_BYTES, _U64.pack(0), db=self._meta))[0]
        return {"used_bytes": used, "capacity_bytes": self.config["capacity_bytes"] or files}

    def close(self) -> None:
        """Close the files and the index; the blocks stay for the other processes."""
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        _close_index(self._env)
