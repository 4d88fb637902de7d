"""The embedded store: write sessions, reads, matching, placement and capacity over the tiers.

Theory of operation
-------------------
State lives in three places, each with one job:

- the **key map** (``self._blocks``, a dict in memory) answers every read, ``exists`` and
  ``match``; a key is in it exactly when it is committed and not deleted (W1);
- the **WAL** records every commit and delete before it is acknowledged; in ``sync`` mode the
  record, and (through the WAL's ``pre_sync`` hook) the segment bytes it points at, are fsynced
  first (W2);
- **LMDB** trails the WAL through the index writer thread, so that reopening needs no scan.

Write path (two-phase): ``start_write`` drops keys already stored or in flight and *admits*
each remaining key (quotas, then space in each tier, evicting as needed — see
:mod:`tairstore.engine.capacity`) by reserving a DRAM slot and an SSD record; ``write`` copies the
payload into its reservations (one copy into the arena, one ``pwritev`` into the segment) and
computes its crc32c once; ``finish_write`` logs COMMIT (one group-committed fsync in ``sync``
mode) and only then publishes the keys. Keys not committed are released. ``put`` runs the same
three steps without a session object.

Placement: every block of a store with an SSD tier is written through to SSD; the DRAM copy is
a cache in front of it. DRAM pressure drops DRAM copies (the block stays on SSD); SSD pressure
evicts blocks (deletes them) by the SSD tier's policy and leaves dead bytes that compaction
(:mod:`tairstore.engine.compaction`) reclaims. A store without an SSD tier is a volatile cache whose
DRAM evictions drop blocks. An SSD hit is promoted into DRAM on its first or second hit
(``promote_on``).

Capacity: usage is counted per (namespace, tier) including reservations, so no acknowledged
write exceeds a quota (C1). A write first evicts inside its own namespace to fit its quotas;
only when a tier is over its global capacity are other namespaces evicted, furthest over their
fair share first. A maintenance thread keeps tiers between their ``low`` and ``high``
watermarks, reaps expired write sessions and TTLs, and compacts.

Locking: one store lock guards the key map, sessions, namespaces, policies and reservations.
It is held for metadata only; payload copies, crc computation, disk I/O and fsyncs run outside
it, so readers never wait for a writer's fsync. Index changes are queued under the same lock as
their WAL append, so LMDB applies them in LSN order. Lock order: a session's lock, then the
store lock.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import Counter
from typing import Any

from tairstore.engine.capacity import TIERS, Namespace, WatermarkTracker, check_limits, parse_watermarks
from tairstore.engine.compaction import Compactor
from tairstore.config import DEFAULT_NAMESPACE, StoreConfig
from tairstore.engine.consistency import check_open
from tairstore.engine.datadir import FORMAT_VERSION, DataDir, check_path
from tairstore.errors import (
    CapacityError,
    ClosedError,
    FatalIOError,
    InvalidArgumentError,
    NotFoundError,
    SessionError,
)
from tairstore.format.checksum import crc32c
from tairstore.format.segment import FLAG_COMMITTED
from tairstore.index.lmdb_index import Index
from tairstore.index.records import BlockRecord
from tairstore.engine.maintenance import MaintenanceMixin
from tairstore.engine.placement import PlacementMixin, _NeedSsdRoom
from tairstore.engine.reads import ReadPathMixin
from tairstore.policy import make_policy
from tairstore.engine.session import ABORTED, EXPIRED, FINISHED, OPEN, PendingBlock, WriteSession
from tairstore.tiers.dram import DramArena
from tairstore.tiers.ssd import SegmentLog
from tairstore.validate import check_data, check_key, check_keys, check_namespace
from tairstore.wal import Abort, Commit, CommitEntry, Delete, Prepare, WalWriter

__all__ = ["Store", "open_store", "DEFAULT_NAMESPACE", "PLACEMENTS"]

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "dram", "ssd")
MAX_LEASE_S = 3600.0  # a session holds reserved space; an hour is more than any engine needs
# A write that finds the SSD files full compacts and retries. Attempts in which compaction
# freed nothing count toward this limit; attempts that freed room but lost it to concurrent
# writers do not, bounded instead by ADMIT_DEADLINE_S.
ADMIT_ATTEMPTS = 4
ADMIT_DEADLINE_S = 30.0
ADMIT_BACKOFF_S = 0.002
# The SSD tier keeps one segment of headroom that user writes may not use, so compaction can
# always copy the live records of a segment before deleting it.
MIN_SEGMENT_BYTES = 64 << 10


class _Block:
    """A committed block as the key map knows it."""

    __slots__ = ("size", "crc", "generation", "created_ns", "ssd", "dram", "parent", "ssd_hits")

    def __init__(self, size: int, crc: int, generation: int, created_ns: int,
                 ssd: tuple[int, int, int] | None, dram: Any, parent: bytes | None = None) -> None:
        self.size = size
        self.crc = crc
        self.generation = generation
        self.created_ns = created_ns
        self.ssd = ssd  # (segment, offset, record length) or None
        self.dram = dram  # arena Slot or None
        self.parent = parent  # the previous key of its chain, when the writer said
        self.ssd_hits = 0  # hits served from SSD since the block was last in DRAM

    def record(self) -> BlockRecord:
        seg, off, length = self.ssd
        return BlockRecord(self.size, self.crc, self.generation, self.created_ns, seg, off, length)


class _Admission:
    """The retry budget of one write that waits for compaction (see ADMIT_ATTEMPTS)."""

    __slots__ = ("fruitless", "deadline")

    def __init__(self) -> None:
        self.fruitless = 0
        self.deadline = time.monotonic() + ADMIT_DEADLINE_S

    def go_on(self) -> bool:
        return self.fruitless < ADMIT_ATTEMPTS and time.monotonic() < self.deadline

    def note(self, progressed: bool, room_is_coming: bool) -> None:
        if progressed:
            return
        if room_is_coming:
            # Room is held by other writers' reservations (their commits or aborts make it
            # compactable or free soon) or by deleted segments a reader or an fsync still
            # pins. Wait a moment rather than give up; ADMIT_DEADLINE_S bounds the wait.
            time.sleep(ADMIT_BACKOFF_S)
            return
        self.fruitless += 1


def _check_session_type(session: Any) -> None:
    if not isinstance(session, WriteSession):
        raise SessionError(f"expected a WriteSession from start_write, got {type(session).__name__}")


class Store(PlacementMixin, ReadPathMixin, MaintenanceMixin):
    """A tiered KV-cache block store. Use :func:`tairstore.open` to make one.

    Every method is safe to call from many threads at once. Every method takes an optional
    ``namespace`` (default ``"default"``); the same key in two namespaces is two blocks.
    """

    def __init__(self, path: str | os.PathLike, config: StoreConfig) -> None:
        self.config = config.validate()
        self.path = check_path(path)
        self._fs = config.fs
        self._lock = threading.RLock()
        self._blocks: dict[tuple[str, bytes], _Block] = {}
        self._inflight: dict[tuple[str, bytes], int] = {}
        self._sessions: dict[int, WriteSession] = {}
        self._namespaces: dict[str, Namespace] = {}
        self._seg_keys: dict[int, set[tuple[str, bytes]]] = {}
        self._seg_pending: Counter[int] = Counter()
        self._seg_min_gen: dict[int, int] = {}  # per segment written by this process
        self._seg_tomb: Counter[int] = Counter()  # tombstone bytes kept per segment
        self._ssd_live = 0  # record bytes of committed blocks on SSD
        self._ssd_reserved = 0  # record bytes reserved by open sessions
        self._counters: Counter[str] = Counter()
        self._session_ids = itertools.count(1)
        self._generation = 0
        self._closed = False
        self._fatal: BaseException | None = None
        self._last_truncate = 0.0
        self._last_ttl_sweep = 0.0
        self._durable = config.ssd_bytes > 0
        self._watermarks = WatermarkTracker(parse_watermarks(config.watermarks))
        self._wal: WalWriter | None = None
        self._ssd: SegmentLog | None = None
        self._dram: DramArena | None = None
        self._index: Index | None = None
        self._ssd_limit = self._ssd_live_limit = 0
        self._dir = DataDir(self.path, self._fs, create=config.create)
        try:
            self._open()
        except BaseException:
            self._teardown()
            raise
        self.compactor = Compactor(self)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._maint = threading.Thread(target=self._maintenance_loop, name="tairstore-maintenance",
                                       daemon=True)
        if config.background:
            self._maint.start()

    # ------------------------------------------------------------------------------- opening
    def _open(self) -> None:
        cfg = self.config
        if cfg.dram_bytes:
            self._dram = DramArena(cfg.dram_bytes)
            if cfg.prefault_dram:
                self._dram.prefault()
        # M1: refuse a store whose index, WAL and segments do not agree, before any file is
        # changed (LMDB opened for writing, a head segment, a WAL file) or any thread starts.
        found = check_open(self._dir, self._fs)
        self._index = Index(self._dir.sub("index"))
        if found.fresh:
            self._index.set_identity(self._dir.store_id, FORMAT_VERSION)
        for name, settings in self._index.namespaces().items():
            ns = self._ns_state(name)
            ns.total_bytes, ns.tier_bytes, ns.ttl_s = check_limits(
                settings.get("total_bytes"), settings.get("tier_bytes"), settings.get("ttl_s"))
        if not self._durable:
            # A volatile cache: nothing on disk describes blocks, so nothing to recover.
            return
        # Segments of at most 1/32 of the tier, so the two segments of slack below stay a small
        # part of a small tier.
        seg_bytes = max(MIN_SEGMENT_BYTES, min(cfg.segment_bytes, cfg.ssd_bytes // 32))
        # Files may fill the tier but for one segment: the room compaction copies into.
        self._ssd_limit = cfg.ssd_bytes - seg_bytes
        # Live records stay a further segment below that. Records die mostly in age order
        # (deletes and evictions of old blocks), so when the files are full the oldest segment
        # is then (nearly) all dead and compaction frees it without copying much.
        self._ssd_live_limit = max(seg_bytes, self._ssd_limit - seg_bytes)
        self._ssd = SegmentLog(
            self._fs, self._dir.sub("segments"), capacity_bytes=cfg.ssd_bytes,
            segment_bytes=seg_bytes, compression=cfg.compression, zstd_level=cfg.zstd_level,
        )
        self._ssd.open()
        from tairstore.engine.recovery import recover

        next_lsn = recover(self, found)
        self._wal = WalWriter(
            self._fs, self._dir.sub("wal"), durability=cfg.durability,
            batch_interval_s=cfg.batch_interval_ms / 1000.0, file_bytes=cfg.wal_file_bytes,
            next_lsn=next_lsn, pre_sync=self._ssd.sync,
        )
        # Everything before next_lsn is in LMDB now: older log files are no longer needed.
        self._wal.truncate_before(next_lsn)
        self._index.start_writer(before_commit=self._before_index_commit,
                                 on_checkpoint=self._on_checkpoint)

    def _before_index_commit(self, lsn: int) -> None:
        """Runs in the index writer before each LMDB commit (which LMDB itself fsyncs).

        LMDB must never durably name bytes a crash can take back. In ``sync``/``batch`` mode
        ``wal.sync`` fsyncs the segments (its ``pre_sync``) and the WAL. In ``none`` mode it
        fsyncs nothing, so the segments are fsynced here: in the background, never on a
        request's path, which is all ``none`` promises not to do.
        """
        self._wal.sync(lsn)
        if self.config.durability == "none":
            self._ssd.sync()

    def _adopt(self, blocks: dict[tuple[str, bytes], _Block]) -> None:
        """Take recovered blocks into the key map, accounting and policies (store lock held)."""
        self._blocks.update(blocks)
        live: Counter[int] = Counter()
        seg_keys = self._seg_keys
        for k, b in blocks.items():
            nss = self._namespaces.get(k[0]) or self._ns_state(k[0])
            nss.blocks += 1
            nss.used_total += b.size
            seg, _, length = b.ssd
            nss.used["ssd"] += b.size
            nss.policies["ssd"].on_insert(k[1], b.size, None)
            keys = seg_keys.get(seg)
            if keys is None:
                keys = seg_keys[seg] = set()
            keys.add(k)
            live[seg] += length
        for seg, length in live.items():
            self._ssd.mark_live(seg, length)
            self._ssd_live += length

    # ------------------------------------------------------------------------------ checks
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the store is closed; open it again with tairstore.open()")

    def _check_writable(self) -> None:
        self._check_open()
        if self._fatal is None:
            # A background thread (WAL flush, index writer) may have hit the I/O error.
            bg = (self._wal is not None and self._wal.failure) or (
                self._index is not None and self._index.failure)
            if bg:
                self._fail(bg)
        if self._fatal is not None:
            raise FatalIOError(
                f"the store refuses writes after an I/O failure ({self._fatal}); close and reopen it"
            )

    # Argument checks (shared with the network clients: tairstore.validate).
    _ns = staticmethod(check_namespace)
    _key = staticmethod(check_key)
    _keys = staticmethod(check_keys)

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

    def _check_tier(self, tier: str) -> str:
        if tier not in PLACEMENTS:
            raise InvalidArgumentError(f"tier must be one of {PLACEMENTS}, got {tier!r}")
        if tier == "ssd" and self._ssd is None:
            raise InvalidArgumentError("tier='ssd' asked of a store without an SSD tier (ssd_bytes=0)")
        if tier == "dram" and self._dram is None:
            raise InvalidArgumentError("tier='dram' asked of a store without a DRAM tier (dram_bytes=0)")
        return tier

    def _fail(self, exc: BaseException) -> None:
        """Record a fatal I/O failure: no more writes (durability is unknown from here)."""
        if self._fatal is None:
            self._fatal = exc
            log.error("store %s refuses writes from now on: %s", self.path, exc)

    def _next_generation(self) -> int:
        # Monotonic across restarts: wall-clock nanoseconds, never below the last one issued.
        self._generation = max(self._generation + 1, time.time_ns())
        return self._generation

    # ------------------------------------------------------------------------ namespaces
    def _ns_state(self, ns: str) -> Namespace:
        """The namespace record, created (with its policies) on first use (store lock held)."""
        st = self._namespaces.get(ns)
        if st is None:
            st = Namespace(ns)
            caps = {"dram": self.config.dram_bytes or None, "ssd": self.config.ssd_bytes or None}
            for tier in TIERS:
                st.policies[tier] = make_policy(self.config.policy[tier], capacity_bytes=caps[tier])
            self._namespaces[ns] = st
        return st

    def set_quota(self, namespace: str, total_bytes: int | None = None,
                  tier_bytes: dict[str, int] | None = None, *, ttl_s: float | None = None) -> dict:
        """Set a namespace's byte quotas (total and per tier) and optional TTL; persisted.

        ``None`` means unlimited (no TTL). Lowering a quota below current usage does not evict
        at once: new writes of the namespace evict its own blocks to fit.

        Returns:
            the namespace's quota report, as :meth:`quota`.
        """
        ns = self._ns(namespace)
        total, tiers, ttl = check_limits(total_bytes, tier_bytes, ttl_s)
        with self._lock:
            self._check_writable()
            st = self._ns_state(ns)
            st.total_bytes, st.tier_bytes, st.ttl_s = total, tiers, ttl
            settings = st.settings()
        self._index.set_namespace(ns, settings)
        return self.quota(ns)

    def quota(self, namespace: str) -> dict:
        """``{"total_bytes": limit|None, "used_bytes": n, "tiers": {"dram": {"limit", "used"}, "ssd": …}}``.

        Raises:
            NotFoundError: the namespace has no quota and no blocks.
        """
        ns = self._ns(namespace)
        with self._lock:
            self._check_open()
            st = self._namespaces.get(ns)
            if st is None:
                raise NotFoundError(f"namespace {ns!r} has no blocks and no quota")
            return st.quota_report()

    def namespaces(self) -> list[str]:
        """Namespaces that hold blocks or have settings."""
        with self._lock:
            self._check_open()
            return sorted(self._namespaces)

    # --------------------------------------------------------------------------- write path
    def start_write(self, keys: list[bytes], sizes: list[int], lease_s: float = 30.0, *,
                    namespace: str = DEFAULT_NAMESPACE, tier: str = "auto",
                    parent: bytes | None = None, chain: bool = True) -> WriteSession:
        """Begin a two-phase write.

        Keys already stored or being written by another session are dropped from the session;
        for the rest, quotas are checked and space is reserved (evicting as needed), and
        PREPARE is logged.

        Args:
            keys: block keys (bytes, 1..64 each), no duplicates.
            sizes: the exact byte size of each block.
            lease_s: seconds the reservation is held; after that the store aborts the session.
            tier: ``"auto"`` (DRAM copy when it fits, SSD always when present), ``"dram"``
                (a DRAM copy is required) or ``"ssd"`` (no DRAM copy).
            parent: the key preceding ``keys[0]`` in its chain, if stored.
            chain: the keys are consecutive blocks of one sequence, each the prefix of the
                next (what ``leaf_lru`` eviction uses).

        Returns:
            the :class:`WriteSession`; ``keys_to_write`` lists the keys to send.

        Raises:
            InvalidArgumentError: bad keys, sizes, lease, tier or namespace.
            CapacityError: a block cannot fit (``dimension`` names the full quota or tier).
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
        tier = self._check_tier(tier)
        parent = None if parent is None else self._key(parent)
        parents = ([parent] + keys[:-1]) if chain else [None] * len(keys)
        admit = _Admission()
        while admit.go_on():
            with self._lock:
                self._check_writable()
                todo = [(key, size) for key, size in zip(keys, sizes)
                        if (ns, key) not in self._blocks and (ns, key) not in self._inflight]
                need_bytes = self._ssd_room_needed(ns, todo)
            if need_bytes:
                # Outside the lock: compaction copies records and fsyncs.
                admit.note(self.compactor.make_room(need_bytes), self._room_is_coming())
                continue
            with self._lock:
                self._check_writable()
                sid = next(self._session_ids)
                session = WriteSession(sid, ns, [], float(lease_s), time.monotonic() + lease_s)
                try:
                    for key, size, par in zip(keys, sizes, parents):
                        if (ns, key) in self._blocks or (ns, key) in self._inflight:
                            continue
                        p = PendingBlock(size, parent=par)
                        self._admit(ns, key, p, tier)
                        session.pending[key] = p
                        session.keys_to_write.append(key)
                        self._inflight[(ns, key)] = sid
                except _NeedSsdRoom as need:
                    self._release_pending(session, session.pending)
                    need_bytes = need.nbytes
                except BaseException:
                    self._release_pending(session, session.pending)
                    raise
                else:
                    if session.keys_to_write:
                        if self._wal is not None:
                            try:
                                self._wal.append(Prepare(
                                    sid, ns, tuple(session.keys_to_write),
                                    tuple(session.pending[k].size for k in session.keys_to_write)))
                            except FatalIOError as exc:
                                self._fail(exc)
                                self._release_pending(session, session.pending)
                                raise
                        self._sessions[sid] = session
                    return session
            # Outside the lock: compaction copies records and fsyncs.
            admit.note(self.compactor.make_room(need_bytes), self._room_is_coming())
        raise CapacityError(
            "SSD tier full: compaction could not free room for this write (live blocks fill it)",
            dimension="tier:ssd")

    # -- payload and commit ----------------------------------------------------------------
    def write(self, session: WriteSession, key: bytes, data: Any) -> None:
        """Copy one block's payload into its reservation.

        Raises:
            SessionError: the key is not in ``session.keys_to_write``, was already written, or
                ``data`` has the wrong size.
            LeaseExpiredError: the lease ran out.
            DiskFullError: the disk is full (the session stays open; abort or retry).
        """
        _check_session_type(session)
        key = self._key(key)
        mv = check_data(data)
        with session.lock:
            p = self._pending_for_write(session, key)
            if len(mv) != p.size:
                raise SessionError(f"block is {len(mv)} bytes but start_write reserved {p.size}")
            self._fill(session.namespace, key, p, mv, committed=False)

    def _fill(self, ns: str, key: bytes, p: PendingBlock, mv: memoryview | None, *,
              committed: bool) -> None:
        """Copy the payload into the reservations of ``p`` and checksum it (no store lock).

        ``mv`` None: the payload is already in the DRAM reservation (:meth:`write_view`).
        """
        self._check_writable()
        # A volatile store that does not verify DRAM reads never uses the checksum: skip it.
        need_crc = self._ssd is not None or self.config.verify_dram_reads
        slot_view = None
        if mv is None:
            if not need_crc and p.ssd is None:
                # Payload already in place, nothing to checksum or write through (a volatile
                # store receiving via write_view): only the generation is left to assign.
                with self._lock:
                    p.generation = self._next_generation()
                p.written = True
                return
            slot_view = mv = self._dram.writable_view(p.dram)
        elif p.dram is not None:
            self._dram.copy_in(p.dram, mv)
        try:
            self._checksum_and_write_through(ns, key, p, mv, need_crc, committed)
        finally:
            if slot_view is not None:
                slot_view.release()
        p.written = True

    def _checksum_and_write_through(self, ns: str, key: bytes, p: PendingBlock, mv: memoryview,
                                    need_crc: bool, committed: bool) -> None:
        if p.dram is not None:
            if need_crc:
                # The checksum of the fresh copy, while it is still in cache, costs less than
                # a second cold pass over the caller's buffer.
                p.crc = self._dram.crc32c(p.dram)
        elif need_crc:
            p.crc = crc32c(mv)
        with self._lock:
            p.generation = self._next_generation()
        if p.ssd is not None:
            try:
                p.location = self._ssd.write(p.ssd, ns, key, mv, generation=p.generation, crc=p.crc,
                                             committed=committed)
            except FatalIOError as exc:
                self._fail(exc)
                raise
            with self._lock:
                seg = p.location.segment
                self._seg_min_gen[seg] = min(self._seg_min_gen.get(seg, p.generation), p.generation)

    def write_view(self, session: WriteSession, key: bytes) -> memoryview | None:
        """A writable view of ``key``'s DRAM reservation, to receive its payload in place.

        The zero-copy alternative to :meth:`write` for a caller that produces the payload
        itself (the daemon receives socket bytes straight into it). Fill it, release it, then
        call :meth:`write_done`. Returns None when the block has no DRAM reservation (an SSD
        placement, or no DRAM tier): use :meth:`write` then.

        Raises:
            SessionError, LeaseExpiredError: as for :meth:`write`.
        """
        _check_session_type(session)
        key = self._key(key)
        with session.lock:
            p = self._pending_for_write(session, key)
            if p.dram is None:
                return None
            return self._dram.writable_view(p.dram)

    def write_done(self, session: WriteSession, key: bytes) -> None:
        """Declare the payload of ``key`` complete in its :meth:`write_view`.

        Checksums it and writes it through to the SSD tier, as :meth:`write` would. The view
        must have been released: bytes changed after this call would differ from the checksum.
        """
        _check_session_type(session)
        key = self._key(key)
        with session.lock:
            p = self._pending_for_write(session, key)
            if p.dram is None:
                raise SessionError("write_done without a write_view: this block has no DRAM "
                                   "reservation; send it with write()")
            self._fill(session.namespace, key, p, None, committed=False)

    def _pending_for_write(self, session: WriteSession, key: bytes) -> PendingBlock:
        """The reservation of an unwritten key of an open session (session lock held)."""
        self._check_session(session)
        p = session.pending.get(key)
        if p is None:
            raise SessionError(f"key {key.hex()[:16]}… is not in write session {session.id}'s keys_to_write")
        if p.written:
            raise SessionError(f"key {key.hex()[:16]}… was already written in session {session.id}")
        return p

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
            committed = [(k, session.pending.pop(k)) for k in session.keys_to_write if k in ok_set]
            try:
                n = self._commit(session.namespace, committed, session.id)
            finally:
                with self._lock:
                    self._release_pending(session, session.pending)
                    session.state = FINISHED
                    self._sessions.pop(session.id, None)
            return n

    def _commit(self, ns: str, items: list[tuple[bytes, PendingBlock]], sid: int) -> int:
        """Log COMMIT for written blocks, wait for durability, then publish them.

        On failure every reservation of ``items`` is released.
        """
        try:
            for k, p in items:
                if p.location is not None and not p.location.flags & FLAG_COMMITTED:
                    # Before COMMIT is logged, so a rebuild from segments never knows a block the
                    # WAL does not (the same sync makes both durable).
                    self._ssd.mark_committed(p.location, ns, k, p.generation)
            lsn = None
            with self._lock:
                self._check_writable()
                if self._wal is not None and items:
                    now = time.time_ns()
                    entries = tuple(CommitEntry(ns, k, p.size, p.crc, p.generation,
                                                (p.location.segment, p.location.offset, p.location.length))
                                    for k, p in items)
                    ops = [(ns, k, BlockRecord(p.size, p.crc, p.generation, now, p.location.segment,
                                               p.location.offset, p.location.length))
                           for k, p in items]
                    lsn = self._log(Commit(sid, entries), ops)
            if lsn is not None:
                self._make_durable(lsn)
        except BaseException as exc:
            if isinstance(exc, FatalIOError):
                self._fail(exc)
            with self._lock:
                st = self._ns_state(ns)
                for k, p in items:
                    self._unreserve(st, p)
                    st.used_total -= p.size
                    self._inflight.pop((ns, k), None)
            raise
        with self._lock:
            st = self._ns_state(ns)
            now = time.time_ns()
            for k, p in items:
                kk = (ns, k)
                loc = p.location
                ssd = (loc.segment, loc.offset, loc.length) if loc is not None else None
                b = _Block(p.size, p.crc, p.generation, now, ssd, p.dram, p.parent)
                self._blocks[kk] = b
                st.blocks += 1
                parent = p.parent
                if p.dram is not None:
                    st.policies["dram"].on_insert(k, p.size, parent)
                if ssd is not None:
                    st.policies["ssd"].on_insert(k, p.size, parent)
                    self._seg_keys.setdefault(ssd[0], set()).add(kk)
                    self._ssd.mark_live(ssd[0], ssd[2])
                    self._seg_pending[ssd[0]] -= 1
                    self._ssd_reserved -= p.ssd.length
                    self._ssd_live += ssd[2]
                p.ssd = None
                p.dram = None
                del self._inflight[kk]
            self._counters["puts"] += len(items)
            self._counters["bytes_written"] += sum(p.size for _, p in items)
        return len(items)

    def _log(self, rec: Any, ops: list) -> int:
        """Append to the WAL and queue the index change, in LSN order (store lock held)."""
        lsn = self._wal.append(rec)
        if ops:
            self._index.enqueue(lsn, ops)
        return lsn

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
            try:
                self._wal.append(Abort(session.id))
            except (FatalIOError, ClosedError) as exc:
                # An ABORT needs no durability (a session without COMMIT never existed), so a
                # WAL that failed in the background must not stop the abort — or close().
                self._fail(exc)

    def _room_is_coming(self) -> bool:
        """SSD room is held only for now: reservations that will commit or abort, or deleted
        segments whose last reader (or an fsync in flight) has not let go yet."""
        return self._ssd_reserved > 0 or self._ssd.retiring_bytes > 0

    def _release_pending(self, session: WriteSession, pending: dict[bytes, PendingBlock]) -> None:
        """Give back the reservations of ``pending`` (store lock held)."""
        st = self._ns_state(session.namespace)
        for key, p in list(pending.items()):
            self._unreserve(st, p)
            st.used_total -= p.size
            self._inflight.pop((session.namespace, key), None)
        pending.clear()

    def put(self, key: bytes, data: Any, *, namespace: str = DEFAULT_NAMESPACE, tier: str = "auto",
            parent: bytes | None = None) -> bool:
        """Store one block; False if the key already exists (or is being written).

        Equivalent to ``start_write`` + ``write`` + ``finish_write`` of one key, without the
        session object or a PREPARE record.
        """
        ns = self._ns(namespace)
        key = self._key(key)
        mv = check_data(data)
        size = self._check_size(len(mv))
        tier = self._check_tier(tier)
        k = (ns, key)
        p = PendingBlock(size, parent=None if parent is None else self._key(parent))
        admit = _Admission()
        while admit.go_on():
            with self._lock:
                self._check_writable()
                if k in self._blocks or k in self._inflight:
                    return False
                need_bytes = self._ssd_room_needed(ns, [(key, size)])
            if need_bytes:
                admit.note(self.compactor.make_room(need_bytes), self._room_is_coming())
                continue
            with self._lock:
                self._check_writable()
                if k in self._blocks or k in self._inflight:
                    return False
                try:
                    self._admit(ns, key, p, tier)
                except _NeedSsdRoom as need:
                    need_bytes = need.nbytes
                else:
                    self._inflight[k] = 0
                    break
            admit.note(self.compactor.make_room(need_bytes), self._room_is_coming())
        else:
            raise CapacityError("SSD tier full: compaction could not free room for this write",
                                dimension="tier:ssd")
        try:
            # The whole payload is at hand, so the record is written committed at once: a
            # rebuild may restore it even if the crash comes before COMMIT, and its bytes are
            # exactly the ones put.
            self._fill(ns, key, p, mv, committed=True)
        except BaseException:
            with self._lock:
                st = self._ns_state(ns)
                self._unreserve(st, p)
                st.used_total -= p.size
                self._inflight.pop(k, None)
            raise
        return self._commit(ns, [(key, p)], 0) == 1

    # ------------------------------------------------------------------------------ delete
    def delete(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE) -> int:
        """Delete blocks; returns how many existed. SSD space is reclaimed by compaction."""
        ns = self._ns(namespace)
        keys = self._keys(keys)
        with self._lock:
            self._check_writable()
            present = [(ns, k) for k in dict.fromkeys(keys) if (ns, k) in self._blocks]
            lsn = self._remove_locked(present, tombstones=True)
            self._counters["deletes"] += len(present)
        self._sync_if_asked(lsn)
        return len(present)

    def trim(self, namespace: str, mode: str = "all", ts: float | None = None) -> int:
        """Delete a namespace's blocks: ``"all"``, or ``"older_than"`` the Unix time ``ts``.

        Returns the number of blocks deleted.
        """
        ns = self._ns(namespace)
        if mode not in ("all", "older_than"):
            raise InvalidArgumentError(f"trim mode must be 'all' or 'older_than', got {mode!r}")
        if mode == "older_than" and not isinstance(ts, (int, float)):
            raise InvalidArgumentError("trim(mode='older_than') needs ts, a Unix time in seconds")
        cutoff = None if mode == "all" else int(ts * 1e9)
        with self._lock:
            self._check_writable()
            victims = [k for k, b in self._blocks.items()
                       if k[0] == ns and (cutoff is None or b.created_ns < cutoff)]
            lsn = self._remove_locked(victims, tombstones=True)
            self._counters["trimmed"] += len(victims)
        self._sync_if_asked(lsn)
        return len(victims)

    def _sync_if_asked(self, lsn: int | None) -> None:
        if lsn is not None:
            try:
                self._make_durable(lsn)
            except FatalIOError as exc:
                self._fail(exc)
                raise

    def _make_durable(self, lsn: int) -> None:
        """What the durability mode promises before an acknowledgement (no store lock held).

        ``sync``: the record and the payloads it names are fsynced (group commit).
        ``batch`` / ``none``: the record is handed to the OS, so ``kill -9`` cannot take it.
        """
        if self.config.durability == "sync":
            self._wal.sync(lsn)
        else:
            self._wal.write_through(lsn)

    def _remove_locked(self, present: list[tuple[str, bytes]], *, tombstones: bool) -> int | None:
        """Drop blocks from the key map, tiers, policies and usage; log DELETE (store lock held).

        Returns the LSN of the last DELETE logged, or None.
        """
        if not present:
            return None
        logged: dict[str, list[bytes]] = {}
        for k in present:
            b = self._blocks.pop(k)
            st = self._namespaces[k[0]]
            st.blocks -= 1
            st.used_total -= b.size
            if b.dram is not None:
                st.policies["dram"].on_remove(k[1])
                self._dram.release(b.dram)
                st.used["dram"] -= b.size
            if b.ssd is not None:
                st.policies["ssd"].on_remove(k[1])
                seg, _, length = b.ssd
                self._seg_keys.get(seg, set()).discard(k)
                self._ssd.mark_dead(seg, length)
                self._ssd_live -= length
                st.used["ssd"] -= b.size
                logged.setdefault(k[0], []).append(k[1])
        if self._wal is None or not logged or self._fatal is not None:
            return None
        lsn = None
        for ns, ks in logged.items():
            lsn = self._log(Delete(ns, tuple(ks)), [(ns, key, None) for key in ks])
            if tombstones:
                for key in ks:
                    # A tombstone in the segment log keeps `fsck --rebuild` from resurrecting
                    # an explicitly deleted block. Evictions write none: an evicted block that
                    # a rebuild brings back is still a correct block of its key.
                    try:
                        loc = self._ssd.write_tombstone(ns, key, self._next_generation())
                    except (CapacityError, FatalIOError):
                        continue  # the WAL/index delete stands; only a rebuild could bring it back
                    self._note_tombstone(loc)
        return lsn

    def _note_tombstone(self, loc) -> None:
        """Count a tombstone record as live space until compaction finds it droppable."""
        self._ssd.mark_live(loc.segment, loc.length)
        self._seg_tomb[loc.segment] += loc.length

    # ----------------------------------------------------------------------- lifecycle
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
            try:
                for s in list(self._sessions.values()):
                    if s.state == OPEN:
                        self._abort_locked(s, ABORTED)
            finally:
                self._closed = True
        try:
            self._stop.set()
            if self._dram is not None:
                self._dram.stop_prefault()
            if self._maint.is_alive() and self._maint is not threading.current_thread():
                self._maint.join()
            self.compactor.wait_idle()
        finally:
            # Whatever failed above, the files are closed and the directory released, so the
            # store can be opened again (recovery takes it from there).
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
        if first is None and self._fatal is None and self._wal is not None and self._closed:
            self._drop_applied_wal()
        self._dir.close()
        if first is not None and self._fatal is None and not isinstance(first, FatalIOError):
            raise first

    def _drop_applied_wal(self) -> None:
        """After a clean close every logged change is in LMDB: the WAL files can all go.

        The next open then replays nothing (and decodes nothing); one empty file stays as the
        log's end marker (:func:`tairstore.wal.drop_applied`). A crash during the unlinks leaves
        files whose records are all at or below the checkpoint, which replay skips.
        """
        from tairstore.wal import drop_applied

        try:
            drop_applied(self._fs, self._dir.sub("wal"), self._index.applied_lsn + 1)
        except OSError as exc:
            log.warning("could not remove applied WAL files: %s", exc)

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
    ``dram_bytes``, ``ssd_bytes``, ``durability``, ``compression``, ``policy``, ``watermarks``.
    """
    return Store(path, StoreConfig.from_kwargs(**options))
