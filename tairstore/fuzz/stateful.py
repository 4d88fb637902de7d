"""A stateful model of the store under injected faults: one set of rules, two drivers.

Theory of operation
-------------------
:class:`FaultModel` owns one store on a :class:`~tairstore.fuzz.faultfs.FaultFS` and an
:class:`~tairstore.fuzz.model.Expected` that follows every acknowledgement. Each *rule* is a
method ``rule_<name>(draw)`` that takes every random decision from a :class:`Draw`, so the same
rules run under two drivers:

- Hypothesis (:func:`hypothesis_machine`): a ``RuleBasedStateMachine`` with one rule per
  method, each rule's draws seeded by one integer Hypothesis draws, so a failure shrinks to a
  short rule sequence;
- a seeded driver (:func:`run_seeded`): the rules and draws come from ``random.Random(seed)``,
  so ``tairstore fuzz stateful --seed S`` replays a failing run exactly.

The rules: puts (into DRAM + SSD, or SSD only), write sessions (committed whole, in part, or
aborted), deletes, reads (``get`` / ``get_into``: never wrong bytes), compaction, a clean
restart, a simulated power loss (now, or armed a few file operations into the next write) with
a random post-crash image, and four injected faults with the store's documented answers:

=================  ===================================================================
ENOSPC on the next  the write fails cleanly with CapacityError / DiskFullError; reads keep
segment write       working; later writes work
EIO on a read       a miss, ``counters["read_errors"]`` + 1, the block is kept
bit flip on read    a miss, ``counters["checksum_errors"]`` + 1, the block is dropped
fsync failure       FatalIOError; the store refuses writes; a reopen recovers
=================  ===================================================================

Faults that must reach a file read target a block held on SSD only: the store runs with
``promote_on="never"``, so a block put with ``tier="ssd"`` (or reopened) stays there.

The store runs with ``background=False``: no maintenance thread, so nothing but the rules
touches the files and a run is a pure function of its draws (compaction is a rule instead).
Durability is ``sync``, whose promise (every acknowledged write survives a power loss) is the
strictest check.

A clean restart after an fsync failure reopens on a fresh FaultFS: the harness assumes the
pages whose fsync failed stayed in the page cache (the reopened store recovers from them); a
power loss at that moment is what the crash rule covers.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from typing import Any, Protocol, Sequence

from tairstore.engine.datadir import MARKER
from tairstore.errors import CapacityError, FatalIOError
from tairstore.fuzz.check import (
    abandon, check_quota, check_store, fsck_then_open, observe, quiet_simulated_crashes,
)
from tairstore.fuzz.faultfs import ALL_KINDS, FaultFS, SimulatedCrash
from tairstore.fuzz.model import MAX_BLOCK, Expected, Tally, content, identify
from tairstore.fuzz.workload import (
    KEYS_PER_NS, NAMESPACES, QUOTA_BYTES, QUOTA_NS, QUOTA_TIER_BYTES, ModelHooks, apply_op,
    key_name, store_options,
)

__all__ = ["Draw", "RandomDraw", "FaultModel", "RULES", "RULE_WEIGHTS", "run_seeded",
           "hypothesis_machine", "StatefulFailure"]

#: Rule names and their weights under the seeded driver: mostly ordinary traffic, so faults
#: land on a store with history; the rarer rules reopen the store.
RULE_WEIGHTS = {
    "put": 6, "session": 3, "delete": 3, "read": 6, "compact": 1, "restart": 1, "crash": 1.5,
    "enospc": 1, "read_eio": 1, "bitflip": 1, "fsync_fail": 0.7,
}
RULES = tuple(RULE_WEIGHTS)
#: Steps per seeded run: long enough for faults to meet restarts, short enough to replay.
DEFAULT_STEPS = 40
#: The segment files' directory name: injected faults are aimed at segment I/O only.
_SEGMENTS = "segments"


class StatefulFailure(AssertionError):
    """An invariant was violated; the message names the rule, the step and the replay."""


class Draw(Protocol):
    """Where a rule takes its random decisions from (a seeded RNG under both drivers)."""

    def int(self, lo: int, hi: int) -> int: ...
    def choice(self, seq: Sequence) -> Any: ...
    def bool(self) -> bool: ...


class RandomDraw:
    """A :class:`Draw` over ``random.Random`` (the seeded driver)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq: Sequence) -> Any:
        return self.rng.choice(list(seq))

    def bool(self) -> bool:
        return self.rng.random() < 0.5


class FaultModel:
    """One store under test, its expected state, and the rules (see the module docstring).

    Args:
        base: a scratch directory this model owns (removed by :meth:`close`).
        seed: seeds the fault layer (post-crash images, flipped bits).
        replay: the command that replays this run, printed with every failure.
    """

    def __init__(self, base: str, seed: int, replay: str = "") -> None:
        self.base = base
        self.root = os.path.join(base, "store")
        self.seed = seed
        self.replay = replay
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.model = Expected("sync", frozenset({QUOTA_NS}))
        self.hooks = ModelHooks(self.model, [])
        self.version = 0
        self.step_no = 0
        self.rule = ""
        self.fatal = False  # the store refused writes after an fsync failure
        self.fs = FaultFS(self.root, seed)
        self.store = self._open()

    # -- plumbing -------------------------------------------------------------------------
    def _open(self):
        import tairstore

        opts = store_options("sync")
        opts.update(fs=self.fs, background=False, promote_on="never")
        store = tairstore.open(self.root, **opts)
        store.set_quota(QUOTA_NS, total_bytes=QUOTA_BYTES, tier_bytes=QUOTA_TIER_BYTES)
        return store

    def _where(self) -> str:
        return f"seed={self.seed} step={self.step_no} rule={self.rule}; replay: {self.replay}"

    def _fail(self, message: str, counter: str = "other_failures") -> None:
        setattr(self.tally, counter, getattr(self.tally, counter) + 1)
        raise StatefulFailure(f"{message} ({self._where()})")

    def _next_version(self) -> int:
        self.version += 1
        return self.version

    def _pick(self, d: Draw) -> tuple[str, bytes]:
        return d.choice(NAMESPACES), key_name(d.int(0, KEYS_PER_NS - 1))

    def _absent(self, ns: str) -> list[bytes]:
        return [key_name(i) for i in range(KEYS_PER_NS)
                if self.model.current(ns, key_name(i)) is None]

    def step(self, name: str, d: Draw) -> None:
        """Run rule ``name``, then the invariants that hold between any two rules (C1)."""
        self.step_no += 1
        self.rule = name
        with quiet_simulated_crashes():
            getattr(self, "rule_" + name)(d)
        for message in check_quota(self.store, self.tally, self._where()):
            raise StatefulFailure(message)

    def close(self) -> None:
        """Close (or, after a crash or an fsync failure, abandon) the store; remove the scratch."""
        try:
            if self.fs.crashed or self.fatal:
                abandon(self.store)
            else:
                self.store.close()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- reads ----------------------------------------------------------------------------
    def _read(self, ns: str, key: bytes, via_into: bool) -> bytes | None:
        if via_into:
            buf = bytearray(MAX_BLOCK)
            n = self.store.get_into(key, buf, namespace=ns)
            return bytes(buf[:n]) if n else None
        view = self.store.get(key, namespace=ns)
        if view is None:
            return None
        data = bytes(view)
        view.release()
        return data

    def _check_read(self, ns: str, key: bytes, data: bytes | None) -> None:
        """W1 / R1 in a running store: the acknowledged version, exactly, or a legal miss.

        An operation that failed with FatalIOError has an unknown outcome (a delete leaves the
        key map before its record's fsync fails), so its new value is allowed too.
        """
        cur = self.model.current(ns, key)
        allowed = {cur} | self.model.keys[(ns, key)].inflight if (ns, key) in self.model.keys \
            else {cur}
        if data is None:
            if None not in allowed and ns not in self.model.evictable:
                self._fail(f"LOST {ns}/{key.decode()}: read missed, expected version {cur}",
                           "blocks_lost")
            return
        version, why = identify(ns, key, data)
        if version is None:
            self._fail(f"CORRUPT {ns}/{key.decode()} served wrong bytes: {why}", "corrupt_served")
        if version not in allowed:
            self._fail(f"UNEXPECTED VERSION {ns}/{key.decode()}: read version {version}, "
                       f"expected {sorted(allowed, key=str)}", "corrupt_served")
        self.tally.acked_checked += 1

    def _counter(self, name: str) -> int:
        return self.store.stats()["counters"][name]

    def _ssd_only_key(self) -> tuple[str, bytes] | None:
        """A present block held on SSD only (so a read goes to its segment file), or None."""
        for ns in NAMESPACES:
            for i in range(KEYS_PER_NS):
                key = key_name(i)
                if (self.model.current(ns, key) is not None
                        and self.store.tier_of(key, namespace=ns) == "ssd"):
                    return ns, key
        if self.fatal:
            return None
        absent = self._absent("default")
        if not absent:
            return None
        key, ver = absent[0], self._next_version()
        if not self._put("default", key, ver, "ssd"):
            return None
        return "default", key

    # -- writes ---------------------------------------------------------------------------
    def _put(self, ns: str, key: bytes, ver: int, tier: str) -> bool:
        change = [(ns, key, ver)]
        self.model.begin(change)
        try:
            ok = self.store.put(key, content(ns, key, ver), namespace=ns, tier=tier)
        except CapacityError:
            self.model.settle()
            return False
        if ok:
            self.model.ack(change)
        else:
            self.model.settle()
            if self.model.current(ns, key) is None:
                self._fail(f"put of {ns}/{key.decode()} said it exists; the model has it absent")
        return ok

    def _expect_refused(self, what: str, fn) -> None:
        """After an fsync failure every write must raise FatalIOError."""
        try:
            fn()
        except FatalIOError:
            return
        self._fail(f"{what} was accepted after an fsync failure (must raise FatalIOError)")

    def _mutation(self, d: Draw) -> None:
        """One write of a random kind (put / session / delete): used by the crash rule."""
        kind = d.choice(("put", "session", "delete"))
        getattr(self, "rule_" + kind)(d)

    # -- the rules --------------------------------------------------------------------------
    def rule_put(self, d: Draw) -> None:
        """A put into DRAM + SSD or SSD only; False only for a key the model has present."""
        ns, key = self._pick(d)
        tier = d.choice(("auto", "ssd"))
        ver = self._next_version()
        if self.fatal:
            self._expect_refused("put", lambda: self.store.put(
                key, content(ns, key, ver), namespace=ns, tier=tier))
            return
        self._put(ns, key, ver, tier)

    def rule_session(self, d: Draw) -> None:
        """A write session of 1-3 absent keys, committed whole, in part, or aborted."""
        ns = d.choice(NAMESPACES)
        absent = self._absent(ns)
        if self.fatal:
            key = key_name(d.int(0, KEYS_PER_NS - 1))
            self._expect_refused("start_write", lambda: self.store.start_write(
                [key], [1024], namespace=ns))
            return
        if not absent:
            return
        n = d.int(1, min(3, len(absent)))
        keys = [absent[d.int(0, len(absent) - 1)] for _ in range(n)]
        keys = list(dict.fromkeys(keys))
        items = tuple((k, self._next_version()) for k in keys)
        mode = d.choice(("commit", "commit", "partial", "abort"))
        ok = (tuple(keys) if mode == "commit" else
              tuple(k for k in keys if d.bool()) if mode == "partial" else ())
        apply_op(self.store, ("session", ns, items, ok, mode), self.hooks)

    def rule_delete(self, d: Draw) -> None:
        """Delete one or two keys (present or not)."""
        ns = d.choice(NAMESPACES)
        keys = tuple(dict.fromkeys(key_name(d.int(0, KEYS_PER_NS - 1)) for _ in range(d.int(1, 2))))
        if self.fatal:
            self._expect_refused("delete", lambda: self.store.delete(list(keys), namespace=ns))
            return
        apply_op(self.store, ("delete", ns, keys), self.hooks)

    def rule_read(self, d: Draw) -> None:
        """get or get_into: exactly the acknowledged version, or a legal miss."""
        ns, key = self._pick(d)
        self._check_read(ns, key, self._read(ns, key, d.bool()))

    def rule_compact(self, d: Draw) -> None:
        """Compaction (full or by live ratio); refused or harmless after an fsync failure."""
        try:
            self.store.compact(wait=True, full=d.bool())
        except FatalIOError:
            if not self.fatal:
                raise

    def rule_restart(self, d: Draw) -> None:
        """Close and reopen cleanly: every acknowledged block is back, byte-exact."""
        if self.fatal:
            # Closing may report the failure again; that is its right.
            abandon(self.store)
            self.fs = FaultFS(self.root, self.rng.getrandbits(40))
        else:
            self.store.close()
        self._reopen_and_check()
        self.tally.runs["stateful: reopen"] += 1

    def rule_crash(self, d: Draw) -> None:
        """Lose power now, or a few file operations into the next write; reopen; check."""
        after = d.int(0, 8)
        if after and not self.fatal:
            self.fs.arm_crash(after, ALL_KINDS)
            try:
                self._mutation(d)
            except (SimulatedCrash, FatalIOError):
                # A crash inside the WAL's group commit poisons the WAL, so the writer sees
                # FatalIOError rather than the crash itself.
                if not self.fs.crashed:
                    raise
        self.fs.crash()
        abandon(self.store)
        self.tally.faults["power loss"] += 1
        self.tally.faults.update(self.fs.materialise())
        self.tally.crash_points += 1
        self.fs = FaultFS(self.root, self.rng.getrandbits(40))
        self._reopen_and_check(fsck_first=True)
        self.tally.runs["stateful: crash + reopen"] += 1

    def _reopen_and_check(self, fsck_first: bool = False) -> None:
        self.fatal = False
        rebuilt = False
        try:
            if fsck_first:
                if not os.path.exists(os.path.join(self.root, MARKER)):
                    # Crashed before the store's creation was durable: nothing was acknowledged.
                    import tairstore

                    tairstore.open(self.root, **store_options("sync")).close()
                report, self.store, refused = fsck_then_open(self.root, self._open, self.tally,
                                                             self._where())
                if refused or not report["ok"]:
                    self.tally.fsck_failures += not report["ok"]
                    raise StatefulFailure(f"FSCK after the crash: {report} {refused} "
                                          f"({self._where()})")
                rebuilt = report.get("rebuilt_blocks") is not None
            else:
                self.store = self._open()
        except StatefulFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to reopen is the finding
            self._fail(f"REOPEN FAILED {type(exc).__name__}: {exc}", "reopen_failures")
        failures = check_store(self.store, self.model, self.tally, self._where(), rebuilt=rebuilt)
        if failures:
            raise StatefulFailure("\n".join(failures))
        self.model.restart(observe(self.store))

    def rule_enospc(self, d: Draw) -> None:
        """ENOSPC on the next segment write: a clean CapacityError; reads and later writes work."""
        absent = self._absent("default")
        if self.fatal or not absent:
            return
        key = absent[d.int(0, len(absent) - 1)]
        ver = self._next_version()
        self.fs.fail_next("write", errno.ENOSPC, path_contains=_SEGMENTS)
        change = [("default", key, ver)]
        self.model.begin(change)
        try:
            ok = self.store.put(key, content("default", key, ver), tier=d.choice(("auto", "ssd")))
        except CapacityError:  # DiskFullError is one
            self.model.settle()
            self.tally.faults["enospc"] += self.fs.injected["enospc"] > 0
        else:
            if ok:
                self.model.ack(change)
            else:
                self.model.settle()
            self._fail("a put whose segment write hit ENOSPC was not refused")
        finally:
            self.fs.clear_faults()
        # Reads keep working: every present key of the namespace reads back exactly.
        for i in range(KEYS_PER_NS):
            k = key_name(i)
            self._check_read("default", k, self._read("default", k, False))
        if self.store.stats()["writable"] is not True:
            self._fail("ENOSPC left the store refusing writes (it must keep working)")

    def rule_read_eio(self, d: Draw) -> None:
        """EIO on a segment read: a miss, counted in read_errors; the block stays."""
        target = self._ssd_only_key()
        if target is None:
            return
        ns, key = target
        before = self._counter("read_errors")
        self.fs.fail_next("read", errno.EIO, path_contains=_SEGMENTS)
        try:
            data = self._read(ns, key, d.bool())
        finally:
            self.fs.clear_faults()
        self.tally.faults["read eio"] += 1
        if data is not None:
            self._fail(f"a read of {ns}/{key.decode()} that got EIO returned data")
        if self._counter("read_errors") != before + 1:
            self._fail("EIO on a read did not count one read_errors")
        # The block is kept: the next read (no fault) returns it exactly.
        self._check_read(ns, key, self._read(ns, key, d.bool()))
        if self.store.get(key, namespace=ns) is None and ns not in self.model.evictable:
            self._fail(f"EIO on a read dropped {ns}/{key.decode()} (it must be kept)")

    def rule_bitflip(self, d: Draw) -> None:
        """A bit flipped on a segment read: a miss, counted in checksum_errors, block dropped."""
        target = self._ssd_only_key()
        if target is None:
            return
        ns, key = target
        before = self._counter("checksum_errors")
        self.fs.flip_next_read(path_contains=_SEGMENTS)
        try:
            data = self._read(ns, key, d.bool())
        finally:
            self.fs.clear_faults()
        self.tally.faults["bitflip"] += 1
        if data is not None:
            # The flip is transient (the disk is unchanged): a read path that re-reads the
            # header (it does when the length bytes look wrong) may get clean bytes. Then the
            # bytes must be exact and nothing is counted or dropped; never wrong bytes (R1).
            self._check_read(ns, key, data)
            if self._counter("checksum_errors") != before:
                self._fail("a read that returned exact bytes counted a checksum error")
            return
        if self._counter("checksum_errors") != before + 1:
            self._fail("a flipped bit did not count one checksum_errors")
        self.model.dropped(ns, key)
        if self._read(ns, key, False) is not None:
            self._fail(f"{ns}/{key.decode()} is still served after its checksum failed")

    def rule_fsync_fail(self, d: Draw) -> None:
        """An fsync fails: the write raises FatalIOError, later writes too; reads still work."""
        if self.fatal:
            return
        self.fs.fail_next("fsync", errno.EIO)
        for _ in range(3):
            absent = self._absent("default")
            if not absent:
                # Every key is present: delete one, which must fsync its record too.
                present = [key_name(i) for i in range(KEYS_PER_NS)]
                key = present[d.int(0, len(present) - 1)]
                try:
                    apply_op(self.store, ("delete", "default", (key,)), self.hooks)
                except FatalIOError:
                    # The delete was not acknowledged: its keys may show old or absent.
                    self.fatal = True
                    self.tally.faults["fsync failure"] += 1
                    break
                continue
            key = absent[d.int(0, len(absent) - 1)]
            ver = self._next_version()
            change = [("default", key, ver)]
            self.model.begin(change)
            try:
                ok = self.store.put(key, content("default", key, ver))
            except FatalIOError:
                # Not acknowledged: the model keeps it in flight (old or new after a reopen).
                self.fatal = True
                self.tally.faults["fsync failure"] += 1
                break
            if ok:
                self.model.ack(change)
            else:
                self.model.settle()
        self.fs.clear_faults()
        if not self.fatal:
            self._fail("an injected fsync failure never surfaced as FatalIOError")
        self._expect_refused("put after the fsync failure",
                             lambda: self.store.put(b"refused", b"x" * 300))
        if self.store.stats()["writable"]:
            self._fail("stats() says writable after an fsync failure")
        ns, key = self._pick(d)
        self._check_read(ns, key, self._read(ns, key, d.bool()))


def run_seeded(seed: int, *, steps: int = DEFAULT_STEPS, base: str | None = None,
               tally: Tally | None = None) -> list[str]:
    """One seeded run of ``steps`` rules; returns its failures (empty: every invariant held).

    The replay command is ``tairstore fuzz stateful --seed SEED --steps STEPS``.
    """
    tally = tally if tally is not None else Tally()
    rng = random.Random(seed)
    scratch = tempfile.mkdtemp(prefix="tairstore-stateful-", dir=base)
    replay = f"tairstore fuzz stateful --seed {seed} --steps {steps}"
    draw = RandomDraw(rng)
    names, weights = list(RULE_WEIGHTS), list(RULE_WEIGHTS.values())
    failures: list[str] = []
    m = None
    with quiet_simulated_crashes():
        try:
            m = FaultModel(os.path.join(scratch, "run"), rng.getrandbits(40), replay)
            for _ in range(steps):
                m.step(rng.choices(names, weights)[0], draw)
        except StatefulFailure as exc:
            failures.append(str(exc))
        except BaseException as exc:  # noqa: BLE001 - anything else is a finding too
            if isinstance(exc, KeyboardInterrupt):
                raise
            where = m._where() if m is not None else f"seed={seed}; replay: {replay}"
            failures.append(f"UNEXPECTED {type(exc).__name__}: {exc} ({where})")
            tally.other_failures += 1
        finally:
            if m is not None:
                try:
                    m.close()
                except BaseException as exc:  # noqa: BLE001
                    failures.append(f"CLOSE FAILED {type(exc).__name__}: {exc} ({m._where()})")
                    tally.other_failures += 1
                tally.merge(m.tally)
            shutil.rmtree(scratch, ignore_errors=True)
    tally.runs["stateful (seeded)"] += 1
    return failures


def hypothesis_machine(tally: Tally | None = None):
    """A Hypothesis ``RuleBasedStateMachine`` class with one rule per :data:`RULES` entry.

    Every failure raises inside the rule, so Hypothesis shrinks it and prints the steps.
    """
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

    totals = tally if tally is not None else Tally()

    def start(self, seed: int) -> None:
        self.scratch = tempfile.mkdtemp(prefix="tairstore-stateful-")
        self.m = FaultModel(os.path.join(self.scratch, "run"), seed,
                            replay="the Hypothesis test (it prints the failing steps)")

    def teardown(self) -> None:
        m = getattr(self, "m", None)
        if m is not None:
            try:
                m.close()
            finally:
                totals.merge(m.tally)
                totals.runs["stateful (hypothesis)"] += 1
                shutil.rmtree(self.scratch, ignore_errors=True)

    def make(name: str):
        # One drawn integer seeds the rule's own decisions. Drawing them from Hypothesis one
        # by one would make the *shape* of the draws depend on the store's state (which keys
        # are absent), and the index writer thread makes that state differ slightly between
        # replays, which Hypothesis rejects as a flaky strategy. Rules and sequences still
        # shrink; each rule's decisions shrink towards seed 0.
        def run_rule(self, seed: int) -> None:
            self.m.step(name, RandomDraw(random.Random(seed)))
        run_rule.__name__ = name
        return rule(seed=st.integers(0, 2**32 - 1))(run_rule)

    ns = {"start": initialize(seed=st.integers(0, 2**40))(start), "teardown": teardown,
          "tally": totals}
    ns.update({name: make(name) for name in RULES})
    return type("FaultModelMachine", (RuleBasedStateMachine,), ns)
