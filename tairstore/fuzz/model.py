"""The expected-state model every crash harness checks a reopened store against.

RocksDB's crash test keeps an *expected-state file*: for every key, the value it must hold, and
for a key with an operation in flight at the crash, either the old or the new value. This
module is that model for tairstore, shared by the in-process crash points
(:mod:`tairstore.fuzz.crashpoints`), the kill -9 loop (:mod:`tairstore.fuzz.killloop`) and the
stateful model (:mod:`tairstore.fuzz.stateful`).

Block contents are a pure function of ``(namespace, key, version)`` (:func:`content`) and carry
their version and length in their first bytes, so whoever holds only the bytes can tell which
version they are and whether every byte is exact (:func:`identify`). Versions are never reused,
so a block from an aborted session or a lost overwrite is told apart from the acknowledged one.

What a key may show after a crash (:meth:`Expected.allowed`):

- ``durability="sync"``: its last acknowledged value; plus the new value of an operation in
  flight; plus "absent" in an *evictable* namespace (one with a quota that evicts its own
  blocks: an evicted block whose DELETE was not yet durable may also come back, which its last
  acknowledged value covers).
- ``"batch"``: any value it held since the last acknowledged ``store.sync()``; absent only if
  it was absent at some point since then (a key synced and untouched since must be there).
- ``"none"``: any value it held since the start (nothing is ever fsynced), or absent.
- ``"writeback"`` (``"batch"`` with ``write_back``): as ``"batch"``; its ``store.sync()`` also
  writes the blocks acknowledged from DRAM to SSD.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections import Counter
from dataclasses import dataclass, field

__all__ = [
    "content", "identify", "block_size", "Expected", "Tally", "ABSENT",
    "MIN_BLOCK", "MAX_BLOCK",
]

#: Small blocks: a crash run is about orderings, not volume, and thousands of runs must fit CI.
MIN_BLOCK = 256
MAX_BLOCK = 12 << 10
_HEAD = struct.Struct("<QI")  # version, length: a block names itself
#: The value of an absent key in the model.
ABSENT = None


def block_size(ns: str, key: bytes, version: int) -> int:
    """Size of version ``version`` of ``key``: log-uniform in MIN_BLOCK .. MAX_BLOCK."""
    rng = random.Random(f"size/{ns}/{key.hex()}/{version}")
    return int(MIN_BLOCK * (MAX_BLOCK / MIN_BLOCK) ** rng.random())


def content(ns: str, key: bytes, version: int) -> bytes:
    """The exact bytes of version ``version`` of ``ns``/``key`` (deterministic, key-bound)."""
    size = block_size(ns, key, version)
    body = random.Random(f"body/{ns}/{key.hex()}/{version}").randbytes(size - _HEAD.size)
    return _HEAD.pack(version, size) + body


def identify(ns: str, key: bytes, data) -> tuple[int | None, str]:
    """Which version ``data`` is, checking every byte.

    Returns:
        ``(version, "")`` when ``data`` is exactly ``content(ns, key, version)``, else
        ``(None, reason)``.
    """
    raw = bytes(data)
    if len(raw) < _HEAD.size:
        return None, f"{len(raw)} bytes is shorter than any block"
    version, size = _HEAD.unpack_from(raw)
    if size != len(raw) or not 0 < version < 1 << 62:
        return None, f"header says version {version} of {size} bytes, got {len(raw)} bytes"
    if raw != content(ns, key, version):
        return None, f"bytes differ from version {version} of {ns}/{key.hex()}"
    return version, ""


@dataclass
class _Key:
    cur: int | None = None  # last acknowledged value
    since_sync: set = field(default_factory=lambda: {None})  # values held since the last sync
    inflight: set = field(default_factory=set)  # new values of operations not yet acknowledged
    maybe_back: set = field(default_factory=set)  # values dropped without an acknowledged DELETE
    # Values the store removed on its own (R1's drop, an eviction, a reopen that found the key
    # gone): no tombstone marks them, so `fsck --rebuild` may bring one back, byte-exact.
    may_return: set = field(default_factory=set)


@dataclass
class Expected:
    """The expected state of every key of a workload (see the module docstring).

    Args:
        durability: the store's durability mode.
        evictable: namespaces whose blocks the store may evict (they have a quota).
    """

    durability: str = "sync"
    evictable: frozenset = frozenset()
    keys: dict = field(default_factory=dict)

    def _k(self, ns: str, key: bytes) -> _Key:
        st = self.keys.get((ns, key))
        if st is None:
            st = self.keys[(ns, key)] = _Key()
        return st

    def current(self, ns: str, key: bytes) -> int | None:
        """The last acknowledged value of a key (None: absent)."""
        st = self.keys.get((ns, key))
        return None if st is None else st.cur

    def begin(self, changes: list[tuple[str, bytes, int | None]]) -> None:
        """An operation that will set each ``(ns, key)`` to its value is starting."""
        for ns, key, value in changes:
            self._k(ns, key).inflight.add(value)

    def ack(self, changes: list[tuple[str, bytes, int | None]]) -> None:
        """The operation acknowledged these values."""
        for ns, key, value in changes:
            st = self._k(ns, key)
            st.inflight.discard(value)
            st.cur = value
            st.since_sync.add(value)

    def settle(self) -> None:
        """The operation in flight ended without acknowledging (it failed cleanly)."""
        for st in self.keys.values():
            st.inflight.clear()

    def dropped(self, ns: str, key: bytes) -> None:
        """The store dropped the key on its own (a checksum mismatch on read: R1).

        It is absent from now on; its DELETE is logged but never acknowledged, so a crash
        before that record is durable may bring the old value back.
        """
        st = self._k(ns, key)
        if st.cur is not None:
            st.maybe_back.add(st.cur)
            st.may_return.add(st.cur)
        st.cur = None
        st.since_sync.add(None)

    def synced(self) -> None:
        """A ``store.sync()`` was acknowledged: in "batch" mode everything acked is durable."""
        if self.durability == "none":
            return  # store.sync() hands records to the OS but never fsyncs in this mode
        for st in self.keys.values():
            st.since_sync = {st.cur}

    def allowed(self, ns: str, key: bytes, *, rebuilt: bool = False) -> set:
        """The values the key may show after a crash (``rebuilt``: and ``fsck --rebuild``).

        A rebuild reads the segments alone, where only an explicit delete leaves a tombstone:
        a version the store dropped on its own (a checksum drop whose bytes on disk are
        intact, an eviction) may come back then, byte-exact, as a correct block of its key.
        """
        st = self.keys.get((ns, key)) or _Key()
        out = {st.cur} | st.inflight | st.maybe_back
        if rebuilt:
            out |= st.may_return
        if self.durability != "sync":
            # since_sync holds None when the key was absent at some point since the last
            # acknowledged sync: a key synced and untouched since must be there ("batch").
            out |= st.since_sync
        if self.durability == "none":
            out.add(None)
        if ns in self.evictable:
            out.add(None)
        return out

    def required(self, ns: str, key: bytes) -> bool:
        """True when a crash may not lose the key (a loss would be a lost acknowledged block)."""
        return None not in self.allowed(ns, key)

    def restart(self, observed: dict[tuple[str, bytes], int | None]) -> None:
        """After a reopen: what the store holds now is the new durable truth."""
        for k, value in observed.items():
            st = self._k(*k)
            if value is None and st.cur is not None:
                st.may_return.add(st.cur)  # gone without a tombstone the model knows of
            st.cur = value
            st.since_sync = {value}
            st.inflight.clear()
            st.maybe_back.clear()

    # The kill loop keeps the model in a file between runs (the expected-state file).
    def dump(self, path: str) -> None:
        """Write the model to ``path`` atomically (tmp, fsync, rename)."""
        doc = {"durability": self.durability, "evictable": sorted(self.evictable),
               "keys": [[ns, key.hex(), st.cur, sorted(v for v in st.since_sync if v is not None),
                         None in st.since_sync] for (ns, key), st in self.keys.items()]}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Expected":
        """Read a model written by :meth:`dump`."""
        with open(path) as f:
            doc = json.load(f)
        exp = cls(doc["durability"], frozenset(doc["evictable"]))
        for ns, key_hex, cur, since, had_none in doc["keys"]:
            exp.keys[(ns, bytes.fromhex(key_hex))] = _Key(cur, set(since) | ({None} if had_none else set()))
        return exp


@dataclass
class Tally:
    """What a campaign measured; :meth:`table` is the table ``tairstore fuzz all`` ends with."""

    runs: Counter = field(default_factory=Counter)
    crash_points: int = 0
    faults: Counter = field(default_factory=Counter)
    acked_checked: int = 0
    evicted_seen: int = 0
    blocks_lost: int = 0
    corrupt_served: int = 0
    reopen_failures: int = 0
    refused_opens: int = 0
    intact_destroyed: int = 0
    fsck_failures: int = 0
    quota_violations: int = 0
    other_failures: int = 0
    decoder_failures: int = 0
    decoder_inputs: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)

    def merge(self, other: "Tally") -> None:
        """Add ``other``'s counts to this one."""
        self.runs.update(other.runs)
        self.faults.update(other.faults)
        self.decoder_inputs.update(other.decoder_inputs)
        for name in ("crash_points", "acked_checked", "evicted_seen", "blocks_lost", "corrupt_served",
                     "reopen_failures", "refused_opens", "intact_destroyed", "fsck_failures",
                     "quota_violations", "other_failures",
                     "decoder_failures"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures.extend(other.failures)

    @property
    def ok(self) -> bool:
        """True when no invariant was violated."""
        return not (self.blocks_lost or self.corrupt_served or self.reopen_failures
                    or self.intact_destroyed
                    or self.fsck_failures or self.quota_violations or self.other_failures
                    or self.decoder_failures)

    def table(self) -> str:
        """A Markdown table of the counts (the one docs/RELIABILITY.md shows)."""
        rows = [("runs, total", sum(self.runs.values()))]
        rows += [(f"runs: {k}", v) for k, v in sorted(self.runs.items())]
        rows.append(("crash points (enumerated + random + kill -9)", self.crash_points))
        rows += [(f"faults injected: {k}", v) for k, v in sorted(self.faults.items())]
        rows += [(f"decoder inputs: {k}", v) for k, v in sorted(self.decoder_inputs.items())]
        rows += [
            ("acknowledged blocks checked", self.acked_checked),
            ("acknowledged blocks absent, evictable (allowed)", self.evicted_seen),
            ("blocks lost (must be 0)", self.blocks_lost),
            ("corrupt payloads served (must be 0)", self.corrupt_served),
            ("reopen failures (must be 0)", self.reopen_failures),
            ("opens refused for damaged metadata, then rebuilt", self.refused_opens),
            ("intact blocks destroyed (must be 0)", self.intact_destroyed),
            ("fsck failures (must be 0)", self.fsck_failures),
            ("quota violations after reopen (must be 0)", self.quota_violations),
            ("decoder contract violations (must be 0)", self.decoder_failures),
            ("other harness failures (must be 0)", self.other_failures),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"| {'measure':<{width}} | {'count':>10} |", f"|{'-' * (width + 2)}|{'-' * 11}:|"]
        lines += [f"| {name:<{width}} | {value:>10} |" for name, value in rows]
        return "\n".join(lines)
