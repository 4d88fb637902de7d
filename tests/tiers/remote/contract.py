"""What every remote tier must do, checked the same way for each kind."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tairstore.errors import InvalidArgumentError

NS = "models/llama"


def check_roundtrip_sizes_delete(tier) -> None:
    """Put, existing put, sizes, namespaces, byte-exact reads, misses, small buffer, delete."""
    a, b = os.urandom(1 << 20), os.urandom(300_000)
    assert tier.put(NS, [b"a", b"b"], [a, np.frombuffer(b, dtype=np.uint8)]) == [True, True]
    assert tier.put(NS, [b"a"], [a]) == [True], "an existing block counts as stored"
    assert tier.sizes(NS, [b"a", b"b", b"c"]) == [1 << 20, 300_000, None]
    assert tier.exists("other-ns", [b"a"]) == [False], "namespaces are separate"
    outs = [bytearray(1 << 20), bytearray(400_000), bytearray(10)]
    assert tier.get_into(NS, [b"a", b"b", b"c"], outs) == [1 << 20, 300_000, None]
    assert outs[0] == a and outs[1][:300_000] == b
    with pytest.raises(InvalidArgumentError, match="too small"):
        tier.get_into(NS, [b"a"], [bytearray(100)])
    with pytest.raises(InvalidArgumentError, match="keys but"):
        tier.put(NS, [b"a", b"b"], [a])
    with pytest.raises(InvalidArgumentError):
        tier.put(NS, "a", [a])
    # Mooncake: within the fresh object's lease, so the tier removes with force.
    assert tier.delete(NS, [b"a", b"zz"]) == 1
    assert tier.exists(NS, [b"a", b"b"]) == [False, True]
    stats = tier.stats()
    # The too-small read may count as a miss too (Mooncake learns the size only by reading).
    assert (stats["hits"], stats["deletes"], stats["healthy"]) == (2, 1, True) and stats["misses"] >= 1, stats


def check_known_checksums_and_many_blocks(tier) -> None:
    """A put given the checksums (a demotion's) stores the same object as one that computes
    them; a wrong one makes the block a counted corruption on read, never wrong bytes; a batch
    large enough to be checksummed on the helper thread in several groups reads back exact."""
    from tairstore.format.checksum import crc32c

    blocks = [os.urandom(300_000 + i) for i in range(12)]  # 3.6 MB: several crc groups
    keys = [b"many-%d" % i for i in range(12)]
    assert tier.put(NS, keys[:6], blocks[:6], [crc32c(b) for b in blocks[:6]]) == [True] * 6
    assert tier.put(NS, keys[6:], blocks[6:]) == [True] * 6
    outs = [bytearray(len(b)) for b in blocks]
    assert tier.get_into(NS, keys, outs) == [len(b) for b in blocks]
    assert all(bytes(o) == b for o, b in zip(outs, blocks))
    before = tier.stats()["corruptions"]
    bad = os.urandom(200_000)
    assert tier.put(NS, [b"lied"], [bad], [crc32c(bad) ^ 1]) == [True]
    assert tier.get_into(NS, [b"lied"], [bytearray(200_000)]) == [None]
    assert tier.stats()["corruptions"] == before + 1
    assert tier.exists(NS, [b"lied"]) == [False], "a damaged block is removed"
    # A batch large enough to be read and checked on two threads: a damaged block at each end
    # (one in each thread's half) is a counted miss; the others read back exact.
    lied = [b"lied-first", b"lied-last"]
    assert tier.put(NS, lied, [bad, bad], [crc32c(bad) ^ 1, crc32c(bad) ^ 2]) == [True, True]
    batch = [lied[0], *keys, lied[1]]
    outs = [bytearray(300_100) for _ in batch]
    assert tier.get_into(NS, batch, outs) == [None, *[len(b) for b in blocks], None]
    assert all(bytes(o[:len(b)]) == b for o, b in zip(outs[1:-1], blocks))
    assert tier.stats()["corruptions"] == before + 3
    assert tier.exists(NS, lied) == [False, False]
    for wrong in ([1, 2], [-1], [1 << 32], ["x"], [True]):  # not one per block, not a crc32c
        with pytest.raises(InvalidArgumentError):
            tier.put(NS, [b"k"], [bad], wrong)
