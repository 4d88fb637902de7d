"""The daemon's HTTP API: every endpoint, its errors and its auth refusals, against a real daemon
on 127.0.0.1 (ports chosen by the OS)."""

from __future__ import annotations

import http.client
import json
import socket
from functools import partial

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tairstore.daemon.main import run_daemon
from tairstore.daemon.config import DaemonConfig, LimitsConfig, NamespaceQuota
from tairstore.keys import chain_hashes
from tairstore.daemon.auth import TokenSpec
from tairstore.daemon.httpserver import MAX_HEAD_BYTES

ADMIN = "admin-token-0123456789abcdef"
USER_A = "user-a-token-0123456789abcdef"
USER_B = "user-b-token-0123456789abcdef"
SMALL_STORE = {"dram_bytes": 16 << 20, "ssd_bytes": 64 << 20, "segment_bytes": 4 << 20,
               "durability": "none"}


class Client:
    """A tiny blocking HTTP client (one connection per request, like most probes)."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token

    def raw(self, method: str, path: str, body: bytes | None = None, token: str | None = None,
            headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        h = dict(headers or {})
        tok = token if token is not None else self.token
        if tok:
            h["Authorization"] = f"Bearer {tok}"
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, dict(r.getheaders()), data

    def call(self, method: str, path: str, obj=None, token: str | None = None):
        body = json.dumps(obj).encode() if obj is not None else None
        status, headers, data = self.raw(method, path, body, token)
        ctype = headers.get("content-type", "")
        return status, (json.loads(data) if ctype.startswith("application/json") else data)


def with_daemon(tmp_path, fn, **cfg_kwargs):
    """Start a daemon, run ``fn(Client)`` in a thread, shut the daemon down; fn's result."""
    cfg = DaemonConfig(port=0, http_port=0, data_dir=str(tmp_path / "data"),
                       store=dict(SMALL_STORE), shutdown_grace_s=2.0, **cfg_kwargs)

    async def main():
        async with trio.open_nursery() as nursery:
            info = await nursery.start(partial(run_daemon, cfg, handle_signals=False))
            try:
                with trio.fail_after(60):
                    return await trio.to_thread.run_sync(fn, Client(info.http_port), info)
            finally:
                info.shutdown()

    return trio.run(main)


def test_health_stats_and_metrics_parse(tmp_path):
    def check(c: Client, info):
        status, health = c.call("GET", "/health")
        assert status == 200 and health["status"] == "ok" and health["writable"] is True
        assert health["http_url"].endswith(f":{info.http_port}")
        status, stats = c.call("GET", "/stats")
        assert status == 200
        assert stats["tiers"]["dram"]["capacity"] == 16 << 20
        assert stats["daemon"]["instances"] == 0
        status, text = c.call("GET", "/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        for name in ("tairstore_requests", "tairstore_request_duration_seconds",
                     "tairstore_tier_capacity_bytes", "tairstore_tier_used_bytes", "tairstore_hits",
                     "tairstore_misses", "tairstore_checksum_errors", "tairstore_evictions",
                     "tairstore_watermark_state", "tairstore_store_up"):
            assert name in families, name
        caps = {s.labels["tier"]: s.value for s in families["tairstore_tier_capacity_bytes"].samples}
        assert caps["dram"] == 16 << 20
        ops = {s.labels.get("op") for s in families["tairstore_requests"].samples}
        assert "http_health" in ops and "http_stats" in ops

    with_daemon(tmp_path, check)


def test_namespaces_create_list_update(tmp_path):
    def check(c: Client, info):
        st, body = c.call("POST", "/namespaces", {"name": "team-a", "quota": {"total_bytes": "1GiB",
                                                                             "tier_bytes": {"dram": "8MiB"}}})
        assert st == 201, body
        assert body["quota"]["total_bytes"] == 1 << 30
        assert body["quota"]["tiers"]["dram"]["limit"] == 8 << 20
        st, body = c.call("POST", "/namespaces", {"name": "team-a"})
        assert st == 409 and body["error"]["type"] == "ConflictError"
        st, body = c.call("GET", "/namespaces")
        assert st == 200 and [n["name"] for n in body["namespaces"]] == ["team-a"]
        st, body = c.call("PUT", "/namespaces/team-a", {"quota": {"total_bytes": 4096 * 10}})
        assert st == 200 and body["quota"]["total_bytes"] == 40960
        st, body = c.call("GET", "/namespaces/team-a")
        assert st == 200 and body["quota"]["total_bytes"] == 40960
        st, body = c.call("PUT", "/namespaces/nope", {"quota": {}})
        assert st == 404 and body["error"]["type"] == "NotFoundError"
        st, body = c.call("POST", "/namespaces", {"name": "b", "quota": {"total_bytes": "lots"}})
        assert st == 400 and body["error"]["type"] == "InvalidArgumentError"
        st, body = c.call("POST", "/namespaces", {"name": "b", "quota": {"tier_bytes": {"tape": 1}}})
        assert st == 400 and "tape" in body["error"]["message"]
        # The quota is enforced: 40 KiB total, a 64 KiB block does not fit.
        st, body = c.call("POST", "/cache/write/start", {"namespace": "team-a", "keys": ["aa"],
                                                         "sizes": [64 << 10]})
        assert st == 507 and body["error"]["type"] == "CapacityError", body

    with_daemon(tmp_path, check)


def test_config_namespaces_exist_at_start(tmp_path):
    def check(c: Client, info):
        st, body = c.call("GET", "/namespaces/boot")
        assert st == 200 and body["quota"]["total_bytes"] == 1 << 20

    with_daemon(tmp_path, check, namespaces={"boot": NamespaceQuota(total_bytes=1 << 20)})


def test_instances_register_list_conflict(tmp_path):
    inst = {"instance_id": "llama-1", "instance_group": "g1", "block_size": 16,
            "location_spec_infos": [{"name": "tp0", "size": 512}, {"name": "tp1", "size": 512}],
            "model_deployment": {"model_name": "llama", "dtype": "bf16", "tp_size": 2}}

    def check(c: Client, info):
        st, body = c.call("POST", "/instances", inst)
        assert st == 201 and body["created"] is True
        st, body = c.call("POST", "/instances", {**inst, "model_deployment": {**inst["model_deployment"],
                                                                              "user_data": "x"}})
        assert st == 200 and body["created"] is False  # user_data may change
        st, body = c.call("POST", "/instances", {**inst, "block_size": 32})
        assert st == 409
        st, body = c.call("GET", "/instances")
        assert [i["instance_id"] for i in body["instances"]] == ["llama-1"]
        st, body = c.call("GET", "/instances/llama-1")
        assert st == 200 and body["block_size"] == 16
        st, body = c.call("GET", "/instances/ghost")
        assert st == 404
        st, body = c.call("POST", "/instances", {"instance_id": "x", "instance_group": "g", "block_size": 0})
        assert st == 400

    with_daemon(tmp_path, check)
    # Registrations persist in the data directory across restarts.
    with_daemon(tmp_path, lambda c, i: c.call("GET", "/instances/llama-1")[0] == 200 or pytest.fail("lost"))
    assert (tmp_path / "data" / "daemon.json").exists()


def test_write_locate_read_remove(tmp_path):
    def check(c: Client, info):
        keys = [bytes([i]) * 8 for i in range(1, 5)]
        st, s = c.call("POST", "/cache/write/start", {"namespace": "n", "keys": [k.hex() for k in keys[:3]],
                                                      "size": 1000, "lease_s": 20})
        assert st == 201 and len(s["uploads"]) == 3
        for i, up in enumerate(s["uploads"]):
            path = up["url"].split(f":{info.http_port}", 1)[1]
            status, _, _ = c.raw("PUT", path, bytes([i]) * 1000)
            assert status == 200
        # A payload of the wrong size is refused; the session stays usable.
        status, _, data = c.raw("PUT", f"/sessions/{s['session_id']}/blocks/{keys[0].hex()}", b"x")
        assert status == 409, data
        st, body = c.call("POST", "/cache/write/finish", {"session_id": s["session_id"],
                                                          "ok_keys": [k.hex() for k in keys[:3]]})
        assert st == 200 and body == {"committed": 3}
        st, body = c.call("POST", "/cache/write/finish", {"session_id": s["session_id"], "ok_keys": []})
        assert st == 404  # finished sessions are forgotten
        st, m = c.call("POST", "/cache/location", {"namespace": "n", "keys": [k.hex() for k in keys]})
        assert st == 200 and m["matched"] == 3 and m["prefix_len"] == 3
        assert [k["hit"] for k in m["keys"]] == [True, True, True, False]
        assert m["keys"][0]["tier"] in ("dram", "ssd")
        st, m = c.call("POST", "/cache/location", {"namespace": "n", "keys": [k.hex() for k in keys],
                                                   "mode": "sliding_window", "window": 2})
        assert m["matched"] == 2 and m["window_start"] == 1
        st, m = c.call("POST", "/cache/location", {"namespace": "other", "keys": [keys[0].hex()]})
        assert m["matched"] == 0  # namespaces are isolated
        status, headers, data = c.raw("GET", f"/blocks/n/{keys[1].hex()}")
        assert status == 200 and data == bytes([1]) * 1000
        status, _, data = c.raw("GET", f"/blocks/n/{keys[1].hex()}?offset=10&size=5")
        assert data == bytes([1]) * 5
        st, body = c.call("POST", "/cache/remove", {"namespace": "n", "keys": [keys[0].hex(), keys[3].hex()]})
        assert body == {"removed": 1}
        st, m = c.call("POST", "/cache/location", {"namespace": "n", "keys": [k.hex() for k in keys]})
        assert m["prefix_len"] == 0 and m["keys"][1]["hit"] is True
        status, _, _ = c.raw("GET", f"/blocks/n/{keys[0].hex()}")
        assert status == 404
        # Abort releases the reservation.
        st, s2 = c.call("POST", "/cache/write/start", {"namespace": "n", "keys": ["ee"], "sizes": [10]})
        st, body = c.call("POST", "/cache/write/abort", {"session_id": s2["session_id"]})
        assert st == 200
        st, body = c.call("POST", "/cache/trim", {"namespace": "n", "mode": "all"})
        assert st == 200 and body["removed"] == 2

    with_daemon(tmp_path, check)


def test_token_ids_with_an_instance(tmp_path):
    def check(c: Client, info):
        c.call("POST", "/instances", {"instance_id": "i", "instance_group": "g", "block_size": 4,
                                      "location_spec_infos": [{"name": "all", "size": 64}]})
        tokens = list(range(10))  # two full blocks of 4 tokens, 2 tokens dropped
        st, s = c.call("POST", "/cache/write/start", {"instance_id": "i", "token_ids": tokens})
        assert st == 201
        expected = [k.hex() for k in chain_hashes(tokens, 4)]
        assert s["keys_to_write"] == expected and s["namespace"] == "g"
        for up in s["uploads"]:
            c.raw("PUT", up["url"].split(f":{info.http_port}", 1)[1], b"\0" * 64)
        c.call("POST", "/cache/write/finish", {"session_id": s["session_id"], "ok_keys": expected})
        st, m = c.call("POST", "/cache/location", {"instance_id": "i", "token_ids": tokens + [99, 98]})
        assert m["matched"] == 2 and m["matched_tokens"] == 8 and m["block_size"] == 4

    with_daemon(tmp_path, check)


def test_errors_never_crash_the_server(tmp_path):
    def check(c: Client, info):
        st, body = c.call("GET", "/nowhere")
        assert st == 404 and body["error"]["type"] == "NotFoundError"
        st, body = c.call("DELETE", "/health")
        assert st == 405
        status, _, data = c.raw("POST", "/cache/location", b"{not json")
        assert status == 400 and json.loads(data)["error"]["type"] == "InvalidArgumentError"
        status, _, data = c.raw("POST", "/cache/location", b"[1, 2]")
        assert status == 400
        st, body = c.call("POST", "/cache/location", {"keys": ["zz"]})
        assert st == 400 and "hex" in body["error"]["message"]
        st, body = c.call("POST", "/cache/location", {"keys": ["aa"], "mode": "fuzzy"})
        assert st == 400
        st, body = c.call("POST", "/cache/location", {"instance_id": "ghost", "keys": ["aa"]})
        assert st == 404
        st, body = c.call("POST", "/cache/write/finish", {"session_id": "1-nope", "ok_keys": []})
        assert st == 404
        status, _, data = c.raw("POST", "/cache/location", b"x" * (64 << 10))
        assert status == 413
        # Not HTTP at all, then a torn request: the server answers 400 / drops, and lives on.
        with socket.create_connection(("127.0.0.1", info.http_port), timeout=5) as s:
            s.sendall(b"\x00\x01garbage\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 400")
        with socket.create_connection(("127.0.0.1", info.http_port), timeout=5) as s:
            s.sendall(b"POST /cache/location HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        st, body = c.call("GET", "/health")
        assert st == 200

    with_daemon(tmp_path, check, limits=LimitsConfig(http_max_body_bytes=32 << 10))


def test_auth_refusals(tmp_path):
    tokens = [TokenSpec(ADMIN, "*", "admin"), TokenSpec(USER_A, ["a"], "user"),
              TokenSpec(USER_B, ["b"], "user")]

    def check(c: Client, info):
        st, body = c.call("GET", "/health")
        assert st == 401 and body["error"]["type"] == "Unauthenticated"
        st, _ = c.call("GET", "/health", token="wrong-token-0123456789")
        assert st == 401
        assert c.call("GET", "/health", token=USER_A)[0] == 200
        # Admin-only: namespaces and quotas.
        assert c.call("POST", "/namespaces", {"name": "a"}, token=USER_A)[0] == 403
        assert c.call("POST", "/namespaces", {"name": "a"}, token=ADMIN)[0] == 201
        assert c.call("POST", "/namespaces", {"name": "b"}, token=ADMIN)[0] == 201
        assert c.call("PUT", "/namespaces/a", {"quota": {}}, token=USER_A)[0] == 403
        # Daemon-wide reads need a token for every namespace.
        assert c.call("GET", "/stats", token=USER_A)[0] == 403
        assert c.call("GET", "/metrics", token=USER_A)[0] == 403
        assert c.call("GET", "/metrics", token=ADMIN)[0] == 200
        # A user token works in its namespace only.
        req = {"namespace": "a", "keys": ["aa"]}
        assert c.call("POST", "/cache/location", req, token=USER_A)[0] == 200
        assert c.call("POST", "/cache/location", req, token=USER_B)[0] == 403
        assert c.call("POST", "/cache/location", req)[0] == 401
        st, body = c.call("GET", "/namespaces", token=USER_B)
        assert [n["name"] for n in body["namespaces"]] == ["b"]
        # Trimming a whole namespace is admin-only; a session is bound to its namespace.
        assert c.call("POST", "/cache/trim", {"namespace": "a", "mode": "all"}, token=USER_A)[0] == 403
        st, s = c.call("POST", "/cache/write/start", {"namespace": "a", "keys": ["ab"], "sizes": [4]},
                       token=USER_A)
        assert st == 201
        assert c.call("POST", "/cache/write/finish", {"session_id": s["session_id"], "ok_keys": []},
                      token=USER_B)[0] == 403
        status, _, _ = c.raw("PUT", f"/sessions/{s['session_id']}/blocks/ab", b"abcd", token=USER_B)
        assert status == 403
        assert c.call("POST", "/instances", {"instance_id": "i", "instance_group": "b", "block_size": 4},
                      token=USER_A)[0] == 403

    with_daemon(tmp_path, check, tokens=tokens)


# ------------------------------------ review fixes: auth before lookup, sizes, 431, counts


EDGE_TOKENS = [TokenSpec(ADMIN, "*", "admin"), TokenSpec(USER_A, ["a"], "user")]
INSTANCE = {"instance_id": "inst-1", "instance_group": "a", "block_size": 16,
            "model_deployment": {"model_name": "m"},
            "location_spec_infos": [{"name": "tp0", "size": 4096}]}


def test_an_unauthenticated_caller_cannot_tell_which_instances_exist(tmp_path):
    def check(c, info):
        st, body = c.call("POST", "/api/registerInstance", INSTANCE, token=ADMIN)
        assert st == 200 and body["header"]["status"]["code"] == "OK", body
        st, s = c.call("POST", "/cache/write/start", {"instance_id": "inst-1", "keys": ["ab"]}, token=USER_A)
        assert st == 201, s
        answers = {}
        for token in (None, "wrong-token-0123456789"):
            for iid, sid in (("inst-1", s["session_id"]), ("no-such-instance", "no-such-session")):
                got = (
                    c.call("GET", f"/instances/{iid}", token=token),
                    c.call("POST", "/cache/location", {"instance_id": iid, "keys": ["ab"]}, token=token),
                    c.call("POST", "/cache/remove", {"instance_id": iid, "keys": ["ab"]}, token=token),
                    c.call("POST", "/cache/write/finish", {"session_id": sid, "ok_keys": []}, token=token),
                    c.raw("PUT", f"/sessions/{sid}/blocks/ab", b"abcd", token=token)[0],
                    c.call("POST", "/api/getInstanceInfo", {"instance_id": iid}, token=token),
                )
                statuses = [g if isinstance(g, int) else g[0] for g in got]
                assert statuses == [401] * 6, (token, iid, statuses)
                tair = got[-1][1]
                tair["header"].pop("request_id")
                answers[(token, iid)] = json.dumps([g if isinstance(g, int) else g[1] for g in got])
            # The existing and the missing instance get the very same answers.
            assert answers[(token, "inst-1")] == answers[(token, "no-such-instance")]

    with_daemon(tmp_path, check, tokens=EDGE_TOKENS)


@pytest.mark.parametrize("size", [(1 << 63) - 1, 65 * (1 << 20)])
def test_register_instance_refuses_a_block_the_store_cannot_take(tmp_path, size):
    def check(c, info):
        inst = {**INSTANCE, "location_spec_infos": [{"name": "tp0", "size": size}]}
        st, body = c.call("POST", "/api/registerInstance", inst)
        assert st == 200 and body["header"]["status"]["code"] == "INVALID_ARGUMENT", body
        assert "max_block_bytes" in body["header"]["status"]["message"]
        native = {k: v for k, v in inst.items() if k != "model_deployment"}
        st, body = c.call("POST", "/instances", native)
        assert st == 400 and body["error"]["type"] == "InvalidArgumentError", body
        st, body = c.call("GET", "/instances")
        assert body["instances"] == []  # nothing half-registered

    with_daemon(tmp_path, check)


def _raw_http(port: int, head_pad: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: " + b"a" * head_pad + b"\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


@pytest.mark.parametrize("pad", [MAX_HEAD_BYTES, 100_000, 400_000])
def test_a_head_over_the_limit_gets_431_not_a_reset(tmp_path, pad, metric_counters):
    def check(c, info):
        answer = _raw_http(info.http_port, pad)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
        assert _raw_http(info.http_port, 1000).startswith(b"HTTP/1.1 200 ")  # still serving
        st, text = c.call("GET", "/metrics")
        assert metric_counters(text, "tairstore_protocol_errors")[(("kind", "431"), ("server", "http"))] == 1

    with_daemon(tmp_path, check)


def test_http_auth_failures_are_counted(tmp_path, metric_counters):
    def check(c, info):
        assert c.call("GET", "/health")[0] == 401
        assert c.call("GET", "/stats", token=USER_A)[0] == 403
        assert c.call("POST", "/api/getInstanceInfo", {"instance_id": "x"})[0] == 401
        st, text = c.call("GET", "/metrics", token=ADMIN)
        failures = metric_counters(text, "tairstore_auth_failures")
        assert failures[(("kind", "unauthenticated"), ("server", "http"))] == 2
        assert failures[(("kind", "forbidden"), ("server", "http"))] == 1

    with_daemon(tmp_path, check, tokens=EDGE_TOKENS)
