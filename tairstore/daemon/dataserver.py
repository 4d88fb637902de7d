"""The data-path server: trio around the sans-IO codec, store calls in worker threads.

Theory of operation
-------------------
``serve_data`` binds, reports its port, and hands each accepted socket to
:meth:`DataServer.handle_connection` through :func:`trio.serve_listeners` (the shape of trio's
own servers). Per connection:

- one **reader** receives straight into the codec's buffers (non-blocking ``readv``; a large
  payload lands in its own buffer, once, and one ``readv`` scatters into many blocks of a
  batch (``Connection.get_buffers``); it waits on trio only when the socket is empty, and
  yields before serving a request that was already in when it answered the previous ones, and
  every YIELD_EVERY reads, so that a client whose next request is always in at once cannot starve
  the others). A semaphore
  of ``max_inflight`` permits is taken *before* a request is started, so a client that
  pipelines too much simply stops being read: TCP backpressure, no queue to grow;
- on a volatile store a **PUT is received in place** (batches, and blocks from INPLACE_MIN_BYTES
  on; a smaller single block is received into a buffer and copied by ``store.put``, cheaper than
  a write session): once its header is decoded (before the
  payload), the reader opens a write session (memory-only there) and hands the codec each
  block's DRAM reservation (``Store.write_view``) as the block's buffer (``payload_sinks``);
  keys already stored get no buffer (their bytes are discarded). When the payload is in, the
  views are released and ``write_done`` + ``finish_write`` commit it. A refusal (auth,
  capacity, bad key) is answered once the payload is in; a connection that drops mid-payload
  has the session aborted;
- each request runs where PLACEMENT says: work that only touches memory (a DRAM get, a put
  into a volatile store, exists, match) **inline in the reader**, since a task or a thread hop
  costs more than the work, and the answers to every request of one read go out together in
  one ``writev``; anything that may touch disk or wait for an fsync in a worker thread, all
  connections sharing one :class:`trio.CapacityLimiter` of ``worker_threads``. Responses are
  written by the connection's :class:`_Writer` in completion order (matched by id), whole
  frames never interleaved. A GET answer is the store's own memoryview, released once written;
- **write sessions** live in a per-connection table (session id → WriteSession): WRITE frames
  name a session of *this* connection only, and every session still open when the connection
  ends is aborted, so a vanished client never holds reserved space for a whole lease.

Errors never leave a connection task: a store error or a semantic protocol error is an ERROR
frame for that request and the connection goes on; a framing error gets an ERROR frame with
request id 0 and the connection is closed once the requests already read are answered. Other
connections are not affected by either. Protocol errors, resets and auth refusals are counted
and logged, rate-limited (:class:`~tairstore.daemon.events.ConnectionEvents`).

Shared memory (SHM_HELLO, GET_SHM, RELEASE): when the arena is a shared file, a client on the
same host is lent blocks in place; the ops and the per-connection lease table are in
:mod:`tairstore.daemon.shm`. They touch memory only and run inline; a connection's leases are
released when it ends.

Auth (when ``auth.enabled``): a connection binds a token with an AUTH request (an unknown
token is refused at once); every request that touches a namespace is then checked against it
(``auth.check(token, namespace)``), STATS as a daemon-wide read (``"*"``). A refusal is an
ERROR (PermissionDenied) for that request only. PING and AUTH need no token.

Shutdown: cancelling ``serve_data`` closes the listeners and the readers at once (nothing new
is read), while request tasks already started, and answers being written, run on in shielded
cancel scopes until they finish or ``shutdown_grace_s`` passes. A response is sent only after
the store call returned, so an acknowledged write is one the store acknowledged; closing the
store is the caller's job.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import trio

from tairstore.config import DEFAULT_NAMESPACE
from tairstore.errors import InvalidArgumentError, PermissionDeniedError, ProtocolError, SessionError, StoreError
from tairstore.daemon.auth import Unauthenticated
from tairstore.daemon.events import ConnectionEvents
from tairstore.engine.session import OPEN, WriteSession
from tairstore.daemon.shm import LeaseTable, ShmService, Staging
from tairstore.net.limits import Limits
from tairstore.net.protocol import CONNECTION_ID, IOV_BATCH, Connection, Request, Response, Role, advance_views
from tairstore.net.schema import Code, Op, match_to_fields

__all__ = ["serve_data", "DataServer"]

log = logging.getLogger(__name__)

#: A connection's session table is swept of finished/expired entries past this size (they are
#: kept until then so that reusing one raises the store's own error, e.g. LeaseExpiredError).
SESSION_SWEEP_AT = 1024
#: Seconds a closing connection may spend aborting its leftover write sessions.
ABORT_GRACE_S = 5.0
#: A single-block PUT smaller than this is received into a buffer and copied by store.put (one
#: call); from this size on it is received straight into its DRAM reservation (four calls, no
#: copy). Batches always go in place: they need a write session anyway. Measured: a write
#: session costs ~15-20 us more than store.put, which at 64-256 KiB is more than store.put's
#: copy (~1-6 us, the buffer just received is in cache) and more than receiving into a warm
#: buffer saves; at 1 MiB the copy (~25-50 us, cold) dominates. 512 KiB: +25% on 64 KiB and
#: +10% on 256 KiB puts at 4-16 clients (see docs/PROTOCOL.md).
INPLACE_MIN_BYTES = int(os.environ.get("TAIRSTORE_INPLACE_MIN", 512 << 10))
#: SO_SNDBUF of data connections: a 4 MiB answer goes out in one writev instead of waiting for
#: the client to drain (Linux doubles it, within net.core.wmem_max; autotuning stops at 4 MiB).
SEND_BUFFER = int(os.environ.get("TAIRSTORE_SNDBUF", 4 << 20))
#: Reads a connection's reader does back to back before it lets other tasks run (it always
#: does when its socket has nothing more to read).
YIELD_EVERY = 16

#: Where each op runs. A hop to a worker thread costs tens of microseconds (two cross-thread
#: wake-ups), more than a DRAM put or get itself, so only work that may block goes there:
#: "loop"    -- no store call, or only the in-memory key map (never disk I/O);
#: "memory"  -- on the loop when it touches DRAM only: a GET whose keys are all in DRAM, any
#:              write to a volatile store (no SSD tier: no I/O, no fsync);
#: "thread"  -- may read or write disk, wait for an fsync, or scan everything (STATS).
PLACEMENT = {
    Op.PING: "loop", Op.AUTH: "loop", Op.EXISTS: "loop", Op.MATCH: "loop",
    Op.GET: "memory", Op.PUT: "memory", Op.START_WRITE: "memory", Op.WRITE: "memory",
    Op.FINISH_WRITE: "memory", Op.ABORT_WRITE: "memory", Op.DELETE: "memory",
    Op.STATS: "thread", Op.SHM_HELLO: "loop", Op.GET_SHM: "loop", Op.RELEASE: "loop",
    Op.SHM_STAGE: "loop", Op.PUT_SHM: "memory",
}
#: Ops that carry ``ns`` and are checked against the connection's token.
_NAMESPACED = frozenset({Op.PUT, Op.GET, Op.EXISTS, Op.MATCH, Op.DELETE, Op.START_WRITE, Op.GET_SHM,
                         Op.PUT_SHM})


class _Writer:
    """Writes whole frames to a non-blocking socket, in order, frames never interleaved.

    The buffers of one or more frames (header, then the blocks, never joined) go out with
    ``writev``: one syscall for everything ready, and no trip through the scheduler when the
    kernel takes it all, which for loopback and blocks up to a few MiB is the common case.
    Only a partial write waits for writability, holding the lock so that frames never
    interleave.
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.lock = trio.Lock()

    def _push(self, views: list) -> list:
        """Write what the kernel takes now; returns the views still to write (maybe [])."""
        i = 0
        while i < len(views):
            try:
                sent = os.writev(self.fd, views[i:i + IOV_BATCH])
            except BlockingIOError:
                return views[i:]
            i = advance_views(views, i, sent)
        return []

    def try_write(self, buffers: list) -> list | None:
        """Without waiting: None when every byte went out; else the views still to write
        (pass them to :meth:`write`). Raises OSError if the peer is gone."""
        if self.lock.locked():
            return [memoryview(b) for b in buffers]
        return self._push([memoryview(b) for b in buffers]) or None

    async def write(self, buffers: list) -> None:
        try:
            self.lock.acquire_nowait()
        except trio.WouldBlock:
            await self.lock.acquire()
        try:
            views = [memoryview(b) for b in buffers]
            while views:
                views = self._push(views)
                if views:
                    await trio.lowlevel.wait_writable(self.sock)
        finally:
            self.lock.release()


class _InPlace:
    """A PUT being received straight into its write session's DRAM reservations."""

    __slots__ = ("session", "views", "copies", "error")

    def __init__(self) -> None:
        self.session: WriteSession | None = None
        self.views: list = []          # per block: the store's write_view, a buffer, or None
        self.copies: dict = {}         # key -> own buffer, for a block without a DRAM view
        self.error: BaseException | None = None


class _Conn:
    """The state of one client connection."""

    def __init__(self, stream: trio.SocketStream, limits: Limits) -> None:
        self.stream = stream
        self.writer = _Writer(stream.socket)
        self.codec = Connection(Role.SERVER, limits)
        self.sessions: dict[int, WriteSession] = {}
        self.token: str | None = None
        self.inflight = trio.Semaphore(limits.max_inflight)
        #: Request id -> a PUT whose payload is being received into the store (volatile store).
        self.inplace: dict[int, _InPlace] = {}
        #: Answers of requests served inline, written together once the read is processed:
        #: (request, response buffers, views to release after the write, t0, nbytes, ok).
        self.out: list = []
        #: Shared-memory leases lent to this client (made on its first GET_SHM).
        self.leases: LeaseTable | None = None
        #: The staging file of local puts (SHM_STAGE), and whether its name is still there.
        self.staging: Staging | None = None
        self.staging_named = False


Result = tuple[dict, list, int]  # response fields, payload blocks (released after send), bytes


#: TCP_NOTSENT_LOWAT of data connections. trio's SocketStream sets 16 KiB (to keep latency
#: low for interactive streams); with it a non-blocking write takes only what can go on the
#: wire at once plus 16 KiB, so a 1 MiB answer took ~8 writev calls and a wait for
#: writability (measured: 1 MiB get 440 us, 8.7 writev per answer). Answers are whole frames
#: the client is waiting for: let the kernel queue them (up to SO_SNDBUF) in one call.
NOTSENT_LOWAT = (1 << 31) - 1  # no limit beyond SO_SNDBUF


def _tune_socket(sock: Any) -> None:
    """TCP_NODELAY, a send buffer that holds a whole large answer (see SEND_BUFFER), and no
    unsent-bytes limit (see NOTSENT_LOWAT)."""
    for level, opt, value in ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
                              (socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER),
                              (socket.IPPROTO_TCP, getattr(socket, "TCP_NOTSENT_LOWAT", None),
                               NOTSENT_LOWAT)):
        if opt is None:
            continue
        if not value:
            continue  # 0: leave it to the kernel's autotuning
        try:
            sock.setsockopt(level, opt, value)
        except (OSError, TypeError, ValueError) as exc:  # a tuning, never a reason to fail
            log.debug("setsockopt(%s, %s, %s) failed: %s", level, opt, value, exc)


def _code_name(error: BaseException) -> str:
    """A protocol error's wire code as a metric label (``frame_too_large``...)."""
    code = getattr(error, "code", 0)
    return Code(code).name.lower() if code in Code._value2member_map_ else "protocol"


def _request_bytes(req: Request) -> int:
    """Payload bytes a request carried (for metrics), even if the store refused them."""
    if req.op in (Op.PUT, Op.WRITE):
        sizes = req.fields.get("sizes")
        if isinstance(sizes, list):
            return sum(sizes)
    return 0


class DataServer:
    """Serves one :class:`~tairstore.Store` over the binary protocol (see the module doc)."""

    def __init__(self, store: Any, *, limits: Limits | None = None, auth: Any = None,
                 metrics: Any = None, shm: Any = None, lease_s: float | None = None,
                 access_log: Any = None) -> None:
        self.store = store
        self.access_log = access_log  # an AccessLogWriter, or None
        self.shm = ShmService(store, shm, auth, **({"lease_s": lease_s} if lease_s else {}))
        self.limits = limits or Limits()
        self.auth = auth
        self.metrics = metrics
        self.events = ConnectionEvents(metrics)
        self.limiter = trio.CapacityLimiter(self.limits.worker_threads)
        self._scopes: set[trio.CancelScope] = set()
        self._deadline = math.inf
        volatile = getattr(store, "volatile", None)
        if not isinstance(volatile, bool):
            config = getattr(store, "config", None)
            volatile = config is not None and getattr(config, "ssd_bytes", 1) == 0
        self._volatile = volatile
        self._has_write_view = hasattr(store, "write_view") and hasattr(store, "write_done")
        self._ops: dict[Op, Callable[[_Conn, Request], Result]] = {
            Op.PUT: self._put, Op.GET: self._get, Op.EXISTS: self._exists, Op.MATCH: self._match,
            Op.DELETE: self._delete, Op.START_WRITE: self._start_write, Op.WRITE: self._write,
            Op.FINISH_WRITE: self._finish_write, Op.ABORT_WRITE: self._abort_write,
            Op.STATS: self._stats, Op.SHM_HELLO: self._shm_hello, Op.GET_SHM: self._get_shm,
            Op.RELEASE: self._release, Op.SHM_STAGE: self._shm_stage, Op.PUT_SHM: self._put_shm,
        }

    # ------------------------------------------------------------------------ lifecycle
    def begin_shutdown(self) -> None:
        """Give every running request task (and later cleanup) ``shutdown_grace_s`` more."""
        self._deadline = trio.current_time() + self.limits.shutdown_grace_s
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, self._deadline)

    @contextmanager
    def _shielded(self, limit: float = math.inf) -> Iterator[None]:
        """Run to completion despite the server's cancellation, but not past the grace period."""
        scope = trio.CancelScope(shield=True, deadline=min(self._deadline, trio.current_time() + limit))
        self._scopes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._scopes.discard(scope)

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        """Serve one client until it disconnects, breaks the framing, or the server stops."""
        _tune_socket(stream.socket)
        conn = _Conn(stream, self.limits)
        if self._volatile and self._has_write_view:
            # Memory-only start_write: cheap enough for the reader, between two recvs.
            conn.codec.payload_sinks = partial(self._payload_sinks, conn)
        try:
            async with trio.open_nursery() as nursery:
                await self._read_loop(conn, nursery)
        except Exception:  # noqa: BLE001 - one connection's bug must not stop the server
            log.exception("data connection failed")
        finally:
            conn.codec.close()  # drops its references to a half-received payload's views
            self._discard_out(conn)
            for rec in conn.inplace.values():
                self._drop_inplace(rec)
            conn.inplace.clear()
            if conn.leases is not None:
                conn.leases.close()  # a client that died holding leases frees their slots here
            if conn.staging is not None:
                conn.staging.unlink()
                conn.staging = None
            if conn.sessions:
                with self._shielded(ABORT_GRACE_S):
                    await trio.to_thread.run_sync(self._abort_all, conn, limiter=self.limiter)

    def _abort_all(self, conn: _Conn) -> None:
        for session in list(conn.sessions.values()):
            try:
                self.store.abort_write(session)
            except StoreError as exc:
                log.warning("aborting write session %d of a closed connection: %s", session.id, exc)
        conn.sessions.clear()

    async def _read_loop(self, conn: _Conn, nursery: trio.Nursery) -> None:
        """Receive straight into the codec's buffers; serve cheap requests inline.

        The socket is read with plain non-blocking ``readv`` and the loop waits (a trio
        checkpoint) only when there is nothing to read, or every YIELD_EVERY reads so that a
        client that keeps the socket full cannot starve the other connections.
        """
        codec, sock, fd = conn.codec, conn.stream.socket, conn.writer.fd
        readv = os.readv
        reads = 0
        answered = False
        while True:
            try:
                n = readv(fd, codec.get_buffers())
            except BlockingIOError:
                if conn.out:
                    await self._flush(conn)
                await trio.lowlevel.wait_readable(sock)
                reads, answered = 0, False
                continue
            except OSError as exc:
                self.events.connection("data", "reset", f"reading from a client failed: {exc}")
                return  # reset by the peer: same as a close
            if n == 0:
                return
            if answered:
                # Fairness: this client's next request was in as soon as we answered (it runs
                # on another core, or pipelines): let the connections that waited go first,
                # or it could be served up to YIELD_EVERY times in a row while they wait.
                # (Only then: a checkpoint per answer would cost a loop cycle per request.)
                reads, answered = 0, False
                await trio.lowlevel.checkpoint()
            for event in codec.buffers_filled(n):
                if isinstance(event, Request):
                    if not self._take_permit(conn):
                        await self._flush(conn)
                        await conn.inflight.acquire()
                    if self._on_loop(event):
                        # No task for it: it cannot block, and its answer is written with
                        # the others of this read, before the next read (backpressure).
                        self._serve_inline(conn, event)
                    else:
                        nursery.start_soon(self._serve_request, conn, event)
                elif not event.fatal:
                    if isinstance(event.error, ProtocolError):
                        self.events.protocol("data", _code_name(event.error), str(event.error))
                    if not self._take_permit(conn):
                        await self._flush(conn)
                        await conn.inflight.acquire()
                    self._queue(conn, event.request_id, Response(event.request_id, error=event.error),
                                [], None)
                else:
                    self.events.protocol("data", _code_name(event.error),
                                         f"closing the connection after a framing error: {event.error}")
                    await self._flush(conn)
                    await self._send_error(conn, CONNECTION_ID, event.error, permit=False)
                    return
            if conn.out:
                await self._flush(conn)
                answered = True
            reads += 1
            if reads >= YIELD_EVERY:
                reads = 0
                await trio.lowlevel.checkpoint()

    @staticmethod
    def _take_permit(conn: _Conn) -> bool:
        try:
            conn.inflight.acquire_nowait()
        except trio.WouldBlock:
            return False
        return True

    # ------------------------------------------------------------------------- requests
    def _serve_inline(self, conn: _Conn, req: Request) -> None:
        """Run a request that cannot block, now; its answer joins ``conn.out``."""
        t0 = time.perf_counter()
        blocks: list = []
        try:
            fields, blocks, nbytes = self._call(conn, req)
            response, ok = Response(req.id, fields, blocks), True
        except StoreError as exc:
            response, ok, nbytes = Response(req.id, error=exc), False, _request_bytes(req)
        except Exception as exc:  # noqa: BLE001 - a bug answers INTERNAL, the server lives
            log.exception("request %s failed", req.op.name)
            response, ok, nbytes = Response(req.id, error=exc), False, _request_bytes(req)
        finally:
            rec = conn.inplace.pop(req.id, None)
            if rec is not None:  # refused before the store took the payload (e.g. auth)
                self._drop_inplace(rec)
        # SHM_HELLO is the probe every loopback client sends when it starts (see
        # tairstore.net.shmclient.shm_reachable): a handshake, not traffic to count.
        obs = None if req.op is Op.SHM_HELLO else (req.op, t0, nbytes, ok)
        self._queue(conn, req.id, response, blocks, obs)

    def _queue(self, conn: _Conn, rid: int, response: Response, blocks: list, obs: tuple | None) -> None:
        try:
            buffers = conn.codec.send(response)
        except StoreError as exc:  # e.g. the answer would exceed max_frame_bytes
            buffers = conn.codec.send(Response(rid, error=exc))
        conn.out.append((buffers, blocks, obs))

    async def _flush(self, conn: _Conn) -> None:
        """Write every queued inline answer with one writev; then release views and permits."""
        out, conn.out = conn.out, []
        if len(out) == 1:
            buffers = out[0][0]
        else:
            buffers = [b for item in out for b in item[0]]
        try:
            try:
                rest = conn.writer.try_write(buffers)
            except OSError as exc:
                self.events.connection("data", "reset", f"writing answers failed: {exc}")
                rest = None  # the client left; its requests are simply not acknowledged
            if rest is not None:
                with self._shielded():
                    try:
                        await conn.writer.write(rest)
                    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        self.events.connection("data", "reset", f"writing answers failed: {exc!r}")
        finally:
            self._finish_out(conn, out)

    def _finish_out(self, conn: _Conn, out: list) -> None:
        now = time.perf_counter()
        for _, blocks, obs in out:
            for view in blocks:
                if isinstance(view, memoryview):
                    view.release()  # unpins the DRAM slot (R2) as soon as the bytes are out
            conn.inflight.release()
            if obs is not None and self.metrics is not None:
                op, t0, nbytes, ok = obs
                self.metrics.observe_request(op.name.lower(), now - t0, nbytes, ok)

    def _discard_out(self, conn: _Conn) -> None:
        out, conn.out = conn.out, []
        for _, blocks, _obs in out:
            for view in blocks:
                if isinstance(view, memoryview):
                    view.release()

    async def _serve_request(self, conn: _Conn, req: Request) -> None:
        """A request that may block: its store call runs in a worker thread."""
        t0 = time.perf_counter()
        ok, blocks = False, []
        nbytes = _request_bytes(req)  # what was read, even if the store refuses it
        try:
            with self._shielded():
                try:
                    self._check_auth(conn, req)
                    fields, blocks, nbytes = await trio.to_thread.run_sync(
                        self._ops[req.op], conn, req, limiter=self.limiter)
                    response = Response(req.id, fields, blocks)
                    ok = True
                except StoreError as exc:
                    response = Response(req.id, error=exc)
                except Exception as exc:  # noqa: BLE001 - a bug answers INTERNAL, the server lives
                    log.exception("request %s failed", req.op.name)
                    response = Response(req.id, error=exc)
                await self._send(conn, response)
        finally:
            for view in blocks:
                if isinstance(view, memoryview):
                    view.release()  # unpins the DRAM slot (R2) as soon as the bytes are out
            conn.inflight.release()
            if self.metrics is not None:
                self.metrics.observe_request(req.op.name.lower(), time.perf_counter() - t0, nbytes, ok)

    async def _send_error(self, conn: _Conn, request_id: int, error: StoreError, *,
                          permit: bool = True) -> None:
        try:
            with self._shielded():
                await self._send(conn, Response(request_id, error=error))
        finally:
            if permit:
                conn.inflight.release()

    async def _send(self, conn: _Conn, response: Response) -> None:
        try:
            buffers = conn.codec.send(response)
        except StoreError as exc:  # e.g. the answer would exceed max_frame_bytes
            buffers = conn.codec.send(Response(response.id, error=exc))
        try:
            await conn.writer.write(buffers)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # The client left; its requests are simply not acknowledged.
            self.events.connection("data", "reset", f"writing an answer failed: {exc!r}")

    def _on_loop(self, req: Request) -> bool:
        """Whether ``req`` runs on the event loop (see PLACEMENT)."""
        where = PLACEMENT[req.op]
        if where == "loop":
            return True
        if where == "thread":
            return False
        if req.op is Op.GET:
            if self._volatile:
                return True
            # The key map says where each block is; an eviction racing this check makes one
            # get read SSD on the loop, which is rare and bounded by one block read.
            ns, keys = req.fields.get("ns", DEFAULT_NAMESPACE), req.fields["keys"]
            try:
                if len(keys) == 1 and hasattr(self.store, "tier_of"):
                    return self.store.tier_of(keys[0], namespace=ns) == "dram"
                tiers = self.store.match(keys, "exact", namespace=ns).tiers
            except StoreError:
                return False  # let the real call raise, from a thread
            return all(t == "dram" for t in tiers)
        return self._volatile

    def _check_auth(self, conn: _Conn, req: Request) -> None:
        if req.op in _NAMESPACED:
            self._check_token(conn, req.fields.get("ns", DEFAULT_NAMESPACE))
        elif req.op is Op.STATS:
            self._check_token(conn, "*")

    def _check_token(self, conn: _Conn, namespace: str) -> None:
        """Refuse (and report) unless the connection's token covers ``namespace``."""
        if self.auth is not None and self.auth.enabled:
            try:
                self.auth.check(conn.token, namespace)
            except PermissionDeniedError as exc:
                self.events.auth("data", exc)
                raise

    def _call(self, conn: _Conn, req: Request) -> Result:
        """Run ``req`` here (inline); raises what the store raises."""
        op = req.op
        if conn.staging_named and op is not Op.SHM_STAGE:
            conn.staging.unlink()  # the client mapped it before sending this: nobody else may
            conn.staging_named = False
        if op is Op.PING:
            return {}, [], 0
        if op is Op.AUTH:
            self._authenticate(conn, req.fields["token"])
            return {}, [], 0
        self._check_auth(conn, req)
        return self._ops[op](conn, req)

    # --------------------------------------------------------- PUT straight into the store
    def _routes_auto(self, ns: Any) -> bool:
        """Whether a put of ``ns`` without a tier goes to the local tiers as usual (no namespace
        strategy says otherwise); write sessions cannot follow a strategy."""
        route = getattr(self.store, "route", None)
        if route is None:
            return True
        try:
            return route(ns) == "auto"
        except StoreError:
            return False  # a bad namespace, or an always:<tier> that fails: put answers it

    def _payload_sinks(self, conn: _Conn, rid: int, op: Op, fields: dict) -> list | None:
        """The codec's ``payload_sinks``: where each block of a PUT is to be received.

        Volatile store only (``start_write`` is memory-only there): reserve the blocks now and
        hand the codec each one's DRAM reservation, so the payload is received once, into the
        store. Keys already stored get None (their bytes are discarded); any refusal (auth,
        capacity, bad key) discards the whole payload and is answered once it is in.
        """
        if op is not Op.PUT:
            return None
        keys, sizes = fields["keys"], fields["sizes"]
        if len(keys) == 1 and sizes[0] < INPLACE_MIN_BYTES:
            return None  # a small block: store.put's copy costs less than a write session
        if not self._routes_auto(fields.get("ns", DEFAULT_NAMESPACE)):
            return None  # a namespace strategy places the blocks: store.put / put_many do that
        rec = _InPlace()
        conn.inplace[rid] = rec
        try:
            self._check_token(conn, fields.get("ns", DEFAULT_NAMESPACE))
            rec.session = session = self.store.start_write(
                keys, sizes, namespace=fields.get("ns", DEFAULT_NAMESPACE))
            todo = set(session.keys_to_write)
            for key, size in zip(keys, sizes):
                if key not in todo:
                    rec.views.append(None)
                    continue
                view = self.store.write_view(session, key)
                if view is None:  # no DRAM reservation: received here, then store.write
                    rec.copies[key] = buf = np.empty(size, np.uint8)
                    view = memoryview(buf)
                rec.views.append(view)
            return list(rec.views)
        except StoreError as exc:
            rec.error = exc
        except Exception as exc:  # noqa: BLE001 - answered INTERNAL once the payload is in
            log.exception("reserving a put's payload failed")
            rec.error = exc
        self._drop_inplace(rec)
        return [None] * len(keys)

    def _drop_inplace(self, rec: _InPlace) -> None:
        """Release a PUT's views and abort its session (nothing is committed)."""
        views, rec.views = rec.views, []
        for view in views:
            if view is not None:
                view.release()
        rec.copies = {}
        if rec.session is not None:
            session, rec.session = rec.session, None
            try:
                self.store.abort_write(session)
            except StoreError as exc:
                log.warning("aborting an interrupted put: %s", exc)

    def _put_inplace(self, rec: _InPlace, req: Request) -> Result:
        keys = req.fields["keys"]
        nbytes = sum(req.fields["sizes"])
        views, rec.views = rec.views, []
        req.blocks = []
        for view in views:
            if view is not None:
                view.release()  # before write_done: the checksum covers the final bytes
        if rec.error is not None:
            raise rec.error
        session, copies = rec.session, rec.copies
        rec.session, rec.copies = None, {}
        def fill(key: bytes) -> None:
            if key in copies:
                self.store.write(session, key, copies[key])
            else:
                self.store.write_done(session, key)

        written = self._write_session(session, fill)
        return {"stored": [k in written for k in keys]}, [], nbytes

    def _authenticate(self, conn: _Conn, token: str) -> None:
        if self.auth is not None and self.auth.enabled:
            identify = getattr(self.auth, "identify", None)
            if identify is not None and identify(token) is None:
                error = Unauthenticated("unknown token")
                self.events.auth("data", error)
                raise error
        conn.token = token

    # ------------------------------------------------------ store calls (worker threads)
    def _put(self, conn: _Conn, req: Request) -> Result:
        rec = conn.inplace.pop(req.id, None)
        if rec is not None:
            return self._put_inplace(rec, req)
        ns, keys, blocks = req.fields.get("ns", DEFAULT_NAMESPACE), req.fields["keys"], req.blocks
        nbytes = sum(len(b) for b in blocks)
        if len(keys) == 1:
            return {"stored": [self.store.put(keys[0], blocks[0], namespace=ns)]}, [], nbytes
        # A batch is one put_many: one admission, one commit (one fsync in sync mode).
        return {"stored": self.store.put_many(keys, blocks, namespace=ns)}, [], nbytes

    def _write_session(self, session, fill) -> set:
        """Fill every key of a fresh session with ``fill(key)`` and commit them all; on any
        failure abort it (releasing every reservation). Returns the keys committed."""
        try:
            for key in session.keys_to_write:
                fill(key)
            self.store.finish_write(session, session.keys_to_write)
        except BaseException:
            self.store.abort_write(session)
            raise
        return set(session.keys_to_write)

    def _get(self, conn: _Conn, req: Request) -> Result:
        ns, cap = req.fields.get("ns", DEFAULT_NAMESPACE), req.fields.get("cap")
        keys = req.fields["keys"]
        # One lock round for every lookup of the batch (get_many), not one per key.
        found = self.store.get_many(keys, namespace=ns) if len(keys) > 1 else [
            self.store.get(keys[0], namespace=ns)]
        views = [v for v in found if v is not None]
        if cap is not None and any(v.nbytes > cap for v in views):
            big = max(v.nbytes for v in views)
            for view in views:
                view.release()
            # get_into's contract, checked here so the block is not sent for nothing.
            raise InvalidArgumentError(f"out holds {cap} bytes; the block has {big}")
        sizes = [-1 if v is None else v.nbytes for v in found]
        return {"sizes": sizes}, views, sum(v.nbytes for v in views)

    def _exists(self, conn: _Conn, req: Request) -> Result:
        f = req.fields
        return {"hits": self.store.exists(f["keys"], namespace=f.get("ns", DEFAULT_NAMESPACE))}, [], 0

    def _match(self, conn: _Conn, req: Request) -> Result:
        f = req.fields
        ns = f.get("ns", DEFAULT_NAMESPACE)
        result = self.store.match(f["keys"], f["mode"], f.get("window"), namespace=ns)
        if self.access_log is not None:
            # A prefix lookup is what `tairstore optimize` replays (docs/OPTIMIZER.md).
            self.access_log.record(ns, "", f["keys"])
        return match_to_fields(result), [], 0

    def _delete(self, conn: _Conn, req: Request) -> Result:
        f = req.fields
        return {"count": self.store.delete(f["keys"], namespace=f.get("ns", DEFAULT_NAMESPACE))}, [], 0

    def _start_write(self, conn: _Conn, req: Request) -> Result:
        f = req.fields
        extra = {"lease_s": f["lease"]} if "lease" in f else {}
        session = self.store.start_write(f["keys"], f["sizes"], namespace=f.get("ns", DEFAULT_NAMESPACE),
                                         **extra)
        if len(conn.sessions) >= SESSION_SWEEP_AT:
            for sid in [sid for sid, s in conn.sessions.items() if s.state != OPEN]:
                del conn.sessions[sid]
        conn.sessions[session.id] = session
        return {"sid": session.id, "keys": list(session.keys_to_write), "lease": session.lease_s}, [], 0

    def _session(self, conn: _Conn, sid: int) -> WriteSession:
        session = conn.sessions.get(sid)
        if session is None:
            raise SessionError(f"write session {sid} is unknown on this connection "
                               "(finished, aborted, or started on another connection)")
        return session

    def _write(self, conn: _Conn, req: Request) -> Result:
        session = self._session(conn, req.fields["sid"])
        for key, block in zip(req.fields["keys"], req.blocks):
            self.store.write(session, key, block)
        return {}, [], sum(len(b) for b in req.blocks)

    def _finish_write(self, conn: _Conn, req: Request) -> Result:
        sid = req.fields["sid"]
        count = self.store.finish_write(self._session(conn, sid), req.fields["keys"])
        conn.sessions.pop(sid, None)
        return {"count": count}, [], 0

    def _abort_write(self, conn: _Conn, req: Request) -> Result:
        # Like Store.abort_write on a finished session: nothing to do is not an error.
        session = conn.sessions.pop(req.fields["sid"], None)
        if session is not None:
            self.store.abort_write(session)
        return {}, [], 0

    def _stats(self, conn: _Conn, req: Request) -> Result:
        return {"stats": self.store.stats()}, [], 0

    def _shm_hello(self, conn: _Conn, req: Request) -> Result:
        return self.shm.hello(conn.token), [], 0

    def _leases(self, conn: _Conn) -> LeaseTable:
        if conn.leases is None:
            conn.leases = LeaseTable(self.shm.lease_s)
        return conn.leases

    def _get_shm(self, conn: _Conn, req: Request) -> Result:
        fields = self.shm.get(self._leases(conn), conn.token, req.fields)
        return fields, [], sum(n for n in fields["sizes"] if n > 0)

    def _shm_stage(self, conn: _Conn, req: Request) -> Result:
        if conn.staging is not None:
            conn.staging.unlink()
        conn.staging = self.shm.stage(req.fields["size"], self.limits.max_frame_bytes, conn.token)
        conn.staging_named = True
        return {"path": conn.staging.path, "size": conn.staging.size}, [], 0

    def _put_shm(self, conn: _Conn, req: Request) -> Result:
        if conn.staging is None:
            raise InvalidArgumentError("no staging file on this connection: send SHM_STAGE first")
        if conn.staging_named:  # served in a thread, so _call did not see it
            conn.staging_named = False
            conn.staging.unlink()
        req.blocks = conn.staging.blocks(req.fields["offs"], req.fields["sizes"])
        return self._put(conn, req)  # as a PUT whose payload is already here

    def _release(self, conn: _Conn, req: Request) -> Result:
        return self.shm.release(self._leases(conn), req.fields), [], 0


async def serve_data(store: Any, *, host: str = "127.0.0.1", port: int = 0,
                     limits: Limits | None = None, auth: Any = None, metrics: Any = None,
                     shm: Any = None, lease_s: float | None = None, access_log: Any = None,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``store`` over the binary data-path protocol until cancelled.

    Args:
        store: an open :class:`tairstore.Store` (closing it stays the caller's job).
        host: the address to bind; loopback by default.
        port: the TCP port; 0 picks a free one.
        limits: frame, batch, in-flight and thread limits (:class:`Limits` defaults if None).
        auth: an ``Authenticator`` (``enabled``, ``check(token, namespace, admin=)``), or None
            for an open server.
        metrics: an object with ``observe_request(op, seconds, nbytes, ok)``, or None.
        shm: the arena's SharedBacking when it is in shared memory (see
            :mod:`tairstore.daemon.shm`), or None.
        lease_s: how long a shared-memory lease lasts unless given back (None: the default).
        task_status: receives the bound port once the server accepts connections.

    On cancellation the listeners close at once and requests already read get up to
    ``limits.shutdown_grace_s`` seconds to finish; then it returns (by raising Cancelled).
    """
    server = DataServer(store, limits=limits, auth=auth, metrics=metrics, shm=shm, lease_s=lease_s,
                        access_log=access_log)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as handlers:
        task_status.started(bound)
        try:
            await trio.serve_listeners(server.handle_connection, listeners, handler_nursery=handlers)
        finally:
            server.begin_shutdown()

