"""The decoder fuzz targets and their corpora of valid inputs (see :mod:`tairstore.fuzz.decoders`).

Each entry of :data:`TARGETS` is a context manager factory: entering it sets up what the
target needs once (a store and an event loop for the HTTP API, a scratch directory for config
files) and yields ``check(data: bytes)``. ``check`` returns when the decoder parsed the input
or raised its designated error, and raises :class:`~tairstore.fuzz.decoders.Finding` (or lets
the stray exception out) otherwise. :func:`corpus` gives each target's valid inputs, the seeds
that mutations start from.

Only public APIs are used: the protocol codec, the HTTP application and the config loader are
driven exactly as the daemon drives them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator

from tairstore.errors import CorruptionError, InvalidArgumentError, ProtocolError

__all__ = ["TARGETS", "corpus", "structured", "HTTP_ROUTES"]

#: A small frame limit, so that frames near and over the limit are cheap to reach.
_PROTOCOL_LIMITS = dict(max_frame_bytes=64 << 10, max_header_bytes=8 << 10, max_batch=16)


class Finding(Exception):
    """An input broke a target's contract; the message names the input and the replay."""


def _finding(message: str) -> Finding:
    return Finding(message)


# -- WAL ------------------------------------------------------------------------------------
def _wal_corpus() -> list[bytes]:
    from tairstore.format.wal import encode_record
    from tairstore.wal.records import Abort, Commit, CommitEntry, Delete, Prepare, encode

    recs = [
        Prepare(7, "default", (b"k1", b"k2"), (4096, 8192)),
        Commit(7, (CommitEntry("default", b"k1", 4096, 0xDEADBEEF, 12, (1, 0, 4200)),
                   CommitEntry("default", b"k2", 8192, 1, 13, None))),
        Abort(9),
        Delete("q", (b"k3",)),
        Commit(0, (CommitEntry("ns-\u00e9", b"\x00" * 64, 1, 0, (1 << 64) - 1, (0, 1, 2)),)),
    ]
    frames = []
    for lsn, rec in enumerate(recs, start=1):
        rtype, body = encode(rec)
        frames.append(encode_record(rtype, lsn, body))
    # Whole logs, single records, and bodies alone (first byte: the record type).
    bodies = [bytes([encode(r)[0]]) + encode(r)[1] for r in recs]
    return [b"".join(frames), *frames, *bodies, b"".join(frames) + bytes(40)]


@contextlib.contextmanager
def _wal_target() -> Iterator[Callable[[bytes], None]]:
    from tairstore.format.wal import HEADER_SIZE, FrameDecoder, encode_record
    from tairstore.wal.records import decode

    def decode_body(rtype: int, body) -> None:
        try:
            decode(rtype, body)
        except CorruptionError:
            pass

    def check(data: bytes) -> None:
        dec = FrameDecoder(data)
        last = 0
        for frame in dec:
            if frame.end <= last or frame.end - frame.offset < HEADER_SIZE:
                raise _finding(f"frame decoder did not advance: {frame.offset}..{frame.end}")
            last = frame.end
            decode_body(frame.type, frame.body)
        if dec.reason is None and dec.offset != len(data):
            raise _finding(f"clean stop at {dec.offset} of {len(data)} bytes")
        if dec.dropped != len(data) - dec.offset:
            raise _finding("dropped bytes miscounted")
        if data:
            # The body decoder on its own, and re-framed with a valid checksum, so mutated
            # bodies reach it rather than dying at the frame's crc.
            decode_body(data[0] % 8, data[1:])
            if 1 <= data[0] % 8 <= 4:
                framed = encode_record(data[0] % 8, 1, data[1:])
                for frame in FrameDecoder(framed):
                    decode_body(frame.type, frame.body)

    yield check


# -- segment ----------------------------------------------------------------------------------
def _segment_record(ns: str, key: bytes, payload: bytes, *, zstd: bool = False,
                    tombstone: bool = False, generation: int = 1) -> bytes:
    from tairstore.format.checksum import crc32c
    from tairstore.format.codec import compress
    from tairstore.format.segment import FLAG_COMMITTED, FLAG_TOMBSTONE, encode_header

    stored, flags = compress(payload, 3, False) if zstd else (payload, 0)
    flags |= FLAG_COMMITTED | (FLAG_TOMBSTONE if tombstone else 0)
    header = encode_header(flags=flags, namespace=ns.encode(), key=key, generation=generation,
                           raw_len=len(payload), stored_len=len(stored),
                           payload_crc=crc32c(payload))
    return header + bytes(stored)


def _segment_corpus() -> list[bytes]:
    rng = random.Random(5)
    recs = [
        _segment_record("default", b"k1", rng.randbytes(300)),
        _segment_record("q", b"k2" * 32, bytes(1000), zstd=True, generation=2),
        _segment_record("default", b"k3", b"", tombstone=True, generation=3),
        _segment_record("n\u00e9", b"\xff", b"x" * 64, generation=4),
    ]
    # A file with a zero gap (an abandoned reservation) and a zero-filled tail.
    return [b"".join(recs), *recs, recs[0] + bytes(50) + recs[1] + bytes(100)]


@contextlib.contextmanager
def _segment_target() -> Iterator[Callable[[bytes], None]]:
    from tairstore.format.segment import decode_header
    from tairstore.fileio import MemoryFile
    from tairstore.tiers.ssd import scan_records

    def check(data: bytes) -> None:
        try:
            decode_header(data)
        except CorruptionError:
            pass
        reports: list[tuple[int, str]] = []
        end = 0
        for rec in scan_records(MemoryFile(data), 1, reporter=lambda n, r: reports.append((n, r))):
            loc = rec.location
            if not rec.verified:
                raise _finding(f"scan yielded an unverified record at {loc.offset}")
            if loc.offset < end or loc.offset + loc.length > len(data):
                raise _finding(f"record {loc.offset}+{loc.length} overlaps or leaves the file")
            end = loc.offset + loc.length
        if any(n < 0 or n > len(data) for n, _ in reports):
            raise _finding(f"reported impossible dropped byte counts {reports}")

    yield check


# -- protocol ---------------------------------------------------------------------------------
def _protocol_corpus() -> list[bytes]:
    from tairstore.net.protocol import Connection, Op, Request, Response, Role

    def wire(bufs) -> bytes:
        return b"".join(bytes(b) for b in bufs)

    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    reqs = [
        Request(1, Op.PING),
        Request(2, Op.GET, {"keys": [b"k1", b"k2"]}),
        Request(3, Op.PUT, {"keys": [b"a", b"b"], "sizes": [3, 5]}, [b"abc", b"defgh"]),
        Request(4, Op.EXISTS, {"namespace": "q", "keys": [b"k"]}),
        Request(5, Op.MATCH, {"keys": [b"a", b"b"], "mode": "prefix"}),
        Request(6, Op.START_WRITE, {"keys": [b"a"], "sizes": [4], "lease": 5.0}),
        Request(7, Op.WRITE, {"sid": 1, "keys": [b"a"], "sizes": [4]}, [b"wxyz"]),
        Request(8, Op.FINISH_WRITE, {"sid": 1, "keys": [b"a"]}),
        Request(9, Op.DELETE, {"keys": [b"a"]}),
        Request(10, Op.STATS),
    ]
    out = []
    for r in reqs:
        data = wire(client.send(r))
        out.append(b"\x00" + data)  # first byte: role and chunking (see the target)
        if r.op is Op.PUT:
            out.append(b"\x0a" + data)  # server with payload sinks, scatter reads
        server.receive_data(data)
    resps = [
        Response(1),
        Response(2, {"sizes": [3, -1]}, [b"abc", None]),
        Response(4, {"hits": [True]}),
        Response(9, {"count": 1}),
    ]
    from tairstore.errors import StoreError

    # The last one is the server's connection-level goodbye (request id 0) that closes a stream.
    resps.append(Response(0, error=StoreError("shutting down")))
    for r in resps:
        out.append(b"\x01" + wire(server.send(r)))
    out.append(b"\x05" + out[-1][1:] + out[-2][1:])  # the goodbye, then more, in one chunk
    out.append(b"\x02" + b"".join(o[1:] for o in out[:5]))
    return out


_CLIENT_OPS = ((1, "PING", {}), (2, "GET", {"keys": [b"k1", b"k2"]}), (3, "PUT",
               {"keys": [b"a"], "sizes": [1]}), (4, "EXISTS", {"keys": [b"k"]}),
               (5, "MATCH", {"keys": [b"a"], "mode": "prefix"}), (9, "DELETE", {"keys": [b"a"]}),
               (10, "STATS", {}))


@contextlib.contextmanager
def _protocol_target() -> Iterator[Callable[[bytes], None]]:
    from tairstore.net.limits import Limits
    from tairstore.net.protocol import (
        Connection, Op, ProtocolErrorEvent, Request, Response, Role,
    )

    limits = Limits(**_PROTOCOL_LIMITS)

    def check(data: bytes) -> None:
        if not data:
            return
        mode, body = data[0], data[1:]
        if mode & 1:
            conn = Connection(Role.CLIENT, limits)
            for rid, op, fields in _CLIENT_OPS:  # responses need requests in flight
                blocks = [b"x"] if op == "PUT" else []
                conn.send(Request(rid, Op[op], fields, blocks))
        else:
            conn = Connection(Role.SERVER, limits)
            if mode & 2:
                conn.payload_sinks = lambda rid, op, f: [bytearray(s) for s in f["sizes"]]
        rng = random.Random(mode)
        pos = 0
        while pos < len(body):
            n = len(body) - pos if mode & 4 else rng.randint(1, 64)
            try:
                if mode & 8:
                    # The transport's way (the server's readv): scatter into get_buffers().
                    bufs = conn.get_buffers()
                    n = min(n, len(body) - pos, sum(len(b) for b in bufs))
                    off = pos
                    for b in bufs:
                        take = min(len(b), pos + n - off)
                        b[:take] = body[off:off + take]
                        off += take
                    pos += n
                    events = conn.buffers_filled(n)
                else:
                    chunk = body[pos:pos + n]
                    pos += n
                    events = conn.receive_data(chunk)
            except ProtocolError:
                if not conn.broken:
                    raise _finding("receive_data raised on a connection that is not broken")
                return
            for ev in events:
                if not isinstance(ev, (Request, Response, ProtocolErrorEvent)):
                    raise _finding(f"unknown event {ev!r}")
                if isinstance(ev, ProtocolErrorEvent) and not isinstance(ev.error, ProtocolError) \
                        and not (mode & 1):
                    raise _finding(f"server got a non-protocol error event {ev.error!r}")

    yield check


# -- TOML config ------------------------------------------------------------------------------
def _config_corpus() -> list[bytes]:
    docs = [
        '[server]\nhost = "127.0.0.1"\nport = 7480\nhttp_port = 7481\ndata_dir = "./d"\n'
        'shutdown_grace_s = 5.0\n',
        '[store]\ndram_bytes = "64MiB"\nssd_bytes = "1GiB"\ndurability = "batch"\n'
        'compression = "zstd"\npolicy = { dram = "lru", ssd = "leaf_lru" }\n'
        'watermarks = { low = 0.7, high = 0.9 }\n',
        '[limits]\nmax_frame_bytes = "65MiB"\nmax_batch = 1024\nhttp_max_body_bytes = "8MiB"\n',
        '[[tokens]]\ntoken = "0123456789abcdef0123"\nnamespaces = ["a", "b"]\nrole = "user"\n',
        '[namespaces.team-a]\ntotal_bytes = "1GiB"\ndram_bytes = "256MiB"\n',
        '[store]\ndram_bytes = "64MiB"\n[store.dram_partitions.team-a]\nbytes = "8MiB"\n'
        'namespaces = ["a", "b"]\ngroup = "gpu"\n[shm]\npartitions = "auto"\nlease_s = 30\n',
        '',
    ]
    return [d.encode() for d in docs]


@contextlib.contextmanager
def _config_target() -> Iterator[Callable[[bytes], None]]:
    from tairstore.daemon.config import load_config

    scratch = tempfile.mkdtemp(prefix="tairstore-fuzz-config-")
    path = os.path.join(scratch, "tairstore.toml")

    def check(data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
        try:
            load_config(path)
        except InvalidArgumentError:
            pass

    try:
        yield check
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- HTTP JSON bodies -------------------------------------------------------------------------
#: (method, path) of every endpoint that reads a JSON body; an input's first byte picks one.
HTTP_ROUTES = (
    ("POST", "/namespaces"), ("PUT", "/namespaces/team-a"), ("POST", "/instances"),
    ("POST", "/cache/location"), ("POST", "/cache/write/start"), ("POST", "/cache/write/finish"),
    ("POST", "/cache/write/abort"), ("POST", "/cache/remove"), ("POST", "/cache/trim"),
    ("POST", "/api/registerInstance"), ("POST", "/api/getInstanceInfo"),
    ("POST", "/api/getCacheLocation"), ("POST", "/api/getCacheLocationLen"),
    ("POST", "/api/getCacheMeta"), ("POST", "/api/startWriteCache"),
    ("POST", "/api/finishWriteCache"), ("POST", "/api/removeCache"), ("POST", "/api/trimCache"),
    ("POST", "/api/noSuchMethod"),
)


def _http_corpus() -> list[bytes]:
    keys = ["6b31", "6b32"]
    inst = {"instance_id": "i1", "instance_group": "default", "block_size": 4}
    tair_reg = {"trace_id": "t", "instance_group": "default", "instance_id": "i2", "block_size": 4,
                "location_spec_infos": [{"name": "tp0", "size": "256"}],
                "model_deployment": {"model_name": "m", "dtype": "BF16", "tp_size": 1},
                "location_spec_groups": [{"name": "full", "spec_names": ["tp0"]}]}
    bodies = {
        "/namespaces": {"name": "team-a", "total_bytes": 1 << 20},
        "/namespaces/team-a": {"quota": {"total_bytes": 2 << 20, "tier_bytes": {"dram": 1 << 20}}},
        "/instances": inst,
        "/cache/location": {"keys": keys, "mode": "prefix"},
        "/cache/write/start": {"keys": keys, "sizes": [16, 16]},
        "/cache/write/finish": {"session_id": "s1", "keys": keys},
        "/cache/write/abort": {"session_id": "s1"},
        "/cache/remove": {"keys": keys},
        "/cache/trim": {"namespace": "default", "mode": "all"},
        "/api/registerInstance": tair_reg,
        "/api/getInstanceInfo": {"instance_id": "i2"},
        "/api/getCacheLocation": {"instance_id": "i2", "block_keys": ["1", "2"],
                                  "query_type": "QT_PREFIX_MATCH"},
        "/api/getCacheLocationLen": {"instance_id": "i2", "token_ids": ["1", "2", "3", "4"]},
        "/api/getCacheMeta": {"instance_id": "i2", "block_keys": ["1"]},
        "/api/startWriteCache": {"instance_id": "i2", "block_keys": ["1", "2"],
                                 "write_timeout_seconds": 5},
        "/api/finishWriteCache": {"instance_id": "i2", "write_session_id": "x",
                                  "success_blocks": {"bool_masks": {"values": [True, False]}}},
        "/api/removeCache": {"instance_id": "i2", "block_keys": ["1"]},
        "/api/trimCache": {"instance_id": "i2", "strategy": "TS_REMOVE_ALL_CACHE"},
    }
    out = []
    for i, (_, path) in enumerate(HTTP_ROUTES):
        body = bodies.get(path, {})
        out.append(bytes([i]) + json.dumps(body).encode())
    out += [bytes([0]) + b"[]", bytes([3]) + b"\xff\xfe{", bytes([9]) + b'{"a": 1e999}']
    return out


#: Field names the HTTP endpoints read, and values of every JSON type to put in them: random
#: bodies built from these get past parse_json and into the handlers' own checks.
_HTTP_FIELDS = ("keys", "token_ids", "block_size", "namespace", "instance_id", "instance_group",
                "mode", "window", "sizes", "session_id", "lease_s", "ok_keys", "ts", "name",
                "quota", "total_bytes", "tier_bytes", "ttl_s", "block_keys", "query_type",
                "write_timeout_seconds", "write_session_id", "success_blocks", "strategy",
                "location_spec_infos", "location_spec_groups", "model_deployment", "trace_id",
                "start_pos", "block_mask", "timestamp")


def _json_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice((0, 1, -1, 4, 2**31, 2**63, -2**63 - 1, 10**30))
    if kind == 1:
        return rng.choice((0.5, -1.0, 1e308, float("inf"), float("nan")))
    if kind == 2:
        return rng.choice(("", "6b31", "00" * 64, "00" * 65, "zz", "prefix", "all", "default",
                           "QT_PREFIX_MATCH", "TS_TIMESTAMP", "-1", "9" * 30, "\u0000", "i2"))
    if kind == 3:
        return rng.choice((True, False, None))
    if kind == 4:
        return [rng.choice(("6b31", "6b32", "1", "2", 3))] * rng.randint(0, 3)
    if kind == 5:
        return rng.randbytes(4).hex()
    if kind in (6, 7):
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(_HTTP_FIELDS): _json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def structured(name: str, rng: random.Random) -> bytes | None:
    """A structure-aware input for ``name`` (HTTP: a random JSON body), or None for none."""
    if name != "http":
        return None
    body = {rng.choice(_HTTP_FIELDS): _json_value(rng) for _ in range(rng.randint(1, 6))}
    return bytes([rng.randrange(len(HTTP_ROUTES))]) + json.dumps(body).encode()


class _TrioLoop:
    """A trio event loop in its own thread, so each input is one ``from_thread.run`` call."""

    def __init__(self) -> None:
        import trio

        self.trio = trio
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="tairstore-fuzz-http", daemon=True)
        self._thread.start()
        self._ready.wait(30)

    def _main(self) -> None:
        async def main() -> None:
            self.token = self.trio.lowlevel.current_trio_token()
            self._stop = self.trio.Event()
            self._ready.set()
            await self._stop.wait()

        self.trio.run(main)

    def run(self, fn, *args):
        return self.trio.from_thread.run(fn, *args, trio_token=self.token)

    def close(self) -> None:
        self.trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(30)


@contextlib.contextmanager
def _http_target() -> Iterator[Callable[[bytes], None]]:
    import tairstore
    from tairstore.daemon.auth import Authenticator
    from tairstore.daemon.control import ControlPlane
    from tairstore.daemon.api import HttpApi, parse_json
    from tairstore.daemon.httpserver import Request
    from tairstore.daemon.metrics import Metrics
    from tairstore.daemon.state import DaemonState

    scratch = tempfile.mkdtemp(prefix="tairstore-fuzz-http-")
    store = tairstore.open(os.path.join(scratch, "data"), dram_bytes=4 << 20, ssd_bytes=16 << 20,
                           durability="none")
    api = HttpApi(ControlPlane(store, DaemonState(os.path.join(scratch, "state.json"))),
                  Authenticator(), Metrics(store), http_url="http://127.0.0.1:1",
                  data_url="tairstore://127.0.0.1:1")
    loop = _TrioLoop()

    def check(data: bytes) -> None:
        if not data:
            return
        method, path = HTTP_ROUTES[data[0] % len(HTTP_ROUTES)]
        body = data[1:]
        req = Request(method, path, {}, {"content-type": "application/json"}, body)
        resp = loop.run(api, req)
        if resp.status >= 500 and resp.status not in (501, 507):
            raise _finding(f"{method} {path} answered {resp.status}: {resp.body[:300]!r}")
        try:
            parse_json(body)
        except InvalidArgumentError:
            if resp.status != 400:
                raise _finding(f"{method} {path}: a body that is not a JSON object got "
                               f"{resp.status}, not 400: {resp.body[:200]!r}")

    try:
        yield check
    finally:
        loop.close()
        store.close()
        shutil.rmtree(scratch, ignore_errors=True)


#: Target name -> context manager factory yielding ``check(data)``.
TARGETS: dict[str, Callable] = {
    "wal": _wal_target,
    "segment": _segment_target,
    "protocol": _protocol_target,
    "http": _http_target,
    "config": _config_target,
}

_CORPORA = {"wal": _wal_corpus, "segment": _segment_corpus, "protocol": _protocol_corpus,
            "http": _http_corpus, "config": _config_corpus}


def corpus(name: str) -> list[bytes]:
    """The valid inputs of target ``name`` (mutations start from these)."""
    return _CORPORA[name]()

