"""A client on the daemon's host that reads blocks in place, from the shared DRAM arena.

``tairstore.Client("shm+tcp://127.0.0.1:7480")`` returns a :class:`ShmClient`. It speaks the
ordinary protocol for everything, except reads: it maps the daemon's arena file read-only
(SHM_HELLO says where it is) and asks GET_SHM for each block's ``(offset, size, generation)``
under a lease (see :mod:`tairstore.daemon.shm`), so a get moves no payload through the socket:

- ``get`` / ``get_many`` return a read-only, zero-copy ``memoryview`` of the mapping. Like the
  embedded store's views, it is backed by a small exporter object (numpy keeps it as the base
  of anything derived, e.g. ``np.frombuffer(view, np.float16)`` or ``torch.frombuffer``); when
  the last of them is gone the lease is queued for return. Returns ride on the next GET_SHM
  (its ``rel_o``/``rel_g`` fields), or go as one RELEASE once RETURN_BATCH have piled up, or
  at :meth:`ShmClient.release_leases` / ``close``;
- ``get_into`` copies the block from the mapping into the caller's buffer while it holds the
  lease, then returns the lease: one round trip and one memcpy;
- ``put`` / ``put_many`` copy the blocks into a staging file of this connection (SHM_STAGE; a
  file only this client and the daemon map) and send PUT_SHM with their offsets: the daemon
  stores them from there (one copy into the arena), and no payload crosses the socket;
- a block that is stored but not in DRAM (SSD only) is read over the socket, as by
  :class:`~tairstore.net.client.Client`, and so is every block of a namespace whose DRAM
  partition this client's token may not map (``StoreConfig.dram_partitions``: the daemon
  offers a token only the arena files of partitions whose namespaces it all covers).

The mapping is ``PROT_READ``: a client cannot change a byte of the arena. A view must not be
used past its lease (``lease_s`` of the daemon, 60 s by default) or after its connection to the
daemon broke (the daemon then released its leases and may reuse the slot): hold views for the
time of a request, not as a cache.

All reads share one connection (the leases are that connection's), under a lock; other
operations use the ordinary pool.
"""

from __future__ import annotations

import bisect
import collections
import mmap
import os
import threading
from typing import Any

import numpy as np

from tairstore.errors import InvalidArgumentError, ProtocolError, StoreError
from tairstore.net import calls
from tairstore.net.calls import DEFAULT_NAMESPACE, Call, _sized
from tairstore.net.client import DEFAULT_TIMEOUT_S, Client, NetworkError, _raise_for, _SyncConn, parse_url
from tairstore.net.schema import Op
from tairstore.net.protocol import Response
from tairstore.validate import check_block_size, check_data, check_key, check_keys, check_namespace, check_out

__all__ = ["ShmClient", "RETURN_BATCH", "SHM_SCHEME", "shm_reachable"]

#: The URL scheme that asks for shared-memory reads.
SHM_SCHEME = "shm+"
#: Lease returns queued before they are sent on their own (RELEASE) rather than with a get.
RETURN_BATCH = 256
#: Bytes of the staging file local puts are copied into (grown for a larger batch), and the
#: largest put that goes through it (larger ones go over the socket).
STAGE_BYTES = 16 << 20
MAX_STAGE_BYTES = 64 << 20
#: GET_SHM sizes that carry no slot (see tairstore.daemon.shm).
_MISS, _NOT_IN_DRAM = -1, -2


class _Refused(Exception):
    """Carries the daemon's refusal of a token out of the probe's catch-all."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


def _refusal(resp: Response) -> _Refused:
    try:
        _raise_for(resp)
    except StoreError as exc:
        return _Refused(exc)
    return _Refused(StoreError("the daemon refused the token"))


def shm_reachable(url: str, token: str | None, timeout: float | None) -> bool:
    """Whether the daemon at ``tcp://`` ``url`` is on a loopback address and has a shared
    arena this process may open (one short extra connection; any failure means no)."""
    from tairstore.daemon.config import is_loopback

    try:
        host, port = parse_url(url)
    except InvalidArgumentError:
        return False
    if not is_loopback(host):
        return False
    try:
        conn = _SyncConn(host, port, timeout)
    except NetworkError:
        return False
    try:
        with conn.lock:
            if token is not None:
                auth = conn.call(calls.auth(token))
                if auth.error is not None:
                    # The plain client would be refused the same way: refuse once, here,
                    # rather than try a second connection with the same bad token.
                    raise _refusal(auth)
            resp = conn.call(Call(Op.SHM_HELLO, {}, lambda r: r))
        if resp.error is not None:
            return False
        # The top-level path (the default partition's file), else the partitions' files.
        paths = [resp.fields.get("path", "")] + [p.get("path", "") for p in resp.fields.get("parts") or ()]
        return any(p and os.access(p, os.R_OK) for p in paths)
    except _Refused as refused:
        raise refused.error from None
    except (StoreError, OSError):
        return False  # e.g. a daemon that predates SHM_HELLO: the socket it is
    finally:
        conn.close()


class _Lease:
    """Exports one leased slot of the mapping to numpy; when it dies, the lease is returned."""

    __slots__ = ("__array_interface__", "_client", "_handle")

    def __init__(self, client: ShmClient, address: int, size: int, handle: tuple) -> None:
        self.__array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (address, True),
                                    "version": 3}
        self._client = client  # holds the mapping: it outlives every view into it
        self._handle = handle

    def __del__(self) -> None:
        # Only an append (atomic under the GIL): it may run in any thread, at any point.
        self._client._returns.append(self._handle)


class ShmClient(Client):
    """A :class:`~tairstore.net.client.Client` whose reads come from the shared arena.

    Args:
        url: ``shm+tcp://host:port`` or ``tcp://host:port`` (the daemon must run on this host
            with ``[shm]``).
        token: bearer token; with auth on, it must cover every namespace of at least one DRAM
            partition (without partitions: every namespace; see docs/PROTOCOL.md).
        timeout: seconds one socket operation may block; None waits forever.

    Raises:
        InvalidArgumentError: the daemon has no shared arena, or its file cannot be opened here
            (another host, or no permission).
        PermissionDeniedError: the token covers no DRAM partition whole.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float | None = DEFAULT_TIMEOUT_S,
                 shm: bool | None = True) -> None:
        if shm is False:
            raise InvalidArgumentError("a ShmClient reads from shared memory: shm=False contradicts it")
        super().__init__(url[len(SHM_SCHEME):] if url.startswith(SHM_SCHEME) else url, token, timeout)
        self._returns: collections.deque = collections.deque()
        self._shm_lock = threading.Lock()
        self._epoch = 0
        self._conn = None
        self._stage: np.ndarray | None = None
        self._stage_epoch = -1
        self._buf = self._map()

    # ---------------------------------------------------------------------- the mapping
    def _shm_conn(self) -> Any:
        """The lease connection, opened on first use or after it broke (lock held)."""
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
            self._epoch += 1  # leases and staging of a previous connection are gone with it
        return self._conn

    def _call_shm(self, op: Op, fields: dict) -> Any:
        """One request on the lease connection (lock held)."""
        self._shm_conn()
        with self._conn.lock:
            return _raise_for(self._conn.call(Call(op, fields, lambda r: r)))

    def _map(self) -> np.ndarray:
        """Map every arena file SHM_HELLO names (one per DRAM partition this token may read).

        ``self._parts`` holds ``(base, cap, buf)`` per file, by arena offset: a slot at arena
        offset ``off`` is ``buf[off - base:]`` of the file whose range holds it. Returns the
        first file's array (with one file, base 0: arena offsets index it directly).
        """
        with self._shm_lock:
            info = self._call_shm(Op.SHM_HELLO, {}).fields
        if not info["path"] and not info.get("parts"):
            raise InvalidArgumentError("the daemon's arena is not in shared memory (configure [shm])")
        parts = []
        described = info.get("parts") or [{**info, "base": info.get("base", 0), "namespaces": ["*"]}]
        # Namespaces whose blocks are in a mapped file. "*" (the default partition's file) comes
        # only with every other file: only a token covering every namespace may map it. A file
        # this process may not open (not in its partition's group) is skipped: the namespaces
        # of its partition are read over the socket.
        self._ns_mapped: set[str] = set()
        self._ns_unmapped: set[str] = set()
        refused = None
        for p in described:
            path, size, shift, cap = p["path"], p["size"], p["shift"], p["cap"]
            if shift + cap > size:
                raise ProtocolError("the daemon described an arena larger than its file", remote=True)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                refused = refused or InvalidArgumentError(
                    f"cannot open the daemon's arena {path!r} here: {exc.strerror}; "
                    "use tcp:// (another host, or not in the arena's group)")
                self._ns_unmapped.update(p.get("namespaces", ["*"]))
                continue
            try:
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(fd)
            self._ns_mapped.update(p.get("namespaces", ["*"]))
            parts.append((p["base"], cap, np.frombuffer(mm, np.uint8)[shift:shift + cap]))
        if not parts:
            raise refused
        parts.sort(key=lambda t: t[0])
        self._parts = parts
        self._bases = [base for base, _, _ in parts]
        base, cap, buf = parts[0]
        self._one = len(parts) == 1 and base == 0  # arena offsets index buf directly
        self._base = buf.ctypes.data
        self._cap = cap
        return buf

    def _mapped(self, ns: str) -> bool:
        """Whether ``ns``'s blocks are in a file this client maps (else: the socket serves it)."""
        if ns in self._ns_unmapped or ("*" in self._ns_unmapped and ns not in self._ns_mapped):
            return False
        return "*" in self._ns_mapped or ns in self._ns_mapped

    def _locate(self, off: int, size: int) -> tuple[np.ndarray, int]:
        """The mapped file holding arena bytes ``off .. off + size`` and their index in it."""
        if self._one:
            if off < 0 or off + size > self._cap:
                raise ProtocolError(f"the daemon lent a slot outside its arena ({off}+{size})", remote=True)
            return self._buf, off
        i = bisect.bisect_right(self._bases, off) - 1
        if i >= 0:
            base, cap, buf = self._parts[i]
            if off + size <= base + cap:
                return buf, off - base
        raise ProtocolError(f"the daemon lent a slot outside the arena files this client maps "
                            f"({off}+{size})", remote=True)

    # ---------------------------------------------------------------------------- leases
    def _lease(self, keys: list[bytes], ns: str) -> tuple[list[tuple], int]:
        """GET_SHM: per key ``(size, offset, generation)``, and the lease connection's epoch."""
        fields: dict = {"ns": ns, "keys": keys}
        with self._shm_lock:
            for attempt in (0, 1):
                epoch = self._epoch
                rel = self._take_returns(epoch)
                if rel:
                    fields["rel_o"], fields["rel_g"] = [h[1] for h in rel], [h[2] for h in rel]
                try:
                    r = self._call_shm(Op.GET_SHM, fields)
                    break
                except NetworkError:
                    fields.pop("rel_o", None), fields.pop("rel_g", None)
                    if attempt:
                        raise
            epoch = self._epoch
        n = len(keys)
        sizes, offs, gens = (_sized(r, name, n) for name in ("sizes", "offs", "gens"))
        out = []
        for size, off, gen in zip(sizes, offs, gens):
            if size >= 0:
                self._locate(off, size)  # ProtocolError unless it lies inside a mapped file
            out.append((size, off, gen))
        return out, epoch

    def _take_returns(self, epoch: int) -> list[tuple]:
        """The queued returns of the current connection (others' leases died with it)."""
        out = []
        while self._returns:
            handle = self._returns.popleft()
            if handle[0] == epoch:
                out.append(handle)
        return out

    def release_leases(self) -> int:
        """Send every queued lease return now; returns how many were sent."""
        with self._shm_lock:
            rel = self._take_returns(self._epoch)
            if rel and self._conn is not None and not self._conn.closed:
                self._call_shm(Op.RELEASE, {"rel_o": [h[1] for h in rel], "rel_g": [h[2] for h in rel]})
                return len(rel)
        return 0

    def _view(self, size: int, off: int, gen: int, epoch: int) -> memoryview:
        if self._one:
            address = self._base + off
        else:
            buf, at = self._locate(off, size)
            address = buf.ctypes.data + at
        pin = _Lease(self, address, size, (epoch, off, gen))
        return memoryview(np.asarray(pin))

    def _maybe_flush(self) -> None:
        if len(self._returns) >= RETURN_BATCH:
            self.release_leases()

    # ------------------------------------------------------------------------ puts
    def _staging(self, nbytes: int) -> np.ndarray:
        """This connection's staging file, at least ``nbytes`` long (lock held)."""
        self._shm_conn()  # a new connection needs a new staging file
        if self._stage is None or self._stage_epoch != self._epoch or self._stage.nbytes < nbytes:
            self._stage = None
            info = self._call_shm(Op.SHM_STAGE, {"size": max(nbytes, STAGE_BYTES)}).fields
            fd = os.open(info["path"], os.O_RDWR)
            try:
                mm = mmap.mmap(fd, info["size"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            self._stage, self._stage_epoch = np.frombuffer(mm, np.uint8), self._epoch
        return self._stage

    def put(self, key: bytes, data: Any, *, namespace: str = DEFAULT_NAMESPACE) -> bool:
        """Store one block, copied into the staging file instead of sent (see the module doc)."""
        return self.put_many([key], [data], namespace=namespace)[0]

    def put_many(self, keys: list[bytes], blocks: list[Any], *, namespace: str = DEFAULT_NAMESPACE) -> list[bool]:
        """Store many blocks in one request (one commit); per key, whether it was stored."""
        ks, ns = check_keys(keys), check_namespace(namespace)
        datas = [check_data(b) for b in blocks] if isinstance(blocks, (list, tuple)) else None
        total = sum(d.nbytes for d in datas) if datas is not None else 0
        if (datas is None or len(datas) != len(ks) or not 0 < total <= MAX_STAGE_BYTES
                or not self._mapped(ns)):
            return super().put_many(keys, blocks, namespace=namespace)  # its checks and errors
        def fill(area: np.ndarray) -> None:
            pos = 0
            for d in datas:
                np.copyto(area[pos:pos + d.nbytes], np.frombuffer(d, np.uint8))
                pos += d.nbytes

        return self._put_staged(ks, ns, [d.nbytes for d in datas], fill)

    def _put_staged(self, ks: list[bytes], ns: str, sizes: list[int], fill: Any) -> list[bool]:
        """``fill`` writes the blocks, one after another, into the staging file; one PUT_SHM."""
        total = sum(sizes)
        offs, pos = [], 0
        for n in sizes:
            offs.append(pos)
            pos += n
        with self._shm_lock:
            fill(self._staging(total)[:total])
            r = self._call_shm(Op.PUT_SHM, {"ns": ns, "keys": ks, "sizes": sizes, "offs": offs})
        return _sized(r, "stored", len(ks))

    def put_many_staged(self, keys: list[bytes], nbytes: int, fill: Any, *,
                        namespace: str = DEFAULT_NAMESPACE) -> list[bool] | None:
        """Store ``len(keys)`` blocks of ``nbytes`` each that ``fill`` writes in place.

        ``fill(area)`` gets a writable uint8 array of ``len(keys) * nbytes`` bytes of the
        staging file and writes the blocks into it one after another: a producer that must copy
        its blocks anyway (a gather of KV pages) copies them straight into the staging file.
        Returns, per key, whether it was stored; None when the batch cannot be staged (larger
        than ``MAX_STAGE_BYTES``: use :meth:`put_many`).
        """
        ks, ns = check_keys(keys), check_namespace(namespace)
        size = check_block_size(nbytes, None)
        total = size * len(ks)
        if not 0 < total <= MAX_STAGE_BYTES or not self._mapped(ns):
            return None
        return self._put_staged(ks, ns, [size] * len(ks), fill)

    # ------------------------------------------------------------------------ reads
    def get(self, key: bytes, *, namespace: str = DEFAULT_NAMESPACE) -> memoryview | None:
        """The block as a read-only view of the shared arena (its lease ends with the view)."""
        return self.get_many([key], namespace=namespace)[0]

    def get_many(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE) -> list[memoryview | None]:
        """Views of many blocks with one round trip (SSD-only blocks come over the socket)."""
        ks, ns = check_keys(keys), check_namespace(namespace)
        if not self._mapped(ns):
            return super().get_many(ks, namespace=ns)
        self._maybe_flush()
        slots, epoch = self._lease(ks, ns)
        out: list[memoryview | None] = []
        for key, (size, off, gen) in zip(ks, slots):
            if size == _MISS:
                out.append(None)
            elif size == _NOT_IN_DRAM:
                out.append(super().get(key, namespace=ns))
            else:
                out.append(self._view(size, off, gen, epoch))
        return out

    def get_into(self, key: bytes, out: Any, *, namespace: str = DEFAULT_NAMESPACE) -> int:
        """Copy the block from the shared arena into ``out``; the bytes copied, 0 on a miss."""
        k, ns, dst = check_key(key), check_namespace(namespace), check_out(out)
        if not self._mapped(ns):
            return super().get_into(k, dst, namespace=ns)
        self._maybe_flush()
        ((size, off, gen),), epoch = self._lease([k], ns)
        if size == _MISS:
            return 0
        if size == _NOT_IN_DRAM:
            return super().get_into(k, dst, namespace=ns)
        try:
            if size > dst.nbytes:
                raise InvalidArgumentError(f"out holds {dst.nbytes} bytes; the block has {size}")
            buf, at = self._locate(off, size)
            np.copyto(np.frombuffer(dst, np.uint8, count=size), buf[at:at + size])
        finally:
            self._returns.append((epoch, off, gen))
        return size

    def close(self) -> None:
        """Return every lease (the daemon also drops them with the connection) and close."""
        try:
            self.release_leases()
        except (NetworkError, OSError, ProtocolError):
            pass  # closing anyway: the daemon releases them with the connection
        if self._conn is not None:
            self._conn.close()
        super().close()

    def __repr__(self) -> str:
        return f"<tairstore.ShmClient shm+tcp://{self._host}:{self._port}{' closed' if self._closed else ''}>"

