"""``tairstore fuzz all --minutes M``: every harness, interleaved, for a fixed wall-clock time.

Theory of operation
-------------------
The campaign runs *cycles* until its deadline. Each cycle gives every harness a slice, in this
order, so a short campaign still reaches all of them and a long one keeps coming back:

1. crash points: the fixed workload crashed after each of its persistence points (cycle ``c``
   seeds the post-crash images; odd cycles use ``batch`` and make every write a point too);
2. random crash runs: random workloads crashed at random operations, random durability;
3. the kill -9 loop: a real writer SIGKILLed, in mixed durability;
4. the stateful fault model (seeded driver): ENOSPC, EIO, bit flips, fsync failures, crashes;
5. the decoder fuzzers: every target, a batch of seeded inputs each.

Every seed is drawn from the campaign seed, and every failure is printed at once with its own
seed and exact replay command; the campaign goes on after a failure (it counts them). It ends
with the table of :meth:`~tairstore.fuzz.model.Tally.table`; a progress table is printed every
:data:`PROGRESS_EVERY_S` so a run cut short still shows what it did.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

from tairstore.fuzz.model import Tally

__all__ = ["run_all", "SLICE_S"]

#: Seconds per harness per cycle: long enough for each to do real work (a kill iteration is
#: ~0.5 s, a crash run ~20 ms), short enough that a 1-minute campaign reaches all of them.
SLICE_S = {"random crash runs": 20.0, "kill -9 loop": 20.0, "stateful": 20.0, "decoders": 12.0}
#: Decoder inputs per target per batch.
DECODER_BATCH = 2000
PROGRESS_EVERY_S = 300.0


def run_all(minutes: float, *, seed: int = 0, base: str | None = None,
            out: Callable[[str], None] | None = None) -> Tally:
    """Run every harness interleaved for ``minutes``; returns the campaign's tally."""
    from tairstore.fuzz import crashpoints, decoders, killloop, stateful
    from tairstore.fuzz.decoder_targets import TARGETS
    from tairstore.fuzz.faultfs import ALL_KINDS, CRASH_POINT_KINDS

    say = out or (lambda text: print(text, flush=True))
    tally = Tally()
    rng = random.Random(seed)
    start = time.monotonic()
    end = start + minutes * 60.0
    next_progress = start + PROGRESS_EVERY_S
    scratch = tempfile.mkdtemp(prefix="tairstore-fuzz-all-", dir=base)

    def report(failures: list[str]) -> None:
        for f in failures:
            say(f"FAILURE: {f}")

    # A campaign shorter than one full cycle shrinks the slices so every harness gets a turn
    # (the crash-point enumeration is the one fixed cost, ~5 s).
    scale = min(1.0, max(0.05, (minutes * 60.0 - 5.0) / sum(SLICE_S.values())))

    def until(slice_s: float) -> float:
        return min(end, time.monotonic() + slice_s * scale)

    cycle = 0
    try:
        while time.monotonic() < end:
            say(f"-- cycle {cycle} at {time.monotonic() - start:.0f} s")
            # 1. every persistence point of the fixed workload
            mode = "batch" if cycle % 2 else "sync"
            kinds = ALL_KINDS if cycle % 2 else CRASH_POINT_KINDS
            report(crashpoints.enumerate_points(scratch, tally, seed=cycle, durability=mode,
                                                kinds=kinds))
            tally.runs["crash points enumeration"] += 1
            if time.monotonic() >= end:
                break
            # 2. random crash runs
            report(crashpoints.random_runs(scratch, tally, seed=rng.getrandbits(40),
                                           deadline=until(SLICE_S["random crash runs"])))
            # 3. the kill -9 loop, mixed durability, a fresh run directory per cycle
            run_dir = os.path.join(scratch, f"killloop-{cycle}")
            report(killloop.run_campaign(run_dir, tally, seed=rng.getrandbits(40),
                                         deadline=until(SLICE_S["kill -9 loop"])))
            shutil.rmtree(run_dir, ignore_errors=True)
            # 4. the stateful fault model
            slice_end = until(SLICE_S["stateful"])
            while time.monotonic() < slice_end:
                report(stateful.run_seeded(rng.getrandbits(40), tally=tally, base=scratch))
            # 5. the decoders
            slice_end = until(SLICE_S["decoders"])
            for name in TARGETS:
                target_seed = rng.getrandbits(40)
                try:
                    n, failures = decoders.run_seeded(name, target_seed, DECODER_BATCH,
                                                      deadline=slice_end)
                except Exception as exc:  # noqa: BLE001 - a broken set-up is counted, not fatal
                    tally.other_failures += 1
                    report([f"decoder target {name} could not run: {type(exc).__name__}: {exc}"
                            f" (replay: tairstore fuzz decoders --target {name} --seed "
                            f"{target_seed} --count {DECODER_BATCH})"])
                    continue
                tally.decoder_inputs[name] += n
                tally.decoder_failures += len(failures)
                report(failures)
            cycle += 1
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_EVERY_S
                say(f"-- progress after {time.monotonic() - start:.0f} s:\n{tally.table()}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    say(f"-- campaign seed {seed}, {minutes} min requested, ran "
        f"{time.monotonic() - start:.0f} s in {cycle} cycles")
    return tally


def main_all(minutes: float, seed: int, base: str | None) -> int:
    """The ``fuzz all`` command: run, print the table, exit 1 if any invariant was violated."""
    tally = run_all(minutes, seed=seed, base=base)
    print(tally.table(), flush=True)
    if not tally.ok:
        print(f"invariants were violated; each FAILURE line above names its replay command "
              f"(campaign: tairstore fuzz all --minutes {minutes:g} --seed {seed})",
              file=sys.stderr)
    return 0 if tally.ok else 1
