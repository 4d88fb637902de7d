"""Edge cases of DRAM partitions (``StoreConfig.dram_partitions``, ``DramArena(partitions=)``):
allocator accounting under churn, pins, write-back, promotion, TTL/trim/delete, watermarks,
quotas, reopen with other partitions, prefault, the shared mapping's lifetime, validation."""

from __future__ import annotations

import gc
import os
import random

import numpy as np
import pytest

import tairstore
from tairstore.errors import CapacityError, InvalidArgumentError
from tairstore.tiers.dram import DramArena, SharedBacking

KIB = 1024
MIB = 1 << 20
BLOCK = 64 * KIB
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


def _block(i: int, size: int = BLOCK) -> bytes:
    return np.full(size, i % 251, np.uint8).tobytes()


def _open(tmp_path, name="s", *, dram=1 * MIB, ssd=0, parts=None, **kw):
    # No maintenance thread unless asked: these tests fill partitions to the brim, which the
    # watermarks would shed at a moment of the thread's choosing; tests of the watermarks run
    # store.maintain() themselves.
    kw.setdefault("background", False)
    if parts is None:
        parts = {"team-a": {"bytes": 256 * KIB, "namespaces": ["a1", "a2"]}}
    return tairstore.open(str(tmp_path / name), dram_bytes=dram, ssd_bytes=ssd,
                          dram_partitions=parts, **kw)


def _parts(store) -> dict:
    return store.stats()["tiers"]["dram"]["partitions"]


# ------------------------------------------------------------------------------ the arena
def test_arena_churn_keeps_every_partition_accounted():
    """Random alloc / release / pin / view across three partitions: every slot stays in its
    partition's range, and the per-partition and total accounting always add up."""
    rng = random.Random(7)
    arena = DramArena(2 * MIB, partitions=[256 * KIB, 100_000])  # the second is rounded down
    assert [arena.partition_bytes(i) for i in range(3)] == [2 * MIB - 256 * KIB - 98304, 256 * KIB, 98304]
    assert arena.capacity_bytes == 2 * MIB
    live: list[tuple[int, object]] = []
    pins: list[object] = []
    views: list[memoryview] = []
    for step in range(3000):
        r = rng.random()
        if r < 0.5:
            part = rng.randrange(3)
            slot = arena.alloc(rng.choice([1, 4096, 5000, 20_000, 64 * KIB]), part)
            if slot is not None:
                lo = arena.partition_offset(part)
                assert lo <= slot.offset and slot.offset + slot.reserved <= lo + arena.partition_bytes(part)
                assert arena.partition_of(slot.offset) == part
                live.append((part, slot))
        elif r < 0.75 and live:
            _, slot = live.pop(rng.randrange(len(live)))
            arena.release(slot)
        elif r < 0.85 and live:
            pins.append(arena.pin(live[rng.randrange(len(live))][1]))
        elif r < 0.92 and live:
            views.append(arena.pinned_view(live[rng.randrange(len(live))][1]))
        elif pins and r < 0.96:
            arena.unpin(pins.pop(rng.randrange(len(pins))))
        elif views:
            views.pop(rng.randrange(len(views))).release()
        if step % 100 == 0:
            arena.check_invariants()
            used = [arena.partition_used(i) for i in range(3)]
            assert sum(used) == arena.used_bytes
            assert arena.used_bytes + arena.free_bytes == arena.capacity_bytes
            assert all(0 <= u <= arena.partition_bytes(i) for i, u in enumerate(used))
    for p in pins:
        arena.unpin(p)
    for v in views:
        v.release()
    for _, slot in live:
        arena.release(slot)
    arena.check_invariants()
    assert arena.used_bytes == 0 and all(arena.partition_used(i) == 0 for i in range(3))
    assert arena.largest_free_extent == max(arena.partition_bytes(i) for i in range(3))


def test_a_full_partition_does_not_stop_another_and_pinned_views_survive():
    arena = DramArena(1 * MIB, partitions=[128 * KIB])
    a = [arena.alloc(64 * KIB, 1) for _ in range(2)]
    assert arena.alloc(4096, 1) is None  # partition 1 full ...
    view = arena.pinned_view(a[0])
    arena.release(a[0])  # ... pinned: freed only when the view goes
    assert arena.alloc(4096, 1) is None
    b = arena.alloc(512 * KIB, 0)  # ... and the default partition is untouched
    assert b is not None and arena.partition_used(0) == 512 * KIB
    # largest_free_extent is over all partitions: the default one's
    assert arena.largest_free_extent == arena.partition_bytes(0) - 512 * KIB
    view.release()
    assert arena.partition_used(1) == 64 * KIB
    assert arena.alloc(64 * KIB, 1) is not None
    arena.check_invariants()


def test_a_block_larger_than_its_partition_raises_block_size_in_the_arena():
    arena = DramArena(1 * MIB, partitions=[64 * KIB])
    with pytest.raises(CapacityError) as exc:
        arena.alloc(64 * KIB + 1, 1)
    assert exc.value.dimension == "block_size"
    assert arena.alloc(64 * KIB + 1, 0) is not None


@pytest.mark.parametrize("parts, ok", [
    ([1 * MIB - 4096], True),       # the default partition keeps exactly one granule
    ([1 * MIB - 4095], True),       # rounded down to 1 MiB - 8 KiB
    ([1 * MIB], False),
    ([4095], False),                # below a granule once rounded
    ([512 * KIB, 512 * KIB], False),
])
def test_arena_partition_sizes_at_the_edges(parts, ok):
    if not ok:
        with pytest.raises(InvalidArgumentError):
            DramArena(1 * MIB, partitions=parts)
        return
    arena = DramArena(1 * MIB, partitions=parts)
    assert arena.partition_bytes(0) + sum(arena.partition_bytes(i) for i in range(1, arena.partitions)) \
        == arena.capacity_bytes
    assert arena.partition_bytes(0) >= 4096
    for i in range(arena.partitions):
        assert arena.alloc(arena.partition_bytes(i), i) is not None
    arena.check_invariants()


def test_arena_prefault_with_partitions_private():
    arena = DramArena(1 * MIB, partitions=[256 * KIB])
    assert arena.prefault() in ("done", "background")
    arena.stop_prefault()
    s = arena.alloc(4096, 1)
    arena.copy_in(s, b"x" * 4096)
    assert bytes(arena.pinned_view(s)) == b"x" * 4096
    arena.check_invariants()


# ------------------------------------------------------------------------------ the store
@pytest.mark.parametrize("a_blocks", [13, 16])
def test_watermark_eviction_never_takes_a_partitions_blocks_for_the_default_one(tmp_path, a_blocks):
    """The default partition full pushes the whole arena over ``high``. team-a below its own
    ``high`` (13 of 16 slots: 81 %) keeps every block: evicting them frees nothing the default
    partition can use (and with no SSD tier they would be gone). team-a full itself (16 of
    16) is brought down to ``low`` of its own size, like the default partition."""
    small = 16 * KIB
    with _open(tmp_path, background=False) as store:
        for i in range(a_blocks):
            assert store.put(b"a%d" % i, _block(i, small), namespace="a1")
        for n in range(6):  # six namespaces of 128 KiB fill the 768 KiB default partition
            for i in range(2):
                assert store.put(b"b%d" % i, _block(i), namespace=f"b{n}")
        assert store.stats()["tiers"]["dram"]["usage"] > 0.9
        store.maintain()
        held = sum(store.get(b"a%d" % i, namespace="a1") is not None for i in range(a_blocks))
        assert held == (13 if a_blocks == 13 else 12)
        assert _parts(store)["default"]["used_bytes"] <= 0.75 * 768 * KIB
        assert store.stats()["tiers"]["dram"]["usage"] < 0.9


def test_block_larger_than_its_partition(tmp_path):
    """Without SSD: refused (the dimension docs/DAEMON.md names); with SSD: kept on SSD only."""
    with _open(tmp_path) as store:
        with pytest.raises(CapacityError) as exc:
            store.put(b"big", bytes(300 * KIB), namespace="a1")
        assert exc.value.dimension in ("block_size", "tier:dram")
        assert "partition" in str(exc.value)
        assert _parts(store)["team-a"]["used_bytes"] == 0
    with _open(tmp_path, "t", ssd=64 * MIB) as store:
        assert store.put(b"big", bytes(300 * KIB), namespace="a1")
        assert store.tier_of(b"big", namespace="a1") == "ssd"
        assert bytes(store.get(b"big", namespace="a1")) == bytes(300 * KIB)


def test_ttl_trim_and_delete_give_partition_bytes_back(tmp_path):
    with _open(tmp_path) as store:
        store.set_quota("a2", ttl_s=0.001)
        for i in range(2):
            store.put(b"x%d" % i, _block(i), namespace="a1")
            store.put(b"y%d" % i, _block(i), namespace="a2")
            store.put(b"z%d" % i, _block(i), namespace="b")
        assert _parts(store)["team-a"]["used_bytes"] == 256 * KIB
        held = store.get(b"x0", namespace="a1")  # a pinned view across the delete
        assert store.delete([b"x0", b"x1"], namespace="a1") == 2
        assert _parts(store)["team-a"]["used_bytes"] == 192 * KIB  # x0 waits for its view
        assert bytes(held) == _block(0)
        held.release()
        del held
        gc.collect()
        import time
        time.sleep(0.01)
        store.maintain()  # TTL sweep of a2
        assert store.get(b"y0", namespace="a2") is None
        assert _parts(store)["team-a"]["used_bytes"] == 0
        store.trim("b")
        assert _parts(store)["default"]["used_bytes"] == 0
        assert store.stats()["tiers"]["dram"]["dirty_bytes"] == 0
        store._dram.check_invariants()


def test_dram_quota_inside_a_partition(tmp_path):
    with _open(tmp_path) as store:
        store.set_quota("a1", tier_bytes={"dram": 128 * KIB})
        for i in range(4):
            assert store.put(b"x%d" % i, _block(i), namespace="a1")
        for i in range(2):
            assert store.put(b"y%d" % i, _block(i), namespace="a2")
        parts = _parts(store)["team-a"]
        assert parts["used_bytes"] == 256 * KIB
        assert store.quota("a1")["tiers"]["dram"]["used"] == 128 * KIB
        # More of a2 evicts within team-a only (by fair shares of it), never past a1's quota
        # and never the default partition.
        store.put(b"d", _block(9), namespace="d")
        for i in range(2, 6):
            assert store.put(b"y%d" % i, _block(i), namespace="a2")
            assert store.quota("a1")["tiers"]["dram"]["used"] <= 128 * KIB
            assert _parts(store)["team-a"]["used_bytes"] <= 256 * KIB
        assert store.get(b"y5", namespace="a2") == _block(5)
        assert store.get(b"d", namespace="d") == _block(9)
        store._dram.check_invariants()


def test_a_namespace_made_at_runtime_lands_in_the_default_partition(tmp_path):
    with _open(tmp_path) as store:
        assert store.put(b"k", _block(1), namespace="fresh")
        assert _parts(store)["default"]["used_bytes"] == BLOCK
        assert _parts(store)["team-a"]["used_bytes"] == 0


def test_write_back_with_a_partition_full_of_dirty_blocks(tmp_path):
    """team-a's whole partition is dirty (pinned until flushed): its further puts still
    succeed (to SSD), other partitions are unaffected, and a flush makes room again."""
    with _open(tmp_path, ssd=64 * MIB, durability="none", write_back=True, background=False) as store:
        for i in range(8):
            assert store.put(b"x%d" % i, _block(i), namespace="a1")
        for i in range(4):
            assert store.put(b"b%d" % i, _block(i), namespace="b")
        for i in range(8):
            assert store.get(b"x%d" % i, namespace="a1") == _block(i)
        assert _parts(store)["team-a"]["used_bytes"] <= 256 * KIB
        store.sync()
        assert store.stats()["tiers"]["dram"]["dirty_bytes"] == 0
        for i in range(8, 12):
            assert store.put(b"x%d" % i, _block(i), namespace="a1")
        assert all(store.tier_of(b"x%d" % i, namespace="a1") == "dram" for i in range(8, 12))
        assert all(store.tier_of(b"b%d" % i, namespace="b") == "dram" for i in range(4))
        store._dram.check_invariants()
    with _open(tmp_path, ssd=64 * MIB) as store:  # everything was written back
        assert all(store.get(b"x%d" % i, namespace="a1") == _block(i) for i in range(12))


def test_promote_on_first_promotes_into_the_namespaces_partition(tmp_path):
    with _open(tmp_path, ssd=64 * MIB, promote_on="first") as store:
        for i in range(4):
            store.put(b"b%d" % i, _block(i), namespace="b")
        for i in range(10):  # more than team-a holds: the first ones are SSD only
            store.put(b"x%d" % i, _block(i), namespace="a1")
        assert store.tier_of(b"x0", namespace="a1") == "ssd"
        assert store.get(b"x0", namespace="a1") == _block(0)
        assert store.tier_of(b"x0", namespace="a1") == "dram"  # promoted ...
        assert _parts(store)["team-a"]["used_bytes"] == 256 * KIB  # ... within team-a
        assert all(store.tier_of(b"b%d" % i, namespace="b") == "dram" for i in range(4))
        store._dram.check_invariants()


def test_reopen_with_other_partitions(tmp_path):
    with _open(tmp_path, ssd=64 * MIB) as store:
        for i in range(4):
            store.put(b"x%d" % i, _block(i), namespace="a1")
            store.put(b"b%d" % i, _block(i), namespace="b")
    other = {"p": {"bytes": 128 * KIB, "namespaces": ["b"]}, "q": {"bytes": 64 * KIB, "namespaces": ["zz"]}}
    with _open(tmp_path, ssd=64 * MIB, parts=other, promote_on="first") as store:
        for i in range(4):
            assert store.get(b"x%d" % i, namespace="a1") == _block(i)
            assert store.get(b"b%d" % i, namespace="b") == _block(i)
        parts = _parts(store)
        assert set(parts) == {"default", "p", "q"}
        assert parts["p"]["used_bytes"] == 128 * KIB and parts["default"]["used_bytes"] == 256 * KIB
    with _open(tmp_path, ssd=64 * MIB, parts={}) as store:  # and with none at all
        assert "partitions" not in store.stats()["tiers"]["dram"]
        assert store.get(b"b3", namespace="b") == _block(3)


def test_prefault_dram_with_partitions(tmp_path):
    with _open(tmp_path, prefault_dram=True) as store:
        assert store.put(b"k", _block(1), namespace="a1")
        assert store.put(b"k", _block(2), namespace="b")
        assert store.get(b"k", namespace="a1") == _block(1)
        assert store.get(b"k", namespace="b") == _block(2)


def test_stats_report_partitions_consistently(tmp_path):
    with _open(tmp_path, dram=1 * MIB + 100, parts={"p": {"bytes": 100_000, "namespaces": ["a"]}}) as store:
        store.put(b"k", b"v", namespace="a")
        dram = store.stats()["tiers"]["dram"]
        parts = dram["partitions"]
        assert parts["p"]["capacity"] == 98304  # rounded down to granules
        assert parts["p"]["capacity"] + parts["default"]["capacity"] == dram["capacity"]
        assert parts["p"]["used_bytes"] == 4096
        assert sum(p["used_bytes"] for p in parts.values()) == store._dram.used_bytes


@pytest.mark.parametrize("dram, parts", [
    (1 * MIB, {"p": {"bytes": 1 * MIB - 4096, "namespaces": ["a"]}}),
    (1 * MIB + 4095, {"p": {"bytes": 1 * MIB, "namespaces": ["a"]}}),
])
def test_partition_bytes_at_the_edge_of_dram_bytes(tmp_path, dram, parts):
    """A partition leaving the default partition exactly one granule opens; one leaving it
    less (after rounding dram_bytes down) is refused with InvalidArgumentError, not worse."""
    try:
        store = _open(tmp_path, dram=dram, parts=parts)
    except InvalidArgumentError:
        assert dram % 4096  # only the rounded case may be refused
        return
    with store:
        assert _parts(store)["default"]["capacity"] == 4096
        assert store.put(b"k", bytes(4096), namespace="x")
        assert store.put(b"k", bytes(1 * MIB - 4096), namespace="a")


def test_huge_partition_bytes_are_refused_cleanly(tmp_path):
    with pytest.raises(InvalidArgumentError):
        _open(tmp_path, parts={"p": {"bytes": 1 << 70, "namespaces": ["a"]}})


# ---------------------------------------------------------------------- shared, embedded
@pytest.mark.skipif(SHM_DIR is None, reason="needs /dev/shm (Linux)")
def test_shared_partitioned_views_outlive_the_store(tmp_path):
    backings = [SharedBacking(str(tmp_path)), SharedBacking(str(tmp_path))]
    try:
        store = _open(tmp_path, dram_backing=backings, prefault_dram=True,
                      parts={"p": {"bytes": 256 * KIB, "namespaces": ["a"]}})
        store.put(b"k", _block(5), namespace="a")
        store.put(b"k", _block(6), namespace="b")
        va = store.get(b"k", namespace="a")
        vb = store.get(b"k", namespace="b")
        # each partition's bytes are in its own file, at the file's offset (offset - base)
        with open(backings[1].path, "rb") as f:
            assert _block(5) in f.read()
        with open(backings[0].path, "rb") as f:
            data = f.read()
            assert _block(6) in data and _block(5) not in data
        store.close()
        del store
        gc.collect()
        arr = np.frombuffer(va, np.uint8)
        del va
        gc.collect()
        assert arr.tobytes() == _block(5) and bytes(vb) == _block(6)
    finally:
        for b in backings:
            b.unlink()


_EXIT_WHILE_READING = """
import sys, tempfile, threading
import numpy as np
from tairstore.tiers.dram import DramArena, SharedBacking
d = sys.argv[1]
bs = [SharedBacking(d), SharedBacking(d)]
arena = DramArena(16 << 20, backing=bs, partitions=[8 << 20])
slot = arena.alloc(4 << 20, 1)
v = np.frombuffer(arena.pinned_view(slot), np.uint8)
for b in bs:
    b.unlink()
started = threading.Event()
def reader():
    started.set()
    while True:
        v.sum()
threading.Thread(target=reader, daemon=True).start()
started.wait()
sys.exit(0)
"""


@pytest.mark.skipif(SHM_DIR is None, reason="needs /dev/shm (Linux)")
def test_exit_while_a_daemon_thread_reads_a_shared_partitioned_view(tmp_path):
    """The reserved range was unmapped by an atexit finalizer while daemon threads still ran:
    the process died of SIGSEGV on a plain exit."""
    import subprocess
    import sys

    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _EXIT_WHILE_READING, str(tmp_path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.skipif(SHM_DIR is None, reason="needs /dev/shm (Linux)")
def test_the_shared_partitioned_mapping_goes_with_its_last_view(tmp_path):
    import weakref

    from tairstore.tiers.dram import _FixedMapping

    backings = [SharedBacking(str(tmp_path)), SharedBacking(str(tmp_path))]
    arena = DramArena(1 * MIB, backing=backings, partitions=[256 * KIB])
    for b in backings:
        b.unlink()
    base = arena._buf
    while not isinstance(base, _FixedMapping):
        base = base.base
    ref = weakref.ref(base)
    del base
    slot = arena.alloc(4096, 1)
    arena.copy_in(slot, b"q" * 4096)
    view = arena.pinned_view(slot)
    del arena
    gc.collect()
    assert ref() is not None and bytes(view) == b"q" * 4096  # the view keeps the mapping
    view.release()
    del view
    gc.collect()
    assert ref() is None


def test_a_partition_cannot_claim_the_namespace_star(tmp_path):
    """``["*"]`` is how stats and SHM_HELLO name the default partition's namespaces; a
    partition listing "*" would be reported exactly like the default one."""
    with pytest.raises(InvalidArgumentError, match="'\\*'"):
        _open(tmp_path, parts={"p": {"bytes": 64 * KIB, "namespaces": ["a", "*"]}})


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_ops_never_cross_partitions(tmp_path, seed):
    """Random puts (mixed sizes), gets holding views, deletes and trims over namespaces of two
    partitions and the default one, with no SSD tier (an eviction loses the block): a block
    only ever disappears through an operation on a namespace of its own partition, and the
    arena's accounting holds throughout."""
    rng = random.Random(seed)
    parts = {"p": {"bytes": 192 * KIB, "namespaces": ["p1", "p2"]},
             "q": {"bytes": 128 * KIB, "namespaces": ["q1"]}}
    part_of = {"p1": "p", "p2": "p", "q1": "q", "d1": "default", "d2": "default"}
    present: dict[tuple[str, bytes], bytes] = {}
    views: list[memoryview] = []
    with _open(tmp_path, parts=parts, background=False) as store:
        for step in range(600):
            ns = rng.choice(list(part_of))
            op = rng.random()
            if op < 0.6:
                key = b"k%d" % rng.randrange(30)
                data = bytes([rng.randrange(256)]) * rng.choice([100, 4096, 10_000, 40_000])
                try:
                    if store.put(key, data, namespace=ns):  # False: the key is there already
                        present[(ns, key)] = data
                except CapacityError:
                    pass  # pinned views fill the partition
            elif op < 0.8:
                key = b"k%d" % rng.randrange(30)
                v = store.get(key, namespace=ns)
                if v is not None:
                    assert bytes(v) == present[(ns, key)]
                    if rng.random() < 0.3 and len(views) < 6:
                        views.append(v)
            elif op < 0.9:
                key = b"k%d" % rng.randrange(30)
                store.delete([key], namespace=ns)
                present.pop((ns, key), None)
            elif op < 0.93:
                store.trim(ns)
                present = {k: v for k, v in present.items() if k[0] != ns}
            elif views:
                views.pop(rng.randrange(len(views))).release()
            # Blocks of the other partitions are all still there.
            for (n, key), data in list(present.items()):
                if part_of[n] == part_of[ns]:
                    if store.tier_of(key, namespace=n) is None:
                        del present[(n, key)]  # evicted within its own partition: allowed
                    continue
                assert store.tier_of(key, namespace=n) == "dram", (step, ns, n, key)
            if step % 50 == 0:
                store._dram.check_invariants()
                stats = _parts(store)
                assert all(s["used_bytes"] <= s["capacity"] for s in stats.values())
        for v in views:
            v.release()
        store._dram.check_invariants()


def test_stats_hand_out_copies_not_the_configs_lists(tmp_path):
    with _open(tmp_path) as store:
        store.stats()["tiers"]["dram"]["partitions"]["team-a"]["namespaces"].append("intruder")
        assert _parts(store)["team-a"]["namespaces"] == ["a1", "a2"]
        assert store.config.dram_partitions["team-a"]["namespaces"] == ["a1", "a2"]


@pytest.mark.skipif(SHM_DIR is None, reason="needs /dev/shm (Linux)")
@pytest.mark.parametrize("granularity", [1024, 4096, 65536])
def test_shared_partitions_with_small_and_large_granules(tmp_path, granularity):
    """Partitions of a shared arena whose sizes are not page multiples (1 KiB granules) or
    whose granules exceed a page: every partition's bytes land in its own file at
    ``offset - base``, and a write to the end of one never reaches the next."""
    sizes = [3 * granularity + (0 if granularity >= 4096 else 1024), 2 * granularity]
    backings = [SharedBacking(str(tmp_path)) for _ in range(3)]
    try:
        arena = DramArena(64 * granularity, granularity=granularity, backing=backings, partitions=sizes)
        for part in range(3):
            n = arena.partition_bytes(part)
            slot = arena.alloc(n, part)  # the whole partition, up to its last byte
            arena.copy_in(slot, bytes([part + 1]) * n)
            b = backings[part]
            assert b.base == arena.partition_offset(part) and b.capacity == n
            with open(b.path, "rb") as f:
                f.seek(b.shift + slot.offset - b.base)
                assert f.read(n) == bytes([part + 1]) * n
        for part in range(3):
            s = arena.partition_offset(part)
            assert bytes(arena.memory[s:s + arena.partition_bytes(part)]) == \
                bytes([part + 1]) * arena.partition_bytes(part)
        arena.check_invariants()
    finally:
        for b in backings:
            b.unlink()


def test_prefault_of_a_large_partitioned_arena_runs_in_the_background_like_an_unpartitioned_one():
    """A partitioned arena was populated whole in the calling thread (the store's open, the
    daemon's start), with no way for close() to stop it. Where populate works, it now goes
    like an unpartitioned arena: the first chunk now, the rest in the background, and the
    bytes of blocks written meanwhile never change."""
    plain = DramArena(80 * MIB)
    expected = plain.prefault()
    plain.stop_prefault()
    arena = DramArena(80 * MIB, partitions=[8 * MIB, 8 * MIB])
    how = arena.prefault()
    assert how == expected
    slots = []
    for i in range(18):  # six 1 MiB blocks in each partition
        part = i % 3
        slot = arena.alloc(1 * MIB, part)
        arena.copy_in(slot, bytes([i]) * MIB)
        slots.append(slot)
    for i, slot in enumerate(slots):
        assert bytes(arena.pinned_view(slot)) == bytes([i]) * MIB
    arena.stop_prefault()
    small = DramArena(8 * MIB, partitions=[1 * MIB])
    assert small.prefault() == "done"  # within the first chunk: all of it now
