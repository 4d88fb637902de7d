"""Clients of the data-path daemon, with the methods, signatures and errors of the Store.

- :class:`Client`: blocking and thread-safe. A small pool of connections (a thread takes an
  idle one or opens one), each used by one thread at a time. Payloads go out with one
  ``sendmsg`` of the header and the caller's own buffers, and come in with ``recv_into``
  straight into the buffer handed back (for ``get_into``: into the caller's ``out``).
- :class:`AsyncClient` (in :mod:`tairstore.net.aclient`, imported from here on first use so
  that only its users import trio): one pipelined connection shared by all tasks; whichever
  task waits for an answer reads the socket and hands other tasks their responses.

Both re-raise the daemon's errors with their original classes (the wire carries a code per
:mod:`tairstore.errors` class). A broken connection is retried once, on a fresh connection,
for the operations that are safe to repeat (get, get_into, get_many, exists, match, stats,
ping); for the others it raises :class:`NetworkError`, since the daemon may or may not have
applied the request. Write sessions belong to the connection that started them: if it
breaks, the daemon aborts them and further use raises :class:`SessionError`.
"""

from __future__ import annotations

import itertools
import socket
import struct
import threading
from typing import Any
from urllib.parse import urlsplit

from tairstore.errors import ClosedError, InvalidArgumentError, SessionError, StoreError
from tairstore.engine.match import MatchResult
from tairstore.net import calls
from tairstore.config import DEFAULT_NAMESPACE
from tairstore.net.calls import Call, RemoteWriteSession
from tairstore.net.limits import MAX_DRAIN_BYTES, Limits
from tairstore.net.protocol import IOV_BATCH, Connection, Request, Response, Role, advance_views
from tairstore.validate import check_data

__all__ = ["Client", "AsyncClient", "NetworkError", "RemoteWriteSession", "parse_url"]

#: Client-side receive limit: the daemon is trusted more than its clients, but a batched GET
#: answer (up to max_batch blocks) must fit; 1 GiB bounds what a broken peer can make us allocate.
CLIENT_LIMITS = Limits(max_frame_bytes=MAX_DRAIN_BYTES, max_batch=1 << 20)
#: Idle connections a Client keeps open for reuse.
MAX_IDLE = 16
DEFAULT_TIMEOUT_S = 30.0
#: SO_SNDBUF of client sockets: a 4 MiB put goes into the kernel in one sendmsg (Linux doubles
#: it, within net.core.wmem_max); 0 leaves it to autotuning.
SEND_BUFFER = 4 << 20


def _set_sndbuf(sock: Any) -> None:
    if SEND_BUFFER:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass


class NetworkError(StoreError, ConnectionError):
    """The daemon could not be reached, or the connection broke mid-request."""


def parse_url(url: str) -> tuple[str, int]:
    """``tcp://host:port`` (or ``tairstore://host:port``, as the daemon's startup line and
    location URIs print it) → (host, port)."""
    parts = urlsplit(url)
    if parts.scheme not in ("tcp", "tairstore") or not parts.hostname or parts.port is None:
        raise InvalidArgumentError(f"expected a daemon address like tcp://127.0.0.1:7480, got {url!r}")
    return parts.hostname, parts.port


def split_args(keys: Any, blocks: Any) -> tuple[list, list[memoryview]]:
    """put_many's arguments as lists of keys and byte views, checked like the Store's."""
    keys = list(keys)
    views = [check_data(b) for b in blocks]
    if len(keys) != len(views):
        raise InvalidArgumentError(f"{len(keys)} keys but {len(views)} blocks")
    return keys, views


def _raise_for(resp: Response) -> Response:
    if resp.error is not None:
        raise resp.error
    return resp


# ------------------------------------------------------------------------------ blocking
def _send_buffers(sock: socket.socket, buffers: list) -> None:
    if len(buffers) == 1:
        sock.sendall(buffers[0])
        return
    views = [memoryview(b) for b in buffers]
    i = 0
    while i < len(views):
        i = advance_views(views, i, sock.sendmsg(views[i:i + IOV_BATCH]))


class _SyncConn:
    """One socket and its codec; the caller holds ``lock`` around :meth:`call`."""

    def __init__(self, host: str, port: int, timeout: float | None) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise NetworkError(f"cannot connect to the daemon at {host}:{port}: {exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _set_sndbuf(self.sock)
        # Kernel timeouts on a blocking socket: a Python-level timeout would poll() before
        # every recv and send, one more syscall per chunk of every large block.
        self.sock.settimeout(None)
        if timeout is not None:
            tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self.codec = Connection(Role.CLIENT, CLIENT_LIMITS)
        self.lock = threading.Lock()
        self.closed = False
        self._ids = itertools.count(1)

    def call(self, call: Call) -> Response:
        if self.closed:
            raise NetworkError("the connection to the daemon is closed")
        rid = next(self._ids)
        codec, sock = self.codec, self.sock
        buffers = codec.send(Request(rid, call.op, call.fields, call.blocks), sink=call.sink)
        try:
            _send_buffers(sock, buffers)
            while True:
                n = sock.recv_into(codec.get_buffer())
                if n == 0:
                    raise NetworkError("the daemon closed the connection")
                for event in codec.buffer_filled(n):
                    if isinstance(event, Response):
                        if event.id == rid:
                            return event
                    elif event.fatal:
                        raise event.error
                    elif event.request_id == rid:
                        return Response(rid, error=event.error)
        except (TimeoutError, BlockingIOError) as exc:
            self.close()  # the answer may still come: this socket is out of step now
            raise TimeoutError("no answer from the daemon in time") from exc
        except OSError as exc:
            self.close()
            raise NetworkError(f"connection to the daemon broke: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


class Client:
    """A blocking, thread-safe client of ``tairstore serve``.

    Args:
        url: ``tcp://host:port`` of the daemon's data port; ``shm+tcp://host:port`` on the
            daemon's host reads blocks in place from its shared arena
            (:class:`tairstore.net.shmclient.ShmClient`).
        token: bearer token, sent once per connection (AUTH) when given.
        timeout: seconds one socket operation may block; None waits forever.
        shm: None (default) reads in place when the daemon is on a loopback address and its
            shared arena can be opened here, else over the socket; True requires it (as
            ``shm+tcp://``); False always uses the socket.
    """

    def __new__(cls, url: str, token: str | None = None, timeout: float | None = DEFAULT_TIMEOUT_S,
                shm: bool | None = None) -> "Client":
        # Reads from the daemon's shared arena (tairstore.net.shmclient) for shm+tcp://, or
        # for a loopback tcp:// daemon whose arena this process may map (shm=None: ask it).
        if cls is Client and isinstance(url, str) and shm is not False:
            from tairstore.net.shmclient import ShmClient, shm_reachable

            if url.startswith("shm+") or shm or shm_reachable(url, token, timeout):
                return super().__new__(ShmClient)
        return super().__new__(cls)

    def __init__(self, url: str, token: str | None = None, timeout: float | None = DEFAULT_TIMEOUT_S,
                 shm: bool | None = None) -> None:
        self._host, self._port = parse_url(url)
        self._token = token
        self._timeout = timeout
        self._idle: list[_SyncConn] = []
        self._all: set[_SyncConn] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._release(self._connect())  # fail fast on a wrong address or token

    def _connect(self) -> _SyncConn:
        conn = _SyncConn(self._host, self._port, self._timeout)
        with self._lock:
            self._all.add(conn)
        if self._token is not None:
            with conn.lock:
                _raise_for(conn.call(calls.auth(self._token)))
        return conn

    def _acquire(self) -> _SyncConn:
        with self._lock:
            if self._closed:
                raise ClosedError("the client is closed")
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
                self._all.discard(conn)
        return self._connect()

    def _release(self, conn: _SyncConn) -> None:
        with self._lock:
            if not conn.closed and not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
            self._all.discard(conn)
        conn.close()

    def _run(self, call: Call) -> Any:
        if call.session is not None:
            return self._run_pinned(call)
        for attempt in (0, 1):
            conn = self._acquire()
            try:
                with conn.lock:
                    resp = conn.call(call)
            except NetworkError:
                if not call.idempotent or attempt:
                    raise
                continue
            finally:
                self._release(conn)
            result = call.parse(_raise_for(resp))
            if isinstance(result, RemoteWriteSession):
                result._conn = conn
            return result
        raise AssertionError("unreachable")

    def _run_pinned(self, call: Call) -> Any:
        conn = call.session._conn
        with conn.lock:
            if conn.closed:
                if call.op == calls.Op.ABORT_WRITE:
                    return None  # the daemon aborted it when the connection went
                raise SessionError(f"write session {call.session.id} was lost with its connection; "
                                   "the daemon aborted it: start a new one")
            resp = conn.call(call)
        return call.parse(_raise_for(resp))

    # -------------------------------------------------------------------- the Store API
    def ping(self) -> None:
        """Round-trip an empty request (liveness, latency)."""
        self._run(calls.ping())

    def put(self, key: bytes, data: Any, *, namespace: str = DEFAULT_NAMESPACE) -> bool:
        """Store one block; False if the key already exists (see :meth:`Store.put`)."""
        return self._run(calls.put(key, data, namespace))

    def put_many(self, keys: list[bytes], blocks: list[Any], *, namespace: str = DEFAULT_NAMESPACE) -> list[bool]:
        """Store many blocks; per key, whether it was stored.

        One request (one commit) when the batch fits the protocol's limits; a larger batch is
        split into several requests, each committed on its own.
        """
        keys, blocks = split_args(keys, blocks)
        out: list[bool] = []
        for sl in calls.batches([v.nbytes for v in blocks]):
            out += self._run(calls.put_many(keys[sl], blocks[sl], namespace))
        return out

    def get(self, key: bytes, *, namespace: str = DEFAULT_NAMESPACE) -> memoryview | None:
        """The block's bytes (a read-only view of a private buffer), or None on a miss."""
        return self._run(calls.get(key, namespace))

    def get_many(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE) -> list[memoryview | None]:
        """Many blocks (several requests past the protocol's batch limit); None for each miss."""
        keys = list(keys)
        out: list[memoryview | None] = []
        for sl in calls.batches([0] * len(keys)):
            out += self._run(calls.get_many(keys[sl], namespace))
        return out

    def get_into(self, key: bytes, out: Any, *, namespace: str = DEFAULT_NAMESPACE) -> int:
        """Receive the block straight into ``out``; the bytes written, 0 on a miss."""
        return self._run(calls.get_into(key, out, namespace))

    def exists(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE) -> list[bool]:
        """Per key, whether it is stored (several requests past the protocol's batch limit)."""
        keys = list(keys)
        return [hit for sl in calls.batches([0] * len(keys))
                for hit in self._run(calls.exists(keys[sl], namespace))]

    def match(self, keys: list[bytes], mode: str = "prefix", window: int | None = None, *,
              namespace: str = DEFAULT_NAMESPACE) -> MatchResult:
        """Match a chain of keys: ``prefix``, ``exact`` or ``sliding_window``."""
        return self._run(calls.match(keys, mode, window, namespace))

    def delete(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE) -> int:
        """Delete blocks; returns how many existed (several requests past the batch limit)."""
        keys = list(keys)
        return sum(self._run(calls.delete(keys[sl], namespace)) for sl in calls.batches([0] * len(keys)))

    def start_write(self, keys: list[bytes], sizes: list[int], lease_s: float = 30.0, *,
                    namespace: str = DEFAULT_NAMESPACE) -> RemoteWriteSession:
        """Begin a two-phase write on the daemon (see :meth:`Store.start_write`)."""
        return self._run(calls.start_write(self, keys, sizes, lease_s, namespace))

    def write(self, session: RemoteWriteSession, key: bytes, data: Any) -> None:
        """Send one block of the session."""
        self._run(calls.write(self, session, key, data))

    def finish_write(self, session: RemoteWriteSession, ok_keys: list[bytes]) -> int:
        """Commit ``ok_keys``; returns once the daemon's store acknowledged the commit."""
        return self._run(calls.finish_write(self, session, ok_keys))

    def abort_write(self, session: RemoteWriteSession) -> None:
        """Abandon the session (a finished or lost one is left alone)."""
        self._run(calls.abort_write(self, session))

    def stats(self) -> dict:
        """The daemon store's :meth:`Store.stats`."""
        return self._run(calls.stats())

    def close(self) -> None:
        """Close every connection (open sessions are aborted by the daemon). Idempotent."""
        with self._lock:
            self._closed = True
            conns, self._all, self._idle = list(self._all), set(), []
        for conn in conns:
            conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<tairstore.Client tcp://{self._host}:{self._port}{' closed' if self._closed else ''}>"


def __getattr__(name: str) -> Any:
    """``AsyncClient`` is imported on first use: only it needs trio (``import tairstore`` and the
    blocking :class:`Client` do not)."""
    if name == "AsyncClient":
        from tairstore.net.aclient import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
