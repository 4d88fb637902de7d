"""The data server over real loopback sockets: malformed frames, auth, sessions, shutdown.

The server runs ``serve_data`` under ``trio.run`` in a background thread of the test process,
so a test can look at the store it serves while real sockets talk to it.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from functools import partial

import msgpack
import numpy as np
import pytest
import trio

import tairstore
from tairstore.daemon.auth import Authenticator, TokenSpec
from tairstore.daemon.events import ConnectionEvents
from tairstore.daemon.metrics import Metrics
from tairstore.errors import CapacityError, PermissionDeniedError, ProtocolError, SessionError
from tairstore.net.client import AsyncClient, Client, NetworkError
from tairstore.net.limits import Limits
from tairstore.net.protocol import CONNECTION_ID, MAGIC, PRELUDE, VERSION
from tairstore.net.schema import Code, Op
from tairstore.daemon.dataserver import INPLACE_MIN_BYTES, serve_data

MiB = 1 << 20


class ServerThread:
    """``serve_data`` under ``trio.run`` in a thread; ``stop()`` cancels it (graceful shutdown)."""

    def __init__(self, store, **options) -> None:
        self.store = store
        self.options = options
        self.port: int | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tairstore-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the test server did not start")
        if self._error is not None:
            raise self._error

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _run(self) -> None:
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                self._trio_token = trio.lowlevel.current_trio_token()
                self._scope = nursery.cancel_scope
                self.port = await nursery.start(partial(serve_data, self.store, **self.options))
                self._ready.set()

        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self._error = exc
            self._ready.set()

    def stop(self, timeout: float = 20.0) -> None:
        if self._thread.is_alive():
            try:
                self._trio_token.run_sync_soon(self._scope.cancel)
            except trio.RunFinishedError:
                pass
            self._thread.join(timeout)
        assert not self._thread.is_alive(), "the server did not shut down"
        if self._error is not None:
            raise self._error


@pytest.fixture
def volatile_store(tmp_path):
    store = tairstore.open(tmp_path / "v", dram_bytes=64 * MiB, ssd_bytes=0)
    yield store
    store.close()


@pytest.fixture
def server_factory():
    servers: list[ServerThread] = []

    def make(store, **options) -> ServerThread:
        server = ServerThread(store, **options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def frame(kind: int, rid: int, fields: dict | None = None, payload: bytes = b"", *, magic: bytes = MAGIC,
          version: int = VERSION, payload_len: int | None = None) -> bytes:
    header = msgpack.packb(fields) if fields is not None else b""
    n = len(payload) if payload_len is None else payload_len
    return PRELUDE.pack(magic, version, kind, 0, rid, len(header), n) + header + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, int, dict]:
    magic, version, kind, flags, rid, hlen, plen = PRELUDE.unpack(recv_exact(sock, PRELUDE.size))
    assert (magic, version, flags) == (MAGIC, VERSION, 0)
    header = msgpack.unpackb(recv_exact(sock, hlen)) if hlen else {}
    recv_exact(sock, plen)
    return kind, rid, header


def raw(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def assert_still_serving(server) -> None:
    with Client(server.url, timeout=10) as c:
        key = np.random.default_rng().bytes(16)
        assert c.put(key, b"still here") is True
        assert bytes(c.get(key)) == b"still here"


def assert_closed(sock: socket.socket) -> None:
    sock.settimeout(10)
    assert sock.recv(1) == b""


# ------------------------------------------------------------------------------ malformed frames
SEMANTIC = {
    "unknown opcode": (frame(0x7E, 5), Code.UNKNOWN_OPCODE),
    "batch too large": (frame(Op.EXISTS, 5, {"keys": [b"k"] * 9}), Code.BATCH_TOO_LARGE),
    "payload shorter than sizes": (frame(Op.PUT, 5, {"keys": [b"k"], "sizes": [100]}, b"x" * 10),
                                   Code.PAYLOAD_MISMATCH),
    "bad header": (frame(Op.GET, 5, {"keys": "notalist"}), Code.BAD_HEADER),
}


@pytest.mark.parametrize("case", list(SEMANTIC))
def test_semantic_error_answers_that_id_and_the_connection_goes_on(case, volatile_store, server_factory):
    server = server_factory(volatile_store, limits=Limits(max_batch=8))
    bad, code = SEMANTIC[case]
    with raw(server) as sock:
        sock.sendall(bad + frame(Op.PING, 6))
        answers = [read_frame(sock) for _ in range(2)]
        by_id = {rid: (kind, header) for kind, rid, header in answers}
        assert by_id[5][0] == Op.ERROR and by_id[5][1]["code"] == code
        assert by_id[6] == (Op.OK, {})
    assert_still_serving(server)


FRAMING = {
    "bad magic": (frame(Op.PING, 1, magic=b"GE"), Code.BAD_MAGIC),
    "bad version": (frame(Op.PING, 1, version=7), Code.BAD_VERSION),
    "length beyond the limit": (frame(Op.PUT, 1, payload_len=1 << 40), Code.FRAME_TOO_LARGE),
}


@pytest.mark.parametrize("case", list(FRAMING))
def test_framing_error_gets_a_connection_error_then_a_close(case, volatile_store, server_factory):
    server = server_factory(volatile_store)
    bad, code = FRAMING[case]
    with raw(server) as sock:
        sock.sendall(bad)
        kind, rid, header = read_frame(sock)
        assert (kind, rid, header["code"]) == (Op.ERROR, CONNECTION_ID, code)
        assert_closed(sock)
    assert_still_serving(server)


def test_truncated_header_then_eof_closes_cleanly(volatile_store, server_factory):
    server = server_factory(volatile_store)
    with raw(server) as sock:
        sock.sendall(PRELUDE.pack(MAGIC, VERSION, Op.EXISTS, 0, 1, 100, 0) + b"\x81\xa4keys")
        sock.shutdown(socket.SHUT_WR)
        assert_closed(sock)
    assert_still_serving(server)


def test_garbage_while_other_clients_work(volatile_store, server_factory):
    server = server_factory(volatile_store)
    stop = threading.Event()
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with Client(server.url, timeout=10) as c:
                n = 0
                while not stop.is_set() and n < 200:
                    key = f"w{i}-{n}".encode()
                    c.put(key, key * 100)
                    assert bytes(c.get(key)) == key * 100
                    n += 1
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(7)
    for i in range(30):
        with raw(server) as sock:
            sock.sendall(MAGIC + rng.bytes(int(rng.integers(1, 200))))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            while sock.recv(4096):
                pass
    stop.set()
    for t in threads:
        t.join(30)
    assert not failures, failures


def test_response_too_large_is_an_error_not_a_crash(volatile_store, server_factory):
    server = server_factory(volatile_store, limits=Limits(max_frame_bytes=2 * MiB, max_header_bytes=MiB))
    with Client(server.url) as c:
        c.put(b"a", bytes(MiB))
        c.put(b"b", bytes(MiB))
        with pytest.raises(ProtocolError) as info:
            c.get_many([b"a", b"b"])
        assert info.value.code == Code.FRAME_TOO_LARGE
        assert len(c.get(b"a")) == MiB


# ------------------------------------------------------------------------------------------ auth
class FakeAuth:
    """Stands in for the daemon's Authenticator: tokens -> namespaces ("*" = admin)."""

    enabled = True

    def __init__(self, tokens: dict[str, set[str]]) -> None:
        self.tokens = tokens

    def identify(self, token):
        return self.tokens.get(token)

    def check(self, token, namespace, *, admin=False):
        spaces = self.tokens.get(token)
        if spaces is None:
            raise PermissionDeniedError("missing or unknown token")
        if "*" not in spaces and namespace not in spaces:
            raise PermissionDeniedError(f"token does not cover {namespace!r}")


def _authenticator():
    try:
        from tairstore.daemon.auth import Authenticator, TokenSpec
    except ImportError:
        return FakeAuth({"tok-a": {"a"}, "root": {"*"}})
    return Authenticator([TokenSpec("tok-a", ["a"]), TokenSpec("root", role="admin")])


def test_auth_refusals_and_the_connection_continues(volatile_store, server_factory):
    server = server_factory(volatile_store, auth=_authenticator())
    with Client(server.url) as anonymous:
        anonymous.ping()  # liveness needs no token
        with pytest.raises(PermissionDeniedError):
            anonymous.put(b"k", b"v", namespace="a")
    with pytest.raises(PermissionDeniedError):
        Client(server.url, token="wrong")
    with Client(server.url, token="tok-a") as c:
        with pytest.raises(PermissionDeniedError):
            c.put(b"k", b"v", namespace="b")
        with pytest.raises(PermissionDeniedError):
            c.match([b"k"], namespace="default")
        with pytest.raises(PermissionDeniedError):
            c.stats()
        assert c.put(b"k", b"v", namespace="a") is True  # same connection, still usable
        assert bytes(c.get(b"k", namespace="a")) == b"v"
    with Client(server.url, token="root") as admin:
        assert admin.exists([b"k"], namespace="a") == [True]
        assert admin.stats()["blocks"] == 1


# -------------------------------------------------------------------------------------- sessions
def test_sessions_aborted_when_the_client_disconnects(volatile_store, server_factory):
    server = server_factory(volatile_store)
    c = Client(server.url)
    session = c.start_write([b"s1", b"s2"], [1000, 1000])
    c.write(session, b"s1", bytes(1000))
    assert volatile_store.stats()["sessions_open"] == 1
    c.close()
    deadline = time.monotonic() + 10
    while volatile_store.stats()["sessions_open"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert volatile_store.stats()["sessions_open"] == 0
    with Client(server.url) as c2:
        s = c2.start_write([b"s1", b"s2"], [1000, 1000])
        assert s.keys_to_write == [b"s1", b"s2"]  # the reservations were released
        with pytest.raises(SessionError):
            c2.write(session, b"s1", bytes(1000))  # another client's session


def test_a_session_belongs_to_its_connection(volatile_store, server_factory):
    server = server_factory(volatile_store)
    with Client(server.url) as c:
        s = c.start_write([b"x"], [3])
        conn = s._conn
        conn.close()  # the connection breaks under the session
        with pytest.raises(SessionError):
            c.write(s, b"x", b"abc")
        c.abort_write(s)  # the daemon aborts it when it sees the close: a no-op here
        deadline = time.monotonic() + 10
        while volatile_store.stats()["sessions_open"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.put(b"x", b"abc") is True  # the key was released


# -------------------------------------------------------------------------- shutdown, pipelining
def test_graceful_shutdown_loses_no_acknowledged_write(tmp_path, server_factory):
    path = tmp_path / "durable"
    store = tairstore.open(path, dram_bytes=16 * MiB, ssd_bytes=128 * MiB, segment_bytes=8 * MiB,
                           durability="sync")
    server = server_factory(store)
    acked: dict[bytes, bytes] = {}
    lock = threading.Lock()

    def writer(i: int) -> None:
        try:
            with Client(server.url, timeout=10) as c:
                for n in range(10_000):
                    key, data = f"g{i}-{n}".encode(), bytes([i, n % 256]) * 4096
                    if c.put(key, data):
                        with lock:
                            acked[key] = data
        except (NetworkError, OSError):
            pass  # the server went away: that put was not acknowledged

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(acked) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.stop()
    for t in threads:
        t.join(30)
    store.close()
    assert len(acked) >= 40
    with tairstore.open(path, dram_bytes=16 * MiB, ssd_bytes=128 * MiB, segment_bytes=8 * MiB) as again:
        for key, data in acked.items():
            assert bytes(again.get(key)) == data, key


def test_async_client_pipelines_past_max_inflight(volatile_store, server_factory):
    server = server_factory(volatile_store, limits=Limits(max_inflight=4, worker_threads=2))
    blocks = {f"p{i}".encode(): np.full(5000 + i, i % 256, np.uint8) for i in range(64)}

    async def main() -> None:
        async with AsyncClient(server.url) as c:
            async with trio.open_nursery() as nursery:
                for key, block in blocks.items():
                    nursery.start_soon(c.put, key, block)
            results: dict[bytes, bytes] = {}

            async def fetch(key: bytes) -> None:
                results[key] = bytes(await c.get(key))

            async with trio.open_nursery() as nursery:
                for key in blocks:
                    nursery.start_soon(fetch, key)
            assert results == {k: b.tobytes() for k, b in blocks.items()}
            out = bytearray(10_000)
            assert await c.get_into(b"p3", out) == 5003 and out[:5003] == blocks[b"p3"].tobytes()
            s = await c.start_write([b"w1", b"p1"], [4, 4])
            assert s.keys_to_write == [b"w1"]
            await c.write(s, b"w1", b"abcd")
            assert await c.finish_write(s, [b"w1"]) == 1
            assert (await c.match([b"p0", b"p1", b"zz"], "exact")).hits == [True, True, False]
            assert await c.delete([b"w1"]) == 1

    trio.run(main)


def test_metrics_observe_every_request(volatile_store, server_factory):
    seen = []

    class Metrics:
        def observe_request(self, op, seconds, nbytes, ok):
            seen.append((op, nbytes, ok))

    server = server_factory(volatile_store, metrics=Metrics())
    with Client(server.url) as c:
        c.put(b"m", b"12345")
        c.get(b"m")
        # Refused by the server (the client checks argument shapes, not sessions).
        session = c.start_write([b"w"], [5])
        with pytest.raises(tairstore.SessionError):
            c.write(session, b"not-in-session", b"12345")
    deadline = time.monotonic() + 5
    while len(seen) < 4 and time.monotonic() < deadline:  # observed just after the answer goes out
        time.sleep(0.01)
    assert ("put", 5, True) in seen and ("get", 5, True) in seen
    assert any(not ok for _, _, ok in seen), seen


# ------------------------------------------------------------------ puts received in place
class CountingStore:
    """A store whose write_view/write_done calls are counted (everything else passes through)."""

    def __init__(self, store) -> None:
        self._store = store
        self.views = 0
        self.done = 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    def write_view(self, session, key):
        self.views += 1
        return self._store.write_view(session, key)

    def write_done(self, session, key):
        self.done += 1
        return self._store.write_done(session, key)


def test_put_arriving_in_pieces_lands_in_place_byte_exact(volatile_store, server_factory):
    store = CountingStore(volatile_store)
    server = server_factory(store)
    rng = np.random.default_rng(7)
    block = rng.bytes(INPLACE_MIN_BYTES + 44_464)  # a single block from INPLACE_MIN_BYTES on
    data = frame(Op.PUT, 1, {"keys": [b"big"], "sizes": [len(block)]}, block)
    with raw(server) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), 9_999):  # the payload comes in many small pieces
            sock.sendall(data[i:i + 9_999])
            if i < 40_000:
                time.sleep(0.002)
        kind, rid, header = read_frame(sock)
    assert (kind, rid, header) == (Op.OK, 1, {"stored": [True]})
    assert (store.views, store.done) == (1, 1)
    assert bytes(volatile_store.get(b"big")) == block
    with Client(server.url) as c:  # and a batch through the client, blocks of mixed sizes
        blocks = [rng.bytes(n) for n in (100_000, 1, 7, 2 << 20)]
        keys = [b"m0", b"m1", b"m2", b"m3"]
        assert c.put_many(keys, blocks) == [True] * 4
        assert [bytes(c.get(k)) for k in keys] == blocks
    assert store.views == 5


def test_small_single_put_is_copied_by_store_put_not_received_in_place(volatile_store, server_factory):
    # Below INPLACE_MIN_BYTES a write session costs more than store.put's copy: no write_view.
    store = CountingStore(volatile_store)
    server = server_factory(store)
    block = np.random.default_rng(3).bytes(INPLACE_MIN_BYTES - 1)
    with Client(server.url) as c:
        assert c.put(b"small", block) is True
        assert c.put(b"small", block) is False
        assert bytes(c.get(b"small")) == block
    assert (store.views, store.done) == (0, 0)
    assert volatile_store.stats()["sessions_open"] == 0


def test_put_in_place_discards_keys_already_stored(volatile_store, server_factory):
    server = server_factory(volatile_store)
    old = b"o" * 100_000
    with Client(server.url) as c:
        assert c.put(b"k1", old) is True
        new = [b"n" * 100_000, b"m" * 200_000, b"p" * 70_000]
        assert c.put_many([b"k0", b"k1", b"k2"], new) == [True, False, True]
        assert bytes(c.get(b"k1")) == old  # the stored block is untouched
        assert bytes(c.get(b"k0")) == new[0] and bytes(c.get(b"k2")) == new[2]
        assert c.put(b"k1", b"x" * 100_000) is False
        # a refused batch (duplicate keys) is answered once its payload is in; the connection goes on
        with pytest.raises(tairstore.errors.InvalidArgumentError):
            c.put_many([b"d", b"d"], [bytes(100_000), bytes(100_000)])
        assert c.exists([b"d"]) == [False]
        assert volatile_store.stats()["sessions_open"] == 0


def test_put_aborted_mid_payload_releases_its_reservation(volatile_store, server_factory):
    server = server_factory(volatile_store)
    before = volatile_store.stats()
    size = 4 * MiB
    sock = raw(server)
    sock.sendall(frame(Op.PUT, 1, {"keys": [b"half"], "sizes": [size]}, bytes(size // 2), payload_len=size))
    deadline = time.monotonic() + 10
    while volatile_store.stats()["sessions_open"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert volatile_store.stats()["sessions_open"] == 1  # reserved as soon as the header came
    sock.close()  # the client vanishes mid-payload
    while volatile_store.stats()["sessions_open"] and time.monotonic() < deadline:
        time.sleep(0.01)
    after = volatile_store.stats()
    assert after["sessions_open"] == 0
    assert volatile_store.exists([b"half"]) == [False]
    assert volatile_store.put(b"half", bytes(size)) is True  # no longer in flight
    assert after["blocks"] == before["blocks"]
    assert_still_serving(server)


def test_put_in_place_refused_by_auth_reserves_nothing(volatile_store, server_factory):
    class Auth:
        enabled = True

        def identify(self, token):
            return token

        def check(self, token, namespace, admin=False):
            if namespace != token:
                raise PermissionDeniedError(f"{token!r} may not use {namespace!r}")

    server = server_factory(volatile_store, auth=Auth())
    with Client(server.url, token="a") as c:
        with pytest.raises(PermissionDeniedError):
            c.put(b"k", bytes(INPLACE_MIN_BYTES + 1), namespace="b")
        assert volatile_store.stats()["sessions_open"] == 0
        assert c.put(b"k", bytes(INPLACE_MIN_BYTES + 1), namespace="a") is True
    assert volatile_store.exists([b"k"], namespace="b") == [False]


@pytest.mark.skipif(not hasattr(socket, "TCP_NOTSENT_LOWAT"), reason="Linux/macOS socket option")
def test_data_sockets_queue_whole_answers():
    """trio's SocketStream limits unsent bytes to 16 KiB; a data connection lifts that, so a
    large answer goes to the kernel in one writev instead of ~8 per MiB and a wait."""
    from tairstore.daemon.dataserver import SEND_BUFFER, _tune_socket

    async def main():
        listener = trio.socket.socket()
        with listener:
            await listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = trio.socket.socket()
            with client:
                await client.connect(listener.getsockname())
                conn, _ = await listener.accept()
                stream = trio.SocketStream(conn)
                sock = stream.socket
                _tune_socket(sock)
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) >= 1 << 30
                if SEND_BUFFER:
                    # The kernel caps it at net.core.wmem_max (and doubles what it grants).
                    cap = SEND_BUFFER
                    try:
                        with open("/proc/sys/net/core/wmem_max") as f:
                            cap = min(cap, int(f.read()))
                    except OSError:
                        cap = 0
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= cap
                await stream.aclose()

    trio.run(main)


# ------------------------------------------- review fixes: oversized puts, error reporting


def test_a_put_over_the_frame_limit_gets_the_stores_capacity_error(tmp_path):
    block = np.zeros(66 * MiB, np.uint8)
    with tairstore.open(tmp_path / "s", dram_bytes=8 * MiB, ssd_bytes=0) as store:
        with pytest.raises(CapacityError) as embedded:
            store.put(b"k", block)
        server = ServerThread(store)
        try:
            with Client(server.url) as client:
                with pytest.raises(CapacityError) as remote:
                    client.put(b"k", block)
                assert remote.value.dimension == embedded.value.dimension == "block_size"
                # The connection was drained, not dropped: the next request goes on it.
                assert client.put(b"k2", b"x" * 100) is True
                assert bytes(client.get(b"k2")) == b"x" * 100

            async def pipelined() -> None:
                async with AsyncClient(server.url) as aclient:
                    with pytest.raises(CapacityError) as refused:
                        await aclient.put_many([b"a", b"b"], [block, block])
                    # The client splits a batch past the frame limit; each block alone is
                    # still too big, as the embedded store says.
                    assert refused.value.dimension == "block_size"
                    assert bytes(await aclient.get(b"k2")) == b"x" * 100

            trio.run(pipelined)
        finally:
            server.stop()


def test_data_server_counts_and_logs_framing_errors_resets_and_auth_failures(tmp_path, caplog, metric_counters):
    with tairstore.open(tmp_path / "s", dram_bytes=8 * MiB, ssd_bytes=0) as store:
        metrics = Metrics(store)
        auth = Authenticator([TokenSpec("tok-a-0123456789", ["a"])])
        server = ServerThread(store, metrics=metrics, auth=auth)
        try:
            with caplog.at_level(logging.WARNING, logger="tairstore.daemon"):
                # A framing error: bad magic. The server answers and closes.
                with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                    s.sendall(b"XX" + bytes(26))
                    while s.recv(65536):
                        pass
                # A reset in the middle of a frame (SO_LINGER 0: close sends RST).
                s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                s.sendall(b"TS\x01")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                # Auth: an unknown token, and a token that does not cover the namespace.
                with pytest.raises(PermissionDeniedError):
                    Client(server.url, token="not-a-token-0123456789")
                with Client(server.url, token="tok-a-0123456789") as client:
                    with pytest.raises(PermissionDeniedError):
                        client.put(b"k", b"x", namespace="b")
                    client.ping()  # answered after the reset was handled
        finally:
            server.stop()
        text = metrics.render()
    protocol = metric_counters(text, "tairstore_protocol_errors")
    assert protocol[(("kind", "bad_magic"), ("server", "data"))] == 1
    assert metric_counters(text, "tairstore_connection_errors")[(("kind", "reset"), ("server", "data"))] >= 1
    auth_failures = metric_counters(text, "tairstore_auth_failures")
    assert auth_failures[(("kind", "unauthenticated"), ("server", "data"))] == 1
    assert auth_failures[(("kind", "forbidden"), ("server", "data"))] == 1
    logged = caplog.text
    assert "data protocol error (bad_magic)" in logged
    assert "data connection error (reset)" in logged
    assert "data auth error (unauthenticated)" in logged


def test_connection_events_are_counted_always_and_logged_at_most_once_per_interval(caplog, metric_counters):
    now = [100.0]
    metrics = Metrics()
    events = ConnectionEvents(metrics, interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="tairstore.daemon"):
        for _ in range(50):
            events.protocol("data", "bad_magic", "garbage")
        events.connection("data", "reset", "gone")  # another category: its own budget
        assert len(caplog.records) == 2
        now[0] += 10.0
        events.protocol("data", "bad_magic", "garbage")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "49 more not logged" in lines[2]
    text = metrics.render()
    assert metric_counters(text, "tairstore_protocol_errors")[(("kind", "bad_magic"), ("server", "data"))] == 51
    assert metric_counters(text, "tairstore_connection_errors")[(("kind", "reset"), ("server", "data"))] == 1
