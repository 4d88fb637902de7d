"""The writer process of the kill -9 loop: ``python -m tairstore.fuzz.writer DIR ...``.

It opens the store in ``DIR``, sets the quota of the quota'd namespace, and runs a seeded
random mixed workload (:func:`tairstore.fuzz.workload.generate`: puts, write sessions committed
whole, in part or aborted, deletes, reads, syncs, compactions, and evictions by quota) until it
is killed, it runs out of operations, or ``--max-seconds`` pass. The harness
(:mod:`tairstore.fuzz.killloop`) kills it with SIGKILL at a random moment.

Every acknowledgement goes down stdout (a pipe), one flushed line each, so the harness knows
exactly what was promised before the kill::

    O                     about to open the store (recovery starts)
    R                     the store is open and the quota is set
    B <json changes>      an operation that may set these (ns, key hex, version|null) starts
    A <json changes>      ... and was acknowledged
    F <reason>            the operation in flight failed cleanly (capacity, exists, aborted)
    S                     a store.sync() was acknowledged
    X <message>           a read returned wrong bytes (W1 / R1), or a version other than the
                          one this run last acknowledged for the key (a stale read): exit status 3
    D                     the workload ended and the store closed cleanly

A line cut by the kill (no newline) is not an acknowledgement. Any exception other than a
clean capacity refusal is printed to stderr and ends the process with status 4.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from collections.abc import Callable

__all__ = ["PipeHooks", "main", "EXIT_BAD_READ", "EXIT_ERROR"]

#: Exit status when a read returned wrong bytes, and when the workload raised.
EXIT_BAD_READ = 3
EXIT_ERROR = 4
#: Operations generated per run: far more than a run lives (a kill comes within a second).
DEFAULT_OPS = 3000


class PipeHooks:
    """:class:`tairstore.fuzz.workload.Hooks` that print each event as one flushed line."""

    def __init__(self, out=None, exit_fn: Callable[[int], object] = os._exit) -> None:
        self.out = out or sys.stdout
        self.exit_fn = exit_fn  # os._exit: no cleanup may touch the store after a bad read
        # What this run itself acknowledged: (ns, key) -> version, None once deleted. Keys of
        # earlier runs are not in it; the harness checks those against its model after the kill.
        self.acked: dict[tuple[str, bytes], int | None] = {}

    def _emit(self, line: str) -> None:
        # One write + flush per line: what reached the pipe survives our SIGKILL.
        self.out.write(line + "\n")
        self.out.flush()

    @staticmethod
    def _changes(changes) -> str:
        return json.dumps([[ns, key.hex(), v] for ns, key, v in changes], separators=(",", ":"))

    def begin(self, changes) -> None:
        self._emit("B " + self._changes(changes))

    def ack(self, changes) -> None:
        self._emit("A " + self._changes(changes))
        for ns, key, version in changes:
            self.acked[(ns, key)] = version

    def failed(self, reason: str) -> None:
        self._emit("F " + reason.replace("\n", " ")[:200])

    def synced(self) -> None:
        self._emit("S")

    def bad_read(self, message: str) -> None:
        self._emit("X " + message.replace("\n", " "))
        self.exit_fn(EXIT_BAD_READ)

    def served(self, ns: str, key: bytes, version: int) -> None:
        """A read hit ``version``: it must be what this run last acknowledged for the key.

        One operation at a time and no crash in between, so nothing else is allowed: an
        evicted block is a miss, never an older version, and a deleted key stays absent.
        """
        if (ns, key) in self.acked and self.acked[(ns, key)] != version:
            self.bad_read(f"read of {ns}/{key.hex()} served version {version}; this run "
                          f"acknowledged {self.acked[(ns, key)]}")

    def mark(self, tag: str) -> None:
        """Emit a bare marker line (``O``, ``R``, ``D``)."""
        self._emit(tag)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, open the store, run the workload until killed or done."""
    ap = argparse.ArgumentParser(prog="python -m tairstore.fuzz.writer",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--first-version", type=int, required=True,
                    help="versions of this run start here (unique across runs)")
    ap.add_argument("--durability", default="sync", choices=("sync", "batch", "none"))
    ap.add_argument("--ssd-bytes", type=int, default=None,
                    help="the store's SSD tier (default: the roomy one of store_options)")
    ap.add_argument("--ops", type=int, default=DEFAULT_OPS)
    ap.add_argument("--max-seconds", type=float, default=30.0, help="safety net if never killed")
    args = ap.parse_args(argv)

    import logging

    import tairstore
    from tairstore.fuzz.check import all_keys
    from tairstore.fuzz.workload import (
        QUOTA_BYTES, QUOTA_NS, QUOTA_TIER_BYTES, SSD_BYTES, apply_op, generate, store_options,
    )

    # The harness reads stderr only when something failed; keep it to what matters.
    logging.disable(logging.WARNING)
    hooks = PipeHooks()
    hooks.mark("O")
    store = tairstore.open(args.path, **store_options(args.durability, args.ssd_bytes or SSD_BYTES))
    try:
        store.set_quota(QUOTA_NS, total_bytes=QUOTA_BYTES, tier_bytes=QUOTA_TIER_BYTES)
        present: dict[str, set[bytes]] = {}
        for ns, key in all_keys():
            if store.exists([key], namespace=ns)[0]:
                present.setdefault(ns, set()).add(key)
        hooks.mark("R")
        ops = generate(random.Random(args.seed), args.ops, args.first_version, present)
        end = time.monotonic() + args.max_seconds
        for op in ops:
            if time.monotonic() > end:
                break
            apply_op(store, op, hooks)
    except BaseException:  # noqa: BLE001 - report anything, the harness decides
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(EXIT_ERROR)
    store.close()
    hooks.mark("D")
    return 0


if __name__ == "__main__":
    sys.exit(main())
