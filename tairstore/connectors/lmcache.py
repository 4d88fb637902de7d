"""LMCache remote backend: ``TairStoreRemoteConnector``, an LMCache ``RemoteConnector``.

Loaded by LMCache's remote storage plugin framework (LMCache config, YAML)::

    chunk_size: 256
    local_cpu: true                 # LMCache stages remote chunks in its CPU backend
    max_local_cpu_size: 5
    remote_storage_plugins: ["tairstore"]
    extra_config:
      remote_storage_plugin.tairstore.module_path: tairstore.connectors.lmcache
      remote_storage_plugin.tairstore.class_name: TairStoreRemoteConnector
      remote_storage_plugin.tairstore.url: tairstore://127.0.0.1:7480   # or a directory

(``remote_url: tairstore://…`` is read too when the ``.url`` key is absent.) One LMCache chunk
is one tairstore block: LMCache's chunk metadata header (when ``save_chunk_meta`` is on, its
default) followed by the chunk's bytes; the key is the sha256 of LMCache's key string, in a
namespace of the deployment (model, dtype, chunk size, KV shape, worker). Every failure is a
miss (``None`` / ``False``), so LMCache recomputes. LMCache is imported only when the class is
first looked up.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional

from ..errors import InvalidArgumentError
from .common import (DEFAULT_TIMEOUT_S, Backend, Deployment, engine_key, is_daemon_url, lazy_classes,
                     open_backend)

# The engine-derived classes are looked up lazily (module __getattr__), so they stay out of
# __all__: a star import must not import the engine.
__all__ = ["TairStoreRemoteConnectorImpl", "deployment_for"]

log = logging.getLogger("tairstore.connectors.lmcache")
PLUGIN = "tairstore"
#: Threads that run store calls off LMCache's event loop (a daemon call waits on a socket).
IO_THREADS = 4


def deployment_for(metadata: Any) -> Deployment:
    """The :class:`Deployment` of an ``LMCacheMetadata``."""
    return Deployment(engine="lmcache", model=str(metadata.model_name),
                      dtype=str(metadata.kv_dtype).replace("torch.", ""),
                      page_size=int(metadata.chunk_size),
                      layout="kv:" + "x".join(str(int(d)) for d in metadata.kv_shape),
                      tp_rank=int(metadata.worker_id), tp_size=int(metadata.world_size),
                      mla=bool(metadata.use_mla))


def resolve_url(config: Any) -> str:
    """The store's address: ``remote_storage_plugin.tairstore.url`` (or ``tairstore_url``) in
    ``extra_config``, else a ``tairstore://`` / ``tcp://`` ``remote_url``."""
    extra = getattr(config, "extra_config", None) or {}
    url = extra.get(f"remote_storage_plugin.{PLUGIN}.url") or extra.get("tairstore_url")
    remote = getattr(config, "remote_url", None)
    if not url and remote and is_daemon_url(remote):
        url = remote
    if not url:
        raise InvalidArgumentError(
            f"set extra_config remote_storage_plugin.{PLUGIN}.url to tairstore://host:port or a directory")
    return url


class TairStoreRemoteConnectorImpl:
    """The behaviour of :class:`TairStoreRemoteConnector` (built on LMCache's
    ``RemoteConnector`` when first looked up, see :func:`_build`)."""

    def _setup(self, loop: Any, local_cpu_backend: Any, config: Any) -> None:
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        extra = getattr(config, "extra_config", None) or {}
        self.backend: Backend = open_backend(
            resolve_url(config), deployment_for(local_cpu_backend.metadata).namespace(),
            timeout_s=float(extra.get(f"remote_storage_plugin.{PLUGIN}.timeout_s", DEFAULT_TIMEOUT_S)))
        self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="tairstore-lmcache")
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def _run(self, fn: Callable, *args: Any) -> Any:
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @staticmethod
    def _key(key: Any) -> bytes:
        return engine_key(key.to_string())

    def _remember(self, keys: List[Any]) -> None:
        with self._lock:
            self._known.update(k.to_string() for k in keys)

    # -- contains ----------------------------------------------------------------------------
    def exists_sync(self, key: Any) -> bool:
        """Whether the chunk is stored."""
        return self.backend.exists([self._key(key)])[0]

    async def exists(self, key: Any) -> bool:
        """Whether the chunk is stored."""
        return await self._run(self.exists_sync, key)

    def support_batched_contains(self) -> bool:
        """Prefix lookups are one store call."""
        return True

    def batched_contains(self, keys: List[Any]) -> int:
        """How many leading chunks are stored."""
        return self.backend.prefix_len([self._key(k) for k in keys])

    async def batched_async_contains(self, lookup_id: str, keys: List[Any], pin: bool = False) -> int:
        """How many leading chunks are stored."""
        return await self._run(self.batched_contains, keys)

    # -- get ---------------------------------------------------------------------------------
    def _get_sync(self, key: Any) -> Optional[Any]:
        view = self.backend.get(self._key(key))
        if view is None:
            return None
        head = self.remote_metadata_bytes if self.save_chunk_meta else 0
        try:
            if self.save_chunk_meta:
                md = self._metadata_cls().deserialize(bytes(view[:head]))
                obj = self.local_cpu_backend.allocate(md.shapes, md.dtypes, md.fmt)
            else:
                obj = self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt)
        except Exception as exc:  # noqa: BLE001 - a header LMCache cannot read is a miss
            log.warning("tairstore: unreadable chunk header, served as a miss: %s", exc)
            return None
        if obj is None:
            return None  # LMCache's CPU buffer is full
        dst = memoryview(obj.byte_array).cast("B")
        payload = view[head:]
        if payload.nbytes > dst.nbytes or (self.save_chunk_meta and payload.nbytes != dst.nbytes):
            obj.ref_count_down()
            return None
        dst[:payload.nbytes] = payload
        if not self.save_chunk_meta:
            try:
                obj = self.reshape_partial_chunk(obj, payload.nbytes)
            except ValueError:
                obj.ref_count_down()
                return None
        return obj

    async def get(self, key: Any) -> Optional[Any]:
        """The chunk as a MemoryObj from LMCache's CPU backend, or None on a miss."""
        return await self._run(self._get_sync, key)

    def support_batched_get(self) -> bool:
        """``batched_get`` reads chunks on the connector's threads."""
        return True

    async def batched_get(self, keys: List[Any]) -> List[Optional[Any]]:
        """Per key, the chunk or None."""
        return list(await asyncio.gather(*(self.get(k) for k in keys)))

    # -- put ---------------------------------------------------------------------------------
    def _block(self, memory_obj: Any) -> memoryview:
        payload = memoryview(memory_obj.byte_array).cast("B")
        if not self.save_chunk_meta:
            return payload
        md = self._metadata_cls()(payload.nbytes, memory_obj.get_shapes(), memory_obj.get_dtypes(),
                                  memory_obj.get_memory_format())
        block = bytearray(self.remote_metadata_bytes + payload.nbytes)
        md.serialize_into(block)
        block[self.remote_metadata_bytes:] = payload
        return memoryview(block)

    def _put_many_sync(self, keys: List[Any], memory_objs: List[Any]) -> bool:
        blocks = [self._block(m) for m in memory_objs]
        sizes = {b.nbytes for b in blocks}
        ks = [self._key(k) for k in keys]
        if len(sizes) == 1:
            ok = self.backend.put_many(ks, lambda i, _k: blocks[i], sizes.pop())
        else:
            ok = [self.backend.put(k, b) for k, b in zip(ks, blocks)]
        self._remember([k for k, good in zip(keys, ok) if good])
        return all(ok)

    async def put(self, key: Any, memory_obj: Any) -> None:
        """Store the chunk (a failure is logged by the backend and leaves a miss)."""
        await self._run(self._put_many_sync, [key], [memory_obj])

    def support_batched_put(self) -> bool:
        """Chunks of one batch go through one write session."""
        return True

    async def batched_put(self, keys: List[Any], memory_objs: List[Any]) -> None:
        """Store the chunks."""
        await self._run(self._put_many_sync, list(keys), list(memory_objs))

    # -- the rest ----------------------------------------------------------------------------
    async def list(self) -> List[str]:
        """The chunk keys this connector stored or saw stored (the store does not enumerate a
        namespace's keys; this is LMCache's best-effort listing)."""
        with self._lock:
            return sorted(self._known)

    def remove_sync(self, key: Any) -> bool:
        """Delete the chunk."""
        try:
            return self.backend.target.delete([self._key(key)], namespace=self.backend.namespace) > 0
        except Exception as exc:  # noqa: BLE001 - failure to delete is not the engine's problem
            log.debug("tairstore remove failed: %s", exc)
            return False

    def support_ping(self) -> bool:
        """The store answers ``stats``."""
        return True

    async def ping(self) -> int:
        """0 when the store answers, 1 otherwise (LMCache's convention)."""
        stats = await self._run(self.backend.store_stats)
        return 0 if stats else 1

    async def close(self) -> None:
        """Close the daemon connection and the I/O threads."""
        self._pool.shutdown(wait=False)
        self.backend.close()

    @staticmethod
    def _metadata_cls() -> Any:
        from lmcache.v1.protocol import RemoteMetadata

        return RemoteMetadata


def _build() -> type:
    from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

    def __init__(self: Any, loop: Any, local_cpu_backend: Any, config: Any = None) -> None:
        RemoteConnector.__init__(self, local_cpu_backend.config, local_cpu_backend.metadata)
        self._setup(loop, local_cpu_backend, config or local_cpu_backend.config)

    return type("TairStoreRemoteConnector", (TairStoreRemoteConnectorImpl, RemoteConnector), {
        "__module__": __name__,
        "__doc__": "LMCache remote connector on tairstore (see this module's docstring).",
        "__init__": __init__,
    })


# LMCache is imported on first use of the class, not when this module is imported.
__getattr__ = lazy_classes(__name__, {"TairStoreRemoteConnector": _build})
