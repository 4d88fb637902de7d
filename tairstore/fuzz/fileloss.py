"""Whole-file loss (M1): LMDB's file, a WAL file or a segment deleted, emptied, truncated or
swapped with another store's, then reopened.

Theory of operation
-------------------
One run writes a store (puts, deletes and rewrites through the public API, ``sync``
durability, small segments so there are several), closes it, and damages one file the seed
picks. Then M1 decides what is correct:

- the fault hit *metadata* (``index/data.mdb`` or a WAL file): ``open`` may refuse, and then
  only with :class:`~tairstore.errors.MetadataMismatchError`; it *must* refuse when the index is
  gone, empty, damaged or foreign. After a refusal ``fsck`` (read-only) must report the damage
  and ``fsck --rebuild`` must bring every acknowledged block back;
- the fault hit a *segment*: its blocks may be lost (their only copy is gone), and ``open``
  may refuse only when the index now names bytes past the end of a file that shrank
  (truncated, or swapped with a shorter one);
- in every case a block whose bytes were not in the damaged file must be served byte-exact
  after the reopen *and after a full compaction*; one that is not counts as an **intact block
  destroyed** (must be 0): what the engine did when the index was lost and the compactor
  deleted the segments holding the only copies.
"""

from __future__ import annotations

import os
import random
import shutil

import tairstore
from tairstore.engine.fsck import fsck
from tairstore.errors import MetadataMismatchError
from tairstore.fuzz.model import Tally, content
from tairstore.fuzz.workload import key_name, store_options
from tairstore.index.lmdb_index import Index

__all__ = ["TARGETS", "KINDS", "run_file_loss"]

TARGETS = ("index", "wal", "segment")
KINDS = ("deleted", "emptied", "truncated", "swapped")
_NS = "default"
_KEYS = 40


def _write(path: str, rng: random.Random, first: int) -> dict[bytes, bytes]:
    expected: dict[bytes, bytes] = {}
    with tairstore.open(path, **store_options("sync")) as s:
        for i in range(_KEYS):
            k = key_name(first + i)
            data = content(_NS, k, 1)
            assert s.put(k, data)
            expected[k] = data
        gone = rng.sample(sorted(expected), 6)
        s.delete(gone)
        for k in gone[:2]:
            expected[k] = content(_NS, k, 2)
            s.put(k, expected[k])
        for k in gone[2:]:
            del expected[k]
    return expected


def _locations(path: str) -> dict[bytes, int]:
    index = Index(os.path.join(path, "index"))
    try:
        return {key: rec.segment for ns, key, rec in index.items() if ns == _NS}
    finally:
        index.close()


def _victim(path: str, target: str, rng: random.Random) -> str:
    if target == "index":
        return os.path.join(path, "index", "data.mdb")
    sub = "wal" if target == "wal" else "segments"
    names = sorted(os.listdir(os.path.join(path, sub)))
    return os.path.join(path, sub, rng.choice(names))


def _damage(victim: str, kind: str, other: str, rng: random.Random) -> None:
    if kind == "deleted":
        os.unlink(victim)
    elif kind == "emptied":
        os.truncate(victim, 0)
    elif kind == "truncated":
        os.truncate(victim, rng.randint(0, max(0, os.path.getsize(victim) - 1)))
    else:
        sub = os.path.basename(os.path.dirname(victim))
        names = sorted(os.listdir(os.path.join(other, sub)))
        shutil.copy(os.path.join(other, sub, rng.choice(names) if sub != "index" else
                                 "data.mdb"), victim)


def run_file_loss(base: str, seed: int, tally: Tally, target: str | None = None,
                  kind: str | None = None) -> list[str]:
    """One run (see the module docstring); returns the failure messages."""
    rng = random.Random(seed)
    target = target or rng.choice(TARGETS)
    kind = kind or rng.choice(KINDS)
    where = f"seed={seed} {target}:{kind}; replay: tairstore fuzz fileloss --seed {seed}"
    path, other = os.path.join(base, f"loss-{seed}"), os.path.join(base, f"other-{seed}")
    failures: list[str] = []
    try:
        expected = _write(path, rng, 0)
        _write(other, rng, 500)
        located = _locations(path)
        victim = _victim(path, target, rng)
        seg_id = int(os.path.basename(victim)[:12]) if target == "segment" else None
        _damage(victim, kind, other, rng)
        tally.faults[f"file loss: {target} {kind}"] += 1
        metadata = target != "segment"
        try:
            tairstore.open(path, **store_options("sync")).close()
            if target == "index" and kind != "truncated":
                failures.append(f"OPEN ACCEPTED a {kind} index ({where})")
                tally.other_failures += 1
        except MetadataMismatchError as exc:
            shrank = kind in ("truncated", "swapped") and exc.problem == "index-damaged"
            if not metadata and not shrank:
                failures.append(f"REFUSED a data-only fault: {exc} ({where})")
                tally.reopen_failures += 1
            tally.refused_opens += 1
            if fsck(path)["ok"]:
                failures.append(f"FSCK said ok for what open refused ({where})")
                tally.fsck_failures += 1
            fsck(path, rebuild=True)
        for phase in ("reopen", "full compaction"):
            with tairstore.open(path, **store_options("sync")) as s:
                if phase == "full compaction":
                    s.compact(wait=True, full=True)
                for k, data in expected.items():
                    tally.acked_checked += 1
                    view = s.get(k, namespace=_NS)
                    got = None if view is None else bytes(view)
                    lost_newest = located.get(k) == seg_id
                    # A key whose newest record was in the damaged file may come back (after a
                    # rebuild) as its older version, never as anything else.
                    older = lost_newest and got == content(_NS, k, 1)
                    if got is not None and got != data and not older:
                        tally.corrupt_served += 1
                        failures.append(f"CORRUPT {k!r} after {phase} ({where})")
                    elif got is None and located.get(k) != seg_id:
                        tally.intact_destroyed += 1
                        failures.append(f"INTACT BLOCK DESTROYED {k!r} after {phase} ({where})")
        tally.runs["file loss"] += 1
    finally:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(other, ignore_errors=True)
    return failures
