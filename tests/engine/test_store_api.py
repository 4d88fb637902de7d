"""API tests of the embedded Store: every method, every bad input, real files and real LMDB."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import numpy as np
import pytest

import tairstore
from tairstore.errors import (
    CapacityError,
    ClosedError,
    FormatError,
    InvalidArgumentError,
    LeaseExpiredError,
    SessionError,
    StoreLockedError,
)
from tairstore.keys import chain_hashes

KiB = 1 << 10
MiB = 1 << 20


def block(seed: int, size: int = 16 * KiB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def key(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


@pytest.fixture(params=["durable", "volatile"])
def store(request, tmp_path):
    opts = dict(dram_bytes=8 * MiB, ssd_bytes=64 * MiB, segment_bytes=4 * MiB)
    if request.param == "volatile":
        opts["ssd_bytes"] = 0
    s = tairstore.open(tmp_path / "s", **opts)
    yield s
    s.close()


@pytest.fixture
def durable(tmp_path):
    s = tairstore.open(tmp_path / "d", dram_bytes=8 * MiB, ssd_bytes=64 * MiB, segment_bytes=4 * MiB)
    yield s
    s.close()


# ------------------------------------------------------------------------------------ put / get
def test_put_get_round_trip_all_buffer_types(store):
    data = block(1)
    assert store.put(key(1), data) is True
    assert store.put(key(2), data.tobytes()) is True
    assert store.put(key(3), bytearray(data.tobytes())) is True
    assert store.put(key(4), memoryview(data.tobytes())) is True
    assert store.put(key(5), data.view(np.uint16)) is True
    for i in range(1, 6):
        v = store.get(key(i))
        assert v is not None and v.readonly and bytes(v) == data.tobytes()


def test_put_existing_key_returns_false_and_keeps_first(store):
    assert store.put(key(1), block(1))
    assert store.put(key(1), block(2)) is False
    assert bytes(store.get(key(1))) == block(1).tobytes()


def test_get_miss_returns_none_and_counts(store):
    assert store.get(key(9)) is None
    assert store.get_into(key(9), bytearray(10)) == 0
    assert store.stats()["counters"]["misses"] == 2


def test_get_into_copies_and_checks_buffer(store):
    data = block(3)
    store.put(key(1), data)
    out = np.zeros(len(data) + 100, np.uint8)
    assert store.get_into(key(1), out) == len(data)
    assert np.array_equal(out[: len(data)], data)
    with pytest.raises(InvalidArgumentError):
        store.get_into(key(1), bytearray(10))  # too small
    with pytest.raises(InvalidArgumentError):
        store.get_into(key(1), bytes(len(data)))  # read-only
    with pytest.raises(InvalidArgumentError):
        store.get_into(key(1), 12345)


def test_namespaces_are_separate(store):
    store.put(key(1), block(1), namespace="a")
    assert store.exists([key(1)], namespace="b") == [False]
    assert store.put(key(1), block(2), namespace="b")
    assert bytes(store.get(key(1), namespace="a")) == block(1).tobytes()
    assert bytes(store.get(key(1), namespace="b")) == block(2).tobytes()
    assert store.get(key(1)) is None
    assert store.delete([key(1)], namespace="a") == 1
    assert store.exists([key(1)], namespace="b") == [True]


def test_exists_and_delete(store):
    for i in range(4):
        store.put(key(i), block(i))
    assert store.exists([key(i) for i in range(6)]) == [True] * 4 + [False] * 2
    assert store.delete([key(0), key(0), key(5)]) == 1
    assert store.exists([key(0)]) == [False]
    assert store.get(key(0)) is None
    assert store.put(key(0), block(7))  # a deleted key can be written again
    assert bytes(store.get(key(0))) == block(7).tobytes()


# ------------------------------------------------------------------------------------- match
def test_match_modes(store):
    keys = [key(i) for i in range(10)]
    for i in (0, 1, 2, 4, 6, 7, 8):
        store.put(keys[i], block(i, 4 * KiB))
    m = store.match(keys)
    assert m.prefix_len == 3 and m.hits == [True, True, True, False, True, False, True, True, True, False]
    assert m.tiers[0] in ("dram", "ssd") and m.tiers[3] is None
    e = store.match(keys, mode="exact")
    assert e.hits == m.hits and e.hit_count == 7
    w = store.match(keys, mode="sliding_window", window=3)
    assert (w.window_start, w.window_len) == (6, 3)
    w = store.match(keys, mode="sliding_window", window=4)
    assert w.window_start is None and w.window_len == 0
    with pytest.raises(InvalidArgumentError):
        store.match(keys, mode="sliding_window")
    with pytest.raises(InvalidArgumentError):
        store.match(keys, mode="fuzzy")


def test_match_with_chain_hashes(store):
    keys = chain_hashes(np.arange(64 * 8, dtype=np.int32), 64)
    for k in keys[:5]:
        store.put(k, block(0, 4 * KiB))
    assert store.match(keys).prefix_len == 5


# ------------------------------------------------------------------------------- sessions
def test_two_phase_write_commits_only_ok_keys(store):
    keys = [key(i) for i in range(4)]
    store.put(keys[0], block(0))
    s = store.start_write(keys, [16 * KiB] * 4)
    assert s.keys_to_write == keys[1:]
    for i, k in enumerate(s.keys_to_write, start=1):
        store.write(s, k, block(i))
    # W1: nothing visible before finish_write.
    assert store.exists(keys) == [True, False, False, False]
    assert store.finish_write(s, keys[1:3]) == 2
    assert store.exists(keys) == [True, True, True, False]
    assert bytes(store.get(keys[2])) == block(2).tobytes()
    # The uncommitted key is free again.
    assert store.put(keys[3], block(3))


def test_in_flight_keys_are_not_offered_twice(store):
    s1 = store.start_write([key(1), key(2)], [KiB, KiB])
    s2 = store.start_write([key(2), key(3)], [KiB, KiB])
    assert s2.keys_to_write == [key(3)]
    assert store.put(key(1), block(1, KiB)) is False  # being written by s1
    store.abort_write(s1)
    assert store.put(key(1), block(1, KiB)) is True
    store.abort_write(s2)


def test_session_misuse_is_refused(store):
    s = store.start_write([key(1), key(2)], [KiB, 2 * KiB])
    with pytest.raises(SessionError):
        store.write(s, key(3), block(0, KiB))  # not in session
    with pytest.raises(SessionError):
        store.write(s, key(1), block(0, 2 * KiB))  # wrong size
    store.write(s, key(1), block(0, KiB))
    with pytest.raises(SessionError):
        store.write(s, key(1), block(0, KiB))  # twice
    with pytest.raises(SessionError):
        store.finish_write(s, [key(2)])  # not written
    assert store.finish_write(s, [key(1)]) == 1
    with pytest.raises(SessionError):
        store.finish_write(s, [key(1)])  # already finished
    with pytest.raises(SessionError):
        store.write(s, key(2), block(0, 2 * KiB))
    with pytest.raises(SessionError):
        store.write("not a session", key(2), b"x")


def test_session_with_nothing_to_write(store):
    store.put(key(1), block(1, KiB))
    s = store.start_write([key(1)], [KiB])
    assert s.keys_to_write == []
    assert store.finish_write(s, []) == 0


def test_lease_expiry_aborts_and_releases(tmp_path):
    # The reaper runs when the test says so, not on a tick that a loaded machine may delay.
    with tairstore.open(tmp_path / "s", dram_bytes=4 * MiB, ssd_bytes=16 * MiB,
                        background=False) as s:
        sess = s.start_write([key(1)], [KiB], lease_s=0.05)
        s.write(sess, key(1), block(1, KiB))
        time.sleep(0.1)  # past the lease: only the lower bound matters
        s.maintain()
        assert s.stats()["sessions_open"] == 0
        with pytest.raises(LeaseExpiredError):
            s.finish_write(sess, [key(1)])
        with pytest.raises(LeaseExpiredError):
            s.write(sess, key(1), block(1, KiB))
        assert s.stats()["counters"]["leases_expired"] == 1
        assert s.stats()["sessions_open"] == 0
        assert s.put(key(1), block(2, KiB))  # the key is free again


def test_finish_after_lease_ran_out_without_reaper(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=4 * MiB, ssd_bytes=0, maintenance_interval_s=60) as s:
        sess = s.start_write([key(1)], [KiB], lease_s=0.01)
        s.write(sess, key(1), block(1, KiB))
        time.sleep(0.05)
        with pytest.raises(LeaseExpiredError):
            s.finish_write(sess, [key(1)])
        assert s.exists([key(1)]) == [False]


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", ["text", b"", b"x" * 65, 42, None])
def test_bad_keys(store, bad):
    with pytest.raises(InvalidArgumentError):
        store.put(bad, b"data")
    with pytest.raises(InvalidArgumentError):
        store.get(bad)
    with pytest.raises(InvalidArgumentError):
        store.exists([bad])


def test_bad_blocks_and_sizes(store):
    with pytest.raises(InvalidArgumentError):
        store.put(key(1), b"")  # empty block
    with pytest.raises(InvalidArgumentError):
        store.put(key(1), "text")
    with pytest.raises(InvalidArgumentError):
        store.put(key(1), np.zeros((4, 4), np.uint8)[:, 1])  # not contiguous
    with pytest.raises(CapacityError) as e:
        store.start_write([key(1)], [65 * MiB])  # over max_block_bytes
    assert e.value.dimension == "block_size"
    with pytest.raises(InvalidArgumentError):
        store.start_write([key(1)], [KiB, KiB])
    with pytest.raises(InvalidArgumentError):
        store.start_write([key(1), key(1)], [KiB, KiB])
    with pytest.raises(InvalidArgumentError):
        store.start_write([key(1)], [1.5])
    with pytest.raises(InvalidArgumentError):
        store.start_write([key(1)], [KiB], lease_s=0)
    with pytest.raises(InvalidArgumentError):
        store.exists(key(1))  # a single key, not a list
    with pytest.raises(InvalidArgumentError):
        store.put(key(1), b"x", namespace="")
    with pytest.raises(InvalidArgumentError):
        store.put(key(1), b"x", namespace=7)


def test_bad_options(tmp_path):
    with pytest.raises(InvalidArgumentError):
        tairstore.open(tmp_path / "a", durability="eventually")
    with pytest.raises(InvalidArgumentError):
        tairstore.open(tmp_path / "b", dram_bytes=0, ssd_bytes=0)
    with pytest.raises(InvalidArgumentError):
        tairstore.open(tmp_path / "c", dram_size=5)
    with pytest.raises(InvalidArgumentError):
        tairstore.open(tmp_path / "d", compression="lz4")


def test_block_larger_than_a_volatile_dram_tier(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=0) as s:
        with pytest.raises(CapacityError) as e:
            s.put(key(1), np.zeros(2 * MiB, np.uint8))
        assert e.value.dimension == "tier:dram"


def test_block_larger_than_ssd_tier(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=0, ssd_bytes=MiB, segment_bytes=MiB) as s:
        with pytest.raises(CapacityError) as e:
            s.put(key(1), np.zeros(2 * MiB, np.uint8))
        assert e.value.dimension == "tier:ssd"
        assert s.put(key(2), np.zeros(KiB, np.uint8))


def test_operations_after_close_raise_closed(tmp_path):
    s = tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=4 * MiB)
    sess = s.start_write([key(1)], [KiB])
    s.close()
    s.close()  # idempotent
    for call in (lambda: s.put(key(1), b"x"), lambda: s.get(key(1)), lambda: s.exists([key(1)]),
                 lambda: s.match([key(1)]), lambda: s.delete([key(1)]), lambda: s.stats(),
                 lambda: s.get_into(key(1), bytearray(1)), lambda: s.start_write([key(2)], [1])):
        with pytest.raises(ClosedError):
            call()
    with pytest.raises((ClosedError, SessionError)):
        s.write(sess, key(1), b"x" * KiB)


def test_not_a_store_directory(tmp_path):
    d = tmp_path / "other"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    with pytest.raises(FormatError):
        tairstore.open(d)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FormatError):
        tairstore.open(f)
    with pytest.raises(FormatError):
        tairstore.open(tmp_path / "missing", create=False)


def test_newer_format_version_is_refused(tmp_path):
    d = tmp_path / "s"
    tairstore.open(d, dram_bytes=MiB, ssd_bytes=4 * MiB).close()
    (d / "TAIRSTORE").write_text('{"format": 99}')
    with pytest.raises(FormatError, match="upgrade"):
        tairstore.open(d)
    (d / "TAIRSTORE").write_text("garbage")
    with pytest.raises(FormatError):
        tairstore.open(d)


def _open_in_child(path: str, q) -> None:
    try:
        tairstore.open(path, dram_bytes=MiB, ssd_bytes=4 * MiB).close()
        q.put("opened")
    except StoreLockedError:
        q.put("locked")


def test_second_process_is_refused(tmp_path):
    d = str(tmp_path / "s")
    with tairstore.open(d, dram_bytes=MiB, ssd_bytes=4 * MiB):
        with pytest.raises(StoreLockedError):
            tairstore.open(d)  # a second handle in this process
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_open_in_child, args=(d, q))
        p.start()
        p.join(60)
        assert q.get(timeout=5) == "locked"
    p = ctx.Process(target=_open_in_child, args=(d, q))
    p.start()
    p.join(60)
    assert q.get(timeout=5) == "opened"


# ---------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("durability", ["sync", "batch", "none"])
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_reopen_keeps_committed_blocks(tmp_path, durability, compression):
    d = tmp_path / "s"
    data = {key(i): (np.arange(8 * KiB, dtype=np.uint16) * (i + 1)).view(np.uint8) for i in range(20)}
    with tairstore.open(d, dram_bytes=MiB, ssd_bytes=16 * MiB, durability=durability,
                        compression=compression) as s:
        for k, v in data.items():
            s.put(k, v)
        s.delete([key(0)])
        sess = s.start_write([key(100)], [KiB])
        s.write(sess, key(100), block(0, KiB))  # never committed
    with tairstore.open(d, dram_bytes=MiB, ssd_bytes=16 * MiB, durability=durability,
                        compression=compression) as s:
        assert s.exists([key(0), key(100)]) == [False, False]
        for k, v in list(data.items())[1:]:
            got = s.get(k)
            assert got is not None and bytes(got) == v.tobytes()
        assert s.stats()["blocks"] == 19


def test_volatile_store_forgets_on_close(tmp_path):
    d = tmp_path / "s"
    with tairstore.open(d, dram_bytes=MiB, ssd_bytes=0) as s:
        s.put(key(1), block(1, KiB))
        assert s.stats()["volatile"] is True
    with tairstore.open(d, dram_bytes=MiB, ssd_bytes=0) as s:
        assert s.exists([key(1)]) == [False]


# --------------------------------------------------------------------------- tiers/eviction
def test_dram_eviction_keeps_blocks_on_ssd(durable):
    for i in range(40):  # 40 x 512 KiB = 20 MiB through an 8 MiB DRAM tier
        durable.put(key(i), block(i, 512 * KiB))
    st = durable.stats()
    assert st["counters"]["evictions_dram"] > 0
    assert st["tiers"]["dram"]["used_bytes"] <= st["tiers"]["dram"]["capacity"]
    for i in range(40):
        assert bytes(durable.get(key(i))) == block(i, 512 * KiB).tobytes()
    assert durable.stats()["counters"]["hits_ssd"] > 0


def test_volatile_eviction_drops_lru(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=2 * MiB, ssd_bytes=0) as s:
        for i in range(8):
            s.put(key(i), block(i, 512 * KiB))
        present = s.exists([key(i) for i in range(8)])
        assert present[-4:] == [True] * 4 and not all(present)
        assert s.stats()["counters"]["evictions_dram"] == present.count(False)


def test_ssd_full_evicts_by_policy_and_compacts(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=0, ssd_bytes=8 * MiB, segment_bytes=MiB,
                        policy={"ssd": "lru"}) as s:
        for i in range(60):  # 60 x 256 KiB = 15 MiB into 8 MiB
            assert s.put(key(i), block(i, 256 * KiB))
        st = s.stats()
        assert st["counters"]["evictions_ssd"] > 0
        assert st["tiers"]["ssd"]["file_bytes"] <= 8 * MiB
        present = s.exists([key(i) for i in range(60)])
        assert present[-10:] == [True] * 10 and not present[0]
        for i in range(60):
            v = s.get(key(i))
            assert v is None or bytes(v) == block(i, 256 * KiB).tobytes()
        assert st["compaction"]["segments_compacted"] > 0 or st["counters"]["evictions_ssd"] > 0


def test_held_view_survives_eviction_and_delete(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=2 * MiB, ssd_bytes=0) as s:
        s.put(key(0), block(0, 512 * KiB))
        view = s.get(key(0))
        snapshot = bytes(view)
        s.delete([key(0)])
        for i in range(1, 12):
            s.put(key(i), block(i, 512 * KiB))  # would reuse the slot if it were not pinned
        assert bytes(view) == snapshot
        arr = np.frombuffer(view, np.uint8)
        view.release()
        for i in range(12, 20):
            s.put(key(i), block(i, 512 * KiB))
        assert arr.tobytes() == snapshot  # derived arrays keep the pin too
        del arr


def test_ssd_read_promotes_to_dram(durable):
    durable.put(key(1), block(1, 512 * KiB))
    for i in range(2, 40):
        durable.put(key(i), block(i, 512 * KiB))
    assert durable.match([key(1)]).tiers == ["ssd"]
    assert bytes(durable.get(key(1))) == block(1, 512 * KiB).tobytes()
    assert durable.match([key(1)]).tiers == ["ssd"]  # promoted on the second hit (default)
    assert bytes(durable.get(key(1))) == block(1, 512 * KiB).tobytes()
    assert durable.match([key(1)]).tiers == ["dram"]
    assert durable.stats()["counters"]["promotions"] >= 1


def test_stats_shape(durable):
    durable.put(key(1), block(1))
    st = durable.stats()
    assert set(st["tiers"]) == {"dram", "ssd"}
    for tier in ("dram", "ssd"):
        assert {"blocks", "bytes", "capacity"} <= set(st["tiers"][tier])
    assert {"hits", "misses", "checksum_errors"} <= set(st["counters"])
    assert st["namespaces"]["default"]["blocks"] == 1
    assert st["namespaces"]["default"]["bytes"] == 16 * KiB
    assert st["durability"] == "sync" and st["volatile"] is False


def test_concurrent_puts_of_one_key_commit_once(durable):
    barrier = threading.Barrier(8)
    results = []

    def worker(i: int) -> None:
        barrier.wait()
        results.append(durable.put(key(77), block(5)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert bytes(durable.get(key(77))) == block(5).tobytes()


def test_context_manager_and_repr(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=0) as s:
        assert "open" in repr(s)
    assert "closed" in repr(s)


def test_cli_help_and_demo(tmp_path):
    from tairstore.cli import main

    assert main([]) == 0
    assert main(["demo", "--data-dir", str(tmp_path / "demo"), "--blocks", "8",
                 "--block-bytes", "64K"]) == 0
    assert main(["fsck", str(tmp_path / "demo"), "--json"]) == 0
    assert os.path.exists(tmp_path / "demo" / "TAIRSTORE")


def test_write_view_receives_payload_in_place(store):
    sess = store.start_write([key(1), key(2)], [16 * KiB, 16 * KiB])
    view = store.write_view(sess, key(1))
    assert view is not None and not view.readonly and len(view) == 16 * KiB
    view[:] = block(1).tobytes()
    view.release()
    store.write_done(sess, key(1))
    store.write(sess, key(2), block(2))
    with pytest.raises(SessionError):
        store.write_done(sess, key(1))  # already written
    assert store.finish_write(sess, [key(1), key(2)]) == 2
    assert bytes(store.get(key(1))) == block(1).tobytes()
    assert store.tier_of(key(1)) == "dram" and store.tier_of(key(9)) is None


def test_write_view_is_none_without_a_dram_reservation(durable):
    sess = durable.start_write([key(1)], [KiB], tier="ssd")
    assert durable.write_view(sess, key(1)) is None
    with pytest.raises(SessionError):
        durable.write_done(sess, key(1))
    durable.write(sess, key(1), block(1, KiB))
    assert durable.finish_write(sess, [key(1)]) == 1
    assert durable.tier_of(key(1)) == "ssd"
    assert durable.volatile is False


# ------------------------------------------------------------------- host memory, close hooks
def test_host_memory_is_the_arena_that_views_point_into(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=4 * MiB, ssd_bytes=0) as s:
        mem = s.host_memory()
        assert mem.dtype == np.uint8 and mem.nbytes >= 4 * MiB
        s.put(key(1), block(1))
        view = np.frombuffer(s.get(key(1)), np.uint8)
        lo = mem.ctypes.data
        assert lo <= view.ctypes.data and view.ctypes.data + view.nbytes <= lo + mem.nbytes
        assert np.array_equal(view, block(1))
    with tairstore.open(tmp_path / "n", dram_bytes=0, ssd_bytes=16 * MiB, segment_bytes=4 * MiB) as s:
        assert s.host_memory() is None  # no DRAM tier
    with pytest.raises(ClosedError):
        s.host_memory()


@pytest.mark.parametrize("how", ["close", "abandon"])
def test_close_hooks_run_once_before_the_files_close_and_never_raise(tmp_path, how):
    s = tairstore.open(tmp_path / "s", dram_bytes=4 * MiB, ssd_bytes=16 * MiB, segment_bytes=4 * MiB)
    s.put(key(1), block(1))
    calls = []

    def failing():
        calls.append("failing")
        raise RuntimeError("hook error")

    s.on_close(lambda: calls.append("first"))
    s.on_close(failing)
    s.on_close(lambda: calls.append("last"))
    getattr(s, how)()
    assert calls == ["first", "failing", "last"]  # every hook ran, in order, despite the error
    s.close()
    assert calls == ["first", "failing", "last"]  # once
    with pytest.raises(ClosedError):
        s.on_close(lambda: None)
    with tairstore.open(tmp_path / "s", dram_bytes=4 * MiB, ssd_bytes=16 * MiB, segment_bytes=4 * MiB) as again:
        assert np.array_equal(np.frombuffer(again.get(key(1)), np.uint8), block(1))  # nothing lost
