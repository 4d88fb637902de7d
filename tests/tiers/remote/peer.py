"""A second process for the sharing tests: opens a remote tier from a JSON config and talks to
the test over stdin/stdout, one line per step.

    python peer.py CONFIG_JSON NAMESPACE OWN_SEED OTHER_SEED COUNT SIZE

1. puts COUNT blocks of its own (keys ``<OWN_SEED>-<i>``) and the COUNT ``shared-<i>`` blocks
   both peers put, then prints ``put <ok count>``;
2. on the line ``check`` reads the other peer's blocks and prints ``ok <byte-exact hits>``;
3. exits on end of input: a Mooncake client's objects live as long as its process.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from tairstore.tiers.remote import make_remote_tier


def block(seed: int, i: int, size: int) -> bytes:
    """The deterministic payload of block ``i`` of ``seed`` (both sides compute it)."""
    return np.random.default_rng([seed, i]).integers(0, 256, size, dtype=np.uint8).tobytes()


def keys_of(seed: int, count: int) -> list[bytes]:
    """The keys of ``seed``'s blocks."""
    return [f"{seed}-{i}".encode() for i in range(count)]


def main() -> None:
    """Run the protocol above."""
    config, ns = json.loads(sys.argv[1]), sys.argv[2]
    own, other, count, size = (int(a) for a in sys.argv[3:7])
    tier = make_remote_tier(config)
    shared = [f"shared-{i}".encode() for i in range(count)]
    ok = tier.put(ns, keys_of(own, count), [block(own, i, size) for i in range(count)])
    ok += tier.put(ns, shared, [block(0, i, size) for i in range(count)])
    print(f"put {sum(ok)}", flush=True)
    for line in sys.stdin:
        if line.strip() == "check":
            outs = [bytearray(size) for _ in range(count)]
            got = tier.get_into(ns, keys_of(other, count), outs)
            exact = sum(1 for i, n in enumerate(got) if n == size and outs[i] == block(other, i, size))
            print(f"ok {exact}", flush=True)
    tier.close()


if __name__ == "__main__":
    main()
