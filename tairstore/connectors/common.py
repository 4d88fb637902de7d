"""What every engine adapter shares: where the store is, which namespace a deployment's pages
live in, how an engine's key becomes a tairstore key, and a backend on which failure is a miss.

- :func:`open_backend` turns a ``tairstore_url`` into a :class:`Backend`: ``tcp://host:port``
  (or ``tairstore://host:port``) reaches a daemon through :class:`tairstore.Client`; anything
  else is a directory holding an embedded :class:`tairstore.Store`.
- :class:`Deployment` names what makes KV bytes incompatible (model, dtype, page size, layout,
  tensor/pipeline-parallel rank, MLA or not); its :meth:`Deployment.namespace` is equal for two
  replicas of one deployment and different for any two deployments that cannot share pages.
- :func:`engine_key` maps an engine's page or block hash (hex str, bytes or int) to a key.
- :class:`Backend` calls the Store or Client and turns every failure — a daemon that is down,
  a deadline passed, :class:`tairstore.CapacityError`, a block of the wrong size — into a miss
  (``False`` / 0), logged once per kind, so an engine recomputes instead of failing a request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import ClosedError, InvalidArgumentError, StoreError

__all__ = ["Backend", "Deployment", "engine_key", "open_backend", "is_daemon_url", "BackendStats",
           "lazy_classes"]

log = logging.getLogger("tairstore.connectors")

#: Deadline of one daemon request: past it the page is a miss and the engine recomputes.
DEFAULT_TIMEOUT_S = 5.0
#: After a daemon failure, calls skip the daemon for this long instead of each waiting for its
#: own connect timeout (an engine's prefetch thread would otherwise stall on every page).
DEFAULT_RETRY_AFTER_S = 1.0
#: Embedded-store defaults for an adapter: a cache, so "batch" durability (fsync every few ms)
#: is enough, and writes are acknowledged from DRAM (write-back: the engine backs pages up in
#: the background, and a page a crash loses is recomputed); what survives a crash is still
#: byte-exact. ``write_back`` applies only where it can (both tiers, not "sync").
EMBEDDED_DEFAULTS = {"dram_bytes": 4 << 30, "ssd_bytes": 64 << 30, "durability": "batch"}
#: Set to 0 to keep an embedded store's DRAM unregistered with CUDA (loads then go through
#: pinned staging): registering pins the whole arena in RAM, faulting it in at the first load.
REGISTER_ENV = "TAIRSTORE_REGISTER_DRAM"
#: A namespace's readable part is capped so a long model path cannot push it past 255 bytes.
NAMESPACE_PREFIX_CHARS = 160
DAEMON_SCHEMES = ("tcp://", "shm+tcp://", "tairstore://")


def is_daemon_url(url: str) -> bool:
    """True for ``tcp://`` / ``shm+tcp://`` / ``tairstore://`` addresses, False for a directory
    path."""
    return url.startswith(DAEMON_SCHEMES)


def engine_key(key: Any) -> bytes:
    """An engine's page/block key as a tairstore key (1..64 bytes).

    A hex string of an even length up to 128 (SGLang's sha256 page hashes) becomes its bytes;
    an int (vLLM's block hashes) its 8..32 big-endian bytes; bytes up to 64 stay as they are;
    anything longer, or another string, becomes its sha256, so distinct inputs stay distinct
    in practice.
    """
    if isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
        return raw if 1 <= len(raw) <= 64 else hashlib.sha256(raw).digest()
    if isinstance(key, int):
        if key < 0:
            key &= (1 << 256) - 1
        return key.to_bytes(max(8, (key.bit_length() + 7) // 8), "big")
    if isinstance(key, str):
        if key and len(key) % 2 == 0 and len(key) <= 128:
            try:
                return bytes.fromhex(key)
            except ValueError:
                pass
        return hashlib.sha256(key.encode()).digest()
    raise InvalidArgumentError(f"an engine key is a str, bytes or int, got {type(key).__name__}")


@dataclass(frozen=True)
class Deployment:
    """What makes two deployments' KV bytes incompatible; equal for replicas of one deployment.

    With MLA the latent KV is the same on every tensor-parallel rank, so ``tp_rank`` and
    ``tp_size`` do not enter the namespace: all ranks (and replicas) share one copy.
    """

    engine: str
    model: str
    dtype: str
    page_size: int
    layout: str
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    mla: bool = False
    extra: str = ""

    def namespace(self) -> str:
        """The tairstore namespace of this deployment's pages (at most 255 bytes)."""
        tp = "mla" if self.mla else f"tp{self.tp_rank}of{self.tp_size}"
        ident = "|".join([self.engine, self.model, self.dtype, f"p{self.page_size}", self.layout,
                          tp, f"pp{self.pp_rank}of{self.pp_size}", self.extra])
        digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
        readable = f"{self.engine}/{self.model}/{self.dtype}/p{self.page_size}/{self.layout}/{tp}"
        return f"{readable[:NAMESPACE_PREFIX_CHARS]}/{digest}"


@dataclass
class BackendStats:
    """Counters an adapter reports in its engine's stats call."""

    pages_read: int = 0
    pages_written: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    misses: int = 0
    failures: int = 0


class Backend:
    """An embedded Store or a daemon Client behind one interface on which failure is a miss.

    Every method returns a plain value and never raises a :class:`tairstore.StoreError` or an
    ``OSError``: those are counted in ``stats.failures``, logged (once per error class) and
    answered as a miss. A read that returns a block of another size than expected is a miss too.
    """

    def __init__(self, target: Any, namespace: str, *, remote: bool, owned: bool = True,
                 retry_after_s: float = DEFAULT_RETRY_AFTER_S, connect: Any = None) -> None:
        self._target = target
        self._connect = connect
        self.namespace = namespace
        #: True for a daemon's Client (its failures pause calls briefly), False for a Store.
        self.remote = remote
        self.stats = BackendStats()
        self._owned = owned
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._logged: set[str] = set()
        self._lock = threading.Lock()
        #: Whether the embedded store's DRAM is registered with CUDA (None: not tried yet).
        self._pinned: bool | None = None

    @property
    def target(self) -> Any:
        """The Store or Client; a daemon's Client is (re)connected on first use, so an engine
        starts, and recovers, while the daemon is down (raises NetworkError until it is up)."""
        if self._target is None:
            self._target = self._connect()
        return self._target

    # -- failure handling --------------------------------------------------------------------
    def _fail(self, op: str, exc: BaseException) -> None:
        with self._lock:
            self.stats.failures += 1
            if self.remote and not isinstance(exc, InvalidArgumentError):
                # A daemon that failed is skipped for a moment rather than retried per page.
                self._down_until = time.monotonic() + self._retry_after_s
            first = type(exc).__name__ not in self._logged
            self._logged.add(type(exc).__name__)
        (log.warning if first else log.debug)("tairstore %s failed, served as a miss: %s: %s",
                                                op, type(exc).__name__, exc)

    def _skipping(self) -> bool:
        return self.remote and time.monotonic() < self._down_until

    # -- calls -------------------------------------------------------------------------------
    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Per key, whether it is stored; all False when the store cannot answer."""
        if not keys or self._skipping():
            return [False] * len(keys)
        try:
            return list(self.target.exists(list(keys), namespace=self.namespace))
        except (StoreError, OSError) as exc:
            self._fail("exists", exc)
            return [False] * len(keys)

    def prefix_len(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are stored (counting stops at the first missing one)."""
        if not keys or self._skipping():
            return 0
        try:
            return int(self.target.match(list(keys), namespace=self.namespace).prefix_len)
        except (StoreError, OSError) as exc:
            self._fail("match", exc)
            return 0

    def get_into(self, key: bytes, out: Any, nbytes: int) -> bool:
        """Fill ``out`` (``nbytes`` long) with the block; False on a miss, a failure or a size
        mismatch (the buffer's contents are then unspecified and must not be used)."""
        if self._skipping():
            self.stats.misses += 1
            return False
        try:
            got = self.target.get_into(key, out, namespace=self.namespace)
        except (StoreError, OSError) as exc:
            self._fail("get", exc)
            return False
        if got != nbytes:
            if got:
                self._fail("get", StoreError(f"block of {got} bytes where {nbytes} were expected"))
            self.stats.misses += 1
            return False
        self.stats.pages_read += 1
        self.stats.bytes_read += nbytes
        return True

    def get(self, key: bytes) -> memoryview | None:
        """The block's bytes (read-only), or None on a miss or a failure."""
        if self._skipping():
            return None
        try:
            view = self.target.get(key, namespace=self.namespace)
        except (StoreError, OSError) as exc:
            self._fail("get", exc)
            return None
        self._count_read(view)
        return view

    def _count_read(self, view: memoryview | None) -> None:
        if view is None:
            self.stats.misses += 1
        else:
            self.stats.pages_read += 1
            self.stats.bytes_read += view.nbytes

    def get_many(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        """Per key, the block's bytes (read-only) or None, with one call to the store; all None
        on a failure."""
        if not keys or self._skipping():
            return [None] * len(keys)
        try:
            views = list(self.target.get_many(list(keys), namespace=self.namespace))
        except (StoreError, OSError) as exc:
            self._fail("get", exc)
            return [None] * len(keys)
        for view in views:
            self._count_read(view)
        return views

    def reads_in_place(self) -> bool:
        """Whether the target hands out views of a daemon's shared arena (``shm+tcp://``, or a
        loopback daemon whose arena this process maps) rather than copies off a socket."""
        if not self.remote:
            return True
        if self._skipping():
            return False
        try:
            target = self.target
        except (StoreError, OSError):
            return False  # not connected: the read path reports the failure
        from ..net.shmclient import ShmClient

        return isinstance(target, ShmClient)

    def put(self, key: bytes, data: Any) -> bool:
        """Store one block; True when it is stored (now or already)."""
        return self.put_many([key], lambda _i, _k: data, memoryview(data).nbytes)[0]

    def put_many(self, keys: Sequence[bytes], fill: Any, nbytes: int) -> list[bool]:
        """Store a chain of equal-sized blocks through one write session.

        ``fill(i, key)`` returns the bytes of ``keys[i]``; it is called only for keys not stored
        yet, so pages already present are never gathered. Returns, per key, whether it is
        stored afterwards.
        """
        keys = list(keys)
        if not keys or self._skipping():
            return [False] * len(keys)
        if self.remote:
            return self._put_many_remote(keys, fill, nbytes)

        def write(t: Any, session: Any, todo: list[int]) -> list[bytes]:
            for i in todo:
                t.write(session, keys[i], fill(i, keys[i]))
            return [keys[i] for i in todo]

        return self._write_session(keys, nbytes, write)

    def _write_session(self, keys: list[bytes], nbytes: int, write: Any) -> list[bool]:
        """One write session on the embedded store for ``keys``: ``write(store, session, todo)``
        sends the blocks at positions ``todo`` (those not stored yet) and returns the keys it
        sent, which are then committed; on a failure the session is aborted. Per key, whether
        it is stored afterwards."""
        try:
            t = self.target
            session = t.start_write(keys, [nbytes] * len(keys), namespace=self.namespace)
        except (StoreError, OSError) as exc:
            self._fail("start_write", exc)
            return [False] * len(keys)
        todo = set(session.keys_to_write)
        try:
            written = write(t, session, [i for i, k in enumerate(keys) if k in todo])
            committed = t.finish_write(session, written) if written else 0
        except (StoreError, OSError) as exc:
            self._fail("write", exc)
            try:
                t.abort_write(session)
            except (StoreError, OSError):
                pass
            # Keys another writer already had are stored; ours are not.
            return [k not in todo for k in keys]
        ok = committed == len(written)
        self.stats.pages_written += committed
        self.stats.bytes_written += committed * nbytes
        return [(k not in todo) or ok for k in keys]

    def _put_many_remote(self, keys: list[bytes], fill: Any, nbytes: int) -> list[bool]:
        """put_many over a daemon: ``exists`` then one ``put_many`` of the missing blocks — two
        round trips, where a write session costs one per block."""
        return self._put_missing(keys, nbytes, lambda t, todo: sum(t.put_many(
            [keys[i] for i in todo], [fill(i, keys[i]) for i in todo], namespace=self.namespace)))

    def _put_missing(self, keys: list[bytes], nbytes: int, store: Any) -> list[bool]:
        """Ask the daemon which of ``keys`` it holds, then ``store(target, missing_indexes)``
        (returning how many it stored); per key, whether it is stored (all False when the
        daemon failed before answering ``exists``)."""
        present = [False] * len(keys)
        try:
            t = self.target  # connects on first use: inside the try, a daemon down is a miss
            present = t.exists(keys, namespace=self.namespace)
            todo = [i for i, hit in enumerate(present) if not hit]
            n = store(t, todo) if todo else 0
        except (StoreError, OSError) as exc:
            self._fail("put_many", exc)
            return list(present)
        # A block the daemon did not store: another writer stored (or is storing) it meanwhile.
        self.stats.pages_written += n
        self.stats.bytes_written += n * nbytes
        return [True] * len(keys)

    def load_pages(self, transfer: Any, keys: Sequence[bytes], pages: Sequence[int]) -> Any:
        """Start loading ``keys[i]`` into page ``pages[i]`` of a
        :class:`tairstore.tiers.gpu.KVTransfer`; the :class:`~tairstore.tiers.gpu.LayerLoad`."""
        nbytes = transfer.kv.block_bytes
        # An embedded store hands out views of its DRAM tier, and so does a daemon on this host
        # whose arena is shared (shm+tcp://: one round trip leases the whole batch): pages are
        # copied from there straight into the KV tensors. Over a plain socket, blocks are
        # better received into reused staging buffers than into a fresh allocation per block.
        fetch = None
        if self._in_place(transfer, nbytes):
            fetch = lambda i: self.get(keys[i])  # noqa: E731
        elif not transfer.cuda and self.reads_in_place():
            views = self.get_many(keys)
            fetch = views.__getitem__
        return transfer.load(pages, read=lambda i, buf: self.get_into(keys[i], buf, nbytes), fetch=fetch)

    def _in_place(self, transfer: Any, nbytes: int) -> bool:
        """Whether pages move between ``transfer`` and the embedded store's DRAM in place (views
        of its arena): always for CPU tensors; onto or off a device, for pages of
        ``DIRECT_MIN_BYTES`` and more once the arena is registered with CUDA (DMA). Smaller
        device pages go through pinned staging (one copy to or from the device a batch)."""
        from ..tiers.gpu import DIRECT_MIN_BYTES

        return not self.remote and (not transfer.cuda or (nbytes >= DIRECT_MIN_BYTES
                                                          and self._host_registered()))

    def _host_registered(self) -> bool:
        """Register the embedded store's DRAM arena with CUDA, once (False when it has none or
        CUDA refuses: loads then go through pinned staging)."""
        if self._pinned is None:
            from ..tiers import gpu

            if os.environ.get(REGISTER_ENV, "1") == "0":
                self._pinned = False
                return False
            try:
                store = self.target
                memory = store.host_memory()
                self._pinned = gpu.register_host(memory)
                if self._pinned:
                    # Unregistered as the store closes, before its DRAM can be released
                    # (DMA from pages no longer mapped there would read stale bytes).
                    store.on_close(lambda: gpu.unregister_host(memory))
            except StoreError as exc:
                self._fail("register", exc)
                return False
        return self._pinned

    def save_pages(self, transfer: Any, keys: Sequence[bytes], pages: Sequence[int]) -> list[bool]:
        """Store page ``pages[i]`` of a :class:`tairstore.tiers.gpu.KVTransfer` as ``keys[i]``
        (pages already stored are not gathered); per page, whether it is stored."""
        nbytes = transfer.kv.block_bytes
        if self.remote and not transfer.cuda and self.reads_in_place():
            staged = self._save_pages_staged(transfer, list(keys), list(pages), nbytes)
            if staged is not None:
                return staged
        if self._in_place(transfer, nbytes):
            return self._save_pages_in_place(transfer, list(keys), list(pages), nbytes)
        return transfer.save(pages, lambda idx, fill: self.put_many(
            [keys[i] for i in idx], lambda j, _k: fill(idx[j]), nbytes))

    def _save_pages_in_place(self, transfer: Any, keys: list[bytes], pages: list[int],
                             nbytes: int) -> list[bool]:
        """save_pages into the embedded store: each missing page is copied straight into its
        block's DRAM reservation (``write_view``; from the device, one DMA a block into the
        arena registered with CUDA) and checksummed there (``write_done``): one copy, where a
        gather into staging and the store's copy of it make two. A block placed without a DRAM
        copy (SSD only) is gathered into a buffer and sent with ``write``."""
        if not keys:
            return []

        def write(t: Any, session: Any, todo: list[int]) -> list[bytes]:
            transfer.kv._index(pages)  # a bad page index: the session is aborted, a miss
            direct, views, other = [], [], []
            for i in todo:
                view = t.write_view(session, keys[i])
                if view is None:
                    other.append(i)
                else:
                    direct.append(i)
                    views.append(view)
            transfer.save_into([pages[i] for i in direct], views)
            for view in views:
                view.release()  # write_done checksums what is there: nothing may change it
            for i in direct:
                t.write_done(session, keys[i])
            if other:
                buf = bytearray(nbytes)
                for i in other:
                    transfer.save_into([pages[i]], [buf])
                    t.write(session, keys[i], buf)
            return [keys[i] for i in direct + other]

        return self._write_session(keys, nbytes, write)

    def _save_pages_staged(self, transfer: Any, keys: list[bytes], pages: list[int],
                           nbytes: int) -> list[bool] | None:
        """save_pages to a same-host daemon: the missing pages are gathered straight into the
        client's staging file (one copy, where a gather into a buffer then its copy into the
        staging file makes two). None when the target cannot stage such a batch."""
        import torch

        from ..net.shmclient import MAX_STAGE_BYTES

        per_call = MAX_STAGE_BYTES // nbytes
        if getattr(self.target, "put_many_staged", None) is None or per_call < 1:
            return None  # (reads_in_place() connected the target)

        def store(t: Any, todo: list[int]) -> int:
            n = 0
            for start in range(0, len(todo), per_call):
                chunk = todo[start:start + per_call]
                n += sum(t.put_many_staged([keys[i] for i in chunk], nbytes,
                                           lambda area, _c=chunk: transfer.kv.gather(
                                               [pages[i] for i in _c], torch.from_numpy(area)),
                                           namespace=self.namespace))
            return n

        return self._put_missing(keys, nbytes, store)

    def delete_all(self) -> bool:
        """Drop every block of this namespace (an engine's ``clear``)."""
        try:
            trim = getattr(self.target, "trim", None)
            if trim is None:
                return False
            trim(self.namespace, mode="all")
            return True
        except (StoreError, OSError) as exc:
            self._fail("clear", exc)
            return False

    def store_stats(self) -> dict:
        """The store's own ``stats()``, or ``{}`` when it cannot answer."""
        try:
            return dict(self.target.stats())
        except (StoreError, OSError) as exc:
            self._fail("stats", exc)
            return {}

    def close(self) -> None:
        """Close the store or client if this backend opened it."""
        if self._owned and self._target is not None:
            try:
                self._target.close()
            except (StoreError, OSError):
                pass


def lazy_classes(module: str, builders: dict[str, Any]) -> Any:
    """A module ``__getattr__`` that builds each named class on first lookup (and keeps it).

    An adapter's class derives from its engine's base class, so it can only be built once the
    engine is importable; building it on first use lets the module import without the engine.
    """
    built: dict[str, type] = {}
    lock = threading.Lock()

    def __getattr__(name: str) -> Any:
        if name not in builders:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        with lock:
            if name not in built:
                built[name] = builders[name]()
            return built[name]

    return __getattr__


_EMBEDDED: dict[str, Any] = {}


def _is_open(store: Any) -> bool:
    try:
        store.exists([b"\0"])
        return True
    except ClosedError:
        return False

_EMBEDDED_LOCK = threading.Lock()


def open_backend(url: str, namespace: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 token: str | None = None, store_options: dict | None = None) -> Backend:
    """A :class:`Backend` for ``url``: a daemon address or an embedded store's directory.

    Adapters in one process that name the same directory share one embedded store (a store
    directory is locked to one process), so several ranks' or pools' adapters can coexist.

    Raises:
        InvalidArgumentError: ``url`` is empty or a malformed daemon address.
    """
    # The package's public entry points only (tairstore.open, tairstore.Client).
    from .. import Client
    from .. import open as open_store
    from ..net.client import parse_url

    if not isinstance(url, str) or not url:
        raise InvalidArgumentError("tairstore_url must be tcp://host:port or a directory path")
    if is_daemon_url(url):
        parse_url(url.removeprefix("shm+"))  # a malformed address is a configuration error, raised now
        return Backend(None, namespace, remote=True,
                       connect=lambda: Client(url, token=token, timeout=timeout_s))
    path = os.path.abspath(os.path.expanduser(url))
    with _EMBEDDED_LOCK:
        store = _EMBEDDED.get(path)
        if store is not None and not _is_open(store):
            store = None
        if store is None:
            store = open_store(path, **embedded_options(store_options))
            _EMBEDDED[path] = store
    return Backend(store, namespace, remote=False, owned=False)


def embedded_options(store_options: dict | None) -> dict:
    """An adapter's embedded-store options: :data:`EMBEDDED_DEFAULTS` under the caller's, with
    ``write_back`` on unless the caller set it or the store cannot have it (no DRAM or no SSD
    tier, or ``durability="sync"``)."""
    opts = {**EMBEDDED_DEFAULTS, **(store_options or {})}
    if "write_back" not in opts:
        opts["write_back"] = bool(opts.get("dram_bytes") and opts.get("ssd_bytes")
                                  and opts.get("durability") in ("batch", "none"))
    return opts


def close_embedded(url: str) -> None:
    """Close the shared embedded store opened for directory ``url`` (tests, shutdown)."""
    path = os.path.abspath(os.path.expanduser(url))
    with _EMBEDDED_LOCK:
        store = _EMBEDDED.pop(path, None)
    if store is not None:
        store.close()
