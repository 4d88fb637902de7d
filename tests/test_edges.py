"""Bad input at the edges gets a typed error naming what was wrong, never an untyped crash.

Each case here once escaped as something else (numpy's MemoryError, a TypeError from a
comparison, UnicodeEncodeError, OverflowError) or was silently accepted and failed later (a
``nan`` TTL saved with the namespace broke every TTL sweep; an object array was stored as its
pointers). Every refusal must be a :class:`tairstore.errors.InvalidArgumentError`, which is
both a ``StoreError`` and a ``ValueError``.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

import tairstore
from tairstore.errors import InvalidArgumentError, StoreError
from tairstore.net import calls

MiB = 1 << 20
NAN, INF = float("nan"), float("inf")


@pytest.fixture
def store(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=8 * MiB, ssd_bytes=32 * MiB, background=False) as s:
        yield s


def test_invalid_argument_is_a_store_error_and_a_value_error():
    assert issubclass(InvalidArgumentError, StoreError)
    assert issubclass(InvalidArgumentError, ValueError)


# ---------------------------------------------------------------------------- store options
@pytest.mark.parametrize("options, named", [
    ({"dram_bytes": 2 ** 62}, "dram_bytes"),             # was numpy's MemoryError
    ({"dram_bytes": "1G"}, "dram_bytes"),                 # was a TypeError from a comparison
    ({"ssd_bytes": "16G"}, "ssd_bytes"),
    ({"segment_bytes": "256M"}, "segment_bytes"),
    ({"batch_interval_ms": "5"}, "batch_interval_ms"),
    ({"zstd_level": "3"}, "zstd_level"),
    ({"compaction_live_ratio": "0.5"}, "compaction_live_ratio"),
    ({"maintenance_interval_s": "1"}, "maintenance_interval_s"),
    ({"zstd_level": 3.5}, "zstd_level"),                  # was accepted; puts then failed
    ({"create": "no"}, "create"),                         # was accepted as True
    ({"verify_dram_reads": "no"}, "verify_dram_reads"),   # was accepted as True
    ({"background": 0}, "background"),
    ({"dram_bytes": True}, "dram_bytes"),                 # bools are not numbers
    ({"zstd_level": True}, "zstd_level"),
    ({"batch_interval_ms": True}, "batch_interval_ms"),
    ({"batch_interval_ms": NAN}, "batch_interval_ms"),
    ({"maintenance_interval_s": INF}, "maintenance_interval_s"),
    ({"watermarks": {"high": True}}, "watermark high"),
    ({"watermarks": {"low": NAN}}, "watermark low"),
    ({"durability": ["sync"]}, "durability"),            # was a TypeError (unhashable)
    ({"policy": {"dram": ["lru"]}}, "policy"),
])
def test_bad_store_options_are_refused_by_name(tmp_path, options, named):
    with pytest.raises(InvalidArgumentError, match=named):
        tairstore.open(tmp_path / "s", **{"dram_bytes": MiB, "ssd_bytes": 0, **options})
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_numpy_integers_are_accepted_as_sizes(tmp_path):
    with tairstore.open(tmp_path / "s", dram_bytes=np.int64(4 * MiB), ssd_bytes=0) as s:
        assert s.config.dram_bytes == 4 * MiB and type(s.config.dram_bytes) is int


# ---------------------------------------------------------------------------- quotas, trims
@pytest.mark.parametrize("ttl", [NAN, INF, -INF, True, "60", 0, -1])
def test_set_quota_refuses_a_ttl_that_is_not_a_finite_positive_number(store, ttl):
    store.put(b"k", b"x" * 100, namespace="a")
    with pytest.raises(InvalidArgumentError, match="ttl_s"):
        store.set_quota("a", ttl_s=ttl)
    assert store.quota("a")["ttl_s"] is None  # nothing was saved
    store.maintain()  # the TTL sweep runs, and expires nothing
    assert store.exists([b"k"], namespace="a") == [True]


@pytest.mark.parametrize("kwargs, named", [
    ({"total_bytes": True}, "total_bytes"),
    ({"total_bytes": 1.5}, "total_bytes"),
    ({"tier_bytes": {"dram": "1G"}}, "tier_bytes"),
    ({"tier_bytes": ["dram"]}, "tier_bytes"),
])
def test_set_quota_refuses_bad_limits(store, kwargs, named):
    with pytest.raises(InvalidArgumentError, match=named):
        store.set_quota("a", **kwargs)


@pytest.mark.parametrize("ts", [INF, -INF, NAN, True, "2024-01-01"])
def test_trim_refuses_a_time_stamp_that_is_not_a_finite_number(store, ts):
    store.put(b"k", b"x" * 100, namespace="a")
    with pytest.raises(InvalidArgumentError, match="ts"):
        store.trim("a", "older_than", ts)
    assert store.exists([b"k"], namespace="a") == [True]


def test_trim_older_than_a_finite_time_still_works(store):
    store.put(b"k", b"x" * 100, namespace="a")
    assert store.trim("a", "older_than", 0.0) == 0
    assert store.trim("a", "older_than", 4e9) == 1


# ------------------------------------------------------------------------ names and buffers
@pytest.mark.parametrize("namespace", ["\ud800", "team-\udcff"])
def test_a_namespace_with_a_lone_surrogate_is_refused(store, namespace):
    with pytest.raises(InvalidArgumentError, match="surrogate"):
        store.put(b"k", b"x", namespace=namespace)
    with pytest.raises(InvalidArgumentError, match="surrogate"):
        store.exists([b"k"], namespace=namespace)
    with pytest.raises(InvalidArgumentError, match="surrogate"):
        calls.put(b"k", b"x", namespace)  # the clients' check is the same one


def test_an_object_array_is_not_stored_as_its_pointers(store):
    blob = np.array([object() for _ in range(8)], dtype=object)
    with pytest.raises(InvalidArgumentError, match="Python objects"):
        store.put(b"k", blob)
    with pytest.raises(InvalidArgumentError, match="Python objects"):
        calls.put(b"k", blob, "default")
    assert store.exists([b"k"]) == [False]
    store.put(b"k", b"y" * 64)
    with pytest.raises(InvalidArgumentError, match="Python objects"):
        store.get_into(b"k", np.empty(8, dtype=object))


def test_a_structured_array_of_numbers_is_still_stored_as_bytes(store):
    rec = np.zeros(4, dtype=[("a", np.int32), ("b", np.float32)])
    rec["a"] = [1, 2, 3, 4]
    assert store.put(b"k", rec)
    assert bytes(store.get(b"k")) == rec.tobytes()


# --------------------------------------------------------------------------- write leases
BAD_LEASES = [True, False, 0, -1, NAN, INF, 3601, "30"]


@pytest.mark.parametrize("lease", BAD_LEASES)
def test_store_and_client_refuse_the_same_leases(store, lease):
    with pytest.raises(InvalidArgumentError, match="lease_s"):
        store.start_write([b"k"], [10], lease_s=lease)
    with pytest.raises(InvalidArgumentError, match="lease_s"):
        calls.start_write(None, [b"k"], [10], lease, "default")


@pytest.mark.parametrize("lease", [0.5, 30, 3600, np.float32(2.5)])
def test_store_and_client_accept_the_same_leases(store, lease):
    session = store.start_write([b"k"], [10], lease_s=lease)
    assert session.lease_s == float(lease)
    store.abort_write(session)
    assert calls.start_write(None, [b"k"], [10], lease, "default").fields["lease"] == float(lease)


# ------------------------------------------------------------------------------ imports
def test_import_tairstore_does_not_import_trio():
    code = ("import sys, tairstore, tairstore.net.client; c = tairstore.Client; "
            "assert 'trio' not in sys.modules, 'trio imported'; "
            "a = tairstore.AsyncClient; assert 'trio' in sys.modules; "
            "from tairstore.net.client import AsyncClient; assert AsyncClient is a")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_constants_have_one_definition():
    from tairstore import config, validate
    from tairstore.daemon import api, config as daemon_config, control, dataserver
    from tairstore.engine import capacity
    from tairstore.net import calls as net_calls
    from tairstore.wal import log, records

    assert dataserver.DEFAULT_NAMESPACE is api.DEFAULT_NAMESPACE is net_calls.DEFAULT_NAMESPACE \
        is config.DEFAULT_NAMESPACE
    assert capacity.TIERS is control.TIERS is daemon_config.TIERS is config.TIERS
    assert log.DURABILITY_MODES is config.DURABILITY_MODES
    assert records.MAX_KEY_BYTES is config.MAX_KEY_BYTES is validate.MAX_KEY_BYTES
    assert math.isfinite(config.MAX_LEASE_S) and config.MAX_LEASE_S is validate.MAX_LEASE_S


@pytest.mark.parametrize("size", [0, -1, True, 1.5, "4", np.int64(4)])
def test_store_and_client_refuse_the_same_block_sizes_with_the_same_message(store, size):
    with pytest.raises(InvalidArgumentError) as embedded:
        store.start_write([b"k"], [size])
    with pytest.raises(InvalidArgumentError) as remote:
        calls.start_write(None, [b"k"], [size], 30.0, "default")
    assert str(embedded.value) == str(remote.value)
