"""The batched engine API: put_many, get_many, get_into_many."""

from __future__ import annotations

import numpy as np
import pytest

import tairstore
from tairstore.errors import CapacityError, InvalidArgumentError
from tairstore.wal import read_log

KiB = 1 << 10
MiB = 1 << 20


def key(i: int) -> bytes:
    return b"batch-" + i.to_bytes(8, "little")


def block(i: int, size: int = 64 * KiB) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_put_many_round_trips_and_survives_reopen(tmp_path, compression):
    keys = [key(i) for i in range(16)]
    blocks = [block(i) if compression is None else np.repeat(block(i, 1024), 64) for i in range(16)]
    with tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=32 * MiB, background=False,
                        compression=compression) as s:
        assert s.put(keys[3], blocks[3])
        assert s.put_many(keys, blocks) == [i != 3 for i in range(16)]
        assert s.put_many(keys[:2], blocks[:2]) == [False, False]
        views = s.get_many(keys + [key(99)])
        assert views[-1] is None
        assert [bytes(v) for v in views[:-1]] == [b.tobytes() for b in blocks]
        assert s.check() == []
    with tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=32 * MiB, background=False,
                        compression=compression) as s:
        outs = [bytearray(64 * KiB) for _ in range(17)]
        assert s.get_into_many(keys + [key(99)], outs) == [64 * KiB] * 16 + [0]
        assert [bytes(o) for o in outs[:16]] == [b.tobytes() for b in blocks]
        assert s.check() == []


def test_a_batch_of_large_blocks_is_copied_and_checksummed_on_two_threads(tmp_path):
    """Blocks of 256 KiB and more are copied into the arena and checksummed in two halves on
    two threads: every block's bytes and checksum are its own (DRAM reads verified here, SSD
    records after a reopen)."""
    sizes = [256 * KiB, 300 * KiB, 512 * KiB, 257 * KiB, 1 * MiB, 256 * KiB]
    keys = [key(200 + i) for i in range(len(sizes))]
    blocks = [block(200 + i, n) for i, n in enumerate(sizes)]
    opts = dict(dram_bytes=8 * MiB, ssd_bytes=32 * MiB, background=False, verify_dram_reads=True)
    with tairstore.open(tmp_path / "s", **opts) as s:
        assert s.put_many(keys, blocks) == [True] * len(keys)
        assert [bytes(v) for v in s.get_many(keys)] == [b.tobytes() for b in blocks]
        assert s.stats()["counters"]["checksum_errors"] == 0 and s.check() == []
    with tairstore.open(tmp_path / "s", **opts) as s:
        outs = [bytearray(n) for n in sizes]
        assert s.get_into_many(keys, outs) == sizes
        assert [bytes(o) for o in outs] == [b.tobytes() for b in blocks]
        assert s.stats()["counters"]["checksum_errors"] == 0


def test_put_many_logs_one_commit_for_the_batch(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=32 * MiB, background=False,
                        durability="sync") as s:
        s.put_many([key(i) for i in range(16)], [block(i) for i in range(16)])
        s._journal.wal.sync(s._journal.wal.last_lsn)
        records = [type(rec).__name__ for _, rec in read_log(s._fs, s._dir.sub("wal"), from_lsn=1)]
    assert records.count("Commit") == 1 and "Prepare" not in records


def test_put_many_in_a_volatile_store_and_with_chains(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=0, background=False,
                        policy={"dram": "leaf_lru", "ssd": "leaf_lru"}) as s:
        keys = [key(i) for i in range(8)]
        assert all(s.put_many(keys, [block(i) for i in range(8)], chain=True))
        # Overfill: leaf_lru evicts chain tails, so what stays is always a prefix.
        for j in range(4):
            s.put_many([key(100 + 8 * j + i) for i in range(8)], [block(i) for i in range(8)], chain=True)
            hits = s.exists(keys)
            assert hits == sorted(hits, reverse=True), hits
        assert s.check() == []


def test_get_many_memory_only_answers_from_dram_or_not_at_all(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=256 * KiB, ssd_bytes=8 * MiB, background=False,
                        promote_on="never") as s:
        s.put_many([key(i) for i in range(8)], [block(i) for i in range(8)])
        in_dram = [i for i in range(8) if s.tier_of(key(i)) == "dram"]
        on_ssd = [i for i in range(8) if s.tier_of(key(i)) == "ssd"]
        assert in_dram and on_ssd
        before = s.stats()["counters"]
        assert s.get_many([key(i) for i in in_dram + on_ssd], memory_only=True) is None
        assert s.stats()["counters"] == before  # nothing touched
        views = s.get_many([key(i) for i in in_dram] + [key(99)], memory_only=True)
        assert [bytes(v) for v in views[:-1]] == [block(i).tobytes() for i in in_dram]
        assert views[-1] is None
        with pytest.raises(InvalidArgumentError):
            s.get_many([key(1)], memory_only="yes")


def test_get_into_many_refuses_a_small_buffer_before_copying_anything(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=8 * MiB, background=False) as s:
        s.put_many([key(1), key(2)], [block(1), block(2)])
        outs = [bytearray(64 * KiB), bytearray(16)]
        with pytest.raises(InvalidArgumentError):
            s.get_into_many([key(1), key(2)], outs)
        assert outs[0] == bytearray(64 * KiB)
        with pytest.raises(InvalidArgumentError):
            s.get_into_many([key(1)], [bytearray(64 * KiB), bytearray(64 * KiB)])
        with pytest.raises(InvalidArgumentError):
            s.get_into_many([key(1)], [bytes(64 * KiB)])  # not writable


def test_put_many_that_cannot_fit_stores_nothing(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=2 * MiB, background=False) as s:
        with pytest.raises(CapacityError):
            s.put_many([key(i) for i in range(64)], [block(i) for i in range(64)])
        assert s.exists([key(i) for i in range(64)]) == [False] * 64
        assert s.stats()["sessions_open"] == 0
        assert s.check() == []
        assert s.put_many([key(1)], [block(1)]) == [True]
        with pytest.raises(InvalidArgumentError):
            s.put_many([key(1), key(1)], [block(1), block(1)])
        with pytest.raises(InvalidArgumentError):
            s.put_many([key(5)], [block(5), block(6)])
        assert s.put_many([], []) == []
