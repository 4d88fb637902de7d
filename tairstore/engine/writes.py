"""The write path: two-phase writes, puts, deletes and the removal of blocks.

Theory of operation
-------------------
``start_write`` drops keys already stored or in flight and *admits* each remaining key
(:class:`~tairstore.engine.placement.Placement`: quotas, then space in each tier, evicting as
needed) by reserving a DRAM slot and an SSD record, then logs PREPARE; ``write`` copies the
payload into its reservations (one copy into the arena, one ``pwritev`` into the segment) and
computes its crc32c once; ``finish_write`` logs COMMIT, makes it as durable as the durability
mode promises (one group-committed fsync in ``sync`` mode), and only then publishes the keys in
the catalog (W1: make durable, then publish). Keys not committed are released. ``put`` runs the
same three steps without a session object.

Every block of a store with an SSD tier is written through to SSD; the DRAM copy is a cache in
front of it. With ``write_back`` a block that got a DRAM slot may instead be committed from DRAM
alone (*deferred*, while the deferred bytes stay under half the arena): it is published with its
SSD reservation kept and its slot pinned (never evicted, never reused), and no COMMIT is logged.
:meth:`Writes.flush_dirty` (the maintenance thread, ``sync``, ``close``) later writes the
records, logs their COMMIT and adds the SSD copy, all under the store lock in one critical
section, so a delete either finds the block dirty (the reservation is abandoned, nothing was
logged) or flushed (a plain delete). A crash before the flush leaves the key absent (W2). A write that finds the SSD files full of dead records compacts in its own thread
(never under the store lock) and retries, bounded by :data:`ADMIT_DEADLINE_S`.

Arguments arrive checked by the store facade. The store lock is held for metadata only; payload
copies, checksums, disk I/O and fsyncs run outside it. Lock order: a session's lock, then the
store lock.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

from tairstore.config import StoreConfig
from tairstore.engine.catalog import Block, Catalog
from tairstore.engine.lifecycle import Journal, Lifecycle
from tairstore.engine.placement import NeedSsdRoom, Placement
from tairstore.engine.session import NO_SLOT, OPEN, PendingBlock, WriteSession
from tairstore.engine.ssd_space import SsdSpace
from tairstore.errors import CapacityError, ClosedError, DiskFullError, FatalIOError, SessionError
from tairstore.format.checksum import crc32c
from tairstore.format.segment import FLAG_COMMITTED
from tairstore.index.records import BlockRecord
from tairstore.parallel import split_run
from tairstore.tiers.dram import COPY_RELEASES_GIL_BYTES, DramArena
from tairstore.wal import Abort, Commit, CommitEntry, Delete, Prepare

__all__ = ["Writes", "ADMIT_DEADLINE_S"]

Key = tuple[str, bytes]

# A write that finds the SSD files full compacts and retries. Attempts in which compaction
# freed nothing count toward this limit; attempts that freed room but lost it to concurrent
# writers do not, bounded instead by ADMIT_DEADLINE_S.
ADMIT_ATTEMPTS = 4
ADMIT_DEADLINE_S = 30.0
ADMIT_BACKOFF_S = 0.002


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


class _Dirty:
    """A write-back block waiting for its SSD record (store lock guards it)."""

    __slots__ = ("res", "slot", "token", "block", "cancelled")

    def __init__(self, res: Any, slot: Any, token: object, block: Block) -> None:
        self.res = res  # its SSD reservation
        self.slot = slot  # its DRAM slot, pinned by `token`
        self.token = token
        self.block = block
        self.cancelled = False  # removed while its record was being written


class Writes:
    """Write sessions, puts, deletes, trims and block removal.

    Args:
        compactor: returns the store's compactor (None without an SSD tier).
    """

    def __init__(self, config: StoreConfig, lock: Any, life: Lifecycle, catalog: Catalog,
                 dram: DramArena | None, space: SsdSpace | None, journal: Journal,
                 counters: Counter, compactor: Callable[[], Any]) -> None:
        self.config = config
        self._lock = lock
        self._life = life
        self._catalog = catalog
        self._dram = dram
        self._space = space
        self._ssd = space.log if space is not None else None
        self._journal = journal
        self._counters = counters
        self._compactor = compactor
        self.placement: Placement | None = None  # set by the store (it needs remove())
        self.sessions: dict[int, WriteSession] = {}
        self._session_ids = itertools.count(1)
        self.generation = 0
        # Write-back (config.write_back): blocks committed from DRAM, oldest first, and the batch
        # a flush is writing; their bytes, and the most that may wait.
        self._dirty: dict[Key, _Dirty] = {}
        self._flushing: dict[Key, _Dirty] = {}
        self.dirty_bytes = 0
        self._dirty_limit = config.dram_bytes // 2 if config.write_back else 0
        self._flush_lock = threading.Lock()

    def new_session_id(self) -> int:
        """A session id unique within the store's lifetime (store lock held)."""
        return next(self._session_ids)

    def next_generation(self) -> int:
        """Monotonic across restarts: wall-clock nanoseconds, never below the last issued."""
        self.generation = max(self.generation + 1, time.time_ns())
        return self.generation

    def _make_room(self, nbytes: int, admit: _Admission) -> None:
        """Compact outside the store lock (it copies records and fsyncs), then note progress."""
        admit.note(self._compactor().make_room(nbytes), self._space.room_is_coming())

    # ---------------------------------------------------------------------------- sessions
    def start_write(self, ns: str, keys: list[bytes], sizes: list[int], lease_s: float,
                    tier: str, parents: list[bytes | None], *, register: bool = True) -> WriteSession:
        """Begin a two-phase write (see :meth:`tairstore.engine.store.Store.start_write`)."""
        with self._holding(ns, parents):
            admit = _Admission()
            while admit.go_on():
                need_bytes = self._try_session(ns, keys, sizes, lease_s, tier, parents,
                                               register=register)
                if isinstance(need_bytes, WriteSession):
                    return need_bytes
                self._make_room(need_bytes, admit)
        raise CapacityError(
            "SSD tier full: compaction could not free room for this write (live blocks fill it)",
            dimension="tier:ssd")

    def _try_session(self, ns: str, keys: list[bytes], sizes: list[int], lease_s: float,
                     tier: str, parents: list[bytes | None], *,
                     register: bool = True) -> "WriteSession | int":
        """One admission attempt: the session, or the SSD bytes compaction must free first.

        Without ``register`` (a batched put, committed before it returns) the session is
        neither logged (PREPARE) nor listed for the reaper.
        """
        catalog = self._catalog
        if self._space is not None:  # a volatile store has no SSD room to make
            with self._lock:
                self._life.check_writable()
                todo = [(key, size) for key, size in zip(keys, sizes) if not catalog.busy((ns, key))]
                need_bytes = self.placement.ssd_room_needed(ns, todo)
            if need_bytes:
                return need_bytes
        with self._lock:
            self._life.check_writable()
            sid = next(self._session_ids)
            session = WriteSession(sid, ns, [], lease_s, time.monotonic() + lease_s)
            pending, to_write = session.pending, session.keys_to_write
            busy, admit = catalog.busy, self._admit_inflight
            try:
                for key, size, par in zip(keys, sizes, parents):
                    if busy((ns, key)):
                        continue
                    p = PendingBlock(size, parent=par)
                    admit(ns, key, p, tier, sid)
                    pending[key] = p
                    to_write.append(key)
            except NeedSsdRoom as need:
                self._release_pending(session, session.pending)
                return need.nbytes
            except BaseException:
                self._release_pending(session, session.pending)
                raise
            if session.keys_to_write and register:
                if self._journal.enabled:
                    try:
                        self._journal.wal.append(Prepare(
                            sid, ns, tuple(session.keys_to_write),
                            tuple(session.pending[k].size for k in session.keys_to_write)))
                    except FatalIOError as exc:
                        self._life.fail(exc)
                        self._release_pending(session, session.pending)
                        raise
                self.sessions[sid] = session
            return session

    def _admit_inflight(self, ns: str, key: bytes, p: PendingBlock, tier: str, sid: int) -> None:
        """Admit one key and mark it in flight; on failure nothing of it stays (store lock held)."""
        k = (ns, key)
        self._catalog.begin_inflight(k, p.parent, sid)
        try:
            self.placement.admit(ns, key, p, tier)
        except BaseException:
            self._catalog.end_inflight(k, p.parent)
            raise

    @contextmanager
    def _holding(self, ns: str, parents: list[bytes | None]) -> Iterator[None]:
        """Hold ``parents`` against eviction while a write's admission runs (it may evict).

        Each admitted key then holds its own parent until it commits or is released
        (:meth:`Catalog.begin_inflight`); this covers the moments before that, when the
        batch's room is made.
        """
        held = [(ns, par) for par in parents if par is not None]
        if not held:
            yield
            return
        with self._lock:
            self._catalog.hold(held)
        try:
            yield
        finally:
            with self._lock:
                for kp in held:
                    self._catalog.release(kp)

    def write(self, session: WriteSession, key: bytes, mv: memoryview) -> None:
        """Copy one block's payload into its reservation."""
        with session.lock:
            p = self._pending_for_write(session, key)
            if len(mv) != p.size:
                raise SessionError(f"block is {len(mv)} bytes but start_write reserved {p.size}")
            self._fill(session.namespace, key, p, mv, committed=False)

    def write_view(self, session: WriteSession, key: bytes) -> memoryview | None:
        """A writable view of ``key``'s DRAM reservation, or None without one."""
        with session.lock:
            p = self._pending_for_write(session, key)
            if p.dram is None:
                return None
            return self._dram.writable_view(p.dram)

    def write_done(self, session: WriteSession, key: bytes) -> None:
        """Checksum and write through a payload received in place by :meth:`write_view`."""
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
            if self.sessions.get(session.id) is not session and session.state == OPEN:
                raise SessionError("not a write session from this store")
            if session.state == OPEN and session.expired:
                # Expiry is decided here, once, under the store lock, and releases the
                # reservations in the same critical section (check_usable only reads the state).
                self._abort_locked(session, "expire")
        self._life.check_open()
        session.check_usable()

    def finish_write(self, session: WriteSession, ok: list[bytes]) -> int:
        """Commit ``ok`` of the session and release the rest; returns how many committed."""
        with session.lock:
            if session.state == OPEN and not session.keys_to_write and not ok:
                # Every key was already stored: nothing was reserved, nothing to commit.
                with self._lock:
                    session.transition("finish")
                return 0
            self._check_session(session)
            ok_set = set(ok)
            for key in ok_set:
                p = session.pending.get(key)
                if p is None or not p.written:
                    raise SessionError(f"key {key.hex()[:16]}… was not written in session {session.id}")
            committed = [(k, session.pending.pop(k)) for k in session.keys_to_write if k in ok_set]
            try:
                return self._commit(session.namespace, committed, session.id)
            finally:
                with self._lock:
                    self._release_pending(session, session.pending)
                    session.transition("finish")
                    self.sessions.pop(session.id, None)

    def abort_write(self, session: WriteSession) -> None:
        """Abandon a session: release every reservation. A finished session is left alone."""
        with session.lock, self._lock:
            if session.state == OPEN:
                self._abort_locked(session, "abort")

    def _abort_locked(self, session: WriteSession, event: str) -> None:
        """Abort or expire an open session and release its reservations (store lock held)."""
        self._release_pending(session, session.pending)
        session.transition(event)
        self.sessions.pop(session.id, None)
        if event == "expire":
            self._counters["leases_expired"] += 1
        if self._journal.enabled and not self._life.closed and self._life.fatal is None:
            try:
                self._journal.wal.append(Abort(session.id))
            except (FatalIOError, ClosedError) as exc:
                # An ABORT needs no durability (a session without COMMIT never existed), so a
                # WAL that failed in the background must not stop the abort — or close().
                self._life.fail(exc)

    def abort_all(self) -> None:
        """Abort every open session (close; store lock held)."""
        for s in list(self.sessions.values()):
            if s.state == OPEN:
                self._abort_locked(s, "abort")

    def reap_expired(self) -> int:
        """Abort every session whose lease ran out; returns how many."""
        with self._lock:
            expired = [s for s in self.sessions.values() if s.expired]
        n = 0
        for s in expired:
            with s.lock, self._lock:
                if s.state == OPEN and not self._life.closed:
                    self._abort_locked(s, "expire")
                    n += 1
        return n

    def _release_pending(self, session: WriteSession, pending: dict[bytes, PendingBlock]) -> None:
        """Give back the reservations of ``pending`` (store lock held)."""
        ns = session.namespace
        st = self._catalog.ns(ns)
        for key, p in list(pending.items()):
            self._forget(st, ns, key, p)
        pending.clear()

    def _forget(self, st: Any, ns: str, key: bytes, p: PendingBlock) -> None:
        """Release one uncommitted block: reservations, usage, in-flight mark (store lock held)."""
        self.placement.unreserve(st, p)
        st.used_total -= p.size
        if p.deferred:
            p.deferred = False
            self.dirty_bytes -= p.size
        self._catalog.end_inflight((ns, key), p.parent)

    # ---------------------------------------------------------------------------- payloads
    def _fill(self, ns: str, key: bytes, p: PendingBlock, mv: memoryview | None, *,
              committed: bool) -> None:
        """Copy the payload into the reservations of ``p`` and checksum it (no store lock).

        ``mv`` None: the payload is already in the DRAM reservation (:meth:`write_view`).
        """
        self._life.check_writable()
        # A volatile store that does not verify DRAM reads never uses the checksum: skip it.
        need_crc = self._space is not None or self.config.verify_dram_reads
        slot_view = None
        if mv is None:
            if not need_crc and p.ssd is None:
                # Payload already in place, nothing to checksum or write through (a volatile
                # store receiving via write_view): only the generation is left to assign.
                with self._lock:
                    p.generation = self.next_generation()
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
            p.generation = self.next_generation()
            self._defer(p)
        if p.ssd is not None and not p.deferred:
            try:
                p.location = self._ssd.write(p.ssd, ns, key, mv, generation=p.generation, crc=p.crc,
                                             committed=committed)
            except FatalIOError as exc:
                self._life.fail(exc)
                raise
            with self._lock:
                self._space.note_written(p.location, p.generation)

    def _defer(self, p: PendingBlock) -> None:
        """Write-back: commit ``p`` from DRAM if it has a slot and room is left (store lock held)."""
        if (self._dirty_limit and p.dram is not None and p.ssd is not None
                and self.dirty_bytes + p.size <= self._dirty_limit):
            p.deferred = True
            self.dirty_bytes += p.size

    def _commit(self, ns: str, items: list[tuple[bytes, PendingBlock]], sid: int) -> int:
        """Log COMMIT for written blocks, wait for durability, then publish them.

        On failure every reservation of ``items`` is released.
        """
        located = [(k, p) for k, p in items if p.location is not None]
        try:
            for k, p in located:
                if not p.location.flags & FLAG_COMMITTED:
                    # Before COMMIT is logged, so a rebuild from segments never knows a block the
                    # WAL does not (the same sync makes both durable).
                    self._ssd.mark_committed(p.location, ns, k, p.generation)
            lsn = None
            with self._lock:
                self._life.check_writable()
                if self._journal.enabled and located:
                    now = time.time_ns()
                    entries = tuple(CommitEntry(ns, k, p.size, p.crc, p.generation,
                                                (p.location.segment, p.location.offset, p.location.length))
                                    for k, p in located)
                    ops = [(ns, k, BlockRecord(p.size, p.crc, p.generation, now, p.location.segment,
                                               p.location.offset, p.location.length))
                           for k, p in located]
                    lsn = self._journal.log(Commit(sid, entries), ops)
            if lsn is not None:
                self._journal.make_durable(lsn)
        except BaseException as exc:
            if isinstance(exc, FatalIOError):
                self._life.fail(exc)
            with self._lock:
                st = self._catalog.ns(ns)
                for k, p in items:
                    self._forget(st, ns, k, p)
            raise
        # W1: only now, with the COMMIT as durable as promised, do readers see the keys.
        publish = self._catalog.publish
        with self._lock:
            now = time.time_ns()
            for k, p in items:
                kk = (ns, k)
                loc = p.location
                place = (loc.segment, loc.offset, loc.length) if loc is not None else None
                if place is not None:
                    self._space.commit(kk, p.ssd, place)
                b = Block(p.size, p.crc, p.generation, now, place, p.dram, p.parent)
                publish(kk, b, p.parent)
                if p.deferred:
                    # Its reservation and its dirty bytes pass to the flush (C1: the SSD
                    # usage stays counted); the pin keeps its copy from eviction and reuse.
                    self._dirty[kk] = _Dirty(p.ssd, p.dram, self._dram.pin(p.dram), b)
                    p.deferred = False
                    self._counters["writeback_deferred"] += 1
                p.ssd = None
                p.dram = None
                self._catalog.end_inflight(kk, p.parent)
            self._counters["puts"] += len(items)
            self._counters["bytes_written"] += sum(p.size for _, p in items)
        return len(items)

    # -------------------------------------------------------------------------------- puts
    def put(self, ns: str, key: bytes, mv: memoryview, tier: str, parent: bytes | None) -> bool:
        """Store one block; False if the key already exists (or is being written)."""
        p = PendingBlock(len(mv), parent=parent)
        with self._holding(ns, [parent]):
            if not self._admit_one(ns, key, p, tier):
                return False
        try:
            # The whole payload is at hand, so the record is written committed at once: a
            # rebuild may restore it even if the crash comes before COMMIT, and its bytes are
            # exactly the ones put.
            self._fill(ns, key, p, mv, committed=True)
        except BaseException:
            with self._lock:
                self._forget(self._catalog.ns(ns), ns, key, p)
            raise
        return self._commit(ns, [(key, p)], 0) == 1

    def put_many(self, ns: str, keys: list[bytes], mvs: list[memoryview], tier: str,
                 parents: list[bytes | None]) -> list[bool]:
        """Store many blocks with one admission, one write per run of records, one COMMIT.

        Returns, per key, True if this call stored it (False: it existed or was being
        written). The blocks are committed together: one WAL record and, in ``sync`` mode, one
        group-committed fsync for the whole batch.
        """
        session = self.start_write(ns, keys, [len(mv) for mv in mvs], ADMIT_DEADLINE_S, tier,
                                   parents, register=False)
        todo = session.keys_to_write
        if not todo:
            return [False] * len(keys)
        by_key = dict(zip(keys, mvs))
        items = [(k, session.pending[k]) for k in todo]
        try:
            self._fill_many(ns, [(k, p, by_key[k]) for k, p in items])
            session.pending.clear()
            self._commit(ns, items, 0)
        except BaseException:
            with self._lock:
                self._release_pending(session, session.pending)
            raise
        stored = set(todo)
        return [k in stored for k in keys]

    def put_produced(self, ns: str, key: bytes, size: int, produce: Callable[[memoryview], Any]) -> Any:
        """Store one block of ``size`` bytes that ``produce(view)`` writes into its DRAM
        reservation (a remote hit read straight into the arena), returning what ``produce``
        returned; the block is committed only if that is ``size``.

        Returns :data:`~tairstore.engine.session.NO_SLOT`, producing nothing, when the key is
        stored or being written already or the block got no DRAM reservation (the caller reads
        it some other way).
        """
        p = PendingBlock(size)
        if not self._admit_one(ns, key, p, "auto"):
            return NO_SLOT
        got: Any = NO_SLOT
        filled = False
        try:
            if p.dram is not None:
                view = self._dram.writable_view(p.dram)
                try:
                    got = produce(view)
                finally:
                    view.release()
                if got == size:
                    self._fill(ns, key, p, None, committed=True)
                    filled = True
        finally:
            if not filled:  # no slot, not produced, or an error: nothing of the block stays
                with self._lock:
                    self._forget(self._catalog.ns(ns), ns, key, p)
        if filled:
            self._commit(ns, [(key, p)], 0)
        return got

    def _fill_many(self, ns: str, batch: list[tuple[bytes, PendingBlock, memoryview]]) -> None:
        """:meth:`_fill` for a batch: DRAM copies and checksums (split across two threads when
        the batch is large: :func:`~tairstore.parallel.split_run`), then one ``write_many`` of
        the SSD records, written committed (the whole payload is at hand, as for ``put``)."""
        self._life.check_writable()
        need_crc = self._space is not None or self.config.verify_dram_reads
        dram = self._dram

        def fill(p: PendingBlock, mv: memoryview) -> None:
            if p.dram is not None:
                dram.copy_in(p.dram, mv)
                if need_crc:  # the copy just landed: checksummed from this core's cache
                    p.crc = dram.crc32c(p.dram)
            elif need_crc:
                p.crc = crc32c(mv)

        sizes = [len(mv) for _, _, mv in batch]
        if min(sizes) >= COPY_RELEASES_GIL_BYTES:  # on two threads: disjoint slots
            split_run(lambda j: fill(batch[j][1], batch[j][2]), sizes)
        else:  # small copies hold the GIL: a second thread would only wait for it
            for _, p, mv in batch:
                fill(p, mv)
        with self._lock:
            # One clock read for the batch: generations stay unique and increasing.
            gen = self.next_generation()
            for _, p, _ in batch:
                p.generation = gen
                gen += 1
                self._defer(p)
            self.generation = gen - 1
        on_ssd = [(k, p, mv) for k, p, mv in batch if p.ssd is not None and not p.deferred]
        if on_ssd:
            try:
                locations = self._ssd.write_many(
                    [(p.ssd, ns, k, mv, p.generation, p.crc) for k, p, mv in on_ssd], committed=True)
            except FatalIOError as exc:
                self._life.fail(exc)
                raise
            with self._lock:
                for (_, p, _), loc in zip(on_ssd, locations):
                    p.location = loc
                    self._space.note_written(loc, p.generation)
        for _, p, _ in batch:
            p.written = True

    def _admit_one(self, ns: str, key: bytes, p: PendingBlock, tier: str) -> bool:
        """put's admission loop: reserve ``key``; False if it exists or is being written."""
        k = (ns, key)
        catalog = self._catalog
        admit = _Admission()
        while admit.go_on():
            with self._lock:
                self._life.check_writable()
                if catalog.busy(k):
                    return False
                need_bytes = self.placement.ssd_room_needed(ns, [(key, p.size)])
            if need_bytes:
                self._make_room(need_bytes, admit)
                continue
            with self._lock:
                self._life.check_writable()
                if catalog.busy(k):
                    return False
                try:
                    self._admit_inflight(ns, key, p, tier, 0)
                except NeedSsdRoom as need:
                    need_bytes = need.nbytes
                else:
                    return True
            self._make_room(need_bytes, admit)
        raise CapacityError("SSD tier full: compaction could not free room for this write",
                            dimension="tier:ssd")

    # -------------------------------------------------------------------------- write-back
    def _drop_dirty(self, k: Key, b: Block, tombstone: bool) -> None:
        """A removed block had no SSD copy yet: give back its reservation (store lock held).

        Nothing about it was logged, so no DELETE is. A block whose record a flush is writing
        right now is marked for the flush to abandon; an explicit delete also leaves a
        tombstone, so a rebuild from the segments cannot bring that record back.
        """
        d = self._dirty.pop(k, None)
        if d is not None:
            self._space.abandon(d.res)
            self.dirty_bytes -= b.size
            self._dram.unpin(d.token)
        else:
            d = self._flushing.get(k)
            if d is None or d.block is not b:
                return  # a DRAM-only block (its flush failed): nothing reserved
            d.cancelled = True
            if tombstone and self._life.fatal is None:
                try:
                    loc = self._ssd.write_tombstone(k[0], k[1], self.next_generation())
                except (CapacityError, FatalIOError):
                    pass  # only a rebuild could bring the record back
                else:
                    self._space.note_tombstone(loc)
        self._catalog.namespaces[k[0]].used["ssd"] -= b.size

    def flush_dirty(self, *, closing: bool = False) -> int:
        """Write every write-back block's SSD record and log its COMMIT; returns how many.

        The records are written outside the store lock (the dirty pins keep the DRAM bytes);
        then, under it, the blocks still present get their COMMIT and their SSD copy, and the
        reservations of those removed meanwhile are abandoned. If the SSD write fails, the
        blocks stay readable from DRAM without an SSD copy (a cache entry the DRAM tier may
        evict), and the failure is counted. ``closing``: run by ``close`` after the store
        stopped taking writes.
        """
        if not self._dirty:
            return 0
        with self._flush_lock:
            with self._lock:
                if self._life.fatal is not None or (self._life.closed and not closing):
                    return 0
                batch = list(self._dirty.items())
                self._dirty.clear()
                self._flushing.update(batch)
            try:
                locations = self._ssd.write_many(
                    [(d.res, k[0], k[1], self._dram.held_view(d.slot), d.block.generation,
                      d.block.crc) for k, d in batch], committed=True)
            except (DiskFullError, FatalIOError) as exc:
                with self._lock:
                    for k, d in batch:
                        self._space.abandon(d.res)
                        if not d.cancelled:
                            self._catalog.namespaces[k[0]].used["ssd"] -= d.block.size
                    self._end_flush(batch)
                    self._counters["writeback_failed"] += len(batch)
                if isinstance(exc, FatalIOError):
                    self._life.fail(exc)
                    raise
                return 0
            lsn = None
            with self._lock:
                present = []
                for (k, d), loc in zip(batch, locations):
                    self._space.note_written(loc, d.block.generation)
                    if d.cancelled:
                        self._space.abandon(d.res)
                    else:
                        present.append((k, d, (loc.segment, loc.offset, loc.length)))
                try:
                    lsn = self._log_flushed(present)
                except BaseException as exc:
                    # Nothing of the batch is published on SSD: the blocks stay DRAM-only.
                    for k, d, _ in present:
                        self._space.abandon(d.res)
                        self._catalog.namespaces[k[0]].used["ssd"] -= d.block.size
                    self._end_flush(batch)
                    if isinstance(exc, FatalIOError):
                        self._life.fail(exc)
                    raise
                for k, d, place in present:
                    self._space.commit(k, d.res, place)
                    self._catalog.add_ssd_copy(k, d.block, place)
                self._end_flush(batch)
                self._counters["writeback_flushed"] += len(present)
        self._sync_if_asked(lsn)
        return len(present)

    def _log_flushed(self, present: list[tuple[Key, _Dirty, tuple[int, int, int]]]) -> int | None:
        """Log the COMMIT of flushed write-back blocks, one record per namespace (store lock held)."""
        if not present or not self._journal.enabled or self._life.fatal is not None:
            return None
        by_ns: dict[str, list] = {}
        for k, d, place in present:
            by_ns.setdefault(k[0], []).append((k[1], d.block, place))
        lsn = None
        for ns, group in by_ns.items():
            entries = tuple(CommitEntry(ns, key, b.size, b.crc, b.generation, place)
                            for key, b, place in group)
            ops = [(ns, key, BlockRecord(b.size, b.crc, b.generation, b.created_ns, *place))
                   for key, b, place in group]
            lsn = self._journal.log(Commit(0, entries), ops)
        return lsn

    def _end_flush(self, batch: list[tuple[Key, _Dirty]]) -> None:
        """The flush of ``batch`` is over: its dirty bytes and pins go (store lock held)."""
        for k, d in batch:
            self._flushing.pop(k, None)
            self.dirty_bytes -= d.block.size
            self._dram.unpin(d.token)

    # ------------------------------------------------------------------------------ delete
    def delete(self, ns: str, keys: list[bytes]) -> int:
        """Delete blocks; returns how many existed."""
        with self._lock:
            self._life.check_writable()
            wanted = list(dict.fromkeys(keys))
            present = [(ns, k) for k in wanted if (ns, k) in self._catalog.blocks]
            lsn = self.remove(present, tombstones=True)
            if len(present) < len(wanted):
                # A key already gone may have been evicted by a DELETE not yet durable
                # (evictions do not wait): what this delete acknowledges must outlive a crash.
                lsn = self._logged_lsn(lsn)
            self._counters["deletes"] += len(present)
        self._sync_if_asked(lsn)
        return len(present)

    def trim(self, ns: str, cutoff_ns: int | None) -> int:
        """Delete a namespace's blocks (those created before ``cutoff_ns``, or all)."""
        with self._lock:
            self._life.check_writable()
            victims = [k for k, b in self._catalog.blocks.items()
                       if k[0] == ns and (cutoff_ns is None or b.created_ns < cutoff_ns)]
            lsn = self._logged_lsn(self.remove(victims, tombstones=True))  # (as delete)
            self._counters["trimmed"] += len(victims)
        self._sync_if_asked(lsn)
        return len(victims)

    def _logged_lsn(self, lsn: int | None) -> int | None:
        """The LSN of the last record logged so far (store lock held), for an acknowledgement
        that must also make earlier records durable; ``lsn`` where nothing is to be logged."""
        if not self._journal.enabled or self._life.fatal is not None:
            return lsn
        last = self._journal.wal.last_lsn
        return last if last > 0 else lsn

    def _sync_if_asked(self, lsn: int | None) -> None:
        if lsn is not None:
            try:
                self._journal.make_durable(lsn)
            except FatalIOError as exc:
                self._life.fail(exc)
                raise

    def remove(self, present: list[Key], *, tombstones: bool) -> int | None:
        """Drop blocks from the catalog and tiers; log DELETE (store lock held).

        Returns the LSN of the last DELETE logged, or None.
        """
        if not present:
            return None
        logged: dict[str, list[bytes]] = {}
        for k in present:
            b = self._catalog.unpublish(k)
            if b.dram is not None:
                self._dram.release(b.dram)
            if b.ssd is not None:
                self._space.remove(k, b.ssd)
                logged.setdefault(k[0], []).append(k[1])
            elif self._dirty_limit:
                self._drop_dirty(k, b, tombstones)
        if not self._journal.enabled or not logged or self._life.fatal is not None:
            return None
        lsn = None
        for ns, ks in logged.items():
            if tombstones:
                for key in ks:
                    # A tombstone in the segment log keeps `fsck --rebuild` from resurrecting
                    # an explicitly deleted block. Evictions write none: an evicted block that
                    # a rebuild brings back is still a correct block of its key (a rebuild can
                    # bring back one deleted after its eviction too: that delete found nothing
                    # to write a tombstone for). Written before the DELETE is logged: any WAL
                    # sync that makes the DELETE durable fsyncs the segments first (pre_sync),
                    # and that covers the tombstone only if it is already written by then.
                    try:
                        loc = self._ssd.write_tombstone(ns, key, self.next_generation())
                    except (CapacityError, FatalIOError):
                        continue  # the WAL/index delete stands; only a rebuild could bring it back
                    self._space.note_tombstone(loc)
            lsn = self._journal.log(Delete(ns, tuple(ks)), [(ns, key, None) for key in ks])
        return lsn
