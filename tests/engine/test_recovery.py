"""Opening a store after a clean close or a crash: WAL replay, corruption, rebuild.

How long a reopen takes is measured by ``benchmarks/recovery.py``, not asserted here.

Real files, real LMDB, real processes: a crash is a writer process killed with SIGKILL, and
corruption is a byte flipped in a segment file on disk.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import tairstore
from tairstore.fileio import REAL_FS
from tairstore.format.segment import header_length
from tairstore.engine.fsck import fsck
from tairstore.fuzz import model
from tairstore.index.lmdb_index import Index
from tairstore.wal import Commit, read_log

NS = "default"


def content(key: bytes, version: int) -> bytes:
    """The bytes of ``version`` of ``key`` in the default namespace (the fuzz harness's blocks)."""
    return model.content(NS, key, version)


# -- helpers ---------------------------------------------------------------------------------

def index_state(path: Path) -> tuple[int, dict[bytes, tuple[int, int, int]]]:
    """(checkpoint LSN, key -> (segment, offset, length)) as LMDB holds them; store closed."""
    index = Index(str(path / "index"))
    try:
        locations = {key: (r.segment, r.offset, r.length) for ns, key, r in index.items() if ns == NS}
        return index.checkpoint_lsn(), locations
    finally:
        index.close()


def wal_tail_commits(path: Path, after_lsn: int) -> list:
    """The COMMIT entries the WAL holds after ``after_lsn`` (what recovery must replay)."""
    entries = []
    for _, rec in read_log(REAL_FS, str(path / "wal"), from_lsn=after_lsn + 1, reporter=lambda n, why: None):
        if isinstance(rec, Commit):
            entries.extend(rec.entries)
    return entries


def flip_payload_byte(path: Path, key: bytes, location: tuple[int, int, int], at: int = 100) -> None:
    """Flip one bit of ``key``'s payload in its segment file (header left intact)."""
    seg, off, _ = location
    seg_file = path / "segments" / f"{seg:012d}.seg"
    pos = off + header_length(len(NS.encode()), len(key)) + at
    with open(seg_file, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))


# The committer process: two-phase sessions of 1-4 keys, an ack line after each commit, then
# SIGKILL to itself right after the last ack, so the index writer thread has (almost always)
# not applied the last commits to LMDB yet: they exist only in the WAL tail.
_COMMITTER = textwrap.dedent("""
    import os, signal, sys
    import tairstore
    from tairstore.fuzz.model import content
    from tairstore.fuzz.workload import key_name
    store = tairstore.open(sys.argv[1], dram_bytes=1 << 20, ssd_bytes=1 << 30,
                           segment_bytes=32 << 20, durability="sync")
    n = int(sys.argv[2])
    i = 0
    while i < n:
        keys = [key_name(j) for j in range(i, min(n, i + 1 + i % 4))]
        s = store.start_write(keys, [len(content("default", k, 1)) for k in keys])
        for k in s.keys_to_write:
            store.write(s, k, content("default", k, 1))
        assert store.finish_write(s, keys) == len(keys)
        for k in keys:
            sys.stdout.write("A %s\\n" % k.hex())
        sys.stdout.flush()
        i += len(keys)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def commit_then_sigkill(path: Path, n: int) -> list[bytes]:
    """Run the committer on ``path`` until it kills itself; return the keys it acknowledged."""
    proc = subprocess.run([sys.executable, "-c", _COMMITTER, str(path), str(n)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return [bytes.fromhex(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("A ")]


def crashed_store_with_wal_tail(tmp_path: Path, n: int = 60, attempts: int = 5):
    """A store whose writer was SIGKILLed with committed keys still only in the WAL tail.

    Returns ``(path, acked keys, tail COMMIT entries)``. Retries on a fresh directory in the
    rare case the index writer had applied everything before the kill.
    """
    for attempt in range(attempts):
        path = tmp_path / f"store-{attempt}"
        acked = commit_then_sigkill(path, n)
        assert len(acked) == n
        checkpoint, _ = index_state(path)
        tail = wal_tail_commits(path, checkpoint)
        if tail:
            return path, acked, tail
    pytest.fail(f"no WAL tail was left unapplied in {attempts} SIGKILLed runs")


# -- reopening reads the index, not the segments ---------------------------------------------

def test_reopening_loads_every_block_from_the_index_without_scanning_a_segment(tmp_path, monkeypatch):
    """A cleanly closed store of 20,000 blocks reopens from LMDB alone: every block is there,
    a sample reads back byte-exact, and no segment is scanned. (How long it takes is measured
    by ``python benchmarks/recovery.py``, not asserted here.)"""
    from tairstore.tiers.ssd import SegmentLog

    n, batch, size = 20_000, 500, 4096
    opts = dict(dram_bytes=1 << 20, ssd_bytes=1 << 30, segment_bytes=64 << 20, durability="none",
                background=False)
    rows = np.random.default_rng(0).integers(0, 256, (batch, size), dtype=np.uint8)
    with tairstore.open(tmp_path / "s", **opts) as store:
        for b in range(n // batch):
            keys = [b"blk-%07d" % (b * batch + i) for i in range(batch)]
            # Stamp each row with its block number, so every block is distinct.
            rows[:, :8] = np.arange(b * batch, (b + 1) * batch, dtype="<u8").view(np.uint8).reshape(batch, 8)
            assert all(store.put_many(keys, list(rows)))

    def no_scan(*args, **kwargs):
        raise AssertionError("reopening scanned a segment")

    monkeypatch.setattr(SegmentLog, "scan", no_scan)
    for _ in range(2):
        with tairstore.open(tmp_path / "s", **opts) as store:
            assert store.stats()["blocks"] == n
            assert store.check() == []
            for i in random.Random(1).sample(range(n), 50):
                data = store.get(b"blk-%07d" % i)
                assert data is not None and int.from_bytes(data[:8], "little") == i
                data.release()
    shutil.rmtree(tmp_path / "s", ignore_errors=True)  # 80 MiB: not worth keeping


# -- WAL replay after SIGKILL ----------------------------------------------------------------

def test_sigkill_wal_tail_commits_are_replayed(tmp_path):
    """Keys committed just before SIGKILL, not yet in LMDB, come back from the WAL, byte-exact."""
    path, acked, tail = crashed_store_with_wal_tail(tmp_path)
    tail_keys = {e.key for e in tail}
    assert tail_keys <= set(acked)
    store = tairstore.open(path, dram_bytes=1 << 20, ssd_bytes=1 << 30, segment_bytes=32 << 20)
    try:
        assert store.exists(acked) == [True] * len(acked)
        for k in acked:
            view = store.get(k)
            assert view is not None and bytes(view) == content(k, 1), k
            view.release()
        st = store.stats()
        assert st["counters"]["recovered_blocks"] == len(acked)
        assert st["counters"]["recovery_dropped"] == 0
    finally:
        store.close()
    print(f"{len(tail_keys)} of {len(acked)} acknowledged keys were only in the WAL tail")
    # The replay was written to LMDB: the next open needs no WAL at all for them.
    checkpoint, locations = index_state(path)
    assert set(locations) == set(acked)
    assert not wal_tail_commits(path, checkpoint)
    assert fsck(str(path))["ok"]


def test_wal_replay_drops_commit_whose_payload_is_corrupt_on_disk(tmp_path):
    """Recovery verifies a replayed COMMIT's payload: a damaged one is dropped, never served."""
    path, acked, tail = crashed_store_with_wal_tail(tmp_path)
    victim = tail[-1]
    flip_payload_byte(path, victim.key, victim.ssd)
    store = tairstore.open(path, dram_bytes=1 << 20, ssd_bytes=1 << 30, segment_bytes=32 << 20)
    try:
        assert store.get(victim.key) is None
        assert store.exists([victim.key]) == [False]
        survivors = [k for k in acked if k != victim.key]
        assert store.exists(survivors) == [True] * len(survivors)
        for k in survivors:
            view = store.get(k)
            assert bytes(view) == content(k, 1), k
            view.release()
        counters = store.stats()["counters"]
        assert counters["recovery_dropped"] == 1
        # Dropped at replay, before any read: reads never met the bad bytes.
        assert counters["checksum_errors"] == 0
    finally:
        store.close()
    # The drop is durable: the key stays gone, and what is left verifies.
    store = tairstore.open(path, dram_bytes=1 << 20, ssd_bytes=1 << 30, segment_bytes=32 << 20)
    try:
        assert store.exists([victim.key]) == [False]
    finally:
        store.close()
    report = fsck(str(path))
    assert report["ok"] and report["blocks_corrupt"] == 0 and report["blocks"] == len(acked) - 1


# -- R1 at read time -------------------------------------------------------------------------

def _compressible(key: bytes) -> bytes:
    """A block zstd actually shrinks (bf16-like values), so the flipped byte is compressed data."""
    rng = np.random.default_rng(list(key))
    f = rng.normal(0, 1, 8192).astype(np.float32)
    return (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("reader", ["get", "get_into"])
def test_corrupt_payload_on_disk_is_a_counted_miss_and_dropped(tmp_path, compression, reader):
    """R1: a block whose bytes rotted on disk is a miss, counted once, and leaves the index."""
    path = tmp_path / "s"
    opts = dict(dram_bytes=1 << 20, ssd_bytes=64 << 20, segment_bytes=4 << 20, compression=compression)
    keys = [b"r1-%d" % i for i in range(10)]
    with tairstore.open(path, **opts) as store:
        for k in keys:
            assert store.put(k, _compressible(k))
    _, locations = index_state(path)
    victim = keys[3]
    flip_payload_byte(path, victim, locations[victim], at=40)

    with tairstore.open(path, **opts) as store:
        if reader == "get":
            assert store.get(victim) is None
        else:
            assert store.get_into(victim, bytearray(1 << 16)) == 0
        counters = store.stats()["counters"]
        assert counters["checksum_errors"] == 1
        assert counters["misses"] == 1
        assert store.exists([victim]) == [False]
        assert store.match(keys, mode="exact").hits == [k != victim for k in keys]
        # A second read is a plain miss: the block is gone, not re-verified and re-counted.
        assert store.get(victim) is None
        assert store.stats()["counters"]["checksum_errors"] == 1
        for k in keys:
            if k != victim:
                assert bytes(store.get(k)) == _compressible(k)
    with tairstore.open(path, **opts) as store:
        assert store.exists([victim]) == [False], "the drop must survive a reopen"
    report = fsck(str(path))
    assert report["ok"] and report["blocks"] == len(keys) - 1


def test_fsck_reports_corrupt_block(tmp_path):
    """fsck finds a block whose bytes changed on disk after a clean close; --repair drops it."""
    path = tmp_path / "s"
    with tairstore.open(path, dram_bytes=1 << 20, ssd_bytes=64 << 20) as store:
        for i in range(5):
            store.put(b"f-%d" % i, content(b"f-%d" % i, 1))
    _, locations = index_state(path)
    flip_payload_byte(path, b"f-2", locations[b"f-2"])
    report = fsck(str(path))
    assert not report["ok"] and report["blocks_corrupt"] == 1
    report = fsck(str(path), repair=True)
    assert report["repaired"] >= 1
    report = fsck(str(path))
    assert report["ok"] and report["blocks"] == 4


def test_fsck_scan_does_not_race_its_own_stores_compactor(tmp_path):
    """fsck opens a Store whose maintenance thread deletes wholly dead segments; fsck must
    not then fail on a segment it listed a moment before (``SegmentGoneError``)."""
    path = tmp_path / "s"
    block = np.random.default_rng(0).bytes(16 << 10)
    with tairstore.open(path, dram_bytes=1 << 20, ssd_bytes=1 << 30, segment_bytes=256 << 10,
                        durability="none") as store:
        for i in range(1500):  # live blocks: verifying them keeps fsck busy for a while
            store.put(b"live-%d" % i, block)
        for j in range(20):  # whole segments of written-then-aborted records: dead, no tombstone
            keys = [b"aborted-%d-%d" % (j, i) for i in range(15)]
            s = store.start_write(keys, [len(block)] * len(keys))
            for k in s.keys_to_write:
                store.write(s, k, block)
            store.abort_write(s)
    for _ in range(5):  # the race is timing-dependent: a few checks make it show reliably
        report = fsck(str(path))
        assert report["ok"] and report["blocks"] == 1500


# -- rebuilding the index from segments --------------------------------------------------------

@pytest.mark.parametrize("remove_wal", [False, True], ids=["index-lost", "index-and-wal-lost"])
def test_fsck_rebuild_restores_committed_blocks_only(tmp_path, remove_wal):
    """``fsck --rebuild`` after losing ``index/`` brings back exactly the committed, live blocks."""
    path = tmp_path / "s"
    opts = dict(dram_bytes=1 << 20, ssd_bytes=256 << 20, segment_bytes=1 << 20, durability="sync")
    expected: dict[bytes, bytes] = {}
    gone: list[bytes] = []
    with tairstore.open(path, **opts) as store:
        for i in range(20):  # plain puts (records written committed at once)
            k = b"put-%d" % i
            assert store.put(k, content(k, 1))
            expected[k] = content(k, 1)
        s = store.start_write([b"two-phase-%d" % i for i in range(6)],
                              [len(content(b"two-phase-%d" % i, 1)) for i in range(6)])
        for k in s.keys_to_write:
            store.write(s, k, content(k, 1))
        # A partial commit: the other half was written but never committed.
        ok = s.keys_to_write[:3]
        assert store.finish_write(s, ok) == 3
        expected.update({k: content(k, 1) for k in ok})
        gone += s.keys_to_write[3:]
        s = store.start_write([b"aborted-%d" % i for i in range(4)],
                              [len(content(b"aborted-%d" % i, 1)) for i in range(4)])
        for k in s.keys_to_write:
            store.write(s, k, content(k, 1))
        store.abort_write(s)
        gone += s.keys_to_write
        deleted = [b"put-%d" % i for i in range(0, 20, 3)]
        assert store.delete(deleted) == len(deleted)
        for k in deleted:
            del expected[k]
        gone += deleted[1:]
        # Deleted, then put again with new bytes: the newest generation must win.
        assert store.put(deleted[0], content(deleted[0], 2))
        expected[deleted[0]] = content(deleted[0], 2)
        # A session left open at close: close aborts it.
        s = store.start_write([b"open-at-close"], [len(content(b"open-at-close", 1))])
        store.write(s, b"open-at-close", content(b"open-at-close", 1))
        gone.append(b"open-at-close")

    shutil.rmtree(path / "index")
    if remove_wal:
        shutil.rmtree(path / "wal")
    report = fsck(str(path), rebuild=True)
    assert report["ok"] and report["blocks_corrupt"] == 0
    assert report["rebuilt_blocks"] == len(expected)
    assert report["blocks"] == len(expected)

    with tairstore.open(path, **opts) as store:
        assert store.stats()["blocks"] == len(expected)
        for k, data in expected.items():
            view = store.get(k)
            assert view is not None, f"{k!r} was committed but the rebuild lost it"
            assert bytes(view) == data, f"{k!r} came back with the wrong bytes"
            view.release()
        back = [k for k, e in zip(gone, store.exists(gone)) if e]
        assert not back, f"the rebuild resurrected deleted or uncommitted keys: {back}"
