"""Should the SSD tier read through mmap? Zero-copy views of page-cached blocks against preadv.

A verified read must at least checksum every byte (R1). With ``preadv`` the bytes are copied
from the page cache into the caller's buffer, then checksummed; with ``mmap`` the checksum can
run over the mapped page-cache pages directly (no copy), and a reader that only needs a view
gets one without any copy. What mmap costs instead: page-table entries for the mapped pages
(a minor fault per 4 KiB page the first time a mapping touches it), and a mapping has to be
kept from outliving or overreaching its file (SIGBUS).

Cells, per block size, over a file of ``--total-mb`` MiB in the page cache (written, then read
once), best of ``--rounds``:

- ``preadv+crc``: ``os.preadv`` into a preallocated buffer, then crc32c of it (today's read);
- ``chunked preadv``: the same, in pieces of 256 KiB, each checksummed right after it is read
  (while it is still in the CPU cache), the crc continued from piece to piece;
- ``mmap view+crc``: crc32c over a numpy view of a mapping kept open for the whole file (the
  zero-copy view a reader would get; faults paid once, in the warm-up pass);
- ``mmap copy+crc``: the same mapping, ``np.copyto`` into the buffer, then crc32c (get_into);
- ``mmap fresh+crc``: a new mapping of just the block per read (no long-lived mapping to
  manage), crc32c over it, unmapped after: what a mapping per read costs.

Destination alignment matters more than any of these choices: on the reference machine a
``preadv`` whose destination sits 16 bytes past a page boundary while the source is
page-aligned (a large numpy or bytearray buffer from malloc, reading an aligned file offset)
copies at ~2.6 GB/s instead of ~12 GB/s (4K aliasing in the kernel's copy). Every buffer here is
page-aligned so the cells compare the read paths, not that effect.

Run: ``python benchmarks/mmap_read.py`` (a few seconds; ``--sizes 64K,1M --rounds 5``).
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import time

import numpy as np

from tairstore.format.checksum import crc32c

KIB, MIB = 1 << 10, 1 << 20
#: Piece size of the chunked read: each piece is checksummed while still in the CPU cache.
CHUNK = 256 * KIB


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KIB, "M": MIB}.get(t[-1:], 1)
    return int(t[:-1] if mult != 1 else t) * mult


def aligned(n: int) -> np.ndarray:
    """A page-aligned buffer of ``n`` bytes (see the note on destination alignment above)."""
    raw = np.ones(n + 4096, dtype=np.uint8)
    shift = -raw.ctypes.data % 4096
    return raw[shift:shift + n]


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(path: str, size: int, total: int, rounds: int) -> dict[str, float]:
    n = total // size
    buf = aligned(size)
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, n * size, prot=mmap.PROT_READ)
    whole = np.frombuffer(mm, dtype=np.uint8)
    try:
        def preadv() -> None:
            for i in range(n):
                os.preadv(fd, [buf], i * size)
                crc32c(buf)

        chunk = min(size, CHUNK)
        pieces = [memoryview(buf)[o:o + chunk] for o in range(0, size, chunk)]

        def chunked() -> None:
            for i in range(n):
                crc = 0
                for j, piece in enumerate(pieces):
                    os.preadv(fd, [piece], i * size + j * chunk)
                    crc = crc32c(piece, crc)

        def view() -> None:
            for i in range(n):
                crc32c(whole[i * size:(i + 1) * size])

        def copy() -> None:
            for i in range(n):
                np.copyto(buf, whole[i * size:(i + 1) * size])
                crc32c(buf)

        def fresh() -> None:
            for i in range(n):
                m = mmap.mmap(fd, size, prot=mmap.PROT_READ, offset=i * size)
                crc32c(m)
                m.close()

        for fn in (preadv, chunked, view, copy, fresh):  # warm-up: page cache and the long mapping's PTEs
            fn()
        out = {name: n * size / best(fn, rounds) / 1e9
               for name, fn in (("preadv+crc", preadv), ("chunked preadv", chunked),
                                ("mmap view+crc", view),
                                ("mmap copy+crc", copy), ("mmap fresh+crc", fresh))}
    finally:
        del whole
        mm.close()
        os.close(fd)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="64K,256K,1M,4M")
    p.add_argument("--total-mb", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=".", help="where the test file goes (not a tmpfs)")
    args = p.parse_args()
    total = args.total_mb * MIB
    with tempfile.NamedTemporaryFile(dir=args.dir, prefix="mmap-bench-") as f:
        f.write(np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())
        cols = ["preadv+crc", "chunked preadv", "mmap view+crc", "mmap copy+crc", "mmap fresh+crc"]
        print(f"page-cache-warm reads of a {args.total_mb} MiB file, GB/s (best of {args.rounds}); "
              "x: against preadv+crc\n")
        print(f"{'block':>8} | " + " | ".join(f"{c:>14} {'x':>5}" for c in cols))
        print("-" * (11 + 23 * len(cols)))
        for size in (parse_size(s) for s in args.sizes.split(",")):
            r = bench(f.name, size, total, args.rounds)
            base = r["preadv+crc"]
            label = f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"
            print(f"{label:>8} | " + " | ".join(f"{r[c]:>14.2f} {r[c] / base:>5.2f}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
