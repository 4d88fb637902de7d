"""Shared-memory reads: a real ``tairstore serve`` with ``[shm]``, clients in other processes.

What is checked is behaviour: the bytes a view shows never change while it is held (whatever
eviction, deletion and compaction do meanwhile), a dead client's leases are given back, forged
and stale handles are refused, and with auth on a token limited to some namespaces is never
lent a slot of the arena.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import tairstore
from tairstore.daemon.process import DaemonProcess
from tairstore.daemon.shm import LeaseTable
from tairstore.errors import CapacityError, InvalidArgumentError, PermissionDeniedError
from tairstore.net.calls import Call
from tairstore.net.schema import Op
from tairstore.net.shmclient import ShmClient
from tairstore.tiers.dram import DramArena, SharedBacking

KiB, MiB = 1 << 10, 1 << 20
ALL_TOKEN, TEAM_A = "every-namespace-token", "team-a-only-token-1"
from shmsupport import SHM_DIR, block, daemon, is_block  # noqa: E402
pytestmark = pytest.mark.skipif(SHM_DIR is None, reason="needs /dev/shm (Linux)")


# --------------------------------------------------------------------------- in process
def test_shared_backing_file_is_owner_only_and_zeroed(tmp_path):
    backing = SharedBacking(str(tmp_path))
    arena = DramArena(1 * MiB, backing=backing)
    try:
        mode = stat.S_IMODE(os.stat(backing.path).st_mode)
        assert mode == 0o600
        slot = arena.alloc(5000)
        assert bytes(arena.pinned_view(slot)) == bytes(5000)
        arena.copy_in(slot, b"z" * 5000)
        # Another mapping of the same file sees the same bytes at shift + offset.
        with open(backing.path, "rb") as f:
            f.seek(backing.shift + slot.offset)
            assert f.read(5000) == b"z" * 5000
    finally:
        backing.unlink()
    assert not os.path.exists(backing.path)


def test_lease_table_counts_grants_and_refuses_unknown_handles():
    arena = DramArena(1 * MiB)
    slot = arena.alloc(4096)
    table = LeaseTable(lease_s=10.0, max_leases=2)
    table.add(slot, arena.pinned_view(slot), now=0.0)
    table.add(slot, arena.pinned_view(slot), now=0.0)  # a second grant shares the pin
    assert arena.pin_count(slot) == 1
    with pytest.raises(InvalidArgumentError):
        table.release([slot.offset], [slot.generation + 1])  # stale generation
    with pytest.raises(InvalidArgumentError):
        table.release([slot.offset] * 3, [slot.generation] * 3)  # more than granted: nothing goes
    assert table.release([slot.offset], [slot.generation]) == 1
    assert arena.pin_count(slot) == 1
    table.release([slot.offset], [slot.generation])
    assert arena.pin_count(slot) == 0
    with pytest.raises(InvalidArgumentError):
        table.release([slot.offset], [slot.generation])  # already given back


def test_lease_table_expiry_and_limit():
    arena = DramArena(1 * MiB)
    slots = [arena.alloc(4096) for _ in range(3)]
    table = LeaseTable(lease_s=5.0, max_leases=2)
    table.add(slots[0], arena.pinned_view(slots[0]), now=0.0)
    table.add(slots[1], arena.pinned_view(slots[1]), now=3.0)
    with pytest.raises(CapacityError):
        table.add(slots[2], arena.pinned_view(slots[2]), now=3.0)
    assert arena.pin_count(slots[2]) == 0  # the refused grant does not stay pinned
    assert table.expire(now=6.0) == 1
    assert [arena.pin_count(s) for s in slots] == [0, 1, 0]
    assert table.close() == 1
    assert arena.pin_count(slots[1]) == 0


# ------------------------------------------------------------------------ real daemon
def test_views_hold_their_bytes_through_delete_and_eviction(tmp_path):
    with daemon(tmp_path, dram=8 * MiB) as d, tairstore.Client("shm+" + d.data_url) as c:
        assert isinstance(c, ShmClient)
        c.put(b"k0", block(0, 1 * MiB))
        view = c.get(b"k0")
        assert view.readonly and is_block(view, 0)
        arr = np.frombuffer(view, np.uint8)  # derived: keeps the lease on its own
        view.release()
        assert c.delete([b"k0"]) == 1
        for i in range(1, 30):  # many times the arena: every other slot is reused
            c.put(b"k%d" % i, block(i, 1 * MiB))
        assert is_block(arr, 0)
        out = np.zeros(1 * MiB, np.uint8)
        assert c.get_into(b"k29", out) == 1 * MiB and is_block(out, 29)
        assert c.get(b"k0") is None and c.get_into(b"k0", out) == 0
        with pytest.raises(InvalidArgumentError):
            c.get_into(b"k29", bytearray(10))
        del arr
        assert c.release_leases() >= 1


def test_loopback_clients_detect_the_shared_arena(tmp_path):
    with daemon(tmp_path, dram=4 * MiB) as d:
        with tairstore.Client(d.data_url) as auto, tairstore.Client(d.data_url, shm=False) as plain:
            assert isinstance(auto, ShmClient) and not isinstance(plain, ShmClient)
            auto.put(b"a", block(5, 8 * KiB))
            assert is_block(auto.get(b"a"), 5) and is_block(plain.get(b"a"), 5)


def test_arena_file_is_removed_when_the_daemon_stops(tmp_path):
    with daemon(tmp_path, dram=4 * MiB) as d:
        with ShmClient("shm+" + d.data_url) as c:
            path = c._call_shm(Op.SHM_HELLO, {}).fields["path"]
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not os.path.exists(path)


def test_a_daemon_without_shm_is_refused_cleanly(tmp_path):
    with DaemonProcess(tmp_path / "data", store={"dram_bytes": 4 * MiB, "ssd_bytes": 0}) as d:
        with pytest.raises(InvalidArgumentError):
            tairstore.Client("shm+" + d.data_url)
        with tairstore.Client(d.data_url) as c:  # the socket path is unaffected
            assert not isinstance(c, ShmClient)
            c.put(b"a", b"x")
            assert bytes(c.get(b"a")) == b"x"


def test_forged_and_stale_handles_are_refused(tmp_path):
    with daemon(tmp_path, dram=4 * MiB) as d, ShmClient("shm+" + d.data_url) as c, \
            ShmClient("shm+" + d.data_url) as other:
        c.put(b"a", block(1, 64 * KiB))
        resp = c._call_shm(Op.GET_SHM, {"ns": "default", "keys": [b"a"]})
        off, gen = resp.fields["offs"][0], resp.fields["gens"][0]
        release = lambda client, o, g: client._call_shm(Op.RELEASE, {"rel_o": [o], "rel_g": [g]})
        with pytest.raises(InvalidArgumentError):
            release(c, off + 4096, gen)  # forged offset
        with pytest.raises(InvalidArgumentError):
            release(c, off, gen + 1000)  # forged generation
        with pytest.raises(InvalidArgumentError):
            release(other, off, gen)  # another connection's lease
        with pytest.raises(InvalidArgumentError):  # a forged return refuses the whole get
            c._call_shm(Op.GET_SHM, {"ns": "default", "keys": [b"a"], "rel_o": [7], "rel_g": [7]})
        assert release(c, off, gen).fields["count"] == 1
        with pytest.raises(InvalidArgumentError):
            release(c, off, gen)  # stale: already given back
        assert is_block(c.get(b"a"), 1)  # the connection goes on


# A reader process: for a bounded number of rounds, leases random blocks among those written
# so far and checks every byte, twice (the second time after the writer has moved on).
READER = r"""
import random, sys, numpy as np, tairstore
sys.path.insert(0, sys.argv[3])
from test_shm import is_block
c = tairstore.Client("shm+" + sys.argv[1])
n, checked, rng = int(sys.argv[2]), 0, random.Random()
for _ in range(300):
    keys = [rng.randrange(n) for _ in range(4)]
    views = c.get_many([b"k%d" % i for i in keys])
    for i, v in zip(keys, views):
        if v is not None:
            assert is_block(v, i), f"block {i} torn or reused"
            checked += 1
    c.exists([b"k0"])  # a round trip: the writer evicts meanwhile
    for i, v in zip(keys, views):
        if v is not None:
            assert is_block(v, i), f"block {i} changed under its lease"
    del views
c.close()
print("checked", checked)
"""


@pytest.mark.parametrize("ssd", [0, 24 * MiB], ids=["volatile-eviction", "ssd-eviction-compaction"])
def test_concurrent_readers_never_see_torn_or_reused_bytes(tmp_path, ssd):
    n, size = 240, 128 * KiB
    store = {"segment_bytes": 2 * MiB} if ssd else {}
    with daemon(tmp_path, dram=4 * MiB, ssd=ssd, **store) as d, tairstore.Client(d.data_url) as w:
        for i in range(40):
            w.put(b"k%d" % i, block(i, size))
        here = os.path.dirname(os.path.abspath(__file__))
        readers = [subprocess.Popen([sys.executable, "-c", READER, d.data_url, str(n), here],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for _ in range(3)]
        for i in range(40, n):  # 30 MiB through a 4 MiB arena while the readers read
            w.put(b"k%d" % i, block(i, size))
            if i % 3 == 0:
                w.delete([b"k%d" % (i - 20)])  # garbage for the compactor
        outs = [r.communicate(timeout=120)[0] for r in readers]
    assert [r.returncode for r in readers] == [0, 0, 0], outs
    assert all("checked" in o for o in outs)


HOLDER = r"""
import sys, tairstore
c = tairstore.Client("shm+" + sys.argv[1])
views = c.get_many([b"h%d" % i for i in range(6)])
assert all(v is not None for v in views)
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_killed_clients_leases_are_released(tmp_path):
    with daemon(tmp_path, dram=8 * MiB) as d, tairstore.Client(d.data_url) as w:
        for i in range(6):
            w.put(b"h%d" % i, block(i, 1 * MiB))
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, d.data_url], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "holding"
        w.delete([b"h%d" % i for i in range(6)])
        # Six of eight MiB are pinned by the holder's leases: a batch of eight cannot fit.
        batch = [b"n%d" % i for i in range(8)]
        blocks = [block(i, 1 * MiB) for i in range(8)]
        with pytest.raises(CapacityError):
            w.put_many(batch, blocks)
        holder.kill()
        holder.wait()
        # The daemon drops the leases when it sees the socket close; wait for that (bounded).
        for _ in range(400):
            try:
                stored = w.put_many([b"m%d" % i for i in range(8)], blocks)
                break
            except CapacityError:
                time.sleep(0.05)
        else:
            pytest.fail("the killed client's leases were never released")
        assert stored == [True] * 8  # all eight MiB were free at once
        # (Background watermark eviction may drop some of them since: only check what is there.)
        assert all(v is None or is_block(v, i) for i, v in enumerate(w.get_many([b"m%d" % i for i in range(8)])))


def test_isolation_only_tokens_covering_every_namespace_get_shared_memory(tmp_path):
    # One arena file ([shm] partitions = "none"): only tokens covering every namespace map it.
    tokens = {"tokens": [{"token": ALL_TOKEN, "namespaces": "*"},
                         {"token": TEAM_A, "namespaces": ["team-a"]}],
              "shm": {"dir": SHM_DIR, "partitions": "none"}}
    with daemon(tmp_path, dram=4 * MiB, extra=tokens) as d:
        with tairstore.Client(d.data_url, token=ALL_TOKEN) as admin:
            admin.put(b"secret", b"b-data", namespace="team-b")
            admin.put(b"mine", b"a-data", namespace="team-a")
        with pytest.raises(PermissionDeniedError):
            tairstore.Client("shm+" + d.data_url, token=TEAM_A)
        with tairstore.Client(d.data_url, token=TEAM_A) as a:  # the socket path still serves it
            assert bytes(a.get(b"mine", namespace="team-a")) == b"a-data"
            with pytest.raises(PermissionDeniedError):
                a.get(b"secret", namespace="team-b")
            # Even asked directly, the daemon lends a limited token no offset.
            a_conn = a._acquire()
            try:
                with a_conn.lock:
                    resp = a_conn.call(Call(
                        Op.GET_SHM, {"ns": "team-a", "keys": [b"mine"]}, lambda r: r))
            finally:
                a._release(a_conn)
            assert isinstance(resp.error, PermissionDeniedError)
        with tairstore.Client("shm+" + d.data_url, token=ALL_TOKEN) as s:
            assert bytes(s.get(b"secret", namespace="team-b")) == b"b-data"


def test_with_tokens_each_limited_tokens_namespaces_get_a_partition_by_default(tmp_path):
    tokens = {"tokens": [{"token": ALL_TOKEN, "namespaces": "*"},
                         {"token": TEAM_A, "namespaces": ["team-a"]}]}
    with daemon(tmp_path, dram=8 * MiB, extra=tokens) as d:
        with ShmClient("shm+" + d.data_url, token=TEAM_A) as a:
            assert len(a._parts) == 1
            assert a.put(b"mine", block(5, 256 * KiB), namespace="team-a") is True
            assert is_block(a.get(b"mine", namespace="team-a"), 5)
            with pytest.raises(PermissionDeniedError):
                a.get(b"other", namespace="team-b")
        with ShmClient("shm+" + d.data_url, token=ALL_TOKEN) as s:
            assert len(s._parts) == 2
            parts = s.stats()["tiers"]["dram"]["partitions"]
            assert parts["tokens-1"] == {"capacity": 4 * MiB, "used_bytes": 256 * KiB,
                                         "namespaces": ["team-a"]}
            assert parts["default"]["capacity"] == 4 * MiB


def test_partitions_from_tokens_merge_overlaps_and_follow_quotas():
    from tairstore.daemon.auth import TokenSpec
    from tairstore.daemon.config import NamespaceQuota
    from tairstore.daemon.shm import partitions_from_tokens

    t = lambda ns, role="user": TokenSpec("x" * 16 + str(ns), ns, role)  # noqa: E731
    assert partitions_from_tokens([t("*"), t(["a"], "admin")], {}, 64 * MiB) is None
    parts = partitions_from_tokens([t(["b", "c"]), t(["a"]), t(["c", "d"]), t("*")], {}, 64 * MiB)
    # {b, c} and {c, d} overlap: one partition; the default and the two share DRAM equally.
    third = 64 * MiB // 3 // 4096 * 4096
    assert parts == {"tokens-1": {"bytes": third, "namespaces": ["a"]},
                     "tokens-2": {"bytes": third, "namespaces": ["b", "c", "d"]}}
    # DRAM quotas of every namespace of a group size its partition.
    quotas = {"a": NamespaceQuota(tier_bytes={"dram": 8 * MiB})}
    parts = partitions_from_tokens([t(["a"]), t(["b"])], quotas, 64 * MiB)
    assert parts["tokens-1"]["bytes"] == 8 * MiB and parts["tokens-2"]["bytes"] == 28 * MiB
    with pytest.raises(InvalidArgumentError, match="partitions"):
        partitions_from_tokens([t(["a"]), t(["b"])], {"a": NamespaceQuota(tier_bytes={"dram": 64 * MiB})},
                               64 * MiB)


def test_partitions_isolate_shared_memory_per_token(tmp_path):
    """With DRAM partitions and auth, each token maps only the files of the partitions whose
    namespaces it covers, and is never lent an offset of another partition."""
    tokens = {"tokens": [{"token": ALL_TOKEN, "namespaces": "*"},
                         {"token": TEAM_A, "namespaces": ["team-a", "team-a2", "shared"]}]}
    parts = {"a": {"bytes": 2 * MiB, "namespaces": ["team-a", "team-a2"]}}
    before = set(os.listdir(SHM_DIR))
    with daemon(tmp_path, dram=8 * MiB, extra=tokens, dram_partitions=parts) as d:
        files = set(os.listdir(SHM_DIR)) - before
        assert len([f for f in files if f.startswith("tairstore-arena-")]) == 2
        with tairstore.Client(d.data_url, token=ALL_TOKEN) as admin:
            admin.put(b"secret", block(1, 300 * KiB), namespace="team-b")
            admin.put(b"mine", block(2, 300 * KiB), namespace="team-a")
        with ShmClient("shm+" + d.data_url, token=TEAM_A) as a:
            assert len(a._parts) == 1 and a._parts[0][0] > 0  # team-a's file only
            assert a._parts[0][1] == 2 * MiB
            view = a.get(b"mine", namespace="team-a")
            assert is_block(view, 2)
            view.release()
            assert a.get_into(b"mine", np.empty(300 * KiB, np.uint8), namespace="team-a") == 300 * KiB
            # Local puts into its partition work, and read back in place.
            assert a.put(b"a-put", block(3, 200 * KiB), namespace="team-a2") is True
            assert is_block(a.get(b"a-put", namespace="team-a2"), 3)
            # A namespace it may use in another partition ("shared", in the default one) is
            # served over the socket; asked directly, the daemon lends no offset of it.
            assert a.put(b"s", block(4, 100 * KiB), namespace="shared") is True
            assert is_block(a.get(b"s", namespace="shared"), 4)
            out = np.empty(100 * KiB, np.uint8)
            assert a.get_into(b"s", out, namespace="shared") == 100 * KiB and is_block(out, 4)
            with pytest.raises(PermissionDeniedError, match="partition 'default'"):
                a._call_shm(Op.GET_SHM, {"ns": "shared", "keys": [b"s"]})
            # A namespace it may not use at all: refused, as over the socket.
            with pytest.raises(PermissionDeniedError):
                a.get(b"secret", namespace="team-b")
            with pytest.raises(PermissionDeniedError):
                a._call_shm(Op.GET_SHM, {"ns": "team-b", "keys": [b"secret"]})
        with ShmClient("shm+" + d.data_url, token=ALL_TOKEN) as s:
            assert len(s._parts) == 2  # both files, offsets arena-wide
            assert is_block(s.get(b"secret", namespace="team-b"), 1)
            assert is_block(s.get(b"mine", namespace="team-a"), 2)
            out = np.empty(300 * KiB, np.uint8)
            assert s.get_into(b"mine", out, namespace="team-a") == 300 * KiB and is_block(out, 2)
            stats = s.stats()["tiers"]["dram"]["partitions"]
            assert stats["a"]["capacity"] == 2 * MiB and stats["a"]["namespaces"] == ["team-a", "team-a2"]
    assert not (set(os.listdir(SHM_DIR)) - before)  # every partition's file removed at stop


def test_a_token_covering_no_partition_gets_no_shared_memory(tmp_path):
    tokens = {"tokens": [{"token": ALL_TOKEN, "namespaces": "*"},
                         {"token": TEAM_A, "namespaces": ["team-a"]}]}
    parts = {"a": {"bytes": 2 * MiB, "namespaces": ["team-a", "team-a2"]}}
    with daemon(tmp_path, dram=8 * MiB, extra=tokens, dram_partitions=parts) as d:
        # team-a alone does not cover partition a (team-a2 too), nor the default partition.
        with pytest.raises(PermissionDeniedError):
            tairstore.Client("shm+" + d.data_url, token=TEAM_A)
        with tairstore.Client(d.data_url, token=TEAM_A) as c:  # the socket still serves it
            assert not isinstance(c, ShmClient)
            assert c.put(b"k", b"v", namespace="team-a") and bytes(c.get(b"k", namespace="team-a")) == b"v"


def test_partitions_without_auth_map_every_file(tmp_path):
    parts = {"a": {"bytes": 1 * MiB, "namespaces": ["na"]}, "b": {"bytes": 1 * MiB, "namespaces": ["nb"]}}
    with daemon(tmp_path, dram=8 * MiB, dram_partitions=parts) as d, ShmClient("shm+" + d.data_url) as c:
        assert len(c._parts) == 3
        for i, ns in enumerate(("na", "nb", "other")):
            assert c.put(b"k", block(i, 600 * KiB), namespace=ns)
        for i, ns in enumerate(("na", "nb", "other")):
            assert is_block(c.get(b"k", namespace=ns), i)
        # na's partition holds one such block: a second one evicts the first, not nb's.
        assert c.put(b"k2", block(9, 600 * KiB), namespace="na")
        assert c.get(b"k", namespace="na") is None and is_block(c.get(b"k", namespace="nb"), 1)
        import urllib.request

        text = urllib.request.urlopen(d.http_url + "/metrics", timeout=30).read().decode()
        assert 'tairstore_dram_partition_capacity_bytes{partition="a"} 1.048576e+06' in text
        assert 'tairstore_dram_partition_used_bytes{partition="b"} 614400.0' in text
        assert 'tairstore_dram_partition_capacity_bytes{partition="default"} 6.291456e+06' in text


def test_local_puts_go_through_a_private_staging_file(tmp_path):
    before = set(os.listdir(SHM_DIR))
    with daemon(tmp_path, dram=16 * MiB) as d, ShmClient("shm+" + d.data_url) as c:
        assert c.put(b"p0", block(0, 300 * KiB)) is True
        assert c.put(b"p0", block(0, 300 * KiB)) is False  # already stored, as over the socket
        keys = [b"p%d" % i for i in range(1, 9)]
        assert c.put_many(keys, [block(i, 1 * MiB) for i in range(1, 9)]) == [True] * 8
        assert c._stage.nbytes >= 8 * MiB
        # The staging file's name is gone once the client mapped it: no one else can open it.
        assert set(os.listdir(SHM_DIR)) - before == {os.path.basename(c._call_shm(
            Op.SHM_HELLO, {}).fields["path"])}
        with tairstore.Client(d.data_url, shm=False) as plain:  # what the daemon stored
            assert is_block(plain.get(b"p0"), 0)
            assert all(is_block(plain.get(k), i) for i, k in enumerate(keys, 1))
        with pytest.raises(InvalidArgumentError):  # a range outside the staging file
            c._call_shm(Op.PUT_SHM, {"ns": "default", "keys": [b"x"], "sizes": [10],
                                     "offs": [c._stage.nbytes - 5]})
        with pytest.raises(InvalidArgumentError):  # batch checks as over the socket
            c.put_many([b"d", b"d"], [b"1", b"2"])


def test_staged_puts_are_written_in_place_and_a_write_back_daemon_flushes_them(tmp_path):
    # A write-back daemon acknowledges from its arena and writes SSD records in the background;
    # a restart (a clean stop flushes) must find every acknowledged block.
    with daemon(tmp_path, dram=32 * MiB, ssd=256 * MiB, durability="batch", write_back=True) as d:
        with ShmClient("shm+" + d.data_url) as c:
            keys = [b"s%d" % i for i in range(6)]

            def fill(area):
                for i in range(len(area) // MiB):
                    area[i * MiB:(i + 1) * MiB] = block(i, MiB)

            assert c.put_many_staged(keys, MiB, fill) == [True] * 6
            assert c.put_many_staged(keys[:1], MiB, fill) == [False]  # already stored
            assert all(is_block(c.get(k), i) for i, k in enumerate(keys))
            # Too large for the staging file: the caller is told to use put_many.
            assert c.put_many_staged([b"big"], 65 * MiB, fill) is None
            with pytest.raises(InvalidArgumentError):
                c.put_many_staged([b"z"], 0, fill)
            st = c.stats()
            assert st["counters"]["writeback_deferred"] == 6
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(d.http_url + "/metrics", timeout=60) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        assert families["tairstore_writeback_deferred"].samples[0].value == 6
        assert "tairstore_writeback_dirty_bytes" in families
    with daemon(tmp_path, dram=32 * MiB, ssd=256 * MiB, durability="batch", write_back=True) as d:
        with tairstore.Client(d.data_url, shm=False) as plain:
            assert plain.stats()["counters"]["recovered_blocks"] == 6
            assert all(is_block(plain.get(k), i) for i, k in enumerate(keys))


def test_group_backing_is_group_readable(tmp_path):
    backing = SharedBacking(str(tmp_path), group=os.getgid())
    DramArena(64 * KiB, backing=backing)
    st = os.stat(backing.path)
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == os.getgid()
    backing.unlink()
    with pytest.raises(InvalidArgumentError):
        SharedBacking(str(tmp_path), group="no-such-group-tairstore").map(4096)
    with pytest.raises(InvalidArgumentError):
        SharedBacking(str(tmp_path / "missing")).map(4096)


@pytest.mark.parametrize("body, where", [
    ('dir = "/no/such/dir"', "[shm] dir"),
    ("lease_s = 0", "[shm] lease_s"),
    ("group = 5", "[shm] group"),
    ("size = 1", "[shm] size"),
    ('partitions = "per-token"', "[shm] partitions"),
])
def test_shm_config_is_validated(tmp_path, body, where):
    from tairstore.daemon.config import load_config

    path = tmp_path / "c.toml"
    path.write_text(f"[shm]\n{body}\n")
    with pytest.raises(InvalidArgumentError, match=re.escape(where)):
        load_config(path)
    path.write_text("[shm]\nenabled = false\n")
    assert load_config(path).shm is None
