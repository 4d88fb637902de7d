"""The data-path wire protocol, sans-IO: bytes in, events out; no sockets, no trio.

Both the trio server and the clients drive one :class:`Connection` per socket. The transport
feeds received bytes in (``receive_data``, or ``get_buffer`` + ``buffer_filled`` to receive
straight into the codec's buffers) and writes the buffers ``send`` returns, in order.

Rules
-----
1. A frame is a 28-byte prelude, a msgpack header and a raw payload::

       magic "TS" | version u8 | kind u8 | flags u32 | request id u64 | header_len u32 | payload_len u64

   little-endian. Block bytes are never re-encoded: a batch lists its ``sizes`` in the header
   and the payload is the blocks back to back.
2. The prelude is checked before anything else is buffered: magic, version, ``header_len <=
   max_header_bytes``, ``header_len + payload_len <= max_frame_bytes`` and the request id. A
   failure there is a *framing* error: the byte stream can no longer be trusted, the event is
   ``ProtocolErrorEvent(fatal=True)`` and the connection is BROKEN (close it; the server may
   first answer the requests it already read, then send an ERROR frame with request id 0).
   Receiving on a BROKEN connection, or sending a request on one, raises a local
   :class:`ProtocolError`. One exception (server): a PUT/WRITE frame over ``max_frame_bytes``
   but within ``MAX_DRAIN_BYTES`` is read, its payload discarded, and answered with a
   :class:`~tairstore.errors.CapacityError` event (``fatal=False``) like a semantic error,
   since the client that sent it is still sending and a close would reach it as a reset.
3. A well-framed message whose content is wrong (unknown opcode, header not a msgpack map,
   missing or mistyped field, more than ``max_batch`` keys, payload not the sum of the declared
   sizes, nonzero flags) is a *semantic* error: ``ProtocolErrorEvent(fatal=False,
   request_id=id)``. The server answers that id with an ERROR frame and the connection goes on.
4. Pipelining: a client may have many requests in flight; every response carries its
   request's id and responses may come in any order. Request id 0 is reserved for
   connection-level errors; a server never sees one id twice while it is in flight, and a
   client never receives a response for an id it did not send.
5. Unknown header fields are ignored, so that a minor revision may add optional ones.
6. Every malformed input gives a ProtocolError (raised or as an event), never another
   exception, and the decoder never waits for bytes a frame did not announce.
7. Payload sinks (server): when ``payload_sinks`` is set, a PUT/WRITE request whose header is
   valid and whose ``sizes`` add up to the payload is offered to it *as soon as the header is
   in*, before any payload byte is buffered. It may return one writable buffer per block
   (exactly that block's size; None: discard the block's bytes): each block's bytes are then
   received straight into its buffer, and the Request's ``blocks`` are those buffers (None for
   a discarded one). This is how the daemon receives a put into the store's own memory.

Receive-side transitions::

    state     when                                   emits                         next
    PRELUDE   28 bytes in, prelude valid             -                             HEADER
    PRELUDE   28 bytes in, prelude invalid           ProtocolErrorEvent(fatal)     BROKEN
    HEADER    header_len bytes in, payload_len > 0   -                             PAYLOAD
    HEADER    header_len bytes in, payload_len == 0  Request/Response or error     PRELUDE
    PAYLOAD   payload_len bytes in                   Request/Response or error     PRELUDE
    BROKEN    anything                               raises ProtocolError(local)   BROKEN
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import msgpack
import numpy as np

from tairstore.errors import CapacityError, ProtocolError, StoreError
from tairstore.net.limits import DEFAULT_LIMITS, MAX_DRAIN_BYTES, Limits
from tairstore.net.schema import (
    BLOCK_OPS_REQUEST,
    BLOCK_OPS_RESPONSE,
    REQUEST_FIELDS,
    RESPONSE_FIELDS,
    Code,
    Op,
    error_from_fields,
    error_to_fields,
    validate_fields,
)

__all__ = [
    "MAGIC", "VERSION", "PRELUDE", "CONNECTION_ID", "Op", "Code", "Role", "Connection",
    "Request", "Response", "ProtocolErrorEvent", "Event", "IOV_BATCH", "advance_views",
]

MAGIC = b"TS"
VERSION = 1
#: magic, version, kind, flags, request id, header length, payload length.
PRELUDE = struct.Struct("<2sBBIQIQ")
#: The request id of an ERROR frame about the connection itself (a framing error).
CONNECTION_ID = 0
#: Below this many bytes still to come, a payload is read through the scratch buffer (one
#: recv may then also pick up the next frames); above, straight into the payload's own buffer.
DIRECT_READ_MIN = 16 << 10
#: Scratch receive buffer: big enough for many small frames per recv, small enough that the
#: bytes of a large payload copied out of it are a small fraction of the payload.
SCRATCH_BYTES = 64 << 10
#: After a frame with a large payload, the next read in the PRELUDE state asks for this many
#: bytes only: enough for a prelude and a typical header, so that little of the next large
#: payload is copied out of the scratch buffer (back to the whole scratch after small frames).
HEAD_READ = 4 << 10
#: Frames whose payload is smaller than this are sent as one joined buffer (one syscall; the
#: copy is cheaper than another send).
JOIN_BELOW = 32 << 10


class Role(enum.Enum):
    """Which side of the connection this codec speaks for."""

    CLIENT = "client"
    SERVER = "server"


REQUEST_OPS = frozenset(op for op in Op if op not in (Op.OK, Op.ERROR))
RESPONSE_KINDS = frozenset({Op.OK, Op.ERROR})
#: What each side may send and receive.
SENDS = {Role.CLIENT: REQUEST_OPS, Role.SERVER: RESPONSE_KINDS}
RECEIVES = {Role.CLIENT: RESPONSE_KINDS, Role.SERVER: REQUEST_OPS}


@dataclass
class Request:
    """A request: ``op`` with its header ``fields`` and the payload split into ``blocks``."""

    id: int
    op: Op
    fields: dict = field(default_factory=dict)
    blocks: list = field(default_factory=list)


@dataclass
class Response:
    """A response to request ``id``: OK with ``fields`` and ``blocks``, or ERROR with ``error``.

    In a received GET response a missing block is None in ``blocks``.
    """

    id: int
    fields: dict = field(default_factory=dict)
    blocks: list = field(default_factory=list)
    error: StoreError | None = None

    @property
    def ok(self) -> bool:
        """True for an OK response."""
        return self.error is None


@dataclass
class ProtocolErrorEvent:
    """The peer broke the protocol.

    Attributes:
        error: the :class:`ProtocolError` (``remote=True``), or on a client the server's
            connection-level error.
        request_id: the request it concerns (semantic errors), None for framing errors.
        fatal: True when the connection is unusable (framing error) and must be closed.
    """

    error: StoreError
    request_id: int | None = None
    fatal: bool = True


Event = Union[Request, Response, ProtocolErrorEvent]

_PRELUDE, _HEADER, _PAYLOAD, _BROKEN = "PRELUDE", "HEADER", "PAYLOAD", "BROKEN"


#: Buffers per writev / sendmsg call: below Linux's IOV_MAX (1024).
IOV_BATCH = 512


def advance_views(views: list, i: int, sent: int) -> int:
    """After a gathered write from ``views[i:]`` took ``sent`` bytes, the index of the first
    view not fully written; a partly written view is replaced by its unwritten rest."""
    while sent and i < len(views):
        n = views[i].nbytes
        if sent >= n:
            sent -= n
            i += 1
        else:
            views[i] = views[i][sent:]
            sent = 0
    return i


def _remote(code: Code, message: str) -> ProtocolError:
    return ProtocolError(message, remote=True, code=int(code))


def _local(code: Code, message: str) -> ProtocolError:
    return ProtocolError(message, remote=False, code=int(code))


def _byte_view(buf: Any) -> memoryview:
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class Connection:
    """One side of one connection: a framing state machine plus the ids in flight.

    Args:
        role: :attr:`Role.CLIENT` sends requests and receives responses; :attr:`Role.SERVER`
            the opposite.
        limits: frame, header and batch limits applied to what is received (and sent).
    """

    def __init__(self, role: Role, limits: Limits | None = None) -> None:
        self.role = role
        self.limits = limits or DEFAULT_LIMITS
        self._state = _PRELUDE
        self._want = PRELUDE.size
        self._buf = bytearray()
        self._scratch = memoryview(bytearray(SCRATCH_BYTES))
        self._head = self._scratch  # what get_buffer offers between payloads (see HEAD_READ)
        self._direct = False
        self._error: ProtocolError | None = None
        self._kind = self._id = self._flags = self._payload_len = 0
        self._header = b""
        # The payload being received, as segments (writable views, or None: discarded bytes)
        # back to back: one buffer, or one per block when a payload sink supplied them.
        self._segs: list = []
        self._sizes: list[int] = []
        self._seg = 0          # index of the segment being filled
        self._seg_off = 0      # bytes of it already filled
        self._filled = 0
        self._payload_in_sink = False
        self._early: tuple | None = None  # (op, fields, blocks) decoded at header time
        self._decoded: tuple | None = None  # (op, fields) decoded at header time, no sink
        self._oversize = False  # the frame being received is over the limit: drain, refuse it
        #: Server: ``fn(request_id, op, fields) -> list[buffer | None] | None``, see rule 7.
        self.payload_sinks: Callable[[int, Op, dict], list | None] | None = None
        # CLIENT: ids sent and not yet answered; SERVER: ids received and not yet answered.
        self._pending: dict[int, Op] = {}
        self._sinks: dict[int, memoryview] = {}

    # ------------------------------------------------------------------------------ state
    @property
    def state(self) -> str:
        """The receive state: PRELUDE, HEADER, PAYLOAD or BROKEN."""
        return self._state

    @property
    def broken(self) -> bool:
        """True after a framing error: close the connection."""
        return self._state is _BROKEN

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered (client), or received and not answered (server)."""
        return len(self._pending)

    def _check_usable(self) -> None:
        if self._state is _BROKEN:
            raise _local(Code.BROKEN, f"the connection is broken ({self._error}); close it")

    # ---------------------------------------------------------------------------- receive
    def get_buffer(self) -> memoryview:
        """A writable buffer for the transport's next ``recv_into``; then call ``buffer_filled``.

        While a large payload is coming this is the rest of the payload's own buffer (or of
        the current block's sink), so its bytes are received exactly once, into the buffer the
        event hands out.
        """
        if self._state is _PAYLOAD:
            seg = self._segs[self._seg]
            if seg is not None:
                left = self._sizes[self._seg] - self._seg_off
                if left >= DIRECT_READ_MIN:
                    self._direct = True
                    return seg[self._seg_off:]
            self._direct = False
            return self._scratch
        if self._state is _BROKEN:
            self._check_usable()
        self._direct = False
        return self._head if self._state is _PRELUDE else self._scratch

    def get_buffers(self, max_buffers: int = 64) -> list[memoryview]:
        """Like :meth:`get_buffer`, for a scatter read (``readv`` / ``recvmsg_into``).

        While a payload is coming straight into its block buffers, this is the rest of the
        current block and the blocks after it (up to ``max_buffers``, up to the first one
        whose bytes are discarded), so that one read can fill many blocks of a batch. The
        last buffer offered ends where the payload ends: the next frame is never read into a
        block. Otherwise it is the one buffer :meth:`get_buffer` returns. Pass the number of
        bytes read to :meth:`buffers_filled`.
        """
        if self._state is _PAYLOAD and self._segs[self._seg] is not None:
            segs, sizes, i = self._segs, self._sizes, self._seg
            out = [segs[i][self._seg_off:]]
            total = sizes[i] - self._seg_off
            i += 1
            while i < len(segs) and len(out) < max_buffers:
                seg = segs[i]
                if seg is None:
                    break
                if sizes[i]:
                    out.append(seg)
                    total += sizes[i]
                i += 1
            # Worth a direct read even when the current block has only a few bytes left: the
            # blocks after it take the rest (only the payload's tail goes through scratch).
            if total >= DIRECT_READ_MIN:
                self._direct = True
                return out
        return [self.get_buffer()]

    def buffers_filled(self, nbytes: int) -> list[Event]:
        """Account for ``nbytes`` read into the buffers from :meth:`get_buffers` (or the one
        from :meth:`get_buffer`), in order; returns the events they complete."""
        if not self._direct:
            return self.receive_data(self._scratch[:nbytes])
        self._direct = False
        sizes = self._sizes
        while nbytes:
            take = min(nbytes, sizes[self._seg] - self._seg_off)
            if not take:
                raise ValueError("more bytes filled than get_buffers offered")
            nbytes -= take
            self._filled += take
            self._seg_off += take
            if self._filled == self._payload_len:
                if nbytes:
                    raise ValueError("more bytes filled than get_buffers offered")
                return [self._complete()]
            if self._seg_off == sizes[self._seg]:
                self._next_seg()
        return []

    #: After :meth:`get_buffer`: the same accounting, for the one buffer it offered.
    buffer_filled = buffers_filled

    def _next_seg(self) -> None:
        """Move to the next segment that still wants bytes (skipping empty blocks)."""
        i, sizes = self._seg + 1, self._sizes
        while i < len(sizes) - 1 and sizes[i] == 0:
            i += 1
        self._seg, self._seg_off = i, 0

    def receive_data(self, data: Any) -> list[Event]:
        """Feed received bytes; returns the events they complete (possibly none)."""
        self._check_usable()
        view = _byte_view(data)
        events: list[Event] = []
        pos, end = 0, len(view)
        try:
            while pos < end:
                if self._state is _PAYLOAD:
                    i, off = self._seg, self._seg_off
                    take = min(end - pos, self._sizes[i] - off)
                    seg = self._segs[i]
                    if seg is not None:
                        seg[off:off + take] = view[pos:pos + take]
                    self._filled += take
                    self._seg_off = off + take
                    pos += take
                    if self._seg_off == self._sizes[i]:
                        self._next_seg()
                    if self._filled == self._payload_len:
                        events.append(self._complete())
                        if self._state is _BROKEN:
                            break
                    continue
                take = min(end - pos, self._want - len(self._buf))
                self._buf += view[pos:pos + take]
                pos += take
                if len(self._buf) == self._want:
                    event = _ON_COMPLETE[self._state](self)
                    if event is not None:
                        events.append(event)
                    if self._state is _BROKEN:
                        # A fatal event above (e.g. a response for an unknown request id):
                        # nothing after it in the stream can be trusted or framed.
                        break
        except ProtocolError as exc:
            # Framing error: nothing after this point of the stream can be trusted.
            self._state = _BROKEN
            self._error = exc
            self._buf.clear()
            self._drop_payload()
            events.append(ProtocolErrorEvent(exc, None, True))
        return events

    def _drop_payload(self) -> None:
        self._segs, self._sizes, self._seg, self._seg_off = [], [], 0, 0
        self._early = self._decoded = None
        self._oversize = False

    def close(self) -> None:
        """The transport is gone: drop every reference to a partly received payload's buffers
        (a payload sink's views are no longer written to), and refuse further use."""
        self._drop_payload()
        self._payload_in_sink = False
        if self._state is not _BROKEN:
            self._state = _BROKEN
            self._error = _local(Code.BROKEN, "the connection was closed")

    def _got_prelude(self) -> Event | None:
        magic, version, kind, flags, rid, header_len, payload_len = PRELUDE.unpack(self._buf)
        self._buf.clear()
        lim = self.limits
        if magic != MAGIC:
            raise _remote(Code.BAD_MAGIC, f"bad magic {magic!r}: not a tairstore frame")
        if version != VERSION:
            raise _remote(Code.BAD_VERSION, f"protocol version {version} (this side speaks {VERSION})")
        if header_len > lim.max_header_bytes:
            raise _remote(Code.HEADER_TOO_LARGE,
                          f"header of {header_len} bytes exceeds the limit of {lim.max_header_bytes}")
        if header_len + payload_len > lim.max_frame_bytes:
            if not (self.role is Role.SERVER and kind in _BLOCK_KINDS
                    and header_len + payload_len <= MAX_DRAIN_BYTES):
                raise _remote(Code.FRAME_TOO_LARGE, f"frame of {header_len + payload_len} bytes "
                              f"exceeds the limit of {lim.max_frame_bytes}")
            self._oversize = True  # rule 2's exception: drained, then answered CapacityError
        self._check_id(kind, rid)
        self._kind, self._id, self._flags = kind, rid, flags
        self._payload_len = payload_len
        self._state, self._want = _HEADER, header_len
        if header_len == 0:
            return self._got_header()
        return None

    def _check_id(self, kind: int, rid: int) -> None:
        if self.role is Role.SERVER:
            if rid == CONNECTION_ID or rid in self._pending:
                raise _remote(Code.BAD_REQUEST_ID, f"request id {rid} is reserved or already in flight")
            return
        if kind not in RESPONSE_KINDS:
            raise _remote(Code.UNEXPECTED_RESPONSE, f"a server sent frame kind {kind:#x}, not a response")
        if rid != CONNECTION_ID and rid not in self._pending:
            raise _remote(Code.UNEXPECTED_RESPONSE, f"response to request id {rid}, which is not in flight")

    def _got_header(self) -> Event | None:
        self._header = bytes(self._buf)
        self._buf.clear()
        n = self._payload_len
        if n == 0:
            return self._complete()
        self._filled, self._seg, self._seg_off = 0, 0, 0
        self._state = _PAYLOAD
        if self._oversize:
            self._segs, self._sizes = [None], [n]  # every byte discarded, through the scratch
            self._payload_in_sink = False
            return None
        if self.role is Role.SERVER:
            if self.payload_sinks is not None and self._kind in _BLOCK_KINDS:
                segs = self._offer_to_sinks(n)
                if segs is not None:
                    return None
            self._payload_in_sink = False
        else:
            sink = self._sinks.get(self._id)
            self._payload_in_sink = sink is not None and self._kind == Op.OK and n <= len(sink)
            if self._payload_in_sink:
                self._segs, self._sizes = [sink[:n]], [n]
                return None
        # np.empty: not zero-filled, every byte is about to be overwritten by the socket.
        self._segs, self._sizes = [memoryview(np.empty(n, np.uint8))], [n]
        return None

    def _offer_to_sinks(self, n: int) -> list | None:
        """Server, PUT/WRITE header in: decode it now and let ``payload_sinks`` place the blocks."""
        op = Op(self._kind)
        try:
            fields = self._request_fields(op, self._kind, self._header)
        except ProtocolError:
            return None  # answered once the payload is in, as without a sink
        sizes = fields["sizes"]
        if any(s < 0 for s in sizes) or sum(sizes) != n:
            return None
        segs = self.payload_sinks(self._id, op, fields)
        if segs is None:
            self._decoded = (op, fields)  # not decoded a second time when the payload is in
            return None
        segs = [None if b is None else _byte_view(b) for b in segs]
        if len(segs) != len(sizes) or any(b is not None and b.nbytes != s for b, s in zip(segs, sizes)):
            raise ValueError("payload_sinks must return one buffer of each block's size (or None)")
        self._segs, self._sizes = segs, list(sizes)
        self._early = (op, fields, segs)
        self._seg = -1
        self._next_seg()
        return segs

    def _complete(self) -> Event:
        """A whole frame is in: decode it; reset for the next frame."""
        kind, rid, header = self._kind, self._id, self._header
        payload = self._segs[0] if len(self._segs) == 1 and self._early is None else _EMPTY
        self._head = self._scratch[:HEAD_READ] if self._payload_len >= DIRECT_READ_MIN else self._scratch
        early, decoded = self._early, self._decoded
        self._state, self._want = _PRELUDE, PRELUDE.size
        self._header, self._filled = b"", 0
        self._segs, self._sizes, self._seg, self._seg_off, self._early = [], [], 0, 0, None
        self._decoded = None
        if self._oversize:
            self._oversize = False
            return self._refuse_oversize(kind, rid, header)
        if self.role is Role.SERVER:
            if early is not None:
                op, fields, blocks = early
                self._pending[rid] = op
                return Request(rid, op, fields, blocks)
            if decoded is not None:
                op, fields = decoded
                self._pending[rid] = op
                try:  # (the sizes were checked against the payload length already)
                    return Request(rid, op, fields, _split(fields["sizes"], payload, allow_missing=False))
                except ProtocolError as exc:
                    return ProtocolErrorEvent(exc, rid, False)
            op = Op(kind) if kind in Op._value2member_map_ else None
            self._pending[rid] = op if op is not None else Op.ERROR
            try:
                return self._decode_request(op, kind, rid, header, payload)
            except ProtocolError as exc:
                return ProtocolErrorEvent(exc, rid, False)
        self._sinks.pop(rid, None)
        if rid == CONNECTION_ID:
            try:
                fields = self._decode_header(header)
                error = error_from_fields(fields)
            except ProtocolError as exc:
                error = exc
            self._state, self._error = _BROKEN, error
            return ProtocolErrorEvent(error, None, True)
        op = self._pending.pop(rid)
        try:
            return self._decode_response(op, kind, rid, header, payload)
        except ProtocolError as exc:
            return ProtocolErrorEvent(exc, rid, False)

    def _refuse_oversize(self, kind: int, rid: int, header: bytes) -> ProtocolErrorEvent:
        """Server: the answer to a drained PUT/WRITE over ``max_frame_bytes``."""
        op = Op(kind)
        self._pending[rid] = op
        try:
            sizes = self._request_fields(op, kind, header)["sizes"]
        except ProtocolError as exc:
            return ProtocolErrorEvent(exc, rid, False)
        limit = self.limits.max_frame_bytes
        if len(sizes) == 1:
            error = CapacityError(f"block of {sizes[0]} bytes exceeds the daemon's limit: a frame carries at "
                                  f"most {limit} bytes (max_block_bytes plus the header)",
                                  dimension="block_size")
        else:
            error = CapacityError(f"a batch of {len(sizes)} blocks, {sum(sizes)} bytes, exceeds the "
                                  f"daemon's frame limit of {limit} bytes; send fewer blocks per request",
                                  dimension="frame_size")
        return ProtocolErrorEvent(error, rid, False)

    def _decode_header(self, header: bytes) -> dict:
        if self._flags:
            raise _remote(Code.BAD_HEADER, f"unknown flags {self._flags:#x}")
        if not header:
            fields: Any = {}
        else:
            try:
                fields = msgpack.unpackb(header, raw=False, strict_map_key=True, use_list=True)
            except Exception as exc:  # noqa: BLE001 - msgpack raises many types; all mean "bad header"
                raise _remote(Code.BAD_HEADER, f"header is not valid msgpack ({type(exc).__name__})") from None
        if not isinstance(fields, dict):
            raise _remote(Code.BAD_HEADER, "header is not a msgpack map")
        return fields

    def _request_fields(self, op: Op | None, kind: int, header: bytes) -> dict:
        if op is None or op not in RECEIVES[self.role]:
            raise _remote(Code.UNKNOWN_OPCODE, f"unknown request opcode {kind:#x}")
        fields = self._decode_header(header)
        validate_fields(fields, REQUEST_FIELDS[op], self.limits.max_batch)
        if op in BLOCK_OPS_REQUEST and len(fields["keys"]) != len(fields["sizes"]):
            raise _remote(Code.PAYLOAD_MISMATCH,
                          f"{len(fields['keys'])} keys but {len(fields['sizes'])} sizes")
        return fields

    def _decode_request(self, op: Op | None, kind: int, rid: int, header: bytes,
                        payload: memoryview) -> Request:
        fields = self._request_fields(op, kind, header)
        blocks = _split(fields.get("sizes"), payload, allow_missing=False) if op in BLOCK_OPS_REQUEST \
            else _no_payload(payload)
        return Request(rid, op, fields, blocks)

    def _decode_response(self, op: Op, kind: int, rid: int, header: bytes,
                         payload: memoryview) -> Response:
        if kind == Op.ERROR:
            fields = self._decode_header(header)
            _no_payload(payload)
            return Response(rid, fields, [], error_from_fields(fields))
        fields = self._decode_header(header)
        validate_fields(fields, RESPONSE_FIELDS[op], None)
        blocks = _split(fields.get("sizes"), payload, allow_missing=True) if op in BLOCK_OPS_RESPONSE \
            else _no_payload(payload)
        return Response(rid, fields, blocks)

    # ------------------------------------------------------------------------------- send
    def send(self, event: Request | Response, *, sink: Any = None) -> list:
        """Encode ``event``; returns the buffers to write, in order (payloads are not copied).

        Args:
            event: a :class:`Request` (client) or :class:`Response` (server).
            sink: client only: a writable buffer the response payload is received into when
                it fits (``get_into`` lands the block there without another copy).

        Raises:
            ProtocolError: (local) the event is not this side's to send, its id is wrong, or
                the frame exceeds the limits.
        """
        if not (self.role is Role.SERVER and isinstance(event, Response)):
            # A server's send side is still in step after a receive-side framing error: it may
            # answer what it already read, and send the id-0 ERROR, before it closes.
            self._check_usable()
        if isinstance(event, Request):
            kind, fields = event.op, event.fields
            if kind not in SENDS[self.role]:
                raise _local(Code.UNKNOWN_OPCODE, f"a {self.role.value} does not send {kind!r}")
            if event.id == CONNECTION_ID or event.id in self._pending or not 0 < event.id < 1 << 64:
                raise _local(Code.BAD_REQUEST_ID, f"request id {event.id} is reserved or in flight")
        elif isinstance(event, Response):
            if self.role is not Role.SERVER:
                raise _local(Code.UNKNOWN_OPCODE, "a client does not send responses")
            if event.id != CONNECTION_ID and event.id not in self._pending:
                raise _local(Code.BAD_REQUEST_ID, f"no request {event.id} in flight to answer")
            kind = Op.OK if event.error is None else Op.ERROR
            fields = event.fields if event.error is None else error_to_fields(event.error)
        else:
            raise TypeError(f"cannot send {type(event).__name__}")
        header = msgpack.packb(fields, use_bin_type=True)
        blocks = [_byte_view(b) for b in event.blocks if b is not None] if kind != Op.ERROR else []
        payload_len = sum(len(b) for b in blocks)
        if len(header) > self.limits.max_header_bytes:
            raise _local(Code.HEADER_TOO_LARGE, f"header of {len(header)} bytes exceeds the limit")
        if len(header) + payload_len > self.limits.max_frame_bytes:
            raise _local(Code.FRAME_TOO_LARGE, f"frame of {len(header) + payload_len} bytes "
                         f"exceeds the limit of {self.limits.max_frame_bytes}")
        prelude = PRELUDE.pack(MAGIC, VERSION, int(kind), 0, event.id, len(header), payload_len)
        if isinstance(event, Request):
            self._pending[event.id] = event.op
            if sink is not None:
                self._sinks[event.id] = _byte_view(sink)
        else:
            self._pending.pop(event.id, None)
        if payload_len < JOIN_BELOW:
            return [b"".join([prelude, header, *blocks])]
        return [prelude + header, *blocks]

    def release_sink(self, request_id: int) -> bool:
        """Client: do not receive ``request_id``'s answer into its sink (the caller gave up).

        Returns False when that answer is being received into the sink right now: then only
        closing the connection stops further writes into it.
        """
        if self._state is _PAYLOAD and self._id == request_id and self._payload_in_sink:
            return False
        self._sinks.pop(request_id, None)
        return True


def _split(sizes: list[int], payload: memoryview, *, allow_missing: bool) -> list:
    """Cut the payload into the blocks the header's ``sizes`` announce (views, no copies)."""
    blocks: list = []
    off = 0
    for n in sizes:
        if n < 0:
            if not (allow_missing and n == -1):
                raise _remote(Code.BAD_HEADER, f"negative block size {n}")
            blocks.append(None)
            continue
        blocks.append(payload[off:off + n])
        off += n
    if off != len(payload):
        raise _remote(Code.PAYLOAD_MISMATCH,
                      f"the sizes add up to {off} bytes but the payload has {len(payload)}")
    return blocks


def _no_payload(payload: memoryview) -> list:
    if len(payload):
        raise _remote(Code.PAYLOAD_MISMATCH, f"this frame kind carries no payload, got {len(payload)} bytes")
    return []


_EMPTY = memoryview(b"")
_BLOCK_KINDS = frozenset(int(op) for op in BLOCK_OPS_REQUEST)
_ON_COMPLETE = {_PRELUDE: Connection._got_prelude, _HEADER: Connection._got_header}
