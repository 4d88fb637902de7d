"""Per-namespace backend strategies (``set_strategy`` / ``route``), remote-only batches, and the
remote tier put back in rotation by the maintenance thread after its master came back.

3FS runs on a local directory standing in for the mount; Mooncake on a real ``mooncake_master``
on 127.0.0.1 (skipped, with the reason, only where its wheel cannot be imported).
"""

from __future__ import annotations

import numpy as np
import pytest

import tairstore
from tairstore.engine.strategy import STRATEGIES
from tairstore.errors import InvalidArgumentError, TierUnavailableError

KiB, MiB = 1 << 10, 1 << 20


def key(i: int) -> bytes:
    return b"strat-" + i.to_bytes(8, "little")


def block(i: int, size: int = 64 * KiB) -> bytes:
    return np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()


def open_store(path, remote=None, **kw):
    opts = dict(dram_bytes=4 * MiB, ssd_bytes=16 * MiB, durability="none", background=False)
    opts.update(kw)
    return tairstore.open(path, remote=remote, **opts)


def hf3fs(tmp_path, **extra) -> dict:
    return {"kind": "hf3fs", "path": str(tmp_path / "3fs"), **extra}


# ------------------------------------------------------------------ setting and persisting
def test_bad_strategies_are_refused_naming_the_allowed_values(tmp_path):
    with open_store(tmp_path / "s") as s:
        for bad in ("prefer:nvme", "always", "remote", "", "ALWAYS:DRAM", 3, ["always:dram"]):
            with pytest.raises(InvalidArgumentError, match="prefer:remote") as err:
                s.set_strategy("ns", bad)
            assert all(v in str(err.value) for v in STRATEGIES)
        with pytest.raises(InvalidArgumentError):
            s.set_strategy("", "always:dram")  # a bad namespace


def test_strategy_persists_beside_the_quota_and_is_reported(tmp_path):
    with open_store(tmp_path / "s", hf3fs(tmp_path)) as s:
        s.set_quota("a", total_bytes=8 * MiB)
        assert s.set_strategy("a", "prefer:remote")["strategy"] == "prefer:remote"
        s.set_strategy("b", "always:ssd")
        s.set_quota("b", total_bytes=1 * MiB)  # a later quota keeps the strategy
        st = s.stats()["namespaces"]
        assert st["a"]["strategy"] == "prefer:remote" and st["b"]["quota"]["strategy"] == "always:ssd"
    with open_store(tmp_path / "s") as s:  # reopened, even without the remote tier
        assert s.quota("a")["strategy"] == "prefer:remote" and s.quota("a")["total_bytes"] == 8 * MiB
        assert s.quota("b")["strategy"] == "always:ssd" and s.quota("b")["total_bytes"] == 1 * MiB
        s.set_strategy("a", None)
    with open_store(tmp_path / "s") as s:
        assert s.quota("a")["strategy"] is None and s.quota("a")["total_bytes"] == 8 * MiB


def test_prefer_max_usage_is_validated(tmp_path):
    for bad in (0, 1.5, -0.1, float("nan"), "0.9", True):
        with pytest.raises(InvalidArgumentError, match="prefer_max_usage"):
            open_store(tmp_path / "s", hf3fs(tmp_path, prefer_max_usage=bad))


# ------------------------------------------------------------------------------ routing
def test_always_remote_stores_remote_only_and_explicit_tier_overrides(tmp_path):
    with open_store(tmp_path / "s", hf3fs(tmp_path)) as s:
        s.set_strategy("r", "always:remote")
        assert s.route("r") == "remote" and s.route("other") == "auto"
        assert s.put(key(1), block(1), namespace="r") is True
        assert s.put_many([key(2), key(3)], [block(2), block(3)], namespace="r") == [True, True]
        assert s.stats()["blocks"] == 0, "no local copy"
        assert s.match([key(1), key(2), key(3)], namespace="r").tiers == ["remote"] * 3
        assert bytes(s.get(key(3), namespace="r")) == block(3)
        # An explicit tier wins over the strategy.
        assert s.put(key(4), block(4), namespace="r", tier="ssd") is True
        assert s.tier_of(key(4), namespace="r") == "ssd"


def test_write_sessions_follow_the_strategy_to_the_remote_tier(tmp_path):
    from tairstore.errors import LeaseExpiredError, SessionError

    with open_store(tmp_path / "s", hf3fs(tmp_path)) as s:
        s.set_strategy("r", "always:remote")
        assert s.put(key(0), block(0), namespace="r", tier="ssd")  # one key held locally
        w = s.start_write([key(0), key(1), key(2), key(3)], [64 * KiB] * 4, namespace="r")
        assert w.keys_to_write == [key(1), key(2), key(3)]
        s.write(w, key(1), block(1))
        view = s.write_view(w, key(2))  # filled in place, as the daemon receives a payload
        view[:] = block(2)
        view.release()
        s.write_done(w, key(2))
        s.write(w, key(3), block(3))
        with pytest.raises(SessionError, match="already written"):
            s.write(w, key(1), block(1))
        with pytest.raises(SessionError, match="reserved"):
            s.write(s.start_write([key(9)], [10], namespace="r"), key(9), b"short")
        with pytest.raises(SessionError, match="not written"):
            s.finish_write(s.start_write([key(8)], [10], namespace="r"), [key(8)])
        assert s.finish_write(w, [key(1), key(2)]) == 2  # key 3 written but not committed
        with pytest.raises(SessionError):
            s.write(w, key(3), block(3))
        assert s.stats()["blocks"] == 1 and s.stats()["sessions_open"] == 0, "nothing new locally"
        assert s.match([key(1), key(2), key(3)], namespace="r", mode="exact").tiers == ["remote", "remote", None]
        assert bytes(s.get(key(1), namespace="r")) == block(1)
        assert bytes(s.get(key(2), namespace="r")) == block(2)
        # An aborted or expired session stores nothing.
        a = s.start_write([key(5)], [64 * KiB], namespace="r")
        s.write(a, key(5), block(5))
        s.abort_write(a)
        with pytest.raises(SessionError, match="aborted"):
            s.finish_write(a, [key(5)])
        e = s.start_write([key(6)], [64 * KiB], namespace="r")
        e.deadline = 0.0  # its lease ran out
        with pytest.raises(LeaseExpiredError):
            s.write(e, key(6), block(6))
        assert s.match([key(5), key(6)], namespace="r", mode="exact").tiers == [None, None]
        # A namespace without a strategy still writes locally; an explicit tier wins.
        local = s.start_write([key(7)], [64 * KiB], namespace="other")
        s.write(local, key(7), block(7))
        assert s.finish_write(local, [key(7)]) == 1 and s.tier_of(key(7), namespace="other")
        x = s.start_write([key(10)], [64 * KiB], namespace="r", tier="ssd")
        s.write(x, key(10), block(10))
        assert s.finish_write(x, [key(10)]) == 1 and s.tier_of(key(10), namespace="r") == "ssd"
    # Another store sharing the tier reads the session's blocks.
    with open_store(tmp_path / "t", hf3fs(tmp_path)) as t:
        assert bytes(t.get(key(2), namespace="r")) == block(2)


def test_always_tier_that_is_missing_fails_typed_and_stores_nothing(tmp_path):
    with open_store(tmp_path / "s", dram_bytes=0) as s:  # SSD only, no remote tier
        s.set_strategy("d", "always:dram")
        s.set_strategy("r", "always:remote")
        for ns, tier in (("d", "dram"), ("r", "remote")):
            with pytest.raises(TierUnavailableError, match="not configured") as err:
                s.put(key(1), block(1), namespace=ns)
            assert err.value.tier == tier
            with pytest.raises(TierUnavailableError):
                s.put_many([key(2)], [block(2)], namespace=ns)
        assert s.stats()["blocks"] == 0
        s.set_strategy("p", "prefer:remote")  # prefer: falls back to the local tiers
        assert s.route("p") == "auto" and s.put(key(5), block(5), namespace="p") is True
        assert s.tier_of(key(5), namespace="p") == "ssd"


def test_always_ssd_keeps_no_dram_copy_and_always_dram_keeps_one(tmp_path):
    with open_store(tmp_path / "s") as s:
        s.set_strategy("s", "always:ssd")
        s.set_strategy("d", "always:dram")
        assert s.put(key(1), block(1), namespace="s") and s.tier_of(key(1), namespace="s") == "ssd"
        assert s.put_many([key(2)], [block(2)], namespace="d") == [True]
        assert s.tier_of(key(2), namespace="d") == "dram"


def test_prefer_falls_back_to_local_tiers_above_the_usage_ratio(tmp_path):
    # A 3FS tier with a limit: 4 blocks of 64 KiB fill 256 KiB; prefer_max_usage 0.5.
    remote = hf3fs(tmp_path, capacity_bytes=256 * KiB, file_bytes=256 * KiB, prefer_max_usage=0.5)
    with open_store(tmp_path / "s", remote) as s:
        s.set_strategy("p", "prefer:remote")
        placed = []
        for i in range(4):
            placed.append(s.route("p"))
            assert s.put(key(i), block(i), namespace="p") is True
        assert placed == ["remote", "remote", "auto", "auto"]
        assert s.match([key(i) for i in range(4)], namespace="p").tiers[:2] == ["remote", "remote"]
        assert all(t in ("dram", "ssd") for t in s.match([key(2), key(3)], namespace="p").tiers)
        assert all(bytes(s.get(key(i), namespace="p")) == block(i) for i in range(4))


def test_prefer_dram_falls_back_when_dram_is_full(tmp_path):
    with open_store(tmp_path / "s", dram_bytes=1 * MiB) as s:
        s.set_strategy("p", "prefer:dram")
        assert s.route("p") == "dram"
        s.put_many([key(i) for i in range(15)], [block(i) for i in range(15)], namespace="x")
        assert s.stats()["tiers"]["dram"]["usage"] >= 0.9
        assert s.route("p") == "auto"


# --------------------------------------------------------------------- remote-only batches
def test_put_many_to_remote_keeps_no_local_copy_like_put(tmp_path):
    with open_store(tmp_path / "s", hf3fs(tmp_path)) as s:
        keys = [key(i) for i in range(4)]
        assert s.put_many(keys, [block(i) for i in range(4)], tier="remote") == [True] * 4
        st = s.stats()
        assert st["blocks"] == 0 and st["tiers"]["dram"]["bytes"] == 0 and st["tiers"]["ssd"]["bytes"] == 0
        assert [s.tier_of(k) for k in keys] == [None] * 4
        assert s.match(keys).tiers == ["remote"] * 4
        assert s.put_many([], [], tier="remote") == []
        w = s.start_write([key(9)], [10], tier="remote")  # a session to the remote tier
        s.write(w, key(9), b"0123456789")
        assert s.finish_write(w, [key(9)]) == 1 and s.match([key(9)]).tiers == ["remote"]


# ------------------------------------------------------------------------ Mooncake health
def test_maintenance_puts_a_recovered_remote_back_in_rotation_without_requests(tmp_path, master, wait_for):
    remote = master.config(retry_s=0.2, segment_bytes=64 * MiB, buffer_bytes=16 * MiB)
    with open_store(tmp_path / "s", remote, background=True, maintenance_interval_s=0.05) as s:
        s.set_strategy("p", "prefer:remote")
        s.set_strategy("r", "always:remote")
        assert s.route("p") == "remote"
        assert s.put(key(1), block(1), namespace="r") is True
        master.kill()
        # The first call that reaches the dead master marks the tier unhealthy; a miss, no error.
        assert wait_for(lambda: s.get(key(1), namespace="r") is None
                         and not s.stats()["tiers"]["remote"]["healthy"])
        assert s.route("p") == "auto"
        assert s.put(key(2), block(2), namespace="p") is True and s.tier_of(key(2), namespace="p")
        with pytest.raises(TierUnavailableError, match="unhealthy"):
            s.put(key(3), block(3), namespace="r")
        assert s.put_many([key(3)], [block(3)], tier="remote") == [False]
        master.start()
        # Nothing but stats() is asked from here on: the maintenance thread's probe does it.
        assert wait_for(lambda: s.stats()["tiers"]["remote"]["healthy"]), "never back in rotation"
        assert s.stats()["tiers"]["remote"]["health_transitions"] >= 2
        assert s.route("p") == "remote"
        # The client re-mounts its segment on the new master on its own schedule: until then a
        # put may be refused (False), and a refused put can mark the tier unhealthy again, so
        # that the always:remote namespace refuses with TierUnavailableError until the next
        # probe. Either way the puts resume by themselves.
        def resumed() -> bool:
            try:
                return s.put(key(4), block(4), namespace="r")
            except TierUnavailableError:
                return False

        assert wait_for(resumed), "puts never resumed"
        assert bytes(s.get(key(4), namespace="r")) == block(4)
