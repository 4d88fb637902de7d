"""Edge cases of shared memory with DRAM partitions: a real ``tairstore serve`` with ``[shm]``
and ``[store] dram_partitions``, clients with tokens covering some partitions.

Checked: a client of one partition can neither release nor read another partition's leases,
``get_many`` over namespaces of mapped and unmapped partitions picks the right path, views
outlive the daemon, prefault and per-partition groups work, a failed start leaves no files.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

import tairstore
from tairstore.errors import InvalidArgumentError, PermissionDeniedError, StoreError
from tairstore.net.schema import Op
from tairstore.net.shmclient import ShmClient

KiB, MiB = 1 << 10, 1 << 20
ALL_TOKEN, TEAM_A = "every-namespace-token", "team-a-and-shared-token"
from shmsupport import SHM_DIR, block, daemon, is_block  # noqa: E402
pytestmark = pytest.mark.skipif(SHM_DIR is None, reason="needs /dev/shm (Linux)")

TOKENS = {"tokens": [{"token": ALL_TOKEN, "namespaces": "*"},
                     {"token": TEAM_A, "namespaces": ["team-a", "team-a2", "shared"]}]}
PARTS = {"a": {"bytes": 2 * MiB, "namespaces": ["team-a", "team-a2"]}}


def arena_files(before: set) -> set:
    return {f for f in set(os.listdir(SHM_DIR)) - before if f.startswith("tairstore-arena-")}


def test_a_forged_release_of_another_partitions_lease_is_refused(tmp_path):
    """TEAM_A learns (or guesses) the offset and generation of a slot in the default
    partition: RELEASE on its connection refuses it, and the real lease keeps its pin."""
    with daemon(tmp_path, extra=TOKENS, dram_partitions=PARTS) as d, \
            ShmClient("shm+" + d.data_url, token=ALL_TOKEN) as admin, \
            ShmClient("shm+" + d.data_url, token=TEAM_A) as a:
        admin.put(b"secret", block(1, 256 * KiB), namespace="team-b")
        a.put(b"mine", block(2, 256 * KiB), namespace="team-a")
        view = admin.get(b"secret", namespace="team-b")
        r = admin._call_shm(Op.GET_SHM, {"ns": "team-b", "keys": [b"secret"]}).fields
        off, gen = r["offs"][0], r["gens"][0]
        assert off < a._parts[0][0]  # a default-partition offset, outside team-a's file
        for o, g in ((off, gen), (off, gen + 1), (a._parts[0][0] - 4096, 0)):
            with pytest.raises(InvalidArgumentError):
                a._call_shm(Op.RELEASE, {"rel_o": [o], "rel_g": [g]})
            with pytest.raises((InvalidArgumentError, PermissionDeniedError)):
                a._call_shm(Op.GET_SHM, {"ns": "team-a", "keys": [b"mine"], "rel_o": [o], "rel_g": [g]})
        # The lease is intact: deleting and overwriting the block leaves the view's bytes.
        assert admin.delete([b"secret"], namespace="team-b") == 1
        for i in range(40):
            admin.put(b"k%d" % i, block(10 + i, 256 * KiB), namespace="team-b")
        assert is_block(view, 1)
        admin._call_shm(Op.RELEASE, {"rel_o": [off], "rel_g": [gen]})
        # TEAM_A's own lease works as ever.
        v = a.get(b"mine", namespace="team-a")
        assert is_block(v, 2)


def test_get_many_over_mapped_and_unmapped_partitions(tmp_path):
    """A client mapping team-a's file only: team-a keys in DRAM come in place, SSD-only ones
    and misses as usual; the default partition's namespace it may use comes over the socket;
    one it may not use is refused, whatever the path."""
    with daemon(tmp_path, ssd=64 * MiB, extra=TOKENS, dram_partitions=PARTS) as d, \
            tairstore.Client(d.data_url, token=ALL_TOKEN) as admin, \
            ShmClient("shm+" + d.data_url, token=TEAM_A) as a:
        assert [p[0] for p in a._parts] != [0]
        for i in range(12):  # 12 x 256 KiB through the 2 MiB partition: the first are SSD only
            assert a.put(b"a%d" % i, block(i, 256 * KiB), namespace="team-a")
        for i in range(3):
            assert a.put(b"s%d" % i, block(100 + i, 64 * KiB), namespace="shared")
        admin.put(b"b", block(200, 64 * KiB), namespace="team-b")
        keys = [b"a%d" % i for i in range(12)] + [b"nope"]
        got = a.get_many(keys, namespace="team-a")
        assert got[-1] is None
        assert all(is_block(v, i) for i, v in enumerate(got[:-1]))
        got = a.get_many([b"s0", b"s1", b"s2", b"nope"], namespace="shared")
        assert [is_block(v, 100 + i) for i, v in enumerate(got[:3])] == [True] * 3 and got[3] is None
        with pytest.raises(PermissionDeniedError):
            a.get_many([b"b"], namespace="team-b")
        out = np.empty(256 * KiB, np.uint8)
        assert a.get_into(b"a0", out, namespace="team-a") == 256 * KiB and is_block(out, 0)
        assert a.get_into(b"a11", out, namespace="team-a") == 256 * KiB and is_block(out, 11)
        stats = admin.stats()["tiers"]["dram"]["partitions"]
        assert stats["a"]["used_bytes"] <= 2 * MiB
        assert stats["default"]["used_bytes"] == 4 * 64 * KiB


def test_hello_describes_only_the_mappable_file_with_its_base(tmp_path):
    with daemon(tmp_path, extra=TOKENS, dram_partitions=PARTS) as d, \
            ShmClient("shm+" + d.data_url, token=TEAM_A) as a:
        info = a._call_shm(Op.SHM_HELLO, {}).fields
        assert len(info["parts"]) == 1
        part = info["parts"][0]
        assert part["name"] == "a" and part["namespaces"] == ["team-a", "team-a2"]
        assert part["base"] > 0 and info["path"] == "" and info["base"] == 0  # see below
        assert part["cap"] == 2 * MiB and part["shift"] + part["cap"] <= part["size"]


def test_views_outlive_the_daemon(tmp_path):
    d = daemon(tmp_path, dram_partitions=PARTS).start()
    try:
        c = ShmClient("shm+" + d.data_url)
        c.put(b"k", block(7, 128 * KiB), namespace="team-a")
        c.put(b"k", block(8, 128 * KiB), namespace="other")
        va, vo = c.get(b"k", namespace="team-a"), c.get(b"k", namespace="other")
    finally:
        d.stop()
    assert is_block(va, 7) and is_block(vo, 8)  # the client's mappings stay after the unlink
    del va, vo
    try:
        c.close()
    except (StoreError, OSError):
        pass


def test_prefault_with_shared_partitions(tmp_path):
    parts = {"a": {"bytes": 1 * MiB, "namespaces": ["na"]}, "b": {"bytes": 1 * MiB, "namespaces": ["nb"]}}
    with daemon(tmp_path, prefault_dram=True, dram_partitions=parts) as d, \
            ShmClient("shm+" + d.data_url) as c:
        for i, ns in enumerate(("na", "nb", "x")):
            assert c.put(b"k", block(i, 512 * KiB), namespace=ns)
        for i, ns in enumerate(("na", "nb", "x")):
            assert is_block(c.get(b"k", namespace=ns), i)


def test_a_partitions_numeric_group_is_applied_even_when_it_is_0(tmp_path):
    """A partition's ``group`` given as a numeric id (here the daemon's own group, which it
    may always chown to: 0 when run as root) makes that file 0640 with that group; the
    default one stays 0600."""
    gid = os.getgid()
    parts = {"a": {"bytes": 1 * MiB, "namespaces": ["na"], "group": gid}}
    before = set(os.listdir(SHM_DIR))
    with daemon(tmp_path, dram_partitions=parts) as d, ShmClient("shm+" + d.data_url) as c:
        modes = {}
        for p in c._call_shm(Op.SHM_HELLO, {}).fields["parts"]:
            st = os.stat(p["path"])
            modes[p["name"]] = (stat.S_IMODE(st.st_mode), st.st_gid)
        assert modes["default"][0] == 0o600
        assert modes["a"] == (0o640, gid)
        assert len(arena_files(before)) == 2


def test_a_bad_partition_group_fails_the_start_and_leaves_no_file(tmp_path):
    parts = {"a": {"bytes": 1 * MiB, "namespaces": ["na"]},
             "b": {"bytes": 1 * MiB, "namespaces": ["nb"], "group": "no-such-group-tairstore"}}
    before = set(os.listdir(SHM_DIR))
    d = daemon(tmp_path, dram_partitions=parts)
    with pytest.raises(StoreError):
        d.start()
    d.stop()
    assert not arena_files(before)


def test_a_token_of_two_partitions_maps_both_and_not_the_default(tmp_path):
    tokens = {"tokens": [{"token": ALL_TOKEN, "namespaces": "*"},
                         {"token": TEAM_A, "namespaces": ["na", "nb", "shared"]}]}
    parts = {"a": {"bytes": 1 * MiB, "namespaces": ["na"]}, "b": {"bytes": 1 * MiB, "namespaces": ["nb"]}}
    with daemon(tmp_path, extra=tokens, dram_partitions=parts) as d, \
            ShmClient("shm+" + d.data_url, token=TEAM_A) as c:
        assert len(c._parts) == 2 and all(base > 0 for base, _, _ in c._parts)
        for i, ns in enumerate(("na", "nb", "shared")):
            assert c.put(b"k", block(i, 300 * KiB), namespace=ns)
        for i, ns in enumerate(("na", "nb", "shared")):
            assert is_block(c.get(b"k", namespace=ns), i)
        out = np.empty(300 * KiB, np.uint8)
        assert c.get_into(b"k", out, namespace="nb") == 300 * KiB and is_block(out, 1)
        with pytest.raises(PermissionDeniedError, match="partition 'default'"):
            c._call_shm(Op.GET_SHM, {"ns": "shared", "keys": [b"k"]})


@pytest.mark.parametrize("hide", ["a", "default"])
def test_a_client_that_cannot_open_one_partitions_file_uses_the_others(tmp_path, monkeypatch, hide):
    """Without tokens, isolation on the host is each file's group (docs/DAEMON.md): a process
    outside partition a's group cannot open its file. Its client must still work: map the
    files it may open, and read partition a's namespaces over the socket (simulated here by
    refusing to open a's file, since the tests may run as root)."""
    import tairstore.net.shmclient as shmclient

    parts = {"a": {"bytes": 1 * MiB, "namespaces": ["na"]}}
    with daemon(tmp_path, dram_partitions=parts) as d:
        with ShmClient("shm+" + d.data_url) as full:
            hidden = [p["path"] for p in full._call_shm(Op.SHM_HELLO, {}).fields["parts"] if p["name"] == hide]
            assert full.put(b"k", block(1, 200 * KiB), namespace="na")
            assert full.put(b"k", block(2, 200 * KiB), namespace="other")
        real_open, real_access = os.open, os.access

        def deny_open(path, *args, **kw):
            if path in hidden:
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, *args, **kw)

        monkeypatch.setattr(shmclient.os, "open", deny_open)
        monkeypatch.setattr(shmclient.os, "access",
                            lambda path, mode: path not in hidden and real_access(path, mode))
        # auto (the default file readable) or explicit shm+ (it is not: partition a's is)
        url = d.data_url if hide == "a" else "shm+" + d.data_url
        with tairstore.Client(url) as c:
            assert isinstance(c, ShmClient) and len(c._parts) == 1
            assert is_block(c.get(b"k", namespace="other"), 2)
            assert is_block(c.get(b"k", namespace="na"), 1)
            out = np.empty(200 * KiB, np.uint8)
            assert c.get_into(b"k", out, namespace="na") == 200 * KiB and is_block(out, 1)
            assert c.put(b"k2", block(3, 100 * KiB), namespace="na")
            assert is_block(c.get(b"k2", namespace="na"), 3)


def test_a_client_that_predates_parts_never_misreads_a_partition(tmp_path):
    """A ShmClient from before partitions reads only SHM_HELLO's top-level path/shift/cap and
    indexes that file by arena offset (base 0). Offered team-a's file there (base > 0, and
    larger than the default partition, so many of its offsets pass that client's bounds
    check), it would read other bytes than the block's. The top-level fields may name only a
    file whose arena offset is 0."""
    tokens = {"tokens": [{"token": ALL_TOKEN, "namespaces": "*"},
                         {"token": TEAM_A, "namespaces": ["team-a", "team-a2"]}]}
    parts = {"a": {"bytes": 6 * MiB, "namespaces": ["team-a", "team-a2"]}}
    with daemon(tmp_path, extra=tokens, dram_partitions=parts) as d:
        with ShmClient("shm+" + d.data_url, token=TEAM_A) as a:
            info = a._call_shm(Op.SHM_HELLO, {}).fields
            assert info["path"] == "" or info.get("base", 0) == 0
            assert len(info["parts"]) == 1 and info["parts"][0]["base"] > 0
            assert a.put(b"k", block(5, 64 * KiB), namespace="team-a")
            assert is_block(a.get(b"k", namespace="team-a"), 5)
        with tairstore.Client(d.data_url, token=TEAM_A) as auto:  # still detected as local
            assert isinstance(auto, ShmClient)
            assert is_block(auto.get(b"k", namespace="team-a"), 5)
        with ShmClient("shm+" + d.data_url, token=ALL_TOKEN) as s:
            info = s._call_shm(Op.SHM_HELLO, {}).fields
            assert info["path"] and info["base"] == 0 and len(info["parts"]) == 2


def test_restart_with_other_partitions_and_write_back(tmp_path):
    """DRAM is not persistent: a daemon restarted with other partitions (and write-back, so
    the first run's blocks were acknowledged from DRAM) serves every block, in the new
    layout, from both kinds of client."""
    first = {"a": {"bytes": 1 * MiB, "namespaces": ["na"]}}
    with daemon(tmp_path, ssd=64 * MiB, durability="none", write_back=True, dram_partitions=first) as d, \
            ShmClient("shm+" + d.data_url) as c:
        for i, ns in enumerate(("na", "nb", "x")):
            assert c.put(b"k", block(i, 256 * KiB), namespace=ns)
    second = {"b": {"bytes": 2 * MiB, "namespaces": ["nb", "x"]}, "c": {"bytes": 1 * MiB, "namespaces": ["nc"]}}
    with daemon(tmp_path, ssd=64 * MiB, durability="none", write_back=True, promote_on="first",
                dram_partitions=second) as d, ShmClient("shm+" + d.data_url) as c:
        assert sorted(p[0] > 0 for p in c._parts) == [False, True, True]
        for _ in range(2):  # SSD first, then promoted into its partition and read in place
            for i, ns in enumerate(("na", "nb", "x")):
                assert is_block(c.get(b"k", namespace=ns), i)
        parts = c.stats()["tiers"]["dram"]["partitions"]
        assert set(parts) == {"default", "b", "c"}
        assert parts["b"]["used_bytes"] == 512 * KiB and parts["default"]["used_bytes"] == 256 * KiB


def test_toml_partition_tables_with_a_numeric_group(tmp_path):
    from tairstore.daemon.config import load_config

    p = tmp_path / "c.toml"
    p.write_text('[store]\ndram_bytes = "64MiB"\n'
                 '[store.dram_partitions.gpu0]\nbytes = 5000\nnamespaces = ["x"]\ngroup = 0\n'
                 '[store.dram_partitions."team b"]\nbytes = "1MiB"\nnamespaces = ["y", "z"]\n')
    cfg = load_config(str(p))
    assert cfg.store["dram_partitions"] == {
        "gpu0": {"bytes": 5000, "namespaces": ["x"], "group": 0},
        "team b": {"bytes": 1 * MiB, "namespaces": ["y", "z"]}}
