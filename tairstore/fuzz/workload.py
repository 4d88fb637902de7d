"""Seeded mixed workloads and the one function that runs an operation against a store.

A workload is a list of small tuples (data, so a failing run prints it and a replay rebuilds it
from the seed): puts, write sessions (committed whole, committed in part, aborted), deletes,
reads, ``store.sync()`` and compactions. :func:`apply_op` runs one of them and reports to a
:class:`Hooks` object *before* it starts (``begin``: which keys it may change to what) and
*after* it returned (``ack``). The in-process harnesses feed those calls straight into an
:class:`~tairstore.fuzz.model.Expected`; the kill -9 writer prints them down a pipe.

Two namespaces: ``"default"`` never evicts (the store is roomy for it), so every acknowledged
block there must survive; ``"q"`` has a quota smaller than what the workload writes into it, so
it evicts its own blocks (and compaction has dead space to reclaim), and C1 is checked on it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from tairstore.errors import CapacityError
from tairstore.fuzz.model import MAX_BLOCK, Expected, content, identify

__all__ = [
    "Hooks", "ModelHooks", "Op", "generate", "fixed_workload", "apply_op", "key_name",
    "NAMESPACES", "QUOTA_NS", "QUOTA_BYTES", "QUOTA_TIER_BYTES", "store_options",
    "SSD_BYTES", "EVICTING_SSD_BYTES",
]

#: The namespace that never evicts and the one whose quota makes it evict.
NAMESPACES = ("default", "q")
QUOTA_NS = "q"
#: Smaller than the q keys' blocks together (8 keys x up to 12 KiB), so q evicts its own blocks.
QUOTA_BYTES = 48 << 10
#: Per-tier limits of ``"q"`` (the kill loop and the stateful model set them): below the total,
#: so C1 is checked per (namespace, tier) too, and still above the largest block (12 KiB).
QUOTA_TIER_BYTES = {"dram": 16 << 10, "ssd": 40 << 10}
#: Keys per namespace: few, so overwrites (delete + put) and collisions with in-flight ops happen.
KEYS_PER_NS = 8

#: The SSD tier of the store under test: roomy for the default namespace (see store_options).
SSD_BYTES = 2 << 20
#: An SSD tier two minimum-size segments large: smaller than what the workload keeps live
#: (2 x 8 keys of up to 12 KiB plus dead records), so the store evicts blocks of every namespace
#: all the time. The kill loop's evicting campaigns use it.
EVICTING_SSD_BYTES = 128 << 10

Op = tuple


def key_name(i: int) -> bytes:
    """The i-th key of a namespace's key space."""
    return b"k%03d" % i


def store_options(durability: str = "sync", ssd_bytes: int = SSD_BYTES) -> dict:
    """Options of the store under test: small files so segments and WAL files roll often.

    ``ssd_bytes`` of 2 MiB (the default) makes 64 KiB segments (the store's minimum); the
    default namespace holds at most 8 x 12 KiB, far below it, so it never evicts.
    ``EVICTING_SSD_BYTES`` makes every namespace evict. ``"writeback"`` is ``"batch"`` with
    ``write_back=True`` (its crash model is batch's: what was acknowledged since the last sync
    may be lost, never torn).
    """
    write_back = durability == "writeback"
    return dict(dram_bytes=64 << 10, ssd_bytes=ssd_bytes,
                durability="batch" if write_back else durability, write_back=write_back,
                wal_file_bytes=4096, batch_interval_ms=2.0, maintenance_interval_s=0.02)


class Hooks(Protocol):
    """Receives what :func:`apply_op` is about to do and did."""

    def begin(self, changes: list[tuple[str, bytes, int | None]]) -> None: ...
    def ack(self, changes: list[tuple[str, bytes, int | None]]) -> None: ...
    def failed(self, reason: str) -> None: ...
    def synced(self) -> None: ...
    def bad_read(self, message: str) -> None: ...
    def served(self, ns: str, key: bytes, version: int) -> None: ...


@dataclass
class ModelHooks:
    """Hooks that update an :class:`Expected` directly (the in-process harnesses)."""

    model: Expected
    bad: list

    def begin(self, changes):
        self.model.begin(changes)

    def ack(self, changes):
        self.model.ack(changes)

    def failed(self, reason):
        self.model.settle()

    def synced(self):
        self.model.synced()

    def bad_read(self, message):
        self.bad.append(message)

    def served(self, ns, key, version):
        # The in-process harnesses judge versions against the model after each crash
        # (check_store); while the store runs, the version is not checked here.
        pass


def generate(rng: random.Random, n_ops: int, first_version: int,
             present: dict[str, set[bytes]] | None = None) -> list[Op]:
    """A random workload of ``n_ops`` operations whose versions start at ``first_version``.

    ``present`` is which keys each namespace holds at the start (none if not given).

    The generator tracks which keys it believes present so that puts and sessions target
    absent keys and deletes present ones; eviction in ``"q"`` can make a believed-present key
    absent, which only turns a later delete into a no-op.
    """
    present = {ns: set((present or {}).get(ns, ())) for ns in NAMESPACES}
    version = first_version
    ops: list[Op] = []
    for _ in range(n_ops):
        ns = rng.choice(NAMESPACES)
        keys = [key_name(i) for i in range(KEYS_PER_NS)]
        absent = [k for k in keys if k not in present[ns]]
        r = rng.random()
        if r < 0.35 and absent:
            k = rng.choice(absent)
            ops.append(("put", ns, k, version))
            version += 1
            present[ns].add(k)
        elif r < 0.55 and absent:
            ks = rng.sample(absent, rng.randint(1, min(3, len(absent))))
            items = []
            for k in ks:
                items.append((k, version))
                version += 1
            mode = rng.choice(("commit", "commit", "partial", "abort"))
            ok = [k for k, _ in items] if mode == "commit" else (
                [k for k, _ in items if rng.random() < 0.5] if mode == "partial" else [])
            ops.append(("session", ns, tuple(items), tuple(ok), mode))
            present[ns].update(ok)
        elif r < 0.75 and present[ns]:
            ks = rng.sample(sorted(present[ns]), rng.randint(1, min(2, len(present[ns]))))
            ops.append(("delete", ns, tuple(ks)))
            present[ns].difference_update(ks)
        elif r < 0.88:
            ops.append(("get", ns, rng.choice(keys)))
        elif r < 0.94:
            ops.append(("sync",))
        else:
            ops.append(("compact", rng.random() < 0.5))
    return ops


def fixed_workload() -> list[Op]:
    """The fixed workload whose every crash point the CI enumerates.

    Small but touching every file operation the engine has: puts and a partial and an aborted
    session in both namespaces, a delete and an overwrite, enough bytes to roll WAL files and a
    segment, a sync and a full compaction (which copies records and unlinks a segment).
    """
    v = iter(range(1, 1 << 20))
    k = key_name
    ops: list[Op] = [
        ("put", "default", k(0), next(v)),
        ("session", "default", ((k(1), next(v)), (k(2), next(v))), (k(1),), "partial"),
        ("put", "q", k(0), next(v)),
        ("session", "q", ((k(1), next(v)),), (), "abort"),
        ("delete", "default", (k(0),)),
        ("put", "default", k(0), next(v)),
        ("sync",),
    ]
    ops += [("put", "q", k(i), next(v)) for i in range(1, 8)]
    ops += [("delete", "q", (k(1), k(2), k(3))), ("compact", True), ("get", "default", k(1)),
            ("put", "default", k(3), next(v))]
    return ops


def apply_op(store, op: Op, hooks: Hooks) -> None:
    """Run one operation, telling ``hooks`` before and after.

    A clean capacity failure (quota, full tier, ENOSPC) is reported as ``failed`` and is not an
    error; anything else propagates.
    """
    kind = op[0]
    try:
        if kind == "put":
            _, ns, key, ver = op
            change = [(ns, key, ver)]
            hooks.begin(change)
            if store.put(key, content(ns, key, ver), namespace=ns):
                hooks.ack(change)
            else:
                hooks.failed("exists")
        elif kind == "session":
            _apply_session(store, op, hooks)
        elif kind == "delete":
            _, ns, keys = op
            change = [(ns, key, None) for key in keys]
            hooks.begin(change)
            store.delete(list(keys), namespace=ns)
            hooks.ack(change)
        elif kind == "get":
            _read_both_ways(store, op, hooks)
        elif kind == "sync":
            store.sync()
            hooks.synced()
        elif kind == "compact":
            store.compact(wait=True, full=op[1])
        else:
            raise ValueError(f"unknown workload op {op!r}")
    except CapacityError as exc:  # DiskFullError included: a clean refusal
        hooks.failed(f"{type(exc).__name__}: {exc}")


def _read_both_ways(store, op: Op, hooks: Hooks) -> None:
    """Read a key with ``get`` (a view) and with ``get_into`` (a copy): each hit byte-exact."""
    _, ns, key = op
    versions = []
    view = store.get(key, namespace=ns)
    if view is not None:
        version, why = identify(ns, key, view)
        view.release()
        if version is None:
            hooks.bad_read(f"get {ns}/{key!r} served wrong bytes: {why}")
            return
        versions.append(version)
    buf = bytearray(MAX_BLOCK)
    n = store.get_into(key, buf, namespace=ns)
    if n:
        version, why = identify(ns, key, memoryview(buf)[:n])
        if version is None:
            hooks.bad_read(f"get_into {ns}/{key!r} served wrong bytes: {why}")
            return
        versions.append(version)
    # Both may miss, or one only (the maintenance thread evicts between them); two hits agree.
    if len(set(versions)) > 1:
        hooks.bad_read(f"{ns}/{key!r}: get served version {versions[0]}, get_into {versions[1]}")
    elif versions:
        hooks.served(ns, key, versions[0])


def _apply_session(store, op: Op, hooks: Hooks) -> None:
    _, ns, items, ok, mode = op
    keys = [k for k, _ in items]
    versions = dict(items)
    session = store.start_write(keys, [len(content(ns, k, versions[k])) for k in keys],
                                namespace=ns)
    try:
        for key in session.keys_to_write:
            store.write(session, key, content(ns, key, versions[key]))
        if mode == "abort":
            store.abort_write(session)
            hooks.failed("aborted")
            return
        ok_keys = [k for k in ok if k in session.keys_to_write]
        change = [(ns, k, versions[k]) for k in ok_keys]
        hooks.begin(change)
        store.finish_write(session, ok_keys)
        hooks.ack(change)
    except BaseException:
        try:
            store.abort_write(session)
        except BaseException:  # noqa: BLE001 - the original failure is the one to report
            pass
        raise
