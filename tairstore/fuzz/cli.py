"""``tairstore fuzz ...``: the crash and fault harness, run by users and contributors.

Subcommands built so far:

- ``crashpoints``: crash the fixed workload after every persistence point (``--point N``
  replays one), or run random crash runs (``--runs N --seed S``; ``--random-seed R`` replays
  one run exactly, as every failure message prints).
- ``crash``: the kill -9 loop (``--iterations N --seed S``): a writer process killed with
  SIGKILL at random moments, the store reopened and checked against the expected-state file
  after each kill (:mod:`tairstore.fuzz.killloop`).
- ``stateful``: the stateful fault model, seeded driver (``--seed S`` replays a run exactly;
  ``--runs N`` runs seeds S..S+N-1) (:mod:`tairstore.fuzz.stateful`).
- ``fileloss``: whole-file loss, M1 (``--seed S --runs N``) (:mod:`tairstore.fuzz.fileloss`).
- ``decoders``: the decoder fuzzers (``--target NAME --seed S --count N``)
  (:mod:`tairstore.fuzz.decoders`).
- ``all --minutes M``: every harness interleaved for M minutes, ending with the table
  (:mod:`tairstore.fuzz.campaign`).

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


def _stateful(args: argparse.Namespace) -> int:
    from tairstore.fuzz.model import Tally
    from tairstore.fuzz.stateful import run_seeded

    # CRITICAL: each injected fault makes the engine log its (correct) error answer.
    logging.disable(logging.NOTSET if args.verbose else logging.CRITICAL)
    tally = Tally()
    failures: list[str] = []
    for i in range(args.runs):
        f = run_seeded(args.seed + i, steps=args.steps, base=args.dir, tally=tally)
        for message in f:
            print(message, file=sys.stderr, flush=True)
        failures += f
    for f in failures:
        print(f)
    print(tally.table())
    return 0 if tally.ok and not failures else 1


def _fileloss(args: argparse.Namespace) -> int:
    from tairstore.fuzz.fileloss import run_file_loss
    from tairstore.fuzz.model import Tally

    logging.disable(logging.NOTSET if args.verbose else logging.CRITICAL)
    tally = Tally()
    base = args.dir or tempfile.mkdtemp(prefix="tairstore-fileloss-")
    failures: list[str] = []
    for i in range(args.runs):
        failures += run_file_loss(base, args.seed + i, tally)
    for f in failures:
        print(f)
    print(tally.table())
    return 0 if tally.ok and not failures else 1


def _decoders(args: argparse.Namespace) -> int:
    from tairstore.fuzz.decoder_targets import TARGETS
    from tairstore.fuzz.decoders import run_seeded
    from tairstore.fuzz.model import Tally

    logging.disable(logging.NOTSET if args.verbose else logging.CRITICAL)
    tally = Tally()
    names = list(TARGETS) if args.target == "all" else [args.target]
    for name in names:
        n, failures = run_seeded(name, args.seed, args.count)
        tally.decoder_inputs[name] += n
        tally.decoder_failures += len(failures)
        for f in failures:
            print(f)
    print(tally.table())
    return 0 if tally.ok else 1


def _all(args: argparse.Namespace) -> int:
    from tairstore.fuzz.campaign import main_all

    logging.disable(logging.NOTSET if args.verbose else logging.CRITICAL)
    return main_all(args.minutes, args.seed, args.dir)


def _scratch_dir(value: str) -> str:
    """``--dir``: the scratch stores' parent, created (with its parents) if missing; a path that
    is not a writable directory is refused before any harness runs."""
    import os

    try:
        os.makedirs(value, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot create {value!r}: {exc.strerror}") from None
    if not os.access(value, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{value!r} is not a writable directory")
    return value


def _nonnegative(parse, kind: str, bound: str):
    """An argparse type: ``parse`` the value (``kind`` names what it must be) and refuse it
    unless it is finite and >= 0 (``bound`` says so in the error)."""
    def check(value: str):
        try:
            number = parse(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {kind}: {value!r}") from None
        if not 0 <= number < float("inf"):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value!r}")
        return number
    return check


# --minutes; a count (runs, steps, iterations, inputs).
_minutes = _nonnegative(float, "a number", "a finite number >= 0")
_count = _nonnegative(int, "an integer", ">= 0")


def add_parser(subparsers) -> None:
    """Register ``fuzz`` and its subcommands on a ``tairstore`` argparse subparsers object."""
    p = subparsers.add_parser("fuzz", help="crash-recovery and fault-injection harness")
    sub = p.add_subparsers(dest="fuzz_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser("crashpoints", help="simulated crashes at every persistence point")
    c.add_argument("--seed", type=int, default=0, help="seeds the post-crash images / random runs")
    c.add_argument("--point", type=int, default=None, help="replay only this crash point")
    c.add_argument("--durability", default="sync", choices=("sync", "batch", "none", "writeback"))
    c.add_argument("--writes", action="store_true", help="every write is a crash point too")
    c.add_argument("--runs", type=_count, default=0,
                   help="random crash runs instead of the enumeration")
    c.add_argument("--random-seed", type=int, default=None, help="replay one random crash run")
    c.add_argument("--dir", type=_scratch_dir, default=None,
                   help="where to put scratch stores (default: temp dir)")
    c.set_defaults(func=_crashpoints)
    k = sub.add_parser("crash", help="kill -9 loop: a writer process SIGKILLed at random moments")
    k.add_argument("--iterations", type=_count, default=20, help="kills (and reopens) to run")
    k.add_argument("--seed", type=int, default=0, help="the campaign seed")
    k.add_argument("--durability", default="mixed",
                   help='"mixed" (sync, sync, batch, none), or a comma list of sync/batch/none')
    k.add_argument("--dir", type=_scratch_dir, default=None,
                   help="where to put the run directory (default: temp dir)")
    k.set_defaults(func=_crash)
    s = sub.add_parser("stateful", help="stateful model of the store under injected faults")
    s.add_argument("--seed", type=int, default=0, help="the run's seed (a failure prints it)")
    s.add_argument("--runs", type=_count, default=1, help="runs, with seeds SEED, SEED+1, ...")
    s.add_argument("--steps", type=_count, default=40, help="rules per run")
    s.add_argument("--dir", type=_scratch_dir, default=None,
                   help="where to put scratch stores (default: temp dir)")
    s.set_defaults(func=_stateful)
    f = sub.add_parser("fileloss", help="M1: an index, WAL or segment file deleted, emptied, "
                       "truncated or swapped with another store's")
    f.add_argument("--seed", type=int, default=0, help="the first run's seed (a failure prints it)")
    f.add_argument("--runs", type=_count, default=1, help="runs, with seeds SEED, SEED+1, ...")
    f.add_argument("--dir", type=_scratch_dir, default=None,
                   help="where to put scratch stores (default: temp dir)")
    f.set_defaults(func=_fileloss)
    from tairstore.fuzz.decoder_targets import TARGETS

    d = sub.add_parser("decoders", help="fuzz the WAL, segment, protocol, HTTP and config decoders")
    d.add_argument("--target", default="all", choices=["all", *TARGETS])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--count", type=_count, default=10_000, help="inputs per target")
    d.set_defaults(func=_decoders)
    a = sub.add_parser("all", help="every harness interleaved for --minutes, then the table")
    a.add_argument("--minutes", type=_minutes, required=True)
    a.add_argument("--seed", type=int, default=0, help="the campaign seed")
    a.add_argument("--dir", type=_scratch_dir, default=None,
                   help="where to put scratch stores (default: temp dir)")
    a.set_defaults(func=_all)
