"""The 3FS tier on a local directory standing in for the mount (the POSIX path)."""

from __future__ import annotations

import os

import pytest

from tairstore.errors import InvalidArgumentError
from tairstore.tiers.remote import make_remote_tier
from tairstore.tiers.remote.hf3fs import slot_class

from .contract import NS, check_known_checksums_and_many_blocks, check_roundtrip_sizes_delete
from .peer import block, keys_of



@pytest.fixture
def config(tmp_path):
    return {"kind": "hf3fs", "path": str(tmp_path / "hf3fs"), "file_bytes": 4 << 20}


@pytest.fixture
def tier(config):
    t = make_remote_tier(config)
    yield t
    t.close()


def test_roundtrip_sizes_delete(tier):
    check_roundtrip_sizes_delete(tier)


def test_known_checksums_and_many_blocks(tier):
    check_known_checksums_and_many_blocks(tier)


def test_payload_is_stored_as_is_at_the_indexed_offset(tier):
    data = os.urandom(200_000)
    tier.put(NS, [b"k"], [data])
    path, offset, length = tier.locate(NS, b"k")
    with open(path, "rb") as f:
        f.seek(offset)
        assert f.read(length) == data


def test_slots_are_reused_and_files_grow(tier, config):
    assert slot_class(1) == 64 << 10 and slot_class(256 << 10) == 256 << 10 and slot_class((256 << 10) + 1) == 512 << 10
    # 4 MiB files of 1 MiB slots: 9 blocks need 3 files.
    blocks = [os.urandom(1 << 20) for _ in range(9)]
    keys = [b"%d" % i for i in range(9)]
    assert all(tier.put(NS, keys, blocks))
    assert len(os.listdir(os.path.join(config["path"], "data"))) == 3
    tier.delete(NS, keys[:4])
    assert all(tier.put(NS, [b"new%d" % i for i in range(4)], blocks[:4]))
    assert len(os.listdir(os.path.join(config["path"], "data"))) == 3, "freed slots reused first"
    outs = [bytearray(1 << 20) for _ in range(5)]
    assert tier.get_into(NS, keys[4:], outs) == [1 << 20] * 5
    assert outs == [bytearray(b) for b in blocks[4:]]


def test_capacity_limit_refuses_puts_without_error(tmp_path):
    t = make_remote_tier({"kind": "hf3fs", "path": str(tmp_path / "d"), "file_bytes": 1 << 20,
                          "capacity_bytes": 2 << 20})
    try:
        assert t.put(NS, [b"%d" % i for i in range(3)], [os.urandom(1 << 20)] * 3) == [True, True, False]
        assert t.stats()["put_failures"] == 1
    finally:
        t.close()


def test_too_large_block_is_a_typed_error(tier):
    with pytest.raises(InvalidArgumentError, match="max_block_bytes"):
        tier.put(NS, [b"k"], [bytes((64 << 20) + 1)])


@pytest.mark.parametrize("damage", ["flip", "zero"])
def test_damaged_slot_is_a_counted_miss_and_dropped(tier, damage):
    data = os.urandom(300_000)
    tier.put(NS, [b"k"], [data])
    path, offset, length = tier.locate(NS, b"k")
    with open(path, "r+b") as f:
        f.seek(offset + 1234)
        old = f.read(1)
        f.seek(offset + 1234)
        f.write(bytes([old[0] ^ 0x5A]) if damage == "flip" else bytes(length - 1234))
    out = bytearray(length)
    assert tier.get_into(NS, [b"k"], [out]) == [None]
    assert tier.stats()["corruptions"] == 1
    assert tier.exists(NS, [b"k"]) == [False], "the damaged block is dropped for every reader"
    assert tier.put(NS, [b"k"], [data]) == [True]
    assert tier.get_into(NS, [b"k"], [out]) == [length] and out == data


def test_two_processes_share_blocks(config, peers):
    count, size = 6, 256 << 10
    a = peers(config, NS, 1, 2, count, size)
    b = peers(config, NS, 2, 1, count, size)
    assert a.expect("put") == 2 * count and b.expect("put") == 2 * count
    assert a.check() == count and b.check() == count, "each reads the other's bytes exactly"
    t = make_remote_tier(config)
    try:
        outs = [bytearray(size) for _ in range(count)]
        assert t.get_into(NS, [f"shared-{i}".encode() for i in range(count)], outs) == [size] * count
        assert all(outs[i] == block(0, i, size) for i in range(count))
        assert t.exists(NS, keys_of(1, count) + keys_of(2, count)) == [True] * (2 * count)
        # Both peers raced on the shared keys; exactly one slot each survives in the usage.
        assert t.stats()["used_bytes"] == 3 * count * size
    finally:
        t.close()


def test_probe_puts_a_recovered_directory_back_in_rotation(config):
    import shutil
    import time

    t = make_remote_tier({**config, "retry_s": 0.05})
    try:
        assert t.probe() is True and t.usage_ratio() == 0.0  # no capacity_bytes: no limit
        shutil.rmtree(os.path.join(config["path"], "data"))   # the mount's files vanish
        assert t.put(NS, [b"k"], [b"x" * 1000]) == [False] and not t.healthy
        os.makedirs(os.path.join(config["path"], "data"))     # and come back
        deadline = time.monotonic() + 60
        while not t.probe() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert t.healthy and t.stats()["health_transitions"] == 2
        assert t.put(NS, [b"k"], [b"x" * 1000]) == [True]
    finally:
        t.close()


def test_usage_ratio_against_capacity_bytes(tmp_path):
    t = make_remote_tier({"kind": "hf3fs", "path": str(tmp_path / "h"), "file_bytes": 256 << 10,
                          "capacity_bytes": 256 << 10})
    try:
        assert t.put(NS, [b"a", b"b"], [bytes(64 << 10), bytes(64 << 10)]) == [True, True]
        assert t.usage_ratio() == 0.5
    finally:
        t.close()
