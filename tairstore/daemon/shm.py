"""Shared-memory reads for clients on the same host: the arena is lent, not copied.

Theory of operation
-------------------
When the daemon's DRAM arena is a shared file (:class:`tairstore.tiers.dram.SharedBacking`),
a client on the same host maps that file read-only (SHM_HELLO tells it the path) and reads
blocks in place:

- GET_SHM answers, per key, the block's slot: ``(offset, size, generation)``. The daemon keeps
  the block's pinned view (``Store.get_pinned``) in the connection's :class:`LeaseTable`, keyed
  by ``(offset, generation)``: while a lease is held, eviction, deletion, overwrite and
  compaction may drop the *block*, but its slot is never reused (invariant R2), so the bytes
  the client reads never change under it.
- A lease ends when the client gives it back (RELEASE, or the ``rel_o``/``rel_g`` fields of its
  next GET_SHM), when its connection closes (a killed client's leases go with its socket), or
  ``lease_s`` after it was granted (a client that stops answering cannot hold memory forever;
  reading a view past its lease is the client's error, see docs/PROTOCOL.md).
- Every handle given back is checked against the table: an offset/generation pair that is not
  a live lease of *this* connection (forged, already released, expired, another connection's)
  is refused with InvalidArgumentError and nothing is released, so a client can never make the
  daemon unpin a slot someone else still reads.

Local puts (SHM_STAGE, PUT_SHM): a client may ask for a *staging file* of its own (created in
the arena's directory, owner-only, mapped by the daemon and by that client only; it is unlinked
as soon as the client has mapped it, i.e. at the connection's next request, and unmapped when
the connection closes). The client copies blocks into it and PUT_SHM names them by
``(offset, size)``; the daemon checks each range lies inside the file and stores them as a PUT
of those bytes (one copy, into the arena), so the socket carries no payload. The client must
not touch a staged range until PUT_SHM is answered.

Isolation: a client that maps an arena file can read every byte of it, whatever namespace it
was given offsets for. With DRAM partitions (``StoreConfig.dram_partitions``) the arena is one
file per partition, each holding its namespaces' blocks only. When auth is on (isolation is
then always on), a token may map a partition's file only if it covers every namespace of that
partition (the default partition holds every other namespace, so only tokens that cover all
namespaces, ``auth.check(token, "*")``, map it): SHM_HELLO names just those files, and GET_SHM
for a namespace whose partition the token may not map is refused (PermissionDenied), its
client reading over the socket instead. Which processes can open a file at all is its mode:
owner-only ``0600`` by default, ``0640`` with its partition's (or ``[shm]``'s) group.
"""

from __future__ import annotations

import time
from typing import Any

from tairstore.config import dram_partition_index
from tairstore.errors import CapacityError, InvalidArgumentError, PermissionDeniedError

__all__ = ["LeaseTable", "ShmService", "Staging", "DEFAULT_LEASE_S", "MAX_LEASES", "NOT_IN_DRAM", "MISS",
           "partitions_from_tokens"]

#: Seconds a lease lasts unless given back first.
DEFAULT_LEASE_S = 60.0
#: Leases one connection may hold at once (each pins a slot: bounded, like write sessions).
MAX_LEASES = 1 << 16
#: GET_SHM sizes for keys with no slot to lend.
MISS = -1
NOT_IN_DRAM = -2


def partitions_from_tokens(tokens: Any, quotas: dict, dram_bytes: int, granule: int = 4096) -> dict | None:
    """The DRAM partitions a daemon with ``[shm]`` and ``[[tokens]]`` derives when none are
    configured (``[shm] partitions = "auto"``), so that isolation is the default with auth.

    Each token limited to some namespaces (not ``"*"``, not admin) asks for its namespaces to
    share a partition; lists that overlap are merged (a token then maps the merged partition
    only if it covers all of it). A partition is as large as the sum of its namespaces' DRAM
    quotas (``[namespaces.NAME] tier_bytes.dram``) when each has one; the others, and the
    default partition (every other namespace), share the rest equally. None when no token is
    limited.

    Raises:
        InvalidArgumentError: the quotas leave the partitions or the default one no room.
    """
    groups: list[set[str]] = []
    for spec in tokens:
        if spec.is_admin or spec.namespaces == "*":
            continue
        names = set(spec.namespaces)
        touching = [g for g in groups if g & names]
        for g in touching:
            names |= g
            groups.remove(g)
        groups.append(names)
    if not groups:
        return None
    groups.sort(key=lambda g: sorted(g))

    def quota(ns: str) -> int | None:
        q = quotas.get(ns)
        return None if q is None else q.tier_bytes.get("dram")

    sized = {i: sum(quota(ns) for ns in g) for i, g in enumerate(groups)
             if all(quota(ns) is not None for ns in g)}
    rest = dram_bytes - sum(sized.values())
    share = rest // (len(groups) - len(sized) + 1) // granule * granule
    out = {}
    for i, g in enumerate(groups):
        nbytes = sized.get(i, share) // granule * granule
        if nbytes < granule or share < granule:
            raise InvalidArgumentError(
                f"cannot give the namespaces of the limited tokens DRAM partitions of their own in "
                f"dram_bytes={dram_bytes} (their DRAM quotas leave no room): configure "
                "[store.dram_partitions] or set [shm] partitions = \"none\"")
        out[f"tokens-{i + 1}"] = {"bytes": nbytes, "namespaces": sorted(g)}
    return out


class LeaseTable:
    """One connection's leases: ``(offset, generation) -> [pinned view, count, deadline]``.

    A key leased twice shares one entry (one pin) with a count, so each grant needs its own
    release. Entries are kept in grant order (a re-grant moves one to the end), so expired
    ones are found from the front.
    """

    def __init__(self, lease_s: float = DEFAULT_LEASE_S, max_leases: int = MAX_LEASES) -> None:
        self.lease_s = lease_s
        self.max_leases = max_leases
        self._leases: dict[tuple[int, int], list] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def add(self, slot: Any, view: memoryview, now: float) -> None:
        """Hold ``view`` (which pins ``slot``) for one more grant."""
        handle = (slot.offset, slot.generation)
        entry = self._leases.pop(handle, None)
        if entry is not None:
            view.release()  # the entry's own view pins the slot already
            entry[1] += 1
            entry[2] = now + self.lease_s
        else:
            if len(self._leases) >= self.max_leases:
                view.release()
                raise CapacityError(f"this connection holds {self.max_leases} shared-memory leases; "
                                    "release some first", dimension="leases")
            entry = [view, 1, now + self.lease_s]
        self._leases[handle] = entry

    def release(self, offsets: list[int], generations: list[int]) -> int:
        """Give back one grant per pair; all or nothing. Returns the number given back.

        Raises:
            InvalidArgumentError: the lists differ in length, or a pair is not a live lease of
                this connection (forged, stale, expired or released more often than granted).
        """
        if len(offsets) != len(generations):
            raise InvalidArgumentError("rel_o and rel_g must have the same length")
        wanted: dict[tuple[int, int], int] = {}
        for handle in zip(offsets, generations):
            wanted[handle] = wanted.get(handle, 0) + 1
        for handle, n in wanted.items():
            entry = self._leases.get(handle)
            if entry is None or entry[1] < n:
                raise InvalidArgumentError(
                    f"offset {handle[0]} generation {handle[1]} is not a lease held by this "
                    "connection (forged, already released, or expired)")
        for handle, n in wanted.items():
            entry = self._leases[handle]
            entry[1] -= n
            if entry[1] == 0:
                del self._leases[handle]
                entry[0].release()
        return len(offsets)

    def expire(self, now: float) -> int:
        """Drop every lease past its deadline; returns how many slots were unpinned."""
        expired = 0
        while self._leases:
            handle, entry = next(iter(self._leases.items()))
            if entry[2] > now:
                break  # grant order is deadline order: O(expired), not O(leases)
            del self._leases[handle]
            entry[0].release()
            expired += 1
        return expired

    def close(self) -> int:
        """Release everything (the connection is gone); returns how many slots were unpinned."""
        leases, self._leases = self._leases, {}
        for entry in leases.values():
            entry[0].release()
        return len(leases)


class Staging:
    """One connection's staging file, mapped read-write by the daemon and that client."""

    def __init__(self, directory: str, size: int, group: Any = None) -> None:
        from tairstore.tiers.dram import SharedBacking

        self._file = SharedBacking(directory, group)
        self.buf = self._file.map(size)
        self.path, self.size = self._file.path, size

    def unlink(self) -> None:
        """Remove the file's name (the client has mapped it; the mappings stay)."""
        self._file.unlink()

    def blocks(self, offsets: list[int], sizes: list[int]) -> list[memoryview]:
        """The staged blocks as views, each range checked to lie inside the file."""
        if len(offsets) != len(sizes):
            raise InvalidArgumentError("offs and sizes must have the same length")
        out = []
        for off, n in zip(offsets, sizes):
            if off < 0 or n < 0 or off + n > self.size:
                raise InvalidArgumentError(f"staged range {off}+{n} is outside the {self.size}-byte staging file")
            out.append(memoryview(self.buf[off:off + n]))
        return out


class ShmService:
    """The daemon's side of the shared-memory ops, over one store and its shared backing.

    Args:
        store: the open store (``get_pinned`` is the only call it makes).
        backing: the arena's :class:`~tairstore.tiers.dram.SharedBacking`, or None when the
            arena is private (then SHM_HELLO answers an empty path and GET_SHM is refused).
        auth: the daemon's Authenticator, or None.
        lease_s: how long a lease lasts unless given back.
    """

    def __init__(self, store: Any, backing: Any, auth: Any = None, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.store = store
        backings = list(backing) if isinstance(backing, (list, tuple)) else [backing]
        self.backings = backings if backings[0] is not None and getattr(backings[0], "path", "") else []
        self.backing = self.backings[0] if self.backings else None
        self.auth = auth
        self.lease_s = lease_s
        parts = getattr(getattr(store, "config", None), "dram_partitions", None) or {}
        #: Per partition, the namespaces it holds (None: the default one, every other namespace).
        self.part_namespaces: list[list[str] | None] = [None] + [p["namespaces"] for p in parts.values()]
        self.part_names = ["default", *parts]
        self._part_of = dram_partition_index(parts)

    def may_map(self, token: str | None, part: int) -> bool:
        """Whether ``token`` may read partition ``part``'s file: it covers all its namespaces."""
        if self.auth is None or not self.auth.enabled:
            return True
        try:
            for ns in self.part_namespaces[part] or ["*"]:
                self.auth.check(token, ns)
        except PermissionDeniedError:
            return False
        return True

    def _mappable(self, token: str | None) -> list[int]:
        """The partitions ``token`` may map; PermissionDenied when there is none."""
        parts = [i for i in range(len(self.backings)) if self.may_map(token, i)]
        if not parts:
            raise PermissionDeniedError(
                "shared memory is offered only to tokens that cover every namespace of a DRAM "
                "partition (this one covers none: read over the socket instead)")
        return parts

    def hello(self, token: str | None) -> dict:
        """SHM_HELLO's answer: where the arena files this token may map are (``parts``: path,
        file size, shift, capacity, arena offset ``base`` and ``namespaces`` (``["*"]``: every
        namespace of no other partition) of each; the default partition's, when the token may
        map it, also at the top level, else an empty path there), or an empty path and no parts
        when there is no shared arena."""
        if self.backing is None:
            return {"path": "", "size": 0, "shift": 0, "cap": 0, "base": 0, "parts": []}
        parts = [{"path": b.path, "size": b.mapped_bytes, "shift": b.shift, "cap": b.capacity,
                  "base": b.base, "name": self.part_names[i],
                  "namespaces": self.part_namespaces[i] or ["*"]}
                 for i, b in ((i, self.backings[i]) for i in self._mappable(token))]
        # The top level is what a client that predates ``parts`` reads: it indexes that file
        # by arena offset, so it may name only a file whose arena offset is 0 (the default
        # partition's); else it names none, and such a client reads over the socket.
        top = parts[0] if parts[0]["base"] == 0 else {"path": "", "size": 0, "shift": 0, "cap": 0, "base": 0}
        return {**{k: top[k] for k in ("path", "size", "shift", "cap", "base")}, "parts": parts}

    def get(self, leases: LeaseTable, token: str | None, fields: dict) -> dict:
        """GET_SHM: give back ``rel_o``/``rel_g`` first, then lease each key's slot."""
        if self.backing is None:
            raise InvalidArgumentError("this daemon's arena is not in shared memory")
        ns = fields.get("ns", "default")
        part = self._part_of.get(ns, 0)
        if not self.may_map(token, part):
            raise PermissionDeniedError(
                f"namespace {ns!r} is in DRAM partition {self.part_names[part]!r}, whose memory "
                "this token may not map (it must cover every namespace of the partition): read "
                "over the socket instead")
        now = time.monotonic()
        leases.expire(now)
        if "rel_o" in fields or "rel_g" in fields:
            leases.release(fields.get("rel_o", []), fields.get("rel_g", []))
        sizes: list[int] = []
        offs: list[int] = []
        gens: list[int] = []
        try:
            for key in fields["keys"]:
                found = self.store.get_pinned(key, namespace=ns)
                if found is None:
                    # Tell a miss from a block that is only on SSD (the client GETs that one).
                    stored = self.store.exists([key], namespace=ns)[0]
                    sizes.append(NOT_IN_DRAM if stored else MISS)
                    offs.append(0)
                    gens.append(0)
                    continue
                view, slot = found
                leases.add(slot, view, now)
                sizes.append(slot.size)
                offs.append(slot.offset)
                gens.append(slot.generation)
        except BaseException:
            # The client gets an error, not these handles: take back what was granted.
            granted = [(o, g) for s, o, g in zip(sizes, offs, gens) if s >= 0]
            leases.release([o for o, _ in granted], [g for _, g in granted])
            raise
        return {"sizes": sizes, "offs": offs, "gens": gens}

    def stage(self, size: int, max_bytes: int, token: str | None = None) -> Staging:
        """SHM_STAGE: a staging file of ``size`` bytes (at most ``max_bytes``, a frame's limit),
        with the group of the first partition ``token`` may map."""
        if self.backing is None:
            raise InvalidArgumentError("this daemon's arena is not in shared memory")
        if not 0 < size <= max_bytes:
            raise InvalidArgumentError(f"a staging file holds 1 to {max_bytes} bytes, not {size}")
        b = self.backings[self._mappable(token)[0]]
        return Staging(b.directory, size, b.group)

    def release(self, leases: LeaseTable, fields: dict) -> dict:
        """RELEASE: give leases back (all or nothing, see :meth:`LeaseTable.release`)."""
        leases.expire(time.monotonic())
        return {"count": leases.release(fields["rel_o"], fields["rel_g"])}
