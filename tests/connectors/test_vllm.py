"""TairStoreConnector against vLLM's real KVConnectorBase_V1, connector factory, config,
Request (with vLLM's own block hasher) and scheduler-output types, on CPU tensors: blocks saved
by one instance load byte-exactly into another's, metadata crosses pickled, prefix semantics,
isolation, and a failed load reported through get_block_ids_with_load_errors."""

from __future__ import annotations

import pickle

from connsupport import need

need("torch", "pip install torch==2.13.0")
base = need("vllm.distributed.kv_transfer.kv_connector.v1.base",
            "pip install --no-deps vllm (and the packages docs/INTEGRATIONS.md lists)")
import torch  # noqa: E402
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock, get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from tairstore.connectors.common import engine_key  # noqa: E402

BS, LAYERS, BLOCKS, HEADS, DIM = 4, 3, 16, 2, 8
ROLE = base.KVConnectorRole
init_none_hash(sha256)


def _config(url, model="tiny-llama", **extra):
    kt = KVTransferConfig(kv_connector="TairStoreConnector", kv_role="kv_both",
                          kv_connector_module_path="tairstore.connectors.vllm",
                          kv_connector_extra_config={"tairstore_url": url, "model": model, **extra})
    return VllmConfig(cache_config=CacheConfig(block_size=BS), kv_transfer_config=kt,
                      device_config=DeviceConfig(device="cpu"))


def _kv_cache_config(groups=1):
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=HEADS, head_size=DIM, dtype=torch.bfloat16)
    per = [[f"layer.{i}" for i in range(LAYERS) if i % groups == g] for g in range(groups)]
    return KVCacheConfig(num_blocks=BLOCKS, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(names, spec) for names in per])


class Instance:
    """One vLLM instance's connector pair (scheduler and worker) with its own paged KV."""

    def __init__(self, url, seed=0, groups=1, **kw):
        cfg, kvc = _config(url, **kw), _kv_cache_config(groups)
        self.sched = KVConnectorFactory.create_connector(cfg, ROLE.SCHEDULER, kvc)
        self.worker = KVConnectorFactory.create_connector(cfg, ROLE.WORKER, kvc)
        g = torch.Generator().manual_seed(seed)
        self.kv = {f"layer.{i}": torch.randint(-50, 50, (2, BLOCKS, BS, HEADS, DIM), generator=g).to(torch.bfloat16)
                   for i in range(LAYERS)}
        self.worker.register_kv_caches(self.kv)

    def block(self, block_id):
        return torch.stack([t[:, block_id] for t in self.kv.values()])

    def step(self, request, block_ids, computed=0):
        """Schedule ``request`` whole (as a new request) and run the worker's side of the step."""
        n_ext, is_async = self.sched.get_num_new_matched_tokens(request, computed)
        assert is_async is False
        blocks = KVCacheBlocks((tuple(KVCacheBlock(b) for b in block_ids),))
        self.sched.update_state_after_alloc(request, blocks, n_ext)
        out = SchedulerOutput(
            scheduled_new_reqs=[NewRequestData(request.request_id, request.prompt_token_ids, [], None, None,
                                               (list(block_ids),), computed, None, [])],
            scheduled_cached_reqs=CachedRequestData([], [], [], [], []),
            num_scheduled_tokens={request.request_id: request.num_tokens - computed - n_ext},
            total_num_scheduled_tokens=request.num_tokens, scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={}, finished_req_ids=set(), free_encoder_mm_hashes=[])
        meta = pickle.loads(pickle.dumps(self.sched.build_connector_meta(out)))  # crosses processes
        assert isinstance(meta, base.KVConnectorMetadata)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        for name in self.kv:
            self.worker.wait_for_layer_load(name)
        self.worker.wait_for_save()
        errors = self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        return n_ext, meta, errors


def _request(rid, tokens):
    return Request(rid, list(tokens), SamplingParams(max_tokens=1), None,
                   block_hasher=get_request_block_hasher(BS, sha256))


def test_loaded_by_vllms_factory_as_a_real_connector(store_dir):
    inst = Instance(store_dir)
    assert isinstance(inst.sched, base.KVConnectorBase_V1) and base.supports_hma(inst.sched)
    assert type(inst.worker).__name__ == "TairStoreConnector"


def test_saved_blocks_load_byte_exact_into_a_replica(store_dir):
    a, b = Instance(store_dir, seed=1), Instance(store_dir, seed=2)
    prompt = range(100, 114)  # 3 full blocks of 4 and 2 tokens
    n, meta, errors = a.step(_request("r1", prompt), [5, 6, 7, 8])
    assert n == 0 and not meta.loads and [s.block_ids for s in meta.saves] == [[5, 6, 7]] and not errors
    n, meta, errors = b.step(_request("r2", prompt), [1, 2, 3, 9])
    assert n == 3 * BS and [t.block_ids for t in meta.loads] == [[1, 2, 3]] and not errors
    for src, dst in [(5, 1), (6, 2), (7, 3)]:
        assert torch.equal(a.block(src), b.block(dst))
    assert b.sched.request_finished_all_groups(_request("r2", prompt), ([1, 2, 3, 9],)) == (False, None)


def test_at_least_one_token_is_left_to_compute(store_dir):
    a, b = Instance(store_dir), Instance(store_dir)
    prompt = range(12)  # exactly 3 blocks
    a.step(_request("r1", prompt), [0, 1, 2])
    n, _, _ = b.step(_request("r2", prompt), [3, 4, 5])
    assert n == 2 * BS


def test_prefix_stops_at_the_first_missing_block(store_dir):
    a = Instance(store_dir)
    a.step(_request("r1", range(17)), [0, 1, 2, 3, 4])
    req = _request("r2", range(17))
    a.worker.backend.target.delete([engine_key(req.block_hashes[1])], namespace=a.worker.backend.namespace)
    n, _ = a.sched.get_num_new_matched_tokens(req, 0)
    assert n == BS


def test_deployments_are_isolated(store_dir):
    a = Instance(store_dir)
    a.step(_request("r1", range(9)), [0, 1, 2])
    other = Instance(store_dir, model="other-model")
    assert other.sched.get_num_new_matched_tokens(_request("r2", range(9)), 0) == (0, False)
    assert other.sched.backend.namespace != a.sched.backend.namespace


def test_a_block_lost_after_the_hit_is_a_load_error(store_dir):
    a, b = Instance(store_dir, seed=3), Instance(store_dir, seed=4)
    prompt = range(9)
    a.step(_request("r1", prompt), [0, 1, 2])
    req = _request("r2", prompt)
    n, _ = b.sched.get_num_new_matched_tokens(req, 0)
    assert n == 2 * BS
    blocks = KVCacheBlocks((tuple(KVCacheBlock(i) for i in (10, 11, 12)),))
    b.sched.update_state_after_alloc(req, blocks, n)
    b.worker.backend.target.delete([engine_key(req.block_hashes[1])], namespace=b.worker.backend.namespace)
    out = SchedulerOutput([NewRequestData("r2", list(prompt), [], None, None, ([10, 11, 12],), 0, None, [])],
                          CachedRequestData([], [], [], [], []), {"r2": 1}, 1, {}, {}, set(), [])
    b.worker.bind_connector_metadata(pickle.loads(pickle.dumps(b.sched.build_connector_meta(out))))
    b.worker.start_load_kv(None)
    assert b.worker.get_block_ids_with_load_errors() == {11}
    assert b.worker.get_block_ids_with_load_errors() == set()  # reported once
    assert torch.equal(b.block(10), a.block(0))


def test_layerwise_loads_apply_a_layer_at_a_time(store_dir):
    a, b = Instance(store_dir, seed=5), Instance(store_dir, seed=6, layerwise=True)
    a.step(_request("r1", range(9)), [0, 1, 2])
    req = _request("r2", range(9))
    n, _ = b.sched.get_num_new_matched_tokens(req, 0)
    b.sched.update_state_after_alloc(req, KVCacheBlocks((tuple(KVCacheBlock(i) for i in (4, 5, 6)),)), n)
    out = SchedulerOutput([NewRequestData("r2", list(range(9)), [], None, None, ([4, 5, 6],), 0, None, [])],
                          CachedRequestData([], [], [], [], []), {"r2": 1}, 1, {}, {}, set(), [])
    b.worker.bind_connector_metadata(pickle.loads(pickle.dumps(b.sched.build_connector_meta(out))))
    before = b.kv["layer.1"][:, 4].clone()
    b.worker.start_load_kv(None)
    b.worker.wait_for_layer_load("layer.0")
    assert torch.equal(b.kv["layer.0"][:, 4], a.kv["layer.0"][:, 0])
    assert torch.equal(b.kv["layer.1"][:, 4], before)  # not yet
    b.worker.wait_for_layer_load("layer.2")
    assert torch.equal(b.kv["layer.1"][:, 4], a.kv["layer.1"][:, 0])


def test_through_a_daemon_and_a_stopped_daemon_is_a_miss(own_daemon):
    a, b = Instance(own_daemon.url, seed=7), Instance(own_daemon.url, seed=8)
    a.step(_request("r1", range(9)), [0, 1, 2])
    n, _, errors = b.step(_request("r2", range(9)), [3, 4, 5])
    assert n == 2 * BS and not errors and torch.equal(b.block(3), a.block(0))
    own_daemon.stop()
    c = Instance(own_daemon.url, seed=9)
    n, meta, errors = c.step(_request("r3", range(9)), [6, 7, 8])  # saves fail quietly too
    assert n == 0 and not errors


def test_a_hybrid_models_several_kv_cache_groups_turn_the_connector_off(store_dir):
    a = Instance(store_dir)
    a.step(_request("r1", range(9)), [0, 1, 2])
    hybrid = Instance(store_dir, groups=2)
    n, meta, errors = hybrid.step(_request("r2", range(9)), [3, 4, 5])
    assert n == 0 and not meta.loads and not meta.saves and not errors


def test_kv_caches_it_cannot_view_turn_the_connector_into_misses(store_dir):
    a = Instance(store_dir, seed=10)
    a.step(_request("r1", range(9)), [0, 1, 2])
    b = Instance(store_dir, seed=11)
    strided = {name: t.transpose(3, 4).contiguous().transpose(3, 4) for name, t in b.kv.items()}
    b.worker.register_kv_caches(strided)  # heads and dims swapped in memory: not viewable
    n, meta, errors = b.step(_request("r2", range(9)), [3, 4, 5])
    assert n == 2 * BS and errors == {3, 4}  # counted by the scheduler, reported as load errors
