"""SIGKILL crash test of the store: W2 and R1 across real process kills, with real files.

A writer process (``tests/crash_writer.py``) runs a seeded random workload on a store and
reports every state-changing operation before it starts (intent) and after it returned (ack).
The harness kills it with SIGKILL at a random moment, reopens the store in this process, reads
every key of the key space, and checks what it finds against what was acknowledged:

- **W2**: a key acknowledged as put/committed and not acknowledged as deleted afterwards must be
  present and byte-exact, unless the store may have evicted it (a small SSD evicts whole
  segments FIFO); a key whose operation was in flight at the kill may be old, new or absent.
- **R1**: every byte read is checked against the content function; a key never acknowledged
  may be absent or, if present, byte-exact and of a version some operation tried to write.
- ``fsck`` reports ok with 0 corrupt blocks, and reopening never fails.

The workload then resumes on the same directory with a new seed, so every kill after the first
also tests the recovery of a store that was itself recovered (and some kills land during the
writer's own recovery at open).

``TAIRSTORE_CRASH_SEED`` replays a campaign; ``TAIRSTORE_CRASH_ITERATIONS`` raises the number of
kills per durable variant for long runs.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import tairstore
from tairstore.engine.fsck import fsck

WRITER = Path(__file__).with_name("crash_writer.py")
_spec = importlib.util.spec_from_file_location("crash_writer", WRITER)
crash_writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crash_writer)

NKEYS = 150
MIN_DELAY_S, MAX_DELAY_S = 0.05, 0.6
# Some kills are aimed at the writer's own recovery (the milliseconds after it reports "O"),
# so that the next open recovers a store whose recovery was itself interrupted.
KILL_DURING_OPEN_P = 0.2
MAX_OPEN_DELAY_S = 0.012  # a writer's open of this small store takes ~10 ms
READY_TIMEOUT_S = 30.0

# Small tiers: DRAM eviction and whole-segment SSD eviction happen within a few hundred ops.
EVICTING = dict(dram_bytes=2 << 20, ssd_bytes=8 << 20, segment_bytes=1 << 20)
# Roomy SSD: a run writes at most a few tens of MiB, so nothing is ever evicted.
ROOMY = dict(dram_bytes=2 << 20, ssd_bytes=8 << 30, segment_bytes=16 << 20)


def _iterations(default: int) -> int:
    env = os.environ.get("TAIRSTORE_CRASH_ITERATIONS")
    return max(default, int(env)) if env else default


def _campaign_seed() -> int:
    env = os.environ.get("TAIRSTORE_CRASH_SEED")
    return int(env) if env else random.SystemRandom().randrange(1 << 32)


# -- the writer's report ---------------------------------------------------------------------

@dataclass
class Op:
    """One state-changing operation of the writer, as reported on its stdout."""

    seq: int
    kind: str  # put | commit | abort | delete | sync
    items: list[tuple[bytes, int | None]]  # (key, version); version None for delete
    acked: bool = False
    result: int | None = None


def parse_report(lines: list[str]) -> tuple[bool, list[Op], list[str]]:
    """Parse the writer's lines into (saw_ready, operations in order, BAD messages).

    A last line without its newline (the kill cut it) is ignored: it is not an ack.
    """
    ready = False
    ops: list[Op] = []
    bad: list[str] = []
    for line in lines:
        if not line.endswith("\n"):
            continue
        parts = line.split()
        if not parts:
            continue
        tag = parts[0]
        if tag == "R":
            ready = True
        elif tag == "BAD":
            bad.append(line.strip())
        elif tag == "I":
            seq, kind = int(parts[1]), parts[2]
            items: list[tuple[bytes, int | None]] = []
            if kind == "put":
                items = [(bytes.fromhex(parts[3]), int(parts[4]))]
            elif kind in ("commit", "abort"):
                for item in (parts[3].split(",") if len(parts) > 3 else []):
                    k, v = item.split(":")
                    items.append((bytes.fromhex(k), int(v)))
            elif kind == "delete":
                items = [(bytes.fromhex(k), None) for k in parts[3].split(",")]
            ops.append(Op(seq, kind, items))
        elif tag == "A":
            seq = int(parts[1])
            # One operation at a time: an ack always answers the last intent.
            assert ops and ops[-1].seq == seq and not ops[-1].acked, f"stray ack: {line!r}"
            ops[-1].acked = True
            ops[-1].result = int(parts[3]) if len(parts) > 3 else None
    return ready, ops, bad


# -- what a crash may leave ------------------------------------------------------------------

@dataclass
class Allowed:
    """What a key may look like after the crash."""

    versions: set[int] = field(default_factory=set)
    absent_ok: bool = True


def _apply(cur: dict[bytes, int | None], op: Op) -> None:
    """Apply an acknowledged operation to the model state."""
    if op.kind == "put" and op.result == 1:
        cur[op.items[0][0]] = op.items[0][1]
    elif op.kind == "commit":
        assert op.result == len(op.items)
        for k, v in op.items:
            cur[k] = v
    elif op.kind == "delete":
        for k, _ in op.items:
            cur[k] = None


def allowed_after_sync_crash(baseline: dict[bytes, int | None], ops: list[Op], *,
                             evicting: bool) -> dict[bytes, Allowed]:
    """``durability="sync"``: every ack is durable; only the in-flight operation is open."""
    cur = dict(baseline)
    for op in ops:
        if op.acked:
            _apply(cur, op)
    out = {k: Allowed({v} if v is not None else set(), evicting or v is None) for k, v in cur.items()}
    if ops and not ops[-1].acked:
        op = ops[-1]
        for k, v in op.items:
            a = out.setdefault(k, Allowed())
            if op.kind in ("put", "commit"):
                a.versions.add(v)
            elif op.kind == "delete":
                a.absent_ok = True
    return out


def allowed_after_batch_crash(baseline: dict[bytes, int | None], ops: list[Op]) -> dict[bytes, Allowed]:
    """``durability="batch"``: only what an acknowledged ``store.sync()`` covered is promised.

    A key untouched since the last acknowledged sync must be as it was then; a key touched
    since may be in its synced state or any state an operation since then tried to give it.
    """
    cur = dict(baseline)
    synced = dict(baseline)
    touched: dict[bytes, set[int]] = {}
    maybe_deleted: set[bytes] = set()
    for op in ops:
        if op.kind == "sync" and op.acked:
            synced = dict(cur)
            touched, maybe_deleted = {}, set()
            continue
        if op.kind in ("put", "commit") and (not op.acked or op.kind == "commit" or op.result == 1):
            for k, v in op.items:
                touched.setdefault(k, set()).add(v)
        elif op.kind == "delete":
            maybe_deleted.update(k for k, _ in op.items)
        if op.acked:
            _apply(cur, op)
    out: dict[bytes, Allowed] = {}
    for k in set(synced) | set(touched) | maybe_deleted:
        v = synced.get(k)
        versions = ({v} if v is not None else set()) | touched.get(k, set())
        out[k] = Allowed(versions, v is None or k in maybe_deleted)
    return out


# -- the harness -----------------------------------------------------------------------------

@dataclass
class Campaign:
    """A series of kill / reopen / check rounds on one store directory."""

    path: Path
    durability: str
    config: dict
    evicting: bool
    seed: int
    kills: int = 0
    reopen_failures: int = 0
    acks_checked: int = 0
    blocks_verified: int = 0
    killed_during_open: int = 0
    baseline: dict[bytes, int | None] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def where(self, i: int, run_seed: int) -> str:
        return (f"[{self.durability} evicting={self.evicting} campaign seed={self.seed} "
                f"iteration={i} run seed={run_seed}]")

    def run_writer(self, i: int, run_seed: int, rng: random.Random) -> list[str]:
        """Start the writer, kill it with SIGKILL at a random moment, return its lines."""
        cmd = [sys.executable, str(WRITER), str(self.path), "--seed", str(run_seed),
               "--run", str(i + 1), "--durability", self.durability, "--keys", str(NKEYS),
               "--dram-bytes", str(self.config["dram_bytes"]),
               "--ssd-bytes", str(self.config["ssd_bytes"]),
               "--segment-bytes", str(self.config["segment_bytes"])]
        stderr_path = self.path.parent / f"writer-{i}.stderr"
        lines: list[str] = []
        opening = threading.Event()
        ready = threading.Event()

        def drain(stream) -> None:
            # Drained continuously, so the writer never blocks on a full pipe.
            for line in stream:
                lines.append(line)
                if line == "O\n":
                    opening.set()
                elif line == "R\n":
                    ready.set()

        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        reader = threading.Thread(target=drain, args=(proc.stdout,), daemon=True)
        reader.start()
        try:
            if rng.random() < KILL_DURING_OPEN_P:
                event, delay = opening, rng.uniform(0.0, MAX_OPEN_DELAY_S)
            else:
                event, delay = ready, rng.uniform(MIN_DELAY_S, MAX_DELAY_S)
            if not event.wait(READY_TIMEOUT_S) and proc.poll() is None:
                pytest.fail(f"{self.where(i, run_seed)} writer never opened the store: "
                            f"{stderr_path.read_text()[-3000:]}")
            time.sleep(delay)
            rc = proc.poll()
            if rc is None:
                os.kill(proc.pid, signal.SIGKILL)
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=30)
        proc.stdout.close()
        bad = [ln for ln in lines if ln.startswith("BAD")]
        assert not bad, f"{self.where(i, run_seed)} the writer read wrong bytes: {bad}"
        if rc != -signal.SIGKILL:
            # It died by itself: a failed open is a reopen failure, anything else a crash.
            stderr = stderr_path.read_text()
            if "Traceback" in stderr:
                self.reopen_failures += not ready.is_set()
            pytest.fail(f"{self.where(i, run_seed)} writer exited with {rc}: {stderr[-3000:]}")
        if not ready.is_set():
            self.killed_during_open += 1
        self.kills += 1
        return lines

    def check(self, i: int, run_seed: int, lines: list[str]) -> None:
        """Reopen, read every key, compare with what the writer's report allows; then fsck."""
        where = self.where(i, run_seed)
        _, ops, _ = parse_report(lines)
        if self.durability == "sync":
            allowed = allowed_after_sync_crash(self.baseline, ops, evicting=self.evicting)
        else:
            allowed = allowed_after_batch_crash(self.baseline, ops)
        try:
            store = tairstore.open(self.path, durability=self.durability, **self.config)
        except Exception as exc:  # noqa: BLE001 - counted, then reported with the seed
            self.reopen_failures += 1
            raise AssertionError(f"{where} reopening after SIGKILL failed: {exc!r}") from exc
        try:
            keys = [crash_writer.key_name(j) for j in range(NKEYS)]
            exists = store.exists(keys)
            observed: dict[bytes, int | None] = {}
            problems: list[str] = []
            for key, ex in zip(keys, exists):
                view = store.get(key)
                for _ in range(3):
                    # A read racing background compaction of its segment is a documented miss
                    # ("moved meanwhile"), and a tier over its watermark may evict at open:
                    # ask again before calling a present key unreadable.
                    if view is not None or not (ex and store.exists([key])[0]):
                        break
                    view = store.get(key)
                if view is None:
                    observed[key] = None
                    if ex and store.exists([key])[0]:
                        problems.append(f"{key!r}: exists() says present but get() misses")
                else:
                    version, why = crash_writer.verify(key, view)
                    view.release()
                    observed[key] = version
                    if why:
                        problems.append(f"{key!r}: R1 violated, wrong bytes: {why}")
                        continue
                a = allowed.get(key, Allowed())
                got = observed[key]
                if got is None and not a.absent_ok:
                    problems.append(f"{key!r}: W2 violated, acknowledged version "
                                    f"{sorted(a.versions)} is missing")
                elif got is not None and got not in a.versions:
                    problems.append(f"{key!r}: holds version {got}, allowed {sorted(a.versions)} "
                                    f"(absent ok: {a.absent_ok})")
                elif got is not None:
                    self.blocks_verified += 1
                    self.acks_checked += not a.absent_ok
            stats = store.stats()
            present = sum(v is not None for v in observed.values())
            assert stats["counters"]["checksum_errors"] == 0, f"{where} {stats['counters']}"
            # With small tiers the maintenance thread may still evict while we look.
            assert stats["blocks"] <= present if self.evicting else stats["blocks"] == present, where
        finally:
            store.close()
        in_flight = ops[-1] if ops and not ops[-1].acked else None
        assert not problems, (f"{where} after {len(ops)} ops (in flight at kill: {in_flight}):\n"
                              + "\n".join(problems[:20]))
        report = fsck(str(self.path))
        assert report["ok"] and report["blocks_corrupt"] == 0, f"{where} fsck: {report}"
        assert report["blocks"] <= present if self.evicting else report["blocks"] == present, \
            f"{where} {report}"
        # No space leaked: after a full compaction every byte on disk is a live record or a
        # tombstone still needed, whatever half-done compaction, eviction or demotion the kill
        # (the writer compacts now and then, and its small DRAM tier drops copies) left.
        # No maintenance thread: an eviction after the full compaction would leave a segment
        # with no live record that only the next pass reclaims (not a leak; a race of the check).
        with tairstore.open(self.path, durability=self.durability, background=False,
                            **self.config) as store:
            store.compact(wait=True, full=True)
        report = fsck(str(self.path))
        assert report["ok"] and report["orphan_bytes"] == 0, f"{where} space leaked: {report}"
        # What we saw is durable now (recovery applied it to LMDB): the next run starts from it.
        self.baseline = observed
        self.log.append(f"iteration {i}: run seed {run_seed}, {len(ops)} ops, "
                        f"{sum(v is not None for v in observed.values())} keys present")

    def run(self, kills: int, budget_s: float) -> None:
        """Kill, reopen and check ``kills`` times (stopping early only past ``budget_s``)."""
        rng = random.Random(self.seed)
        deadline = time.monotonic() + budget_s
        print(f"crash campaign: durability={self.durability} evicting={self.evicting} "
              f"seed={self.seed} kills={kills} (replay with TAIRSTORE_CRASH_SEED={self.seed})")
        for i in range(kills):
            if time.monotonic() > deadline:
                break
            run_seed = rng.randrange(1 << 32)
            lines = self.run_writer(i, run_seed, rng)
            self.check(i, run_seed, lines)
        print(f"  {self.kills} kills ({self.killed_during_open} during open), "
              f"{self.blocks_verified} blocks verified byte-exact ({self.acks_checked} of them required), "
              f"reopen failures: {self.reopen_failures}")
        assert self.reopen_failures == 0
        # A slow machine may stop at the time budget; it must still have done real work.
        assert self.kills >= max(1, kills // 2), f"only {self.kills} of {kills} kills in {budget_s} s"


def _campaign(tmp_path: Path, durability: str, config: dict, evicting: bool, kills: int) -> Campaign:
    c = Campaign(tmp_path / "store", durability, config, evicting, _campaign_seed())
    c.run(kills, budget_s=20.0 + 4.0 * kills)
    return c


def test_sigkill_sync_small_ssd_acked_blocks_exact_or_evicted(tmp_path):
    """Sync mode with constant segment eviction: nothing present is ever wrong."""
    _campaign(tmp_path, "sync", EVICTING, evicting=True, kills=_iterations(15))


def test_sigkill_sync_roomy_ssd_every_acked_block_survives(tmp_path):
    """Sync mode without eviction: every acknowledged, not deleted block must be there."""
    c = _campaign(tmp_path, "sync", ROOMY, evicting=False, kills=_iterations(12))
    assert c.acks_checked > 0, "no acknowledged block was ever checked: the workload did nothing"


def test_sigkill_batch_only_synced_blocks_required(tmp_path):
    """Batch mode: blocks covered by an acknowledged ``sync()`` survive; the rest is exact or absent."""
    _campaign(tmp_path, "batch", ROOMY, evicting=False, kills=max(4, _iterations(4) // 3))


# -- the model itself (fast, no processes): a wrong model would hide bugs --------------------

def _ops(*specs: tuple) -> list[Op]:
    return [Op(i + 1, kind, items, acked, result) for i, (kind, items, acked, result) in enumerate(specs)]


def test_model_sync_in_flight_put_may_or_may_not_land():
    k = b"k"
    ops = _ops(("put", [(k, 1)], True, 1), ("delete", [(k, None)], True, 1), ("put", [(k, 2)], False, None))
    a = allowed_after_sync_crash({}, ops, evicting=False)[k]
    assert a.versions == {2} and a.absent_ok


def test_model_sync_acked_put_is_required():
    k = b"k"
    a = allowed_after_sync_crash({}, _ops(("put", [(k, 1)], True, 1)), evicting=False)[k]
    assert a.versions == {1} and not a.absent_ok
    a = allowed_after_sync_crash({}, _ops(("put", [(k, 1)], True, 1)), evicting=True)[k]
    assert a.versions == {1} and a.absent_ok


def test_model_batch_requires_only_synced_state():
    k1, k2 = b"k1", b"k2"
    ops = _ops(("put", [(k1, 1)], True, 1), ("sync", [], True, None),
               ("put", [(k2, 3)], True, 1), ("delete", [(k1, None)], True, 1))
    out = allowed_after_batch_crash({}, ops)
    assert out[k1].versions == {1} and out[k1].absent_ok
    assert out[k2].versions == {3} and out[k2].absent_ok
    out = allowed_after_batch_crash({}, ops[:3])
    assert not out[k1].absent_ok


def test_writer_content_is_deterministic_and_key_bound():
    a = crash_writer.content(b"key-00001", 7)
    assert a == crash_writer.content(b"key-00001", 7)
    assert crash_writer.verify(b"key-00001", a) == (7, None)
    assert crash_writer.verify(b"key-00002", a)[1] is not None
    flipped = bytearray(a)
    flipped[-1] ^= 1
    assert crash_writer.verify(b"key-00001", flipped)[1] is not None
