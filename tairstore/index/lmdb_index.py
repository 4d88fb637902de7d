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

import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Union

import lmdb

from tairstore.errors import ClosedError, CorruptionError, FatalIOError
from tairstore.index.records import BLOCK_VALUE, U64, BlockRecord, decode_block, decode_key, encode_block, encode_key

__all__ = ["Index", "PutOp", "DelOp"]

log = logging.getLogger(__name__)

INITIAL_MAP_SIZE = 64 << 20  # grows by doubling on MapFullError; 64 MiB holds ~500k entries
MAX_BATCH = 4096  # ops per LMDB transaction: bounds the time one commit holds the writer
META_FORMAT = b"format_version"
META_CHECKPOINT = b"checkpoint_lsn"

PutOp = tuple[str, bytes, BlockRecord]  # namespace, key, record
DelOp = tuple[str, bytes, None]
Op = Union[PutOp, DelOp]


class Index:
    """LMDB environment holding the ``meta`` and ``blocks`` databases."""

    def __init__(self, path: str, *, map_size: int = INITIAL_MAP_SIZE) -> None:
        self.path = path
        self._env = lmdb.open(
            path, map_size=map_size, max_dbs=4, subdir=True, sync=True, metasync=True,
            readahead=False, meminit=False, lock=True,
        )
        self._meta = self._env.open_db(b"meta")
        self._blocks = self._env.open_db(b"blocks")
        self._ns_db = self._env.open_db(b"namespaces")
        self._queue: deque[tuple[int, list[Op]]] = deque()
        self._cond = threading.Condition()
        self._applied_lsn = self.checkpoint_lsn()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._closed = False

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, name: bytes) -> int | None:
        """An integer meta value, or None if unset."""
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(name)
        return None if raw is None else U64.unpack(raw)[0]

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
        with self._env.begin(db=self._ns_db) as txn:
            for k, v in txn.cursor():
                try:
                    out[bytes(k).decode()] = json.loads(bytes(v))
                except ValueError as exc:
                    raise CorruptionError(f"namespace settings of {bytes(k)!r} do not parse: {exc}") from None
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
        with self._env.begin(db=self._blocks, buffers=False) as txn:
            for k, v in txn.cursor():
                ns, key = decode_key(k)
                yield ns, key, decode_block(v)

    def raw_items(self) -> Iterator[tuple[str, bytes, tuple]]:
        """Every indexed block as ``(namespace, key, value tuple)``: the fast path for open.

        The tuple is ``BLOCK_VALUE.unpack`` of the value, in :class:`BlockRecord` field order.
        """
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
        with self._env.begin(db=self._blocks) as txn:
            return txn.stat(self._blocks)["entries"]

    # -- writes ----------------------------------------------------------------------------
    def apply(self, ops: list[Op], lsn: int | None = None, meta: dict[bytes, int] | None = None,
              clear: bool = False) -> None:
        """Apply ``ops`` in one synchronous transaction (recovery, rebuild, tests)."""
        self._write_txn(ops, lsn, meta or {}, clear)
        if lsn is not None:
            self._applied_lsn = max(self._applied_lsn, lsn)

    def _write_txn(self, ops: list[Op], lsn: int | None, meta: dict[bytes, int], clear: bool) -> None:
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
