"""The trio client of the data-path daemon: :class:`AsyncClient`.

The :class:`~tairstore.net.client.Client` methods, awaited, over one pipelined connection
shared by all tasks; whichever task waits for an answer reads the socket and hands other tasks
their responses. Errors, retries and write sessions behave as the blocking client's (see
:mod:`tairstore.net.client`). This module is the only client code that imports trio.
"""

from __future__ import annotations

import itertools
from typing import Any

import trio

from tairstore.config import DEFAULT_NAMESPACE
from tairstore.engine.match import MatchResult
from tairstore.errors import ClosedError, SessionError
from tairstore.net import calls
from tairstore.net.calls import Call, RemoteWriteSession
from tairstore.net.client import (
    CLIENT_LIMITS,
    DEFAULT_TIMEOUT_S,
    NetworkError,
    _raise_for,
    _set_sndbuf,
    split_args,
    parse_url,
)
from tairstore.net.protocol import Connection, ProtocolErrorEvent, Request, Response, Role

__all__ = ["AsyncClient"]


class _AsyncConn:
    """One pipelined trio socket: a send lock, and a receive lock taken by whoever waits."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.codec = Connection(Role.CLIENT, CLIENT_LIMITS)
        self.send_lock = trio.Lock()
        self.recv_lock = trio.Lock()
        self.results: dict[int, Response | BaseException | None] = {}
        self.closed = False
        self.error: BaseException | None = None
        self._ids = itertools.count(1)

    async def call(self, call: Call) -> Response:
        if self.closed:
            raise NetworkError(f"the connection to the daemon is closed ({self.error})")
        rid = next(self._ids)
        self.results[rid] = None
        done = False
        try:
            async with self.send_lock:
                buffers = self.codec.send(Request(rid, call.op, call.fields, call.blocks), sink=call.sink)
                try:
                    for buf in buffers:
                        await self._send_all(buf)
                except (OSError, trio.ClosedResourceError) as exc:
                    self._fail(NetworkError(f"sending to the daemon failed: {exc!r}"))
                    raise self.error from exc
                except BaseException as exc:
                    # A frame cut in the middle (cancelled) leaves the stream out of step: drop it.
                    self._fail(NetworkError(f"sending to the daemon was interrupted: {exc!r}"))
                    raise
            while self.results[rid] is None:
                async with self.recv_lock:
                    if self.results[rid] is None and not self.closed:
                        await self._receive()
                if self.closed and self.results[rid] is None:
                    raise self.error
            done = True
            result = self.results[rid]
            if isinstance(result, BaseException):
                raise result
            return result
        finally:
            self.results.pop(rid, None)
            if not done and call.sink is not None and not self.closed:
                if not self.codec.release_sink(rid):
                    # The answer is streaming into the caller's buffer right now; the only way
                    # to stop writing into memory the caller took back is to drop the socket.
                    self._fail(NetworkError("a cancelled get_into left its answer half-received"))

    async def _send_all(self, buf: Any) -> None:
        with memoryview(buf) as view:
            total, sent = view.nbytes, 0
            while sent < total:
                sent += await self.sock.send(view[sent:])

    async def _receive(self) -> None:
        try:
            n = await self.sock.recv_into(self.codec.get_buffer())
        except (OSError, trio.ClosedResourceError) as exc:
            self._fail(NetworkError(f"connection to the daemon broke: {exc}"))
            return
        if n == 0:
            self._fail(NetworkError("the daemon closed the connection"))
            return
        for event in self.codec.buffer_filled(n):
            if isinstance(event, Response):
                if event.id in self.results:
                    self.results[event.id] = event
            elif isinstance(event, ProtocolErrorEvent) and not event.fatal:
                if event.request_id in self.results:
                    self.results[event.request_id] = event.error
            else:
                self._fail(event.error)

    def _fail(self, error: BaseException) -> None:
        if not self.closed:
            self.closed, self.error = True, error
            self.sock.close()


class AsyncClient:
    """A trio client of ``tairstore serve``: the :class:`Client` methods, awaited.

    Use ``async with AsyncClient(url) as client:`` (or ``await client.connect()`` and
    ``await client.close()``). Tasks share one pipelined connection.

    Args:
        url: ``tcp://host:port`` of the daemon's data port.
        token: bearer token, sent once per connection (AUTH) when given.
        timeout: seconds a request may take; None waits forever.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
        self._host, self._port = parse_url(url)
        self._token = token
        self._timeout = timeout
        self._conn: _AsyncConn | None = None
        self._connect_lock = trio.Lock()
        self._closed = False

    async def connect(self) -> None:
        """Open the connection now (otherwise the first request does)."""
        await self._connection()

    async def _connection(self) -> _AsyncConn:
        async with self._connect_lock:
            if self._closed:
                raise ClosedError("the client is closed")
            if self._conn is None or self._conn.closed:
                sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
                try:
                    await sock.connect((self._host, self._port))
                except OSError as exc:
                    sock.close()
                    raise NetworkError(f"cannot connect to the daemon at {self._host}:{self._port}: {exc}") from exc
                sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                _set_sndbuf(sock)
                conn = _AsyncConn(sock)
                if self._token is not None:
                    _raise_for(await conn.call(calls.auth(self._token)))
                self._conn = conn
            return self._conn

    async def _run(self, call: Call) -> Any:
        try:
            with trio.fail_after(self._timeout if self._timeout is not None else float("inf")):
                return await self._run_once(call)
        except trio.TooSlowError:
            raise TimeoutError(f"no answer from the daemon within {self._timeout} s") from None

    async def _run_once(self, call: Call) -> Any:
        if call.session is not None:
            conn = call.session._conn
            if conn.closed:
                if call.op == calls.Op.ABORT_WRITE:
                    return None
                raise SessionError(f"write session {call.session.id} was lost with its connection; "
                                   "the daemon aborted it: start a new one")
            return call.parse(_raise_for(await conn.call(call)))
        for attempt in (0, 1):
            conn = await self._connection()
            try:
                resp = await conn.call(call)
            except NetworkError:
                if not call.idempotent or attempt:
                    raise
                continue
            result = call.parse(_raise_for(resp))
            if isinstance(result, RemoteWriteSession):
                result._conn = conn
            return result
        raise AssertionError("unreachable")

    async def ping(self) -> None:
        """Round-trip an empty request."""
        await self._run(calls.ping())

    async def put(self, key: bytes, data: Any, *, namespace: str = DEFAULT_NAMESPACE) -> bool:
        """See :meth:`Client.put`."""
        return await self._run(calls.put(key, data, namespace))

    async def put_many(self, keys: list[bytes], blocks: list[Any], *,
                       namespace: str = DEFAULT_NAMESPACE) -> list[bool]:
        """See :meth:`Client.put_many`."""
        keys, blocks = split_args(keys, blocks)
        out: list[bool] = []
        for sl in calls.batches([v.nbytes for v in blocks]):
            out += await self._run(calls.put_many(keys[sl], blocks[sl], namespace))
        return out

    async def get(self, key: bytes, *, namespace: str = DEFAULT_NAMESPACE) -> memoryview | None:
        """See :meth:`Client.get`."""
        return await self._run(calls.get(key, namespace))

    async def get_many(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE) -> list[memoryview | None]:
        """See :meth:`Client.get_many`."""
        keys = list(keys)
        out: list[memoryview | None] = []
        for sl in calls.batches([0] * len(keys)):
            out += await self._run(calls.get_many(keys[sl], namespace))
        return out

    async def get_into(self, key: bytes, out: Any, *, namespace: str = DEFAULT_NAMESPACE) -> int:
        """See :meth:`Client.get_into`."""
        return await self._run(calls.get_into(key, out, namespace))

    async def exists(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE) -> list[bool]:
        """See :meth:`Client.exists`."""
        keys = list(keys)
        out: list[bool] = []
        for sl in calls.batches([0] * len(keys)):
            out += await self._run(calls.exists(keys[sl], namespace))
        return out

    async def match(self, keys: list[bytes], mode: str = "prefix", window: int | None = None, *,
                    namespace: str = DEFAULT_NAMESPACE) -> MatchResult:
        """See :meth:`Client.match`."""
        return await self._run(calls.match(keys, mode, window, namespace))

    async def delete(self, keys: list[bytes], *, namespace: str = DEFAULT_NAMESPACE) -> int:
        """See :meth:`Client.delete`."""
        keys = list(keys)
        n = 0
        for sl in calls.batches([0] * len(keys)):
            n += await self._run(calls.delete(keys[sl], namespace))
        return n

    async def start_write(self, keys: list[bytes], sizes: list[int], lease_s: float = 30.0, *,
                          namespace: str = DEFAULT_NAMESPACE) -> RemoteWriteSession:
        """See :meth:`Client.start_write`."""
        return await self._run(calls.start_write(self, keys, sizes, lease_s, namespace))

    async def write(self, session: RemoteWriteSession, key: bytes, data: Any) -> None:
        """See :meth:`Client.write`."""
        await self._run(calls.write(self, session, key, data))

    async def finish_write(self, session: RemoteWriteSession, ok_keys: list[bytes]) -> int:
        """See :meth:`Client.finish_write`."""
        return await self._run(calls.finish_write(self, session, ok_keys))

    async def abort_write(self, session: RemoteWriteSession) -> None:
        """See :meth:`Client.abort_write`."""
        await self._run(calls.abort_write(self, session))

    async def stats(self) -> dict:
        """See :meth:`Client.stats`."""
        return await self._run(calls.stats())

    async def close(self) -> None:
        """Close the connection. Idempotent."""
        self._closed = True
        if self._conn is not None:
            self._conn._fail(ClosedError("the client is closed"))
        await trio.lowlevel.checkpoint()

    aclose = close

    async def __aenter__(self) -> "AsyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
