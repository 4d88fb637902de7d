"""Reopen time: opening a cleanly closed store of many blocks, next to a bare scan of its index.

A cleanly closed store reopens from its LMDB index alone (the WAL holds nothing the index lacks;
``tests/engine/test_recovery.py`` checks that as behaviour). What is measured, per block count
(default 10,000 and 100,000 blocks of 4 KiB, written with ``durability="none"`` in batches of
1,000 through write sessions):

- ``open``: ``tairstore.open`` of the closed store, from the call to the store being usable,
  then ``close``-d outside the timed region. The first open after the build may still trim the
  WAL the build left; the table reports the best of ``--rounds`` opens, the steady state.
- ``scan``: the baseline, measured in the same round: open the same LMDB index directly
  (:class:`tairstore.index.lmdb_index.Index`) and decode every block record, which is the
  least an open that loads the index must do.

``x`` is open / scan of the best rounds: how much the store's open costs on top of reading its
index (building the in-memory block table, namespaces, segment accounting). The figure the test
suite used to assert (100,000 blocks reopen in under 1 s) is listed as a target, met or MISSED.

Run: ``python benchmarks/recovery.py`` (about a minute), ``--blocks 10000 --rounds 5`` to focus.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

import tairstore
from engine import timed  # benchmarks/engine.py, beside this script
from tairstore.index.lmdb_index import Index

BLOCK_BYTES = 4096
BATCH = 1000
#: The store's options: room for every block on SSD, a DRAM tier too small to matter.
OPTIONS = dict(dram_bytes=1 << 20, ssd_bytes=1 << 30, segment_bytes=64 << 20, durability="none")
#: The reopen target (seconds for 100,000 blocks) the engine aims for.
TARGET_BLOCKS, TARGET_S = 100_000, 1.0


def build(path: str, n: int) -> None:
    """Write ``n`` distinct blocks of BLOCK_BYTES into a new store at ``path`` and close it."""
    rows = np.random.default_rng(0).integers(0, 256, (BATCH, BLOCK_BYTES), dtype=np.uint8)
    with tairstore.open(path, **OPTIONS) as store:
        for b in range(0, n, BATCH):
            count = min(BATCH, n - b)
            keys = [b"blk-%09d" % (b + i) for i in range(count)]
            # Stamp each row with its block number, so every block is distinct.
            rows[:count, :8] = np.arange(b, b + count, dtype="<u8").view(np.uint8).reshape(count, 8)
            s = store.start_write(keys, [BLOCK_BYTES] * count)
            for i, k in enumerate(keys):
                store.write(s, k, rows[i])
            if store.finish_write(s, keys) != count:
                raise RuntimeError("a block of the build was not committed")


def open_store(path: str, n: int) -> float:
    """Seconds ``tairstore.open`` takes; checks the store holds ``n`` blocks, then closes it."""
    holder: list = []
    seconds = timed(lambda: holder.append(tairstore.open(path, **OPTIONS)))
    store = holder[0]
    try:
        if store.stats()["blocks"] != n:
            raise RuntimeError(f"reopened store holds {store.stats()['blocks']} blocks, not {n}")
    finally:
        store.close()
    return seconds


def scan_index(path: str, n: int) -> float:
    """Seconds to open the store's LMDB index directly and decode every block record."""
    def scan() -> None:
        index = Index(os.path.join(path, "index"))
        try:
            count = sum(1 for _ in index.items())
        finally:
            index.close()
        if count != n:
            raise RuntimeError(f"index holds {count} records, not {n}")
    return timed(scan)


def run(counts: Sequence[int], rounds: int, root: str) -> list[dict]:
    """Build a store per count, then time ``rounds`` interleaved opens and scans of it."""
    rows = []
    for n in counts:
        path = os.path.join(root, f"store-{n}")
        build_s = timed(lambda: build(path, n))
        opens, scans = [], []
        for _ in range(rounds):
            opens.append(open_store(path, n))
            scans.append(scan_index(path, n))
        rows.append({"blocks": n, "build_s": build_s, "open_s": opens, "scan_s": scans})
        shutil.rmtree(path, ignore_errors=True)
    return rows


def print_table(rows: list[dict]) -> None:
    """The table: best and median open and scan per block count, and their ratio."""
    print(f"{'blocks':>9} | {'build s':>8} | {'open s':>8} | {'open med':>8} | {'scan s':>8} | "
          f"{'x open/scan':>11} | {'x med':>6}")
    print(f"{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 13}|{'-' * 7}")
    for r in rows:
        best_open, best_scan = min(r["open_s"]), min(r["scan_s"])
        med_ratio = statistics.median(o / s for o, s in zip(r["open_s"], r["scan_s"]))
        print(f"{r['blocks']:>9} | {r['build_s']:>8.2f} | {best_open:>8.3f} | "
              f"{statistics.median(r['open_s']):>8.3f} | {best_scan:>8.3f} | "
              f"{best_open / best_scan:>11.2f} | {med_ratio:>6.2f}")
    for r in rows:
        if r["blocks"] == TARGET_BLOCKS:
            best = min(r["open_s"])
            verdict = "met" if best < TARGET_S else "MISSED"
            print(f"\ntarget: reopen {TARGET_BLOCKS} blocks in < {TARGET_S:.1f} s: "
                  f"{best:.3f} s, {verdict}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, build, measure, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--blocks", default="10000,100000",
                   help="comma-separated block counts (default: 10000,100000)")
    p.add_argument("--rounds", type=int, default=3, help="opens (and scans) per count")
    p.add_argument("--dir", default=".", help="where the temporary stores go (not a tmpfs)")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.blocks.split(",") if x]
    logging.disable(logging.WARNING)  # the tiny DRAM tier's watermark warning is expected
    root = tempfile.mkdtemp(prefix="tairstore-recovery-", dir=args.dir)
    try:
        print(f"reopen of a cleanly closed store, {BLOCK_BYTES} B blocks, best of {args.rounds}")
        print_table(run(counts, args.rounds, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
