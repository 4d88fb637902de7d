"""DRAM partitions (``StoreConfig.dram_partitions``): a namespace's DRAM copies live in its own
partition, never take another's memory and are never evicted by another's puts."""

from __future__ import annotations

import numpy as np
import pytest

import tairstore
from tairstore.errors import CapacityError, InvalidArgumentError

KIB = 1024
MIB = 1 << 20
BLOCK = 64 * KIB


def _block(i: int) -> bytes:
    return np.full(BLOCK, i % 251, np.uint8).tobytes()


def _open(tmp_path, **kw):
    # No maintenance thread: these tests fill partitions to the brim, which the watermarks
    # would shed in the background (tests/engine/test_dram_partitions_edges.py covers that).
    return tairstore.open(str(tmp_path / "s"), dram_bytes=1 * MIB, ssd_bytes=0, background=False,
                          dram_partitions={"team-a": {"bytes": 256 * KIB, "namespaces": ["a1", "a2"]}},
                          **kw)


def test_another_partitions_puts_never_evict_a_partitions_blocks(tmp_path):
    with _open(tmp_path) as store:
        for i in range(4):  # fills team-a exactly
            assert store.put(b"a%d" % i, _block(i), namespace="a1")
        for i in range(100):  # many times the default partition (768 KiB): evicts only itself
            assert store.put(b"b%d" % i, _block(i), namespace="b")
        for i in range(4):
            assert store.get(b"a%d" % i, namespace="a1") == _block(i)
        assert store.get(b"b0", namespace="b") is None and store.get(b"b99", namespace="b") == _block(99)
        dram = store.stats()["tiers"]["dram"]
        assert dram["partitions"]["team-a"] == {"capacity": 256 * KIB, "used_bytes": 256 * KIB,
                                                "namespaces": ["a1", "a2"]}
        assert dram["partitions"]["default"]["capacity"] == 768 * KIB
        assert dram["partitions"]["default"]["used_bytes"] == 768 * KIB


def test_a_full_partition_evicts_its_own_namespaces_only(tmp_path):
    with _open(tmp_path) as store:
        for i in range(8):
            assert store.put(b"b%d" % i, _block(i), namespace="b")
        # a1 and a2 share team-a: six blocks through four slots evict the oldest of the two.
        for i in range(3):
            assert store.put(b"x%d" % i, _block(i), namespace="a1")
        for i in range(3):
            assert store.put(b"y%d" % i, _block(i), namespace="a2")
        assert all(store.get(b"b%d" % i, namespace="b") == _block(i) for i in range(8))
        held = [store.get(b"x%d" % i, namespace="a1") is not None for i in range(3)] + \
               [store.get(b"y%d" % i, namespace="a2") is not None for i in range(3)]
        assert sum(held) == 4 and held[-1]
        stats = store.stats()["tiers"]["dram"]["partitions"]
        assert stats["team-a"]["used_bytes"] == 256 * KIB


def test_a_block_larger_than_its_partition_is_refused(tmp_path):
    with _open(tmp_path) as store:
        with pytest.raises(CapacityError):
            store.put(b"big", bytes(512 * KIB), namespace="a1")
        assert store.put(b"big", bytes(512 * KIB), namespace="b")


def test_partitions_with_an_ssd_tier_keep_dram_copies_apart(tmp_path):
    with tairstore.open(str(tmp_path / "s"), dram_bytes=1 * MIB, ssd_bytes=64 * MIB, background=False,
                        dram_partitions={"p": {"bytes": 256 * KIB, "namespaces": ["a"]}}) as store:
        for i in range(4):
            store.put(b"a%d" % i, _block(i), namespace="a")
        for i in range(40):
            store.put(b"b%d" % i, _block(i), namespace="b")
        assert all(store.tier_of(b"a%d" % i, namespace="a") == "dram" for i in range(4))
        assert store.get(b"b0", namespace="b") == _block(0)  # from SSD: nothing was lost


@pytest.mark.parametrize("parts, match", [
    ({"p": {"bytes": 1 * MIB, "namespaces": ["a"]}}, "leaves nothing"),
    ({"p": {"bytes": 64 * KIB, "namespaces": []}}, "non-empty list"),
    ({"p": {"bytes": 64 * KIB, "namespaces": ["a"]}, "q": {"bytes": 64 * KIB, "namespaces": ["a"]}},
     "'a' is in both"),
    ({"default": {"bytes": 64 * KIB, "namespaces": ["a"]}}, "other than 'default'"),
    ({"p": {"bytes": 64 * KIB, "namespaces": ["a"], "colour": 1}}, "must be a dict"),
    ({"p": {"bytes": "64K", "namespaces": ["a"]}}, "must be an int"),
    ({"p": {"bytes": 64 * KIB, "namespaces": ["a"], "group": True}}, "group"),
    ([("p", 1)], "dict of name"),
])
def test_bad_partitions_are_refused_by_name(tmp_path, parts, match):
    with pytest.raises(InvalidArgumentError, match=match):
        tairstore.open(str(tmp_path / "s"), dram_bytes=1 * MIB, ssd_bytes=0, dram_partitions=parts)


def test_partitions_need_a_dram_tier(tmp_path):
    with pytest.raises(InvalidArgumentError, match="dram_bytes"):
        tairstore.open(str(tmp_path / "s"), dram_bytes=0, ssd_bytes=64 * MIB,
                       dram_partitions={"p": {"bytes": 64 * KIB, "namespaces": ["a"]}})
