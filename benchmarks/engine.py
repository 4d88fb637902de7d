"""Engine throughput: the store's put / get paths next to the raw copy or I/O they wrap.

What is measured, per block size (default 64 KiB, 256 KiB, 1 MiB, 4 MiB), over a working set
of ``--total-mb`` MiB (default 256) of pre-generated random blocks (rows of one numpy array):

DRAM tier -- a volatile store (``ssd_bytes=0``, ``dram_bytes`` large enough for the set):

- ``memcpy``: ``np.copyto`` of every block into the matching row of a preallocated array of the
  same shape. This is the floor the store's copy cannot beat: same bytes, same access pattern.
- ``put``: ``store.put`` of every block, measured after a warm-up pass (put, then delete) so the
  arena's lazily committed pages are already faulted in. ``put 1st`` is that warm-up pass: the
  same work plus first-touch page faults, what a freshly opened store pays once.
- ``get_into``: ``store.get_into`` of every block into the rows of the preallocated array.
- ``get``: ``store.get`` (a zero-copy, pinned view, dropped at once): no bytes move, so it is
  reported in operations per second and microseconds per call, not against memcpy.

SSD tier -- a store with ``dram_bytes=0`` in a temporary directory under ``--dir`` (default: the
current directory, i.e. the file system the repository is on; never a tmpfs):

- ``put batch``: ``store.put`` of every block with ``durability="batch"``, then ``store.sync()``,
  all inside the timed region, against ``raw write``: ``os.pwrite`` of the same blocks back to
  back into a fresh file, then one ``os.fsync``. A fresh store and a fresh file every round.
- ``get_into``: reads of the blocks just written (page cache warm: this measures the store's
  read path, not the device) against ``raw read``: ``os.preadv`` into the same buffer rows plus
  ``crc32c`` of each block, which is the least a verified read must do.
- ``put sync``: ``store.put`` with ``durability="sync"`` (every put waits for its fsyncs) on a
  smaller set (``--sync-mb``) against ``os.pwrite`` + ``os.fdatasync`` per block into a fresh
  file: the price of the group commit (segment fdatasync, WAL write, WAL fdatasync) per put.

Every variant of a size runs once per round, interleaved with its baseline, so background noise
hits both alike; throughputs are the best of ``--rounds`` rounds and a ratio is store / baseline
of those bests (``x`` columns: 1.00 means as fast as the baseline). GB/s are 10^9 bytes per second
of block payload. The targets at the end are checked against these ratios and marked met or
MISSED. ``--json`` also writes every sample, machine-readable (``--json -`` for stdout).

Run: ``python benchmarks/engine.py`` (about a minute), ``--sizes 64K,1M --rounds 5`` to focus.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import tairstore
from tairstore.format.checksum import crc32c

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

#: Store / baseline ratios the engine aims for: (section, metric, block size or None for every
#: size, minimum ratio, what the ratio is against).
TARGETS: list[tuple[str, str, int | None, float, str]] = [
    ("dram", "put", MIB, 0.5, "memcpy"),
    ("dram", "get_into", MIB, 0.5, "memcpy"),
    ("dram", "put_many", 64 * KIB, 0.5, "memcpy"),
    ("ssd", "put_batch", None, 0.7, "raw write + fsync"),
    ("ssd", "put_many_batch", 64 * KIB, 0.7, "raw write + fsync"),
]
#: Blocks per put_many / get_into_many call (``--batch``).
BATCH = 16


# ------------------------------------------------------------------------------------ helpers
def parse_size(text: str) -> int:
    """``"64K"``, ``"1M"``, ``"4MiB"`` or a plain byte count, as bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KIB, "M": MIB, "G": GIB}.get(t[-1:], 1)
    return int(t[:-1] if mult != 1 else t) * mult


def fmt_size(n: int) -> str:
    """Bytes as ``64 KiB`` / ``1 MiB``."""
    for unit, mult in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
    return f"{n} B"


def make_keys(n: int, tag: str) -> list[bytes]:
    """``n`` distinct 32-byte keys, like the chained sha256 hashes an engine sends."""
    return [hashlib.sha256(f"{tag}/{i}".encode()).digest() for i in range(n)]


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` takes (after a collection, so garbage of earlier phases is not billed)."""
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Samples:
    """Per-metric timings of one block size across rounds."""

    def __init__(self, nbytes: int, nops: int) -> None:
        self.nbytes = nbytes
        self.nops = nops
        self.seconds: dict[str, list[float]] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, seconds: float, nbytes: int | None = None) -> None:
        self.seconds.setdefault(name, []).append(seconds)
        if nbytes is not None:
            self.seconds.setdefault(f"{name}:bytes", [float(nbytes)])

    def best(self, name: str) -> float:
        return min(self.seconds[name])

    def gbps(self, name: str) -> float:
        nbytes = self.seconds.get(f"{name}:bytes", [float(self.nbytes)])[0]
        return nbytes / self.best(name) / 1e9

    def ratio(self, name: str, base: str) -> float:
        return self.gbps(name) / self.gbps(base)

    def median_ratio(self, name: str, base: str) -> float:
        """Median over rounds of the per-round ratio (a check on the ratio of bests)."""
        return statistics.median(b / s for s, b in zip(self.seconds[name], self.seconds[base]))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.seconds.items() if not k.endswith(":bytes")}


def aligned_like(a: np.ndarray) -> np.ndarray:
    """A page-aligned array shaped like ``a``, filled with ones (pages faulted in before timing).

    Alignment matters to the baselines: a ``preadv`` into a destination 16 bytes past a page
    boundary from a page-aligned file offset copies ~4x slower on the reference machine (4K
    aliasing in the kernel's copy), and malloc puts large numpy buffers exactly there.
    """
    raw = np.ones(a.nbytes + 4096, dtype=np.uint8)
    shift = -raw.ctypes.data % 4096
    return raw[shift:shift + a.nbytes].reshape(a.shape)


def store_dir(root: str, name: str) -> str:
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


# --------------------------------------------------------------------------------- DRAM tier
def bench_dram(size: int, pool: np.ndarray, root: str, rounds: int) -> Samples:
    """memcpy / put / get_into / get of one block size against a volatile DRAM store."""
    n = pool.size // size
    blocks = pool[: n * size].reshape(n, size)
    dst = aligned_like(blocks)
    keys = make_keys(n, f"dram-{size}")
    s = Samples(n * size, n)
    dram_bytes = max(GIB, 2 * n * size)
    store = tairstore.open(store_dir(root, f"dram-{size}"), dram_bytes=dram_bytes, ssd_bytes=0)
    put, get, get_into = store.put, store.get, store.get_into

    def do_put() -> None:
        for k, b in zip(keys, blocks):
            put(k, b)

    def do_get_into() -> None:
        for k, out in zip(keys, dst):
            get_into(k, out)

    def do_get() -> None:
        for k in keys:
            get(k)

    def do_memcpy() -> None:
        for out, b in zip(dst, blocks):
            np.copyto(out, b)

    batches = [(keys[i:i + BATCH], list(blocks[i:i + BATCH]), list(dst[i:i + BATCH]))
               for i in range(0, n, BATCH)]

    def do_put_many() -> None:
        for ks, bs, _ in batches:
            store.put_many(ks, bs)

    def do_get_into_many() -> None:
        for ks, _, outs in batches:
            store.get_into_many(ks, outs)

    try:
        # Warm-up pass: the arena's pages are committed on first write; the measured puts below
        # land on the same (best-fit, low-offset-first) extents, already faulted in.
        s.add("put_first_touch", timed(do_put))
        store.delete(keys)
        for r in range(rounds):
            s.add("memcpy", timed(do_memcpy))
            s.add("put", timed(do_put))
            dst.fill(0)
            s.add("get_into", timed(do_get_into))
            if r == 0 and not np.array_equal(dst, blocks):
                raise AssertionError(f"get_into returned wrong bytes ({fmt_size(size)} blocks)")
            s.add("get", timed(do_get))
            if store.delete(keys) != n:
                raise AssertionError("not every block was stored")
            s.add("put_many", timed(do_put_many))
            dst.fill(0)
            s.add("get_into_many", timed(do_get_into_many))
            if r == 0 and not np.array_equal(dst, blocks):
                raise AssertionError(f"get_into_many returned wrong bytes ({fmt_size(size)} blocks)")
            if store.delete(keys) != n:
                raise AssertionError("not every block was stored by put_many")
    finally:
        store.close()
    return s


# ---------------------------------------------------------------------------------- SSD tier
def raw_write(path: str, blocks: np.ndarray, *, fsync_each: bool) -> float:
    """Seconds to pwrite ``blocks`` back to back into a fresh file and make them durable."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        gc.collect()
        t0 = time.perf_counter()
        off = 0
        for b in blocks:
            os.pwrite(fd, b, off)
            off += len(b)
            if fsync_each:
                os.fdatasync(fd)
        if not fsync_each:
            os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def raw_read(path: str, dst: np.ndarray) -> float:
    """Seconds to preadv every row of ``dst`` from ``path`` and crc32c it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = dst.shape[1]

        def run() -> None:
            off = 0
            for out in dst:
                os.preadv(fd, [out], off)
                crc32c(out)
                off += size

        return timed(run)
    finally:
        os.close(fd)


def bench_ssd(size: int, pool: np.ndarray, root: str, rounds: int, sync_bytes: int) -> Samples:
    """put (batch, sync) and get_into against raw file I/O, for one block size."""
    n = pool.size // size
    blocks = pool[: n * size].reshape(n, size)
    dst = aligned_like(blocks)
    keys = make_keys(n, f"ssd-{size}")
    n_sync = min(n, max(8, sync_bytes // size))
    s = Samples(n * size, n)
    ssd_bytes = max(4 * GIB, 2 * n * size)
    raw_path = os.path.join(root, f"raw-{size}.bin")

    for r in range(rounds):
        # Batch mode: puts, then the final sync, against pwrites and one fsync.
        s.add("raw_write", raw_write(raw_path, blocks, fsync_each=False))
        store = tairstore.open(store_dir(root, f"ssd-{size}"), dram_bytes=0, ssd_bytes=ssd_bytes,
                               durability="batch")
        try:
            put = store.put

            def do_put() -> None:
                for k, b in zip(keys, blocks):
                    put(k, b)
                store.sync()

            s.add("put_batch", timed(do_put))
            # Reads of what was just written and synced: served from the page cache.
            get_into = store.get_into

            def do_get_into() -> None:
                for k, out in zip(keys, dst):
                    get_into(k, out)

            dst.fill(0)
            s.add("get_into", timed(do_get_into))
            if r == 0 and not np.array_equal(dst, blocks):
                raise AssertionError(f"SSD get_into returned wrong bytes ({fmt_size(size)} blocks)")
            s.add("raw_read", raw_read(raw_path, dst))
        finally:
            store.close()
        # The same blocks through put_many, BATCH at a time: one admission, one pwritev and
        # one COMMIT record per batch.
        store = tairstore.open(store_dir(root, f"ssd-many-{size}"), dram_bytes=0,
                               ssd_bytes=ssd_bytes, durability="batch")
        try:
            batches = [(keys[i:i + BATCH], list(blocks[i:i + BATCH])) for i in range(0, n, BATCH)]

            def do_put_many() -> None:
                for ks, bs in batches:
                    store.put_many(ks, bs)
                store.sync()

            s.add("put_many_batch", timed(do_put_many))
        finally:
            store.close()

        # Sync mode: every put waits for segment fdatasync + WAL write + WAL fdatasync.
        s.add("raw_write_each", raw_write(raw_path, blocks[:n_sync], fsync_each=True),
              nbytes=n_sync * size)
        store = tairstore.open(store_dir(root, f"ssd-sync-{size}"), dram_bytes=0,
                               ssd_bytes=ssd_bytes, durability="sync")
        try:
            put = store.put

            def do_put_sync() -> None:
                for k, b in zip(keys[:n_sync], blocks[:n_sync]):
                    put(k, b)

            s.add("put_sync", timed(do_put_sync), nbytes=n_sync * size)
        finally:
            store.close()
    os.unlink(raw_path)
    shutil.rmtree(os.path.join(root, f"ssd-{size}"), ignore_errors=True)
    shutil.rmtree(os.path.join(root, f"ssd-sync-{size}"), ignore_errors=True)
    shutil.rmtree(os.path.join(root, f"ssd-many-{size}"), ignore_errors=True)
    s.counts["n_sync"] = n_sync
    return s


# ----------------------------------------------------------------------------------- report
def print_tables(dram: dict[int, Samples], ssd: dict[int, Samples], args: argparse.Namespace,
                 out=sys.stdout) -> list[dict[str, Any]]:
    """Print the tables and the target checks; returns the checks (for --json)."""
    w = out.write
    if dram:
        w(f"\nDRAM tier: volatile store (ssd_bytes=0), working set {args.total_mb} MiB per size, "
          f"best of {args.rounds} rounds\n")
        w("  put: arena pages already faulted in (warm-up put+delete pass first; excludes "
          "first-touch faults)\n  put 1st: that warm-up pass (includes first-touch page faults)\n"
          "  x: store / memcpy (np.copyto into preallocated rows, same blocks); med: median of "
          "per-round ratios\n\n")
        hdr = (f"{'block':>8} {'blocks':>6} | {'memcpy':>7} | {'put':>6} {'x':>5} {'med':>5} "
               f"{'us/op':>7} | {'put 1st':>7} | {'get_into':>8} {'x':>5} {'med':>5} {'us/op':>7} "
               f"| {'get ops/s':>10} {'us/op':>6}\n")
        w(hdr)
        w(f"{'':>8} {'':>6} | {'GB/s':>7} | {'GB/s':>6} {'':>5} {'':>5} {'':>7} | {'GB/s':>7} "
          f"| {'GB/s':>8} {'':>5} {'':>5} {'':>7} | {'':>10} {'':>6}\n")
        w("-" * (len(hdr) - 1) + "\n")
        for size, s in dram.items():
            get_s = s.best("get") / s.nops
            w(f"{fmt_size(size):>8} {s.nops:>6} | {s.gbps('memcpy'):>7.2f} | "
              f"{s.gbps('put'):>6.2f} {s.ratio('put', 'memcpy'):>5.2f} "
              f"{s.median_ratio('put', 'memcpy'):>5.2f} {s.best('put') / s.nops * 1e6:>7.1f} | "
              f"{s.gbps('put_first_touch'):>7.2f} | "
              f"{s.gbps('get_into'):>8.2f} {s.ratio('get_into', 'memcpy'):>5.2f} "
              f"{s.median_ratio('get_into', 'memcpy'):>5.2f} "
              f"{s.best('get_into') / s.nops * 1e6:>7.1f} | {1 / get_s:>10,.0f} {get_s * 1e6:>6.1f}\n")
    if ssd:
        w(f"\nSSD tier: dram_bytes=0, files under --dir={args.dir!r}, "
          f"working set {args.total_mb} MiB per size, best of {args.rounds} rounds\n"
          "  put batch: durability='batch' puts + final store.sync(), timed together; raw: pwrite "
          "of the same blocks to a fresh file + one fsync\n"
          "  get_into: page cache warm (blocks just written); raw: os.preadv into the same rows "
          "+ crc32c per block\n"
          f"  put sync: durability='sync', up to {args.sync_mb} MiB (>= 8 blocks); raw: pwrite + "
          "fdatasync per block\n\n")
        hdr = (f"{'block':>8} | {'raw wr':>6} {'put batch':>9} {'x':>5} {'med':>5} {'us/op':>7} | "
               f"{'raw rd':>6} {'get_into':>8} {'x':>5} {'med':>5} {'us/op':>7} | {'blocks':>6} "
               f"{'raw/blk':>7} {'put sync':>8} {'x':>5} {'us/op':>7}\n")
        w(hdr)
        w(f"{'':>8} | {'GB/s':>6} {'GB/s':>9} {'':>5} {'':>5} {'':>7} | {'GB/s':>6} {'GB/s':>8} "
          f"{'':>5} {'':>5} {'':>7} | {'':>6} {'GB/s':>7} {'GB/s':>8} {'':>5} {'':>7}\n")
        w("-" * (len(hdr) - 1) + "\n")
        for size, s in ssd.items():
            n_sync = s.counts["n_sync"]
            w(f"{fmt_size(size):>8} | {s.gbps('raw_write'):>6.2f} {s.gbps('put_batch'):>9.2f} "
              f"{s.ratio('put_batch', 'raw_write'):>5.2f} "
              f"{s.median_ratio('put_batch', 'raw_write'):>5.2f} "
              f"{s.best('put_batch') / s.nops * 1e6:>7.1f} | "
              f"{s.gbps('raw_read'):>6.2f} {s.gbps('get_into'):>8.2f} "
              f"{s.ratio('get_into', 'raw_read'):>5.2f} {s.median_ratio('get_into', 'raw_read'):>5.2f} "
              f"{s.best('get_into') / s.nops * 1e6:>7.1f} | {n_sync:>6} "
              f"{s.gbps('raw_write_each'):>7.2f} {s.gbps('put_sync'):>8.2f} "
              f"{s.ratio('put_sync', 'raw_write_each'):>5.2f} "
              f"{s.best('put_sync') / n_sync * 1e6:>7.1f}\n")

    if dram or ssd:
        w(f"\nBatched API: {BATCH} blocks per put_many / get_into_many call (x: against the same "
          "baselines as above)\n\n")
        hdr = (f"{'block':>8} | {'DRAM put_many':>13} {'x':>5} {'us/blk':>7} | "
               f"{'get_into_many':>13} {'x':>5} | {'SSD put_many':>12} {'x':>5} {'us/blk':>7}\n")
        w(hdr)
        w("-" * (len(hdr) - 1) + "\n")
        for size in sorted(set(dram) | set(ssd)):
            d, q = dram.get(size), ssd.get(size)
            left = (f"{d.gbps('put_many'):>13.2f} {d.ratio('put_many', 'memcpy'):>5.2f} "
                    f"{d.best('put_many') / d.nops * 1e6:>7.1f} | {d.gbps('get_into_many'):>13.2f} "
                    f"{d.ratio('get_into_many', 'memcpy'):>5.2f}") if d else f"{'':>27} | {'':>19}"
            right = (f"{q.gbps('put_many_batch'):>12.2f} {q.ratio('put_many_batch', 'raw_write'):>5.2f} "
                     f"{q.best('put_many_batch') / q.nops * 1e6:>7.1f}") if q else ""
            w(f"{fmt_size(size):>8} | {left} | {right}\n")

    checks: list[dict[str, Any]] = []
    bases = {"memcpy": "memcpy", "raw write + fsync": "raw_write"}
    for section, metric, only, minimum, against in TARGETS:
        table = dram if section == "dram" else ssd
        for size, s in table.items():
            if only is not None and size != only:
                continue
            ratio = s.ratio(metric, bases[against])
            checks.append({"section": section, "metric": metric, "block": size,
                           "target": minimum, "ratio": round(ratio, 3), "met": ratio >= minimum})
    if checks:
        w("\nTargets (store / baseline, ratio of best-of-rounds throughputs)\n")
        for c in checks:
            against = next(t[4] for t in TARGETS if t[0] == c["section"] and t[1] == c["metric"])
            label = f"{c['section'].upper()} {c['metric']} {fmt_size(c['block'])}"
            w(f"  {label:<24} >= {c['target']:.2f}x {against:<18} {c['ratio']:>5.2f}x  "
              f"{'met' if c['met'] else 'MISSED'}\n")
    w("\n")
    return checks


# -------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sizes", default="64K,256K,1M,4M",
                   help="comma-separated block sizes (default: %(default)s)")
    p.add_argument("--total-mb", type=int, default=256,
                   help="working set per block size in MiB (default: %(default)s)")
    p.add_argument("--sync-mb", type=int, default=16,
                   help="bytes put with durability='sync' per size in MiB (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the best counts (default: 3)")
    p.add_argument("--dir", default=".",
                   help="where the SSD-tier temp directory goes; use the file system under test, "
                        "not a tmpfs (default: the current directory)")
    p.add_argument("--tiers", default="dram,ssd", help="which tiers to run (default: %(default)s)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="also write the results as JSON to PATH ('-' or no value: stdout)")
    args = p.parse_args(argv)
    args.size_list = [parse_size(x) for x in args.sizes.split(",") if x.strip()]
    args.tier_list = [t.strip() for t in args.tiers.split(",") if t.strip()]
    if args.rounds < 1 or args.total_mb < 1:
        p.error("--rounds and --total-mb must be >= 1")
    for size in args.size_list:
        if size < 1 or size > args.total_mb * MIB:
            p.error(f"block size {size} must be in 1..--total-mb")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    total = args.total_mb * MIB
    # One pool of random bytes; each size views it as rows (C-contiguous numpy blocks).
    pool = np.random.default_rng(1234).integers(0, 256, size=total, dtype=np.uint8)
    root = tempfile.mkdtemp(prefix=".tairstore-bench-", dir=args.dir)
    dram: dict[int, Samples] = {}
    ssd: dict[int, Samples] = {}
    try:
        for size in args.size_list:
            if "dram" in args.tier_list:
                dram[size] = bench_dram(size, pool, root, args.rounds)
            if "ssd" in args.tier_list:
                ssd[size] = bench_ssd(size, pool, root, args.rounds, args.sync_mb * MIB)
            print(f"  done: {fmt_size(size)} blocks", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    checks = print_tables(dram, ssd, args)
    if args.json:
        doc = {
            "config": {"sizes": args.size_list, "total_mb": args.total_mb, "rounds": args.rounds,
                       "sync_mb": args.sync_mb, "numpy": np.__version__,
                       "tairstore": tairstore.__version__},
            "dram": {str(k): {"nops": v.nops, "bytes": v.nbytes, "seconds": v.to_json(),
                              "gbps": {m: v.gbps(m) for m in ("memcpy", "put", "put_first_touch",
                                                              "get_into")},
                              "get_ops_per_s": v.nops / v.best("get")}
                     for k, v in dram.items()},
            "ssd": {str(k): {"nops": v.nops, "nops_sync": v.counts["n_sync"], "bytes": v.nbytes,
                             "seconds": v.to_json(),
                             "gbps": {m: v.gbps(m) for m in ("raw_write", "put_batch", "raw_read",
                                                             "get_into", "raw_write_each",
                                                             "put_sync")}}
                    for k, v in ssd.items()},
            "targets": checks,
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
