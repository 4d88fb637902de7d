"""tairstore.tiers.gpu on the CPU build of torch: pages copied between paged KV tensors and
blocks byte-exactly, in both layouts, any dtype, MHA and MLA, with per-layer ordered loads."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from connsupport import need

torch = need("torch", "pip install torch==2.13.0")
from tairstore.errors import InvalidArgumentError  # noqa: E402
from tairstore.tiers import gpu  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.float8_e4m3fn]
#: The same checks run on CUDA where there is a device (side stream, pinned staging, events).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * torch.empty(0, dtype=dtype).element_size()),
                        dtype=torch.uint8, generator=g)
    return raw.view(dtype)


def _kv(layout, mla, dtype, seed, *, layers=3, pages=6, ps=4, heads=2, dim=8, device="cpu"):
    body = (layers, pages * ps) if layout == "layer_first" else (pages * ps, layers)
    comps = 1 if mla else 2
    return [_random((*body, 1 if mla else heads, dim), dtype, seed + c).to(device) for c in range(comps)]


def _same(a, b):
    """Byte equality (random bytes viewed as floats hold NaNs, which never compare equal)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _page(t, layout, page, ps):
    return t[:, page * ps:(page + 1) * ps] if layout == "layer_first" else t[page * ps:(page + 1) * ps]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", gpu.LAYOUTS)
@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_scatter_round_trip_is_byte_exact(layout, mla, dtype, device):
    src = _kv(layout, mla, dtype, 1, device=device)
    dst = [torch.zeros_like(t) for t in src]
    a, b = gpu.PagedKV(src, layout, 4), gpu.PagedKV(dst, layout, 4)
    assert a.block_bytes == b.block_bytes == sum(t.numel() * t.element_size() for t in src) // 6
    blocks = torch.empty(3 * a.block_bytes, dtype=torch.uint8, device=device)
    a.gather([5, 0, 2], blocks)
    b.scatter([1, 3, 4], blocks)
    for s, d in zip(src, dst):
        for sp, dp in [(5, 1), (0, 3), (2, 4)]:
            assert _same(_page(s, layout, sp, 4), _page(d, layout, dp, 4))
        for untouched in (0, 2, 5):
            assert not _page(d, layout, untouched, 4).view(torch.uint8).any()


def test_a_block_is_each_component_page_in_the_engines_own_order():
    # K then V, each as the engine lays out a page: [layer][token][...] or [token][layer][...].
    lf = _kv("layer_first", False, torch.float16, 7)
    pf = [t.transpose(0, 1).contiguous() for t in lf]
    out_lf = torch.empty(gpu.PagedKV(lf, "layer_first", 4).block_bytes, dtype=torch.uint8)
    out_pf = torch.empty_like(out_lf)
    gpu.PagedKV(lf, "layer_first", 4).gather([2], out_lf)
    gpu.PagedKV(pf, "page_first", 4).gather([2], out_pf)
    as_bytes = lambda t: t.contiguous().view(torch.uint8).reshape(-1)  # noqa: E731
    assert torch.equal(out_lf, torch.cat([as_bytes(t[:, 8:12]) for t in lf]))
    assert torch.equal(out_pf, torch.cat([as_bytes(t[8:12]) for t in pf]))


def test_from_blocks_takes_vllm_per_layer_tensors():
    layers = [_random((5, 4, 2, 8), torch.bfloat16, s) for s in range(3)]
    comps = [[t[:, :, :1] .contiguous() for t in layers], [t[:, :, 1:].contiguous() for t in layers]]
    kv = gpu.PagedKV.from_blocks(comps)
    assert (kv.num_layers, kv.num_pages, kv.page_size) == (3, 5, 4)
    out = torch.empty(kv.block_bytes, dtype=torch.uint8)
    kv.gather([3], out)
    dst = [[torch.zeros_like(t) for t in c] for c in comps]
    gpu.PagedKV.from_blocks(dst).scatter([0], out)
    assert all(_same(d[0], s[3]) for dc, sc in zip(dst, comps) for d, s in zip(dc, sc))


class _Blocks:
    """A dict of blocks standing in for a store in KVTransfer's read/write callbacks."""

    def __init__(self):
        self.blocks: dict[int, bytes] = {}

    def write(self, idx, fill):
        for i in idx:
            self.blocks[i] = bytes(fill(i))
        return [True] * len(idx)

    def read(self, i, buf):
        if i not in self.blocks:
            return False
        buf[:] = self.blocks[i]
        return True


@pytest.mark.parametrize("device", DEVICES)
def test_transfer_chunks_through_small_staging_and_loads_layer_by_layer(device):
    src = _kv("page_first", False, torch.bfloat16, 3, pages=8, device=device)
    kv = gpu.PagedKV(src, "page_first", 4)
    pool = gpu.StagingPool(slab_bytes=2 * kv.block_bytes, slabs=1)  # 3 chunks for 6 pages
    store = _Blocks()
    assert gpu.KVTransfer(kv, pool).save([0, 1, 2, 3, 4, 5], store.write) == [True] * 6
    assert sorted(store.blocks) == list(range(6))
    del store.blocks[4]  # one block lost: that page must stay untouched
    dst = [torch.zeros_like(t) for t in src]
    big = gpu.StagingPool(slab_bytes=6 * kv.block_bytes, slabs=1)  # the whole load in one slab
    load = gpu.KVTransfer(gpu.PagedKV(dst, "page_first", 4), big).load([7, 6, 5, 4, 3, 2], read=store.read)
    assert load.ok == [True, True, True, True, False, True]
    if device == "cpu":  # on CUDA the copies are queued on the side stream already
        assert not any(t.view(torch.uint8).any() for t in dst)  # nothing applied before wait_layer
        load.wait_layer(0)
        assert _same(dst[0][28:32, 0], src[0][0:4, 0]) and not dst[0][:, 1:].view(torch.uint8).any()
    assert load.wait() == load.ok
    for s_page, d_page in [(0, 7), (1, 6), (2, 5), (3, 4), (5, 2)]:
        for s, d in zip(src, dst):
            assert _same(_page(s, "page_first", s_page, 4), _page(d, "page_first", d_page, 4))
    assert not _page(dst[0], "page_first", 3, 4).view(torch.uint8).any()


def test_save_skips_the_gather_when_every_page_is_already_stored():
    kv = gpu.PagedKV(_kv("layer_first", True, torch.float16, 4), "layer_first", 4)
    calls = []
    res = gpu.KVTransfer(kv).save([1, 2], lambda idx, fill: calls.append(idx) or [True] * len(idx))
    assert res == [True, True] and calls == [[0, 1]]


@pytest.mark.parametrize("bad", [
    lambda: gpu.PagedKV([torch.zeros(2, 10, 4)], "layer_first", 4),          # 10 slots, pages of 4
    lambda: gpu.PagedKV([torch.zeros(2, 8, 4)], "diagonal", 4),
    lambda: gpu.PagedKV([], "layer_first", 4),
    lambda: gpu.PagedKV([torch.zeros(2, 8, 4), torch.zeros(3, 8, 4)], "layer_first", 4),
    lambda: gpu.PagedKV([torch.zeros(8, 2, 4)[:, :, ::2]], "page_first", 4),  # last dim strided
])
def test_bad_geometry_is_a_typed_error(bad):
    with pytest.raises(InvalidArgumentError):
        bad()


def test_page_index_out_of_range_is_a_typed_error():
    kv = gpu.PagedKV([torch.zeros(2, 8, 4)], "layer_first", 4)
    with pytest.raises(InvalidArgumentError):
        kv.gather([2], torch.empty(kv.block_bytes, dtype=torch.uint8))


def test_without_torch_everything_imports_and_the_gpu_path_says_why():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import tairstore, tairstore.connectors.sglang, tairstore.connectors.vllm, tairstore.connectors.lmcache\n"
        "from tairstore.tiers import gpu\n"
        "assert not gpu.available() and not gpu.cuda_available()\n"
        "assert 'torch' in gpu.unavailable_reason()\n"
        "try:\n    gpu.PagedKV([], 'layer_first', 4)\nexcept tairstore.InvalidArgumentError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: the GPU hooks need torch" in out.stdout


def test_load_applies_pages_straight_from_store_buffers():
    src = _kv("layer_first", True, torch.bfloat16, 8, pages=4)
    kv = gpu.PagedKV(src, "layer_first", 4)
    blocks = _Blocks()
    gpu.KVTransfer(kv).save([0, 1, 2], blocks.write)
    dst = [torch.zeros_like(t) for t in src]
    fetched = {0: memoryview(blocks.blocks[0]), 1: b"short", 2: memoryview(blocks.blocks[2])}
    load = gpu.KVTransfer(gpu.PagedKV(dst, "layer_first", 4)).load([3, 2, 1], fetch=fetched.get)
    assert load.wait() == [True, False, True]  # a block of the wrong size is a miss
    assert _same(_page(dst[0], "layer_first", 3, 4), _page(src[0], "layer_first", 0, 4))
    assert _same(_page(dst[0], "layer_first", 1, 4), _page(src[0], "layer_first", 2, 4))
    assert not _page(dst[0], "layer_first", 2, 4).view(torch.uint8).any()


def test_a_load_larger_than_the_staging_slab_goes_in_chunks():
    src = _kv("layer_first", False, torch.float16, 11, pages=8)
    kv = gpu.PagedKV(src, "layer_first", 4)
    store = _Blocks()
    gpu.KVTransfer(kv).save(list(range(7)), store.write)
    del store.blocks[5]
    dst = [torch.zeros_like(t) for t in src]
    pool = gpu.StagingPool(slab_bytes=2 * kv.block_bytes, slabs=1)
    load = gpu.KVTransfer(gpu.PagedKV(dst, "layer_first", 4), pool).load(list(range(7)), read=store.read)
    assert load.wait() == [True] * 5 + [False, True]
    for p in (0, 4, 6):
        assert _same(_page(dst[1], "layer_first", p, 4), _page(src[1], "layer_first", p, 4))
    assert not _page(dst[0], "layer_first", 5, 4).view(torch.uint8).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["embedded", "daemon"])
@pytest.mark.parametrize("geometry", [dict(heads=2, dim=8, ps=4), dict(heads=8, dim=128, ps=16)],
                         ids=["1KiB-pages", "256KiB-pages"])
def test_pages_round_trip_through_a_real_store_layer_by_layer(device, where, geometry, store_dir, request):
    """Pages of a paged KV cache (on the device where there is one) saved into a real store,
    embedded or a daemon over its socket, and loaded into other pages: each layer is in place,
    byte for byte, once ``wait_layer`` has returned for it (on CUDA: for work queued after it on
    the engine's stream), and a page whose block the store lacks stays untouched. On CUDA, pages
    of 256 KiB and more from an embedded store go to the device straight from its DRAM, which
    the backend registers with CUDA until the store closes."""
    from tairstore.connectors.common import close_embedded, open_backend

    url = store_dir if where == "embedded" else request.getfixturevalue("daemon").url
    backend = open_backend(url, f"gpu-{device}-{geometry['ps']}")
    ps = geometry["ps"]
    src = _kv("layer_first", False, torch.bfloat16, 21, layers=4, pages=6, ps=ps,
              heads=geometry["heads"], dim=geometry["dim"], device=device)
    kv = gpu.PagedKV(src, "layer_first", ps)
    keys = [f"{where}-{device}-{ps}-page-{i}".encode() for i in range(6)]
    assert backend.save_pages(gpu.KVTransfer(kv), keys[:5], [0, 1, 2, 3, 4]) == [True] * 5
    dst = [torch.zeros_like(t) for t in src]
    load = backend.load_pages(gpu.KVTransfer(gpu.PagedKV(dst, "layer_first", ps)), keys, [5, 4, 3, 2, 1, 0])
    moved = [(0, 5), (1, 4), (2, 3), (3, 2), (4, 1)]
    for layer in range(4):
        load.wait_layer(layer)
        for s, d in zip(src, dst):  # compared on the engine's (current) stream
            for s_page, d_page in moved:
                assert _same(_page(s, "layer_first", s_page, ps)[layer], _page(d, "layer_first", d_page, ps)[layer])
    assert load.wait() == [True] * 5 + [False]
    assert not any(_page(d, "layer_first", 0, ps).view(torch.uint8).any() for d in dst)
    if where == "embedded":
        memory = backend.target.host_memory()
        assert gpu.host_registered(memory) == (device == "cuda" and kv.block_bytes >= gpu.DIRECT_MIN_BYTES)
        close_embedded(url)
        assert not gpu.host_registered(memory)  # unregistered as the store closed


@pytest.mark.parametrize("device", DEVICES)
def test_save_into_fills_writable_buffers_and_refuses_bad_ones(device):
    src = _kv("page_first", False, torch.float16, 41, pages=5, device=device)
    kv = gpu.PagedKV(src, "page_first", 4)
    transfer = gpu.KVTransfer(kv)
    bufs = [bytearray(kv.block_bytes) for _ in range(3)]
    transfer.save_into([4, 0, 2], bufs)
    expected = torch.empty(3 * kv.block_bytes, dtype=torch.uint8, device=device)
    kv.gather([4, 0, 2], expected)
    assert b"".join(bufs) == bytes(expected.cpu().numpy())
    for pages, bad in [([0], [bytes(kv.block_bytes)]),            # read-only
                       ([0], [bytearray(kv.block_bytes - 1)]),     # short
                       ([0, 1], [bytearray(kv.block_bytes)]),      # one buffer for two pages
                       ([5], [bytearray(kv.block_bytes)])]:        # no such page
        with pytest.raises(InvalidArgumentError):
            transfer.save_into(pages, bad)
    transfer.save_into([], [])


@pytest.mark.parametrize("dram", [True, False], ids=["dram", "ssd-only"])
def test_embedded_save_goes_straight_into_the_reservations(dram, store_dir):
    """An embedded store receives saved pages in its DRAM reservations (write_view, then
    write_done: the copying write() is never called); a store placing blocks on SSD only gets
    them through write(). Either way every byte comes back, pages already stored are skipped,
    and a bad page index is a miss that leaves nothing behind."""
    from tairstore.connectors.common import close_embedded, open_backend

    options = dict(dram_bytes=(64 << 20) if dram else 0, ssd_bytes=64 << 20)
    backend = open_backend(store_dir, "in-place", store_options=options)
    store = backend.target
    calls = {"write": 0, "write_done": 0}
    for name in calls:
        real = getattr(store, name)

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        setattr(store, name, spy)
    src = _kv("layer_first", False, torch.bfloat16, 51, layers=4, pages=6, ps=4)
    kv = gpu.PagedKV(src, "layer_first", 4)
    transfer = gpu.KVTransfer(kv)
    keys = [f"in-place-{i}".encode() for i in range(6)]
    assert backend.save_pages(transfer, keys[:2], [0, 1]) == [True, True]
    assert backend.save_pages(transfer, keys, list(range(6))) == [True] * 6
    assert calls == ({"write": 0, "write_done": 6} if dram else {"write": 6, "write_done": 0})
    assert backend.stats.pages_written == 6
    dst = [torch.zeros_like(t) for t in src]
    assert backend.load_pages(gpu.KVTransfer(gpu.PagedKV(dst, "layer_first", 4)), keys,
                              list(range(6))).wait() == [True] * 6
    assert all(_same(s, d) for s, d in zip(src, dst))
    bad = [b"never-1", b"never-2"]
    assert backend.save_pages(transfer, bad, [0, 99]) == [False, False]
    assert backend.stats.failures == 1 and backend.exists(bad) == [False, False]
    assert backend.save_pages(transfer, bad, [0, 1]) == [True, True]  # nothing left reserved
    close_embedded(store_dir)


def test_register_host_refusals_and_overlaps():
    assert gpu.register_host(None) is False
    gpu.unregister_host(bytearray(16))  # never registered: nothing to undo
    memory = np.zeros(4 << 20, dtype=np.uint8)
    if not gpu.cuda_available():
        assert gpu.register_host(memory) is False and not gpu.host_registered(memory[:16])
        return
    assert gpu.register_host(memory) and gpu.register_host(memory)  # once, then known
    assert gpu.host_registered(memory[4096:8192]) and not gpu.host_registered(np.zeros(16, np.uint8))
    # CUDA refuses a range overlapping a registered one; the refusal must not surface as an
    # error at torch's next kernel launch.
    assert gpu.register_host(memory[1 << 20:]) is False
    assert torch.ones(4, device="cuda").sum().item() == 4
    gpu.unregister_host(memory)
    assert not gpu.host_registered(memory)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", gpu.LAYOUTS)
@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_indexed_layer_scatter_matches_the_per_page_copies(layout, mla, device):
    src = _kv(layout, mla, torch.float16, 31, layers=3, pages=6, device=device)
    kv = gpu.PagedKV(src, layout, 4)
    blocks = torch.empty(4 * kv.block_bytes, dtype=torch.uint8, device=device)
    kv.gather([2, 5, 0, 3], blocks)
    per_page = [torch.zeros_like(t) for t in src]
    indexed = [torch.zeros_like(t) for t in src]
    a, b = gpu.PagedKV(per_page, layout, 4), gpu.PagedKV(indexed, layout, 4)
    where = b.page_index([1, 4, 3, 0])
    assert where is not None and b.page_index([1, 1]) is None  # a repeated page: per page
    for layer in range(3):
        a.scatter_layer(layer, [1, 4, 3, 0], blocks)
        b.scatter_layer(layer, [1, 4, 3, 0], blocks, where)
    assert all(_same(x, y) for x, y in zip(per_page, indexed))
    for s_page, d_page in [(2, 1), (5, 4), (0, 3), (3, 0)]:
        assert all(_same(_page(s, layout, s_page, 4), _page(d, layout, d_page, 4)) for s, d in zip(src, indexed))
    assert not any(_page(d, layout, p, 4).view(torch.uint8).any() for d in indexed for p in (2, 5))


def test_a_load_dropped_unfinished_gives_its_staging_back():
    src = _kv("layer_first", False, torch.float16, 41, pages=4)
    kv = gpu.PagedKV(src, "layer_first", 4)
    store = _Blocks()
    gpu.KVTransfer(kv).save([0, 1], store.write)
    pool = gpu.StagingPool(slab_bytes=2 * kv.block_bytes, slabs=1)
    dst = gpu.PagedKV([torch.zeros_like(t) for t in src], "layer_first", 4)
    load = gpu.KVTransfer(dst, pool).load([2, 3], read=store.read)
    assert pool._free == []  # the one slab is leased
    del load
    assert len(pool._free) == 1


def test_dram_registration_can_be_turned_off(store_dir, monkeypatch):
    from tairstore.connectors.common import REGISTER_ENV, open_backend

    monkeypatch.setenv(REGISTER_ENV, "0")
    backend = open_backend(store_dir, "no-register")
    assert backend._host_registered() is False
    assert not gpu.host_registered(backend.target.host_memory())
