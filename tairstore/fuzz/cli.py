"""``tairstore fuzz ...``: the crash and fault harness, run by users and contributors.

Subcommands built so far:

- ``crashpoints``: crash the fixed workload after every persistence point (``--point N``
  replays one), or run random crash runs (``--runs N --seed S``; ``--random-seed R`` replays
  one run exactly, as every failure message prints).
- ``crash``: the kill -9 loop (``--iterations N --seed S``): a writer process killed with
  SIGKILL at random moments, the store reopened and checked against the expected-state file
  after each kill (:mod:`tairstore.fuzz.killloop`).

Every failure prints the seed and the exact replay command; the exit status is 1 when any
invariant was violated.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile

__all__ = ["add_parser"]


def _crashpoints(args: argparse.Namespace) -> int:
    from tairstore.fuzz.crashpoints import enumerate_points, random_run_spec, random_runs, run_crash
    from tairstore.fuzz.model import Tally

    if not args.verbose:
        # The engine logs every simulated crash it survives; the table says what matters.
        logging.disable(logging.WARNING)
    tally = Tally()
    failures: list[str] = []

    def show(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="tairstore-fuzz-", dir=args.dir) as base:
        if args.random_seed is not None:
            failures, _ = run_crash(base, random_run_spec(args.random_seed), tally)
        elif args.runs:
            failures = random_runs(base, tally, seed=args.seed, runs=args.runs, progress=show)
        else:
            from tairstore.fuzz.faultfs import ALL_KINDS, CRASH_POINT_KINDS

            failures = enumerate_points(base, tally, seed=args.seed, durability=args.durability,
                                        only=args.point, progress=show,
                                        kinds=ALL_KINDS if args.writes else CRASH_POINT_KINDS)
    for f in failures:
        print(f)
    print(tally.table())
    return 0 if tally.ok else 1


def _crash(args: argparse.Namespace) -> int:
    from tairstore.fuzz.killloop import MODES, run_campaign
    from tairstore.fuzz.model import Tally

    if not args.verbose:
        logging.disable(logging.WARNING)
    modes = MODES if args.durability == "mixed" else tuple(args.durability.split(","))
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="tairstore-killloop-", dir=args.dir) as base:
        failures = run_campaign(base, tally, seed=args.seed, iterations=args.iterations,
                                modes=modes,
                                progress=lambda text: print(text, file=sys.stderr, flush=True))
    for f in failures:
        print(f)
    print(tally.table())
    return 0 if tally.ok else 1


def add_parser(subparsers) -> None:
    """Register ``fuzz`` and its subcommands on a ``tairstore`` argparse subparsers object."""
    p = subparsers.add_parser("fuzz", help="crash-recovery and fault-injection harness")
    sub = p.add_subparsers(dest="fuzz_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser("crashpoints", help="simulated crashes at every persistence point")
    c.add_argument("--seed", type=int, default=0, help="seeds the post-crash images / random runs")
    c.add_argument("--point", type=int, default=None, help="replay only this crash point")
    c.add_argument("--durability", default="sync", choices=("sync", "batch", "none"))
    c.add_argument("--writes", action="store_true", help="every write is a crash point too")
    c.add_argument("--runs", type=int, default=0, help="random crash runs instead of the enumeration")
    c.add_argument("--random-seed", type=int, default=None, help="replay one random crash run")
    c.add_argument("--dir", default=None, help="where to put scratch stores (default: temp dir)")
    c.set_defaults(func=_crashpoints)
    k = sub.add_parser("crash", help="kill -9 loop: a writer process SIGKILLed at random moments")
    k.add_argument("--iterations", type=int, default=20, help="kills (and reopens) to run")
    k.add_argument("--seed", type=int, default=0, help="the campaign seed")
    k.add_argument("--durability", default="mixed",
                   help='"mixed" (sync, sync, batch), or a comma list of sync/batch/none')
    k.add_argument("--dir", default=None, help="where to put the run directory (default: temp dir)")
    k.set_defaults(func=_crash)
