"""The remote tier as the store uses it: puts straight to it, reads that fall through,
demotion of blocks the SSD tier evicts, and its place in ``stats()``.

Theory of operation
-------------------
The remote tier (Mooncake Store, 3FS: :mod:`tairstore.tiers.remote`) is a shared cache, never
the durable copy: its blocks are not in the local catalog or index. So:

- **Reads fall through.** A key the catalog does not hold is asked of the remote tier (when it
  is healthy), which verifies the block's crc32c itself: a damaged block is a miss and a counted
  corruption there (R1). Unless ``promote_on="never"`` a hit is read straight into a new DRAM
  reservation and committed locally (:meth:`read_into`; the store registers its arena with a
  tier that can land reads in registered memory), else into a buffer (:meth:`read`).
- **match / exists** count a remote block as a hit, with tier ``"remote"``; one batched
  ``exists`` per call, for the keys the catalog lacks.
- **Demotion.** A block that the SSD tier evicts (whole, by its policy) is queued here under the
  store lock (its place, size and checksum); :meth:`demote` then reads those records outside the
  lock and puts them to the remote tier. The record is dead once evicted, so compaction may have
  removed it first: that block is simply not demoted (counted). A block whose only copy is in
  DRAM (a store without an SSD tier) is copied out of the arena when it is evicted, since its
  slot is reused at once; those copies are bounded by :data:`MAX_DEMOTION_COPY_BYTES`. The queue
  is bounded; past a bound the oldest entries are dropped (counted).
- **An unreachable tier** is skipped at once (its health tracker says so): local reads and
  writes never wait on it, and remote-only blocks are misses, never exceptions. The
  maintenance pass (:meth:`maintain`) probes it every ``retry_s`` until it answers, which puts
  it back in rotation even when no request comes.
"""

from __future__ import annotations

import collections
import logging
import time
from collections import Counter
from typing import Any

from tairstore.engine.session import OPEN, RemoteTierSession
from tairstore.errors import InvalidArgumentError, SessionError, StoreError

__all__ = ["RemotePart", "MAX_DEMOTION_QUEUE"]

log = logging.getLogger("tairstore.engine.store")

#: Evicted blocks waiting to be demoted; past this the oldest are dropped (and counted).
MAX_DEMOTION_QUEUE = 4096
#: Blocks per remote put when demoting.
DEMOTION_BATCH = 16
#: How often the maintenance pass refreshes the remote tier's usage (a pool-wide scrape).
USAGE_REFRESH_S = 1.0
#: Bytes of evicted DRAM-only blocks held for demotion (copies: their slots are reused).
MAX_DEMOTION_COPY_BYTES = 256 << 20


class RemotePart:
    """The store's side of a remote tier.

    Args:
        tier: the open :class:`~tairstore.tiers.remote.base.RemoteTier`.
        ssd: the segment log demoted records are read from (None without an SSD tier).
        counters: the store's counters (``hits_remote``, ``demotions``, ...).
        life: the store's lifecycle (a remote session's finish refuses on a failed store).
        dram: the DRAM arena evicted DRAM-only blocks are copied from (None without one).
    """

    def __init__(self, tier: Any, ssd: Any, counters: Counter, life: Any, dram: Any = None) -> None:
        self.tier = tier
        self._life = life
        self._ssd = ssd
        self._dram = dram
        self._counters = counters
        self._queue: collections.deque = collections.deque()
        self._copied_bytes = 0  # bytes of DRAM-only blocks copied into the queue
        self._usage_at = float("-inf")  # when the tier's usage was last refreshed

    # -- reads ----------------------------------------------------------------------------
    def _usable(self) -> bool:
        return bool(self.tier.healthy)

    def exists(self, ns: str, keys: list[bytes]) -> list[bool]:
        """Per key, whether the remote tier holds it (all False while it is unhealthy)."""
        if not keys or not self._usable():
            return [False] * len(keys)
        try:
            return list(self.tier.exists(ns, keys))
        except (StoreError, OSError) as exc:
            log.warning("remote exists failed (a miss): %s", exc)
            return [False] * len(keys)

    def size(self, ns: str, key: bytes) -> int | None:
        """The remote block's length, or None (absent, an unhealthy tier, a failure)."""
        if not self._usable():
            return None
        try:
            return self.tier.sizes(ns, [key])[0]
        except (StoreError, OSError) as exc:
            log.warning("remote size failed (a miss): %s", exc)
            return None

    def read_into(self, ns: str, key: bytes, view: memoryview) -> int | None:
        """Read the verified block into ``view``; its length, or None (a miss, a failure)."""
        try:
            return self.tier.get_into(ns, [key], [view])[0]
        except (StoreError, OSError) as exc:
            log.warning("remote read failed (a miss): %s", exc)
            return None

    def read(self, ns: str, key: bytes) -> memoryview | None:
        """The block's verified bytes, or None (a miss, an unhealthy tier, a failure)."""
        if not self._usable():
            return None
        try:
            size = self.tier.sizes(ns, [key])[0]
            if size is None:
                return None
            buf = bytearray(size)
            got = self.tier.get_into(ns, [key], [buf])[0]
        except (StoreError, OSError) as exc:
            log.warning("remote read failed (a miss): %s", exc)
            return None
        if got is None:
            return None
        return memoryview(buf)[:got].toreadonly()

    # -- writes ---------------------------------------------------------------------------
    def put(self, ns: str, key: bytes, mv: memoryview) -> bool:
        """Store one block on the remote tier only; False if it could not (unhealthy, full)."""
        return self.put_many(ns, [key], [mv])[0]

    def put_many(self, ns: str, keys: list[bytes], mvs: list[memoryview]) -> list[bool]:
        """Store blocks on the remote tier only (one batch); per key whether it holds it now."""
        if not keys:
            return []
        if not self._usable():
            return [False] * len(keys)
        try:
            return [bool(s) for s in self.tier.put(ns, keys, mvs)]
        except InvalidArgumentError:
            raise
        except (StoreError, OSError) as exc:
            log.warning("remote put failed: %s", exc)
            return [False] * len(keys)

    def usage_ratio(self) -> float:
        """The tier's used fraction, for ``prefer:remote`` (0.0 when it cannot tell)."""
        try:
            return float(self.tier.usage_ratio())
        except (StoreError, OSError) as exc:
            log.warning("remote usage failed: %s", exc)
            return 0.0

    # -- write sessions of remote-strategy namespaces -------------------------------------
    def start_session(self, sid: int, ns: str, keys: list[bytes], sizes: list[int],
                      lease_s: float, local: set[bytes]) -> RemoteTierSession:
        """A session whose blocks go to the remote tier at ``finish_write``; keys in ``local``
        (stored here already) are not written."""
        todo = [k for k in keys if k not in local]
        session = RemoteTierSession(sid, ns, todo, lease_s, time.monotonic() + lease_s)
        session.sizes = {k: n for k, n in zip(keys, sizes) if k not in local}
        return session

    @staticmethod
    def _buffer(session: RemoteTierSession, key: bytes) -> bytearray:
        """The payload buffer of an unwritten key of an open session (session lock held)."""
        session.check_open()
        size = session.sizes.get(key)
        if size is None:
            raise SessionError(f"key {key.hex()[:16]}… is not in write session {session.id}'s keys_to_write")
        if key in session.written:
            raise SessionError(f"key {key.hex()[:16]}… was already written in session {session.id}")
        buf = session.buffers.get(key)
        if buf is None:
            buf = session.buffers[key] = bytearray(size)
        return buf

    def write(self, session: RemoteTierSession, key: bytes, mv: memoryview) -> None:
        """Copy one payload into the session (its bytes go out at finish)."""
        with session.lock:
            buf = self._buffer(session, key)
            if len(mv) != len(buf):
                raise SessionError(f"block is {len(mv)} bytes but start_write reserved {len(buf)}")
            buf[:] = mv
            session.written.add(key)

    def write_view(self, session: RemoteTierSession, key: bytes) -> memoryview:
        """A writable view of the key's payload buffer (see :meth:`Store.write_view`)."""
        with session.lock:
            return memoryview(self._buffer(session, key))

    def write_done(self, session: RemoteTierSession, key: bytes) -> None:
        with session.lock:
            self._buffer(session, key)
            session.written.add(key)

    def finish_write(self, session: RemoteTierSession, ok: list[bytes]) -> int:
        """Put the ``ok`` keys to the remote tier in one batch; returns how many it holds now
        (fewer when it is unreachable or full: those blocks are not stored anywhere)."""
        self._life.check_writable()
        with session.lock:
            if session.state == OPEN and not session.keys_to_write and not ok:
                session.transition("finish")
                return 0
            session.check_open()
            for key in ok:
                if key not in session.written:
                    raise SessionError(f"key {key.hex()[:16]}… was not written in session {session.id}")
            wanted = set(ok)
            keys = [k for k in session.keys_to_write if k in wanted]
            bufs = [session.buffers[k] for k in keys]
            session.transition("finish")
            session.buffers = {}
        return sum(self.put_many(session.namespace, keys, [memoryview(b) for b in bufs])) if keys else 0

    @staticmethod
    def abort_write(session: RemoteTierSession) -> None:
        with session.lock:
            if session.state == OPEN:
                session.transition("abort")
            session.buffers.clear()

    # -- maintenance ----------------------------------------------------------------------
    def maintain(self) -> int:
        """One maintenance step: probe an unhealthy tier when a retry is due (so a recovered
        tier is back in rotation without a request touching it), then demote; returns the
        blocks demoted."""
        try:
            self.tier.probe()
        except (StoreError, OSError) as exc:
            log.warning("remote probe failed: %s", exc)
        now = time.monotonic()
        if self.tier.healthy and now - self._usage_at >= USAGE_REFRESH_S:
            self._usage_at = now
            self.tier.refresh_usage()
        return self.demote()

    def delete(self, ns: str, keys: list[bytes]) -> int:
        """Delete from the remote tier too; returns how many it held (0 while unhealthy)."""
        if not keys or not self._usable():
            return 0
        try:
            return int(self.tier.delete(ns, keys))
        except (StoreError, OSError) as exc:
            log.warning("remote delete failed: %s", exc)
            return 0

    # -- demotion -------------------------------------------------------------------------
    def note_evicted(self, k: tuple[str, bytes], b: Any) -> None:
        """Queue an evicted block for demotion: its SSD record, or a copy of its only (DRAM)
        copy (store lock held)."""
        if b.ssd is not None and self._ssd is not None:
            where: Any = b.ssd
            crc = b.crc  # the SSD read verifies against it; the tier need not compute it
        elif b.dram is not None and self._dram is not None:
            if b.size > MAX_DEMOTION_COPY_BYTES:
                self._counters["demotions_dropped"] += 1
                return
            where = bytearray(self._dram.held_view(b.dram))  # its slot is reused at once
            crc = None  # a DRAM copy is not verified on the way out: the tier checksums it
            self._copied_bytes += b.size
        else:
            return
        self._queue.append((k[0], k[1], b.size, crc, where))
        while (len(self._queue) > MAX_DEMOTION_QUEUE
               or self._copied_bytes > MAX_DEMOTION_COPY_BYTES):
            self._forget(self._queue.popleft())
            self._counters["demotions_dropped"] += 1

    def _forget(self, entry: tuple) -> None:
        if isinstance(entry[4], bytearray):
            self._copied_bytes -= entry[2]

    def demote(self, limit: int = MAX_DEMOTION_QUEUE) -> int:
        """Put queued evicted blocks to the remote tier (no store lock); returns how many."""
        done = 0
        while self._queue and done < limit and self._usable():
            batch = []
            while self._queue and len(batch) < DEMOTION_BATCH:
                entry = self._queue.popleft()
                self._forget(entry)
                batch.append(entry)
            by_ns: dict[tuple[str, bool], tuple[list[bytes], list[bytearray], list[int]]] = {}
            for ns, key, size, crc, where in batch:
                if isinstance(where, bytearray):
                    buf = where  # a DRAM-only block's copy
                else:
                    seg, off, length = where
                    buf = bytearray(size)
                    try:
                        self._ssd.read_into(seg, off, length, buf, namespace=ns, key=key,
                                            expected_crc=crc)
                    except (StoreError, OSError):
                        self._counters["demotions_missed"] += 1  # compacted away, or unreadable
                        continue
                keys, bufs, crcs = by_ns.setdefault((ns, crc is not None), ([], [], []))
                keys.append(key)
                bufs.append(buf)
                crcs.append(crc)  # read_into verified the bytes against it
            for (ns, known), (keys, bufs, crcs) in by_ns.items():
                try:
                    stored = self.tier.put(ns, keys, bufs, crcs if known else None)
                except (StoreError, OSError) as exc:
                    log.warning("demotion to the remote tier failed: %s", exc)
                    stored = [False] * len(keys)
                n = sum(bool(s) for s in stored)
                done += n
                self._counters["demotions"] += n
                self._counters["demotion_failures"] += len(keys) - n
        return done

    @property
    def pending(self) -> int:
        """Evicted blocks waiting to be demoted."""
        return len(self._queue)

    def stats(self) -> dict[str, Any]:
        """``stats()["tiers"]["remote"]``: the tier's own counters, ``healthy`` among them."""
        out = dict(self.tier.stats())
        out["healthy"] = bool(out.get("healthy", self.tier.healthy))
        out["demotion_queue"] = len(self._queue)
        return out

    def close(self) -> None:
        """Close the tier (queued demotions are dropped: the remote tier is a cache)."""
        self._queue.clear()
        self._copied_bytes = 0
        self.tier.close()
