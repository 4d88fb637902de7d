"""vLLM KV connector: ``TairStoreConnector``, a ``KVConnectorBase_V1`` (and ``SupportsHMA``).

Loaded by vLLM's own connector factory::

    --kv-transfer-config '{"kv_connector":"TairStoreConnector",
      "kv_connector_module_path":"tairstore.connectors.vllm","kv_role":"kv_both",
      "kv_connector_extra_config":{"tairstore_url":"tcp://127.0.0.1:7480"}}'

- Scheduler side: ``get_num_new_matched_tokens`` asks the store how many leading full blocks
  of the prompt (by vLLM's own block hashes) it holds; ``update_state_after_alloc`` records which
  GPU blocks those land in; ``build_connector_meta`` packs this step's loads and the blocks that
  became full (to save) into a picklable :class:`TairStoreConnectorMetadata`.
- Worker side: ``register_kv_caches`` views every layer's paged tensor through
  :class:`tairstore.tiers.gpu.PagedKV` (one store block per vLLM block, all layers);
  ``start_load_kv`` reads the step's blocks (complete before the forward by default; with
  ``"layerwise": true`` a layer at a time, ``wait_for_layer_load`` ordering each layer on
  CUDA); ``wait_for_save`` writes the step's full blocks; a block that could not be read after
  the scheduler counted it is reported by ``get_block_ids_with_load_errors`` so vLLM recomputes.

Loads and saves finish within the step, so ``get_finished`` reports nothing pending and the
connector works the same under vLLM's V2 model runner and the V1 mixin. vLLM is imported only
when a class here is first looked up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..tiers import gpu
from .common import DEFAULT_TIMEOUT_S, Backend, Deployment, engine_key, lazy_classes, open_backend

# The engine-derived classes are looked up lazily (module __getattr__), so they stay out of
# __all__: a star import must not import the engine.
__all__ = ["BlockTransfer", "deployment_for"]

log = logging.getLogger("tairstore.connectors.vllm")


@dataclass
class BlockTransfer:
    """One request's blocks to move this step: store keys and the GPU block ids, in order."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class _ReqState:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    saved: int = 0          # leading blocks already in the store (loaded or saved)
    load: BlockTransfer | None = None


def deployment_for(vllm_config: Any, *, tp_rank: int, pp_rank: int) -> Deployment:
    """The :class:`Deployment` of a vLLM config, as seen by one TP/PP rank."""
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    model_cfg = vllm_config.model_config
    cache = vllm_config.cache_config
    par = vllm_config.parallel_config
    model = str(extra.get("model") or getattr(model_cfg, "model", None) or "unknown")
    dtype = str(cache.cache_dtype)
    if dtype == "auto" and model_cfg is not None:
        dtype = str(model_cfg.dtype).replace("torch.", "")
    attn = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    mla = bool(getattr(model_cfg, "use_mla", False))
    return Deployment(engine="vllm", model=model, dtype=dtype, page_size=int(cache.block_size),
                      layout=f"blocks:{attn or 'default'}", tp_rank=tp_rank,
                      tp_size=int(par.tensor_parallel_size), pp_rank=pp_rank,
                      pp_size=int(par.pipeline_parallel_size), mla=mla,
                      extra=str(extra.get("namespace_salt", "")))


def _ranks() -> tuple[int, int]:
    try:
        from vllm.distributed import parallel_state as ps

        return ps.get_tensor_model_parallel_rank(), ps.get_pp_group().rank_in_group
    except (AssertionError, AttributeError, ImportError, RuntimeError):
        return 0, 0  # no distributed state: a single process


def _components(kv_layers: list[Any]) -> list[list[Any]]:
    """Per-component, per-layer ``[num_blocks, 1, bytes]`` views of vLLM's layer tensors.

    A layer is ``[2, num_blocks, ...]`` (K and V apart, FlashAttention's layout) or
    ``[num_blocks, ...]`` (MLA, or K and V inside each block): either way one vLLM block is
    one contiguous run per component, moved whole as one page.
    """
    first = kv_layers[0]
    split = first.dim() >= 3 and first.shape[0] == 2
    comps = [[t[0] for t in kv_layers], [t[1] for t in kv_layers]] if split else [list(kv_layers)]
    # view, not reshape: a tensor laid out with other strides must fail here, never be copied
    # (a load into a copy would vanish).
    return [[t.view(t.shape[0], 1, -1) for t in comp] for comp in comps]


class TairStoreConnectorImpl:
    """The behaviour of :class:`TairStoreConnector`; the class itself is built on vLLM's
    ``KVConnectorBase_V1`` and ``SupportsHMA`` when first looked up (see :func:`_build`)."""

    def _setup(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        url = extra.get("tairstore_url")
        from ..errors import InvalidArgumentError

        if not url:
            raise InvalidArgumentError(
                "kv_connector_extra_config needs tairstore_url: tcp://host:port or a directory")
        self.block_size = int(vllm_config.cache_config.block_size)
        self.layerwise = bool(extra.get("layerwise", False))
        self.is_scheduler = role.name == "SCHEDULER"
        # The scheduler has no rank of its own: it looks up rank 0's blocks; a rank that lacks
        # one reports a load error and vLLM recomputes from there.
        tp_rank, pp_rank = (0, 0) if self.is_scheduler else _ranks()
        ns = deployment_for(vllm_config, tp_rank=tp_rank, pp_rank=pp_rank).namespace()
        self.backend: Backend = open_backend(
            url, ns, timeout_s=float(extra.get("timeout_s", DEFAULT_TIMEOUT_S)),
            token=extra.get("token"), store_options=extra.get("store_options"))
        # One KV cache group (every layer indexed by the same block table) is what a block
        # here means. A hybrid model's several groups would need a block table per group: the
        # connector then stays out of the way (every lookup misses) rather than mix them up.
        groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
        self.enabled = len(groups) <= 1
        self._layers = set(groups[0].layer_names) if groups else None
        if not self.enabled:
            log.warning("tairstore: %d KV cache groups (a hybrid model); the connector is off", len(groups))
        self._reqs: dict[str, _ReqState] = {}
        self._layer_index: dict[str, int] = {}
        self._paged: gpu.PagedKV | None = None
        self._transfer: gpu.KVTransfer | None = None
        self._loads: list[gpu.LayerLoad] = []
        self._load_errors: set[int] = set()

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` the store can supply (whole blocks, at least
        one prompt token left to compute); loads are synchronous (False)."""
        if not self.enabled:
            return 0, False
        hashes = list(request.block_hashes)
        hit = self.backend.prefix_len([engine_key(h) for h in hashes])
        # vLLM must compute at least the last prompt token itself.
        hit = min(hit, (request.num_tokens - 1) // self.block_size)
        new = hit * self.block_size - num_computed_tokens
        state = self._reqs.setdefault(request.request_id, _ReqState(request))
        state.request = request
        return (new, False) if new > 0 else (0, False)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Remember which GPU blocks the external tokens land in."""
        state = self._reqs.setdefault(request.request_id, _ReqState(request))
        state.request = request
        if num_external_tokens <= 0:
            return
        block_ids = list(blocks.get_block_ids()[0])
        first = request.num_computed_tokens // self.block_size
        count = num_external_tokens // self.block_size
        hashes = list(request.block_hashes)[first:first + count]
        ids = block_ids[first:first + count]
        state.load = BlockTransfer(request.request_id, [engine_key(h) for h in hashes], ids)
        state.saved = first + count

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        """This step's loads and saves, as picklable metadata for the workers."""
        meta = _metadata_class()()
        if not self.enabled:
            return meta
        for new in scheduler_output.scheduled_new_reqs:
            state = self._reqs.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._plan(state, new.req_id, new.num_computed_tokens, scheduler_output, meta)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = set(getattr(cached, "resumed_req_ids", ()) or ())
        for i, req_id in enumerate(cached.req_ids):
            state = self._reqs.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                state.block_ids = (list(new_ids[0]) if req_id in resumed
                                   else state.block_ids + list(new_ids[0]))
            self._plan(state, req_id, cached.num_computed_tokens[i], scheduler_output, meta)
        return meta

    def _plan(self, state: _ReqState, req_id: str, computed: int, out: Any, meta: Any) -> None:
        if state.load is not None:
            meta.loads.append(state.load)
            state.load = None
        done = computed + out.num_scheduled_tokens.get(req_id, 0)
        hashes = list(state.request.block_hashes)
        full = min(done // self.block_size, len(hashes), len(state.block_ids))
        if full > state.saved:
            rng = range(state.saved, full)
            meta.saves.append(BlockTransfer(req_id, [engine_key(hashes[b]) for b in rng],
                                            [state.block_ids[b] for b in rng]))
            state.saved = full

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, None]:
        """Saves finish within their step: the blocks can be freed now."""
        self._reqs.pop(request.request_id, None)
        return False, None

    def request_finished_all_groups(self, request: Any, block_ids: tuple) -> tuple[bool, None]:
        """The hybrid KV cache manager's form of :meth:`request_finished`."""
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """View every layer's paged tensor; an unsupported layout disables the connector (all
        misses) instead of failing the engine."""
        if self._layers is not None:
            kv_caches = {name: t for name, t in kv_caches.items() if name in self._layers}
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        if not self.enabled or not kv_caches:
            return
        try:
            self._paged = gpu.PagedKV.from_blocks(_components(list(kv_caches.values())))
            self._transfer = gpu.KVTransfer(self._paged)
        except Exception as exc:  # noqa: BLE001 - any layout we cannot view means: no connector
            log.warning("tairstore: cannot use these KV caches (%s); every lookup will miss", exc)
            self._paged = self._transfer = None

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Read this step's blocks into the paged KV tensors."""
        meta = self._get_connector_metadata()
        if self._transfer is None:
            for t in meta.loads:
                self._load_errors.update(t.block_ids)
            return
        for t in meta.loads:
            load = self.backend.load_pages(self._transfer, t.keys, t.block_ids)
            self._load_errors.update(b for b, ok in zip(t.block_ids, load.ok) if not ok)
            if self.layerwise:
                self._loads.append(load)
            else:
                load.wait()

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Order layer ``layer_name`` of this step's loads before its attention."""
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        for load in self._loads:
            load.wait_layer(layer)
        if layer == len(self._layer_index) - 1:
            self._loads = []

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        """Saves go whole-block in :meth:`wait_for_save`, after the last layer is written."""

    def wait_for_save(self) -> None:
        """Write the blocks that became full this step."""
        for load in self._loads:  # a runner that skipped per-layer waits still gets them all
            load.wait()
        self._loads = []
        if self._transfer is None or not self.has_connector_metadata():
            return
        for t in self._get_connector_metadata().saves:
            self.backend.save_pages(self._transfer, t.keys, t.block_ids)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[None, None]:
        """Nothing is in flight between steps."""
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks the scheduler counted as hits that could not be read; then forgotten."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        """Close the daemon connection."""
        self.backend.close()


def _metadata_class() -> type:
    return __getattr__("TairStoreConnectorMetadata")


def _build_metadata() -> type:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

    @dataclass
    class TairStoreConnectorMetadata(KVConnectorMetadata):
        """One step's block loads and saves; crosses to the workers pickled."""

        loads: list = field(default_factory=list)
        saves: list = field(default_factory=list)

    # Pickle finds it under this module's name (through __getattr__ below).
    TairStoreConnectorMetadata.__module__ = __name__
    TairStoreConnectorMetadata.__qualname__ = "TairStoreConnectorMetadata"
    return TairStoreConnectorMetadata


def _build() -> type:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, SupportsHMA

    def __init__(self: Any, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        KVConnectorBase_V1.__init__(self, vllm_config, role, kv_cache_config)
        self._setup(vllm_config, role, kv_cache_config)

    return type("TairStoreConnector", (TairStoreConnectorImpl, KVConnectorBase_V1, SupportsHMA), {
        "__module__": __name__,
        "__doc__": "vLLM KV connector on tairstore (see this module's docstring).",
        "__init__": __init__,
    })


# vLLM is imported on first use of a class, not when this module is imported.
__getattr__ = lazy_classes(__name__, {"TairStoreConnector": _build,
                                      "TairStoreConnectorMetadata": _build_metadata})
