"""A daemon with a remote tier: namespace strategies from the config file and over HTTP, puts
over the data port that follow them, and the remote tier's series on ``/metrics``.

The remote tier is 3FS on a local directory standing in for the mount; the daemon is real, on
127.0.0.1 with ports chosen by the OS.
"""

from __future__ import annotations

import os
import textwrap
from functools import partial

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tairstore.daemon.config import DaemonConfig, NamespaceQuota, load_config
from tairstore.daemon.main import run_daemon
from tairstore.errors import InvalidArgumentError
from tairstore.net.client import Client as DataClient

from .test_http import SMALL_STORE, Client


def write(tmp_path, text: str):
    p = tmp_path / "tairstore.toml"
    p.write_text(textwrap.dedent(text))
    return p


# ------------------------------------------------------------------------------- config
def test_config_namespace_strategy(tmp_path):
    cfg = load_config(write(tmp_path, f"""
        [remote]
        kind = "hf3fs"
        path = "{tmp_path / '3fs'}"
        prefer_max_usage = 0.8

        [namespaces.a]
        strategy = "prefer:remote"

        [namespaces.b]
        total_bytes = "1GiB"
        strategy = "always:ssd"
        """))
    assert cfg.namespaces["a"].strategy == "prefer:remote" and cfg.namespaces["b"].strategy == "always:ssd"
    assert cfg.namespaces["b"].total_bytes == 1 << 30
    assert cfg.store["remote"]["prefer_max_usage"] == 0.8


@pytest.mark.parametrize("body, expect", [
    ('[namespaces.a]\nstrategy = "prefer:nvme"', r"\[namespaces.a\] strategy: must be one of prefer:remote"),
    ('[namespaces.a]\nstrategy = 1', r"\[namespaces.a\] strategy: must be one of"),
    ('[namespaces.a]\nstrategy = "always:remote"', r"\[namespaces.a\] strategy: 'always:remote' needs a \[remote\]"),
    ('[remote]\nkind = "hf3fs"\npath = "x"\nprefer_max_usage = 2', r"prefer_max_usage"),
])
def test_config_refuses_bad_strategies(tmp_path, body, expect):
    with pytest.raises(InvalidArgumentError, match=expect):
        load_config(write(tmp_path, body))


# ------------------------------------------------------------------------------- daemon
def with_remote_daemon(tmp_path, fn, **store_options):
    store = dict(SMALL_STORE, remote={"kind": "hf3fs", "path": str(tmp_path / "3fs")}, **store_options)
    cfg = DaemonConfig(port=0, http_port=0, data_dir=str(tmp_path / "data"), store=store,
                       shutdown_grace_s=2.0,
                       namespaces={"r": NamespaceQuota(strategy="always:remote"),
                                   "q": NamespaceQuota(total_bytes=64 << 20)})

    async def main():
        async with trio.open_nursery() as nursery:
            info = await nursery.start(partial(run_daemon, cfg, handle_signals=False))
            try:
                with trio.fail_after(120):
                    return await trio.to_thread.run_sync(fn, Client(info.http_port), info)
            finally:
                info.shutdown()

    return trio.run(main)


def _samples(text: bytes) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            if s.name.startswith("tairstore_remote_"):
                out[s.name] = s.value
    return out


def test_strategies_over_http_and_data_port_and_remote_metrics(tmp_path):
    def check(c: Client, info):
        # From the config file.
        st, body = c.call("GET", "/namespaces/r")
        assert st == 200 and body["strategy"] == "always:remote" and body["quota"]["strategy"] == "always:remote"
        # Over HTTP: create with a strategy, change only the strategy, then only the quota.
        st, body = c.call("POST", "/namespaces", {"name": "p", "strategy": "prefer:ssd"})
        assert st == 201 and body["strategy"] == "prefer:ssd"
        st, body = c.call("PUT", "/namespaces/q", {"strategy": "prefer:remote"})
        assert st == 200 and body["strategy"] == "prefer:remote" and body["quota"]["total_bytes"] == 64 << 20
        st, body = c.call("PUT", "/namespaces/q", {"quota": {"total_bytes": "32MiB"}})
        assert st == 200 and body["strategy"] == "prefer:remote" and body["quota"]["total_bytes"] == 32 << 20
        st, body = c.call("PUT", "/namespaces/q", {"strategy": "sometimes:remote"})
        assert st == 400 and "prefer:remote" in body["error"]["message"]
        st, body = c.call("PUT", "/namespaces/q", {})
        assert st == 400

        # Puts over the data port follow the namespace's strategy.
        payload = [os.urandom(100_000 + i) for i in range(3)]
        with DataClient(f"tcp://127.0.0.1:{info.port}", timeout=30) as d:
            assert d.put(b"one", payload[0], namespace="r") is True
            assert d.put_many([b"two", b"three"], payload[1:], namespace="r") == [True, True]
            st, stats = c.call("GET", "/stats")
            assert stats["namespaces"]["r"]["blocks"] == 0, "remote-only: no local copies"
            assert bytes(d.get(b"two", namespace="r")) == payload[1]
            assert d.get(b"absent", namespace="r") is None
            # So do write sessions: the committed block goes to the remote tier only.
            w = d.start_write([b"four"], [len(payload[0])], namespace="r")
            d.write(w, b"four", payload[0])
            assert d.finish_write(w, [b"four"]) == 1
            assert bytes(d.get(b"four", namespace="r")) == payload[0]
        st, stats = c.call("GET", "/stats")
        remote = stats["tiers"]["remote"]
        assert remote["healthy"] is True and remote["puts"] == 4  # (reads promoted local copies)

        st, text = c.call("GET", "/metrics")
        assert st == 200
        m = _samples(text)
        assert m["tairstore_remote_healthy"] == 1
        assert m["tairstore_remote_used_bytes"] == sum(len(p) for p in payload) + len(payload[0])
        assert m["tairstore_remote_capacity_bytes"] > 0
        assert m["tairstore_remote_puts_total"] == 4 and m["tairstore_remote_put_failures_total"] == 0
        assert m["tairstore_remote_hits_total"] >= 1 and m["tairstore_remote_misses_total"] >= 1
        assert m["tairstore_remote_corruptions_total"] == 0
        assert "tairstore_remote_demotions_total" in m and "tairstore_remote_demotion_failures_total" in m

    with_remote_daemon(tmp_path, check)


def test_volatile_daemon_puts_of_a_remote_namespace_skip_the_in_place_path(tmp_path):
    # On a volatile store a batch PUT is received straight into DRAM reservations (a local
    # write session); a namespace whose strategy routes elsewhere goes through put_many instead.
    def check(c: Client, info):
        payload = [os.urandom(600_000), os.urandom(700_000)]
        with DataClient(f"tcp://127.0.0.1:{info.port}", timeout=30) as d:
            assert d.put_many([b"a", b"b"], payload, namespace="r") == [True, True]
            assert d.put_many([b"a", b"b"], payload, namespace="q") == [True, True]
        st, stats = c.call("GET", "/stats")
        assert stats["volatile"] is True
        assert stats["namespaces"]["r"]["blocks"] == 0 and stats["tiers"]["remote"]["puts"] == 2
        assert stats["namespaces"]["q"]["blocks"] == 2

    with_remote_daemon(tmp_path, check, ssd_bytes=0)


def _remote_healthy(c: Client) -> float | None:
    st, text = c.call("GET", "/metrics")
    return _samples(text).get("tairstore_remote_healthy") if st == 200 else None


def test_metrics_show_a_killed_master_and_its_return(tmp_path, master, wait_for):
    store = dict(SMALL_STORE, remote=master.config(retry_s=0.2, segment_bytes=64 << 20,
                                                   buffer_bytes=16 << 20))
    cfg = DaemonConfig(port=0, http_port=0, data_dir=str(tmp_path / "data"), store=store,
                       shutdown_grace_s=2.0, namespaces={"r": NamespaceQuota(strategy="always:remote")})

    def check(c: Client, info):
        with DataClient(f"tcp://127.0.0.1:{info.port}", timeout=60) as d:
            assert d.put(b"k", b"x" * 1000, namespace="r") is True
            assert _remote_healthy(c) == 1
            master.kill()
            # A read that reaches the dead master marks the tier unhealthy: a miss, no error.
            assert wait_for(lambda: d.get(b"k", namespace="r") is None and _remote_healthy(c) == 0)
            master.start()
            # Only /metrics is asked from here on: the store's maintenance probe does the rest.
            assert wait_for(lambda: _remote_healthy(c) == 1), "never back in rotation"
            assert wait_for(lambda: d.put(b"k2", b"y" * 1000, namespace="r")), "puts never resumed"

    async def main():
        async with trio.open_nursery() as nursery:
            info = await nursery.start(partial(run_daemon, cfg, handle_signals=False))
            try:
                with trio.fail_after(360):  # three generous waits; never a measured bound
                    return await trio.to_thread.run_sync(check, Client(info.http_port), info)
            finally:
                info.shutdown()

    trio.run(main)
