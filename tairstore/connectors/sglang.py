"""SGLang HiCache storage backend: ``HiCacheTairStore``, a subclass of SGLang's ``HiCacheStorage``.

Loaded by SGLang's own ``dynamic`` backend mechanism::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
      '{"backend_name":"tairstore","module_path":"tairstore.connectors.sglang",
        "class_name":"HiCacheTairStore","tairstore_url":"tcp://127.0.0.1:7480","interface_v1":1}'

``tairstore_url`` is a daemon address or a local directory (an embedded store). With
``interface_v1`` SGLang calls the zero-copy path (``batch_get_v1`` / ``batch_set_v1``): pages
move straight between SGLang's host KV pool and the store through :mod:`tairstore.tiers.gpu`;
without it, SGLang hands whole flat pages to ``batch_get`` / ``batch_set``.

Every failure (daemon down or slow, store full) reads as a miss, so SGLang recomputes; a batch
call never returns ``None``. SGLang is imported only when ``HiCacheTairStore`` is first looked
up, so this module imports where SGLang is not installed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, List, Optional

from ..errors import InvalidArgumentError
from ..tiers import gpu
from .common import DEFAULT_TIMEOUT_S, Backend, Deployment, engine_key, lazy_classes, open_backend

# The engine-derived classes are looked up lazily (module __getattr__), so they stay out of
# __all__: a star import must not import the engine.
__all__ = ["TairStoreHiCacheImpl", "deployment_for"]

log = logging.getLogger("tairstore.connectors.sglang")

#: Host-pool layouts the zero-copy path moves with PagedKV; others go page by page through
#: the pool's own get_data_page / set_from_flat_data_page.
PAGED_LAYOUTS = ("layer_first", "page_first")


def deployment_for(storage_config: Any, *, dtype: str, page_size: int, layout: str) -> Deployment:
    """The :class:`Deployment` of an SGLang ``HiCacheStorageConfig`` and host-pool geometry."""
    extra = storage_config.extra_config or {}
    cp = getattr(storage_config, "attn_cp_size", 1) or 1
    dcp = getattr(storage_config, "dcp_size", 1) or 1
    mla = bool(storage_config.is_mla_model)
    parts = []
    if cp > 1:
        parts.append(f"cp{storage_config.attn_cp_rank}of{cp}")
    if dcp > 1:
        parts.append(f"dcp{storage_config.dcp_rank}of{dcp}")
    if extra.get("namespace_salt"):
        parts.append(str(extra["namespace_salt"]))
    return Deployment(
        engine="sglang", model=str(storage_config.model_name or extra.get("model", "unknown")),
        dtype=dtype, page_size=int(page_size), layout=layout,
        tp_rank=int(storage_config.tp_rank), tp_size=int(storage_config.tp_size),
        pp_rank=int(storage_config.pp_rank), pp_size=int(storage_config.pp_size),
        mla=mla, extra=",".join(parts))


def _tensor_bytes(t: Any) -> memoryview:
    """A contiguous CPU tensor's bytes (any dtype, bf16 and fp8 included)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class TairStoreHiCacheImpl:
    """The behaviour of :class:`HiCacheTairStore`, kept apart from SGLang's base class so the
    class can be built when SGLang is imported (see :func:`_build`)."""

    def __init__(self, storage_config: Any, kwargs: Optional[dict] = None) -> None:
        extra = dict(storage_config.extra_config or {})
        url = extra.get("tairstore_url")
        if not url:
            raise InvalidArgumentError(
                "extra_config needs tairstore_url: tcp://host:port of a daemon or a directory")
        self.storage_config = storage_config
        self.extra_config = extra
        self.mem_pool_host: Any = None
        self.paged: gpu.PagedKV | None = None
        self.transfer: gpu.KVTransfer | None = None
        self.page_size = int(extra.get("page_size", 0)) or 0
        self.dtype_name = str(extra.get("dtype", "unknown"))
        self.layout = "page_first" if storage_config.is_page_first_layout else "layer_first"
        self.is_writer = bool(getattr(storage_config, "is_storage_writer", True))
        self._metrics: dict[str, list] = {f"{k}_{m}": [] for k in ("prefetch", "backup")
                                          for m in ("pgs", "bandwidth")}
        self._metrics_lock = threading.Lock()
        self.backend: Backend = open_backend(
            url, self._namespace(), timeout_s=float(extra.get("timeout_s", DEFAULT_TIMEOUT_S)),
            token=extra.get("token"), store_options=extra.get("store_options"))

    # -- geometry and namespace ------------------------------------------------------------
    def _namespace(self) -> str:
        return deployment_for(self.storage_config, dtype=self.dtype_name,
                              page_size=self.page_size, layout=self.layout).namespace()

    @property
    def namespace(self) -> str:
        """The tairstore namespace this rank's pages live in."""
        return self.backend.namespace

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Take SGLang's host KV pool: its dtype, page size and layout fix the namespace, and
        its ``kv_buffer`` becomes the source and target of the zero-copy path."""
        self.mem_pool_host = mem_pool_host
        self.page_size = int(mem_pool_host.page_size)
        self.dtype_name = str(mem_pool_host.dtype).replace("torch.", "")
        self.layout = str(mem_pool_host.layout)
        self.backend.namespace = self._namespace()
        self.paged = self._paged_view(mem_pool_host)
        self.transfer = gpu.KVTransfer(self.paged) if self.paged is not None else None

    def _paged_view(self, pool: Any) -> "gpu.PagedKV | None":
        buf = getattr(pool, "kv_buffer", None)
        if not gpu.available() or buf is None or self.layout not in PAGED_LAYOUTS:
            log.info("tairstore: host layout %s moves page by page", self.layout)
            return None
        mla = bool(self.storage_config.is_mla_model)
        # MHA pools hold K and V as kv_buffer[0] / kv_buffer[1]; MLA pools one latent tensor.
        components = [buf] if mla else [buf[0], buf[1]]
        return gpu.PagedKV(components, self.layout, self.page_size)

    # -- flat-page interface (SGLang's generic path) ------------------------------------------
    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> Any:
        """One page into ``target_location`` (a flat tensor); None on a miss."""
        k = engine_key(key)
        if target_location is not None:
            if target_location.device.type != "cpu" or not target_location.is_contiguous():
                return None
            out = _tensor_bytes(target_location)
            if not self.backend.get_into(k, out, out.nbytes):
                return None
            return target_location
        view = self.backend.get(k)
        if view is None:
            return None
        import torch

        flat = torch.frombuffer(bytearray(view), dtype=torch.uint8)
        pool = self.mem_pool_host
        return flat.view(pool.dtype) if pool is not None else flat

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[Any]:
        """Per key, the filled target (or a new tensor), or None on a miss; never None itself."""
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        return [self.get(k, t) for k, t in zip(keys, targets)]

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        """Store one flat page; True when it is stored (now or already)."""
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None,
                  target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None) -> bool:
        """Store a chain of flat pages; True when every one is stored."""
        if not keys:
            return True
        if values is None or len(values) != len(keys):
            return False
        if not self.is_writer:
            return True  # MLA: another rank writes the same bytes
        blocks = [_tensor_bytes(v) for v in values]
        sizes = {b.nbytes for b in blocks}
        if len(sizes) != 1:
            return all(self.backend.put(engine_key(k), b) for k, b in zip(keys, blocks))
        return all(self.backend.put_many([engine_key(k) for k in keys],
                                         lambda i, _k: blocks[i], sizes.pop()))

    def exists(self, key: str) -> bool:
        """Whether the page is stored."""
        return self.backend.exists([engine_key(key)])[0]

    def batch_exists(self, keys: List[str], extra_info: Optional[Any] = None) -> int:
        """How many leading pages are stored (stops at the first missing page)."""
        return self.backend.prefix_len([engine_key(k) for k in keys])

    # -- zero-copy interface (interface_v1) ---------------------------------------------------
    def _pages(self, keys: List[str], host_indices: Any) -> list[int]:
        idx = host_indices.reshape(-1)
        if idx.numel() != len(keys) * self.page_size:
            raise InvalidArgumentError(
                f"{idx.numel()} host indices for {len(keys)} pages of {self.page_size} tokens")
        return [int(i) // self.page_size for i in idx[:: self.page_size].tolist()]

    def _v1_args(self, op: str, keys: List[str], host_indices: Any) -> tuple[list, list] | None:
        """(store keys, pool pages) of a v1 call, or None when it cannot run (logged)."""
        if self.mem_pool_host is None:
            return None
        try:
            pages = self._pages(keys, host_indices)
        except InvalidArgumentError as exc:
            log.warning("tairstore %s: %s", op, exc)
            return None
        return [engine_key(k) for k in keys], pages

    def batch_get_v1(self, keys: List[str], host_indices: Any,
                     extra_info: Optional[Any] = None) -> List[bool]:
        """Read pages straight into the host pool at ``host_indices``; per key, success."""
        args = self._v1_args("batch_get_v1", keys, host_indices) if keys else None
        if args is None:
            return [False] * len(keys)
        ks, pages = args
        t0 = time.perf_counter()
        if self.transfer is None:
            ok = [self._read_page(k, p) for k, p in zip(ks, pages)]
        else:
            ok = self.backend.load_pages(self.transfer, ks, pages).wait()
        self._record("prefetch", sum(ok), time.perf_counter() - t0)
        return ok

    def batch_set_v1(self, keys: List[str], host_indices: Any,
                     extra_info: Optional[Any] = None) -> List[bool]:
        """Write pages straight from the host pool at ``host_indices``; per key, success."""
        if not self.is_writer and self.mem_pool_host is not None:
            return [True] * len(keys)  # MLA: another rank writes the same bytes
        args = self._v1_args("batch_set_v1", keys, host_indices) if keys else None
        if args is None:
            return [False] * len(keys)
        ks, pages = args
        t0 = time.perf_counter()
        if self.transfer is None:
            ok = [self.backend.put(k, _tensor_bytes(self.mem_pool_host.get_data_page(
                p * self.page_size, flat=True))) for k, p in zip(ks, pages)]
        else:
            ok = self.backend.save_pages(self.transfer, ks, pages)
        self._record("backup", sum(ok), time.perf_counter() - t0)
        return ok

    def _read_page(self, key: bytes, page: int) -> bool:
        pool = self.mem_pool_host
        dst = pool.get_dummy_flat_data_page()
        out = _tensor_bytes(dst)
        if not self.backend.get_into(key, out, out.nbytes):
            return False
        pool.set_from_flat_data_page(page * self.page_size, dst)
        return True

    # -- housekeeping --------------------------------------------------------------------------
    def clear(self) -> bool:
        """Drop this deployment's pages (embedded stores; a daemon's are trimmed over HTTP)."""
        return self.backend.delete_all()

    def _record(self, kind: str, pages: int, seconds: float) -> None:
        # What SGLang's storage metrics (--enable-storage-metrics) collect per batch call.
        if not self.storage_config.enable_storage_metrics or not pages or seconds <= 0:
            return
        nbytes = self.paged.block_bytes if self.paged is not None else 0
        with self._metrics_lock:
            self._metrics[f"{kind}_pgs"].append(pages)
            self._metrics[f"{kind}_bandwidth"].append(pages * nbytes / seconds / 1e9)

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` (pages and GB/s per prefetch and backup batch since the
        last call) when storage metrics are on and SGLang's metrics module imports; else None.
        :meth:`tairstore_stats` has this adapter's own counters."""
        if not self.storage_config.enable_storage_metrics:
            return None
        with self._metrics_lock:
            taken = {k: list(v) for k, v in self._metrics.items()}
            for v in self._metrics.values():
                v.clear()
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except ImportError:
            return None
        return StorageMetrics(**taken)

    def tairstore_stats(self) -> dict:
        """This adapter's counters: pages and bytes read and written, misses, failures (daemon
        errors served as misses), and its namespace."""
        s = self.backend.stats
        return {"namespace": self.namespace, "pages_read": s.pages_read,
                "pages_written": s.pages_written, "bytes_read": s.bytes_read,
                "bytes_written": s.bytes_written, "misses": s.misses, "failures": s.failures}

    def close(self) -> None:
        """Close the daemon connection (an embedded store stays open for other adapters)."""
        self.backend.close()


def _build() -> type:
    """``HiCacheTairStore`` as a real subclass of SGLang's ``HiCacheStorage``."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage

    def register_mem_pool_host(self: Any, mem_pool_host: Any) -> None:
        HiCacheStorage.register_mem_pool_host(self, mem_pool_host)
        TairStoreHiCacheImpl.register_mem_pool_host(self, mem_pool_host)

    return type("HiCacheTairStore", (TairStoreHiCacheImpl, HiCacheStorage), {
        "__module__": __name__,
        "__doc__": "SGLang HiCache storage backend on tairstore (see this module's docstring).",
        "register_mem_pool_host": register_mem_pool_host,
    })


# SGLang is imported on first use of the class, not when this module is imported.
__getattr__ = lazy_classes(__name__, {"HiCacheTairStore": _build})
