"""GPU hooks: copy pages between an engine's paged KV tensors and store blocks.

An engine keeps its KV cache as paged tensors; the store keeps one block per page. This module
moves pages between the two through host staging buffers, for any dtype (tensors are moved as
their bytes), MHA (K and V components) or MLA (one latent component), in two layouts:

- ``layer_first``: each component is a tensor ``[L, T, ...]`` or a list of ``L`` tensors
  ``[T, ...]`` (also ``[num_blocks, block_size, ...]``, as vLLM keeps one tensor per layer);
- ``page_first``: each component is a tensor ``[T, L, ...]`` (SGLang's host ``page_first``);

where ``T`` counts token slots and a page is ``page_size`` consecutive slots. A block holds one
page of every layer and component: component after component (K, V), each in the engine's own
page order (``[layer][token][...]`` for layer_first, ``[token][layer][...]`` for page_first), so
a page_first page moves as plain memory copies; a load can still be applied layer by layer
while an engine computes.

:class:`KVTransfer` does the copies. On CUDA it gathers and scatters on a side stream, stages
through pinned host memory, and records one event per layer so that ``wait_layer(l)`` blocks
the engine's stream only until layer ``l`` is in place. Without CUDA the same code runs on CPU
tensors, and a load applies layer ``l`` when ``wait_layer(l)`` asks for it.

torch is optional: without it this module still imports, :func:`available` is False and
:func:`unavailable_reason` says why; building a :class:`PagedKV` then raises
:class:`~tairstore.errors.InvalidArgumentError`.

Staging memory comes from a :class:`StagingPool` of this module (a few reusable, pinned when
CUDA is present, slabs): the store's DRAM arena is internal to the engine, and a copy into the
store goes through its public ``write``/``get_into`` calls anyway.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InvalidArgumentError

try:  # torch is an optional dependency (``pip install tairstore[torch]``)
    import torch
except ImportError as _exc:  # pragma: no cover - exercised where torch is absent
    torch = None  # type: ignore[assignment]
    _IMPORT_ERROR: str | None = f"torch is not installed ({_exc})"
else:
    _IMPORT_ERROR = None

__all__ = ["available", "cuda_available", "unavailable_reason", "register_host", "unregister_host",
           "host_registered", "PagedKV", "StagingPool", "KVTransfer", "LayerLoad", "LAYOUTS"]

log = logging.getLogger(__name__)

LAYOUTS = ("layer_first", "page_first")
#: Default staging slab: 64 MiB holds 8 pages of Llama-3.1-8B (8 MiB each at 64 tokens a page).
DEFAULT_SLAB_BYTES = 64 << 20
DEFAULT_SLABS = 2
#: On CUDA, blocks at least this large that a store hands out (``fetch``) are copied to the
#: device straight from the store's memory, one copy per block; smaller ones go through a pinned
#: staging slab (one copy on the host per block, one to the device per batch).
DIRECT_MIN_BYTES = 256 << 10
#: Element types copies move, widest first (see PagedKV.word).
WORDS = tuple(getattr(torch, n) for n in ("int64", "int32", "int16", "uint8")) if torch is not None else ()


def available() -> bool:
    """True when torch is importable, so paged KV tensors can be copied."""
    return torch is not None


def cuda_available() -> bool:
    """True when torch sees a CUDA device (side streams and pinned staging are used)."""
    return torch is not None and torch.cuda.is_available()


def unavailable_reason() -> str | None:
    """Why the GPU path cannot be used here, or None when it can."""
    return _IMPORT_ERROR


_registered: dict[int, int] = {}  # start address -> bytes of host memory registered with CUDA
_registered_lock = threading.Lock()


def _address(buf: Any) -> tuple[int, int]:
    arr = np.frombuffer(buf, dtype=np.uint8)
    return arr.ctypes.data, arr.nbytes


def register_host(memory: Any) -> bool:
    """Page-lock ``memory`` for CUDA (``cudaHostRegister``): a host buffer such as an embedded
    store's DRAM arena (:meth:`tairstore.Store.host_memory`), so that copies from views into it
    run as DMA at the link's speed and asynchronously. True once it is registered (now or
    before); False without CUDA or when CUDA refuses (loads then go through pinned staging).
    :func:`unregister_host` must undo it before the memory is unmapped."""
    if not cuda_available() or memory is None:
        return False
    start, nbytes = _address(memory)
    if nbytes == 0:
        return False
    with _registered_lock:
        if _registered.get(start) == nbytes:
            return True
        rc = int(torch.cuda.cudart().cudaHostRegister(start, nbytes, 0))
        if rc != 0:
            _clear_cuda_error()
            log.warning("cudaHostRegister of %d bytes refused (error %d); loads go through "
                        "pinned staging", nbytes, rc)
            return False
        _registered[start] = nbytes
    return True


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a refused call: torch reads it after its next
    kernel launch and would raise it there. A tiny launch here reads (and resets) it."""
    try:
        torch.zeros(1, device="cuda").add_(1)
    except RuntimeError:
        pass


def unregister_host(memory: Any) -> None:
    """Undo :func:`register_host` for ``memory`` (nothing when it was not registered)."""
    if memory is None:
        return
    start, nbytes = _address(memory)
    with _registered_lock:
        if _registered.get(start) != nbytes:
            return
        del _registered[start]
        torch.cuda.synchronize()  # no copy may still be reading it
        torch.cuda.cudart().cudaHostUnregister(start)


def host_registered(buf: Any) -> bool:
    """Whether ``buf`` lies inside memory registered by :func:`register_host`."""
    if not _registered:
        return False
    start, nbytes = _address(buf)
    with _registered_lock:
        return any(lo <= start and start + nbytes <= lo + n for lo, n in _registered.items())


def _require_torch() -> None:
    if torch is None:
        raise InvalidArgumentError(f"the GPU hooks need torch: {_IMPORT_ERROR}")


def _as_bytes(t: "torch.Tensor") -> "torch.Tensor":
    """The tensor's bytes as uint8 with the last dimension widened by the item size."""
    if t.dim() == 0:
        raise InvalidArgumentError("a KV tensor must have at least one dimension")
    if t.stride(-1) != 1:
        raise InvalidArgumentError("a KV tensor's last dimension must be contiguous")
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


class PagedKV:
    """An engine's paged KV cache, seen as ``components x layers x pages``.

    Args:
        components: ``[K, V]`` for MHA or ``[KV]`` for MLA; each a tensor or (layer_first) a
            list of per-layer tensors, as described in the module docstring.
        layout: ``"layer_first"`` or ``"page_first"``.
        page_size: token slots per page.

    Raises:
        InvalidArgumentError: torch missing, unknown layout, shapes that disagree, or a slot
            count that is not a multiple of ``page_size``.
    """

    def __init__(self, components: Sequence[Any], layout: str, page_size: int) -> None:
        _require_torch()
        if layout not in LAYOUTS:
            raise InvalidArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if not isinstance(page_size, int) or page_size < 1:
            raise InvalidArgumentError(f"page_size must be a positive int, got {page_size!r}")
        if not components:
            raise InvalidArgumentError("a PagedKV needs at least one component (K, V or MLA latent)")
        self.layout = layout
        self.page_size = page_size
        # views[c][l]: a [num_pages, page_size, row_bytes] uint8 view (possibly strided).
        views = [self._layer_views(c) for c in components]
        first = views[0][0]
        self.num_layers = len(views[0])
        self.num_pages = first.shape[0]
        self.device = first.device
        for comp in views:
            if len(comp) != self.num_layers:
                raise InvalidArgumentError("components have different layer counts")
            for v in comp:
                if v.shape[0] != self.num_pages or v.device != self.device:
                    raise InvalidArgumentError("components disagree on page count or device")
        #: bytes of one page of one layer of one component, per component
        self.page_bytes = [comp[0].shape[1] * comp[0].shape[2] for comp in views]
        #: bytes of one layer (all components) of a page
        self.layer_bytes = sum(self.page_bytes)
        #: bytes of one block (one page, every layer and component)
        self.block_bytes = self.layer_bytes * self.num_layers
        # Copies move the widest machine words that divide every row: torch copies uint8
        # tensors with strides element by element, an order of magnitude slower.
        self.word, self.views = self._word_views(views)
        self._full = [self._all_layers(c) for c in components]
        ws = self.word.itemsize
        # Component c's part of a block starts at this word and holds L pages' worth of words.
        self._offsets = [sum(self.page_bytes[:c]) * self.num_layers // ws for c in range(len(views))]
        self._words = [n * self.num_layers // ws for n in self.page_bytes]

    @staticmethod
    def _word_views(views: list) -> tuple[Any, list]:
        for word in WORDS:
            if any(c[0].shape[2] % word.itemsize for c in views):
                continue
            try:  # an odd storage offset cannot be viewed as wider words
                return word, [[v.view(word) for v in comp] for comp in views]
            except RuntimeError:
                continue
        return torch.uint8, views  # pragma: no cover - uint8 always views

    def _layer_views(self, comp: Any) -> list["torch.Tensor"]:
        ps = self.page_size
        if self.layout == "layer_first":
            layers = list(comp) if not isinstance(comp, torch.Tensor) else list(comp.unbind(0))
            out = []
            for t in layers:
                if not isinstance(t, torch.Tensor) or t.dim() < 1:
                    raise InvalidArgumentError("layer_first components are [L, T, ...] tensors or lists of [T, ...]")
                b = _as_bytes(t)
                if not b.is_contiguous():
                    raise InvalidArgumentError("each layer's KV tensor must be contiguous")
                flat = b.reshape(-1)
                per_slot = flat.numel() // t.shape[0]
                out.append(self._paged(flat, per_slot))
            return out
        if not isinstance(comp, torch.Tensor) or comp.dim() < 2:
            raise InvalidArgumentError("page_first components are [T, L, ...] tensors")
        b = _as_bytes(comp)
        if not b.is_contiguous():
            raise InvalidArgumentError("a page_first KV tensor must be contiguous")
        slots, layers = comp.shape[0], comp.shape[1]
        if slots % ps:
            raise InvalidArgumentError(f"{slots} token slots is not a multiple of page_size {ps}")
        row = b.numel() // (slots * layers)
        paged = b.reshape(slots // ps, ps, layers, row)
        return [paged[:, :, layer, :] for layer in range(layers)]

    def _paged(self, flat: "torch.Tensor", per_slot: int) -> "torch.Tensor":
        slots = flat.numel() // per_slot
        if slots % self.page_size:
            raise InvalidArgumentError(
                f"{slots} token slots is not a multiple of page_size {self.page_size}")
        return flat.reshape(slots // self.page_size, self.page_size, per_slot)

    @classmethod
    def from_blocks(cls, layers: Sequence[Sequence["torch.Tensor"]]) -> "PagedKV":
        """Per-layer tensors shaped ``[num_blocks, block_size, ...]`` per component (vLLM's
        layout): ``layers[c][l]``; the page size is ``block_size``."""
        _require_torch()
        if not layers or not layers[0]:
            raise InvalidArgumentError("from_blocks needs at least one component with one layer")
        first = layers[0][0]
        if first.dim() < 2:
            raise InvalidArgumentError("block tensors are [num_blocks, block_size, ...]")
        flat = [[t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]) if t.is_contiguous() else None
                 for t in comp] for comp in layers]
        if any(t is None for comp in flat for t in comp):
            raise InvalidArgumentError("each layer's KV tensor must be contiguous")
        return cls(flat, "layer_first", int(first.shape[1]))

    def _all_layers(self, comp: Any) -> "torch.Tensor | None":
        """A component as one ``[P, L, page_size, W]`` word view, when it is one tensor."""
        if not isinstance(comp, torch.Tensor) or not comp.is_contiguous():
            return None  # per-layer copies then (a reshape here could silently copy)
        try:
            b = _as_bytes(comp).view(self.word)
        except RuntimeError:
            return None
        if self.layout == "page_first":
            slots, layers = comp.shape[0], comp.shape[1]
            return b.reshape(slots // self.page_size, self.page_size, layers, -1).transpose(1, 2)
        layers, slots = comp.shape[0], comp.shape[1]
        return b.reshape(layers, slots // self.page_size, self.page_size, -1).transpose(0, 1)

    # -- copies ----------------------------------------------------------------------------
    def _index(self, pages: Any) -> list[int]:
        idx = [int(p) for p in (pages.reshape(-1).tolist() if hasattr(pages, "tolist") else pages)]
        if any(not 0 <= p < self.num_pages for p in idx):
            raise InvalidArgumentError(f"page index out of range [0, {self.num_pages})")
        return idx

    def blocks_view(self, staging: "torch.Tensor", n: int) -> "torch.Tensor":
        """``staging`` (uint8, at least ``n * block_bytes``) as ``[n, block_bytes]``."""
        return staging[: n * self.block_bytes].view(n, self.block_bytes)

    def _region(self, blocks: "torch.Tensor", i: int, c: int, layer: int | None) -> "torch.Tensor":
        """Component ``c`` of block ``i`` as ``[L, page_size, W]`` (or layer ``layer`` of it)."""
        off, n = self._offsets[c], self._words[c]
        part = blocks[i, off:off + n]
        if self.layout == "page_first":  # stored [token][layer][...]: the engine's page as is
            part = part.view(self.page_size, self.num_layers, -1).transpose(0, 1)
        else:
            part = part.view(self.num_layers, self.page_size, -1)
        return part if layer is None else part[layer]

    def _words_of(self, staging: "torch.Tensor", n: int) -> "torch.Tensor":
        return self.blocks_view(staging, n).view(self.word)

    def gather(self, pages: Any, out: "torch.Tensor") -> None:
        """Copy ``pages`` into ``out`` (uint8 on this device), one block after another."""
        self._copy_pages(pages, out, to_blocks=True)

    def scatter(self, pages: Any, src: "torch.Tensor") -> None:
        """Copy every layer of the blocks in ``src`` into ``pages``."""
        self._copy_pages(pages, src, to_blocks=False)

    def scatter_layer(self, layer: int, pages: Any, src: "torch.Tensor",
                      where: "torch.Tensor | None" = None) -> None:
        """Copy layer ``layer`` of the blocks in ``src`` into ``pages``. ``where``: the same
        pages as a long tensor on this device (made once for a whole load); with it, each
        component's layer moves in one indexed copy for all pages (one kernel, not one per
        page), which needs distinct pages."""
        idx = self._index(pages)
        blocks = self._words_of(src, len(idx))
        if where is not None and len(idx) > 1:
            for c, comp in enumerate(self.views):
                comp[layer].index_copy_(0, where, self._layer_of_all(blocks, c, layer))
            return
        for i, p in enumerate(idx):
            for c, comp in enumerate(self.views):
                comp[layer][p].copy_(self._region(blocks, i, c, layer))

    def page_index(self, pages: Sequence[int]) -> "torch.Tensor | None":
        """``pages`` as a long tensor on this device for :meth:`scatter_layer`, or None when
        a page repeats (an indexed copy would leave which copy wins undefined)."""
        idx = self._index(pages)
        if len(set(idx)) != len(idx):
            return None
        return torch.tensor(idx, dtype=torch.long).to(self.device)

    def _layer_of_all(self, blocks: "torch.Tensor", c: int, layer: int) -> "torch.Tensor":
        """Layer ``layer`` of component ``c`` of every block: ``[n, page_size, W]`` (a view)."""
        off, n = self._offsets[c], self._words[c]
        part = blocks[:, off:off + n]
        if self.layout == "page_first":
            return part.view(blocks.shape[0], self.page_size, self.num_layers, -1)[:, :, layer]
        return part.view(blocks.shape[0], self.num_layers, self.page_size, -1)[:, layer]

    def _copy_pages(self, pages: Any, staging: "torch.Tensor", *, to_blocks: bool) -> None:
        idx = self._index(pages)
        blocks = self._words_of(staging, len(idx))
        for i, p in enumerate(idx):
            for c, full in enumerate(self._full):
                # One copy per page and component when the component is one tensor; per layer
                # when the engine keeps a tensor per layer.
                pairs = ([(self._region(blocks, i, c, None), full[p])] if full is not None else
                         [(self._region(blocks, i, c, layer), self.views[c][layer][p])
                          for layer in range(self.num_layers)])
                for block_part, kv_part in pairs:
                    if to_blocks:
                        block_part.copy_(kv_part)
                    else:
                        kv_part.copy_(block_part)


class StagingPool:
    """Reusable host staging slabs (pinned when CUDA is present).

    ``acquire(nbytes)`` hands out a free slab (or, when all are taken or it is too small, a
    fresh buffer) as a context manager yielding a uint8 tensor of ``nbytes``.
    """

    def __init__(self, slab_bytes: int = DEFAULT_SLAB_BYTES, slabs: int = DEFAULT_SLABS) -> None:
        _require_torch()
        self.slab_bytes = slab_bytes
        self.pinned = cuda_available()
        self._free = [self._alloc(slab_bytes) for _ in range(slabs)]
        self._lock = threading.Lock()

    def _alloc(self, nbytes: int) -> "torch.Tensor":
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def acquire(self, nbytes: int) -> "_Lease":
        """A staging buffer of ``nbytes`` for the duration of a ``with`` block."""
        slab = None
        if nbytes <= self.slab_bytes:
            with self._lock:
                slab = self._free.pop() if self._free else None
        return _Lease(self, slab, nbytes)

    def _release(self, slab: "torch.Tensor") -> None:
        with self._lock:
            self._free.append(slab)


class _Lease:
    def __init__(self, pool: StagingPool, slab: "torch.Tensor | None", nbytes: int) -> None:
        self.pool, self.slab, self.nbytes = pool, slab, nbytes

    def __enter__(self) -> "torch.Tensor":
        buf = self.slab if self.slab is not None else self.pool._alloc(self.nbytes)
        return buf[: self.nbytes]

    def __exit__(self, *exc: object) -> None:
        if self.slab is not None:
            self.pool._release(self.slab)


class _Hold:
    """Keeps the store's views (and so their blocks, which a store never reuses while a view
    is alive) until a load's last copy has run; released like a staging lease."""

    def __init__(self, views: list) -> None:
        self.views = views

    def __exit__(self, *exc: object) -> None:
        self.views = []


#: ``read(i, buffer) -> bool``: fill a staging buffer with block ``i``.
ReadFn = Callable[[int, memoryview], bool]
#: ``fetch(i) -> buffer | None``: block ``i`` as a buffer the store hands out, or None.
FetchFn = Callable[[int], Any]
#: ``write(indices, fill) -> list[bool]``: store blocks ``indices`` (positions in the page list),
#: ``fill(i)`` giving the bytes of block ``i``.
WriteFn = Callable[[list[int], Callable[[int], memoryview]], list[bool]]


def _host_bytes(t: "torch.Tensor") -> memoryview:
    return memoryview(t.numpy()).cast("B")


def _view_tensor(buf: Any) -> "torch.Tensor":
    """A (possibly read-only) buffer as a uint8 tensor without a copy; only ever read from."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns on read-only buffers
        return torch.frombuffer(buf, dtype=torch.uint8)


class LayerLoad:
    """A load in progress: ``ok[i]`` says whether block ``i`` arrived; ``wait_layer(l)``
    returns once layer ``l`` of every arrived block is in the KV tensors (on CUDA: once the
    engine's current stream is ordered after it)."""

    def __init__(self, kv: PagedKV, ok: list[bool], parts: list[tuple[list[int], "torch.Tensor"]],
                 events: list | None = None, lease: Any = None) -> None:
        self.kv, self.ok = kv, ok
        self._parts, self._events, self._lease = parts, events, lease
        self._done = 0

    def wait_layer(self, layer: int) -> None:
        """Make layer ``layer`` (and every layer before it) ready."""
        if not 0 <= layer < self.kv.num_layers:
            raise InvalidArgumentError(f"layer {layer} out of range [0, {self.kv.num_layers})")
        if self._events is not None:
            torch.cuda.current_stream(self.kv.device).wait_event(self._events[layer])
        elif self._done == 0 and layer == self.kv.num_layers - 1:
            # Everything at once: whole-page copies rather than one per layer.
            for pages, blocks in self._parts:
                self.kv.scatter(pages, blocks)
            self._done = self.kv.num_layers
        else:
            while self._done <= layer:
                for pages, blocks in self._parts:
                    self.kv.scatter_layer(self._done, pages, blocks)
                self._done += 1
        if layer == self.kv.num_layers - 1:
            self._finish()

    def _finish(self) -> None:
        if self._events is not None:
            self._events[-1].synchronize()  # the staging buffer is read until the last copy
        self._parts = []
        if self._lease is not None:
            self._lease.__exit__(None, None, None)
            self._lease = None

    def wait(self) -> list[bool]:
        """Finish every layer; the per-block success list."""
        self.wait_layer(self.kv.num_layers - 1)
        return self.ok

    def __del__(self) -> None:
        # A load dropped unfinished still holds its staging slab or the store's views until
        # its last copy has run: neither may be reused while the device reads it.
        try:
            if self._lease is not None:
                self._finish()
        except Exception:  # noqa: BLE001 - nothing may escape a finaliser
            pass


class KVTransfer:
    """Moves pages between a :class:`PagedKV` and a store through staging buffers."""

    def __init__(self, kv: PagedKV, staging: StagingPool | None = None) -> None:
        self.kv = kv
        self.staging = staging or StagingPool(max(kv.block_bytes, DEFAULT_SLAB_BYTES), DEFAULT_SLABS)
        self.cuda = kv.device.type == "cuda"
        self.stream = torch.cuda.Stream(kv.device) if self.cuda else None

    def save(self, pages: Sequence[int], write: WriteFn) -> list[bool]:
        """Gather ``pages`` and hand them to ``write`` as blocks; per page, whether stored."""
        pages = list(pages)
        kv = self.kv
        per_chunk = max(1, self.staging.slab_bytes // kv.block_bytes)
        result: list[bool] = []
        for start in range(0, len(pages), per_chunk):
            chunk = pages[start:start + per_chunk]
            with self.staging.acquire(len(chunk) * kv.block_bytes) as host:
                cache: dict[int, memoryview] = {}

                def fill(i: int, _start: int = start, _chunk: list = chunk, _host: Any = host,
                         _cache: dict = cache) -> memoryview:
                    # Gather lazily, once for the whole chunk, and only if some page is new.
                    if not _cache:
                        self._gather_to_host(_chunk, [_host])
                        _cache[0] = _host_bytes(_host)
                    j = i - _start
                    return _cache[0][j * kv.block_bytes:(j + 1) * kv.block_bytes]

                result.extend(write(list(range(start, start + len(chunk))), fill))
        return result

    def save_into(self, pages: Sequence[int], bufs: Sequence[Any]) -> None:
        """Copy page ``pages[j]`` into the writable buffer ``bufs[j]`` of ``block_bytes`` (a
        store's write views): on the CPU gathered straight into them; on CUDA gathered on the
        device, then copied out block by block (a DMA where the memory is registered,
        :func:`register_host`). Returns once every byte is in place."""
        kv = self.kv
        pages = kv._index(pages)
        if len(bufs) != len(pages):
            raise InvalidArgumentError(f"{len(pages)} pages but {len(bufs)} buffers")
        if any(memoryview(buf).readonly for buf in bufs):
            raise InvalidArgumentError("save_into needs writable buffers")
        outs = [torch.frombuffer(buf, dtype=torch.uint8) for buf in bufs]
        if any(out.numel() != kv.block_bytes for out in outs):
            raise InvalidArgumentError(f"every buffer must hold one block of {kv.block_bytes} bytes")
        if pages:
            self._gather_to_host(pages, outs)

    def _gather_to_host(self, pages: list[int], outs: list["torch.Tensor"]) -> None:
        """Gather ``pages`` into the host tensors ``outs``, block after block (each holds a
        whole number of blocks); on CUDA on the side stream, returning once they are there."""
        kv, n = self.kv, self.kv.block_bytes
        if not self.cuda:
            start = 0
            for out in outs:
                count = out.numel() // n
                kv.gather(pages[start:start + count], out)
                start += count
            return
        dev = torch.empty(len(pages) * n, dtype=torch.uint8, device=kv.device)
        self.stream.wait_stream(torch.cuda.current_stream(kv.device))
        with torch.cuda.stream(self.stream):
            kv.gather(pages, dev)
            start = 0
            for out in outs:
                out.copy_(dev[start:start + out.numel()], non_blocking=True)
                start += out.numel()
        self.stream.synchronize()

    def load(self, pages: Sequence[int], read: ReadFn | None = None,
             fetch: FetchFn | None = None) -> LayerLoad:
        """Read the blocks for ``pages`` and start applying them, layer by layer.

        ``fetch(i)`` returns block ``i`` as a buffer the store hands out (or None); into CPU
        tensors the pages are then copied straight from those buffers, with no staging copy.
        Otherwise ``read(i, buf)`` fills a staging buffer (pinned on CUDA). Blocks that could
        not be read are skipped (``ok[i]`` False) and their pages left untouched.
        """
        kv = self.kv
        pages = kv._index(pages)
        ok = [False] * len(pages)
        if not pages:
            return LayerLoad(kv, ok, [])
        if fetch is not None and not self.cuda:
            parts = []
            for i, page in enumerate(pages):
                buf = fetch(i)
                if buf is not None and memoryview(buf).nbytes == kv.block_bytes:
                    ok[i] = True
                    parts.append(([page], _view_tensor(buf)))
            return LayerLoad(kv, ok, parts)
        if fetch is not None and self.cuda and kv.block_bytes >= DIRECT_MIN_BYTES:
            return self._load_direct(pages, ok, fetch)
        if read is None:
            raise InvalidArgumentError("load needs read (or fetch, for CPU tensors and large blocks)")
        per_chunk = max(1, self.staging.slab_bytes // kv.block_bytes)
        if not self.cuda and len(pages) > per_chunk:
            # More than a staging slab: apply slab-sized chunks one after another (every layer
            # at once) rather than allocate a buffer for the whole batch.
            for start in range(0, len(pages), per_chunk):
                part = self.load(pages[start:start + per_chunk],
                                 read=lambda i, buf, s=start: read(s + i, buf))
                ok[start:start + len(part.ok)] = part.wait()
            return LayerLoad(kv, ok, [])
        lease = self.staging.acquire(len(pages) * kv.block_bytes)
        host = lease.__enter__()
        mv = _host_bytes(host)
        for i in range(len(pages)):
            ok[i] = bool(read(i, mv[i * kv.block_bytes:(i + 1) * kv.block_bytes]))
        good = [p for p, o in zip(pages, ok) if o]
        if len(good) != len(pages):
            # Move the blocks that arrived to the front, in order, so block j is good[j].
            rows = host.view(len(pages), kv.block_bytes)
            for j, i in enumerate(i for i, o in enumerate(ok) if o):
                if j != i:
                    rows[j].copy_(rows[i])
        if not good:
            lease.__exit__(None, None, None)
            return LayerLoad(kv, ok, [])
        if not self.cuda:
            return LayerLoad(kv, ok, [(good, host)], lease=lease)
        return self._to_device(good, ok, lambda dev: dev.copy_(host[: len(good) * kv.block_bytes],
                                                                   non_blocking=True), lease)

    def _load_direct(self, pages: list[int], ok: list[bool], fetch: FetchFn) -> LayerLoad:
        """CUDA load of blocks the store hands out: each copied to the device straight from
        the store's memory (DMA where it is registered, :func:`register_host`; a synchronous
        staged copy otherwise). The views are held until the last copy has run."""
        kv = self.kv
        good, views = [], []
        for i, page in enumerate(pages):
            buf = fetch(i)
            if buf is not None and memoryview(buf).nbytes == kv.block_bytes:
                ok[i] = True
                good.append(page)
                views.append(buf)
        if not good:
            return LayerLoad(kv, ok, [])
        n = kv.block_bytes

        def copy_in(dev: "torch.Tensor") -> None:
            for j, buf in enumerate(views):
                dev[j * n:(j + 1) * n].copy_(_view_tensor(buf), non_blocking=True)

        return self._to_device(good, ok, copy_in, _Hold(views))

    def _to_device(self, good: list[int], ok: list[bool], copy_in: Callable[["torch.Tensor"], None],
                   lease: Any) -> LayerLoad:
        """On the side stream: ``copy_in`` fills a device buffer with the blocks of ``good``,
        then each layer is scattered into the KV tensors and marked by an event."""
        kv = self.kv
        events = []
        self.stream.wait_stream(torch.cuda.current_stream(kv.device))
        with torch.cuda.stream(self.stream):
            dev = torch.empty(len(good) * kv.block_bytes, dtype=torch.uint8, device=kv.device)
            copy_in(dev)
            where = kv.page_index(good)
            for layer in range(kv.num_layers):
                kv.scatter_layer(layer, good, dev, where)
                ev = torch.cuda.Event()
                ev.record(self.stream)
                events.append(ev)
        return LayerLoad(kv, ok, [(good, dev)], events, lease)
