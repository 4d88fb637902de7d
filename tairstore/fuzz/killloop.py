"""The kill -9 loop: real processes, real files, real SIGKILLs (``tairstore fuzz crash``).

Theory of operation
-------------------
One *campaign* owns a run directory holding the store (``store/``) and the expected-state file
(``expected.json``, RocksDB's idea: for every key, the value it must hold). Each iteration:

1. loads the expected state from the file (the state after the previous iteration's reopen);
2. starts the writer (``python -m tairstore.fuzz.writer``) on the store with a seed and a
   first version drawn from the campaign seed; it reports every operation before it starts and
   after it was acknowledged over a pipe (:class:`tairstore.fuzz.writer.PipeHooks`);
3. kills it with SIGKILL at a random moment: most kills land in the running workload, some in
   the writer's own recovery (right after it reports ``O``), so the next open recovers a
   store whose recovery was interrupted; the process is always reaped;
4. replays the writer's complete lines into the model (:class:`~tairstore.fuzz.model.Expected`):
   an acknowledged operation is promised; the one in flight at the kill may show old or new;
5. runs ``fsck`` (must be ok, nothing corrupt), reopens the store in this process (a failure is
   a *reopen failure*) and checks every key (W2: nothing acknowledged lost; W1/R1: every byte
   exact and of an allowed version) and the quota'd namespace's usage in total and per tier
   (C1); then that the store agrees with itself: ``exists`` says present exactly for the keys
   ``get`` serves, ``stats()`` counts those blocks and no checksum error;
6. every other iteration (seeded) runs ``compact(wait=True, full=True)``; closes; ``fsck`` must
   be ok and count the blocks the store served (after a compaction: ``orphan_bytes == 0``);
7. records what the store now holds as the new expected state, and writes the file.

The writer itself checks every read it makes: ``get`` and ``get_into`` both byte-exact, and of
the version the run last acknowledged for the key.

An *evicting* campaign (``evicting=True``) gives the store an SSD tier smaller than what the
workload keeps live (:data:`~tairstore.fuzz.workload.EVICTING_SSD_BYTES`), so blocks of every
namespace are evicted all the time, also in the middle of the kill: any acknowledged block may
then be absent, and whatever is present must still be exact and of an allowed version.

A kill is a process crash, not a power loss: the page cache survives it, so in every
durability mode every acknowledged write must survive (``docs/ARCHITECTURE.md``'s durability
table). The model is therefore always the strict ``"sync"`` one.

Kill timing is wall-clock, so a replay (same seed, same iteration count) runs the same
workloads and aims at the same moments, but may land a few operations apart.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tairstore.engine.datadir import MARKER
from tairstore.fuzz.check import check_store, observe
from tairstore.fuzz.model import Expected, Tally
from tairstore.fuzz.workload import (
    EVICTING_SSD_BYTES, NAMESPACES, QUOTA_NS, SSD_BYTES, store_options,
)

__all__ = ["KillLoop", "run_campaign", "parse_lines", "EXPECTED_FILE"]

EXPECTED_FILE = "expected.json"
#: Versions of iteration i start at i * VERSION_STRIDE + 1: unique across iterations, so a
#: block left by an aborted session of an earlier run is told apart from an acknowledged one.
VERSION_STRIDE = 1_000_000
#: How long after "R" a kill lands: long enough for hundreds of operations (a small op takes
#: ~1 ms), short enough that a CI campaign of 20+ kills stays within seconds.
KILL_DELAY_S = (0.005, 0.35)
#: Share of kills aimed at the writer's own open (recovery), and how far into it: a small
#: store opens in ~10-30 ms after the interpreter started.
KILL_DURING_OPEN_P = 0.2
OPEN_DELAY_S = (0.0, 0.03)
#: A writer that does not report "O" / "R" within this long is stuck: a failure.
READY_TIMEOUT_S = 60.0
#: Modes the writer runs in ("mixed"), weighted towards the one that promises the most. A kill
#: is a process crash, so each of them must keep every acknowledged write.
MODES = ("sync", "sync", "batch", "none")
#: How long to wait for a killed writer to be reaped, and its pipe to drain.
REAP_TIMEOUT_S = 30.0


def parse_lines(lines: list[str], model: Expected) -> tuple[list[str], bool]:
    """Feed the writer's complete lines into ``model``; return (bad reads, saw "D").

    A last line without its newline was cut by the kill: it is not an acknowledgement.
    """
    bad: list[str] = []
    done = False
    for line in lines:
        if not line.endswith("\n"):
            continue
        tag, _, rest = line.rstrip("\n").partition(" ")
        if tag in ("B", "A"):
            changes = [(ns, bytes.fromhex(k), v) for ns, k, v in json.loads(rest)]
            (model.begin if tag == "B" else model.ack)(changes)
        elif tag == "F":
            model.settle()
        elif tag == "S":
            model.synced()
        elif tag == "X":
            bad.append(rest)
        elif tag == "D":
            done = True
    return bad, done


@dataclass
class KillLoop:
    """A kill -9 campaign on one run directory (see the module docstring).

    Args:
        run_dir: holds ``store/`` and the expected-state file; created if missing.
        seed: the campaign seed (workloads, kill moments, modes).
        modes: the durability modes iterations draw from.
        evicting: give the store a small SSD tier that evicts blocks of every namespace.
    """

    run_dir: str
    seed: int
    modes: tuple = MODES
    evicting: bool = False

    def __post_init__(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        self.path = os.path.join(self.run_dir, "store")
        self.state_file = os.path.join(self.run_dir, EXPECTED_FILE)
        self.rng = random.Random(self.seed)
        self.ssd_bytes = EVICTING_SSD_BYTES if self.evicting else SSD_BYTES

    def replay(self, iterations: int) -> str:
        """The command that replays this campaign up to ``iterations``."""
        if self.evicting:
            return (f"run_campaign(run_dir, Tally(), seed={self.seed}, iterations={iterations}, "
                    f"modes={tuple(self.modes)!r}, evicting=True)")
        modes = ("" if tuple(self.modes) == MODES
                 else f" --durability {','.join(sorted(set(self.modes)))}")
        return f"tairstore fuzz crash --seed {self.seed} --iterations {iterations}{modes}"

    def _load(self) -> Expected:
        if os.path.exists(self.state_file):
            model = Expected.load(self.state_file)
        else:
            model = Expected("sync", frozenset(NAMESPACES if self.evicting else {QUOTA_NS}))
        # A kill is not a power loss: whatever the writer's mode, every ack must survive.
        model.durability = "sync"
        return model

    def iteration(self, i: int, tally: Tally) -> list[str]:
        """Run iteration ``i`` (0-based): start, kill, reopen, check. Returns failures."""
        rng = random.Random(self.rng.getrandbits(64))
        mode = rng.choice(self.modes)
        where = f"seed={self.seed} iteration={i} durability={mode}; replay: {self.replay(i + 1)}"
        model = self._load()
        lines, status, stderr = self._run_writer(rng, i, mode)
        failures: list[str] = []
        bad, done = parse_lines(lines, model)
        for message in bad:
            tally.corrupt_served += 1
            failures.append(f"CORRUPT read in the writer: {message} ({where})")
        if status not in (0, -signal.SIGKILL) or (status == 0 and not done):
            tally.other_failures += 1
            failures.append(f"WRITER exited with status {status} ({where}):\n{stderr[-3000:]}")
        tally.runs["kill -9 loop"] += 1
        if status == -signal.SIGKILL:
            tally.crash_points += 1
            tally.faults["sigkill"] += 1
        failures += self._reopen_and_check(rng, model, mode, tally, where)
        return failures

    def _run_writer(self, rng: random.Random, i: int, mode: str) -> tuple[list[str], int, str]:
        """Start the writer, kill it at a random moment, reap it; (lines, status, stderr)."""
        cmd = [sys.executable, "-m", "tairstore.fuzz.writer", self.path,
               "--seed", str(rng.getrandbits(40)), "--first-version", str(i * VERSION_STRIDE + 1),
               "--durability", mode, "--ssd-bytes", str(self.ssd_bytes)]
        during_open = rng.random() < KILL_DURING_OPEN_P
        delay = rng.uniform(*(OPEN_DELAY_S if during_open else KILL_DELAY_S))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                bufsize=1)
        lines: list[str] = []
        marks = {"O": threading.Event(), "R": threading.Event()}
        err: list[str] = []

        def pump_out() -> None:
            for line in proc.stdout:
                lines.append(line)
                tag = line[:1]
                if tag in marks and line.strip() == tag:
                    marks[tag].set()
            marks["O"].set()  # EOF: stop waiting
            marks["R"].set()

        def pump_err() -> None:
            err.append(proc.stderr.read())

        readers = [threading.Thread(target=pump_out, daemon=True),
                   threading.Thread(target=pump_err, daemon=True)]
        for t in readers:
            t.start()
        try:
            marks["O" if during_open else "R"].wait(READY_TIMEOUT_S)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        finally:
            # Always reaped, whatever happened above.
            if proc.poll() is None:
                proc.kill()
            proc.wait(REAP_TIMEOUT_S)
            for t in readers:
                t.join(REAP_TIMEOUT_S)
        return lines, proc.returncode, "".join(err)

    def _reopen_and_check(self, rng: random.Random, model: Expected, mode: str, tally: Tally,
                          where: str) -> list[str]:
        import tairstore
        from tairstore.engine.fsck import fsck

        failures: list[str] = []
        if not os.path.exists(self.path) or (
                not model.keys and not os.path.exists(os.path.join(self.path, MARKER))):
            # Killed before the store's directory existed, or inside its very first open before
            # the marker was written (nothing was ever written, let alone acknowledged): nothing
            # to check, and the next open initialises it. A marker missing after any write
            # began is checked below, and is a failure.
            model.dump(self.state_file)
            return failures
        try:
            report = fsck(self.path)
            # No maintenance thread: the checks below see the store as recovery left it, and an
            # eviction after the full compaction would leave a segment with no live record that
            # only the next pass reclaims (not a leak; a race of the orphan check).
            store = tairstore.open(self.path, background=False, **store_options(mode, self.ssd_bytes))
        except Exception as exc:  # noqa: BLE001 - any failure to reopen is the finding
            tally.reopen_failures += 1
            return [f"REOPEN FAILED {type(exc).__name__}: {exc} ({where})"]
        if not report["ok"] or report["blocks_corrupt"]:
            tally.fsck_failures += 1
            failures.append(f"FSCK after the kill: {report} ({where})")
        compact = rng.random() < 0.5
        try:
            failures += check_store(store, model, tally, where)
            observed = observe(store)
            tally.evicted_seen += sum(
                1 for (ns, key), v in observed.items()
                if v is None and model.current(ns, key) is not None and not model.required(ns, key))
            failures += self._check_self_consistent(store, observed, tally, where)
            model.restart(observed)
            if compact:
                store.compact(wait=True, full=True)
        finally:
            store.close()
        failures += self._check_fsck_after_close(observed, compact, tally, where)
        model.dump(self.state_file)
        return failures

    def _check_self_consistent(self, store, observed: dict, tally: Tally, where: str) -> list[str]:
        """``exists`` agrees with what ``get`` served, and ``stats()`` counts it, no checksum error."""
        failures: list[str] = []
        for ns in NAMESPACES:
            keys = [key for (n, key) in observed if n == ns]
            for key, there in zip(keys, store.exists(keys, namespace=ns)):
                if there != (observed[(ns, key)] is not None):
                    failures.append(f"EXISTS {ns}/{key.decode()}: exists() says {there}, get() "
                                    f"served {observed[(ns, key)]} ({where})")
        stats = store.stats()
        present = sum(v is not None for v in observed.values())
        if stats["counters"]["checksum_errors"]:
            failures.append(f"CHECKSUM errors after a kill -9 (no byte was damaged): "
                            f"{stats['counters']} ({where})")
        if stats["blocks"] != present:
            failures.append(f"STATS count {stats['blocks']} blocks, get() served {present} ({where})")
        tally.other_failures += len(failures)
        return failures

    def _check_fsck_after_close(self, observed: dict, compact: bool, tally: Tally,
                                where: str) -> list[str]:
        """fsck of the closed store: ok, the blocks the store served; no orphan after compaction."""
        from tairstore.engine.fsck import fsck

        report = fsck(self.path)
        present = sum(v is not None for v in observed.values())
        bad = not report["ok"] or report["blocks_corrupt"]
        bad |= report["blocks"] > present or (report["blocks"] < present and not self.evicting)
        if compact:
            tally.runs["full compaction + fsck"] += 1
            bad |= bool(report["orphan_bytes"])
        if not bad:
            return []
        tally.fsck_failures += 1
        return [f"FSCK after close{' and compact(full=True)' if compact else ''}: "
                f"{report['blocks']} blocks vs {present} served, orphan_bytes="
                f"{report['orphan_bytes']} ok={report['ok']} {report} ({where})"]


def run_campaign(run_dir: str, tally: Tally, *, seed: int, iterations: int | None = None,
                 deadline: float | None = None, modes: tuple = MODES, evicting: bool = False,
                 progress: Callable[[str], None] | None = None) -> list[str]:
    """Run ``iterations`` kill / reopen / check rounds (or until ``deadline``) in ``run_dir``.

    ``evicting`` runs the store on a small SSD tier that evicts every namespace's blocks.

    Returns:
        every failure message; each names the seed, the iteration and the replay command.
    """
    loop = KillLoop(run_dir, seed, tuple(modes), evicting)
    failures: list[str] = []
    i = 0
    while (iterations is None or i < iterations) and (deadline is None or time.monotonic() < deadline):
        f = loop.iteration(i, tally)
        failures += f
        if f and progress:
            progress("\n".join(f))
        i += 1
    return failures
