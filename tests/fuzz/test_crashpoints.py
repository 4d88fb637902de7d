"""CI's short version of the crash-point harness (:mod:`tairstore.fuzz.crashpoints`).

Every persistence point of the fixed workload (and, separately, every write), in
``durability="sync"``, plus random workloads crashed at random points. Raise the random count
with ``TAIRSTORE_FUZZ_CRASH_RUNS``; ``TAIRSTORE_FUZZ_SEED`` changes the campaign seed.
"""

from __future__ import annotations

import gc
import os
import time


from tairstore.fuzz.crashpoints import enumerate_points, random_runs
from tairstore.fuzz.faultfs import ALL_KINDS
from tairstore.fuzz.model import Tally

#: The issue asks CI for at least 200 random crash-point runs.
RANDOM_RUNS = int(os.environ.get("TAIRSTORE_FUZZ_CRASH_RUNS", "200"))
SEED = int(os.environ.get("TAIRSTORE_FUZZ_SEED", "20240601"))
#: How long descriptors of a finished campaign may take to close (threads, garbage).
FD_SETTLE_S = 30.0


def _assert_clean(tally: Tally, failures: list[str]) -> None:
    assert not failures, "\n".join(failures[:20]) + f"\n\n{tally.table()}"
    assert tally.ok, tally.table()


def test_every_persistence_point_of_the_fixed_workload(tmp_path):
    tally = Tally()
    failures = enumerate_points(str(tmp_path), tally, durability="sync")
    _assert_clean(tally, failures)
    assert tally.crash_points >= 30  # the workload reaches every kind of persistence point
    assert tally.acked_checked > 0


def test_every_write_of_the_fixed_workload_may_be_torn(tmp_path):
    tally = Tally()
    failures = enumerate_points(str(tmp_path), tally, durability="sync", kinds=ALL_KINDS)
    _assert_clean(tally, failures)
    assert tally.faults["write_torn"] > 0


def test_every_persistence_point_in_batch_mode_is_byte_exact(tmp_path):
    tally = Tally()
    failures = enumerate_points(str(tmp_path), tally, durability="batch", seed=1)
    _assert_clean(tally, failures)


def _open_fds() -> set[str]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return fds


def test_random_workloads_crashed_at_random_points(tmp_path):
    tally = Tally()
    before = _open_fds() if os.path.isdir("/proc/self/fd") else None
    failures = random_runs(str(tmp_path), tally, seed=SEED, runs=RANDOM_RUNS)
    _assert_clean(tally, failures)
    assert tally.crash_points == RANDOM_RUNS
    if before is not None:
        # A crashed store's files are closed as a killed process's kernel would close them,
        # also when the crash came inside open() or right after a file was created: a long
        # campaign must not run out of descriptors. A file object still referenced by a
        # finished crash's traceback, or by a store thread that a loaded machine has not yet
        # scheduled to its end, closes a moment later: wait for that, with a generous deadline;
        # a real leak stays open.
        deadline = time.monotonic() + FD_SETTLE_S
        while True:
            gc.collect()
            leaked = sorted(f for f in _open_fds() - before if str(tmp_path) in f)
            if not leaked or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not leaked, f"{len(leaked)} descriptors left open: {leaked[:5]}"
