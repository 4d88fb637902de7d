"""Reopening a store: how long ``tairstore.open`` takes for N committed blocks.

A cleanly closed store reopens from LMDB alone (no segment scan, no WAL to replay): the cost is
reading every index entry into the catalog (a fixed-width ``struct.unpack`` per entry, then its
policy and accounting). This measures that for ``--blocks`` blocks of 4 KiB, and the same store
reopened after a ``kill -9``-like stop (the WAL tail replayed, every replayed block verified),
next to a baseline in the same run: iterating LMDB's entries with the same ``struct`` layout and
nothing else.

Run: ``python benchmarks/recovery.py`` (100,000 blocks, about half a minute to build),
``--blocks 20000`` for a quick look.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import tempfile
import time

import lmdb
import numpy as np

import tairstore

BLOCK = 4096
BATCH = 1000


def build(path: str, n: int) -> None:
    rows = np.random.default_rng(0).integers(0, 256, (BATCH, BLOCK), dtype=np.uint8)
    with tairstore.open(path, dram_bytes=1 << 20, ssd_bytes=max(1 << 30, 2 * n * BLOCK),
                        segment_bytes=64 << 20, durability="none", background=False) as s:
        for b in range(0, n, BATCH):
            keys = [b"blk-%08d" % i for i in range(b, min(n, b + BATCH))]
            s.put_many(keys, list(rows[: len(keys)]))


def reopen(path: str) -> float:
    t0 = time.perf_counter()
    s = tairstore.open(path, dram_bytes=1 << 20, ssd_bytes=1 << 40, background=False)
    dt = time.perf_counter() - t0
    s.close()
    return dt


def lmdb_scan(path: str) -> float:
    """The floor: read every entry of the blocks table and unpack it, nothing more."""
    env = lmdb.open(os.path.join(path, "index"), readonly=True, lock=False, max_dbs=8, subdir=True)
    unpack = struct.Struct("<QIQQQQQ").unpack
    t0 = time.perf_counter()
    with env.begin() as txn:
        db = env.open_db(b"blocks", txn=txn, create=False)
        n = sum(1 for _, v in txn.cursor(db) if unpack(v))
    dt = time.perf_counter() - t0
    env.close()
    assert n > 0
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=".", help="where the store goes (not a tmpfs)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix=".tairstore-bench-recovery-", dir=args.dir)
    try:
        path = os.path.join(tmp, "s")
        t0 = time.perf_counter()
        build(path, args.blocks)
        built = time.perf_counter() - t0
        opens = [reopen(path) for _ in range(args.rounds)]
        scans = [lmdb_scan(path) for _ in range(args.rounds)]
        best_open, best_scan = min(opens), min(scans)
        print(f"{args.blocks:,} blocks of {BLOCK // 1024} KiB, built in {built:.1f} s (put_many of {BATCH})")
        print(f"{'':28} {'best s':>8} {'us/block':>9} {'x scan':>7}")
        print(f"{'reopen (clean close)':28} {best_open:>8.3f} {best_open / args.blocks * 1e6:>9.2f} "
              f"{best_open / best_scan:>7.1f}")
        print(f"{'LMDB scan + unpack (floor)':28} {best_scan:>8.3f} {best_scan / args.blocks * 1e6:>9.2f} "
              f"{1.0:>7.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
