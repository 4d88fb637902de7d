"""The sans-IO codec: round trips, pipelining, every malformed-input class, and fuzzing."""

from __future__ import annotations

import os
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tairstore import errors
from tairstore.errors import CapacityError, ProtocolError
from tairstore.engine.match import MatchResult
from tairstore.net.limits import MAX_DRAIN_BYTES, Limits
from tairstore.net.protocol import (
    CONNECTION_ID,
    MAGIC,
    PRELUDE,
    VERSION,
    Connection,
    ProtocolErrorEvent,
    Request,
    Response,
    Role,
)
from tairstore.net.schema import (
    ERROR_CLASSES,
    Code,
    Op,
    error_from_fields,
    error_to_fields,
    match_from_fields,
    match_to_fields,
)

FUZZ_EXAMPLES = int(os.environ.get("TAIRSTORE_FUZZ_EXAMPLES", "2000"))

#: A valid request of every opcode, with its payload blocks.
REQUESTS = {
    Op.PING: ({}, []),
    Op.AUTH: ({"token": "t0k"}, []),
    Op.PUT: ({"ns": "a", "keys": [b"k1", b"k2"], "sizes": [3, 0]}, [b"abc", b""]),
    Op.GET: ({"ns": "a", "keys": [b"k1"], "cap": 10}, []),
    Op.EXISTS: ({"keys": [b"k1", b"k2"]}, []),
    Op.MATCH: ({"keys": [b"k1"], "mode": "sliding_window", "window": 2}, []),
    Op.DELETE: ({"keys": [b"k1"]}, []),
    Op.START_WRITE: ({"keys": [b"k1"], "sizes": [5], "lease": 3.5}, []),
    Op.WRITE: ({"sid": 7, "keys": [b"k1"], "sizes": [5]}, [b"hello"]),
    Op.FINISH_WRITE: ({"sid": 7, "keys": [b"k1"]}, []),
    Op.ABORT_WRITE: ({"sid": 7}, []),
    Op.STATS: ({}, []),
}
#: A valid OK answer to every opcode.
RESPONSES = {
    Op.PING: ({}, []),
    Op.AUTH: ({}, []),
    Op.PUT: ({"stored": [True, False]}, []),
    Op.GET: ({"sizes": [4, -1, 2]}, [b"abcd", None, b"xy"]),
    Op.EXISTS: ({"hits": [True, False]}, []),
    Op.MATCH: ({"mode": "prefix", "tiers": b"\x01\x02\x00", "ws": None, "wl": 0}, []),
    Op.DELETE: ({"count": 1}, []),
    Op.START_WRITE: ({"sid": 9, "keys": [b"k1"], "lease": 30.0}, []),
    Op.WRITE: ({}, []),
    Op.FINISH_WRITE: ({"count": 1}, []),
    Op.ABORT_WRITE: ({}, []),
    Op.STATS: ({"stats": {"blocks": 3, "tiers": {"dram": {"bytes": 1}}}}, []),
}


def wire(buffers: list) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def frame(kind: int, rid: int, header: bytes = b"", payload: bytes = b"", *, magic: bytes = MAGIC,
          version: int = VERSION, flags: int = 0, payload_len: int | None = None) -> bytes:
    n = len(payload) if payload_len is None else payload_len
    return PRELUDE.pack(magic, version, kind, flags, rid, len(header), n) + header + payload


def pair(limits: Limits | None = None) -> tuple[Connection, Connection]:
    return Connection(Role.CLIENT, limits), Connection(Role.SERVER, limits)


def feed_chunks(conn: Connection, data: bytes, size: int) -> list:
    events = []
    for i in range(0, len(data), size):
        events += conn.receive_data(data[i:i + size])
    return events


def feed_bytewise(conn: Connection, data: bytes) -> list:
    events = []
    for i in range(len(data)):
        events += conn.receive_data(data[i:i + 1])
    return events


# --------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("op", list(REQUESTS))
def test_every_opcode_round_trips(op):
    client, server = pair()
    fields, blocks = REQUESTS[op]
    events = feed_bytewise(server, wire(client.send(Request(5, op, fields, blocks))))
    assert len(events) == 1 and isinstance(events[0], Request)
    req = events[0]
    assert (req.id, req.op, req.fields) == (5, op, fields)
    assert [bytes(b) for b in req.blocks] == [bytes(b) for b in blocks]

    rfields, rblocks = RESPONSES[op]
    (resp,) = client.receive_data(wire(server.send(Response(5, rfields, rblocks))))
    assert isinstance(resp, Response) and resp.ok and resp.fields == rfields
    assert [None if b is None else bytes(b) for b in resp.blocks] == rblocks
    assert client.in_flight == 0 and server.in_flight == 0


def test_pipelined_responses_out_of_order():
    client, server = pair()
    data = b"".join(wire(client.send(Request(i, Op.GET, {"keys": [bytes([i])]}))) for i in (1, 2, 3))
    reqs = server.receive_data(data)
    assert [r.id for r in reqs] == [1, 2, 3]
    out = b"".join(wire(server.send(Response(i, {"sizes": [1]}, [bytes([i])]))) for i in (3, 1, 2))
    got = client.receive_data(out)
    assert [(r.id, bytes(r.blocks[0])) for r in got] == [(3, b"\x03"), (1, b"\x01"), (2, b"\x02")]


def test_large_payload_received_directly_into_its_buffer():
    client, server = pair()
    block = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8)
    data = wire(client.send(Request(1, Op.PUT, {"keys": [b"k"], "sizes": [block.nbytes]}, [block])))
    events, pos = [], 0
    while pos < len(data):
        buf = server.get_buffer()
        n = min(len(buf), len(data) - pos, 100_000)
        buf[:n] = data[pos:pos + n]
        pos += n
        events += server.buffer_filled(n)
    (req,) = events
    assert np.array_equal(np.frombuffer(req.blocks[0], np.uint8), block)


def test_response_lands_in_the_sink():
    client, server = pair()
    sink = bytearray(64 << 10)
    server.receive_data(wire(client.send(Request(1, Op.GET, {"keys": [b"k"]}), sink=sink)))
    payload = bytes(range(256)) * 200
    (resp,) = client.receive_data(wire(server.send(Response(1, {"sizes": [len(payload)]}, [payload]))))
    assert resp.blocks[0].obj is sink and sink[:len(payload)] == payload


def test_error_codes_map_one_to_one_to_exception_classes():
    assert len(set(ERROR_CLASSES.values())) == len(ERROR_CLASSES)
    for code, cls in ERROR_CLASSES.items():
        exc = cls("boom") if not issubclass(cls, errors.CapacityError) else cls("boom", dimension="tier:ssd")
        back = error_from_fields(error_to_fields(exc))
        assert type(back) is cls and str(back) == "boom"
    cap = error_from_fields(error_to_fields(errors.CapacityError("full", dimension="tier:dram")))
    assert cap.dimension == "tier:dram"
    proto = error_from_fields(error_to_fields(ProtocolError("x", code=int(Code.BATCH_TOO_LARGE))))
    assert isinstance(proto, ProtocolError) and proto.code == Code.BATCH_TOO_LARGE and not proto.remote
    internal = error_from_fields(error_to_fields(KeyError("bug")))
    assert type(internal) is errors.StoreError and "internal" in str(internal)


def test_match_result_round_trip():
    m = MatchResult("sliding_window", 1, [True, False, True, True], ["dram", None, "ssd", "dram"], 2, 2)
    assert match_from_fields(match_to_fields(m)) == m


# ------------------------------------------------------------------------------ framing errors
@pytest.mark.parametrize("bad, code", [
    (frame(Op.PING, 1, magic=b"HT"), Code.BAD_MAGIC),
    (frame(Op.PING, 1, version=9), Code.BAD_VERSION),
    (frame(Op.PING, 1, payload_len=1 << 40)[:PRELUDE.size], Code.FRAME_TOO_LARGE),
    (PRELUDE.pack(MAGIC, VERSION, Op.PING, 0, 1, 1 << 30, 0), Code.HEADER_TOO_LARGE),
    (frame(Op.PING, CONNECTION_ID), Code.BAD_REQUEST_ID),
])
def test_framing_errors_break_the_connection(bad, code):
    server = Connection(Role.SERVER)
    (ev,) = server.receive_data(bad)
    assert isinstance(ev, ProtocolErrorEvent) and ev.fatal and ev.error.code == code and ev.error.remote
    assert server.broken
    with pytest.raises(ProtocolError) as info:
        server.receive_data(frame(Op.PING, 2))
    assert info.value.remote is False and info.value.code == Code.BROKEN


@pytest.mark.parametrize("kind, payload_len", [
    (Op.PUT, MAX_DRAIN_BYTES + 1),   # past what any client sends: not worth reading
    (Op.GET, (1 << 20) + 1),         # a frame kind that carries no blocks
])
def test_oversized_frame_refused_from_the_prelude_alone(kind, payload_len):
    server = Connection(Role.SERVER, Limits(max_frame_bytes=1 << 20, max_header_bytes=1 << 16))
    (ev,) = server.receive_data(frame(kind, 1, b"", payload_len=payload_len)[:PRELUDE.size])
    assert ev.fatal and ev.error.code == Code.FRAME_TOO_LARGE


@pytest.mark.parametrize("sizes, dimension", [([(1 << 20) + 1], "block_size"),
                                              ([600 << 10, 600 << 10], "frame_size")])
def test_an_oversized_put_is_drained_and_refused_as_capacity(sizes, dimension):
    """The store's answer to a block over max_block_bytes is CapacityError; the daemon's to a put
    over its frame limit is the same, and the connection goes on (a close would reset a client
    still sending, which would then see a broken connection instead of the reason)."""
    limits = Limits(max_frame_bytes=1 << 20, max_header_bytes=1 << 16)
    server = Connection(Role.SERVER, limits)
    header = msgpack.packb({"keys": [bytes([i + 1]) for i in range(len(sizes))], "sizes": sizes})
    events = feed_chunks(server, frame(Op.PUT, 7, header, bytes(sum(sizes))) + frame(Op.PING, 8), 65536)
    assert len(events) == 2 and not server.broken
    refused, ping = events
    assert isinstance(refused, ProtocolErrorEvent) and not refused.fatal and refused.request_id == 7
    assert isinstance(refused.error, CapacityError) and refused.error.dimension == dimension
    assert isinstance(ping, Request) and ping.op is Op.PING
    client = Connection(Role.CLIENT, limits)
    client.send(Request(7, Op.PUT, {"keys": [b"k"], "sizes": [1]}, [b"x"]))
    (answer,) = client.receive_data(wire(server.send(Response(7, error=refused.error))))
    assert isinstance(answer.error, CapacityError) and answer.error.dimension == dimension


def test_duplicate_in_flight_id_is_fatal():
    client, server = pair()
    data = wire(client.send(Request(1, Op.PING)))
    server.receive_data(data)
    (ev,) = server.receive_data(data)
    assert ev.fatal and ev.error.code == Code.BAD_REQUEST_ID


def test_client_refuses_unsolicited_responses():
    client = Connection(Role.CLIENT)
    (ev,) = client.receive_data(frame(Op.OK, 42))
    assert ev.fatal and ev.error.code == Code.UNEXPECTED_RESPONSE
    client = Connection(Role.CLIENT)
    (ev,) = client.receive_data(frame(Op.PUT, 1))
    assert ev.fatal


def test_connection_level_error_reaches_the_client():
    client = Connection(Role.CLIENT)
    header = msgpack.packb({"code": int(Code.BAD_MAGIC), "msg": "bad magic"})
    (ev,) = client.receive_data(frame(Op.ERROR, CONNECTION_ID, header))
    assert ev.fatal and ev.error.code == Code.BAD_MAGIC and client.broken


# ----------------------------------------------------------------------------- semantic errors
def _semantic_cases():
    ok_put = msgpack.packb({"keys": [b"k"], "sizes": [3]})
    return [
        ("unknown opcode", frame(0x7E, 1), Code.UNKNOWN_OPCODE),
        ("response kind", frame(Op.OK, 1), Code.UNKNOWN_OPCODE),
        ("not msgpack", frame(Op.EXISTS, 1, b"\xc1\xc1"), Code.BAD_HEADER),
        ("not a map", frame(Op.EXISTS, 1, msgpack.packb([1, 2])), Code.BAD_HEADER),
        ("missing field", frame(Op.EXISTS, 1, msgpack.packb({"ns": "a"})), Code.BAD_HEADER),
        ("wrong type", frame(Op.EXISTS, 1, msgpack.packb({"keys": ["str"]})), Code.BAD_HEADER),
        ("flags", frame(Op.PING, 1, flags=4), Code.BAD_HEADER),
        ("batch too large", frame(Op.EXISTS, 1, msgpack.packb({"keys": [b"k"] * 5})), Code.BATCH_TOO_LARGE),
        ("payload short", frame(Op.PUT, 1, ok_put, b"ab"), Code.PAYLOAD_MISMATCH),
        ("payload long", frame(Op.PUT, 1, ok_put, b"abcd"), Code.PAYLOAD_MISMATCH),
        ("keys vs sizes", frame(Op.PUT, 1, msgpack.packb({"keys": [b"k", b"j"], "sizes": [3]}), b"abc"),
         Code.PAYLOAD_MISMATCH),
        ("negative size", frame(Op.PUT, 1, msgpack.packb({"keys": [b"k"], "sizes": [-1]})), Code.BAD_HEADER),
        ("payload on exists", frame(Op.EXISTS, 1, msgpack.packb({"keys": [b"k"]}), b"x"), Code.PAYLOAD_MISMATCH),
    ]


@pytest.mark.parametrize("name, bad, code", _semantic_cases(), ids=[c[0] for c in _semantic_cases()])
def test_semantic_errors_answer_the_request_and_continue(name, bad, code):
    server = Connection(Role.SERVER, Limits(max_batch=4))
    events = server.receive_data(bad + frame(Op.PING, 2))
    assert len(events) == 2
    err, ping = events
    assert isinstance(err, ProtocolErrorEvent) and not err.fatal
    assert err.request_id == 1 and err.error.code == code and err.error.remote
    assert isinstance(ping, Request) and ping.op is Op.PING
    # The server owes request 1 an answer: an ERROR frame the client decodes to the same code.
    client = Connection(Role.CLIENT)
    client.send(Request(1, Op.EXISTS, {"keys": []}))
    (resp,) = client.receive_data(wire(server.send(Response(1, error=err.error))))
    assert isinstance(resp.error, ProtocolError) and resp.error.code == code


def test_malformed_response_fails_only_that_request():
    client = Connection(Role.CLIENT)
    client.send(Request(1, Op.DELETE, {"keys": [b"k"]}))
    client.send(Request(2, Op.PING))
    events = client.receive_data(frame(Op.OK, 1, msgpack.packb({"count": "x"})) + frame(Op.OK, 2))
    assert isinstance(events[0], ProtocolErrorEvent) and events[0].request_id == 1 and not events[0].fatal
    assert isinstance(events[1], Response) and events[1].id == 2


# ---------------------------------------------------------------------------------- local errors
def test_sending_beyond_the_limits_is_a_local_error():
    client = Connection(Role.CLIENT, Limits(max_frame_bytes=1 << 16, max_header_bytes=1 << 12))
    with pytest.raises(ProtocolError) as info:
        client.send(Request(1, Op.PUT, {"keys": [b"k"], "sizes": [1 << 17]}, [bytes(1 << 17)]))
    assert info.value.remote is False and info.value.code == Code.FRAME_TOO_LARGE
    with pytest.raises(ProtocolError):
        client.send(Response(1))
    client.send(Request(1, Op.PING))
    with pytest.raises(ProtocolError):
        client.send(Request(1, Op.PING))  # still in flight
    server = Connection(Role.SERVER)
    with pytest.raises(ProtocolError):
        server.send(Response(77, {}))  # nothing to answer


# ------------------------------------------------------------------------------------- fuzzing
def _check_only_events(conn: Connection, chunks: list[bytes]) -> None:
    for chunk in chunks:
        try:
            events = conn.receive_data(chunk)
        except ProtocolError:
            assert conn.broken
            return
        for ev in events:
            assert isinstance(ev, (Request, Response, ProtocolErrorEvent))
            if isinstance(ev, ProtocolErrorEvent):
                assert isinstance(ev.error, errors.StoreError)


_FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_LIMITS = Limits(max_frame_bytes=1 << 16, max_header_bytes=1 << 12, max_batch=16)


@_FUZZ
@given(st.lists(st.binary(max_size=256), max_size=8), st.sampled_from(list(Role)))
def test_fuzz_arbitrary_bytes(chunks, role):
    conn = Connection(role, _LIMITS)
    if role is Role.CLIENT:
        for rid, op in enumerate(REQUESTS, start=1):
            conn.send(Request(rid, op, *REQUESTS[op]))
    _check_only_events(conn, chunks)


_header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
_field_names = st.sampled_from(["ns", "keys", "sizes", "cap", "mode", "window", "lease", "sid", "token",
                                "stored", "hits", "tiers", "ws", "wl", "count", "stats", "code", "msg"])


@_FUZZ
@given(kind=st.integers(0, 255), rid=st.integers(0, 2**64 - 1), flags=st.sampled_from([0, 0, 1]),
       fields=st.dictionaries(_field_names, _header_values, max_size=5) | _header_values,
       payload=st.binary(max_size=64), split=st.integers(1, 40), role=st.sampled_from(list(Role)))
def test_fuzz_well_framed_garbage(kind, rid, flags, fields, payload, split, role):
    """Valid preludes around random headers: exercises the semantic checks, not just magic."""
    try:
        header = msgpack.packb(fields)
    except (OverflowError, ValueError, TypeError):
        header = b"\xc1"
    data = frame(kind, rid, header, payload, flags=flags) * 2
    conn = Connection(role, _LIMITS)
    if role is Role.CLIENT and rid and kind in (Op.OK, Op.ERROR):
        conn.send(Request(rid, Op(list(REQUESTS)[rid % len(REQUESTS)]), *REQUESTS[list(REQUESTS)[rid % len(REQUESTS)]]))
    _check_only_events(conn, [data[i:i + split] for i in range(0, len(data), split)])


def test_truncated_frame_waits_without_events():
    client, server = pair()
    data = wire(client.send(Request(1, Op.PUT, {"keys": [b"k"], "sizes": [10]}, [bytes(10)])))
    assert server.receive_data(data[:-1]) == []
    assert server.state == "PAYLOAD"
    assert len(server.receive_data(data[-1:])) == 1
    assert struct.calcsize("<2sBBIQIQ") == PRELUDE.size == 28


# ------------------------------------------------------------------------------ payload sinks
def _sinks_server(plan):
    """A server codec whose payload_sinks answers with ``plan(fields)`` and records the calls."""
    server = Connection(Role.SERVER)
    calls = []

    def sinks(rid, op, fields):
        calls.append((rid, op, fields))
        return plan(fields)

    server.payload_sinks = sinks
    return server, calls


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_payload_sinks_receive_each_block_in_place(piece):
    client = Connection(Role.CLIENT)
    rng = np.random.default_rng(3)
    blocks = [rng.bytes(n) for n in (70_000, 0, 5, 100_000)]
    targets = [bytearray(len(b)) for b in blocks]
    targets[2] = None  # discarded: e.g. a key already stored
    server, calls = _sinks_server(lambda fields: targets)
    keys = [b"a", b"b", b"c", b"d"]
    data = wire(client.send(Request(9, Op.PUT, {"keys": keys, "sizes": [len(b) for b in blocks]}, blocks)))
    events, pos = [], 0
    while pos < len(data):  # the transport's way: get_buffer, recv_into, buffer_filled
        buf = server.get_buffer()
        n = min(len(buf), len(data) - pos, piece)
        buf[:n] = data[pos:pos + n]
        pos += n
        events += server.buffer_filled(n)
        if calls:
            assert server.state in ("PAYLOAD", "PRELUDE")
    (req,) = events
    assert len(calls) == 1 and calls[0][0] == 9 and calls[0][2]["keys"] == keys
    assert isinstance(req, Request) and req.op is Op.PUT and req.id == 9
    for got, target, block in zip(req.blocks, targets, blocks):
        if target is None:
            assert got is None
        else:
            assert got.obj is target and bytes(target) == block
    # The codec kept no reference to the sinks, and goes on with the next frame.
    assert server.receive_data(wire(client.send(Request(10, Op.PING))))[0].op is Op.PING


def test_payload_sinks_offered_only_well_formed_puts():
    client = Connection(Role.CLIENT)
    server, calls = _sinks_server(lambda fields: None)  # None: the codec buffers it itself
    data = wire(client.send(Request(1, Op.PUT, {"keys": [b"k"], "sizes": [3]}, [b"abc"])))
    (req,) = server.receive_data(data)
    assert bytes(req.blocks[0]) == b"abc" and len(calls) == 1
    # sizes that do not add up to the payload: never offered, answered as before
    bad = frame(Op.PUT, 2, msgpack.packb({"keys": [b"k"], "sizes": [5]}), b"abc")
    (ev,) = server.receive_data(bad)
    assert isinstance(ev, ProtocolErrorEvent) and not ev.fatal and ev.error.code == Code.PAYLOAD_MISMATCH
    bad = frame(Op.PUT, 3, msgpack.packb({"keys": "k", "sizes": [3]}), b"abc")
    (ev,) = server.receive_data(bad)
    assert isinstance(ev, ProtocolErrorEvent) and ev.error.code == Code.BAD_HEADER
    assert len(calls) == 1


def test_close_mid_payload_drops_the_sinks():
    client = Connection(Role.CLIENT)
    target = bytearray(100_000)
    server, calls = _sinks_server(lambda fields: [target])
    data = wire(client.send(Request(1, Op.PUT, {"keys": [b"k"], "sizes": [len(target)]}, [bytes(len(target))])))
    assert server.receive_data(data[:50_000]) == [] and server.state == "PAYLOAD"
    server.close()
    assert server.broken and server._segs == []
    with pytest.raises(ProtocolError):
        server.get_buffer()


def test_bytes_after_a_fatal_response_do_not_crash_the_decoder():
    """Found by ``tairstore fuzz decoders --target protocol --seed 994751223306``: a response
    for an unknown request id is fatal, and the bytes after it in the same read made the
    decoder look up a transition for the BROKEN state (KeyError) instead of stopping."""
    from tairstore.net.limits import Limits
    from tairstore.net.protocol import Connection, ProtocolErrorEvent, Role

    data = bytes.fromhex(
        "5453018100000000000000000000000019000000000000000000000082a4636f646501a36d7367ad"
        "7368757474696e6720646f776e545301800000000009000000000000000800000000000000000b57"
        "bfb9600ed981a5636f756e7401")
    events = Connection(Role.CLIENT, Limits()).receive_data(data)
    assert events and isinstance(events[-1], ProtocolErrorEvent) and events[-1].fatal


@pytest.mark.parametrize("piece", [1, 9, 4096, 70_001, 1 << 20])
def test_scatter_reads_fill_many_blocks_per_read(piece):
    """get_buffers/buffers_filled, as the server's readv uses them: the same blocks, the next
    frame never read into a block, and far fewer reads than blocks when reads are large."""
    client = Connection(Role.CLIENT)
    rng = np.random.default_rng(5)
    sizes = [20_000, 0, 3, 40_000, 17, 0, 65_536, 30_000]
    blocks = [rng.bytes(n) for n in sizes]
    targets = [bytearray(n) for n in sizes]
    targets[4] = None  # discarded bytes stop a scatter list
    server, calls = _sinks_server(lambda fields: targets)
    keys = [b"k%d" % i for i in range(len(sizes))]
    data = wire(client.send(Request(3, Op.PUT, {"keys": keys, "sizes": sizes}, blocks)))
    data += wire(client.send(Request(4, Op.PING)))
    events, pos, reads = [], 0, 0
    while pos < len(data):
        bufs = server.get_buffers()
        room = sum(len(b) for b in bufs)
        n = min(room, len(data) - pos, piece)
        left, off = n, pos
        for b in bufs:  # what readv does: fill the buffers in order
            take = min(left, len(b))
            b[:take] = data[off:off + take]
            off += take
            left -= take
        pos += n
        reads += 1
        events += server.buffers_filled(n)
    put, ping = events
    assert put.id == 3 and ping.op is Op.PING
    for got, target, block in zip(put.blocks, targets, blocks):
        if target is None:
            assert got is None
        else:
            assert got.obj is target and bytes(target) == block
    if piece >= 1 << 20:
        assert reads <= 6  # prelude+header, scatter up to the discarded block, it, the rest, ping


def test_buffers_filled_refuses_more_bytes_than_offered():
    client = Connection(Role.CLIENT)
    target = bytearray(50_000)
    server, _ = _sinks_server(lambda fields: [target])
    data = wire(client.send(Request(1, Op.PUT, {"keys": [b"k"], "sizes": [50_000]}, [bytes(50_000)])))
    server.receive_data(data[:100])
    bufs = server.get_buffers()
    assert sum(len(b) for b in bufs) < 50_000
    with pytest.raises(ValueError):
        server.buffers_filled(sum(len(b) for b in bufs) + 1)
