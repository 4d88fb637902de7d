"""The durable index: LMDB, one writer thread, a map that grows by itself.

Theory of operation: while the store runs, its in-memory key map is the truth for readers; LMDB
trails it. Every change the store logs in the WAL is also queued here, *in LSN order* (the store
appends to the WAL and enqueues under one lock). The writer thread takes whatever is queued,
asks the WAL to make the batch's last LSN durable (``before_commit``), applies the batch in one
LMDB transaction that also stores ``checkpoint_lsn`` = that LSN, and commits (LMDB fsyncs).
Because the queue is in LSN order and a batch is applied whole, "``checkpoint_lsn`` = L" means
every logged change up to L is in LMDB, so recovery replays only records after L and WAL files
wholly below L may be deleted. Waiting for WAL durability first means LMDB never holds a change
that a crash could take back out of the log.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Union

import lmdb

from tairstore.errors import (
    ClosedError, CorruptionError, DataDirPermissionError, FatalIOError, InvalidArgumentError,
    StoreError,
)
from tairstore.index.records import BLOCK_VALUE, U64, BlockRecord, decode_key, encode_block, encode_key

__all__ = ["Index", "PutOp", "DelOp", "lmdb_error"]

log = logging.getLogger(__name__)

INITIAL_MAP_SIZE = 64 << 20  # grows by doubling on MapFullError; 64 MiB holds ~500k entries
MAX_BATCH = 4096  # ops per LMDB transaction: bounds the time one commit holds the writer
META_FORMAT = b"format_version"
META_CHECKPOINT = b"checkpoint_lsn"
#: The store identity (16 raw bytes), the same as the data directory marker's ``store_id``.
META_STORE_ID = b"store_id"

PutOp = tuple[str, bytes, BlockRecord]  # namespace, key, record
DelOp = tuple[str, bytes, None]
Op = Union[PutOp, DelOp]


def lmdb_error(exc: BaseException, path: str) -> StoreError:
    """The typed error for an exception LMDB raised on the index in ``path``."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, (lmdb.ReadonlyError, PermissionError)) or code in (errno.EACCES, errno.EPERM):
        return DataDirPermissionError(
            f"permission denied on the index {path!r} ({exc}); give this process read and write "
            "access to the whole data directory", path)
    return CorruptionError(f"the index {path!r} cannot be read: {type(exc).__name__}: {exc}")


class Index:
    """LMDB environment holding the ``meta``, ``blocks`` and ``namespaces`` databases.

    With ``readonly`` (fsck, the open-time consistency check) the environment is opened
    read-only and without LMDB's lock file, so not one byte of the directory changes.
    Check the data file with :func:`tairstore.index.header.read_header` before opening.
    """

    def __init__(self, path: str, *, map_size: int = INITIAL_MAP_SIZE, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        try:
            if readonly:
                # The caller holds the data directory's flock, so no writer can run meanwhile.
                self._env = lmdb.open(path, max_dbs=4, subdir=True, readonly=True, lock=False,
                                      create=False, readahead=False)
                self._meta, self._blocks, self._ns_db = (
                    self._open_db_readonly(name) for name in (b"meta", b"blocks", b"namespaces"))
            else:
                self._env = lmdb.open(
                    path, map_size=map_size, max_dbs=4, subdir=True, sync=True, metasync=True,
                    readahead=False, meminit=False, lock=True,
                )
                self._meta = self._env.open_db(b"meta")
                self._blocks = self._env.open_db(b"blocks")
                self._ns_db = self._env.open_db(b"namespaces")
        except lmdb.Error as exc:
            raise lmdb_error(exc, path) from exc
        except OSError as exc:
            raise lmdb_error(exc, path) from exc
        self._queue: deque[tuple[int, list[Op]]] = deque()
        self._cond = threading.Condition()
        self._applied_lsn = self.checkpoint_lsn()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._closed = False

    def _open_db_readonly(self, name: bytes):
        """A named database in a read-only environment, or None when it was never created."""
        with self._env.begin() as txn:
            if txn.get(name) is None:
                return None
        return self._env.open_db(name, create=False)

    # -- meta ------------------------------------------------------------------------------
    def _get_raw_meta(self, name: bytes) -> bytes | None:
        if self._meta is None:
            return None
        try:
            with self._env.begin(db=self._meta) as txn:
                raw = txn.get(name)
        except lmdb.Error as exc:
            raise lmdb_error(exc, self.path) from exc
        return None if raw is None else bytes(raw)

    def get_meta(self, name: bytes) -> int | None:
        """An integer meta value, or None if unset."""
        raw = self._get_raw_meta(name)
        if raw is None:
            return None
        if len(raw) != U64.size:
            raise CorruptionError(f"index meta {name!r} is {len(raw)} bytes, expected {U64.size}")
        return U64.unpack(raw)[0]

    def store_id(self) -> str | None:
        """The store identity this index was created for (32 hex digits), or None if unset."""
        raw = self._get_raw_meta(META_STORE_ID)
        return None if raw is None else raw.hex()

    def set_identity(self, store_id: str, format_version: int) -> None:
        """Write the store identity and format version into a new index (one transaction)."""
        self._write_txn([], None, {META_FORMAT: format_version}, False,
                        raw_meta={META_STORE_ID: bytes.fromhex(store_id)})

    def checkpoint_lsn(self) -> int:
        """The LSN up to which LMDB reflects the WAL (0 for a new index)."""
        return self.get_meta(META_CHECKPOINT) or 0

    def format_version(self) -> int | None:
        """The store format version written at creation, or None for a new index."""
        return self.get_meta(META_FORMAT)

    # -- namespace settings ----------------------------------------------------------------
    def namespaces(self) -> dict[str, dict]:
        """Persisted namespace settings (quotas, TTL), by name."""
        out = {}
        if self._ns_db is None:
            return out
        try:
            with self._env.begin(db=self._ns_db) as txn:
                for k, v in txn.cursor():
                    try:
                        out[bytes(k).decode()] = json.loads(bytes(v))
                    except ValueError as exc:
                        raise CorruptionError(
                            f"namespace settings of {bytes(k)!r} do not parse: {exc}") from None
        except lmdb.Error as exc:
            raise lmdb_error(exc, self.path) from exc
        return out

    def set_namespace(self, name: str, settings: dict) -> None:
        """Persist one namespace's settings (a synchronous LMDB transaction)."""
        body = json.dumps(settings, sort_keys=True).encode()
        while True:
            try:
                with self._env.begin(write=True, db=self._ns_db) as txn:
                    txn.put(name.encode(), body)
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)

    # -- reads -----------------------------------------------------------------------------
    def items(self) -> Iterator[tuple[str, bytes, BlockRecord]]:
        """Every indexed block (a read transaction; used at open and by fsck)."""
        for ns, key, value in self.raw_items():
            yield ns, key, BlockRecord._make(value)

    def raw_items(self) -> Iterator[tuple[str, bytes, tuple]]:
        """Every indexed block as ``(namespace, key, value tuple)``: the fast path for open.

        The tuple is ``BLOCK_VALUE.unpack`` of the value, in :class:`BlockRecord` field order.
        Values are only unpacked here: :func:`tairstore.index.records.check_value` decides
        whether they make sense. LMDB's own errors (a damaged B-tree page) are typed.
        """
        if self._blocks is None:
            return
        try:
            yield from self._raw_items()
        except lmdb.Error as exc:
            raise lmdb_error(exc, self.path) from exc

    def _raw_items(self) -> Iterator[tuple[str, bytes, tuple]]:
        unpack = BLOCK_VALUE.unpack
        size = BLOCK_VALUE.size
        names: dict[bytes, str] = {}
        with self._env.begin(db=self._blocks, buffers=False) as txn:
            for k, v in txn.cursor():
                if len(v) != size:
                    raise CorruptionError(f"index value of {len(v)} bytes, expected {size}")
                # decode_key inlined, with the namespace names decoded once: this loop is most
                # of the time a reopen takes.
                end = 1 + k[0] if k else 0
                ns = names.get(k[1:end])
                if ns is None or len(k) <= end:
                    ns, key = decode_key(k)
                    names[k[1:end]] = ns
                else:
                    key = k[end:]
                yield ns, key, unpack(v)

    def count(self) -> int:
        """Number of indexed blocks."""
        if self._blocks is None:
            return 0
        with self._env.begin(db=self._blocks) as txn:
            return txn.stat(self._blocks)["entries"]

    # -- writes ----------------------------------------------------------------------------
    def apply(self, ops: list[Op], lsn: int | None = None, meta: dict[bytes, int] | None = None,
              clear: bool = False) -> None:
        """Apply ``ops`` in one synchronous transaction (recovery, rebuild, tests)."""
        self._write_txn(ops, lsn, meta or {}, clear)
        if lsn is not None:
            self._applied_lsn = max(self._applied_lsn, lsn)

    def _write_txn(self, ops: list[Op], lsn: int | None, meta: dict[bytes, int], clear: bool,
                   raw_meta: dict[bytes, bytes] | None = None) -> None:
        if self.readonly:
            raise InvalidArgumentError(f"the index {self.path!r} was opened read-only")
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    if clear:
                        txn.drop(self._blocks, delete=False)
                    for ns, key, rec in ops:
                        k = encode_key(ns, key)
                        if rec is None:
                            txn.delete(k, db=self._blocks)
                        else:
                            txn.put(k, encode_block(rec), db=self._blocks)
                    for name, value in meta.items():
                        txn.put(name, U64.pack(value), db=self._meta)
                    for name, raw in (raw_meta or {}).items():
                        txn.put(name, raw, db=self._meta)
                    if lsn is not None:
                        txn.put(META_CHECKPOINT, U64.pack(lsn), db=self._meta)
                return
            except lmdb.MapFullError:
                # The transaction was aborted whole; grow the map and redo it.
                new_size = self._env.info()["map_size"] * 2
                log.info("index map full, growing to %d MiB", new_size >> 20)
                self._env.set_mapsize(new_size)

    # -- the writer thread -----------------------------------------------------------------
    def start_writer(self, before_commit: Callable[[int], None],
                     on_checkpoint: Callable[[int], None] | None = None) -> None:
        """Start the one LMDB writer thread (see the module docstring)."""
        self._before_commit = before_commit
        self._on_checkpoint = on_checkpoint
        self._thread = threading.Thread(target=self._run, name="tairstore-index", daemon=True)
        self._thread.start()

    def enqueue(self, lsn: int, ops: list[Op]) -> None:
        """Queue the index changes of WAL record ``lsn``. Callers enqueue in LSN order."""
        with self._cond:
            if self._closed:
                raise ClosedError("index is closed")
            self._queue.append((lsn, ops))
            self._cond.notify_all()

    def wait_applied(self, lsn: int | None = None, timeout: float | None = None) -> bool:
        """Block until everything queued (or up to ``lsn``) is in LMDB."""
        with self._cond:
            target = lsn if lsn is not None else (self._queue[-1][0] if self._queue else 0)
            ok = self._cond.wait_for(
                lambda: self._applied_lsn >= target or self._error is not None or self._thread is None,
                timeout,
            )
            if self._error is not None:
                raise FatalIOError(f"index writer failed: {self._error}") from self._error
            return ok

    @property
    def failure(self) -> BaseException | None:
        """The error that stopped the writer thread, or None."""
        return self._error

    @property
    def applied_lsn(self) -> int:
        """The last LSN committed to LMDB."""
        return self._applied_lsn

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                batch: list[Op] = []
                last = 0
                while self._queue and len(batch) < MAX_BATCH:
                    lsn, ops = self._queue.popleft()
                    batch.extend(ops)
                    last = lsn
            try:
                # W2: LMDB must never hold a change the WAL could still lose in a crash.
                self._before_commit(last)
                self._write_txn(batch, last, {}, False)
            except BaseException as exc:  # noqa: BLE001 - reported to every waiter
                log.error("index writer stopped: %s", exc)
                with self._cond:
                    self._error = exc
                    self._queue.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._applied_lsn = last
                self._cond.notify_all()
            if self._on_checkpoint is not None:
                self._on_checkpoint(last)

    def close(self) -> None:
        """Drain the queue, stop the writer and close LMDB. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._env.close()
