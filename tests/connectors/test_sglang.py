"""HiCacheTairStore against SGLang's real HiCacheStorage base class and StorageBackendFactory,
with real CPU tensors: loaded as SGLang loads a dynamic backend, byte-exact pages through the
zero-copy (v1) and flat-page paths, prefix semantics, isolation, and failure read as a miss."""

from __future__ import annotations

import pytest

from connsupport import HostPool, sglang_modules

storage, factory = sglang_modules()
import torch  # noqa: E402

from tairstore.connectors.common import close_embedded  # noqa: E402
from tairstore import Client  # noqa: E402

PS = 4


def _config(url, *, model="llama", tp_rank=0, tp_size=1, mla=False, page_first=False, v1=True, **extra):
    return storage.HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=False, is_page_first_layout=page_first,
        model_name=model,
        extra_config={"backend_name": "tairstore", "module_path": "tairstore.connectors.sglang",
                      "class_name": "HiCacheTairStore", "tairstore_url": url,
                      "interface_v1": int(v1), **extra})


def _backend(url, pool=None, **kw):
    pool = pool or HostPool(layout="layer_first", pages=8, page_size=PS, layers=3)
    cfg = _config(url, page_first=pool.layout == "page_first", mla=pool.mla, **kw)
    # What SGLang's cache controller does: create through the factory, then register the pool.
    b = factory.StorageBackendFactory.create_backend("dynamic", cfg, pool)
    b.register_mem_pool_host(pool)
    return b


def _keys(n, salt="k"):
    return [f"{salt}{i:03d}".encode().hex() for i in range(n)]


def _idx(*pages):
    return torch.cat([torch.arange(p * PS, (p + 1) * PS) for p in pages]) if pages else torch.empty(0, dtype=torch.long)


def test_factory_loads_a_real_hicache_storage_subclass(store_dir):
    b = _backend(store_dir)
    assert isinstance(b, storage.HiCacheStorage)
    assert type(b).__name__ == "HiCacheTairStore"
    assert b.mem_pool_host is not None and b.namespace.startswith("sglang/llama/bfloat16/p4/layer_first/tp0of1/")


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_v1_round_trip_is_byte_exact(store_dir, layout, mla):
    src = HostPool(layout=layout, pages=8, page_size=PS, layers=3, mla=mla, seed=1)
    keys = _keys(3)
    assert _backend(store_dir, src).batch_set_v1(keys, _idx(2, 5, 7)) == [True] * 3
    dst = HostPool(layout=layout, pages=8, page_size=PS, layers=3, mla=mla, seed=2)
    dst.kv_buffer.zero_()
    b = _backend(store_dir, dst)
    assert b.batch_exists(keys) == 3
    assert b.batch_get_v1(keys, _idx(0, 1, 3)) == [True] * 3
    for s, d in [(2, 0), (5, 1), (7, 3)]:
        assert torch.equal(src.page(s * PS), dst.page(d * PS))
    assert not dst.page(2 * PS).any()


def test_other_host_layouts_move_page_by_page(store_dir):
    src = HostPool(layout="page_first_direct", pages=4, page_size=PS, layers=3, seed=12)
    keys = _keys(2, "direct")
    b = _backend(store_dir, src)
    assert b.paged is None  # not a PagedKV layout: the pool's own flat-page methods are used
    assert b.batch_set_v1(keys, _idx(1, 3)) == [True, True]
    dst = HostPool(layout="page_first_direct", pages=4, page_size=PS, layers=3, seed=13)
    assert _backend(store_dir, dst).batch_get_v1(keys + _keys(1, "none"), _idx(0, 2, 3)) == [True, True, False]
    assert torch.equal(dst.page(0), src.page(PS)) and torch.equal(dst.page(2 * PS), src.page(3 * PS))


def test_prefix_semantics_and_misses(store_dir):
    b = _backend(store_dir)
    keys = _keys(5)
    assert b.batch_set_v1([keys[0], keys[1], keys[3]], _idx(0, 1, 3)) == [True] * 3
    assert b.batch_exists(keys) == 2  # stops at the first missing page
    assert b.exists(keys[3]) and not b.exists(keys[2])
    res = b.batch_get_v1(keys, _idx(0, 1, 2, 3, 4))
    assert res == [True, True, False, True, False]
    assert b.batch_get_v1([], _idx()) == [] and b.batch_set_v1([], _idx()) == []


def test_flat_page_interface(store_dir):
    pool = HostPool(layout="page_first", pages=4, page_size=PS, layers=2)
    b = _backend(store_dir, pool, v1=False)
    keys = _keys(2, "flat")
    pages = [pool.get_data_page(0), pool.get_data_page(PS)]
    assert b.batch_set(keys, pages) is True
    assert b.set(keys[0], pages[0]) is True  # already there
    got = b.batch_get(keys + [_keys(1, "none")[0]], [pool.get_dummy_flat_data_page() for _ in range(3)])
    assert isinstance(got, list) and got[2] is None
    assert torch.equal(got[0], pages[0]) and torch.equal(got[1], pages[1])
    assert torch.equal(b.get(keys[1]), pages[1])  # no target: a new tensor of the pool's dtype
    assert b.batch_get(_keys(2, "gone")) == [None, None]
    assert b.get_stats() is None  # storage metrics off
    stats = b.tairstore_stats()
    assert stats["pages_written"] == 2 and stats["pages_read"] >= 3 and stats["misses"] >= 3
    assert b.clear() is True and b.batch_exists(keys) == 0


def test_deployments_are_isolated_and_replicas_share(store_dir):
    src = HostPool(layout="layer_first", pages=4, page_size=PS, layers=3, seed=3)
    keys = _keys(2, "iso")
    _backend(store_dir, src).batch_set_v1(keys, _idx(0, 1))
    replica = _backend(store_dir, HostPool(layout="layer_first", pages=4, page_size=PS, layers=3))
    assert replica.batch_exists(keys) == 2
    others = [
        _backend(store_dir, model="qwen"),
        _backend(store_dir, tp_rank=1, tp_size=2),
        _backend(store_dir, HostPool(layout="page_first", pages=4, page_size=PS, layers=3)),
        _backend(store_dir, HostPool(layout="layer_first", pages=4, page_size=PS, layers=3, dtype=torch.float16)),
        _backend(store_dir, HostPool(layout="layer_first", pages=4, page_size=PS, layers=3, mla=True)),
    ]
    assert len({o.namespace for o in others} | {replica.namespace}) == 6
    assert [o.batch_exists(keys) for o in others] == [0] * 5


def test_mla_ranks_share_one_copy_written_by_the_first_rank(store_dir):
    mk = lambda rank: _backend(store_dir, HostPool(layout="layer_first", pages=4, page_size=PS, layers=2, mla=True, seed=rank),  # noqa: E731
                               tp_rank=rank, tp_size=2)
    r0, r1 = mk(0), mk(1)
    assert r0.namespace == r1.namespace
    keys = _keys(1, "mla")
    assert r1.batch_set_v1(keys, _idx(0)) == [True]  # a non-writer rank: nothing stored
    assert r0.batch_exists(keys) == 0
    assert r0.batch_set_v1(keys, _idx(0)) == [True]
    assert r1.batch_get_v1(keys, _idx(1)) == [True]
    assert torch.equal(r1.mem_pool_host.page(PS), r0.mem_pool_host.page(0))


def test_through_a_daemon_and_a_stopped_daemon_is_a_miss(own_daemon):
    src = HostPool(layout="page_first", pages=4, page_size=PS, layers=3, seed=5)
    keys = _keys(2, "net")
    b = _backend(own_daemon.url, src)
    assert b.batch_set_v1(keys, _idx(0, 1)) == [True, True]
    dst = HostPool(layout="page_first", pages=4, page_size=PS, layers=3, seed=6)
    reader = _backend(own_daemon.url, dst, timeout_s=5)
    assert reader.batch_exists(keys) == 2
    assert reader.batch_get_v1(keys, _idx(2, 3)) == [True, True]
    assert torch.equal(dst.page(2 * PS), src.page(0)) and torch.equal(dst.page(3 * PS), src.page(PS))
    own_daemon.stop()
    before = dst.kv_buffer.clone()
    assert reader.batch_exists(keys) == 0
    assert reader.batch_get_v1(keys, _idx(0, 1)) == [False, False]
    assert reader.batch_set_v1(_keys(1, "late"), _idx(0)) == [False]
    assert reader.batch_get(keys, [dst.get_dummy_flat_data_page() for _ in keys]) == [None, None]
    assert reader.batch_set(keys, [dst.get_data_page(0)] * 2) is False
    assert torch.equal(dst.kv_buffer, before)  # nothing written into the pool on a failure
    assert reader.tairstore_stats()["failures"] >= 1


def test_a_shared_arena_daemon_is_read_in_place_and_its_leases_come_back(tmp_path):
    from connsupport import Daemon

    d = Daemon(str(tmp_path / "daemon"), extra={"shm": {"enabled": True}})
    try:
        url = d.url.replace("tcp://", "shm+tcp://")
        src = HostPool(layout="page_first", pages=4, page_size=PS, layers=3, seed=7)
        keys = _keys(3, "shm")
        assert _backend(url, src).batch_set_v1(keys, _idx(0, 1, 2)) == [True] * 3
        dst = HostPool(layout="page_first", pages=4, page_size=PS, layers=3, seed=8)
        reader = _backend(url, dst, timeout_s=5)
        assert reader.backend.reads_in_place()
        # The third page's key is unknown: a miss that leaves its page as it was.
        before = dst.page(3 * PS).clone()
        assert reader.batch_get_v1(keys[:2] + _keys(1, "absent"), _idx(1, 2, 3)) == [True, True, False]
        assert torch.equal(dst.page(PS), src.page(0)) and torch.equal(dst.page(2 * PS), src.page(PS))
        assert torch.equal(dst.page(3 * PS), before)
        # Both leased views were dropped once the pages were copied: their returns are queued.
        assert reader.backend.target.release_leases() == 2
        d.stop()
        assert reader.batch_get_v1(keys, _idx(0, 1, 2)) == [False] * 3
        assert reader.tairstore_stats()["failures"] >= 1
    finally:
        d.stop()


def test_pages_are_gathered_into_a_write_back_daemons_staging_file(tmp_path):
    # Layer-first pages are scattered over the pool: the gather writes them straight into the
    # client's staging file; the daemon acknowledges from its arena (write_back) and a second
    # replica reads the same bytes back.
    from connsupport import Daemon

    d = Daemon(str(tmp_path / "daemon"), {"durability": "batch", "write_back": True},
               extra={"shm": {"enabled": True}})
    try:
        url = d.url.replace("tcp://", "shm+tcp://")
        src = HostPool(layout="layer_first", pages=6, page_size=PS, layers=3, seed=11)
        writer = _backend(url, src)
        keys = _keys(5, "wb")
        assert writer.batch_set_v1(keys[:2], _idx(0, 1)) == [True, True]
        assert writer.batch_set_v1(keys, _idx(0, 1, 2, 3, 4)) == [True] * 5
        assert writer.backend.stats.pages_written == 5  # the first two were not sent again
        dst = HostPool(layout="layer_first", pages=6, page_size=PS, layers=3, seed=12)
        reader = _backend(url, dst)
        assert reader.batch_exists(keys) == 5
        assert reader.batch_get_v1(keys, _idx(1, 2, 3, 4, 5)) == [True] * 5
        for i in range(5):
            assert torch.equal(dst.page((i + 1) * PS), src.page(i * PS))
        with Client(d.url) as c:
            assert c.stats()["counters"]["writeback_deferred"] == 5
    finally:
        d.stop()


def test_an_embedded_store_writes_back_unless_it_cannot_or_is_told_not_to(store_dir, tmp_path):
    from tairstore.connectors.common import embedded_options

    pool = HostPool(layout="page_first", pages=4, page_size=PS, layers=3)
    b = _backend(store_dir, pool)
    assert b.batch_set_v1(_keys(2, "wb"), _idx(0, 1)) == [True, True]
    st = b.backend.store_stats()
    assert st["counters"]["writeback_deferred"] == 2 and st["durability"] == "batch"
    assert embedded_options({"durability": "sync"})["write_back"] is False
    assert embedded_options({"ssd_bytes": 0})["write_back"] is False
    assert embedded_options({"write_back": False})["write_back"] is False
    assert embedded_options(None) == {"dram_bytes": 4 << 30, "ssd_bytes": 64 << 30,
                                      "durability": "batch", "write_back": True}


def test_a_full_store_refuses_pages_without_raising(tmp_path):
    d = str(tmp_path / "tiny")
    pool = HostPool(layout="layer_first", pages=8, page_size=PS, layers=8, heads=8, head_dim=128)
    try:
        b = _backend(d, pool, store_options={"dram_bytes": 512 << 10, "ssd_bytes": 0})
        page_bytes = b.paged.block_bytes
        fits = (512 << 10) // page_bytes
        assert 1 <= fits < 8  # 128 KiB pages in a 512 KiB DRAM-only store
        keys = _keys(8, "full")
        res = b.batch_set_v1(keys, _idx(*range(8)))
        assert isinstance(res, list) and len(res) == 8
        stored = b.batch_exists(keys)
        assert stored <= fits and not all(res)  # refused (CapacityError), not raised
        assert b.batch_set_v1(keys[:2], _idx(0, 1)) == [True, True]  # still usable
        dst = HostPool(layout="layer_first", pages=8, page_size=PS, layers=8, heads=8, head_dim=128, seed=9)
        b2 = _backend(d, dst)
        got = b2.batch_get_v1(keys, _idx(*range(8)))
        for i, ok in enumerate(got):
            if ok:  # whatever is read back is exactly what was written
                assert torch.equal(dst.page(i * PS), pool.page(i * PS))
    finally:
        close_embedded(d)


def test_missing_url_is_a_typed_error():
    from tairstore.errors import InvalidArgumentError

    cfg = _config("")
    cfg.extra_config.pop("tairstore_url")
    with pytest.raises(InvalidArgumentError, match="tairstore_url"):
        factory.StorageBackendFactory.create_backend("dynamic", cfg, None)
