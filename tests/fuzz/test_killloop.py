"""CI's short version of the kill -9 loop (:mod:`tairstore.fuzz.killloop`).

At least 20 real SIGKILLs of a real writer process on real files, in mixed durability (each
iteration draws ``sync``, ``batch`` or ``none``: a kill is a process crash, so every mode must
keep every acknowledged write): after each, fsck, reopen, W2 / W1 / R1 / C1 against the
expected-state file, and every other iteration a full compaction that must leave no orphaned
bytes. A second, shorter campaign runs the store on an SSD tier that evicts every namespace's
blocks. ``TAIRSTORE_KILL_ITERATIONS`` raises the count; ``TAIRSTORE_FUZZ_SEED`` changes the
campaign seed.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys

import pytest

import tairstore
from tairstore.fuzz.check import observe
from tairstore.fuzz.killloop import EXPECTED_FILE, MODES, parse_lines, run_campaign
from tairstore.fuzz.model import Expected, Tally
from tairstore.fuzz.workload import (
    EVICTING_SSD_BYTES, NAMESPACES, QUOTA_BYTES, QUOTA_NS, QUOTA_TIER_BYTES, ModelHooks, apply_op,
    generate, store_options,
)
from tairstore.fuzz.writer import EXIT_BAD_READ, PipeHooks

#: The issue asks CI for at least 20 real SIGKILLs; a few extra cover the kills that land
#: after a writer already finished (none do in practice) without falling under 20.
ITERATIONS = int(os.environ.get("TAIRSTORE_KILL_ITERATIONS", "24"))
#: The evicting campaign: fewer kills, enough for blocks to be evicted around them.
EVICTING_ITERATIONS = max(8, ITERATIONS // 3)
SEED = int(os.environ.get("TAIRSTORE_FUZZ_SEED", "20240601"))


def test_kill9_loop_loses_nothing_acknowledged_in_mixed_durability(tmp_path):
    tally = Tally()
    failures = run_campaign(str(tmp_path), tally, seed=SEED, iterations=ITERATIONS, modes=MODES)
    assert not failures, "\n".join(failures[:20]) + f"\n\n{tally.table()}"
    assert tally.ok, tally.table()
    assert tally.faults["sigkill"] >= 20, tally.table()
    assert tally.acked_checked > 0
    assert tally.runs["full compaction + fsck"] > 0
    # The expected state persists between iterations in the run directory.
    assert os.path.exists(tmp_path / EXPECTED_FILE)
    Expected.load(str(tmp_path / EXPECTED_FILE))


def test_kill9_loop_on_an_evicting_ssd_serves_only_exact_allowed_blocks(tmp_path):
    """Blocks of every namespace are evicted, also around the kill: absent is allowed, wrong is not."""
    tally = Tally()
    failures = run_campaign(str(tmp_path), tally, seed=SEED, iterations=EVICTING_ITERATIONS,
                            modes=MODES, evicting=True)
    assert not failures, "\n".join(failures[:20]) + f"\n\n{tally.table()}"
    assert tally.ok, tally.table()
    assert tally.faults["sigkill"] >= EVICTING_ITERATIONS // 2, tally.table()
    assert tally.acked_checked > 0, tally.table()
    # How many acknowledged blocks a kill found evicted depends on how far each writer got
    # (kill moments are wall-clock): the table shows it; that the profile evicts is the next test.


def test_the_evicting_profile_evicts_acknowledged_blocks_of_every_namespace(tmp_path):
    """The evicting campaign's store, run in-process on a fixed workload, evicts in both namespaces."""
    model = Expected("sync", frozenset(NAMESPACES))
    hooks = ModelHooks(model, [])
    with tairstore.open(tmp_path / "store", **store_options("sync", EVICTING_SSD_BYTES)) as store:
        store.set_quota(QUOTA_NS, total_bytes=QUOTA_BYTES, tier_bytes=QUOTA_TIER_BYTES)
        evicted: set[str] = set()
        for i, op in enumerate(generate(random.Random(SEED), 1500, 1)):
            apply_op(store, op, hooks)
            if i % 25 == 0:  # acknowledged, not deleted, yet absent: evicted
                evicted |= {ns for (ns, key), v in observe(store).items()
                            if v is None and model.current(ns, key) is not None}
        assert not hooks.bad
        assert store.stats()["counters"]["evictions_ssd"] > 0
    assert evicted == set(NAMESPACES)


def test_cut_last_line_is_not_an_acknowledgement():
    model = Expected("sync", frozenset())
    key = b"k000".hex()
    lines = [f'B [["default","{key}",7]]\n', f'A [["default","{key}",7]]\n',
             f'B [["default","{key}",null]]\n', f'A [["default","{key}",null]']  # cut by the kill
    bad, done = parse_lines(lines, model)
    assert bad == [] and not done
    # The delete began but its ack was cut: the key may show the old value or be absent.
    assert model.allowed("default", b"k000") == {7, None}
    assert model.current("default", b"k000") == 7


def test_writer_reports_acks_on_its_pipe(tmp_path):
    """The writer runs to its end on its own (no kill) and every line parses."""
    out = subprocess.run(
        [sys.executable, "-m", "tairstore.fuzz.writer", str(tmp_path / "store"), "--seed", "5",
         "--first-version", "1", "--ops", "40"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines(keepends=True)
    assert lines[0] == "O\n" and "R\n" in lines and lines[-1] == "D\n"
    model = Expected("sync", frozenset({"q"}))
    bad, done = parse_lines(lines, model)
    assert done and not bad
    assert any(line.startswith("A ") and json.loads(line[2:]) for line in lines)


def test_writer_reports_a_stale_read_as_bad():
    """A read of a version other than the one this run acknowledged is an ``X`` line, status 3."""
    class Exited(Exception):
        pass

    def exit_fn(code: int) -> None:
        raise Exited(code)

    out = io.StringIO()
    hooks = PipeHooks(out, exit_fn)
    hooks.ack([("default", b"k000", 7)])
    hooks.served("default", b"k000", 7)  # the acknowledged version: fine
    hooks.served("default", b"k001", 3)  # not acknowledged by this run: judged after the kill
    hooks.ack([("default", b"k000", None)])
    with pytest.raises(Exited, match=str(EXIT_BAD_READ)):
        hooks.served("default", b"k000", 7)  # deleted, yet served
    assert out.getvalue().splitlines()[-1].startswith("X read of default/")


def test_a_kill_inside_the_first_open_before_the_marker_is_not_a_failure_but_later_it_is(tmp_path):
    """A writer killed inside the store's very first open may leave its directory without the
    TAIRSTORE marker (created, locked, not yet initialised): nothing was written, so there is
    nothing to check and the next open initialises it. Once any write began, a missing marker
    is a reopen failure."""
    from tairstore.engine.datadir import LOCK
    from tairstore.fuzz.killloop import KillLoop

    loop = KillLoop(str(tmp_path / "run"), seed=1)
    os.makedirs(loop.path)
    open(os.path.join(loop.path, LOCK), "w").close()
    model = loop._load()
    tally = Tally()
    assert loop._reopen_and_check(random.Random(1), model, "sync", tally, "first open") == []
    assert tally.reopen_failures == 0

    model.begin([(QUOTA_NS, b"k", 1)])
    model.ack([(QUOTA_NS, b"k", 1)])
    failures = loop._reopen_and_check(random.Random(1), model, "sync", tally, "after a write")
    assert failures and "REOPEN FAILED" in failures[0] and tally.reopen_failures == 1
