"""Remote tiers: put and read-back throughput beside the raw tier underneath, in one run.

For each block size (256 KiB, 1 MiB, 4 MiB by default) the same blocks go

- **hf3fs raw**: ``os.pwritev`` into one preallocated file in a directory, ``os.preadv`` back
  into caller buffers (what the 3FS tier does on a mount without USRBIO, minus its index);
- **hf3fs tier**: :class:`~tairstore.tiers.remote.hf3fs.Hf3fsTier` ``put`` / ``get_into`` on a
  sibling directory (slot allocation and the LMDB index per batch; the put is a demotion's,
  given the checksums the store's SSD read verified; the read verifies crc32c on a helper
  thread while the next block is read);
- **mooncake raw**: ``MooncakeDistributedStore.batch_put_from`` / ``batch_get_into`` from and to
  a registered buffer, on a ``mooncake_master`` started on 127.0.0.1 with TCP (Mooncake's best
  case: no copy on our side, no checksum);
- **mooncake tier**: :class:`~tairstore.tiers.remote.mooncake.MooncakeTier` ``put`` from
  registered memory (as the store's DRAM arena would be: no staging copy, the trailer staged)
  and ``get_into`` registered memory (as the store's remote hits land in its registered DRAM
  arena: the payload straight from Mooncake, the trailer through the staging buffer, crc32c
  verified); the put is given its checksums, as a demotion's is.

It prints GB/s per cell and the tier/raw ratio (target >= 0.8). Beside the raw read it also
times **raw + crc32c**: the same raw read followed by the crc32c of each block, on one thread, as
any verified read must at least do (the tier verifies every block it returns): ``verified``
is the tier's read against that floor, so what the tier adds beyond the checksum shows apart
from what the checksum itself costs. Nothing is fsynced on either
side: both tiers are caches. Every repetition uses fresh keys and deletes them after; the best
of ``--reps`` is kept, and the raw and tier runs
take turns, as the machine is shared.

Run: ``python benchmarks/remote.py`` (about a minute), ``--sizes 1M --total-mib 32 --reps 2``,
``--dir /mnt/3fs/bench`` to measure a real 3FS mount, ``--json`` for machine-readable rows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from tairstore.daemon.config import parse_size
from tairstore.format.checksum import crc32c
from tairstore.tiers.remote import make_remote_tier
from tairstore.tiers.remote.master import MooncakeMaster

NS = "bench"
BATCH = 16


def _interleaved(reps: int, *runs: Callable[[int], tuple[float, ...]]) -> list[tuple[float, ...]]:
    """Best seconds of each timing of each ``run(rep)`` (which returns put, read and maybe
    more) over ``reps`` rounds in which the runs take turns, so that the drift of a shared
    machine falls on all of them alike; after one unmeasured warm-up round (first touches of
    fresh buffers and segments are page faults)."""
    for run in runs:
        run(reps)
    times: list[list[tuple[float, ...]]] = [[] for _ in runs]
    for rep in range(reps):
        for out, run in zip(times, runs):
            out.append(run(rep))
    return [tuple(min(t) for t in zip(*each)) for each in times]


def _batches(n: int) -> list[range]:
    return [range(i, min(i + BATCH, n)) for i in range(0, n, BATCH)]


@contextmanager
def raw_directory(path: str, blocks: list[np.ndarray], outs: list[np.ndarray]) -> Iterator[Callable]:
    """A run: pwritev / preadv of the blocks at consecutive offsets of one preallocated file;
    then the preadv again, each block followed by its crc32c."""
    size = len(blocks[0])
    fd = os.open(os.path.join(path, "raw.dat"), os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, size * len(blocks))

    def run(rep: int) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        for i, b in enumerate(blocks):
            os.pwritev(fd, [b], i * size)
        t1 = time.perf_counter()
        for i, o in enumerate(outs):
            os.preadv(fd, [o], i * size)
        t2 = time.perf_counter()
        for i, o in enumerate(outs):
            os.preadv(fd, [o], i * size)
            crc32c(o)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    try:
        yield run
    finally:
        os.close(fd)


def tier_run(tier, blocks: list[np.ndarray], outs: list[np.ndarray], reps: int, tag: str,
             crcs: list[int] | None) -> Callable[[int], tuple[float, float]]:
    """A run: the tier's batched put and get_into, fresh keys per repetition, verified on the
    warm-up (``rep == reps``). ``crcs``: the put is a demotion's (the store passes the checksums
    its SSD read verified); None: a put of new bytes, checksummed by the tier."""
    def run(rep: int) -> tuple[float, float]:
        keys = [f"{tag}-{rep}-{i}".encode() for i in range(len(blocks))]
        t0 = time.perf_counter()
        for r in _batches(len(blocks)):
            known = crcs[r.start:r.stop] if crcs is not None else None
            if not all(tier.put(NS, keys[r.start:r.stop], blocks[r.start:r.stop], known)):
                raise RuntimeError(f"{tag}: put refused")
        t1 = time.perf_counter()
        for r in _batches(len(blocks)):
            got = tier.get_into(NS, keys[r.start:r.stop], outs[r.start:r.stop])
            if None in got:
                raise RuntimeError(f"{tag}: read-back missed")
        t2 = time.perf_counter()
        if rep == reps and not all(np.array_equal(b, o) for b, o in zip(blocks, outs)):
            raise RuntimeError(f"{tag}: read-back differs")
        tier.delete(NS, keys)
        return t1 - t0, t2 - t1

    return run


@contextmanager
def raw_mooncake(master: MooncakeMaster, blocks: list[np.ndarray], segment: int) -> Iterator[Callable]:
    """A run: Mooncake's own batch_put_from / batch_get_into on registered memory; then the gets
    again, each batch followed by the crc32c of its blocks."""
    from mooncake.store import MooncakeDistributedStore
    size, n = len(blocks[0]), len(blocks)
    src = np.concatenate(blocks)
    dst = np.empty_like(src)
    client = MooncakeDistributedStore()
    if client.setup("127.0.0.1", master.metadata_server, segment, 16 << 20, "tcp", "", master.master) != 0:
        raise RuntimeError("mooncake setup failed")
    try:
        for buf in (src, dst):
            client.register_buffer(buf.ctypes.data, buf.nbytes)

        def run(rep: int) -> tuple[float, float, float]:
            names = [f"raw-{rep}-{i}" for i in range(n)]
            t0 = time.perf_counter()
            for r in _batches(n):
                codes = client.batch_put_from(names[r.start:r.stop], [src.ctypes.data + i * size for i in r], [size] * len(r))
                if any(c != 0 for c in codes):
                    raise RuntimeError(f"raw mooncake put: {codes}")
            t1 = time.perf_counter()
            for r in _batches(n):
                codes = client.batch_get_into(names[r.start:r.stop], [dst.ctypes.data + i * size for i in r], [size] * len(r))
                if any(c != size for c in codes):
                    raise RuntimeError(f"raw mooncake get: {codes}")
            t2 = time.perf_counter()
            for r in _batches(n):
                codes = client.batch_get_into(names[r.start:r.stop], [dst.ctypes.data + i * size for i in r], [size] * len(r))
                for i in r:
                    crc32c(dst[i * size:(i + 1) * size])
            t3 = time.perf_counter()
            client.batch_remove(names, True)
            return t1 - t0, t2 - t1, t3 - t2

        yield run
    finally:
        client.close()


def hf3fs_cells(tier, raw_dir: str, blocks: list[np.ndarray], outs: list[np.ndarray], crcs: list[int],
                reps: int) -> list[tuple[float, ...]]:
    """Raw directory and 3FS tier timings, taking turns."""
    with raw_directory(raw_dir, blocks, outs) as raw:
        return _interleaved(reps, raw, tier_run(tier, blocks, outs, reps, "hf", crcs))


def mooncake_cells(blocks: list[np.ndarray], reps: int) -> list[tuple[float, ...]]:
    """Raw and tier timings, taking turns, each the only client of its own master.

    With two clients on one master, the master may place a client's objects in the *other*
    client's segment (a TCP transfer instead of a local copy); alone, each side puts into and
    reads from its own segment, so both measure the same path.
    """
    segment = 2 * sum(len(b) for b in blocks) + (64 << 20)
    with MooncakeMaster() as raw_master, MooncakeMaster() as tier_master, \
            raw_mooncake(raw_master, blocks, segment) as raw:
        tier = make_remote_tier(tier_master.config(segment_bytes=segment,
                                                   buffer_bytes=BATCH * len(blocks[0]) + (1 << 20)))
        # As the store would with its DRAM arena: blocks put from registered memory leave
        # without a staging copy.
        arena = np.concatenate(blocks)
        tier.register(arena)
        size = len(blocks[0])
        views = [arena[i * size:(i + 1) * size] for i in range(len(blocks))]
        # Reads land in registered memory too, as a store's remote hits land in its arena
        # (and raw Mooncake reads into its registered buffer).
        landing = np.empty(len(blocks) * size, dtype=np.uint8)
        tier.register(landing)
        into = [landing[i * size:(i + 1) * size] for i in range(len(blocks))]
        try:
            return _interleaved(reps, raw, tier_run(tier, views, into, reps, "mc", [crc32c(b) for b in blocks]))
        finally:
            tier.close()


def main() -> None:
    """Parse arguments, run every cell, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256K,1M,4M", help="comma-separated block sizes (default: %(default)s)")
    ap.add_argument("--total-mib", type=int, default=64, help="bytes moved per cell and repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="directory for the hf3fs cells (default: a temp dir)")
    ap.add_argument("--skip-mooncake", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    total = args.total_mib << 20
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as base:
        raw_dir = os.path.join(base, "raw")
        os.makedirs(raw_dir)
        hf = make_remote_tier({"kind": "hf3fs", "path": os.path.join(base, "tier")})
        try:
            for size in (parse_size(s.strip()) for s in args.sizes.split(",") if s.strip()):
                n = max(BATCH, total // size)
                rng = np.random.default_rng(size)
                blocks = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]
                outs = [np.empty(size, dtype=np.uint8) for _ in range(n)]
                crcs = [crc32c(b) for b in blocks]  # what a demotion passes (its SSD read verified them)
                cells = [("hf3fs", *hf3fs_cells(hf, raw_dir, blocks, outs, crcs, args.reps))]
                if not args.skip_mooncake:
                    cells.append(("mooncake", *mooncake_cells(blocks, args.reps)))
                for kind, (rp, rg, rv), (tp, tg) in cells:
                    moved = n * size / 1e9
                    rows.append({"tier": kind, "block_bytes": size, "blocks": n,
                                 "raw_put_gbs": moved / rp, "tier_put_gbs": moved / tp, "put_ratio": rp / tp,
                                 "raw_get_gbs": moved / rg, "tier_get_gbs": moved / tg, "get_ratio": rg / tg,
                                 "raw_crc_get_gbs": moved / rv, "raw_crc_ratio": rg / rv,
                                 "verified_ratio": rv / tg})
        finally:
            hf.close()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'tier':9} {'block':>8} {'raw put':>9} {'tier put':>9} {'ratio':>6} {'raw get':>9} {'tier get':>9} "
          f"{'ratio':>6} | {'raw+crc':>8} {'/raw':>5} {'verified':>8}   (GB/s; ratios of throughputs)")
    for r in rows:
        print(f"{r['tier']:9} {r['block_bytes'] >> 10:>6}Ki {r['raw_put_gbs']:9.2f} {r['tier_put_gbs']:9.2f} "
              f"{r['put_ratio']:6.2f} {r['raw_get_gbs']:9.2f} {r['tier_get_gbs']:9.2f} {r['get_ratio']:6.2f} | "
              f"{r['raw_crc_get_gbs']:8.2f} {r['raw_crc_ratio']:5.2f} {r['verified_ratio']:8.2f}")
    print("ratio: tier / raw (target >= 0.8); raw+crc: the raw read then crc32c of each block, on one "
          "thread; /raw: raw+crc / raw, what checksumming costs one thread; verified: tier / raw+crc "
          "(the tier reads and checksums on two threads)")


if __name__ == "__main__":
    main()
