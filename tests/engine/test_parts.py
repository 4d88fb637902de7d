"""The engine's parts keep their own bookkeeping straight: catalog counts, SSD space, TTL index.

``Store.check()`` recomputes the counts from the blocks and compares; it must stay empty through
puts, deletes, evictions, promotions, compaction and reopen. Maintenance is driven explicitly
(``background=False`` and ``store.maintain()``): nothing here waits on a background thread.
"""

from __future__ import annotations

import random
import time

import numpy as np

import tairstore

KiB = 1 << 10
MiB = 1 << 20


def key(i: int) -> bytes:
    return b"part-" + i.to_bytes(8, "little")


def block(i: int, size: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)


def test_bookkeeping_holds_through_churn_compaction_and_reopen(tmp_path):
    rng = random.Random(7)
    sizes = {}
    opts = dict(dram_bytes=MiB, ssd_bytes=4 * MiB, segment_bytes=128 * KiB, durability="none",
                background=False, policy={"dram": "lru", "ssd": "leaf_lru"})
    with tairstore.open(tmp_path / "s", **opts) as s:
        for step in range(600):
            i = rng.randrange(200)
            op = rng.random()
            if op < 0.6:
                size = rng.choice([4 * KiB, 32 * KiB, 64 * KiB])
                if s.put(key(i), block(i, size), parent=key(i - 1) if i % 4 else None):
                    sizes[i] = size
            elif op < 0.8:
                v = s.get(key(i))
                if v is not None:
                    assert bytes(v) == block(i, sizes[i]).tobytes()
                    v.release()
            elif op < 0.95:
                s.delete([key(i)])
            else:
                s.compact(wait=True, full=rng.random() < 0.5)
            if step % 50 == 0:
                assert s.check() == [], step
        s.maintain()
        assert s.check() == []
        st = s.stats()
        assert st["tiers"]["ssd"]["blocks"] == sum(s.exists([key(i) for i in range(200)]))
        assert st["counters"]["evictions_ssd"] > 0
    with tairstore.open(tmp_path / "s", **opts) as s:
        assert s.check() == []
        present = [i for i in range(200) if s.exists([key(i)])[0]]
        assert s.stats()["tiers"]["ssd"]["blocks"] == len(present)
        for i in present:
            assert bytes(s.get(key(i))) == block(i, sizes[i]).tobytes()
        s.compact(wait=True, full=True)
        assert s.check() == []


def test_stats_counts_tiers_without_scanning(tmp_path):
    # The counts follow promotion into DRAM and the drop of DRAM copies.
    with tairstore.open(tmp_path / "s", dram_bytes=256 * KiB, ssd_bytes=8 * MiB, background=False,
                        promote_on="first", durability="none") as s:
        for i in range(16):
            s.put(key(i), block(i, 64 * KiB))
        st = s.stats()["tiers"]
        assert st["ssd"]["blocks"] == 16
        assert st["dram"]["blocks"] == 4  # the arena holds four 64 KiB copies
        for i in range(4):
            s.get(key(i)).release()  # promoted again, evicting newer DRAM copies
        assert s.check() == []
        assert s.stats()["tiers"]["dram"]["blocks"] == 4


def test_ttl_sweep_expires_only_what_is_older_than_the_ttl(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=8 * MiB, background=False,
                        durability="none") as s:
        for i in range(5):
            s.put(key(i), block(i, 4 * KiB), namespace="old")
            s.put(key(i), block(i, 4 * KiB), namespace="keep")
        s.set_quota("old", ttl_s=1.0)
        s.delete([key(0)], namespace="old")  # a stale TTL entry the sweep must skip
        time.sleep(1.1)  # only ever longer on a loaded machine: the blocks are then older still
        s.put(key(9), block(9, 4 * KiB), namespace="old")  # newer than the cutoff
        s.maintain()
        assert s.exists([key(i) for i in range(5)] + [key(9)], namespace="old") == [False] * 5 + [True]
        assert all(s.exists([key(i) for i in range(5)], namespace="keep"))
        assert s.stats()["counters"]["expired"] == 4
        assert s.check() == []


def test_get_pinned_lends_the_slot_until_the_view_is_released(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=256 * KiB, ssd_bytes=0, background=False) as s:
        s.put(key(1), block(1, 64 * KiB))
        view, slot = s.get_pinned(key(1))
        assert (slot.size, bytes(view)) == (64 * KiB, block(1, 64 * KiB).tobytes())
        s.delete([key(1)])
        for i in range(2, 12):  # churn the arena: the pinned slot must not be reused
            s.put(key(i), block(i, 64 * KiB))
        assert bytes(view) == block(1, 64 * KiB).tobytes()
        view.release()
        assert s.get_pinned(key(1)) is None
        assert s.get_pinned(key(99)) is None


def test_a_tier_hovering_at_the_warn_watermark_logs_one_crossing(caplog):
    from tairstore.engine.capacity import WatermarkTracker, parse_watermarks

    t = WatermarkTracker(parse_watermarks({"warn": 0.85, "high": 0.9, "low": 0.75}))
    with caplog.at_level("WARNING"):
        for frac in (0.86, 0.84, 0.86, 0.84, 0.95, 0.8, 0.86):
            t.update("dram", frac)
        assert t.crossings["dram"] == 1 and t.state["dram"] == "warn"
        t.update("dram", 0.5)  # below low: armed again
        t.update("dram", 0.9)
    assert t.crossings["dram"] == 2 and t.state["dram"] == "high"
    assert sum("warn watermark" in r.message for r in caplog.records) == 2
