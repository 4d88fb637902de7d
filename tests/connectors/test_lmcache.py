"""TairStoreRemoteConnector loaded through LMCache's real remote storage plugin framework
(CreateConnector on ``plugin://tairstore``, LMCache's own config, metadata and CPU backend), on
CPU tensors: byte-exact chunks, batched forms, prefix counts, isolation, a stopped daemon."""

from __future__ import annotations

import asyncio

from connsupport import need

need("torch", "pip install torch==2.13.0")
need("lmcache.v1.storage_backend.connector",
     "pip install --no-deps lmcache sortedcontainers numba aiofile cryptography (and llvmlite caio cffi)")
import torch  # noqa: E402
from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.connector import CreateConnector  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402


CHUNK = 16


class Engine:
    """One LMCache engine's CPU backend and its tairstore remote connector."""

    def __init__(self, url, model="tiny", worker=0, world=1):
        self.config = LMCacheEngineConfig.from_dict({
            "chunk_size": CHUNK, "local_cpu": True, "max_local_cpu_size": 0.05,
            "remote_storage_plugins": ["tairstore"],
            "extra_config": {"remote_storage_plugin.tairstore.module_path": "tairstore.connectors.lmcache",
                             "remote_storage_plugin.tairstore.class_name": "TairStoreRemoteConnector",
                             "remote_storage_plugin.tairstore.url": url}})
        self.meta = LMCacheMetadata(model_name=model, world_size=world, local_world_size=world,
                                    worker_id=worker, local_worker_id=worker, kv_dtype=torch.bfloat16,
                                    kv_shape=(2, 2, CHUNK, 2, 8), chunk_size=CHUNK)
        self.cpu = LocalCPUBackend(self.config, self.meta)
        self.loop = asyncio.new_event_loop()
        self.conn = CreateConnector("plugin://tairstore", self.loop, self.cpu, self.config, self.meta,
                                    plugin_name="tairstore")
        self.inner = self.conn.getWrappedConnector()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def key(self, h):
        return CacheEngineKey(self.meta.model_name, self.meta.world_size, self.meta.worker_id, h, torch.bfloat16)

    def chunk(self, seed):
        obj = self.cpu.allocate(self.inner.meta_shapes, self.inner.meta_dtypes, self.inner.meta_fmt)
        data = torch.frombuffer(obj.byte_array, dtype=torch.uint8)
        data.copy_(torch.randint(0, 256, data.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
        return obj

    def close(self):
        self.run(self.conn.close())
        self.loop.close()


def test_loaded_through_the_plugin_framework(store_dir):
    e = Engine(store_dir)
    from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

    assert isinstance(e.inner, RemoteConnector) and type(e.inner).__name__ == "TairStoreRemoteConnector"
    assert e.run(e.conn.ping()) == 0
    e.close()


def test_chunks_round_trip_byte_exact_and_list(store_dir):
    e = Engine(store_dir)
    objs = [e.chunk(i) for i in range(3)]
    want = [bytes(o.byte_array) for o in objs]  # a put hands the chunk's buffer back to LMCache
    shapes = objs[1].get_shapes()
    keys = [e.key(100 + i) for i in range(3)]
    e.run(e.conn.put(keys[0], objs[0]))
    e.run(e.conn.batched_put(keys[1:], objs[1:]))
    assert e.run(e.conn.exists(keys[2])) and not e.run(e.conn.exists(e.key(999)))
    got = e.run(e.conn.get(keys[1]))
    assert bytes(got.byte_array) == want[1] and got.get_shapes() == shapes
    many = e.run(e.conn.batched_get(keys + [e.key(999)]))
    assert [bytes(m.byte_array) for m in many[:3]] == want and many[3] is None
    assert sorted(e.run(e.conn.list())) == sorted(k.to_string() for k in keys)
    for obj in [got] + many[:3]:
        obj.ref_count_down()
    e.close()


def test_prefix_counts_stop_at_the_first_missing_chunk(store_dir):
    e = Engine(store_dir)
    keys = [e.key(i) for i in range(4)]
    e.run(e.conn.batched_put([keys[0], keys[1], keys[3]], [e.chunk(i) for i in range(3)]))
    assert e.conn.batched_contains(keys) == 2
    assert e.run(e.conn.batched_async_contains("lookup", keys)) == 2
    assert e.conn.remove_sync(keys[0]) and e.conn.batched_contains(keys) == 0
    e.close()


def test_deployments_are_isolated_and_replicas_share(store_dir):
    a, b, other = Engine(store_dir), Engine(store_dir), Engine(store_dir, worker=1, world=2)
    k = a.key(7)
    a.run(a.conn.put(k, a.chunk(7)))
    assert b.run(b.conn.exists(k))
    assert not other.run(other.conn.exists(k))  # another TP shard's bytes
    assert other.inner.backend.namespace != a.inner.backend.namespace
    for e in (a, b, other):
        e.close()


def test_a_stopped_daemon_is_a_miss(own_daemon):
    e = Engine(own_daemon.url)
    k = e.key(1)
    chunk = e.chunk(1)
    want = bytes(chunk.byte_array)
    e.run(e.conn.put(k, chunk))
    got = e.run(e.conn.get(k))
    assert bytes(got.byte_array) == want
    got.ref_count_down()
    own_daemon.stop()
    assert e.run(e.conn.get(k)) is None
    assert e.run(e.conn.exists(k)) is False and e.conn.batched_contains([k]) == 0
    e.run(e.conn.put(e.key(2), e.chunk(2)))  # no exception
    assert e.run(e.conn.ping()) == 1
    e.close()
