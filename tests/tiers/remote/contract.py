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
