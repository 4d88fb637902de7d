"""SGLang HiCache storage throughput: tairstore (embedded and daemon) beside SGLang's ``file``
backend, on the same Llama-3.1-8B-sized pages, in the same run.

Each backend is created the way SGLang's cache controller creates it
(``StorageBackendFactory.create_backend`` then ``register_mem_pool_host``) over one host KV pool
of Llama-3.1-8B's geometry: 32 layers, 8 KV heads of 128, bfloat16, ``--page-size`` tokens a
page (64 by default: 8 MiB a page), layout ``--layout``. Then, per round and per backend, with
fresh page hashes:

- ``set``: every page of the source half of the pool written in batches of ``--batch`` pages,
  as the controller's backup thread writes them: tairstore through ``batch_set_v1`` (the
  zero-copy ``interface_v1`` path), ``file`` through ``batch_set`` of ``get_data_page`` pages
  (the generic path SGLang uses for it);
- an untimed settle (:func:`settle`: a write-back store's DRAM backlog written, then
  ``os.sync()``), the same for every backend;
- ``get``: the same pages read back into the other half of the pool (tairstore:
  ``batch_get_v1``; ``file``: ``batch_get`` into dummy pages, then ``set_from_flat_data_page``),
  checked byte for byte once per backend.

tairstore's daemon is started as users start it (``tairstore serve --data-dir D --port P
--http-port H``); the embedded store and the file backend write under ``--dir`` (default: the
current directory, the file system the repository is on; never a tmpfs). Reads of the file
backend come from the page cache (just written), as reads of tairstore's DRAM tier do.
Backends alternate within each round; the table gives the best round in GB/s (10^9 bytes of
page payload a second), each tairstore row's ratio to ``file`` (>1.00: faster), and
``set+settle``: the bytes over the time of ``set`` and its settle (until they are on disk).

Run: ``python benchmarks/connectors.py`` (needs torch and ``pip install --no-deps sglang``),
``--pages 16 --rounds 2`` for a quick look, ``--json out.json`` for every sample;
``--h2d`` measures the GPU hooks' host-to-device load against a plain ``tensor.copy_``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time

import torch

# The tests' SGLang loader, daemon starter and host pool (the same geometry as SGLang's).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "connectors"))
from connsupport import Daemon, HostPool, load_sglang, load_sglang_file_backend  # noqa: E402

GB = 1e9
MIB = 1 << 20
#: Llama-3.1-8B's KV geometry.
LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128


class Runner:
    """One backend over the shared pool: how SGLang's controller calls it, per path."""

    def __init__(self, name: str, backend, pool: HostPool, v1: bool, client_url: str = "") -> None:
        self.name, self.backend, self.pool, self.v1 = name, backend, pool, v1
        self.client_url = client_url

    def _idx(self, pages: list[int]) -> torch.Tensor:
        ps = self.pool.page_size
        return torch.cat([torch.arange(p * ps, (p + 1) * ps) for p in pages])

    def set(self, keys: list[str], pages: list[int]) -> bool:
        if self.v1:
            return all(self.backend.batch_set_v1(keys, self._idx(pages)))
        ps = self.pool.page_size
        return bool(self.backend.batch_set(keys, [self.pool.get_data_page(p * ps) for p in pages]))

    def get(self, keys: list[str], pages: list[int]) -> bool:
        if self.v1:
            return all(self.backend.batch_get_v1(keys, self._idx(pages)))
        ps = self.pool.page_size
        got = self.backend.batch_get(keys, [self.pool.get_dummy_flat_data_page() for _ in keys])
        for p, data in zip(pages, got):
            if data is None:
                return False
            self.pool.set_from_flat_data_page(p * ps, data)
        return True


def timed(fn, keys: list[str], pages: list[int], batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(keys), batch):
        if not fn(keys[i:i + batch], pages[i:i + batch]):
            raise RuntimeError(f"{fn.__qualname__} failed on batch {i // batch}")
    return time.perf_counter() - t0


def settle(r: Runner) -> float:
    """Untimed between ``set`` and ``get``, for every backend alike: wait until a write-back
    store has written what it acknowledged from DRAM, then ``os.sync()`` (the page cache's
    dirty pages, the file backend's included, go to disk), so a phase never pays for the
    previous one's deferred work. Returns the seconds it took."""
    t0 = time.perf_counter()
    stats = getattr(getattr(r.backend, "backend", None), "store_stats", None)
    deadline = t0 + 120
    while stats is not None and time.perf_counter() < deadline:
        if not stats().get("tiers", {}).get("dram", {}).get("dirty_bytes"):
            break
        time.sleep(0.005)
    os.sync()
    return time.perf_counter() - t0


def h2d(pages: int, rounds: int) -> None:
    """``--h2d``: the GPU hooks' load (side stream, per-layer scatter) of Llama-3.1-8B pages into
    a paged KV cache on the device, beside one plain ``tensor.copy_`` of the same bytes from
    pinned memory: from a read callback through pinned staging (``staging``), and from a real
    embedded store, through pinned staging (``store, staging``: ``get_into``) and straight from
    its DRAM registered with CUDA (``store, direct``: what an adapter does for pages of 256 KiB
    and more); and the other way, ``save_pages`` of fresh pages into the store (``store,
    save``: gather on the device, one copy to pinned staging, the store's put) beside one
    ``tensor.copy_`` from the device into pinned memory. On a machine without CUDA, everything
    on the CPU (no registration there)."""
    from tairstore.connectors.common import close_embedded, open_backend
    from tairstore.tiers import gpu

    device = "cuda" if gpu.cuda_available() else "cpu"
    ps = 64
    kv = [torch.zeros(LAYERS, pages * ps, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
          for _ in range(2)]
    paged = gpu.PagedKV(kv, "layer_first", ps)
    nbytes = paged.block_bytes
    transfer = gpu.KVTransfer(paged, gpu.StagingPool(pages * nbytes, 1))
    blocks = torch.randint(0, 255, (pages * nbytes,), dtype=torch.uint8)
    if device == "cuda":
        blocks = blocks.pin_memory()
    src = memoryview(blocks.numpy())
    plain = torch.empty(pages * nbytes, dtype=torch.uint8, device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        best = 0.0
        for _ in range(rounds + 1):  # the first round warms up (allocations, registration)
            t = time.perf_counter()
            fn()
            sync()
            best = max(best, pages * nbytes / (time.perf_counter() - t) / GB)
        return best

    def read(i: int, buf: memoryview) -> bool:
        buf[:] = src[i * nbytes:(i + 1) * nbytes]
        return True

    cells = {"tensor.copy_": timed(lambda: plain.copy_(blocks, non_blocking=True)),
             "staging": timed(lambda: transfer.load(list(range(pages)), read=read).wait())}
    with tempfile.TemporaryDirectory() as d:
        backend = open_backend(d, "h2d", store_options=dict(dram_bytes=pages * nbytes + (256 << 20), ssd_bytes=0))
        keys = [f"h2d-{i}".encode() for i in range(pages)]
        assert backend.put_many(keys, lambda j, _k: src[j * nbytes:(j + 1) * nbytes], nbytes) == [True] * pages
        cells["store, staging"] = timed(lambda: transfer.load(
            list(range(pages)), read=lambda i, buf: backend.get_into(keys[i], buf, nbytes)).wait())
        cells["store, direct"] = timed(lambda: backend.load_pages(transfer, keys, list(range(pages))).wait())
        saved = itertools.count(1)

        def save() -> None:  # fresh keys each round: every page is gathered and stored
            n = next(saved)
            fresh = [f"h2d-{n}-{i}".encode() for i in range(pages)]
            assert backend.save_pages(transfer, fresh, list(range(pages))) == [True] * pages
            backend.target.delete(fresh, namespace="h2d")

        cells["store, save"] = timed(save)
        cells["copy_ to pinned"] = timed(lambda: blocks.copy_(plain, non_blocking=True))
        registered = gpu.host_registered(backend.target.host_memory())
        check = torch.empty(pages * nbytes, dtype=torch.uint8, device=device)
        paged.gather(list(range(pages)), check)  # the last load's pages, back as blocks
        same = torch.equal(check.cpu(), blocks.cpu())
        close_embedded(d)
    if not same:
        raise SystemExit("the store's pages did not arrive byte for byte")
    base = cells["tensor.copy_"]
    print(f"{device}: {pages} pages of {nbytes / MIB:.0f} MiB, GB/s and ratio to tensor.copy_ from pinned "
          f"memory (the store's DRAM registered with CUDA: {registered}; pages verified):")
    for name, value in cells.items():
        print(f"  {name:16} {value:8.2f}  {value / base:5.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=32, help="pages per round (8 MiB each by default)")
    ap.add_argument("--page-size", type=int, default=64, help="tokens per page")
    ap.add_argument("--batch", type=int, default=8, help="pages per batch call")
    ap.add_argument("--layout", choices=["page_first", "layer_first"], default="page_first")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", default="file,embedded,embedded-batch,embedded-sync,daemon,daemon-batch,daemon-shm,daemon-wb",
                    help="embedded: the adapter's default embedded store (durability batch, "
                         "write-back); embedded-batch, -sync, -none: durability batch / sync / "
                         "none without write-back; daemon: "
                         "tairstore serve's defaults (durability sync); daemon-batch: durability "
                         "batch; daemon-shm: durability batch, its arena shared ([shm]) and read "
                         "in place through shm+tcp://; daemon-wb: daemon-shm with write_back "
                         "(writes acknowledged from DRAM)")
    ap.add_argument("--dir", default=".", help="where the file backend and embedded store write")
    ap.add_argument("--json", help="write every sample to this file")
    ap.add_argument("--h2d", action="store_true",
                    help="instead: the GPU hooks' host-to-device load against tensor.copy_")
    args = ap.parse_args()
    if args.h2d:
        h2d(args.pages, args.rounds)
        return 0

    try:
        storage, factory = load_sglang()
        load_sglang_file_backend()
    except ImportError as exc:
        sys.exit(f"{exc}: pip install --no-deps sglang")
    from tairstore.connectors.common import close_embedded
    from tairstore import Client

    pool = HostPool(layout=args.layout, pages=2 * args.pages, page_size=args.page_size,
                    layers=LAYERS, heads=KV_HEADS, head_dim=HEAD_DIM)
    total = args.pages * pool.page_bytes
    src_pages = list(range(args.pages))
    dst_pages = list(range(args.pages, 2 * args.pages))
    tmp = tempfile.mkdtemp(prefix=".tairstore-bench-connectors-", dir=args.dir)
    daemons, runners = [], []

    def config(extra: dict):
        return storage.HiCacheStorageConfig(
            tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
            is_mla_model=False, enable_storage_metrics=False,
            is_page_first_layout=args.layout == "page_first", model_name="meta-llama/Llama-3.1-8B",
            extra_config=extra)

    def tairstore_backend(url: str, **extra):
        cfg = config({"backend_name": "tairstore", "module_path": "tairstore.connectors.sglang",
                      "class_name": "HiCacheTairStore", "tairstore_url": url, "interface_v1": 1, **extra})
        b = factory.StorageBackendFactory.create_backend("dynamic", cfg, pool)
        b.register_mem_pool_host(pool)
        return b

    embedded_dirs: list[str] = []
    try:
        names = args.backends.split(",")
        if "file" in names:
            b = factory.StorageBackendFactory.create_backend(
                "file", config({"file_storage_path": os.path.join(tmp, "file")}), pool)
            b.register_mem_pool_host(pool)
            runners.append(Runner("sglang file", b, pool, v1=False))
        for name, durability in (("embedded", "batch"), ("embedded-batch", "batch"),
                                 ("embedded-sync", "sync"), ("embedded-none", "none")):
            if name not in names:
                continue
            # Prefaulted, as a long-running engine's arena is: first-touch faults are start-up cost.
            # "batch" (the adapter's default) fsyncs on a timer, "sync" every commit, "none"
            # never: it promises what the file backend does, bytes handed to the OS.
            opts = {"dram_bytes": 2 * total + (64 * MIB), "ssd_bytes": 2 * total + (256 * MIB),
                    "prefault_dram": True, "durability": durability}
            if name != "embedded":  # "embedded": the adapter's defaults (batch, write-back)
                opts["write_back"] = False
            path = os.path.join(tmp, name)
            embedded_dirs.append(path)
            label = "tairstore embedded " + ("write-back" if name == "embedded" else durability)
            runners.append(Runner(label,
                                  tairstore_backend(path, store_options=opts), pool, v1=True))
        for name in ("daemon", "daemon-batch", "daemon-shm", "daemon-wb"):
            if name not in names:
                continue
            data_dir = os.path.join(tmp, name)
            store = extra = None
            if name != "daemon":
                store = {"durability": "batch", "dram_bytes": 2 * total + 64 * MIB, "prefault_dram": True}
            if name in ("daemon-shm", "daemon-wb"):
                extra = {"shm": {"enabled": True}}
            if name == "daemon-wb":
                store["write_back"] = True
            # Started as users start it: tairstore serve --config C --data-dir D --port 0 ....
            d = Daemon(data_dir, store, extra=extra)
            daemons.append(d)
            label = "tairstore " + {"daemon": "daemon sync", "daemon-batch": "daemon batch",
                                    "daemon-shm": "daemon shm", "daemon-wb": "daemon shm write-back"}[name]
            url = d.url.replace("tcp://", "shm+tcp://") if name in ("daemon-shm", "daemon-wb") else d.url
            runners.append(Runner(label, tairstore_backend(url), pool, v1=True, client_url=d.url))

        samples = []
        for rnd in range(args.rounds):
            for r in runners:
                keys = [f"{r.name}-{rnd}-{i}".encode().hex() for i in range(args.pages)]
                t_set = timed(r.set, keys, src_pages, args.batch)
                t_settle = settle(r)
                for d in dst_pages:
                    pool.page(d * args.page_size).zero_()
                t_get = timed(r.get, keys, dst_pages, args.batch)
                if rnd == 0:
                    for s, d in zip(src_pages, dst_pages):
                        if not torch.equal(pool.page(s * args.page_size), pool.page(d * args.page_size)):
                            raise RuntimeError(f"{r.name}: page {s} read back different bytes")
                samples.append({"backend": r.name, "round": rnd, "set_s": t_set, "get_s": t_get,
                                "settle_s": t_settle, "bytes": total})
                # Drop the round's pages so every round writes into the same amount of room.
                if not r.client_url:
                    r.backend.clear()
                else:
                    with Client(r.client_url) as c:
                        c.delete([bytes.fromhex(k) for k in keys], namespace=r.backend.namespace)
    finally:
        for r in runners:
            if hasattr(r.backend, "close"):
                r.backend.close()
        for path in embedded_dirs:
            close_embedded(path)
        for d in daemons:
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    best = {}
    for s in samples:
        b = best.setdefault(s["backend"], {"set": 0.0, "get": 0.0, "durable": 0.0})
        b["set"] = max(b["set"], s["bytes"] / s["set_s"] / GB)
        b["durable"] = max(b["durable"], s["bytes"] / (s["set_s"] + s["settle_s"]) / GB)
        b["get"] = max(b["get"], s["bytes"] / s["get_s"] / GB)
    print(f"SGLang HiCache storage, Llama-3.1-8B pages: {pool.page_bytes / MIB:.0f} MiB/page "
          f"({args.page_size} tokens, {args.layout}), {args.pages} pages/round, batches of "
          f"{args.batch}, best of {args.rounds} rounds")
    print(f"{'backend':<32} {'set GB/s':>9} {'get GB/s':>9} {'set x file':>11} {'get x file':>11} "
          f"{'set+settle GB/s':>16} {'x file':>7}")
    base = best.get("sglang file")
    for name, b in best.items():
        rs = f"{b['set'] / base['set']:.2f}" if base else "-"
        rg = f"{b['get'] / base['get']:.2f}" if base else "-"
        rd = f"{b['durable'] / base['durable']:.2f}" if base else "-"
        print(f"{name:<32} {b['set']:>9.2f} {b['get']:>9.2f} {rs:>11} {rg:>11} "
              f"{b['durable']:>16.2f} {rd:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(samples, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
