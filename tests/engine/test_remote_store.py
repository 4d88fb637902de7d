"""The store with a remote tier: puts straight to it, reads and matches that fall through to it,
demotion of evicted SSD blocks, sharing between store processes, and an unreachable tier.

3FS runs on a local directory standing in for the mount; Mooncake on a real ``mooncake_master``
on 127.0.0.1 (skipped, with the reason, only where its wheel cannot be imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tairstore
from tairstore.errors import InvalidArgumentError
from tairstore.format.checksum import crc32c

KiB, MiB = 1 << 10, 1 << 20
PEER = os.path.join(os.path.dirname(__file__), "remote_peer.py")


def key(i: int) -> bytes:
    return b"rem-" + i.to_bytes(8, "little")


def block(i: int, size: int = 64 * KiB) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)


class Peer:
    """Another store process (remote_peer.py) with the same remote tier."""

    def __init__(self, path, remote: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, PEER, str(path), json.dumps(remote)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.ask(None) == "ready"

    def ask(self, line: str | None) -> str:
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        out = self.proc.stdout.readline().strip()
        assert out, f"peer exited with {self.proc.poll()}"
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ask("quit")
        self.proc.wait(60)


def open_store(path, remote, **kw):
    opts = dict(dram_bytes=4 * MiB, ssd_bytes=16 * MiB, durability="none", background=False)
    opts.update(kw)
    return tairstore.open(path, remote=remote, **opts)


# ------------------------------------------------------------------------------------- 3FS
def test_put_to_remote_keeps_no_local_copy_and_reads_fall_through(tmp_path):
    remote = {"kind": "hf3fs", "path": str(tmp_path / "3fs")}
    with open_store(tmp_path / "a", remote, promote_on="second") as a:
        assert a.put(key(1), block(1), tier="remote") is True
        st = a.stats()
        assert st["blocks"] == 0 and st["tiers"]["remote"]["healthy"] is True
        assert a.exists([key(1), key(2)]) == [True, False]
        assert a.match([key(1), key(2)]).tiers == ["remote", None]
        out = bytearray(64 * KiB)
        assert a.get_into(key(1), out) == 64 * KiB and bytes(out) == block(1).tobytes()
        assert a.stats()["counters"]["hits_remote"] == 1
        # A hit is copied into the local tiers (promote_on is not "never").
        assert a.match([key(1)]).tiers[0] in ("dram", "ssd")
        assert a.delete([key(1)]) == 1
        assert a.exists([key(1)]) == [False]  # gone from the remote tier too
        with pytest.raises(InvalidArgumentError):
            tairstore.open(tmp_path / "x", remote={"kind": "hf3fs"})  # no path


def test_two_store_processes_share_blocks_through_3fs(tmp_path):
    remote = {"kind": "hf3fs", "path": str(tmp_path / "3fs")}
    peer = Peer(tmp_path / "b", remote)
    try:
        with open_store(tmp_path / "a", remote, promote_on="never") as a:
            assert a.put(key(1), block(1), tier="remote")
            assert peer.ask(f"get {key(1).hex()}") == str(crc32c(block(1)))
            assert peer.ask(f"put {key(2).hex()} 2 {64 * KiB}") == "True"
            assert a.match([key(1), key(2), key(3)]).tiers == ["remote", "remote", None]
            assert bytes(a.get(key(2))) == block(2).tobytes()
    finally:
        peer.close()


def test_blocks_evicted_from_a_tiny_store_are_demoted_and_readable_elsewhere(tmp_path):
    remote = {"kind": "hf3fs", "path": str(tmp_path / "3fs")}
    with open_store(tmp_path / "a", remote, dram_bytes=0, ssd_bytes=2 * MiB,
                    segment_bytes=128 * KiB) as a:
        for i in range(64):  # 4 MiB through a 2 MiB tier
            a.put(key(i), block(i))
        evicted = [i for i in range(64) if not a.tier_of(key(i))]
        assert evicted and a.stats()["counters"]["evictions_ssd"] >= len(evicted)
        a.maintain()  # demotes what the SSD tier evicted
        assert a.stats()["counters"]["demotions"] > 0
    peer = Peer(tmp_path / "b", remote)
    try:
        got = [peer.ask(f"get {key(i).hex()}") for i in evicted]
        demoted = [i for i, g in zip(evicted, got) if g != "miss"]
        assert demoted, "nothing evicted reached the remote tier"
        assert all(g == str(crc32c(block(i))) for i, g in zip(evicted, got) if g != "miss")
    finally:
        peer.close()


def test_a_dram_only_store_demotes_what_its_dram_evicts(tmp_path):
    # No SSD tier: an evicted block's only copy is in the arena, whose slot is reused at once;
    # it is copied out under the eviction and put to the remote tier by the maintenance pass.
    remote = {"kind": "hf3fs", "path": str(tmp_path / "3fs")}
    with open_store(tmp_path / "a", remote, dram_bytes=1 * MiB, ssd_bytes=0) as a:
        for i in range(40):  # 2.5 MiB through a 1 MiB tier
            a.put(key(i), block(i))
        assert a.stats()["counters"]["evictions_dram"] > 0
        a.maintain()  # (its watermark pass may evict a few more first)
        evicted = [i for i in range(40) if not a.tier_of(key(i))]
        st = a.stats()["counters"]
        assert st["evictions_dram"] == len(evicted) == st["demotions"]
        assert st["demotions_dropped"] == 0
        # The evicted blocks read back through the remote tier, byte-exact, in this store...
        assert all(np.array_equal(np.frombuffer(a.get(key(i)), np.uint8), block(i)) for i in evicted)
    # ...and in another process sharing the tier.
    peer = Peer(tmp_path / "b", remote)
    try:
        assert [peer.ask(f"get {key(i).hex()}") for i in evicted] == [str(crc32c(block(i))) for i in evicted]
    finally:
        peer.close()


def test_copies_of_evicted_dram_blocks_are_bounded(tmp_path, monkeypatch):
    from tairstore.engine import remote as remote_part

    monkeypatch.setattr(remote_part, "MAX_DEMOTION_COPY_BYTES", 256 * KiB)  # four blocks
    remote = {"kind": "hf3fs", "path": str(tmp_path / "3fs")}
    with open_store(tmp_path / "a", remote, dram_bytes=1 * MiB, ssd_bytes=0) as a:
        for i in range(40):
            a.put(key(i), block(i))
        st = a.stats()["counters"]
        assert st["evictions_dram"] > 4 and a.stats()["tiers"]["remote"]["demotion_queue"] == 4
        assert st["demotions_dropped"] == st["evictions_dram"] - 4
        a.maintain()
        assert a.stats()["counters"]["demotions"] >= 4


def test_a_remote_hit_is_read_straight_into_its_new_dram_copy(tmp_path):
    remote = {"kind": "hf3fs", "path": str(tmp_path / "3fs")}
    with open_store(tmp_path / "w", remote) as w:
        assert w.put_many([key(i) for i in range(4)], [block(i) for i in range(4)], tier="remote") == [True] * 4
        assert w.put(key(9), block(9, 3 * MiB), tier="remote")
    with open_store(tmp_path / "r", remote, dram_bytes=2 * MiB) as r:
        view = r.get(key(0))
        assert np.array_equal(np.frombuffer(view, np.uint8), block(0))
        assert r.tier_of(key(0)) == "dram"  # committed locally, the view is of that copy
        st = r.stats()["counters"]
        assert st["hits_remote"] == 1 and st["puts"] == 1
        view.release()
        # Damaged on the remote tier: a counted miss there, nothing committed here.
        where = r._remote.tier.locate("default", key(1))
        with open(where[0], "r+b") as f:
            f.seek(where[1] + 100)
            f.write(b"\xff\xfe")
        assert r.get(key(1)) is None and r.tier_of(key(1)) is None
        assert r.stats()["tiers"]["remote"]["corruptions"] == 1
        assert r.get(b"absent-key") is None
        # A block larger than the DRAM tier gets no reservation there: read the other way.
        assert np.array_equal(np.frombuffer(r.get(key(9)), np.uint8), block(9, 3 * MiB))
        assert r.tier_of(key(9)) == "ssd"
        assert r.check() == []


# -------------------------------------------------------------------------------- Mooncake
def test_mooncake_shared_between_stores_then_master_killed_and_restarted(tmp_path, master):
    remote = master.config(retry_s=0.5)
    peer = Peer(tmp_path / "b", remote)
    try:
        with open_store(tmp_path / "a", remote, promote_on="never") as a:
            assert peer.ask(f"put {key(1).hex()} 1 {256 * KiB}") == "True"
            assert bytes(a.get(key(1))) == block(1, 256 * KiB).tobytes()
            assert a.match([key(1)]).tiers == ["remote"]
            # The pool's usage, from the master's metrics: the peer's object counts here too.
            assert a.stats()["tiers"]["remote"]["scope"] == "local"  # before a maintenance pass
            a.maintain()
            remote_stats = a.stats()["tiers"]["remote"]
            assert remote_stats["scope"] == "cluster"
            assert remote_stats["used_bytes"] >= 256 * KiB
            from tairstore.tiers.remote.config import validate_remote_config

            lent = validate_remote_config(remote)["segment_bytes"]
            assert remote_stats["capacity_bytes"] >= 2 * lent  # both processes' segments
            a.put(key(2), block(2))  # a local block
            master.kill()
            # Local reads and writes go on; the remote-only block is a miss, never an error.
            for _ in range(3):
                assert a.get(key(1)) is None
            assert bytes(a.get(key(2))) == block(2).tobytes()
            assert a.put(key(3), block(3)) is True
            assert a.stats()["tiers"]["remote"]["healthy"] is False
            assert a.put(key(4), block(4), tier="remote") is False
    finally:
        peer.close()


def test_mooncake_hits_land_in_the_registered_arena(tmp_path, master):
    # The store registers its DRAM arena with Mooncake: a remote hit's payload is read straight
    # into its new DRAM copy (only the 20-byte trailer goes through the staging buffer).
    remote = master.config(segment_bytes=64 * MiB, buffer_bytes=8 * MiB)
    with open_store(tmp_path / "a", remote) as a:
        tier = a._remote.tier
        assert [r[0] for r in tier._regions] == [a._dram.memory.ctypes.data]
        assert a.put_many([key(i) for i in range(3)], [block(i, 256 * KiB) for i in range(3)],
                          tier="remote") == [True] * 3
        for i in range(3):
            view = a.get(key(i))
            assert np.array_equal(np.frombuffer(view, np.uint8), block(i, 256 * KiB))
            start = np.frombuffer(view, np.uint8).ctypes.data
            arena = a._dram.memory.ctypes.data
            assert arena <= start < arena + a._dram.capacity_bytes  # a view of the DRAM copy
            view.release()
        assert [a.tier_of(key(i)) for i in range(3)] == ["dram"] * 3
        assert a.stats()["counters"]["hits_remote"] == 3 and a.check() == []


def test_mooncake_hits_land_in_their_namespaces_dram_partition(tmp_path, master):
    # With DRAM partitions each partition's range is registered (not the gaps between them),
    # and a remote hit is promoted into its own namespace's partition.
    remote = master.config(segment_bytes=64 * MiB, buffer_bytes=8 * MiB)
    parts = {"p": {"bytes": 1 * MiB, "namespaces": ["a"]}}
    with open_store(tmp_path / "a", remote, dram_partitions=parts) as s:
        arena = s._dram
        assert [r[0] for r in s._remote.tier._regions] == [
            arena.memory.ctypes.data + arena.partition_offset(p) for p in range(2)]
        for ns in ("a", "b"):
            assert s.put(key(1), block(1, 256 * KiB), namespace=ns, tier="remote")
        for part, ns in enumerate(("b", "a")):
            view = s.get(key(1), namespace=ns)
            assert np.array_equal(np.frombuffer(view, np.uint8), block(1, 256 * KiB))
            view.release()
            assert s.tier_of(key(1), namespace=ns) == "dram"
            assert arena.partition_used(part) == 256 * KiB
