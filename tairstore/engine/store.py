"""The embedded store: the public facade over the engine's parts.

Theory of operation
-------------------
The :class:`Store` checks every argument (:mod:`tairstore.validate`) and hands clean values to
the parts it holds; each part has its own state and a small interface:

- :class:`~tairstore.engine.catalog.Catalog` — committed blocks, namespaces (usage, quotas,
  policies), keys in flight: what every read, ``exists`` and ``match`` answers from;
- :class:`~tairstore.engine.ssd_space.SsdSpace` — the SSD tier's space bookkeeping;
- :class:`~tairstore.engine.placement.Placement` — admission (quotas, reservations) and eviction;
- :class:`~tairstore.engine.writes.Writes` — write sessions, puts, deletes, block removal;
- :class:`~tairstore.engine.reads.Reads` — get, get_into, match, promotion;
- :class:`~tairstore.engine.compaction.Compactor` — asynchronous deletion in the segment log;
- :class:`~tairstore.engine.maintenance.Maintenance` — the background thread;
- :class:`~tairstore.engine.lifecycle.Lifecycle` and :class:`~tairstore.engine.lifecycle.Journal`
  — open/closed/failed, and the WAL-then-index order.

State lives in three places, each with one job: the catalog (in memory) answers reads; the
WAL records every commit and delete before it is acknowledged (W2); LMDB trails the WAL through
the index writer thread, so reopening needs no scan (:mod:`tairstore.engine.recovery`).

Locking: one store lock guards the catalog, the sessions, the SSD space and the reservations.
It is held for metadata only; payload copies, crc computation, disk I/O and fsyncs run outside
it, so readers never wait for a writer's fsync. Lock order: a session's lock, then the store
lock.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from typing import Any

from tairstore.config import DEFAULT_NAMESPACE, StoreConfig
from tairstore.engine.capacity import TIERS, WatermarkTracker, check_limits, parse_watermarks
from tairstore.engine.catalog import Block, Catalog
from tairstore.engine.compaction import Compactor
from tairstore.engine.consistency import check_open
from tairstore.engine.datadir import FORMAT_VERSION, DataDir, check_path
from tairstore.engine.lifecycle import Journal, Lifecycle
from tairstore.engine.maintenance import Maintenance
from tairstore.engine.match import MatchResult
from tairstore.engine.placement import Placement
from tairstore.engine.reads import Reads
from tairstore.engine.remote import RemotePart
from tairstore.engine.session import RemoteTierSession, WriteSession
from tairstore.engine.strategy import Router, build_router, check_strategy
from tairstore.engine.ssd_space import SsdSpace, segment_size
from tairstore.engine.writes import Writes
from tairstore.errors import FatalIOError, InvalidArgumentError, NotFoundError, SessionError
from tairstore.index.lmdb_index import Index
from tairstore.tiers.dram import DramArena
from tairstore.tiers.ssd import SegmentLog
from tairstore.validate import (check_block_size, check_data, check_key, check_keys, check_lease, check_namespace,
                                check_out, check_timestamp)
from tairstore.wal import WalWriter

__all__ = ["Store", "open_store", "DEFAULT_NAMESPACE", "PLACEMENTS"]

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "dram", "ssd", "remote")

#: The counters ``stats()["counters"]`` reports (0 when never incremented).
COUNTERS = ("hits", "misses", "hits_dram", "hits_ssd", "checksum_errors", "read_errors",
            "puts", "deletes", "trimmed", "expired", "bytes_written", "evictions_dram",
            "evictions_ssd", "watermark_evictions", "promotions", "leases_expired",
            "recovered_blocks", "recovery_dropped", "recovery_read_errors", "recovery_dangling",
            "recovery_oversize", "hits_remote", "misses_remote", "demotions", "demotion_failures",
            "demotions_missed", "demotions_dropped", "writeback_deferred", "writeback_flushed",
            "writeback_failed")


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
        self.path = check_path(path)
        self._fs = config.fs
        self._lock = threading.RLock()
        self._life = Lifecycle(self.path)
        self._close_hooks: list[Any] = []  # on_close
        self._counters: Counter[str] = Counter()
        self._durable = config.ssd_bytes > 0
        self._catalog = Catalog(config.policy, {"dram": config.dram_bytes or None,
                                                "ssd": config.ssd_bytes or None})
        self._journal = Journal(config.durability)
        self._dram: DramArena | None = None
        self._ssd: SegmentLog | None = None
        self._space: SsdSpace | None = None
        self._index: Index | None = None
        self._writes: Writes | None = None
        self.compactor: Compactor | None = None
        self._maintenance: Maintenance | None = None
        self._remote: RemotePart | None = None
        self._router: Router | None = None
        self._dir = DataDir(self.path, self._fs, create=config.create)
        try:
            self._open()
        except BaseException:
            self._teardown()
            raise
        if config.background:
            self._maintenance.start()

    # ------------------------------------------------------------------------------- opening
    def _open(self) -> None:
        cfg = self.config
        if cfg.dram_bytes:
            parts = cfg.dram_partitions or {}
            self._dram = DramArena(cfg.dram_bytes, backing=cfg.dram_backing,
                                   partitions=[p["bytes"] for p in parts.values()] or None)
            if cfg.prefault_dram:
                self._dram.prefault()
        # M1: refuse a store whose index, WAL and segments do not agree, before any file is
        # changed (LMDB opened for writing, a head segment, a WAL file) or any thread starts.
        found = check_open(self._dir, self._fs)
        self._index = Index(self._dir.sub("index"))
        if found.fresh:
            self._index.set_identity(self._dir.store_id, FORMAT_VERSION)
        self._journal.index = self._index
        for name, settings in self._index.namespaces().items():
            try:
                limits = check_limits(settings.get("total_bytes"), settings.get("tier_bytes"),
                                      settings.get("ttl_s"))
            except InvalidArgumentError as exc:
                # Saved by an older version that accepted it (a nan TTL): the namespace opens
                # unlimited rather than the whole store refusing; set_quota saves a valid one.
                log.error("namespace %r: ignoring its saved quota/TTL (%s); set it again with "
                          "set_quota", name, exc)
                limits = (None, {}, None)
            self._catalog.set_limits(name, *limits)
            try:
                self._catalog.ns(name).strategy = check_strategy(settings.get("strategy"))
            except InvalidArgumentError as exc:
                log.error("namespace %r: ignoring its saved strategy (%s); set it again with "
                          "set_strategy", name, exc)
        if self._durable:
            self._ssd = SegmentLog(
                self._fs, self._dir.sub("segments"), capacity_bytes=cfg.ssd_bytes,
                segment_bytes=segment_size(cfg.ssd_bytes, cfg.segment_bytes),
                compression=cfg.compression, zstd_level=cfg.zstd_level,
            )
            self._ssd.open()
            self._space = SsdSpace(self._ssd, cfg.ssd_bytes)
        self._build_parts()
        if cfg.remote is not None:
            self._open_remote(cfg.remote)
        self._router = build_router(self._dram, self._ssd, self._remote, self._placement, self._life,
                                    cfg.remote)
        if not self._durable:
            # A volatile cache: nothing on disk describes blocks, so nothing to recover.
            return
        from tairstore.engine.recovery import recover

        rec = recover(self._index, self._ssd, self._fs, self._dir.sub("wal"), found,
                      max_block_bytes=cfg.max_block_bytes, path=self.path)
        with self._lock:
            self._catalog.adopt(rec.blocks)
            self._space.adopt((k, b.ssd) for k, b in rec.blocks.items())
            self._writes.generation = max(self._writes.generation, rec.max_generation)
            self._counters["recovered_blocks"] = len(rec.blocks)
            self._counters.update(rec.counters)
        wal = WalWriter(
            self._fs, self._dir.sub("wal"), durability=cfg.durability,
            batch_interval_s=cfg.batch_interval_ms / 1000.0, file_bytes=cfg.wal_file_bytes,
            next_lsn=rec.next_lsn, pre_sync=self._ssd.sync,
        )
        self._journal.wal = wal
        self._life.sources = [wal, self._index]
        # Everything before next_lsn is in LMDB now: older log files are no longer needed.
        wal.truncate_before(rec.next_lsn)
        self._index.start_writer(before_commit=self._before_index_commit,
                                 on_checkpoint=self._maintenance.on_checkpoint)
        with self._lock:
            evicted = self._placement.enforce_quotas()
        if evicted:
            # A rebuild from the segments brings evicted blocks back; C1 holds from the open on.
            log.warning("store %s: %d recovered blocks over their namespace quotas were evicted",
                        self.path, evicted)

    def _build_parts(self) -> None:
        cfg = self.config
        lock, life, catalog, counters = self._lock, self._life, self._catalog, self._counters
        writes = Writes(cfg, lock, life, catalog, self._dram, self._space, self._journal, counters,
                        compactor=lambda: self.compactor)
        placement = Placement(cfg, catalog, self._dram, self._space, counters, remove=writes.remove)
        writes.placement = placement
        self._writes, self._placement = writes, placement
        self._reads = Reads(cfg, lock, life, catalog, self._dram, self._ssd, placement, counters,
                            remove=writes.remove)
        if self._space is not None:
            self.compactor = Compactor(cfg, lock, life, catalog, self._space, self._journal,
                                       drop_corrupt=self._reads.drop_corrupt)
        self._maintenance = Maintenance(
            interval_s=cfg.maintenance_interval_s, lock=lock, life=life, catalog=catalog,
            placement=placement, watermarks=WatermarkTracker(parse_watermarks(cfg.watermarks)),
            journal=self._journal, counters=counters, reap=writes.reap_expired,
            remove=writes.remove, compactor=lambda: self.compactor)
        if cfg.write_back:
            self._maintenance.flush = writes.flush_dirty

    def _open_remote(self, config: dict) -> None:
        """Open the remote tier and hook it into the parts: reads fall through to it, evicted
        SSD blocks are demoted to it, hits come back into the local tiers."""
        from tairstore.tiers.remote import make_remote_tier

        tier = make_remote_tier(config)
        remote = self._remote = RemotePart(tier, self._ssd, self._counters, self._life, dram=self._dram)
        self._reads.remote = remote
        self._reads.promote = lambda ns, key, view: self._writes.put(ns, key, view, "auto", None)
        # A hit lands straight in a DRAM reservation (zero-copy where the tier can read into
        # registered memory: Mooncake once the arena is registered).
        self._reads.promote_into = self._writes.put_produced
        if self._dram is not None and hasattr(tier, "register"):
            try:
                mem = self._dram.memory
                for part in range(self._dram.partitions):  # each partition's range (no gaps)
                    start = self._dram.partition_offset(part)
                    tier.register(mem[start:start + self._dram.partition_bytes(part)])
            except InvalidArgumentError as exc:
                log.warning("remote tier: reads go through its staging buffer (%s)", exc)
        self._placement.on_evict = remote.note_evicted
        self._maintenance.demote = remote.maintain

    def _before_index_commit(self, lsn: int) -> None:
        """Runs in the index writer before each LMDB commit (which LMDB itself fsyncs).

        LMDB must never durably name bytes a crash can take back. In ``sync``/``batch`` mode
        ``wal.sync`` fsyncs the segments (its ``pre_sync``) and the WAL. In ``none`` mode it
        fsyncs nothing, so the segments are fsynced here: in the background, never on a
        request's path, which is all ``none`` promises not to do.
        """
        self._journal.wal.sync(lsn)
        if self.config.durability == "none":
            self._ssd.sync()

    # ------------------------------------------------------------------------------ checks
    # Argument checks (shared with the network clients: tairstore.validate).
    _ns = staticmethod(check_namespace)
    _key = staticmethod(check_key)
    _keys = staticmethod(check_keys)

    def _check_size(self, size: Any) -> int:
        return check_block_size(size, self.config.max_block_bytes)

    def _check_tier(self, tier: str) -> str:
        if tier not in PLACEMENTS:
            raise InvalidArgumentError(f"tier must be one of {PLACEMENTS}, got {tier!r}")
        if tier == "ssd" and self._ssd is None:
            raise InvalidArgumentError("tier='ssd' asked of a store without an SSD tier (ssd_bytes=0)")
        if tier == "dram" and self._dram is None:
            raise InvalidArgumentError("tier='dram' asked of a store without a DRAM tier (dram_bytes=0)")
        if tier == "remote" and self._remote is None:
            raise InvalidArgumentError("tier='remote' asked of a store without a remote tier (remote=None)")
        return tier

    # ------------------------------------------------------------------------ namespaces
    def set_quota(self, namespace: str, total_bytes: int | None = None,
                  tier_bytes: dict[str, int] | None = None, *, ttl_s: float | None = None) -> dict:
        """Set a namespace's byte quotas (total and per tier) and optional TTL; persisted.

        ``None`` means unlimited (no TTL). Lowering a quota below current usage does not evict
        at once: new writes of the namespace evict its own blocks to fit, and so does the next
        open.

        Returns:
            the namespace's quota report, as :meth:`quota`.
        """
        ns = self._ns(namespace)
        total, tiers, ttl = check_limits(total_bytes, tier_bytes, ttl_s)
        with self._lock:
            self._life.check_writable()
            settings = self._catalog.set_limits(ns, total, tiers, ttl).settings()
        self._index.set_namespace(ns, settings)
        return self.quota(ns)

    def quota(self, namespace: str) -> dict:
        """``{"total_bytes": limit|None, "used_bytes": n, "tiers": {"dram": {"limit", "used"}, "ssd": …}}``.

        Raises:
            NotFoundError: the namespace has no quota and no blocks.
        """
        ns = self._ns(namespace)
        with self._lock:
            self._life.check_open()
            st = self._catalog.namespaces.get(ns)
            if st is None:
                raise NotFoundError(f"namespace {ns!r} has no blocks and no quota")
            return st.quota_report()

    def set_strategy(self, namespace: str, strategy: str | None) -> dict:
        """Set the namespace's backend strategy (``"prefer:remote"``, ``"always:remote"``,
        ``"prefer:dram"``, ``"prefer:ssd"``, ``"always:dram"``, ``"always:ssd"``, or None for
        none); persisted beside its quota. :meth:`put` / :meth:`put_many` without ``tier``
        follow it (:mod:`tairstore.engine.strategy`).

        Returns:
            the namespace's quota report, as :meth:`quota` (``strategy`` in it).

        Raises:
            InvalidArgumentError: not one of the strategies above.
        """
        ns = self._ns(namespace)
        strategy = check_strategy(strategy)
        with self._lock:
            self._life.check_writable()
            st = self._catalog.ns(ns)
            st.strategy = strategy
            settings = st.settings()
        self._index.set_namespace(ns, settings)
        return self.quota(ns)

    def route(self, namespace: str = DEFAULT_NAMESPACE) -> str:
        """The tier a put without ``tier`` goes to now: ``"auto"``, ``"dram"``, ``"ssd"`` or
        ``"remote"``, from the namespace's strategy, the tiers' health and usage.

        Raises:
            TierUnavailableError: an ``always:<tier>`` strategy whose tier is missing or unhealthy.
        """
        return self._route(self._ns(namespace))

    def _route(self, ns: str) -> str:
        """:meth:`route` of a checked namespace name (the put path's: no second check)."""
        st = self._catalog.namespaces.get(ns)
        return self._router.route(None if st is None else st.strategy)

    def namespaces(self) -> list[str]:
        """Namespaces that hold blocks or have settings."""
        with self._lock:
            self._life.check_open()
            return sorted(self._catalog.namespaces)

    # --------------------------------------------------------------------------- write path
    def start_write(self, keys: list[bytes], sizes: list[int], lease_s: float = 30.0, *,
                    namespace: str = DEFAULT_NAMESPACE, tier: str | None = None,
                    parent: bytes | None = None, chain: bool = True) -> WriteSession:
        """Begin a two-phase write.

        Keys already stored or being written by another session are dropped from the session;
        for the rest, quotas are checked and space is reserved (evicting as needed), and
        PREPARE is logged. A stored ``parent`` (and each key for the next, with ``chain``) is
        not evicted while the session is open.

        Args:
            keys: block keys (bytes, 1..64 each), no duplicates.
            sizes: the exact byte size of each block.
            lease_s: seconds the reservation is held; after that the store aborts the session.
            tier: ``"auto"`` (DRAM copy when it fits, SSD always when present), ``"dram"``
                (a DRAM copy is required), ``"ssd"`` (no DRAM copy) or ``"remote"`` (the
                blocks go to the remote tier at ``finish_write``, no local copy); None: the
                namespace's strategy (:meth:`route`), ``"auto"`` without one.
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
        lease_s = check_lease(lease_s)
        tier = self._route(ns) if tier is None else self._check_tier(tier)
        if tier == "remote":
            # Nothing is reserved or logged locally: the blocks go out at finish_write.
            self._life.check_writable()
            with self._lock:
                sid = self._writes.new_session_id()
                local = {k for k in keys if self._catalog.busy((ns, k))}
            return self._remote.start_session(sid, ns, keys, sizes, float(lease_s), local)
        parent = None if parent is None else self._key(parent)
        parents = ([parent] + keys[:-1]) if chain else [None] * len(keys)
        return self._writes.start_write(ns, keys, sizes, float(lease_s), tier, parents)

    def write(self, session: WriteSession, key: bytes, data: Any) -> None:
        """Copy one block's payload into its reservation.

        Raises:
            SessionError: the key is not in ``session.keys_to_write``, was already written, or
                ``data`` has the wrong size.
            LeaseExpiredError: the lease ran out.
            DiskFullError: the disk is full (the session stays open; abort or retry).
        """
        self._writer(session).write(session, self._key(key), check_data(data))

    def write_view(self, session: WriteSession, key: bytes) -> memoryview | None:
        """A writable view of ``key``'s DRAM reservation, to receive its payload in place.

        The zero-copy alternative to :meth:`write` for a caller that produces the payload
        itself (the daemon receives socket bytes straight into it). Fill it, release it, then
        call :meth:`write_done`. Returns None when the block has no DRAM reservation (an SSD
        placement, or no DRAM tier): use :meth:`write` then.

        Raises:
            SessionError, LeaseExpiredError: as for :meth:`write`.
        """
        return self._writer(session).write_view(session, self._key(key))

    def write_done(self, session: WriteSession, key: bytes) -> None:
        """Declare the payload of ``key`` complete in its :meth:`write_view`.

        Checksums it and writes it through to the SSD tier, as :meth:`write` would. The view
        must have been released: bytes changed after this call would differ from the checksum.
        """
        self._writer(session).write_done(session, self._key(key))

    def finish_write(self, session: WriteSession, ok_keys: list[bytes]) -> int:
        """Commit ``ok_keys`` of the session and release the rest.

        Returns only once the commit is as durable as the durability mode promises (see
        :mod:`tairstore.config`). Keys in ``ok_keys`` must have been written.

        Returns:
            the number of keys committed.
        """
        return self._writer(session).finish_write(session, self._keys(ok_keys))

    def abort_write(self, session: WriteSession) -> None:
        """Abandon a session: release every reservation. A finished session is left alone."""
        self._writer(session).abort_write(session)

    def _writer(self, session: Any) -> Any:
        """What carries a session out: the remote part for one routed to the remote tier (it
        reserves nothing here), else the local write path. Both take the same calls."""
        _check_session_type(session)
        return self._remote if type(session) is RemoteTierSession else self._writes

    def put(self, key: bytes, data: Any, *, namespace: str = DEFAULT_NAMESPACE, tier: str | None = None,
            parent: bytes | None = None) -> bool:
        """Store one block; False if the key already exists (or is being written).

        Equivalent to ``start_write`` + ``write`` + ``finish_write`` of one key, without the
        session object or a PREPARE record. Without ``tier`` the namespace's strategy decides
        (:meth:`route`; ``"auto"`` when it has none).

        Raises:
            TierUnavailableError: no ``tier`` and an ``always:<tier>`` strategy that cannot be met.
        """
        ns = self._ns(namespace)
        key = self._key(key)
        mv = check_data(data)
        self._check_size(len(mv))
        tier = self._route(ns) if tier is None else self._check_tier(tier)
        if tier == "remote":
            # Straight to the remote tier; no local copy (False: unreachable or full).
            self._life.check_writable()
            return self._remote.put(ns, key, mv)
        return self._writes.put(ns, key, mv, tier, None if parent is None else self._key(parent))

    def put_many(self, keys: list[bytes], blocks: list[Any], *, namespace: str = DEFAULT_NAMESPACE,
                 tier: str | None = None, parent: bytes | None = None, chain: bool = False) -> list[bool]:
        """Store many blocks at once; per key, True if this call stored it.

        One admission under the store lock, one ``pwritev`` per run of adjacent SSD records,
        one COMMIT record (and in ``sync`` mode one fsync) for the whole batch: the cheap way to
        write many small blocks. Keys already stored or being written are skipped (False).

        Args:
            chain: the keys are consecutive blocks of one sequence (``parent`` precedes the
                first), as for :meth:`start_write`.

            tier: as for :meth:`put` (None: the namespace's strategy); ``"remote"`` stores the
                batch on the remote tier only, no local copy.

        Raises:
            InvalidArgumentError: bad or duplicate keys, blocks not matching keys, bad tier.
            CapacityError: a block cannot fit (nothing of the batch is stored then).
            TierUnavailableError: no ``tier`` and an ``always:<tier>`` strategy that cannot be met.
        """
        ns = self._ns(namespace)
        keys = self._keys(keys)
        mvs = [check_data(b) for b in blocks]
        if len(keys) != len(mvs):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(mvs)} blocks")
        if len(set(keys)) != len(keys):
            raise InvalidArgumentError("duplicate keys in one put_many")
        if mvs:
            sizes = [len(mv) for mv in mvs]
            limit = self.config.max_block_bytes
            if min(sizes) < 1 or (limit is not None and max(sizes) > limit):
                for n in sizes:  # the first bad one raises its own error
                    self._check_size(n)
        tier = self._route(ns) if tier is None else self._check_tier(tier)
        parent = None if parent is None else self._key(parent)
        parents = ([parent] + keys[:-1]) if chain else [None] * len(keys)
        if not keys:
            return []
        if tier == "remote":
            # As put(tier="remote"): the remote tier only, no local copy.
            self._life.check_writable()
            return self._remote.put_many(ns, keys, mvs)
        return self._writes.put_many(ns, keys, mvs, tier, parents)

    def delete(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE) -> int:
        """Delete blocks; returns how many existed here. SSD space is reclaimed by compaction.

        With a remote tier the keys are deleted there too (for every store sharing it).
        """
        ns, keys = self._ns(namespace), self._keys(keys)
        n = self._writes.delete(ns, keys)
        if self._remote is not None:
            self._remote.delete(ns, keys)
        return n

    def trim(self, namespace: str, mode: str = "all", ts: float | None = None) -> int:
        """Delete a namespace's blocks: ``"all"``, or ``"older_than"`` the Unix time ``ts``.

        Returns the number of blocks deleted.
        """
        ns = self._ns(namespace)
        if mode not in ("all", "older_than"):
            raise InvalidArgumentError(f"trim mode must be 'all' or 'older_than', got {mode!r}")
        if mode == "older_than" and ts is None:
            raise InvalidArgumentError("trim(mode='older_than') needs ts, a Unix time in seconds")
        ts = None if mode == "all" else check_timestamp("ts", ts)
        return self._writes.trim(ns, None if ts is None else int(ts * 1e9))

    # ---------------------------------------------------------------------------- read path
    def get(self, key: bytes, *, namespace: str = DEFAULT_NAMESPACE) -> memoryview | None:
        """The block's bytes, or None on a miss.

        From DRAM this is a zero-copy read-only view that pins its slot: the bytes never change
        while the view (or anything made from it) is alive (R2). From SSD the block is read and
        verified (R1: a checksum mismatch is a miss, counted, and the block is dropped); on its
        first or second SSD hit (``promote_on``) it is copied into DRAM.
        """
        return self._reads.get((self._ns(namespace), self._key(key)))

    def get_many(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE,
                 memory_only: bool = False) -> list[memoryview | None] | None:
        """:meth:`get` of many keys: per key its bytes or None, with one lock round for lookups.

        With ``memory_only`` the answer comes from DRAM alone, or is None as a whole (nothing
        touched) when a stored key has no DRAM copy: ask again without it.
        """
        if not isinstance(memory_only, bool):
            raise InvalidArgumentError(f"memory_only must be True or False, got {memory_only!r}")
        return self._reads.get_many(self._ns(namespace), self._keys(keys), memory_only)

    def get_into_many(self, keys: list[bytes], outs: list[Any], *,
                      namespace: str = DEFAULT_NAMESPACE) -> list[int]:
        """:meth:`get_into` of many keys: per key the bytes copied into its buffer, 0 on a miss.

        Raises:
            InvalidArgumentError: a buffer is not writable or smaller than its stored block.
        """
        keys = self._keys(keys)
        dsts = [check_out(o) for o in outs]
        if len(keys) != len(dsts):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(dsts)} buffers")
        return self._reads.get_into_many(self._ns(namespace), keys, dsts)

    def get_pinned(self, key: bytes, *, namespace: str = DEFAULT_NAMESPACE) -> tuple[memoryview, Any] | None:
        """``(view, slot)`` of a block with a DRAM copy, or None (a miss, or not in DRAM).

        ``view`` is a zero-copy read-only view that pins ``slot`` (its ``offset``, ``size``
        and ``generation`` in the DRAM arena) until the view and everything made from it are
        released (R2). A daemon uses it to lend a block's place in a shared arena to a local
        client instead of copying the bytes.
        """
        return self._reads.get_pinned((self._ns(namespace), self._key(key)))

    def get_into(self, key: bytes, out: Any, *, namespace: str = DEFAULT_NAMESPACE) -> int:
        """Copy the block into the writable buffer ``out``; the bytes copied, 0 on a miss.

        Raises:
            InvalidArgumentError: ``out`` is not writable or is smaller than the block.
        """
        k = (self._ns(namespace), self._key(key))
        return self._reads.get_into(k, check_out(out))

    def tier_of(self, key: bytes, *, namespace: str = DEFAULT_NAMESPACE) -> str | None:
        """The fastest tier holding ``key`` now (``"dram"``, ``"ssd"``) or None; no side effects.

        A hint for callers that route reads (the daemon serves DRAM hits on its event loop):
        the answer can change right after it is given.
        """
        return self._reads.tier_of((self._ns(namespace), self._key(key)))

    def exists(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE) -> list[bool]:
        """Per key, whether it is stored (committed and not deleted)."""
        return self._reads.exists(self._ns(namespace), self._keys(keys))

    def match(self, keys: list[bytes], mode: str = "prefix", window: int | None = None, *,
              namespace: str = DEFAULT_NAMESPACE) -> MatchResult:
        """Match a chain of keys: ``prefix``, ``exact`` or ``sliding_window`` (see :mod:`tairstore.engine.match`)."""
        return self._reads.match(self._ns(namespace), self._keys(keys), mode, window)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` (or :meth:`abandon`) has run."""
        return self._life.closed

    @property
    def volatile(self) -> bool:
        """True for a store without SSD tier: nothing it holds survives ``close()``."""
        return not self._durable

    # ---------------------------------------------------------------------- maintenance
    def compact(self, wait: bool = True, *, full: bool = False) -> dict:
        """Run a compaction pass now (``wait``) or ask the background thread to.

        A pass rewrites the live records of every segment whose live ratio is at most
        ``compaction_live_ratio`` (``full``: of every segment holding any dead bytes, after
        closing the head segment) and deletes the old files.

        Returns:
            the compactor's counters.
        """
        self._life.check_open()
        if self.compactor is None:
            return {}
        if not wait:
            self._maintenance.wake.set()
            return self.compactor.stats()
        return self.compactor.run(full=full)

    def maintain(self, *, ttl_now: bool = True) -> None:
        """Run one maintenance pass now: expired leases, TTLs, watermarks, a compaction step.

        The background thread runs the same pass every ``maintenance_interval_s``; call this
        with ``background=False`` (tools, tests) to drive maintenance explicitly.
        """
        self._maintenance.run_pass(ttl_now=ttl_now)

    def reap_expired(self) -> int:
        """Abort every session whose lease ran out; returns how many (maintenance calls this)."""
        return self._writes.reap_expired()

    def host_memory(self) -> Any:
        """The DRAM tier's arena as one uint8 array, or None without a DRAM tier: for
        registering it with a device runtime or transfer engine (CUDA host registration, so
        copies from the views ``get`` hands out run as DMA). Never to be written through: slots
        are written by their owners only. Valid until the store is closed and its last view
        is gone; unregister it before :meth:`close`."""
        self._life.check_open()
        return self._dram.memory if self._dram is not None else None

    # ---------------------------------------------------------------------- observability
    def stats(self) -> dict:
        """Usage per tier and namespace, watermark states, counters and configuration facts.

        Costs O(namespaces), not O(blocks): counts are kept as blocks come and go.
        """
        # Outside the store lock: it may ask the remote tier.
        remote = self._remote.stats() if self._remote is not None else None
        with self._lock:
            self._life.check_open()
            catalog = self._catalog
            marks = self._maintenance.watermarks
            tiers: dict[str, dict] = {}
            ns_totals = {t: sum(st.used[t] for st in catalog.namespaces.values()) for t in TIERS}
            if self._dram is not None:
                frac, _ = self._placement.usage("dram")
                tiers["dram"] = {
                    "blocks": catalog.tier_blocks["dram"],
                    "bytes": ns_totals["dram"], "capacity": self._dram.capacity_bytes,
                    "used_bytes": self._dram.used_bytes, "pinned_bytes": self._dram.pinned_bytes,
                    "dirty_bytes": self._writes.dirty_bytes,
                    "usage": frac, "watermark": marks.state["dram"],
                }
                if self._dram.partitions > 1:
                    names = ["default", *self.config.dram_partitions]
                    tiers["dram"]["partitions"] = {
                        name: {"capacity": self._dram.partition_bytes(i),
                               "used_bytes": self._dram.partition_used(i),
                               "namespaces": (["*"] if i == 0 else
                                              list(self.config.dram_partitions[name]["namespaces"]))}
                        for i, name in enumerate(names)}
            if self._space is not None:
                tiers["ssd"] = {"blocks": catalog.tier_blocks["ssd"], "bytes": ns_totals["ssd"],
                                **self._space.stats(), "watermark": marks.state["ssd"]}
            if remote is not None:
                tiers["remote"] = remote
            namespaces = {
                name: {"blocks": st.blocks, "bytes": st.used_total, "strategy": st.strategy,
                       "tiers": {t: st.used[t] for t in TIERS}, "quota": st.quota_report()}
                for name, st in catalog.namespaces.items()}
            return {
                "blocks": len(catalog.blocks),
                "tiers": tiers,
                "namespaces": namespaces,
                "counters": {name: self._counters.get(name, 0) for name in COUNTERS},
                "compaction": self.compactor.stats() if self.compactor is not None else {},
                "watermark_crossings": dict(marks.crossings),
                "sessions_open": len(self._writes.sessions),
                "durability": self.config.durability if self._durable else "volatile",
                "volatile": not self._durable,
                "writable": self._life.fatal is None,
            }

    def check(self) -> list[str]:
        """Check the in-memory bookkeeping against itself (catalog counts, SSD space).

        Returns the problems found; empty when consistent. Meaningful when no write is in
        flight. For tests and the fuzz checker; it changes nothing.
        """
        with self._lock:
            problems = self._catalog.check()
            if self._space is not None and not self._writes.sessions:
                places = {k: b.ssd for k, b in self._catalog.blocks.items() if b.ssd is not None}
                problems += self._space.check(places)
            return problems

    # ----------------------------------------------------------------------- lifecycle
    def sync(self) -> None:
        """Make everything acknowledged so far durable now (whatever the durability mode),
        write-back blocks included."""
        self._life.check_open()
        self._writes.flush_dirty()
        if self._journal.enabled:
            self._journal.wal.sync(self._journal.wal.last_lsn)
            if self._ssd is not None and self.config.durability != "none":
                # Segment bytes no WAL record waits for (a write-back block's tombstone) are
                # made durable too; a WAL already durable does not run its pre_sync again.
                self._ssd.sync()

    def close(self) -> None:
        """Abort open sessions, make the log and index durable, release the directory. Idempotent."""
        with self._lock:
            if self._life.closed:
                return
            try:
                self._writes.abort_all()
            finally:
                self._life.closed = True
        try:
            if self._dram is not None:
                self._dram.stop_prefault()
            self._maintenance.shutdown()
            if self.compactor is not None:
                self.compactor.wait_idle()
            # Write-back blocks reach SSD before the log and index close (a clean close loses
            # nothing it acknowledged).
            self._writes.flush_dirty(closing=True)
            if self._remote is not None:
                self._remote.close()
        finally:
            self._run_close_hooks()
            # Whatever failed above, the files are closed and the directory released, so the
            # store can be opened again (recovery takes it from there).
            self._teardown()

    def abandon(self) -> None:
        """Stop using the store without writing anything more (a crashed file system: the
        fuzz harness's stand-in for a killed process). Closes files, releases the directory."""
        self._life.closed = True
        if self._maintenance is not None:
            self._maintenance.stop.set()
        self._run_close_hooks()
        self._teardown()

    def on_close(self, fn: Any) -> None:
        """Have ``fn()`` called once when the store closes (or is abandoned), before its files
        close and before its DRAM can be released: e.g. to unregister :meth:`host_memory` from
        a device runtime. An error it raises is logged, never raised from ``close``."""
        with self._lock:
            self._life.check_open()
            self._close_hooks.append(fn)

    def _run_close_hooks(self) -> None:
        with self._lock:
            hooks, self._close_hooks = self._close_hooks, []
        for fn in hooks:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a hook never stops the close
                log.exception("close hook %r failed", fn)

    def _teardown(self) -> None:
        first: BaseException | None = None
        for part in (self._index, self._journal.wal, self._ssd):
            if part is None:
                continue
            try:
                part.close()
            except BaseException as exc:  # noqa: BLE001 - close the rest, then report
                first = first or exc
        if (first is None and self._life.fatal is None and self._journal.enabled
                and self._life.closed):
            self._drop_applied_wal()
        self._dir.close()
        if first is not None and self._life.fatal is None and not isinstance(first, FatalIOError):
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
        state = "closed" if self._life.closed else "open"
        return f"<tairstore.Store {self.path!r} {state}>"


def open_store(path: str | os.PathLike, **options: Any) -> Store:
    """Open (creating if needed) the store in directory ``path``.

    Options are the fields of :class:`tairstore.config.StoreConfig`, e.g.
    ``dram_bytes``, ``ssd_bytes``, ``durability``, ``compression``, ``policy``, ``watermarks``.
    """
    return Store(path, StoreConfig.from_kwargs(**options))


# The catalog's block type, under the name recovery and fsck have used.
_Block = Block
