"""One regression test per engine bug found by review, named after the behaviour it guards.

Each is deterministic: no maintenance thread (``background=False``), no sleeps; a clock is
stepped by hand where a lease must run out at a chosen instant.
"""

from __future__ import annotations

import numpy as np
import pytest

import tairstore
from tairstore.engine import session as session_mod
from tairstore.errors import LeaseExpiredError
from tairstore.format.segment import record_length

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 64 * KiB


def key(i: int) -> bytes:
    return b"reg-" + i.to_bytes(8, "little")


def payload(i: int, size: int = BLOCK) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)


def _fill_ssd_to_the_brim(s, first: int) -> int:
    """Put root blocks until one more would need an eviction; returns the next free index."""
    i = first
    rec = record_length(len(b"default"), len(key(0)), BLOCK)
    while True:
        t = s.stats()["tiers"]["ssd"]
        if t["live_record_bytes"] + t["reserved_bytes"] + rec > t["usable_bytes"]:
            return i
        assert s.put(key(i), payload(i))
        i += 1


def _full_leaf_lru_store(tmp_path):
    """An SSD-only leaf_lru store holding key(0) (the oldest leaf) and full to the brim."""
    s = tairstore.open(tmp_path / "s", dram_bytes=0, ssd_bytes=4 * MiB, segment_bytes=128 * KiB,
                       policy={"ssd": "leaf_lru", "dram": "leaf_lru"}, durability="none",
                       background=False)
    assert s.put(key(0), payload(0))
    _fill_ssd_to_the_brim(s, 1)
    return s


def test_leaf_lru_keeps_the_prefix_a_write_session_is_extending(tmp_path):
    # The head of a chain is the oldest leaf; a session extending it must not see it evicted
    # by its own admission (blocks being written did not count as children).
    with _full_leaf_lru_store(tmp_path) as s:
        head, nxt = key(0), key(10_000)
        sess = s.start_write([head, nxt], [BLOCK, BLOCK], chain=True)
        assert sess.keys_to_write == [nxt]
        assert s.exists([head]) == [True], "admission evicted the prefix being extended"
        s.write(sess, nxt, payload(10_000))
        # More traffic while the session is open, then after it commits.
        j = _fill_ssd_to_the_brim(s, 20_000)
        for i in range(j, j + 8):
            s.put(key(i), payload(i))
        assert s.exists([head]) == [True]
        assert s.finish_write(sess, [nxt]) == 1
        for i in range(j + 8, j + 16):
            s.put(key(i), payload(i))
        assert s.exists([head, nxt]) in ([True, True], [True, False], [False, False])
        assert s.stats()["counters"]["evictions_ssd"] > 0


def test_leaf_lru_keeps_the_prefix_a_put_with_parent_is_extending(tmp_path):
    with _full_leaf_lru_store(tmp_path) as s:
        head, nxt = key(0), key(10_000)
        assert s.put(nxt, payload(10_000), parent=head)
        assert s.exists([head, nxt]) == [True, True]


class _SteppedClock:
    """time.monotonic for the session module: returns ``now``, which the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.calls = 0

    def monotonic(self) -> float:
        self.calls += 1
        return self.now


def test_lease_expiring_between_the_check_and_the_use_releases_the_reservation(tmp_path, monkeypatch):
    # The lease ran out after the store's expiry check but before check_usable(), which then
    # marked the session EXPIRED without releasing its reservation: the key stayed in flight
    # for ever (put returned False) and its bytes stayed counted.
    with tairstore.open(tmp_path / "s", dram_bytes=4 * MiB, ssd_bytes=0, background=False) as s:
        sess = s.start_write([key(1)], [BLOCK], lease_s=5.0)
        clock = _SteppedClock(sess.deadline - 1.0)

        class _Time:
            @staticmethod
            def monotonic() -> float:
                # First call (the store's check under its lock): still valid; later calls: expired.
                t = clock.monotonic()
                if clock.calls == 1:
                    clock.now = sess.deadline + 1.0
                return t

        monkeypatch.setattr(session_mod, "time", _Time)
        try:
            s.write(sess, key(1), payload(1))
        except LeaseExpiredError:
            pass
        monkeypatch.undo()
        # Whatever happened to that write, aborting (or expiring) releases everything.
        s.abort_write(sess)
        s.reap_expired()
        assert s.stats()["sessions_open"] == 0
        assert s.stats()["namespaces"].get("default", {"bytes": 0})["bytes"] == 0
        assert s.put(key(1), payload(1)) is True
        assert bytes(s.get(key(1))) == payload(1).tobytes()


def test_expired_session_releases_its_reservation_when_used(tmp_path, monkeypatch):
    with tairstore.open(tmp_path / "s", dram_bytes=4 * MiB, ssd_bytes=0, background=False) as s:
        sess = s.start_write([key(2)], [BLOCK], lease_s=5.0)

        class _Late:
            @staticmethod
            def monotonic() -> float:
                return sess.deadline + 1.0

        monkeypatch.setattr(session_mod, "time", _Late)
        with pytest.raises(LeaseExpiredError):
            s.write(sess, key(2), payload(2))
        with pytest.raises(LeaseExpiredError):
            s.finish_write(sess, [key(2)])
        monkeypatch.undo()
        assert s.stats()["counters"]["leases_expired"] == 1
        assert s.put(key(2), payload(2)) is True


def test_session_transitions_outside_the_table_are_refused():
    from tairstore.engine.session import WriteSession
    from tairstore.errors import SessionError

    sess = WriteSession(1, "default", [], 1.0, 0.0)
    assert sess.transition("finish") == "finished"
    with pytest.raises(SessionError):
        sess.transition("expire")


def test_a_nan_ttl_saved_by_an_older_version_does_not_stop_the_store_opening(tmp_path, caplog):
    with tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=8 * MiB, background=False) as s:
        s.put(key(1), payload(1), namespace="t")
        s.set_quota("t", ttl_s=60)
        s._index.set_namespace("t", {"total_bytes": None, "tier_bytes": {}, "ttl_s": float("nan")})
    with tairstore.open(tmp_path / "s", dram_bytes=MiB, ssd_bytes=8 * MiB, background=False) as s:
        assert s.quota("t")["ttl_s"] is None
        assert bytes(s.get(key(1), namespace="t")) == payload(1).tobytes()
        s.maintain()  # the TTL sweep runs without raising
    assert any("ignoring its saved quota" in r.message for r in caplog.records)
