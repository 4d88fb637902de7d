"""The interface every remote tier offers the store, and what all of them share.

A remote tier is a **shared cache**: several stores (processes, daemons, machines) configured
with the same remote and namespace see each other's blocks; none of them may treat it as the
durable copy. Its contract:

- every call is batched and answers per key; no call raises because the remote is down or a
  block is damaged — an unreachable remote makes every key a miss (or a put that did not
  happen) and marks the tier unhealthy (:mod:`~tairstore.tiers.remote.health`);
- a block read back is verified with its crc32c before a byte of it is returned: a mismatch is
  a miss, counted in ``corruptions``, and the damaged block is removed (invariant R1);
- blocks are immutable by key: putting a key that already exists keeps the existing block;
- argument errors (bad key, namespace, buffer, a block too large for the tier) raise
  :class:`~tairstore.errors.InvalidArgumentError`.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from typing import Any

from tairstore.errors import InvalidArgumentError
from tairstore.format.checksum import crc32c
from tairstore.parallel import helper_pool
from tairstore.tiers.remote.health import HealthTracker
from tairstore.validate import check_data, check_keys, check_namespace, check_out

__all__ = ["RemoteTier", "ChecksumRun", "check_crcs"]

_COUNTERS = ("puts", "put_bytes", "put_failures", "hits", "hit_bytes", "misses", "corruptions",
             "deletes")


#: Bytes of buffers checksummed per task on the helper thread: large enough that the hand-off
#: (a few µs) is small beside the crc32c it carries, small enough to overlap the next I/O.
CRC_GROUP_BYTES = 1 << 20


def _crc_group(group: list[tuple[Hashable, memoryview]]) -> list[tuple[Hashable, int]]:
    return [(tag, crc32c(view)) for tag, view in group]


class ChecksumRun:
    """crc32c of a batch's buffers on a helper thread while the caller does the next I/O.

    ``add(tag, view)`` queues a buffer the caller has finished filling (or is about to send);
    :meth:`results` waits and returns ``{tag: crc32c}``. crc32c releases the GIL, so on two
    cores reading block i+1 and checksumming block i overlap. Buffers are grouped into tasks
    of about :data:`CRC_GROUP_BYTES`. The caller keeps every view alive and unchanged until
    :meth:`results` returns (it always calls it, also on an error path).
    """

    __slots__ = ("_group", "_bytes", "_futures")

    def __init__(self) -> None:
        self._group: list[tuple[Hashable, memoryview]] = []
        self._bytes = 0
        self._futures: list[Future] = []

    def add(self, tag: Hashable, view: memoryview) -> None:
        self._group.append((tag, view))
        self._bytes += len(view)
        if self._bytes >= CRC_GROUP_BYTES:
            self._submit()

    def _submit(self) -> None:
        if self._group:
            self._futures.append(helper_pool().submit(_crc_group, self._group))
            self._group, self._bytes = [], 0

    def results(self) -> dict[Hashable, int]:
        """Every queued buffer's crc32c (waits for the helper thread)."""
        if not self._futures:  # one small group: not worth a hand-off
            out = dict(_crc_group(self._group))
            self._group, self._bytes = [], 0
            return out
        self._submit()
        out: dict[Hashable, int] = {}
        for f in self._futures:
            out.update(f.result())
        self._futures = []
        return out


def check_crcs(crcs: Sequence[Any] | None, n: int) -> list[int] | None:
    """Checksums a caller already knows for a put (the store's demotion does): one crc32c per
    block, ints in 0..2**32-1; None when not given.

    Raises:
        InvalidArgumentError: not one per block, or not such an int.
    """
    if crcs is None:
        return None
    crcs = list(crcs)
    if len(crcs) != n:
        raise InvalidArgumentError(f"{n} blocks but {len(crcs)} checksums")
    for c in crcs:
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= 0xFFFFFFFF:
            raise InvalidArgumentError(f"a crc32c is an int in 0..2**32-1, got {c!r}")
    return crcs


class RemoteTier(abc.ABC):
    """Batched put / get_into / sizes / exists / delete on a shared remote store."""

    #: ``"mooncake"`` or ``"hf3fs"``.
    kind: str = ""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.health = HealthTracker(retry_s=config["retry_s"], failure_threshold=config["failure_threshold"])
        self._prefix = config["prefix"]
        self._counter_lock = threading.Lock()
        self._counters = dict.fromkeys(_COUNTERS, 0)

    # -- the interface -------------------------------------------------------------------------

    @abc.abstractmethod
    def put(self, namespace: str, keys: Sequence[bytes], blocks: Sequence[Any],
            crcs: Sequence[int] | None = None) -> list[bool]:
        """Store each block under ``(namespace, key)``; True where the remote holds it now
        (also when it already did), False where it could not (unreachable, full).

        ``crcs``: each block's crc32c when the caller already verified it (the store's
        demotion reads blocks back from SSD with their checksum); computed here otherwise. A
        wrong one makes the block a counted corruption on read, never wrong bytes.
        """

    @abc.abstractmethod
    def get_into(self, namespace: str, keys: Sequence[bytes], outs: Sequence[Any]) -> list[int | None]:
        """Copy each verified block into its buffer; its length, or None for a miss.

        Raises:
            InvalidArgumentError: a buffer is smaller than the block found for its key.
        """

    @abc.abstractmethod
    def sizes(self, namespace: str, keys: Sequence[bytes]) -> list[int | None]:
        """Each block's payload length, None where the remote has no such block."""

    @abc.abstractmethod
    def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        """Remove the blocks; the number removed."""

    @abc.abstractmethod
    def usage(self) -> dict[str, int]:
        """``{"used_bytes": ..., "capacity_bytes": ...}`` as far as this process can tell."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection and files; the remote's blocks stay for the other users."""

    # -- shared ----------------------------------------------------------------------------------

    def exists(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        """Whether the remote holds each block."""
        return [s is not None for s in self.sizes(namespace, keys)]

    def probe(self) -> bool:
        """While unhealthy and a retry is due, make one cheap call to the remote (its answer
        feeds the health tracker); returns whether the tier is healthy now. Costs nothing
        while healthy. The store's maintenance pass calls it, off the request path."""
        if self.health.probe_due():
            self._probe()
        return self.health.healthy

    def refresh_usage(self) -> bool:
        """Refresh what :meth:`usage` reports from the remote (maintenance pass, off the
        request path); False where the tier has nothing to refresh."""
        return False

    def _probe(self) -> None:
        """One cheap call through the health gate (default: the size of an absent block)."""
        self.sizes("tairstore-probe", [b"probe"])

    def usage_ratio(self) -> float:
        """Used bytes over capacity (0.0 when the capacity is unknown or unlimited)."""
        u = self.usage()
        cap = u.get("capacity_bytes") or 0
        return u.get("used_bytes", 0) / cap if cap > 0 else 0.0

    @property
    def healthy(self) -> bool:
        """False while the tier is skipped after failures (see :class:`HealthTracker`)."""
        return self.health.healthy

    def stats(self) -> dict[str, Any]:
        """The tier for ``stats()["tiers"]["remote"]``: kind, health, usage and counters."""
        with self._counter_lock:
            counters = dict(self._counters)
        return {"kind": self.kind, **self.health.as_dict(), **self.usage(), **counters}

    def _count(self, **deltas: int) -> None:
        with self._counter_lock:
            for name, delta in deltas.items():
                self._counters[name] += delta

    def object_name(self, namespace: str, key: bytes) -> str:
        """The remote's name for a block: prefix, namespace, hex key (readable by operators)."""
        return f"{self._prefix}{namespace}/{key.hex()}"

    @staticmethod
    def _check_keys(namespace: str, keys: Sequence[bytes]) -> list[bytes]:
        check_namespace(namespace)
        return check_keys(keys)

    @staticmethod
    def _check_put(namespace: str, keys: Sequence[bytes], blocks: Sequence[Any]) -> tuple[list[bytes], list[memoryview]]:
        return RemoteTier._check_batch(namespace, keys, blocks, check_data, "blocks")

    @staticmethod
    def _check_get(namespace: str, keys: Sequence[bytes], outs: Sequence[Any]) -> tuple[list[bytes], list[memoryview]]:
        return RemoteTier._check_batch(namespace, keys, outs, check_out, "output buffers")

    @staticmethod
    def _check_batch(namespace: str, keys: Sequence[bytes], buffers: Sequence[Any],
                     check: Any, what: str) -> tuple[list[bytes], list[memoryview]]:
        keys = RemoteTier._check_keys(namespace, keys)
        views = [check(b) for b in buffers]
        if len(views) != len(keys):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(views)} {what}")
        return keys, views

    def _count_puts(self, views: Sequence[memoryview], done: Sequence[bool]) -> None:
        ok = sum(done)
        self._count(puts=ok, put_bytes=sum(len(v) for v, d in zip(views, done) if d),
                    put_failures=len(done) - ok)

    def _count_reads(self, found: Sequence[int | None], corruptions: int) -> None:
        hits = [n for n in found if n is not None]
        self._count(hits=len(hits), hit_bytes=sum(hits), misses=len(found) - len(hits),
                    corruptions=corruptions)
