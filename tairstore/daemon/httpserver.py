"""A small HTTP/1.1 server: trio sockets around h11's sans-IO state machine.

Theory of operation
-------------------
h11 parses and frames; this module only moves bytes, enforces limits and knows how to stop.
Each connection runs one loop: read a request head, refuse it early if its declared body is too
large (413, then close: the unread body makes the connection unusable), read the body up to the
limit, hand a :class:`Request` to the application, send its :class:`Response`, and either start
the next cycle (keep-alive) or close.

Limits, each a guard against one kind of misbehaving client:

- ``max_body_bytes(request)`` asked per request (JSON bodies are small, block uploads are not);
- a request head (request line and headers) over ``MAX_HEAD_BYTES`` gets 431, however it
  arrives (h11's own cap applies only to a head still incomplete after a read, so a larger
  head that came in one read would pass it);
- a connection idle between requests is closed after ``idle_timeout_s``, and a request whose
  head and body do not arrive within ``request_timeout_s`` gets 408;
- at most ``max_connections`` connections; more are closed on accept.

An error answer that ends the connection (400, 408, 413, 431) is followed by a *lingering
close*: our side is shut for writing and what the client still sends is read and dropped (for
at most LINGER_S and LINGER_BYTES), since closing a socket with unread bytes makes the kernel
send a reset, which can destroy the answer before the client reads it. Each such error, and
each connection reset, is reported to :class:`~tairstore.daemon.events.ConnectionEvents`
(counted, logged rate-limited).

Graceful shutdown (:meth:`HttpServer.shutdown`): stop accepting, close connections that are idle
between requests, let requests in progress finish (their connections close after the response),
and return from :meth:`HttpServer.serve` once every connection is gone. The caller bounds that
wait with a cancel scope.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

from tairstore.daemon.events import ConnectionEvents

__all__ = ["HttpServer", "Request", "Response"]

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 32 * 1024  # request line + headers; far above any real client's
#: A lingering close reads and drops at most this much, for at most this long.
LINGER_BYTES = 1 << 20
LINGER_S = 2.0
RECV_BYTES = 256 * 1024
SERVER_HEADER = b"tairstore"


@dataclass
class Request:
    """One HTTP request, fully read.

    Attributes:
        method: upper case, e.g. ``"GET"``.
        path: the percent-decoded path, e.g. ``"/namespaces/team-a"``.
        query: query parameters (the last value of a repeated name wins).
        headers: lower-case names to values (repeated headers joined with ``", "``).
        body: the body bytes (empty for none).
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""

    def bearer_token(self) -> str | None:
        """The token of ``Authorization: Bearer <token>``, or None."""
        auth = self.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()


@dataclass
class Response:
    """What the application answers."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


App = Callable[[Request], Awaitable[Response]]


def _head_over_limit(conn: h11.Connection) -> bool:
    """Whether the request head waiting in h11's buffer is longer than MAX_HEAD_BYTES."""
    data = conn.trailing_data[0]
    if len(data) <= MAX_HEAD_BYTES:
        return False
    # The head ends at the first empty line (h11 accepts bare LF line ends too).
    ends = [i for i in (data.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4),
                        data.find(b"\n\n", 0, MAX_HEAD_BYTES + 2)) if i >= 0]
    return not ends


class HttpServer:
    """Serves one application on one TCP port.

    Args:
        app: ``async (Request) -> Response``; it must not raise (answer 500 itself).
        max_body_bytes: ``(method, path) -> int``, the largest body accepted for a request.
        events: where protocol errors and resets are counted and logged (a private, log-only
            one when None).
    """

    def __init__(self, app: App, *, max_body_bytes: Callable[[str, str], int],
                 idle_timeout_s: float = 60.0, request_timeout_s: float = 60.0,
                 max_connections: int = 512, events: ConnectionEvents | None = None) -> None:
        self.app = app
        self.events = events or ConnectionEvents()
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.port: int | None = None
        self._closing = False
        self._accept_scope: trio.CancelScope | None = None
        self._idle: set[trio.CancelScope] = set()
        self._connections = 0
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Requests being served right now."""
        return self._in_flight

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host:port`` (0: any free port) until :meth:`shutdown` and every
        connection has closed. ``task_status.started`` gets the port bound."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as connections:
            with trio.CancelScope() as self._accept_scope:
                if self._closing:
                    self._accept_scope.cancel()
                task_status.started(self.port)
                await trio.serve_listeners(self._handle, listeners, handler_nursery=connections)
            # serve_listeners closed the listeners when cancelled; now the nursery waits for the
            # connections, which close themselves after their current request.

    def shutdown(self) -> None:
        """Stop accepting and close idle connections; requests in progress finish."""
        self._closing = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for scope in list(self._idle):
            scope.cancel()

    # ------------------------------------------------------------------------ connections
    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._connections >= self.max_connections or self._closing:
            await stream.aclose()
            return
        self._connections += 1
        try:
            await self._connection(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # The client went away; nothing to answer.
            self.events.connection("http", "reset", f"the connection broke: {exc!r}")
        except Exception:  # noqa: BLE001 - one connection's bug must not stop the server
            log.exception("HTTP connection failed")
        finally:
            self._connections -= 1
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await stream.aclose()

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        while not self._closing:
            # Between requests: wait for the first bytes of the next one, cancellable by
            # shutdown() and bounded by the idle timeout.
            if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                with trio.move_on_after(self.idle_timeout_s) as idle:
                    self._idle.add(idle)
                    try:
                        data = await stream.receive_some(RECV_BYTES)
                    finally:
                        self._idle.discard(idle)
                if idle.cancelled_caught:
                    return
                conn.receive_data(data)
                if not data:
                    return
            request = None
            with trio.move_on_after(self.request_timeout_s) as timer:
                request = await self._read_request(conn, stream)
            if timer.cancelled_caught:
                self.events.connection("http", "timeout", "a request did not arrive in time")
                await self._send_simple(conn, stream, 408, "request timed out")
                await self._linger(stream)
                return
            if request is None:
                return
            self._in_flight += 1
            try:
                response = await self.app(request)
            finally:
                self._in_flight -= 1
            keep = await self._send(conn, stream, response, close=self._closing)
            if not keep:
                return
            conn.start_next_cycle()

    async def _read_request(self, conn: h11.Connection, stream: trio.SocketStream) -> Request | None:
        """Read one request; None after answering an error or on EOF (close the connection)."""
        try:
            head = await self._next_event(conn, stream, head=True)
            if head is h11.PAUSED or isinstance(head, h11.ConnectionClosed):
                return None
            assert isinstance(head, h11.Request), head
            method = head.method.decode("ascii", "replace").upper()
            target = urlsplit(head.target.decode("ascii", "replace"))
            path = unquote(target.path) or "/"
            headers: dict[str, str] = {}
            for name, value in head.headers:
                k = name.decode("latin-1").lower()
                v = value.decode("latin-1")
                headers[k] = f"{headers[k]}, {v}" if k in headers else v
            limit = self.max_body_bytes(method, path)
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await self._refuse(conn, stream, 413, f"request body over {limit} bytes")
                return None
            if conn.they_are_waiting_for_100_continue:
                await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            body = bytearray()
            while True:
                ev = await self._next_event(conn, stream)
                if isinstance(ev, h11.Data):
                    body += ev.data
                    if len(body) > limit:
                        await self._refuse(conn, stream, 413, f"request body over {limit} bytes")
                        return None
                elif isinstance(ev, h11.EndOfMessage):
                    break
                else:  # ConnectionClosed mid-body
                    return None
            return Request(method, path, dict(parse_qsl(target.query)), headers, bytes(body))
        except h11.RemoteProtocolError as exc:
            # The client broke HTTP: answer with h11's hint (400, 414, 431...) when we still can.
            status = exc.error_status_hint
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._refuse(conn, stream, status, f"malformed HTTP request: {exc}")
            else:
                self.events.protocol("http", str(status), f"malformed HTTP request: {exc}")
            return None

    async def _next_event(self, conn: h11.Connection, stream: trio.SocketStream, *, head: bool = False):
        while True:
            if head and _head_over_limit(conn):
                raise h11.RemoteProtocolError(f"request head over {MAX_HEAD_BYTES} bytes",
                                              error_status_hint=431)
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await stream.receive_some(RECV_BYTES)
                conn.receive_data(data)
                continue
            return ev

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, resp: Response, *,
                    close: bool) -> bool:
        """Send a response; False when the connection must close afterwards."""
        headers = [("content-type", resp.content_type), ("content-length", str(len(resp.body))),
                   ("server", SERVER_HEADER.decode())]
        headers += resp.headers
        if close:
            headers.append(("connection", "close"))
        try:
            await stream.send_all(conn.send(h11.Response(status_code=resp.status, headers=headers)))
            if resp.body:
                await stream.send_all(conn.send(h11.Data(data=resp.body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError as exc:
            log.error("HTTP response could not be framed: %s", exc)
            return False
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE and not close

    async def _refuse(self, conn: h11.Connection, stream: trio.SocketStream, status: int,
                      message: str) -> None:
        """Answer a request that broke HTTP or a limit, report it, and close lingering."""
        self.events.protocol("http", str(status), message)
        await self._send_simple(conn, stream, status, message)
        await self._linger(stream)

    @staticmethod
    async def _linger(stream: trio.SocketStream) -> None:
        """Shut our side, then read and drop what the client still sends (bounded), so that
        the close does not reset the connection before the client read our answer."""
        with trio.move_on_after(LINGER_S):
            try:
                await stream.send_eof()
                drained = 0
                while drained < LINGER_BYTES:
                    data = await stream.receive_some(RECV_BYTES)
                    if not data:
                        return
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return

    async def _send_simple(self, conn: h11.Connection, stream: trio.SocketStream, status: int,
                           message: str) -> None:
        import json

        kind = {400: "ProtocolError", 408: "TimeoutError", 413: "RequestTooLargeError",
                431: "RequestHeaderFieldsTooLargeError"}.get(status, "HttpError")
        body = json.dumps({"error": {"type": kind, "message": message}}).encode()
        try:
            await self._send(conn, stream, Response(status, body), close=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
