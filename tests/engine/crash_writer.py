"""The writer process of the SIGKILL crash test (``tests/test_store_crash.py``).

Run as ``python crash_writer.py DIR --seed S --run R --durability sync --ssd-bytes N ...``. It
opens the store in ``DIR`` and runs a seeded random mixed workload until it is killed (or,
as a safety net, until ``--max-seconds`` pass). Every state-changing operation is reported on
stdout, one flushed line each, *before* it starts (intent) and *after* it returned (ack)::

    O                                   about to open the store (recovery starts)
    R                                   the store is open (recovery finished)
    I <seq> put <key> <version>         intent: put(key, content(key, version))
    A <seq> put <0|1>                   ack: what put returned
    I <seq> commit <key>:<version>,...  intent: finish_write with these ok keys
    A <seq> commit <n>                  ack: finish_write returned n
    I <seq> abort <key>:<version>,...   intent: abort_write of a written session
    A <seq> abort
    I <seq> delete <key>,...            intent: delete(keys)
    A <seq> delete <n>
    I <seq> sync                        intent: store.sync()
    A <seq> sync
    BAD <message>                       a read returned wrong bytes (R1): exit status 3

Keys are hex. A block's content is a pure function of (key, version) (see :func:`content`) and
names its version in its first 8 bytes, so anyone holding only the bytes can tell which
version they are and whether they are exact. Versions are unique across runs (the harness
gives every run its own ``--run`` number), so a block left by an aborted session or a lost
write is told apart from the acknowledged one.

The harness (``tests/test_store_crash.py``) imports :func:`content` and :func:`verify` from
this file, so both sides agree on what "byte-exact" means.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np

MIN_BLOCK = 4 << 10
MAX_BLOCK = 256 << 10
RUN_STRIDE = 10_000_000  # versions of run R are R * RUN_STRIDE + seq: unique across runs
_HEAD = 12  # version (u64 LE) + size (u32 LE)


def key_name(i: int) -> bytes:
    """The i-th key of the workload's key space."""
    return b"key-%05d" % i


def block_size(key: bytes, version: int) -> int:
    """The size of version ``version`` of ``key``: log-uniform in 4 KiB .. 256 KiB."""
    # A str seed is hashed with sha512, so every process derives the same size.
    rng = random.Random(f"{key.hex()}/{version}")
    # Log-uniform, so small and large blocks both occur often.
    return int(round(MIN_BLOCK * (MAX_BLOCK / MIN_BLOCK) ** rng.random()))


def content(key: bytes, version: int) -> bytes:
    """The exact bytes of version ``version`` of ``key`` (deterministic, key-bound)."""
    size = block_size(key, version)
    rng = np.random.default_rng([version, *key])
    head = version.to_bytes(8, "little") + size.to_bytes(4, "little")
    return head + rng.bytes(size - _HEAD)


def verify(key: bytes, data) -> tuple[int | None, str | None]:
    """Identify the version held in ``data`` and check every byte of it.

    Returns:
        ``(version, None)`` when ``data`` is exactly ``content(key, version)``, else
        ``(version_or_None, reason)``.
    """
    raw = bytes(data)
    if len(raw) < _HEAD:
        return None, f"{len(raw)} bytes is shorter than any block"
    version = int.from_bytes(raw[:8], "little")
    expected = content(key, version)
    if raw != expected:
        return version, (f"bytes differ from content(key, {version}): {len(raw)} bytes vs "
                         f"{len(expected)} expected")
    return version, None


class _Writer:
    """The workload: one thread, one operation at a time, each reported on stdout."""

    def __init__(self, store, rng: random.Random, run: int, nkeys: int, durability: str) -> None:
        self.store = store
        self.rng = rng
        self.run = run
        self.nkeys = nkeys
        self.durability = durability
        self.seq = 0
        # What this run itself acknowledged: key -> version, or None once it deleted it. Keys
        # from earlier runs are unknown here; the harness checks those against its own model.
        self.known: dict[bytes, int | None] = {}

    def emit(self, line: str) -> None:
        """One line, flushed at once: the harness must see it even if we die right after."""
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def bad(self, msg: str) -> None:
        """Report an invariant violation and stop with status 3."""
        self.emit(f"BAD {msg}")
        os._exit(3)

    def next_version(self) -> int:
        self.seq += 1
        return self.run * RUN_STRIDE + self.seq

    def pick_keys(self, lo: int, hi: int) -> list[bytes]:
        n = self.rng.randint(lo, hi)
        return [key_name(i) for i in self.rng.sample(range(self.nkeys), n)]

    def op_put(self) -> None:
        key = self.pick_keys(1, 1)[0]
        v = self.next_version()
        data = content(key, v)
        self.emit(f"I {self.seq} put {key.hex()} {v}")
        ok = self.store.put(key, data)
        if ok:
            self.known[key] = v
        self.emit(f"A {self.seq} put {int(ok)}")

    def op_session(self) -> None:
        keys = self.pick_keys(1, 4)
        versions = {k: self.next_version() for k in keys}
        blocks = {k: content(k, versions[k]) for k in keys}
        s = self.store.start_write(keys, [len(blocks[k]) for k in keys], lease_s=30.0)
        written = []
        for k in s.keys_to_write:
            # Some keys are reserved but never written: their space must just be released.
            if self.rng.random() < 0.9:
                self.store.write(s, k, blocks[k])
                written.append(k)
        seq = self.seq
        if not written or self.rng.random() < 0.2:
            self.emit(f"I {seq} abort " + ",".join(f"{k.hex()}:{versions[k]}" for k in written))
            self.store.abort_write(s)
            self.emit(f"A {seq} abort")
            return
        ok = written if self.rng.random() < 0.6 else self.rng.sample(written, self.rng.randint(1, len(written)))
        self.emit(f"I {seq} commit " + ",".join(f"{k.hex()}:{versions[k]}" for k in ok))
        n = self.store.finish_write(s, ok)
        if n != len(ok):
            self.bad(f"finish_write committed {n} of {len(ok)} written keys")
        for k in ok:
            self.known[k] = versions[k]
        self.emit(f"A {seq} commit {n}")

    def op_delete(self) -> None:
        keys = self.pick_keys(1, 3)
        self.seq += 1
        seq = self.seq
        self.emit(f"I {seq} delete " + ",".join(k.hex() for k in keys))
        n = self.store.delete(keys)
        for k in keys:
            self.known[k] = None
        self.emit(f"A {seq} delete {n}")

    def op_read(self) -> None:
        key = self.pick_keys(1, 1)[0]
        if self.rng.random() < 0.5:
            view = self.store.get(key)
            data = None if view is None else bytes(view)
            if view is not None:
                view.release()
        else:
            buf = bytearray(MAX_BLOCK)
            n = self.store.get_into(key, buf)
            data = None if n == 0 else buf[:n]
        if data is None:
            # A miss is always allowed here: segments and DRAM copies are evicted.
            return
        version, why = verify(key, data)
        if why:
            self.bad(f"read of {key.hex()} returned wrong bytes: {why}")
        if key in self.known and self.known[key] != version:
            self.bad(f"read of {key.hex()} returned version {version}, this run acknowledged "
                     f"{self.known[key]}")

    def op_compact(self) -> None:
        # Not a state change of any key: nothing to report. Kills land inside it, so recovery
        # meets half-done compactions (copies written, relocation logged or not, old segment
        # deleted or not).
        self.store.compact(wait=True, full=self.rng.random() < 0.5)

    def op_sync(self) -> None:
        self.seq += 1
        seq = self.seq
        self.emit(f"I {seq} sync")
        self.store.sync()
        self.emit(f"A {seq} sync")

    def run_for(self, seconds: float) -> None:
        ops = [(self.op_put, 35), (self.op_session, 15), (self.op_delete, 12), (self.op_read, 30),
               (self.op_compact, 3)]
        if self.durability != "sync":
            ops.append((self.op_sync, 8))
        funcs, weights = zip(*ops)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.rng.choices(funcs, weights)[0]()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, open the store, run the workload until killed (or out of time)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--run", type=int, required=True)
    ap.add_argument("--durability", default="sync")
    ap.add_argument("--dram-bytes", type=int, default=2 << 20)
    ap.add_argument("--ssd-bytes", type=int, default=8 << 20)
    ap.add_argument("--segment-bytes", type=int, default=1 << 20)
    ap.add_argument("--keys", type=int, default=150)
    ap.add_argument("--max-seconds", type=float, default=20.0)
    args = ap.parse_args(argv)

    import tairstore

    # "O": recovery starts now; the harness aims some kills into the next few milliseconds.
    sys.stdout.write("O\n")
    sys.stdout.flush()
    store = tairstore.open(args.path, dram_bytes=args.dram_bytes, ssd_bytes=args.ssd_bytes,
                           segment_bytes=args.segment_bytes, durability=args.durability)
    w = _Writer(store, random.Random(args.seed), args.run, args.keys, args.durability)
    w.emit("R")
    w.run_for(args.max_seconds)
    store.close()
    w.emit("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
