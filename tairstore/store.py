"""The embedded store: write sessions, reads, matching and placement over the tiers.

Theory of operation
-------------------
State lives in three places, each with one job:

- the **key map** (``self._blocks``, a dict in memory) answers every read, ``exists`` and
  ``match``; a key is in it exactly when it is committed and not deleted (W1);
- the **WAL** records every commit and delete before it is acknowledged; in ``sync`` mode the
  record, and (through the WAL's ``pre_sync`` hook) the segment bytes it points at, are fsynced
  first (W2);
- **LMDB** trails the WAL through the index writer thread, so that reopening needs no scan.

Write path (two-phase): ``start_write`` drops keys already stored or in flight, reserves a DRAM
slot and/or an SSD record per key and logs PREPARE; ``write`` copies the payload into its
reservations (one copy into the arena, one ``pwritev`` into the segment) and computes its
crc32c once; ``finish_write`` logs COMMIT (one group-committed fsync in ``sync`` mode) and only
then publishes the keys in the key map. Keys not committed are released.

Placement: every block of a store with an SSD tier is written through to SSD; the DRAM copy is
a cache in front of it, evicted LRU-first (skipping pinned slots) without losing the block. In a
store without SSD tier the DRAM copy is the block, and eviction drops it. When the SSD tier is
full its oldest segment is evicted whole (a log-structured FIFO): its keys are deleted through
the WAL and the file is unlinked once its readers are gone.

Locking: one store lock guards the key map, the sessions and the LRU. It is held for metadata
only; payload copies, crc computation, disk I/O and fsyncs run outside it, so readers never
wait for a writer's fsync. Index changes are queued under the same lock as their WAL append, so
LMDB applies them in LSN order.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from typing import Any

import numpy as np

from . import errors
from .config import MAX_KEY_BYTES, MAX_NAMESPACE_BYTES, StoreConfig
from .datadir import DataDir
from .errors import (
    CapacityError,
    ClosedError,
    CorruptionError,
    FatalIOError,
    InvalidArgumentError,
    SessionError,
    StoreError,
)
from .format.checksum import crc32c
from .index.lmdb_index import Index
from .index.records import BlockRecord
from .match import MatchResult, match_mask
from .session import ABORTED, EXPIRED, FINISHED, OPEN, PendingBlock, WriteSession
from .tiers.dram import DramArena
from .format.segment import FLAG_COMMITTED
from .tiers.ssd import SegmentGoneError, SegmentLog
from .wal import Abort, Commit, CommitEntry, Delete, Prepare, WalWriter, read_log

__all__ = ["Store", "open_store"]

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "default"
MAX_LEASE_S = 3600.0  # a session holds reserved space; an hour is more than any engine needs
TRUNCATE_EVERY_S = 1.0  # how often a checkpoint may trigger WAL file deletion


class _Block:
    """A committed block as the key map knows it."""

    __slots__ = ("size", "crc", "generation", "created_ns", "ssd", "dram")

    def __init__(self, size: int, crc: int, generation: int, created_ns: int,
                 ssd: tuple[int, int, int] | None, dram: Any) -> None:
        self.size = size
        self.crc = crc
        self.generation = generation
        self.created_ns = created_ns
        self.ssd = ssd  # (segment, offset, record length) or None
        self.dram = dram  # arena Slot or None

    def record(self) -> BlockRecord:
        seg, off, length = self.ssd
        return BlockRecord(self.size, self.crc, self.generation, self.created_ns, seg, off, length)


def _as_bytes_view(data: Any) -> memoryview:
    try:
        mv = memoryview(data)
    except TypeError:
        raise InvalidArgumentError(
            f"block data must be bytes, bytearray, memoryview or a numpy array, not {type(data).__name__}"
        ) from None
    if not mv.c_contiguous:
        raise InvalidArgumentError("block data must be C-contiguous")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


def _check_session_type(session: Any) -> None:
    if not isinstance(session, WriteSession):
        raise SessionError(f"expected a WriteSession from start_write, got {type(session).__name__}")


class Store:
    """A tiered KV-cache block store. Use :func:`tairstore.open` to make one.

    Every method is safe to call from many threads at once. Every method takes an optional
    ``namespace`` (default ``"default"``); the same key in two namespaces is two blocks.
    """

    def __init__(self, path: str | os.PathLike, config: StoreConfig) -> None:
        self.config = config.validate()
        self.path = os.fspath(path)
        self._fs = config.fs
        self._lock = threading.RLock()
        self._blocks: dict[tuple[str, bytes], _Block] = {}
        self._inflight: dict[tuple[str, bytes], int] = {}
        self._sessions: dict[int, WriteSession] = {}
        self._lru: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._seg_keys: dict[int, set[tuple[str, bytes]]] = {}
        self._seg_pending: Counter[int] = Counter()
        self._counters: Counter[str] = Counter()
        self._session_ids = itertools.count(1)
        self._generation = 0
        self._closed = False
        self._fatal: BaseException | None = None
        self._last_truncate = 0.0
        self._durable = config.ssd_bytes > 0
        self._wal: WalWriter | None = None
        self._ssd: SegmentLog | None = None
        self._dram: DramArena | None = None
        self._index: Index | None = None
        self._dir = DataDir(self.path, self._fs, create=config.create)
        try:
            self._open()
        except BaseException:
            self._teardown()
            raise
        self._reaper_stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="tairstore-reaper", daemon=True)
        self._reaper.start()

    # ------------------------------------------------------------------------------- opening
    def _open(self) -> None:
        cfg = self.config
        if cfg.dram_bytes:
            self._dram = DramArena(cfg.dram_bytes)
        self._index = Index(self._dir.sub("index"))
        if not self._durable:
            # A volatile cache: nothing on disk describes blocks, so nothing to recover.
            return
        self._ssd = SegmentLog(
            self._fs, self._dir.sub("segments"), capacity_bytes=cfg.ssd_bytes,
            segment_bytes=min(cfg.segment_bytes, cfg.ssd_bytes), compression=cfg.compression,
            zstd_level=cfg.zstd_level,
        )
        self._ssd.open()
        next_lsn = self._recover()
        self._wal = WalWriter(
            self._fs, self._dir.sub("wal"), durability=cfg.durability,
            batch_interval_s=cfg.batch_interval_ms / 1000.0, file_bytes=cfg.wal_file_bytes,
            next_lsn=next_lsn, pre_sync=self._ssd.sync,
        )
        # Everything before next_lsn is in LMDB now: older log files are no longer needed.
        self._wal.truncate_before(next_lsn)
        self._index.start_writer(before_commit=self._wal.sync, on_checkpoint=self._on_checkpoint)

    def _recover(self) -> int:
        """Load the index, replay the WAL tail after the checkpoint, return the next LSN."""
        from .recovery import recover

        return recover(self)

    # ------------------------------------------------------------------------------ checks
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the store is closed; open it again with tairstore.open()")

    def _check_writable(self) -> None:
        self._check_open()
        if self._fatal is not None:
            raise FatalIOError(
                f"the store refuses writes after an I/O failure ({self._fatal}); close and reopen it"
            )

    @staticmethod
    def _ns(namespace: str) -> str:
        if not isinstance(namespace, str):
            raise InvalidArgumentError(f"namespace must be a str, got {type(namespace).__name__}")
        n = len(namespace.encode())
        if not 1 <= n <= MAX_NAMESPACE_BYTES:
            raise InvalidArgumentError(f"namespace must be 1..{MAX_NAMESPACE_BYTES} bytes of UTF-8")
        return namespace

    @staticmethod
    def _key(key: Any) -> bytes:
        if isinstance(key, (bytearray, memoryview)):
            key = bytes(key)
        if not isinstance(key, bytes):
            raise InvalidArgumentError(
                f"keys are bytes (1..{MAX_KEY_BYTES}), got {type(key).__name__}; encode strings first"
            )
        if not 1 <= len(key) <= MAX_KEY_BYTES:
            raise InvalidArgumentError(f"keys are 1..{MAX_KEY_BYTES} bytes, got {len(key)}")
        return key

    def _keys(self, keys: Any) -> list[bytes]:
        if isinstance(keys, (bytes, bytearray, memoryview, str)):
            raise InvalidArgumentError("pass a list of keys, not a single key")
        return [self._key(k) for k in keys]

    def _check_size(self, size: Any) -> int:
        if not isinstance(size, int) or isinstance(size, bool):
            raise InvalidArgumentError(f"block sizes are ints, got {type(size).__name__}")
        if size < 1:
            raise InvalidArgumentError("empty blocks are not stored; a block has >= 1 byte")
        if size > self.config.max_block_bytes:
            raise CapacityError(
                f"block of {size} bytes exceeds max_block_bytes={self.config.max_block_bytes}",
                dimension="block_size",
            )
        return size

    def _fail(self, exc: BaseException) -> None:
        """Record a fatal I/O failure: no more writes (durability is unknown from here)."""
        if self._fatal is None:
            self._fatal = exc
            log.error("store %s refuses writes from now on: %s", self.path, exc)

    def _next_generation(self) -> int:
        # Monotonic across restarts: wall-clock nanoseconds, never below the last one issued.
        self._generation = max(self._generation + 1, time.time_ns())
        return self._generation

    # --------------------------------------------------------------------------- write path
    def start_write(self, keys: list[bytes], sizes: list[int], lease_s: float = 30.0, *,
                    namespace: str = DEFAULT_NAMESPACE) -> WriteSession:
        """Begin a two-phase write.

        Keys already stored or being written by another session are dropped from the session;
        for the rest, space is reserved (DRAM and/or SSD) and PREPARE is logged.

        Args:
            keys: block keys (bytes, 1..64 each), no duplicates.
            sizes: the exact byte size of each block.
            lease_s: seconds the reservation is held; after that the store aborts the session.

        Returns:
            the :class:`WriteSession`; ``keys_to_write`` lists the keys to send.

        Raises:
            InvalidArgumentError: bad keys, sizes, lease or namespace.
            CapacityError: a block cannot fit in any tier even after eviction.
            FatalIOError: the store stopped accepting writes after an I/O failure.
        """
        ns = self._ns(namespace)
        keys = self._keys(keys)
        sizes = list(sizes)
        if len(keys) != len(sizes):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(sizes)} sizes")
        if len(set(keys)) != len(keys):
            raise InvalidArgumentError("duplicate keys in one write session")
        sizes = [self._check_size(s) for s in sizes]
        if not isinstance(lease_s, (int, float)) or not 0 < lease_s <= MAX_LEASE_S:
            raise InvalidArgumentError(f"lease_s must be in (0, {MAX_LEASE_S}]")
        with self._lock:
            self._check_writable()
            sid = next(self._session_ids)
            session = WriteSession(sid, ns, [], float(lease_s), time.monotonic() + lease_s)
            try:
                for key, size in zip(keys, sizes):
                    k = (ns, key)
                    if k in self._blocks or k in self._inflight:
                        continue
                    p = PendingBlock(size)
                    session.pending[key] = p
                    session.keys_to_write.append(key)
                    self._inflight[k] = sid
                    self._reserve(ns, key, p)
            except BaseException:
                self._release_pending(session, session.pending)
                raise
            if session.keys_to_write:
                self._sessions[sid] = session
            if self._wal is not None and session.keys_to_write:
                self._wal.append(Prepare(sid, ns, tuple(session.keys_to_write),
                                         tuple(session.pending[k].size for k in session.keys_to_write)))
        return session

    def _reserve(self, ns: str, key: bytes, p: PendingBlock) -> None:
        """Reserve the places a new block will be written (store lock held)."""
        if self._dram is not None and p.size <= self._dram.capacity_bytes:
            p.dram = self._alloc_dram(p.size)
        if self._ssd is None:
            if p.dram is None:
                raise CapacityError(
                    f"DRAM tier cannot fit a block of {p.size} bytes (pinned or reserved space "
                    "fills it, or the block is larger than the tier)", dimension="tier:dram")
            return
        while True:
            try:
                p.ssd = self._ssd.reserve(ns, key, p.size)
                break
            except CapacityError:
                if not self._evict_segment():
                    raise
        self._seg_pending[p.ssd.segment] += 1

    def _alloc_dram(self, size: int):
        """A DRAM slot for ``size`` bytes, evicting LRU blocks as needed; None if impossible."""
        arena = self._dram
        while True:
            slot = arena.alloc(size)
            if slot is not None:
                return slot
            victim = None
            for k in self._lru:
                if not arena.is_pinned(self._blocks[k].dram):
                    victim = k
                    break
            if victim is None:
                return None
            self._evict_dram(victim)

    def _evict_dram(self, k: tuple[str, bytes]) -> None:
        b = self._blocks[k]
        del self._lru[k]
        self._dram.release(b.dram)
        b.dram = None
        self._counters["evictions_dram"] += 1
        if b.ssd is None:
            # Volatile block: the DRAM copy was the block.
            del self._blocks[k]

    def _evict_segment(self) -> bool:
        """Evict the oldest SSD segment whole (FIFO); False if none can go."""
        ssd = self._ssd
        head = ssd.head_segment
        for seg in ssd.segment_ids():
            if seg == head or self._seg_pending[seg]:
                continue
            keys = self._seg_keys.pop(seg, set())
            by_ns: dict[str, list[bytes]] = {}
            for k in keys:
                b = self._blocks.pop(k)
                if b.dram is not None:
                    del self._lru[k]
                    self._dram.release(b.dram)
                by_ns.setdefault(k[0], []).append(k[1])
            for ns, ks in by_ns.items():
                self._log(Delete(ns, tuple(ks)), [(ns, key, None) for key in ks])
            self._counters["evictions_ssd"] += len(keys)
            self._counters["segments_evicted"] += 1
            # No WAL sync needed first: at open, index entries pointing at a missing segment
            # are dropped, which is what the DELETE records say anyway.
            ssd.delete_segment(seg)
            return True
        return False

    def _log(self, rec: Any, ops: list) -> int:
        """Append to the WAL and queue the index change, in LSN order (store lock held)."""
        lsn = self._wal.append(rec)
        if ops:
            self._index.enqueue(lsn, ops)
        return lsn

    def write(self, session: WriteSession, key: bytes, data: Any) -> None:
        """Copy one block's payload into its reservation.

        Raises:
            SessionError: the key is not in ``session.keys_to_write``, was already written, or
                ``data`` has the wrong size.
            LeaseExpiredError: the lease ran out.
            DiskFullError: the disk is full (the session stays open; abort or retry).
        """
        self._write(session, key, data, committed=False)

    def _write(self, session: WriteSession, key: bytes, data: Any, *, committed: bool) -> None:
        _check_session_type(session)
        key = self._key(key)
        mv = _as_bytes_view(data)
        with session.lock:
            self._check_session(session)
            p = session.pending.get(key)
            if p is None:
                raise SessionError(f"key {key.hex()[:16]}… is not in write session {session.id}'s keys_to_write")
            if p.written:
                raise SessionError(f"key {key.hex()[:16]}… was already written in session {session.id}")
            if len(mv) != p.size:
                raise SessionError(f"block is {len(mv)} bytes but start_write reserved {p.size}")
            self._check_writable()
            p.crc = crc32c(mv)
            p.generation = self._next_generation()
            if p.dram is not None:
                dst = self._dram.writable_view(p.dram)
                np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(mv, np.uint8))
                dst.release()
            if p.ssd is not None:
                try:
                    p.location = self._ssd.write(p.ssd, session.namespace, key, mv,
                                                 generation=p.generation, crc=p.crc,
                                                 committed=committed)
                except FatalIOError as exc:
                    self._fail(exc)
                    raise
            p.written = True

    def _check_session(self, session: WriteSession) -> None:
        """Raise if the session cannot be used; expire it if its lease ran out (session lock held)."""
        with self._lock:
            if self._sessions.get(session.id) is not session and session.state == OPEN:
                raise SessionError("not a write session from this store")
            if session.state == OPEN and session.expired:
                self._abort_locked(session, EXPIRED)
        self._check_open()
        session.check_usable()

    def finish_write(self, session: WriteSession, ok_keys: list[bytes]) -> int:
        """Commit ``ok_keys`` of the session and release the rest.

        Returns only once the commit is as durable as the durability mode promises (see
        :mod:`tairstore.config`). Keys in ``ok_keys`` must have been written.

        Returns:
            the number of keys committed.
        """
        _check_session_type(session)
        ok = self._keys(ok_keys)
        with session.lock:
            if session.state == OPEN and not session.keys_to_write and not ok:
                # Every key was already stored: nothing was reserved, nothing to commit.
                session.state = FINISHED
                return 0
            self._check_session(session)
            ok_set = set(ok)
            for key in ok_set:
                p = session.pending.get(key)
                if p is None or not p.written:
                    raise SessionError(f"key {key.hex()[:16]}… was not written in session {session.id}")
            ns = session.namespace
            committed = {k: session.pending[k] for k in session.keys_to_write if k in ok_set}
            for k, p in committed.items():
                if p.location is not None and not p.location.flags & FLAG_COMMITTED:
                    # Before COMMIT is logged, so a rebuild from segments never knows a block
                    # the WAL does not (the same sync makes both durable).
                    try:
                        self._ssd.mark_committed(p.location, ns, k, p.generation)
                    except FatalIOError as exc:
                        self._fail(exc)
                        raise
            lsn = None
            with self._lock:
                self._check_writable()
                if self._wal is not None:
                    entries = tuple(
                        CommitEntry(ns, k, p.size, p.crc, p.generation,
                                    (p.location.segment, p.location.offset, p.location.length))
                        for k, p in committed.items())
                    created = time.time_ns()
                    ops = [(ns, k, BlockRecord(p.size, p.crc, p.generation, created,
                                               p.location.segment, p.location.offset, p.location.length))
                           for k, p in committed.items()]
                    if entries:
                        lsn = self._log(Commit(session.id, entries), ops)
                    rest = [k for k in session.keys_to_write if k not in ok_set]
                    if rest and not entries:
                        self._wal.append(Abort(session.id))
            if lsn is not None and self.config.durability == "sync":
                try:
                    self._wal.sync(lsn)
                except FatalIOError as exc:
                    self._fail(exc)
                    raise
            with self._lock:
                now = time.time_ns()
                for k, p in committed.items():
                    kk = (ns, k)
                    loc = p.location
                    ssd = (loc.segment, loc.offset, loc.length) if loc is not None else None
                    self._blocks[kk] = _Block(p.size, p.crc, p.generation, now, ssd, p.dram)
                    if p.dram is not None:
                        self._lru[kk] = None
                    if ssd is not None:
                        self._seg_keys.setdefault(ssd[0], set()).add(kk)
                        self._ssd.mark_live(ssd[0], ssd[2])
                        self._seg_pending[ssd[0]] -= 1
                        p.ssd = None
                    p.dram = None
                    del self._inflight[kk]
                    del session.pending[k]
                self._release_pending(session, session.pending)
                session.state = FINISHED
                self._sessions.pop(session.id, None)
                self._counters["puts"] += len(committed)
                self._counters["bytes_written"] += sum(p.size for p in committed.values())
            return len(committed)

    def abort_write(self, session: WriteSession) -> None:
        """Abandon a session: release every reservation. A finished session is left alone."""
        _check_session_type(session)
        with session.lock, self._lock:
            if session.state == OPEN:
                self._abort_locked(session, ABORTED)

    def _abort_locked(self, session: WriteSession, state: str) -> None:
        self._release_pending(session, session.pending)
        session.state = state
        self._sessions.pop(session.id, None)
        if state == EXPIRED:
            self._counters["leases_expired"] += 1
        if self._wal is not None and not self._closed and self._fatal is None:
            self._wal.append(Abort(session.id))

    def _release_pending(self, session: WriteSession, pending: dict[bytes, PendingBlock]) -> None:
        """Give back the reservations of ``pending`` (store lock held)."""
        for key, p in list(pending.items()):
            if p.dram is not None:
                self._dram.release(p.dram)
                p.dram = None
            if p.ssd is not None:
                self._ssd.abandon(p.ssd)
                self._seg_pending[p.ssd.segment] -= 1
                p.ssd = None
            self._inflight.pop((session.namespace, key), None)
        pending.clear()

    def put(self, key: bytes, data: Any, *, namespace: str = DEFAULT_NAMESPACE) -> bool:
        """Store one block; False if the key already exists (or is being written).

        Equivalent to ``start_write`` + ``write`` + ``finish_write`` of one key.
        """
        mv = _as_bytes_view(data)
        session = self.start_write([key], [len(mv)], namespace=namespace)
        if not session.keys_to_write:
            return False
        try:
            # The whole payload is at hand, so the record is written committed at once: a
            # rebuild may restore it even if the crash comes before COMMIT, and its bytes are
            # exactly the ones put.
            self._write(session, session.keys_to_write[0], mv, committed=True)
            return self.finish_write(session, session.keys_to_write) == 1
        except BaseException:
            self.abort_write(session)
            raise

    # ---------------------------------------------------------------------------- read path
    def get(self, key: bytes, *, namespace: str = DEFAULT_NAMESPACE) -> memoryview | None:
        """The block's bytes, or None on a miss.

        From DRAM this is a zero-copy read-only view that pins its slot: the bytes never change
        while the view (or anything made from it) is alive (R2). From SSD the block is read,
        verified and, with ``promote_on_read``, copied into DRAM on the way.
        """
        k = (self._ns(namespace), self._key(key))
        with self._lock:
            self._check_open()
            b = self._blocks.get(k)
            if b is None:
                self._counters["misses"] += 1
                return None
            if b.dram is not None:
                view = self._dram.pinned_view(b.dram)
                self._lru.move_to_end(k)
                if not self.config.verify_dram_reads:
                    self._counters["hits"] += 1
                    self._counters["hits_dram"] += 1
                    return view
        if b.dram is not None:
            return self._verified_dram(k, b, view)
        return self._get_from_ssd(k, b)

    def _verified_dram(self, k, b: _Block, view: memoryview) -> memoryview | None:
        if crc32c(view) == b.crc:
            with self._lock:
                self._counters["hits"] += 1
                self._counters["hits_dram"] += 1
            return view
        view.release()
        self._drop_corrupt(k, b, "DRAM copy")
        return None

    def _get_from_ssd(self, k, b: _Block) -> memoryview | None:
        slot = None
        if self.config.promote_on_read and self._dram is not None and b.size <= self._dram.capacity_bytes:
            with self._lock:
                if self._fatal is None and not self._closed:
                    slot = self._alloc_dram(b.size)
        if slot is not None:
            dst = self._dram.writable_view(slot)
            ok = self._read_ssd(k, b, dst)
            dst.release()
            with self._lock:
                if ok and self._blocks.get(k) is b and b.dram is None and not self._closed:
                    b.dram = slot
                    self._lru[k] = None
                    self._counters["promotions"] += 1
                    return self._dram.pinned_view(slot)
                self._dram.release(slot)
                if not ok:
                    return None
        buf = bytearray(b.size)
        if not self._read_ssd(k, b, buf):
            return None
        return memoryview(buf).toreadonly()

    def _read_ssd(self, k, b: _Block, out) -> bool:
        """Read and verify a block from SSD into ``out``; count a hit or a miss."""
        seg, off, length = b.ssd
        try:
            self._ssd.read_into(seg, off, length, out, namespace=k[0], key=k[1], expected_crc=b.crc)
        except SegmentGoneError:
            # Evicted or compacted between our lookup and the read: a plain miss.
            with self._lock:
                self._counters["misses"] += 1
            return False
        except CorruptionError as exc:
            self._drop_corrupt(k, b, f"SSD record ({exc})")
            return False
        except (StoreError, OSError) as exc:
            # The segment went away under us (evicted) or the read failed: a miss (R1).
            with self._lock:
                self._counters["misses"] += 1
                self._counters["read_errors"] += 1
            log.warning("read of block %s failed: %s", k[1].hex()[:16], exc)
            return False
        with self._lock:
            self._counters["hits"] += 1
            self._counters["hits_ssd"] += 1
        return True

    def _drop_corrupt(self, k, b: _Block, where: str) -> None:
        """R1: a block failing its checksum is a miss, is counted, and leaves the index."""
        log.error("checksum mismatch in %s of block %s/%s: dropped", where, k[0], k[1].hex()[:16])
        with self._lock:
            self._counters["checksum_errors"] += 1
            self._counters["misses"] += 1
            if self._blocks.get(k) is b:
                self._remove_locked([k])

    def get_into(self, key: bytes, out: Any, *, namespace: str = DEFAULT_NAMESPACE) -> int:
        """Copy the block into the writable buffer ``out``; the bytes copied, 0 on a miss.

        Raises:
            InvalidArgumentError: ``out`` is not writable or is smaller than the block.
        """
        k = (self._ns(namespace), self._key(key))
        try:
            dst = memoryview(out)
        except TypeError:
            raise InvalidArgumentError("out must be a writable buffer (bytearray, numpy array…)") from None
        if dst.readonly or not dst.c_contiguous:
            raise InvalidArgumentError("out must be a writable, C-contiguous buffer")
        dst = dst.cast("B") if (dst.format != "B" or dst.ndim != 1) else dst
        with self._lock:
            self._check_open()
            b = self._blocks.get(k)
            if b is None:
                self._counters["misses"] += 1
                return 0
            if len(dst) < b.size:
                raise InvalidArgumentError(f"out holds {len(dst)} bytes; the block has {b.size}")
            view = None
            if b.dram is not None:
                view = self._dram.pinned_view(b.dram)
                self._lru.move_to_end(k)
        if view is not None:
            target = np.frombuffer(dst, np.uint8, count=b.size)
            np.copyto(target, np.frombuffer(view, np.uint8))
            view.release()
            if self.config.verify_dram_reads and crc32c(dst[: b.size]) != b.crc:
                self._drop_corrupt(k, b, "DRAM copy")
                return 0
            with self._lock:
                self._counters["hits"] += 1
                self._counters["hits_dram"] += 1
            return b.size
        return b.size if self._read_ssd(k, b, dst[: b.size]) else 0

    def exists(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE) -> list[bool]:
        """Per key, whether it is stored (committed and not deleted)."""
        ns = self._ns(namespace)
        keys = self._keys(keys)
        with self._lock:
            self._check_open()
            return [(ns, k) in self._blocks for k in keys]

    def match(self, keys: list[bytes], mode: str = "prefix", window: int | None = None, *,
              namespace: str = DEFAULT_NAMESPACE) -> MatchResult:
        """Match a chain of keys: ``prefix``, ``exact`` or ``sliding_window`` (see :mod:`tairstore.match`)."""
        ns = self._ns(namespace)
        keys = self._keys(keys)
        hits: list[bool] = []
        tiers: list[str | None] = []
        with self._lock:
            self._check_open()
            get = self._blocks.get
            for k in keys:
                b = get((ns, k))
                if b is None:
                    hits.append(False)
                    tiers.append(None)
                else:
                    hits.append(True)
                    tiers.append("dram" if b.dram is not None else "ssd")
        return match_mask(hits, tiers, mode, window)

    # ------------------------------------------------------------------------------ delete
    def delete(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE) -> int:
        """Delete blocks; returns how many existed. SSD space is reclaimed asynchronously."""
        ns = self._ns(namespace)
        keys = self._keys(keys)
        with self._lock:
            self._check_writable()
            present = [(ns, k) for k in dict.fromkeys(keys) if (ns, k) in self._blocks]
            lsn = self._remove_locked(present)
        if lsn is not None and self.config.durability == "sync":
            try:
                self._wal.sync(lsn)
            except FatalIOError as exc:
                self._fail(exc)
                raise
        return len(present)

    def _remove_locked(self, present: list[tuple[str, bytes]]) -> int | None:
        """Drop blocks from the key map and tiers; log DELETE (store lock held)."""
        if not present:
            return None
        tombstones = []
        for k in present:
            b = self._blocks.pop(k)
            if b.dram is not None:
                self._lru.pop(k, None)
                self._dram.release(b.dram)
            if b.ssd is not None:
                self._seg_keys.get(b.ssd[0], set()).discard(k)
                self._ssd.mark_dead(b.ssd[0], b.ssd[2])
                tombstones.append(k)
        self._counters["deletes"] += len(present)
        if self._wal is None or not tombstones or self._fatal is not None:
            return None
        by_ns: dict[str, list[bytes]] = {}
        for ns, key in tombstones:
            by_ns.setdefault(ns, []).append(key)
        lsn = None
        for ns, ks in by_ns.items():
            lsn = self._log(Delete(ns, tuple(ks)), [(ns, key, None) for key in ks])
            for key in ks:
                # A tombstone in the segment log keeps `fsck --rebuild` from resurrecting it.
                try:
                    self._ssd.write_tombstone(ns, key, self._next_generation())
                except CapacityError:
                    pass  # the WAL/index delete stands; only a rebuild could bring it back
        return lsn

    # ---------------------------------------------------------------------- observability
    def stats(self) -> dict:
        """Usage per tier and namespace, counters and configuration facts."""
        with self._lock:
            self._check_open()
            dram_bytes = sum(self._blocks[k].size for k in self._lru)
            ssd_blocks = [b for b in self._blocks.values() if b.ssd is not None]
            namespaces: dict[str, dict[str, int]] = {}
            for (ns, _), b in self._blocks.items():
                d = namespaces.setdefault(ns, {"blocks": 0, "bytes": 0})
                d["blocks"] += 1
                d["bytes"] += b.size
            tiers: dict[str, dict] = {}
            if self._dram is not None:
                tiers["dram"] = {
                    "blocks": len(self._lru), "bytes": dram_bytes,
                    "capacity": self._dram.capacity_bytes, "used_bytes": self._dram.used_bytes,
                    "pinned_bytes": self._dram.pinned_bytes,
                }
            if self._ssd is not None:
                tiers["ssd"] = {
                    "blocks": len(ssd_blocks), "bytes": sum(b.size for b in ssd_blocks),
                    "capacity": self._ssd.capacity_bytes, "file_bytes": self._ssd.total_bytes,
                    "segments": len(self._ssd.segment_ids()),
                }
            counters = {name: self._counters.get(name, 0) for name in (
                "hits", "misses", "hits_dram", "hits_ssd", "checksum_errors", "read_errors",
                "puts", "deletes", "bytes_written", "evictions_dram", "evictions_ssd",
                "segments_evicted", "promotions", "leases_expired", "recovered_blocks",
                "recovery_dropped")}
            return {
                "blocks": len(self._blocks),
                "tiers": tiers,
                "namespaces": namespaces,
                "counters": counters,
                "sessions_open": len(self._sessions),
                "durability": self.config.durability if self._durable else "volatile",
                "volatile": not self._durable,
                "writable": self._fatal is None,
            }

    # ----------------------------------------------------------------------- housekeeping
    def _on_checkpoint(self, lsn: int) -> None:
        now = time.monotonic()
        if now - self._last_truncate >= TRUNCATE_EVERY_S:
            self._last_truncate = now
            try:
                self._wal.truncate_before(lsn + 1)
            except (StoreError, OSError) as exc:
                log.warning("WAL truncation failed (will retry): %s", exc)

    def _reap_loop(self) -> None:
        while not self._reaper_stop.wait(self.config.reaper_interval_s):
            self.reap_expired()

    def reap_expired(self) -> int:
        """Abort every session whose lease ran out; returns how many (the reaper calls this)."""
        with self._lock:
            expired = [s for s in self._sessions.values() if s.expired]
        n = 0
        for s in expired:
            with s.lock, self._lock:
                if s.state == OPEN and not self._closed:
                    self._abort_locked(s, EXPIRED)
                    n += 1
        return n

    def sync(self) -> None:
        """Make everything acknowledged so far durable now (whatever the durability mode)."""
        self._check_open()
        if self._wal is not None:
            self._wal.sync(self._wal.last_lsn)

    def close(self) -> None:
        """Abort open sessions, make the log and index durable, release the directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            for s in list(self._sessions.values()):
                if s.state == OPEN:
                    self._abort_locked(s, ABORTED)
            self._closed = True
        self._reaper_stop.set()
        if self._reaper is not threading.current_thread():
            self._reaper.join()
        self._teardown()

    def _teardown(self) -> None:
        first: BaseException | None = None
        for part in (self._index, self._wal, self._ssd):
            if part is None:
                continue
            try:
                part.close()
            except BaseException as exc:  # noqa: BLE001 - close the rest, then report
                first = first or exc
        self._dir.close()
        if first is not None and self._fatal is None and not isinstance(first, FatalIOError):
            raise first

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<tairstore.Store {self.path!r} {state}>"


def open_store(path: str | os.PathLike, **options: Any) -> Store:
    """Open (creating if needed) the store in directory ``path``.

    Options are the fields of :class:`tairstore.config.StoreConfig`, e.g.
    ``dram_bytes``, ``ssd_bytes``, ``durability``, ``compression``.
    """
    return Store(path, StoreConfig.from_kwargs(**options))
