"""The Mooncake Store remote tier: one Mooncake object per block, shared through its master.

Theory of operation
-------------------
Each block is one object named ``<prefix><namespace>/<hex key>``. The object is the payload as
it is, followed by a 20-byte trailer (:data:`TRAILER`): magic ``TSR1``, the payload's crc32c,
its length and the crc32c of the object name. An operator who fetches an object sees the block's
bytes first; a reader checks the trailer before it hands out a byte, so a damaged object, a
truncated one, or one stored under another name is a miss and a counted corruption, never wrong
bytes (R1), and the damaged object is removed for every user.

Transfers are Mooncake's zero-copy batch calls, ``batch_put_from`` and ``batch_get_into``, on a
staging buffer registered once with ``register_buffer``: a put copies each payload into it (and
checksums it), a get lands there and is verified before the one copy into the caller's buffer.
The staging buffer bounds one batch; longer batches go in several rounds.

Mooncake keeps an object in the memory segment of the client process that put it (this
process lends ``segment_bytes`` to the pool at setup): when that process exits, its objects are
gone; a restarted master forgets every object. The tier is a shared cache, never the durable
copy. Calls against a dead master fail (``RPC_FAIL``) — a put only after about 4 s — so every
batch first asks the :class:`~tairstore.tiers.remote.health.HealthTracker` and the client's
cheap ``health_check()``; an unhealthy tier answers misses at once and is probed every
``retry_s`` until the master answers again (the client re-mounts its segment by itself).
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np

from tairstore.errors import InvalidArgumentError
from tairstore.format.checksum import crc32c
from tairstore.parallel import split_parts
from tairstore.tiers.remote.base import ChecksumRun, RemoteTier, check_crcs
from tairstore.validate import check_out

__all__ = ["MooncakeTier", "TRAILER", "encode_trailer", "OBJECT_NOT_FOUND", "RPC_FAIL"]

_log = logging.getLogger(__name__)

#: ``magic | payload crc32c u32 | payload length u64 | object-name crc32c u32``, little-endian.
TRAILER = struct.Struct("<4sIQI")
_MAGIC = b"TSR1"

# Mooncake's ErrorCode values the tier tells apart (mooncake-store/include/types.h).
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
RPC_FAIL = -900
#: Codes at or below this (metadata / etcd errors) also mean "the service is not reachable".
_SERVICE_ERRORS = -1000
#: How long opening the tier waits for the setup before answering misses (a live local master
#: answers in about 0.1 s).
_CONNECT_WAIT_S = 5.0
#: The master's metrics: how long a scrape may take, and how long its figures stand.
_METRICS_TIMEOUT_S = 1.0
_CLUSTER_USAGE_MAX_AGE_S = 30.0
_METRIC = re.compile(r"^(master_allocated_bytes|master_total_capacity_bytes)\s+([0-9.eE+]+)\s*$",
                     re.MULTILINE)


def _unreachable(code: int) -> bool:
    return code == RPC_FAIL or code <= _SERVICE_ERRORS


def encode_trailer(name: str, payload: memoryview, crc: int | None = None) -> bytes:
    """The trailer stored after ``payload`` in the object called ``name``."""
    return TRAILER.pack(_MAGIC, crc32c(payload) if crc is None else crc, len(payload),
                        crc32c(name.encode()))


class MooncakeTier(RemoteTier):
    """Blocks in a Mooncake Store cluster (see the module docstring)."""

    kind = "mooncake"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as exc:
            raise InvalidArgumentError(
                f"remote kind 'mooncake' needs the Mooncake wheel (pip install 'tairstore[mooncake]'): {exc}"
            ) from None
        self._factory = MooncakeDistributedStore
        self._lock = threading.Lock()          # one batch at a time owns the staging buffer
        self._staging = np.empty(config["buffer_bytes"], dtype=np.uint8)
        self._staging_ptr = self._staging.ctypes.data
        self._max_payload = config["buffer_bytes"] - TRAILER.size
        self._used = 0
        self._cluster: tuple[int, int, float] | None = None  # (used, capacity, when) of the pool
        self._client = None
        self._connector: threading.Thread | None = None
        self._closed = False
        # (start, end, array) of memory registered through register(); the array keeps it alive.
        self._regions: list[tuple[int, int, np.ndarray]] = []
        # Mooncake's setup against an unreachable master blocks for a long time (about 90 s
        # here), so it runs in the background: the tier answers misses until it is connected.
        self._start_connect()
        self._connector.join(_CONNECT_WAIT_S)
        if self._client is None:
            self.health.failure()

    # -- connection ------------------------------------------------------------------------------

    def _start_connect(self) -> None:
        self._connector = threading.Thread(target=self._connect, name="mooncake-setup", daemon=True)
        self._connector.start()

    def _connect(self) -> bool:
        cfg = self.config
        client = self._factory()
        rc = client.setup(cfg["local_hostname"], cfg["metadata_server"], cfg["segment_bytes"],
                          # Mooncake's own transfer buffer: unused by the *_from/_into calls.
                          16 << 20, cfg["protocol"], cfg["rdma_devices"], cfg["master"])
        if rc != 0:
            _log.warning("mooncake setup against %s failed (%d)", cfg["master"], rc)
            client.close()
            return False
        rc = client.register_buffer(self._staging_ptr, self._staging.nbytes)
        if rc != 0:
            client.close()
            _log.warning("mooncake register_buffer failed (%d)", rc)
            return False
        with self._lock:
            if self._closed:           # closed while this setup ran in the background
                client.close()
                return False
            self._client = client
        return True

    def _ready(self) -> bool:
        """Gate one batch: health tracker first, then (re)connect or the client's own check."""
        if not self.health.allow():
            return False
        if self._client is None:
            # Not connected (yet): this probe starts another setup unless one is running.
            if not self._connector.is_alive():
                self._start_connect()
            self.health.failure()
            return False
        # health_check() is local and cheap; it turns non-zero once the client's ping to the
        # master fails, which spares a put the 4 s RPC timeout.
        if self._client.health_check() != 0:
            self.health.failure()
            return False
        return True

    def _settle(self, codes: Sequence[int]) -> None:
        """Feed the health tracker from one batch's result codes."""
        if any(_unreachable(c) for c in codes):
            self.health.failure()
        else:
            self.health.success()

    def _rounds(self, lengths: Sequence[int]) -> list[range]:
        """Split a batch into rounds whose staged bytes fit the staging buffer."""
        rounds, start, used = [], 0, 0
        for i, n in enumerate(lengths):
            if used + n > self._staging.nbytes and i > start:
                rounds.append(range(start, i))
                start, used = i, 0
            used += n
        if start < len(lengths):
            rounds.append(range(start, len(lengths)))
        return rounds

    def register(self, buffer: Any) -> None:
        """Register memory (e.g. the store's DRAM arena) with Mooncake, so blocks put from it
        leave without a staging copy. The buffer must stay alive while the tier is open.

        Raises:
            InvalidArgumentError: not a writable C-contiguous buffer, or Mooncake refused it.
        """
        arr = np.frombuffer(check_out(buffer), dtype=np.uint8)
        with self._lock:
            if self._client is None or self._client.register_buffer(arr.ctypes.data, arr.nbytes) != 0:
                raise InvalidArgumentError("mooncake tier is not connected, or refused to register the buffer")
            self._regions.append((arr.ctypes.data, arr.ctypes.data + arr.nbytes, arr))

    def _registered_ptr(self, view: memoryview) -> int | None:
        """The address of ``view`` if it lies inside registered memory, else None."""
        if not self._regions or len(view) == 0:
            return None
        start = np.frombuffer(view, dtype=np.uint8).ctypes.data
        for lo, hi, _ in self._regions:
            if lo <= start and start + len(view) <= hi:
                return start
        return None

    # -- the interface ---------------------------------------------------------------------------

    def put(self, namespace: str, keys: Sequence[bytes], blocks: Sequence[Any],
            crcs: Sequence[int] | None = None) -> list[bool]:
        """See :meth:`RemoteTier.put`; a block larger than ``buffer_bytes`` minus the trailer
        raises InvalidArgumentError."""
        keys, views = self._check_put(namespace, keys, blocks)
        known = check_crcs(crcs, len(views))
        for v in views:
            if len(v) > self._max_payload:
                raise InvalidArgumentError(
                    f"block of {len(v)} bytes exceeds the mooncake tier's {self._max_payload} (buffer_bytes)")
        done = [False] * len(keys)
        ptrs = [self._registered_ptr(v) for v in views]
        with self._lock:
            # A registered payload goes out from where it is (zero copy); only its trailer is
            # staged. Any other payload is copied into the staging buffer first.
            staged = [TRAILER.size + (len(v) if p is None else 0) for v, p in zip(views, ptrs)]
            for rnd in self._rounds(staged):
                if not self._ready():
                    break
                names, parts, sizes, trailers, off = [], [], [], [], 0
                run = ChecksumRun()  # block i is checksummed while block i+1 is staged
                try:
                    for i in rnd:
                        name, v = self.object_name(namespace, keys[i]), views[i]
                        if ptrs[i] is None:
                            self._staging[off:off + len(v)] = np.frombuffer(v, dtype=np.uint8)
                            payload_ptr, off = self._staging_ptr + off, off + len(v)
                        else:
                            payload_ptr = ptrs[i]
                        if known is None:
                            run.add(i, v)
                        names.append(name)
                        parts.append([payload_ptr, self._staging_ptr + off])
                        sizes.append([len(v), TRAILER.size])
                        trailers.append((i, name, off))
                        off += TRAILER.size
                finally:
                    got = run.results()
                for i, name, at in trailers:
                    crc = known[i] if known is not None else got[i]
                    self._staging[at:at + TRAILER.size] = np.frombuffer(
                        encode_trailer(name, views[i], crc), dtype=np.uint8)
                codes = self._client.batch_put_from_multi_buffers(names, parts, sizes)
                self._settle(codes)
                for i, code in zip(rnd, codes):
                    done[i] = code == 0 or code == OBJECT_ALREADY_EXISTS
                    if code == 0:
                        self._used += len(views[i])
        self._count_puts(views, done)
        return done

    def get_into(self, namespace: str, keys: Sequence[bytes], outs: Sequence[Any]) -> list[int | None]:
        """See :meth:`RemoteTier.get_into`.

        A buffer inside registered memory (:meth:`register`: the store's DRAM arena) receives
        its payload straight from Mooncake, only the trailer landing in the staging buffer; any
        other buffer gets the object through the staging buffer and one copy. A large batch is
        fetched in two parts on two threads (:func:`~tairstore.parallel.split_parts`), each
        checksumming what it fetched; a block counts as found only once its crc32c matched.
        """
        keys, views = self._check_get(namespace, keys, outs)
        direct = [self._registered_ptr(v) for v in views]
        found, too_small, corrupt, retry = self._read(namespace, keys, views, direct)
        if retry:
            # Mooncake fills a direct read's buffers only if they add up to the object exactly:
            # a buffer longer than its block is read again through the staging buffer.
            again, small, bad, _ = self._read(namespace, [keys[i] for i in retry],
                                              [views[i] for i in retry], [None] * len(retry))
            for i, n in zip(retry, again):
                found[i] = n
            too_small += small
            corrupt += bad
        self._count_reads(found, corrupt)
        if too_small:
            raise InvalidArgumentError(
                f"output buffer too small for remote block(s) {[k.hex() for k in too_small][:4]}")
        return found

    def _read(self, namespace: str, keys: list[bytes], views: list[memoryview],
              direct: list[int | None]) -> tuple[list[int | None], list[bytes], int, list[int]]:
        """One pass of :meth:`get_into`: found lengths, keys whose buffer is too small, damaged
        objects (removed), and the direct reads to retry through the staging buffer."""
        found: list[int | None] = [None] * len(keys)
        too_small: list[bytes] = []
        damaged: list[str] = []
        retry: list[int] = []
        cap = self._staging.nbytes
        with self._lock:
            staged = [TRAILER.size if direct[i] is not None else min(len(v) + TRAILER.size, cap)
                      for i, v in enumerate(views)]
            for rnd in self._rounds(staged):
                if not self._ready():
                    break
                items, off = [], 0  # (index, object name, buffers, sizes, offset in staging)
                for i in rnd:
                    if direct[i] is not None:  # payload in place, trailer staged
                        bufs, lens = [direct[i], self._staging_ptr + off], [len(views[i]), TRAILER.size]
                    else:
                        bufs, lens = [self._staging_ptr + off], [staged[i]]
                    items.append((i, self.object_name(namespace, keys[i]), bufs, lens, off))
                    off += staged[i]

                def fetch(part: list) -> list[tuple[int, str, int, str, int]]:
                    # One thread's share of the round: fetch its objects, then check each
                    # payload while it is still in this core's cache.
                    names = [it[1] for it in part]
                    if any(direct[it[0]] is not None for it in part):
                        codes = self._client.batch_get_into_multi_buffers(
                            names, [it[2] for it in part], [it[3] for it in part])
                    else:
                        codes = self._client.batch_get_into(
                            names, [it[2][0] for it in part], [it[3][0] for it in part])
                    return [(it[0], it[1], code, *self._check(it[0], it[1], it[4], code, views, direct))
                            for it, code in zip(part, codes)]

                # The round in two parts (by bytes) on two threads: both fetch and checksum
                # side by side.
                results = split_parts(lambda lo, hi: fetch(items[lo:hi]), [sum(it[3]) for it in items])
                self._settle([code for _, _, code, _, _ in results])
                for i, name, _, outcome, n in results:
                    if outcome == "found":
                        found[i] = n
                    elif outcome == "retry":
                        retry.append(i)
                    elif outcome == "small":
                        too_small.append(keys[i])
                    elif outcome == "damaged":
                        damaged.append(name)
            if damaged and self._client is not None:
                self._client.batch_remove(damaged, True)
        return found, too_small, len(damaged), retry

    def _check(self, i: int, name: str, start: int, code: int, views: list[memoryview],
               direct: list[int | None]) -> tuple[str, int]:
        """What one fetched object is: ``("found", length)`` once its payload is in ``views[i]``
        and its crc32c matched, else ``("missing" | "retry" | "small" | "damaged", 0)``."""
        if code < 0:
            if code == OBJECT_NOT_FOUND or _unreachable(code):
                return "missing", 0
            # A direct read retries through the staging buffer; a staged one failed because the
            # object is larger than the buffer offered for it.
            return ("retry" if direct[i] is not None else "small"), 0
        if direct[i] is not None:
            n, crc = self._trailer(name, self._direct_trailer(views[i], start, code), code)
        else:
            n, crc = self._trailer(name, self._staging[start + code - TRAILER.size:start + code], code)
        if n is None:
            return "damaged", 0
        if n > len(views[i]):
            return "small", 0
        if direct[i] is not None:
            payload = views[i][:n]
        else:
            views[i][:n] = self._staging[start:start + n].data
            payload = views[i][:n]
        if crc32c(payload) != crc:
            _log.warning("remote object %s failed its checksum; dropped", name)
            return "damaged", 0
        return "found", n

    def _direct_trailer(self, view: memoryview, start: int, total: int) -> bytes:
        """The last ``TRAILER.size`` bytes of an object of ``total`` bytes read into ``view``
        then the staging buffer at ``start`` (a payload shorter than ``view`` leaves its
        trailer, or part of it, inside ``view``)."""
        inside = len(view)
        lo = max(total - TRAILER.size, 0)
        head = bytes(view[lo:min(total, inside)]) if lo < inside else b""
        spill = total - inside
        if spill <= 0:
            return head
        return head + bytes(self._staging[start + max(lo - inside, 0):start + spill])

    @staticmethod
    def _trailer(name: str, trailer: Any, total: int) -> tuple[int | None, int]:
        """The payload length and crc32c that ``trailer`` (the last ``TRAILER.size`` bytes of an
        object of ``total`` bytes) gives; ``(None, 0)`` if the trailer is damaged (the payload's
        crc is checked by the caller)."""
        if total < TRAILER.size:
            _log.warning("remote object %s: %d bytes, shorter than its trailer", name, total)
            return None, 0
        n = total - TRAILER.size
        magic, crc, length, name_crc = TRAILER.unpack(bytes(trailer))
        if magic != _MAGIC or length != n or name_crc != crc32c(name.encode()):
            _log.warning("remote object %s failed its checksum; dropped", name)
            return None, 0
        return n, crc

    def sizes(self, namespace: str, keys: Sequence[bytes]) -> list[int | None]:
        """See :meth:`RemoteTier.sizes`."""
        keys = self._check_keys(namespace, keys)
        out: list[int | None] = [None] * len(keys)
        with self._lock:
            if not self._ready():
                return out
            codes = [self._client.get_size(self.object_name(namespace, k)) for k in keys]
        self._settle(codes)
        return [c - TRAILER.size if c >= TRAILER.size else None for c in codes]

    def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        """See :meth:`RemoteTier.delete`; removes despite Mooncake's put lease (force)."""
        keys = self._check_keys(namespace, keys)
        with self._lock:
            if not self._ready():
                return 0
            codes = self._client.batch_remove([self.object_name(namespace, k) for k in keys], True)
        self._settle(codes)
        removed = sum(1 for c in codes if c == 0)
        self._count(deletes=removed)
        return removed

    def usage(self) -> dict[str, int]:
        """With ``metrics_url``: the whole pool as the master last reported it
        (``scope: "cluster"``); else (or before the first report) ``used_bytes`` is what this
        process put and ``capacity_bytes`` the segment it lends (``scope: "local"``). Never
        calls the master: :meth:`refresh_usage` does, from the maintenance pass."""
        cluster = self._cluster
        if cluster is not None and time.monotonic() - cluster[2] <= _CLUSTER_USAGE_MAX_AGE_S:
            return {"used_bytes": cluster[0], "capacity_bytes": cluster[1], "scope": "cluster"}
        return {"used_bytes": self._used, "capacity_bytes": self.config["segment_bytes"],
                "scope": "local"}

    def refresh_usage(self) -> bool:
        """Read the pool's usage from the master's metrics (``metrics_url``); False when not
        configured or not answering (the last figure ages out, and usage falls back to local)."""
        url = self.config.get("metrics_url")
        if not url:
            return False
        try:
            with urllib.request.urlopen(url, timeout=_METRICS_TIMEOUT_S) as r:
                text = r.read(1 << 20).decode("utf-8", "replace")
        except (OSError, ValueError) as exc:
            _log.debug("mooncake master metrics at %s: %s", url, exc)
            return False
        found = dict(_METRIC.findall(text))
        try:
            used = int(float(found["master_allocated_bytes"]))
            cap = int(float(found["master_total_capacity_bytes"]))
        except (KeyError, ValueError):
            _log.warning("mooncake master metrics at %s lack the pool's usage", url)
            return False
        self._cluster = (used, cap, time.monotonic())
        return True

    def close(self) -> None:
        """Leave the cluster: this process's segment, and the objects in it, go away."""
        # A setup still running in the background finishes on its own and sees _closed.
        with self._lock:
            self._closed = True
            if self._client is not None:
                self._client.close()
                self._client = None
