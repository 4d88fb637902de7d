"""CI's short version of the stateful fault model (:mod:`tairstore.fuzz.stateful`).

The same rules under both drivers: Hypothesis (``TAIRSTORE_STATEFUL_FAULT_EXAMPLES`` examples,
300 by default, each a sequence of up to 30 rules that shrinks on failure) and the seeded
driver that ``tairstore fuzz stateful --seed S`` replays.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from tairstore.fuzz.model import Tally
from tairstore.fuzz.stateful import RULES, hypothesis_machine, run_seeded

EXAMPLES = int(os.environ.get("TAIRSTORE_STATEFUL_FAULT_EXAMPLES", "300"))
SEED = int(os.environ.get("TAIRSTORE_FUZZ_SEED", "20240601"))
#: Rules per Hypothesis example: enough for a fault to meet a restart and a crash.
STEPS = 30


def test_store_under_injected_faults_hypothesis():
    tally = Tally()
    machine = hypothesis_machine(tally)
    machine.TestCase.settings = settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
        suppress_health_check=list(HealthCheck), database=None)
    machine.TestCase().runTest()
    assert tally.ok, tally.table()
    assert tally.runs["stateful (hypothesis)"] >= EXAMPLES
    # Every fault kind was injected and answered as documented somewhere in the examples.
    for kind in ("enospc", "read eio", "bitflip", "fsync failure", "power loss"):
        assert tally.faults[kind] > 0, (kind, tally.table())
    assert tally.acked_checked > 0


def test_seeded_driver_is_clean_and_covers_every_rule():
    tally = Tally()
    failures: list[str] = []
    for i in range(40):
        failures += run_seeded(SEED + i, tally=tally)
    assert not failures, "\n".join(failures[:10])
    assert tally.ok, tally.table()
    for kind in ("enospc", "read eio", "bitflip", "fsync failure", "power loss"):
        assert tally.faults[kind] > 0, (kind, tally.table())
    assert tally.runs["stateful: reopen"] > 0 and tally.runs["stateful: crash + reopen"] > 0


def test_seeded_run_replays_exactly():
    """What ``tairstore fuzz stateful --seed S`` relies on: one seed, one run."""
    a, b = Tally(), Tally()
    assert run_seeded(SEED, tally=a) == run_seeded(SEED, tally=b) == []
    assert a.faults == b.faults and a.acked_checked == b.acked_checked


def test_rules_are_one_set():
    machine = hypothesis_machine()
    for name in RULES:
        assert callable(getattr(machine, name))
