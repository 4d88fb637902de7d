"""Capacity management: quotas (C1), watermarks, policies through the store, trim/TTL, compaction."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

import tairstore
from tairstore.errors import CapacityError, InvalidArgumentError, NotFoundError
from tairstore.engine.fsck import fsck

KiB = 1 << 10
MiB = 1 << 20


def content(ns: str, key: bytes, size: int) -> np.ndarray:
    seed = int.from_bytes(key[:8], "little") ^ hash(ns) & 0xFFFF
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def k(i: int, tag: int = 0) -> bytes:
    return tag.to_bytes(2, "little") + i.to_bytes(6, "little") + b"\x00" * 8


def assert_exact(store, ns, key, size):
    v = store.get(key, namespace=ns)
    if v is not None:
        assert bytes(v) == content(ns, key, size).tobytes()
    return v is not None


# ------------------------------------------------------------------------------------ quotas
def test_quota_api_and_persistence(tmp_path):
    d = tmp_path / "s"
    with tairstore.open(d, dram_bytes=4 * MiB, ssd_bytes=32 * MiB) as s:
        with pytest.raises(NotFoundError):
            s.quota("nobody")
        q = s.set_quota("a", total_bytes=2 * MiB, tier_bytes={"dram": MiB, "ssd": 2 * MiB}, ttl_s=3600)
        assert q == {"total_bytes": 2 * MiB, "used_bytes": 0, "ttl_s": 3600, "strategy": None, "blocks": 0,
                     "tiers": {"dram": {"limit": MiB, "used": 0}, "ssd": {"limit": 2 * MiB, "used": 0}}}
        s.put(k(1), content("a", k(1), 64 * KiB), namespace="a")
        assert s.quota("a")["used_bytes"] == 64 * KiB
        assert s.namespaces() == ["a"]
        with pytest.raises(InvalidArgumentError):
            s.set_quota("a", total_bytes=-1)
        with pytest.raises(InvalidArgumentError):
            s.set_quota("a", tier_bytes={"gpu": 5})
    with tairstore.open(d, dram_bytes=4 * MiB, ssd_bytes=32 * MiB) as s:
        q = s.quota("a")
        assert q["total_bytes"] == 2 * MiB and q["tiers"]["dram"]["limit"] == MiB
        assert q["used_bytes"] == 64 * KiB and q["ttl_s"] == 3600


def test_block_larger_than_quota_names_the_dimension(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=4 * MiB, ssd_bytes=32 * MiB) as s:
        s.set_quota("a", total_bytes=MiB)
        with pytest.raises(CapacityError) as e:
            s.put(k(1), np.zeros(2 * MiB, np.uint8), namespace="a")
        assert e.value.dimension == "quota:a:total"
        s.set_quota("b", tier_bytes={"ssd": MiB})
        with pytest.raises(CapacityError) as e:
            s.put(k(1), np.zeros(2 * MiB, np.uint8), namespace="b")
        assert e.value.dimension == "quota:b:ssd"
        s.set_quota("c", tier_bytes={"dram": 64 * KiB})
        with pytest.raises(CapacityError) as e:
            s.put(k(1), np.zeros(128 * KiB, np.uint8), namespace="c", tier="dram")
        assert e.value.dimension == "quota:c:dram"
        # auto placement just skips the DRAM copy
        assert s.put(k(1), np.zeros(128 * KiB, np.uint8), namespace="c")
        assert s.match([k(1)], namespace="c").tiers == ["ssd"]


@pytest.mark.parametrize("policy", ["lru", "leaf_lru", "s3fifo"])
def test_quotas_hold_after_every_acknowledged_write(tmp_path, policy):
    """C1 under a mixed workload far past every limit."""
    rng = random.Random(7)
    limits = {"a": (3 * MiB, {"dram": MiB, "ssd": 3 * MiB}), "b": (2 * MiB, {"dram": 512 * KiB}),
              "c": (None, {"ssd": 2 * MiB})}
    with tairstore.open(tmp_path / "s", dram_bytes=2 * MiB, ssd_bytes=12 * MiB, segment_bytes=MiB,
                        policy=policy, durability="none") as s:
        for ns, (total, tiers) in limits.items():
            s.set_quota(ns, total_bytes=total, tier_bytes=tiers)
        written = []
        for i in range(400):
            ns = rng.choice("abc")
            size = rng.choice([16, 64, 128]) * KiB
            key = k(i)
            op = rng.random()
            if op < 0.7:
                keys = [k(i * 10 + j, 1) for j in range(rng.randint(1, 4))]
                sess = s.start_write(keys, [size] * len(keys), namespace=ns)
                for key2 in sess.keys_to_write:
                    s.write(sess, key2, content(ns, key2, size))
                ok = sess.keys_to_write[: rng.randint(0, len(sess.keys_to_write))]
                s.finish_write(sess, ok)
                written += [(ns, key2, size) for key2 in ok]
            elif op < 0.85:
                if s.put(key, content(ns, key, size), namespace=ns):
                    written.append((ns, key, size))
            elif op < 0.95 and written:
                ns2, key2, size2 = rng.choice(written)
                assert_exact(s, ns2, key2, size2)
            elif written:
                ns2, key2, _ = rng.choice(written)
                s.delete([key2], namespace=ns2)
            for ns, (total, tiers) in limits.items():
                q = s.quota(ns)
                if total is not None:
                    assert q["used_bytes"] <= total, (ns, q)
                for tier, lim in tiers.items():
                    assert q["tiers"][tier]["used"] <= lim, (ns, tier, q)
        for ns, key2, size2 in written:
            assert_exact(s, ns, key2, size2)


def test_namespace_over_quota_cannot_push_out_another(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=2 * MiB, ssd_bytes=16 * MiB, segment_bytes=MiB) as s:
        for i in range(20):
            s.put(k(i), content("victim", k(i), 128 * KiB), namespace="victim")
        s.set_quota("greedy", total_bytes=2 * MiB)
        for i in range(200):
            s.put(k(i, 1), content("greedy", k(i, 1), 128 * KiB), namespace="greedy")
        assert s.exists([k(i) for i in range(20)], namespace="victim") == [True] * 20
        assert s.quota("greedy")["used_bytes"] <= 2 * MiB
        for i in range(20):
            assert assert_exact(s, "victim", k(i), 128 * KiB)


def test_global_pressure_evicts_by_fair_share(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=0, ssd_bytes=8 * MiB, segment_bytes=512 * KiB,
                        policy={"ssd": "lru"}, durability="none") as s:
        for i in range(8):  # small stays well under its fair share
            s.put(k(i), content("small", k(i), 128 * KiB), namespace="small")
        for i in range(200):  # big floods the tier
            s.put(k(i, 1), content("big", k(i, 1), 128 * KiB), namespace="big")
        assert s.exists([k(i) for i in range(8)], namespace="small") == [True] * 8
        assert s.stats()["counters"]["evictions_ssd"] > 0
        assert s.stats()["tiers"]["ssd"]["file_bytes"] <= 8 * MiB


# ------------------------------------------------------------------------------- leaf_lru
def test_leaf_lru_never_evicts_a_prefix_before_its_continuation(tmp_path):
    rng = random.Random(3)
    chains = {}
    # No maintenance thread: a background watermark eviction between match() and get() would
    # make a matched block a miss legitimately; this test checks the prefix property only.
    with tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=6 * MiB, segment_bytes=512 * KiB,
                        policy={"dram": "leaf_lru", "ssd": "leaf_lru"}, durability="none",
                        background=False) as s:
        for c in range(120):
            n = rng.randint(2, 8)
            base = chains[rng.choice(list(chains))][: rng.randint(1, 3)] if chains and rng.random() < 0.4 else []
            keys = base + [k(c * 16 + j, 7) for j in range(n)]
            chains[c] = keys
            sess = s.start_write(keys, [64 * KiB] * len(keys), chain=True)
            for key in sess.keys_to_write:
                s.write(sess, key, content("default", key, 64 * KiB))
            s.finish_write(sess, sess.keys_to_write)
            if rng.random() < 0.5:  # re-read a random chain's prefix
                other = chains[rng.choice(list(chains))]
                for key in other[: s.match(other).prefix_len]:
                    assert assert_exact(s, "default", key, 64 * KiB)
            for keys2 in chains.values():
                hits = s.exists(keys2)
                # A hit at position i implies hits at every position before it.
                first_miss = hits.index(False) if False in hits else len(hits)
                assert not any(hits[first_miss:]), (keys2, hits)
        assert s.stats()["counters"]["evictions_ssd"] > 0


# ----------------------------------------------------------------------------- watermarks
def test_watermarks_evict_down_to_low_and_warn_once(tmp_path, caplog):
    wm = {"warn": 0.5, "high": 0.6, "low": 0.3}
    # Maintenance driven by hand (background=False): one pass after the puts, whatever the
    # machine's load, instead of hoping 12 puts finish inside one 10 ms tick.
    with tairstore.open(tmp_path / "s", dram_bytes=4 * MiB, ssd_bytes=32 * MiB, watermarks=wm,
                        background=False, durability="none") as s:
        for i in range(12):  # 3 MiB of DRAM copies = 75% > high
            s.put(k(i), content("default", k(i), 256 * KiB))
        assert s.stats()["tiers"]["dram"]["used_bytes"] > 0.6 * 4 * MiB
        s.maintain()
        st = s.stats()
        assert st["tiers"]["dram"]["used_bytes"] <= 0.3 * 4 * MiB
        assert st["counters"]["watermark_evictions"] == 1
        assert st["watermark_crossings"]["dram"] == 1
        # Below low now: further passes neither evict nor count another crossing.
        s.maintain()
        s.maintain()
        st = s.stats()
        assert st["counters"]["watermark_evictions"] == 1
        assert st["watermark_crossings"]["dram"] == 1
        # Dropped from DRAM, still on SSD, byte-exact.
        for i in range(12):
            assert assert_exact(s, "default", k(i), 256 * KiB)
    assert sum("warn watermark" in r.message for r in caplog.records) == 1


# ---------------------------------------------------------------------------- trim and TTL
def test_trim_all_and_older_than(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=4 * MiB, ssd_bytes=32 * MiB) as s:
        for i in range(5):
            s.put(k(i), content("a", k(i), KiB), namespace="a")
        cut = time.time()
        time.sleep(0.01)
        for i in range(5, 8):
            s.put(k(i), content("a", k(i), KiB), namespace="a")
        s.put(k(1), content("b", k(1), KiB), namespace="b")
        assert s.trim("a", mode="older_than", ts=cut) == 5
        assert s.exists([k(i) for i in range(8)], namespace="a") == [False] * 5 + [True] * 3
        assert s.trim("a") == 3
        assert s.exists([k(1)], namespace="b") == [True]
        with pytest.raises(InvalidArgumentError):
            s.trim("a", mode="older_than")
        with pytest.raises(InvalidArgumentError):
            s.trim("a", mode="some")


def test_ttl_expires_blocks(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=4 * MiB, ssd_bytes=32 * MiB) as s:
        s.set_quota("t", ttl_s=0.05)
        s.put(k(1), content("t", k(1), KiB), namespace="t")
        s.put(k(1), content("u", k(1), KiB), namespace="u")
        time.sleep(0.1)
        assert s.get(k(1), namespace="t") is None
        assert s.get(k(1), namespace="u") is not None
        assert s.stats()["counters"]["expired"] >= 1


# ----------------------------------------------------------------------------- compaction
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_compaction_reclaims_and_accounting_is_exact(tmp_path, compression):
    d = tmp_path / "s"
    sizes = {}
    with tairstore.open(d, dram_bytes=MiB, ssd_bytes=32 * MiB, segment_bytes=MiB,
                        compression=compression, durability="batch") as s:
        for i in range(120):
            size = (16 + 8 * (i % 5)) * KiB
            data = (np.arange(size // 2, dtype=np.uint16) * (i + 1)).view(np.uint8)
            s.put(k(i), data)
            sizes[i] = data
        s.delete([k(i) for i in range(120) if i % 3])
        before = s.stats()["tiers"]["ssd"]["file_bytes"]
        s.compact(wait=True, full=True)
        st = s.stats()
        ssd = st["tiers"]["ssd"]
        assert ssd["file_bytes"] < before
        # Exact accounting: every byte on disk is a live record or a kept tombstone.
        assert ssd["file_bytes"] == ssd["live_record_bytes"] + ssd["tombstone_bytes"]
        assert ssd["bytes"] == sum(len(sizes[i]) for i in range(0, 120, 3))
        assert st["compaction"]["segments_compacted"] > 0
        for i in range(120):
            v = s.get(k(i))
            if i % 3:
                assert v is None
            else:
                assert v is not None and bytes(v) == sizes[i].tobytes()
    report = fsck(str(d))
    assert report["ok"] and report["orphan_bytes"] == 0 and report["blocks"] == 40
    # The relocations were logged: a reopen finds every block at its new place.
    with tairstore.open(d, dram_bytes=MiB, ssd_bytes=32 * MiB, segment_bytes=MiB,
                        compression=compression) as s:
        for i in range(0, 120, 3):
            assert bytes(s.get(k(i))) == sizes[i].tobytes()
    # A rebuild from segments alone agrees (tombstones kept deleted keys deleted).
    report = fsck(str(d), rebuild=True)
    assert report["rebuilt_blocks"] == 40 and report["ok"]


def test_compaction_unlinks_a_segment_without_holding_the_store_lock(tmp_path):
    # Unlinking a large segment frees its cached pages (milliseconds); writers must not wait
    # for it. The file system records, at each unlink, whether the unlinking thread holds the
    # store's lock.
    from tairstore.fileio import OsFileSystem

    held: list[bool] = []

    class Recording(OsFileSystem):
        def unlink(self, path: str) -> None:
            held.append(store._lock._is_owned())
            super().unlink(path)

    store = tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=32 * MiB, segment_bytes=MiB,
                           durability="batch", background=False, fs=Recording())
    with store:
        for i in range(60):
            store.put(k(i), content("default", k(i), 32 * KiB))
        store.delete([k(i) for i in range(60) if i % 2])
        store.compact(wait=True, full=True)
        assert store.stats()["compaction"]["segments_compacted"] > 0
        for i in range(0, 60, 2):
            assert_exact(store, "default", k(i), 32 * KiB)
    assert held and not any(held)


def test_maintenance_compacts_dead_space_under_churn_instead_of_evicting(tmp_path):
    # Each delete is followed by a maintenance pass, as the background thread would run one
    # every few puts; driven here, so a starved thread cannot turn reclaiming into evicting.
    with tairstore.open(tmp_path / "s", dram_bytes=0, ssd_bytes=8 * MiB, segment_bytes=512 * KiB,
                        background=False, durability="none") as s:
        live = []
        for i in range(400):  # 400 x 64 KiB = 25 MiB written through an 8 MiB tier, ~2 MiB live
            s.put(k(i), content("default", k(i), 64 * KiB))
            live.append(i)
            if len(live) > 32:
                s.delete([k(live.pop(0))])
                s.maintain()
        st = s.stats()
        assert st["counters"]["evictions_ssd"] == 0  # deletes alone made the room
        assert st["compaction"]["segments_compacted"] > 0
        for i in live:
            assert assert_exact(s, "default", k(i), 64 * KiB)


def test_writer_waits_for_a_deleted_segment_that_a_reader_still_pins(tmp_path):
    """Room held by a deleted-but-pinned segment is coming back: a full-SSD put waits for it.

    ``sync`` pins every dirty segment while it fsyncs, and a reader pins the segment it reads;
    compaction may delete such a segment meanwhile, and its bytes leave the file total only
    when the last pin goes. A put that needs that room must wait, not raise CapacityError.
    """
    with tairstore.open(tmp_path / "s", dram_bytes=0, ssd_bytes=2 * MiB, segment_bytes=256 * KiB,
                        maintenance_interval_s=60, durability="none") as s:
        for i in range(60):  # ~3.8 MiB through a 2 MiB tier: eviction has been running
            s.put(k(i), content("default", k(i), 64 * KiB))
        ssd = s._ssd
        # Pin every closed segment, as a long fsync of all dirty segments does.
        held = [ssd._pin(sid) for sid in ssd.segment_ids() if sid != ssd.head_segment]
        assert held
        released = []

        def release():
            time.sleep(0.3)
            for seg in held:
                ssd._unpin(seg)
            released.append(time.monotonic())

        t = threading.Thread(target=release)
        t.start()
        try:
            for i in range(60, 100):
                s.put(k(i), content("default", k(i), 64 * KiB))  # must not raise CapacityError
        finally:
            t.join()
        assert released
        assert ssd.retiring_bytes == 0
        for i in range(90, 100):
            assert assert_exact(s, "default", k(i), 64 * KiB)
        st = s.stats()["tiers"]["ssd"]
        assert st["file_bytes"] <= 2 * MiB


def test_a_rebuild_keeps_namespace_settings_and_quotas_hold_after_it(tmp_path):
    """``fsck --rebuild`` rebuilds the index from the segments, which do not hold namespace
    settings: they are carried over from the index it replaces (when that one still opens),
    and the reopened store evicts down to each quota what the rebuild brought back beyond it
    (evicted blocks: an eviction leaves no tombstone), so C1 holds from the open on."""
    d = tmp_path / "s"
    block = bytes(range(256)) * 16  # 4 KiB
    opts = dict(dram_bytes=MiB, ssd_bytes=8 * MiB, background=False)
    with tairstore.open(d, **opts) as s:
        s.set_quota("q", total_bytes=2 * len(block), ttl_s=3600.0)
        s.set_strategy("q", "prefer:ssd")
        s.set_quota("other", tier_bytes={"ssd": 5 * len(block)})
        for i in range(4):  # the third and fourth evict the first two
            assert s.put(b"k%d" % i, block, namespace="q")
        assert s.quota("q")["blocks"] == 2
    report = fsck(str(d), rebuild=True)
    assert report["ok"] and report["rebuilt_blocks"] == 4  # the evicted two are back on disk
    with tairstore.open(d, **opts) as s:
        q = s.quota("q")
        assert q["total_bytes"] == 2 * len(block) and q["ttl_s"] == 3600.0
        assert q["strategy"] == "prefer:ssd" and s.route("q") == "ssd"
        assert s.quota("other")["tiers"]["ssd"]["limit"] == 5 * len(block)
        assert q["used_bytes"] <= q["total_bytes"] and q["blocks"] == 2  # C1 at once
        held = [i for i in range(4) if s.get(b"k%d" % i, namespace="q") is not None]
        assert len(held) == 2
        for i in held:
            assert bytes(s.get(b"k%d" % i, namespace="q")) == block
    assert fsck(str(d))["ok"]


def test_a_rebuild_without_a_readable_index_starts_namespaces_unlimited(tmp_path):
    """When the index a rebuild replaces does not open, its settings are gone with it: every
    block of the segments comes back, the namespaces are unlimited until set again."""
    d = tmp_path / "s"
    block = bytes(range(256)) * 16
    with tairstore.open(d, dram_bytes=MiB, ssd_bytes=8 * MiB, background=False) as s:
        s.set_quota("q", total_bytes=10 * len(block))
        assert s.put(b"k", block, namespace="q")
    (d / "index" / "data.mdb").write_bytes(b"\0" * 8192)  # not an LMDB file any more
    report = fsck(str(d), rebuild=True)
    assert report["ok"] and report["rebuilt_blocks"] == 1
    with tairstore.open(d, dram_bytes=MiB, ssd_bytes=8 * MiB, background=False) as s:
        assert s.quota("q")["total_bytes"] is None
        assert bytes(s.get(b"k", namespace="q")) == block
