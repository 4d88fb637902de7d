"""Helpers of the adapter tests: the engines' real modules (skipped with the reason when an
engine is not installed, unless TAIRSTORE_ENGINE_TESTS=1 makes that a failure), a daemon
started as users start it, and a host KV pool shaped like SGLang's."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import pytest

from tairstore.daemon.process import DaemonProcess

#: Set by CI after it installed the engines: a missing engine then fails instead of skipping.
REQUIRE_ENGINES = os.environ.get("TAIRSTORE_ENGINE_TESTS") == "1"


def need(module: str, install: str):
    """Import ``module`` or skip (fail under TAIRSTORE_ENGINE_TESTS=1) naming the install."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        reason = f"{module} is not importable ({exc}); install with: {install}"
        if REQUIRE_ENGINES:
            pytest.fail(reason + " (TAIRSTORE_ENGINE_TESTS=1 requires it)")
        pytest.skip(reason, allow_module_level=True)


def load_sglang():
    """SGLang's storage modules (``hicache_storage``, ``storage.backend_factory``), as installed
    with ``--no-deps``; raises ImportError when SGLang or torch is missing.

    ``import sglang`` pulls the whole server (triton and more); the storage modules only need
    torch, so a bare ``sglang`` package object stands in for the package's ``__init__``.
    """
    if "sglang" not in sys.modules:
        spec = importlib.util.find_spec("sglang")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("No module named 'sglang'")
        bare = types.ModuleType("sglang")
        bare.__path__ = list(spec.submodule_search_locations)
        sys.modules["sglang"] = bare
    return (importlib.import_module("sglang.srt.mem_cache.hicache_storage"),
            importlib.import_module("sglang.srt.mem_cache.storage.backend_factory"))


def load_sglang_file_backend() -> None:
    """Make SGLang's own ``file`` storage backend importable on CPU.

    Its evictor imports one helper (``human_readable_int``) from ``sglang.srt.utils.common``,
    a module that imports triton at the top. Where that import fails, the helper is compiled
    from that very file (picked out with ``ast``) into a stand-in ``sglang.srt.utils.common``,
    so the benchmark runs SGLang's real file backend code.
    """
    import ast

    load_sglang()
    try:
        importlib.import_module("sglang.srt.mem_cache.storage.file.lru_file_evictor")
        return
    except ImportError:
        pass
    root = list(sys.modules["sglang"].__path__)[0]
    utils_dir = os.path.join(root, "srt", "utils")
    path = os.path.join(utils_dir, "common.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "human_readable_int"]
    if not wanted:
        raise ImportError("sglang.srt.utils.common has no human_readable_int")
    utils = types.ModuleType("sglang.srt.utils")
    utils.__path__ = [utils_dir]
    common = types.ModuleType("sglang.srt.utils.common")
    exec(compile(ast.Module(body=wanted, type_ignores=[]), path, "exec"), common.__dict__)
    sys.modules.setdefault("sglang.srt.utils", utils)
    sys.modules["sglang.srt.utils.common"] = common
    importlib.import_module("sglang.srt.mem_cache.storage.file.lru_file_evictor")


def sglang_modules():
    """:func:`load_sglang`, or skip (fail under TAIRSTORE_ENGINE_TESTS=1) naming the install."""
    need("torch", "pip install torch==2.13.0")
    try:
        return load_sglang()
    except ImportError as exc:
        reason = f"SGLang's storage modules are not importable ({exc}); install with: pip install --no-deps sglang"
        if REQUIRE_ENGINES:
            pytest.fail(reason + " (TAIRSTORE_ENGINE_TESTS=1 requires it)")
        pytest.skip(reason, allow_module_level=True)


class Daemon(DaemonProcess):
    """``tairstore serve`` on free loopback ports (:class:`DaemonProcess`), started at once.

    ``url`` is the data address the daemon prints (``tcp://127.0.0.1:P``).
    """

    def __init__(self, data_dir: str, store: dict | None = None, extra: dict | None = None) -> None:
        super().__init__(data_dir, store=store, extra=extra)
        self.start()
        self.url = self.data_url


class HostPool:
    """A host KV pool with the geometry SGLang's ``MHATokenToKVPoolHost`` and
    ``MLATokenToKVPoolHost`` give it (``kv_buffer`` dims per layout, and the flat-page methods).

    SGLang's own pool classes need its compiled transfer kernels (tvm_ffi) even on CPU, so the
    tests build the same tensors here; the storage backend only reads this interface.
    """

    def __init__(self, *, layout: str, pages: int, page_size: int, layers: int, heads: int = 2,
                 head_dim: int = 8, mla: bool = False, dtype=None, seed: int = 0) -> None:
        import torch

        self.layout, self.page_size, self.layer_num = layout, page_size, layers
        self.dtype = dtype or torch.bfloat16
        self.size = pages * page_size
        self.mla = mla
        self.head_num, self.head_dim = (1, head_dim) if mla else (heads, head_dim)
        lead = () if mla else (2,)
        if layout == "page_first_direct":  # [page][layer][token]: a layout moved page by page
            body = (pages, layers, page_size)
        else:
            body = (layers, self.size) if layout == "layer_first" else (self.size, layers)
        g = torch.Generator().manual_seed(seed)
        shape = (*lead, *body, self.head_num, self.head_dim)
        # Random bytes, as finite values (random bits would hold NaNs, which never compare equal).
        self.kv_buffer = torch.randint(-100, 100, shape, generator=g, dtype=torch.int8).to(self.dtype)

    def page(self, index: int):
        """The page starting at token ``index`` (a view, all layers and components)."""
        sl = slice(index, index + self.page_size)
        if self.layout == "page_first_direct":
            sl = slice(index // self.page_size, index // self.page_size + 1)
            return self.kv_buffer[sl] if self.mla else self.kv_buffer[:, sl]
        if self.mla:
            return self.kv_buffer[:, sl] if self.layout == "layer_first" else self.kv_buffer[sl]
        return self.kv_buffer[:, :, sl] if self.layout == "layer_first" else self.kv_buffer[:, sl]

    def get_data_page(self, index: int, flat: bool = True):
        p = self.page(index)
        return p.flatten() if flat else p

    def get_dummy_flat_data_page(self):
        import torch

        return torch.zeros(self.page(0).numel(), dtype=self.dtype)

    def set_from_flat_data_page(self, index: int, data_page) -> None:
        p = self.page(index)
        p.copy_(data_page.reshape(p.shape))

    @property
    def page_bytes(self) -> int:
        """Bytes of one page (all layers and components)."""
        return self.page(0).numel() * self.dtype.itemsize
