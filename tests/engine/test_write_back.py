"""Write-back (``write_back=True``): writes acknowledged from DRAM, written to SSD later.

What must hold: a deferred block reads back byte-exact at once; a flush (maintenance, ``sync``,
``close``) gives it an SSD copy and a logged COMMIT; a crash before the flush leaves it absent
(W2), never torn; a delete before or during the flush is never undone, by recovery or by a
rebuild from the segments; dirty blocks are never evicted from DRAM; the dirty bytes are capped
and past the cap writes go through to SSD; the SSD quota counts a dirty block from admission
(C1). Real files, real LMDB, real processes for the crash.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

import tairstore
from tairstore.engine.fsck import fsck
from tairstore.errors import CapacityError, InvalidArgumentError

KiB = 1 << 10
MiB = 1 << 20
OPTS = dict(dram_bytes=16 * MiB, ssd_bytes=256 * MiB, segment_bytes=8 * MiB, durability="batch",
            write_back=True)


def blob(key: bytes, size: int, version: int = 1) -> bytes:
    """Deterministic bytes bound to ``key`` and ``version``."""
    return (key + b"/%d/" % version) * (size // (len(key) + 8)) + b"\0" * size


def val(key: bytes, size: int = 256 * KiB, version: int = 1) -> bytes:
    return blob(key, size, version)[:size]


def tiers(store, keys: list[bytes]) -> list:
    return list(store.match(keys, mode="exact").tiers)


def test_write_back_options_are_checked(tmp_path):
    with pytest.raises(InvalidArgumentError, match="durability='sync'"):
        tairstore.open(tmp_path / "a", write_back=True, durability="sync")
    with pytest.raises(InvalidArgumentError, match="DRAM and an SSD tier"):
        tairstore.open(tmp_path / "b", write_back=True, durability="batch", dram_bytes=0)
    with pytest.raises(InvalidArgumentError, match="DRAM and an SSD tier"):
        tairstore.open(tmp_path / "c", write_back=True, durability="none", ssd_bytes=0)
    with pytest.raises(InvalidArgumentError, match="write_back"):
        tairstore.open(tmp_path / "d", write_back="yes", durability="batch")


def test_deferred_blocks_read_back_at_once_and_reach_ssd_when_flushed(tmp_path):
    path = tmp_path / "s"
    keys = [b"put-%d" % i for i in range(3)]
    many = [b"many-%d" % i for i in range(4)]
    sess = [b"sess-%d" % i for i in range(3)]
    every = keys + many + sess
    with tairstore.open(path, background=False, **OPTS) as s:
        for key in keys:
            assert s.put(key, val(key))
        assert s.put_many(many, [val(key) for key in many]) == [True] * 4
        w = s.start_write(sess, [256 * KiB] * 3)
        for key in w.keys_to_write:
            s.write(w, key, val(key))
        assert s.finish_write(w, sess) == 3
        # Acknowledged, readable, and only in DRAM.
        assert tiers(s, every) == ["dram"] * len(every)
        for key in every:
            assert bytes(s.get(key)) == val(key)
        st = s.stats()
        assert st["counters"]["writeback_deferred"] == len(every)
        assert st["tiers"]["dram"]["dirty_bytes"] == len(every) * 256 * KiB
        assert st["tiers"]["ssd"]["blocks"] == 0
        assert st["namespaces"]["default"]["tiers"]["ssd"] == len(every) * 256 * KiB  # C1
        assert s.check() == []
        s.maintain()  # the background pass's flush
        st = s.stats()
        assert st["counters"]["writeback_flushed"] == len(every)
        assert st["tiers"]["dram"]["dirty_bytes"] == 0
        assert st["tiers"]["ssd"]["blocks"] == len(every)
        assert st["tiers"]["ssd"]["reserved_bytes"] == 0
        assert tiers(s, every) == ["dram"] * len(every)  # the DRAM copy stays, now clean
        assert s.check() == []
    with tairstore.open(path, **OPTS) as s:
        for key in every:
            assert bytes(s.get(key)) == val(key)


def test_a_clean_close_flushes_what_it_acknowledged(tmp_path):
    path = tmp_path / "s"
    with tairstore.open(path, background=False, **OPTS) as s:
        for i in range(10):
            assert s.put(b"k%d" % i, val(b"k%d" % i))
        assert s.stats()["tiers"]["dram"]["dirty_bytes"] > 0
    with tairstore.open(path, background=False, **OPTS) as s:
        assert s.stats()["counters"]["recovered_blocks"] == 10
        for i in range(10):
            assert bytes(s.get(b"k%d" % i)) == val(b"k%d" % i)


# The crashing writer: some keys flushed by sync(), then more keys acknowledged from DRAM only,
# then SIGKILL before any flush (no maintenance thread).
_WRITER = textwrap.dedent("""
    import os, signal, sys
    import tairstore
    sys.path.insert(0, sys.argv[2])
    from test_write_back import OPTS, val
    s = tairstore.open(sys.argv[1], background=False, **OPTS)
    for i in range(8):
        assert s.put(b"flushed-%d" % i, val(b"flushed-%d" % i))
    s.delete([b"flushed-0"])
    s.sync()
    print("synced", flush=True)
    for i in range(8):
        assert s.put(b"dirty-%d" % i, val(b"dirty-%d" % i))
    assert s.stats()["tiers"]["dram"]["dirty_bytes"] == 8 * 256 * 1024
    print("acked", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_sigkill_before_the_flush_leaves_deferred_keys_absent_never_torn(tmp_path):
    path = tmp_path / "s"
    proc = subprocess.run([sys.executable, "-c", _WRITER, str(path), os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert proc.stdout.split() == ["synced", "acked"]
    with tairstore.open(path, background=False, **OPTS) as s:
        assert s.get(b"flushed-0") is None
        for i in range(1, 8):
            assert bytes(s.get(b"flushed-%d" % i)) == val(b"flushed-%d" % i)
        for i in range(8):
            assert s.get(b"dirty-%d" % i) is None
        assert s.check() == []
    report = fsck(str(path))
    assert report["ok"], report


def test_a_delete_before_the_flush_gives_back_the_reservation(tmp_path):
    path = tmp_path / "s"
    with tairstore.open(path, background=False, **OPTS) as s:
        assert s.put(b"gone", val(b"gone"))
        assert s.put(b"kept", val(b"kept"))
        assert s.delete([b"gone"]) == 1
        st = s.stats()
        assert st["tiers"]["dram"]["dirty_bytes"] == 256 * KiB
        assert st["namespaces"]["default"]["tiers"]["ssd"] == 256 * KiB
        s.maintain()
        st = s.stats()
        assert st["counters"]["writeback_flushed"] == 1
        assert st["tiers"]["ssd"]["reserved_bytes"] == 0 and s.check() == []
        # Put again with other bytes: the new block is the one kept.
        assert s.put(b"gone", val(b"gone", version=2))
    with tairstore.open(path, **OPTS) as s:
        assert bytes(s.get(b"gone")) == val(b"gone", version=2)
        assert bytes(s.get(b"kept")) == val(b"kept")


def test_a_delete_while_the_flush_writes_is_not_undone_by_recovery_or_a_rebuild(tmp_path):
    path = tmp_path / "s"
    s = tairstore.open(path, background=False, **OPTS)
    for key in (b"victim", b"other"):
        assert s.put(key, val(key))
    # Hold the flush between its SSD write and its COMMIT (fault injection: a real write that
    # the test pauses after it returns).
    log = s._ssd
    real = log.write_many
    written, go = threading.Event(), threading.Event()

    def paused(*args, **kwargs):
        out = real(*args, **kwargs)
        written.set()
        assert go.wait(120)
        return out

    log.write_many = paused
    flusher = threading.Thread(target=s.maintain)
    flusher.start()
    try:
        assert written.wait(120)
        assert s.delete([b"victim"]) == 1
        assert s.get(b"victim") is None
    finally:
        go.set()
        flusher.join(120)
    log.write_many = real
    st = s.stats()
    assert st["counters"]["writeback_flushed"] == 1  # only "other"
    assert st["tiers"]["ssd"]["reserved_bytes"] == 0 and st["tiers"]["dram"]["dirty_bytes"] == 0
    assert s.check() == []
    s.close()
    with tairstore.open(path, background=False, **OPTS) as s:
        assert s.get(b"victim") is None
        assert bytes(s.get(b"other")) == val(b"other")
    # The victim's record is in a segment, written committed: its tombstone keeps a rebuild
    # from the segments alone from bringing it back.
    shutil.rmtree(path / "index")
    shutil.rmtree(path / "wal")
    assert fsck(str(path), rebuild=True)["ok"]
    with tairstore.open(path, background=False, **OPTS) as s:
        assert s.get(b"victim") is None
        assert bytes(s.get(b"other")) == val(b"other")


def test_dirty_blocks_are_never_evicted_and_past_the_cap_writes_go_through(tmp_path):
    # 4 MiB of DRAM: at most 2 MiB dirty, i.e. the first two 1 MiB blocks; the rest are
    # written through, and their DRAM copies are what eviction takes.
    opts = dict(OPTS, dram_bytes=4 * MiB)
    with tairstore.open(tmp_path / "s", background=False, **opts) as s:
        keys = [b"b%d" % i for i in range(12)]
        for key in keys:
            assert s.put(key, val(key, MiB))
        st = s.stats()
        assert st["counters"]["writeback_deferred"] == 2
        assert st["counters"]["evictions_dram"] > 0
        assert tiers(s, keys[:2]) == ["dram", "dram"]
        assert st["tiers"]["ssd"]["blocks"] == 10
        for key in keys:
            assert bytes(s.get(key)) == val(key, MiB)
        s.maintain()
        st = s.stats()
        assert st["tiers"]["dram"]["dirty_bytes"] == 0 and st["tiers"]["ssd"]["blocks"] == 12
        assert s.check() == []


def test_an_ssd_quota_counts_a_dirty_block_from_its_admission(tmp_path):
    with tairstore.open(tmp_path / "s", background=False, **OPTS) as s:
        s.set_quota("q", tier_bytes={"ssd": 512 * KiB})
        assert s.put(b"a", val(b"a"), namespace="q")
        assert s.put(b"b", val(b"b"), namespace="q")
        # The quota is full of two dirty blocks (nothing evictable on SSD yet): refused.
        with pytest.raises(CapacityError):
            s.put(b"c", val(b"c"), namespace="q")
        s.maintain()
        # Flushed, they are evictable: the third put evicts the oldest.
        assert s.put(b"c", val(b"c"), namespace="q")
        assert s.stats()["namespaces"]["q"]["tiers"]["ssd"] <= 512 * KiB
        assert bytes(s.get(b"c", namespace="q")) == val(b"c")
