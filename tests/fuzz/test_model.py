"""The expected-state model and the block contents every crash harness checks against.

Fast, no store and no processes: a wrong model would hide the bugs the harnesses look for.
"""

from __future__ import annotations

from tairstore.fuzz.model import Expected, content, identify

K = b"k000"


def test_sync_in_flight_put_may_or_may_not_land():
    model = Expected("sync", frozenset())
    model.begin([("default", K, 1)])
    model.ack([("default", K, 1)])
    model.begin([("default", K, None)])
    model.ack([("default", K, None)])
    model.begin([("default", K, 2)])  # the kill came before its ack
    assert model.allowed("default", K) == {2, None}
    assert not model.required("default", K)


def test_sync_acknowledged_put_is_required_unless_the_namespace_evicts():
    model = Expected("sync", frozenset({"q"}))
    for ns in ("default", "q"):
        model.begin([(ns, K, 1)])
        model.ack([(ns, K, 1)])
    assert model.allowed("default", K) == {1} and model.required("default", K)
    assert model.allowed("q", K) == {1, None} and not model.required("q", K)


def test_a_cleanly_failed_operation_promises_nothing():
    model = Expected("sync", frozenset())
    model.begin([("default", K, 1)])
    model.settle()  # e.g. a CapacityError: the put is not in flight any more
    assert model.allowed("default", K) == {None}


def test_batch_requires_only_the_synced_state():
    k1, k2 = b"k001", b"k002"
    model = Expected("batch", frozenset())
    model.ack([("default", k1, 1)])
    model.synced()
    assert model.allowed("default", k1) == {1} and model.required("default", k1)
    model.ack([("default", k2, 3)])
    model.ack([("default", k1, None)])
    # Since the last sync: k1 may still be there or deleted, k2 may be there or lost.
    assert model.allowed("default", k1) == {1, None}
    assert model.allowed("default", k2) == {3, None}
    model.synced()
    assert model.allowed("default", k1) == {None}
    assert model.allowed("default", k2) == {3} and model.required("default", k2)


def test_none_mode_never_promises_a_block():
    model = Expected("none", frozenset())
    model.ack([("default", K, 1)])
    model.synced()  # hands records to the OS, never fsyncs
    assert None in model.allowed("default", K)


def test_restart_makes_what_the_store_holds_the_truth(tmp_path):
    model = Expected("sync", frozenset({"q"}))
    model.ack([("default", K, 1)])
    model.begin([("default", K, 2)])
    model.restart({("default", K): 2})
    assert model.allowed("default", K) == {2}
    path = str(tmp_path / "expected.json")
    model.dump(path)
    back = Expected.load(path)
    assert back.evictable == frozenset({"q"}) and back.allowed("default", K) == {2}


def test_content_is_deterministic_key_bound_and_every_byte_checked():
    a = content("default", K, 7)
    assert a == content("default", K, 7)
    assert identify("default", K, a) == (7, "")
    # The same version of another key, or in another namespace, is not this block.
    assert identify("default", b"k001", a)[0] is None
    assert identify("q", K, a)[0] is None
    for pos in (0, 11, len(a) // 2, len(a) - 1):  # header, boundary, body, last byte
        flipped = bytearray(a)
        flipped[pos] ^= 1
        assert identify("default", K, flipped)[0] is None, pos
    assert identify("default", K, a[:-1])[0] is None  # torn: one byte short
