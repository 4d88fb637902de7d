"""Simulated crashes at every persistence point of a workload (the CrashMonkey idea), in-process.

Theory of operation
-------------------
One *crash run* takes a fresh directory and a :class:`~tairstore.fuzz.faultfs.FaultFS` armed to
crash right after its N-th counted operation; opens the store on it, runs a workload (and then
``close()``, whose final syncs are crash points too) while an
:class:`~tairstore.fuzz.model.Expected` follows every acknowledgement; at the crash abandons the
store (:func:`~tairstore.fuzz.check.abandon`) and *materialises* one post-crash disk image the
seed picks; reopens the directory with the real file system (any exception there is a *reopen
failure*); checks every key against the model (:func:`~tairstore.fuzz.check.check_store`); closes
it and runs ``fsck``, which must report ``ok``.

- :func:`enumerate_points` runs the fixed workload once to count its fsync / fsync_dir / rename
  / unlink operations, then crashes after each of them in turn, in ``durability="sync"``:
  everything acknowledged before the crash point must be present and byte-exact.
- :func:`random_runs` crashes random workloads after a random operation of any kind, writes
  included (so the last write may be torn), in a random durability mode. In ``"batch"``,
  ``"writeback"`` (batch with ``write_back``) and ``"none"`` only byte-exactness is required of
  what was not synced.

Every failure names the seed and the command that replays exactly that run.
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from tairstore.engine.datadir import MARKER
from tairstore.fuzz.check import abandon, check_store, fsck_then_open, quiet_simulated_crashes
from tairstore.fuzz.faultfs import ALL_KINDS, CRASH_POINT_KINDS, FaultFS
from tairstore.fuzz.model import Expected, Tally
from tairstore.fuzz.workload import (
    QUOTA_BYTES, QUOTA_NS, ModelHooks, Op, apply_op, fixed_workload, generate, store_options,
)

__all__ = ["CrashRun", "run_crash", "count_points", "enumerate_points", "random_runs",
           "random_run_spec"]

#: Durability modes of random runs, weighted towards the one that promises the most.
_MODES = ("sync", "sync", "batch", "none", "writeback")
#: Operations per random workload: enough for rolls and a compaction, few enough for CI.
_RANDOM_OPS = (8, 30)
#: Counted operations per workload operation, roughly: the range a random crash point is drawn
#: from (a point past the end becomes a crash right after the workload).
_POINTS_PER_OP = 4


@dataclass
class CrashRun:
    """One crash run, fully determined by these fields (its replay)."""

    seed: int
    ops: list
    durability: str
    crash_after: int | None  # None: no crash (the counting dry run)
    kinds: frozenset = CRASH_POINT_KINDS
    replay: str = ""


def _open(path: str, durability: str, fs=None):
    import tairstore

    opts = store_options(durability)
    if fs is not None:
        opts["fs"] = fs
    return tairstore.open(path, **opts)


def run_crash(base: str, run: CrashRun, tally: Tally) -> tuple[list[str], int]:
    """Execute one crash run in a fresh directory under ``base``; count into ``tally``.

    Returns:
        the failure messages (empty when every invariant held) and the counted operations
        seen (the number of crash points, for the dry run).
    """

    path = os.path.join(base, f"run-{run.seed}-{run.crash_after}")
    shutil.rmtree(path, ignore_errors=True)
    fs = FaultFS(path, seed=run.seed)
    if run.crash_after is None:
        fs.count_points(run.kinds)
    else:
        fs.arm_crash(run.crash_after, run.kinds)
    model = Expected(run.durability, frozenset({QUOTA_NS}))
    hooks = ModelHooks(model, [])
    where = f"seed={run.seed} point={run.crash_after} durability={run.durability}; replay: {run.replay}"
    failures: list[str] = []
    store = None
    with quiet_simulated_crashes():
        try:
            store = _open(path, run.durability, fs)
            store.set_quota(QUOTA_NS, total_bytes=QUOTA_BYTES)
            for op in run.ops:
                apply_op(store, op, hooks)
            if run.crash_after is not None and not fs.crashed:
                # The armed point lies past the workload: lose power now, store still open.
                fs.crash()
            if not fs.crashed:
                store.close()
        except BaseException as exc:  # noqa: BLE001 - a crash is expected; anything else is not
            if not fs.crashed:
                tally.other_failures += 1
                failures.append(f"UNEXPECTED {type(exc).__name__}: {exc} ({where})")
                fs.crash()
        points = fs.points
        if fs.crashed:
            try:
                if store is not None:
                    abandon(store)
            except RuntimeError as exc:
                tally.other_failures += 1
                failures.append(f"HANG {exc} ({where})")
            # What a killed process's kernel does, also when the crash came inside open()
            # (no store to abandon, but files it had opened). Collect garbage first: a file the
            # engine dropped without closing (a leak a long-running daemon would feel) then
            # leaves the FS's weak set here, always, and the campaign's descriptor check sees it.
            gc.collect()
            fs.close_all()
            tally.faults.update(fs.materialise())
            tally.crash_points += 1
    for message in hooks.bad:
        tally.corrupt_served += 1
        failures.append(f"CORRUPT read during the run: {message} ({where})")
    # fsck first, on the image exactly as the crash left it: it must need no repair, and a
    # block that only a read would find damaged (and drop) must not hide behind the check.
    try:
        if not os.path.exists(os.path.join(path, MARKER)):
            # The crash came before the store's creation was durable: nothing was ever
            # acknowledged, and an open finishes the creation (fsck only opens existing stores).
            _open(path, run.durability).close()
        report, store, refused = fsck_then_open(path, lambda: _open(path, run.durability),
                                                tally, where)
        failures += refused
    except Exception as exc:  # noqa: BLE001 - any failure to reopen is the finding
        tally.reopen_failures += 1
        failures.append(f"REOPEN FAILED {type(exc).__name__}: {exc} ({where})")
        shutil.rmtree(path, ignore_errors=True)
        return failures, points
    if not report["ok"]:
        tally.fsck_failures += 1
        failures.append(f"FSCK {report} ({where})")
    try:
        failures += check_store(store, model, tally, where,
                                rebuilt=report.get("rebuilt_blocks") is not None)
    finally:
        store.close()
    shutil.rmtree(path, ignore_errors=True)
    tally.runs["crash point (in-process)"] += 1
    return failures, points


def count_points(base: str, ops: list[Op], durability: str = "sync",
                 kinds: frozenset = CRASH_POINT_KINDS) -> int:
    """How many operations of ``kinds`` a crash-free run of ``ops`` performs (close included)."""
    failures, n = run_crash(base, CrashRun(0, ops, durability, None, kinds), Tally())
    if failures:
        raise AssertionError("the crash-free dry run failed: " + "; ".join(failures))
    return n


def enumerate_points(base: str, tally: Tally, *, seed: int = 0, durability: str = "sync",
                     only: int | None = None, kinds: frozenset = CRASH_POINT_KINDS,
                     progress: Callable[[str], None] | None = None) -> list[str]:
    """Crash the fixed workload after each of its persistence points in turn.

    Args:
        seed: seeds the post-crash images (which unsynced writes survive).
        only: run just this crash point (a replay).
        kinds: which operations are crash points (``ALL_KINDS`` adds every write).

    Returns:
        every failure message.
    """
    ops = fixed_workload()
    total = count_points(base, ops, durability, kinds)
    failures: list[str] = []
    points = [only] if only is not None else range(1, total + 1)
    for n in points:
        replay = (f"tairstore fuzz crashpoints --seed {seed} --point {n} --durability {durability}"
                  + (" --writes" if kinds != CRASH_POINT_KINDS else ""))
        f, _ = run_crash(base, CrashRun(seed * 100_003 + n, ops, durability, n, kinds, replay),
                         tally)
        failures += f
        if f and progress:
            progress("\n".join(f))
    return failures


def random_run_spec(run_seed: int) -> CrashRun:
    """The random crash run that ``run_seed`` stands for."""
    rng = random.Random(run_seed)
    ops = generate(rng, rng.randint(*_RANDOM_OPS), first_version=1)
    durability = rng.choice(_MODES)
    crash_after = rng.randint(1, _POINTS_PER_OP * len(ops) + 20)
    return CrashRun(run_seed, ops, durability, crash_after, ALL_KINDS,
                    replay=f"tairstore fuzz crashpoints --random-seed {run_seed}")


def random_runs(base: str, tally: Tally, *, seed: int, runs: int | None = None,
                deadline: float | None = None,
                progress: Callable[[str], None] | None = None) -> list[str]:
    """Random workloads crashed at random points: ``runs`` of them, or until ``deadline``.

    Run ``i``'s seed is drawn from ``seed``, and each failure prints it.
    """
    rng = random.Random(seed)
    failures: list[str] = []
    i = 0
    while (runs is None or i < runs) and (deadline is None or time.monotonic() < deadline):
        run_seed = rng.getrandbits(40)
        f, _ = run_crash(base, random_run_spec(run_seed), tally)
        failures += f
        if f and progress:
            progress("\n".join(f))
        i += 1
    return failures
