"""A second store process for tests/engine/test_remote_store.py.

``python remote_peer.py DIR REMOTE_JSON`` opens a store in DIR with that remote tier, then
answers lines on stdin: ``put KEYHEX SEED SIZE`` (put(tier="remote")), ``get KEYHEX`` (prints the
crc32c of what get returns, or ``miss``), ``match KEYHEX...`` (prints the tiers), ``quit``.
"""

from __future__ import annotations

import json
import sys

import numpy as np

import tairstore
from tairstore.format.checksum import crc32c


def main() -> None:
    store = tairstore.open(sys.argv[1], dram_bytes=4 << 20, ssd_bytes=16 << 20, durability="none",
                           background=False, remote=json.loads(sys.argv[2]))
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "put":
            data = np.random.default_rng(int(args[1])).integers(0, 256, int(args[2]), dtype=np.uint8)
            print(store.put(bytes.fromhex(args[0]), data, tier="remote"), flush=True)
        elif cmd == "get":
            view = store.get(bytes.fromhex(args[0]))
            print("miss" if view is None else crc32c(view), flush=True)
        elif cmd == "match":
            print(" ".join(map(str, store.match([bytes.fromhex(a) for a in args]).tiers)), flush=True)
        elif cmd == "quit":
            break
    store.close()
    print("bye", flush=True)


if __name__ == "__main__":
    main()
