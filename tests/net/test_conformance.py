"""One suite, two targets: the embedded Store and a Client of a daemon in another process.

Every test runs against both and expects the same results and the same exception classes.
Each test works in a namespace of its own, so the daemon process is shared by the module.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

import tairstore
from tairstore.errors import CapacityError, InvalidArgumentError, LeaseExpiredError, SessionError
from tairstore.engine.match import MatchResult
from tairstore.daemon.process import DaemonProcess
from tairstore.net.client import Client

KiB, MiB = 1 << 10, 1 << 20
STORE_OPTIONS = {"dram_bytes": 32 * MiB, "ssd_bytes": 128 * MiB, "segment_bytes": 8 * MiB,
                 "durability": "batch"}
_namespaces = itertools.count()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """``tairstore serve`` as a subprocess; yields its data URL."""
    data = tmp_path_factory.mktemp("daemon") / "data"
    with DaemonProcess(data, store=STORE_OPTIONS) as d:
        yield d.data_url


@pytest.fixture(params=["embedded", "daemon"])
def target(request, tmp_path):
    """(store-like object, namespace of this test)."""
    ns = f"t{next(_namespaces)}"
    if request.param == "embedded":
        store = tairstore.open(tmp_path / "e", dram_bytes=32 * MiB, ssd_bytes=128 * MiB,
                               segment_bytes=8 * MiB, durability="batch")
    else:
        store = Client(request.getfixturevalue("daemon"), timeout=30)
    yield store, ns
    store.close()


def block(seed: int, size: int = 16 * KiB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def key(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


# -------------------------------------------------------------------------------- put / get
def test_put_get_round_trip(target):
    s, ns = target
    data = block(1)
    assert s.put(key(1), data, namespace=ns) is True
    assert s.put(key(2), data.tobytes(), namespace=ns) is True
    assert s.put(key(3), bytearray(data.tobytes()), namespace=ns) is True
    assert s.put(key(1), data, namespace=ns) is False
    for i in (1, 2, 3):
        view = s.get(key(i), namespace=ns)
        assert isinstance(view, memoryview) and view.readonly and bytes(view) == data.tobytes()
    assert s.get(key(9), namespace=ns) is None
    assert s.get(key(1), namespace=ns + "-other") is None


def test_get_into(target):
    s, ns = target
    data = block(2, 100 * KiB)
    s.put(key(1), data, namespace=ns)
    out = np.zeros(128 * KiB, np.uint8)
    assert s.get_into(key(1), out, namespace=ns) == data.nbytes
    assert np.array_equal(out[:data.nbytes], data)
    assert s.get_into(key(2), out, namespace=ns) == 0
    with pytest.raises(InvalidArgumentError):
        s.get_into(key(1), bytearray(10), namespace=ns)
    with pytest.raises(InvalidArgumentError):
        s.get_into(key(1), bytes(200 * KiB), namespace=ns)
    with pytest.raises(InvalidArgumentError):
        s.get_into(key(1), 12345, namespace=ns)


def test_exists_and_delete(target):
    s, ns = target
    s.put(key(1), block(1), namespace=ns)
    s.put(key(2), block(2), namespace=ns)
    assert s.exists([key(1), key(2), key(3)], namespace=ns) == [True, True, False]
    assert s.delete([key(1), key(3), key(1)], namespace=ns) == 1
    assert s.exists([key(1), key(2)], namespace=ns) == [False, True]
    assert s.get(key(1), namespace=ns) is None
    assert s.delete([], namespace=ns) == 0


# ------------------------------------------------------------------------------------ match
def test_match_three_modes(target):
    s, ns = target
    chain = [key(i) for i in range(8)]
    for i in (0, 1, 2, 4, 5, 6):
        s.put(chain[i], block(i, 1 * KiB), namespace=ns)
    prefix = s.match(chain, namespace=ns)
    assert isinstance(prefix, MatchResult)
    assert (prefix.mode, prefix.prefix_len, prefix.hit_count) == ("prefix", 3, 6)
    exact = s.match(chain, "exact", namespace=ns)
    assert exact.hits == [True, True, True, False, True, True, True, False]
    assert exact.tiers == ["dram"] * 3 + [None] + ["dram"] * 3 + [None]
    window = s.match(chain, "sliding_window", 3, namespace=ns)
    assert (window.window_start, window.window_len) == (4, 3)
    assert s.match(chain, "sliding_window", 4, namespace=ns).window_start is None
    assert s.match([], namespace=ns).prefix_len == 0
    with pytest.raises(InvalidArgumentError):
        s.match(chain, "sliding_window", namespace=ns)
    with pytest.raises(InvalidArgumentError):
        s.match(chain, "sliding_window", 0, namespace=ns)
    with pytest.raises(InvalidArgumentError):
        s.match(chain, "suffix", namespace=ns)


# --------------------------------------------------------------------------------- sessions
def test_write_session_happy_path(target):
    s, ns = target
    s.put(key(1), block(1), namespace=ns)
    session = s.start_write([key(1), key(2), key(3)], [16 * KiB, 4 * KiB, 8 * KiB], namespace=ns)
    assert session.keys_to_write == [key(2), key(3)] and session.namespace == ns
    assert isinstance(session.id, int)
    s.write(session, key(2), block(2, 4 * KiB))
    s.write(session, key(3), block(3, 8 * KiB))
    assert s.get(key(2), namespace=ns) is None  # W1: nothing visible before the commit
    assert s.finish_write(session, [key(2)]) == 1
    assert bytes(s.get(key(2), namespace=ns)) == block(2, 4 * KiB).tobytes()
    assert s.get(key(3), namespace=ns) is None  # written but not committed: released
    s.abort_write(session)  # a finished session is left alone
    with pytest.raises(SessionError):
        s.finish_write(session, [])


def test_write_session_misuse(target):
    s, ns = target
    session = s.start_write([key(1), key(2)], [10, 10], namespace=ns)
    with pytest.raises(SessionError):
        s.write(session, key(7), bytes(10))  # not in the session
    with pytest.raises(SessionError):
        s.write(session, key(1), bytes(11))  # wrong size
    s.write(session, key(1), bytes(10))
    with pytest.raises(SessionError):
        s.write(session, key(1), bytes(10))  # twice
    with pytest.raises(SessionError):
        s.finish_write(session, [key(2)])  # not written
    with pytest.raises(SessionError):
        s.write("not a session", key(1), bytes(10))
    s.abort_write(session)
    with pytest.raises(SessionError):
        s.write(session, key(2), bytes(10))
    assert s.start_write([key(1)], [10], namespace=ns).keys_to_write == [key(1)]  # released


def test_lease_expiry(target):
    s, ns = target
    session = s.start_write([key(1)], [10], lease_s=0.05, namespace=ns)
    time.sleep(0.3)
    with pytest.raises(LeaseExpiredError):
        s.write(session, key(1), bytes(10))


def test_session_argument_errors(target):
    s, ns = target
    with pytest.raises(InvalidArgumentError):
        s.start_write([key(1), key(1)], [1, 1], namespace=ns)
    with pytest.raises(InvalidArgumentError):
        s.start_write([key(1)], [1, 2], namespace=ns)
    with pytest.raises(InvalidArgumentError):
        s.start_write([key(1)], [0], namespace=ns)
    with pytest.raises(InvalidArgumentError):
        s.start_write([key(1)], [1.5], namespace=ns)
    with pytest.raises(InvalidArgumentError):
        s.start_write([key(1)], [1], lease_s=0, namespace=ns)
    with pytest.raises(CapacityError) as info:
        s.start_write([key(1)], [1 << 40], namespace=ns)
    assert info.value.dimension == "block_size"


# ------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("bad_key", [b"", b"x" * 65, "text", 42])
def test_bad_keys(target, bad_key):
    s, ns = target
    for call in (lambda: s.put(bad_key, b"v", namespace=ns), lambda: s.get(bad_key, namespace=ns),
                 lambda: s.exists([bad_key], namespace=ns), lambda: s.match([bad_key], namespace=ns),
                 lambda: s.delete([bad_key], namespace=ns)):
        with pytest.raises(InvalidArgumentError):
            call()


def test_bad_values(target):
    s, ns = target
    with pytest.raises(InvalidArgumentError):
        s.put(key(1), b"", namespace=ns)
    with pytest.raises(InvalidArgumentError):
        s.put(key(1), 12345, namespace=ns)
    with pytest.raises(InvalidArgumentError):
        s.put(key(1), np.zeros((8, 8), np.uint8)[:, ::2], namespace=ns)
    with pytest.raises(InvalidArgumentError):
        s.exists(key(1), namespace=ns)  # a single key, not a list
    with pytest.raises(InvalidArgumentError):
        s.put(key(1), b"v", namespace="")
    with pytest.raises(InvalidArgumentError):
        s.put(key(1), b"v", namespace=7)
    with pytest.raises(InvalidArgumentError):
        s.get(key(1), namespace="n" * 256)


def test_stats(target):
    s, ns = target
    s.put(key(1), block(1, 1000), namespace=ns)
    stats = s.stats()
    assert (stats["namespaces"][ns]["blocks"], stats["namespaces"][ns]["bytes"]) == (1, 1000)
    assert {"blocks", "tiers", "counters", "durability"} <= set(stats)


def test_client_urls():
    from tairstore.errors import InvalidArgumentError
    from tairstore.net.client import parse_url

    assert parse_url("tcp://127.0.0.1:7480") == ("127.0.0.1", 7480)
    assert parse_url("tairstore://127.0.0.1:7480") == ("127.0.0.1", 7480)  # as the daemon prints it
    for bad in ("http://127.0.0.1:7480", "tcp://127.0.0.1", "127.0.0.1:7480"):
        with pytest.raises(InvalidArgumentError):
            parse_url(bad)


def test_put_many_past_the_protocol_batch_limit_is_split_not_refused(target):
    # 1,500 keys: more than one request may name (max_batch 1024) — the client splits; the
    # embedded store takes it whole. Same answers either way.
    store, ns = target
    keys = [key(100_000 + i) for i in range(1500)]
    blocks = [block(i, 1024) for i in range(1500)]
    assert store.put_many(keys, blocks, namespace=ns) == [True] * 1500
    got = store.get_many(keys, namespace=ns)
    assert all(bytes(g) == b.tobytes() for g, b in zip(got, blocks))
    store.delete(keys, namespace=ns)


def test_batches_respect_the_key_and_byte_limits():
    from tairstore.net.calls import batches
    from tairstore.net.limits import Limits

    lim = Limits(max_frame_bytes=10_000, max_header_bytes=1_000, max_batch=3)
    spans = batches([4_000, 4_000, 4_000, 100, 100, 100, 100, 20_000, 1], lim)
    assert [(s.start, s.stop) for s in spans] == [(0, 2), (2, 5), (5, 7), (7, 8), (8, 9)]
    assert [(s.start, s.stop) for s in batches([], lim)] == [(0, 0)]
