"""Tair KVCache MetaService compatibility: requests shaped exactly as the proto3 JSON mapping of
its ``meta_service.proto`` says (int64 as strings, enums as names, proto field names), replayed
against a real daemon; the responses are checked for shape and meaning."""

from __future__ import annotations

import http.client
import json
from functools import partial
from urllib.parse import urlsplit

import trio

from tairstore.daemon.main import run_daemon
from tairstore.daemon.config import DaemonConfig
from tairstore.keys import chain_hashes
from tairstore.daemon.tair_compat import key_of_int64

SPEC = 256  # bytes per location spec (one per TP rank)
STORE = {"dram_bytes": 16 << 20, "ssd_bytes": 64 << 20, "segment_bytes": 4 << 20, "durability": "none"}

REGISTER = {
    "trace_id": "trace-register",
    "instance_group": "group-a",
    "instance_id": "qwen-tp2",
    "block_size": 4,
    "location_spec_infos": [{"name": "tp0", "size": str(SPEC)}, {"name": "tp1", "size": str(SPEC)}],
    "model_deployment": {"model_name": "qwen3-8b", "dtype": "BF16", "use_mla": False, "tp_size": 2,
                         "dp_size": 1, "lora_name": "", "pp_size": 1, "extra": "", "user_data": ""},
    "location_spec_groups": [{"name": "full", "spec_names": ["tp0", "tp1"]}],
    "query_type": "QT_PREFIX_MATCH",
}


class Api:
    def __init__(self, port: int) -> None:
        self.port = port

    def post(self, method: str, body: dict, *, raw: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("POST", f"/api/{method}", body=raw if raw is not None else json.dumps(body),
                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        r = conn.getresponse()
        out = r.status, json.loads(r.read())
        conn.close()
        return out

    def ok(self, method: str, body: dict) -> dict:
        status, resp = self.post(method, body)
        assert status == 200, resp
        assert resp["header"]["status"]["code"] == "OK", resp
        assert resp["header"]["request_id"] == body.get("trace_id", resp["header"]["request_id"])
        return resp

    def put(self, uri: str, data: bytes) -> int:
        u = urlsplit(uri)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("PUT", f"{u.path}?{u.query}", body=data)
        r = conn.getresponse()
        r.read()
        conn.close()
        return r.status


def with_daemon(tmp_path, fn):
    cfg = DaemonConfig(port=0, http_port=0, data_dir=str(tmp_path / "data"), store=dict(STORE),
                       shutdown_grace_s=2.0)

    async def main():
        async with trio.open_nursery() as nursery:
            info = await nursery.start(partial(run_daemon, cfg, handle_signals=False))
            try:
                with trio.fail_after(60):
                    await trio.to_thread.run_sync(fn, Api(info.http_port))
            finally:
                info.shutdown()

    trio.run(main)


def write_blocks(api: Api, block_keys: list[str]) -> dict:
    """startWriteCache, upload every spec of every location, finishWriteCache; the start answer."""
    start = api.ok("startWriteCache", {"trace_id": "trace-start", "instance_id": "qwen-tp2",
                                       "block_keys": block_keys, "token_ids": [],
                                       "write_timeout_seconds": 10})
    for loc in start["locations"]:
        assert loc["spec_size"] == 2 and [s["name"] for s in loc["location_specs"]] == ["tp0", "tp1"]
        for spec in loc["location_specs"]:
            assert api.put(spec["uri"], bytes([int(spec["name"][-1])]) * SPEC) == 200
    api.ok("finishWriteCache", {"trace_id": "trace-finish", "instance_id": "qwen-tp2",
                                "write_session_id": start["write_session_id"],
                                "success_blocks": {"bool_masks": {"values": [True] * len(start["locations"])}}})
    return start


def test_register_write_query_remove(tmp_path):
    def check(api: Api):
        resp = api.ok("registerInstance", REGISTER)
        assert isinstance(resp["storage_configs"], str) and json.loads(resp["storage_configs"])
        assert "extra_info" in resp
        # Same registration again: OK. Different model: DUPLICATE_ENTITY.
        api.ok("registerInstance", {**REGISTER, "trace_id": "again"})
        status, resp = api.post("registerInstance", {**REGISTER, "block_size": 8})
        assert status == 200 and resp["header"]["status"]["code"] == "DUPLICATE_ENTITY"

        info = api.ok("getInstanceInfo", {"trace_id": "t-info", "instance_id": "qwen-tp2"})
        assert info["instance_group"] == "group-a"
        assert info["instance_info"]["block_size"] == 4
        assert info["instance_info"]["location_spec_infos"][0] == {"name": "tp0", "size": str(SPEC)}

        keys = ["1001", "1002", "-1003", "9223372036854775807"]
        start = write_blocks(api, keys[:3])
        assert start["block_mask"] == {"bool_masks": {"values": [False, False, False]}}
        assert start["write_session_id"]

        # Writing again: everything already stored is masked, nothing to write.
        again = api.ok("startWriteCache", {"trace_id": "t-again", "instance_id": "qwen-tp2",
                                           "block_keys": keys[:2] + keys[:1], "write_timeout_seconds": 5})
        assert again["block_mask"]["bool_masks"]["values"] == [True, True, True] and again["locations"] == []

        prefix = api.ok("getCacheLocation", {"trace_id": "t-loc", "instance_id": "qwen-tp2",
                                             "query_type": "QT_PREFIX_MATCH", "block_keys": keys,
                                             "block_mask": {"offset": 0}})
        assert len(prefix["locations"]) == 3
        loc = prefix["locations"][0]
        assert loc["type"] == "ST_UNSPECIFIED" and loc["spec_size"] == 2
        uri = urlsplit(loc["location_specs"][1]["uri"])
        assert uri.scheme == "tairstore" and uri.path == f"/group-a/{key_of_int64(1001).hex()}"
        assert "offset=256" in uri.query and f"size={SPEC}" in uri.query and "spec=tp1" in uri.query

        # offset masks the blocks the engine already has: they continue the prefix, no location.
        masked = api.ok("getCacheLocation", {"trace_id": "t", "instance_id": "qwen-tp2",
                                             "query_type": "QT_PREFIX_MATCH", "block_keys": keys,
                                             "block_mask": {"offset": 2}})
        assert len(masked["locations"]) == 1
        only = api.ok("getCacheLocation", {"trace_id": "t", "instance_id": "qwen-tp2",
                                           "query_type": "QT_PREFIX_MATCH", "block_keys": keys,
                                           "location_spec_names": ["tp0"]})
        assert all(l["spec_size"] == 1 for l in only["locations"])

        batch = api.ok("getCacheLocation", {"trace_id": "t", "instance_id": "qwen-tp2",
                                            "query_type": "QT_BATCH_GET", "block_keys": ["5", "1002", "6"]})
        assert [l["spec_size"] for l in batch["locations"]] == [0, 2, 0]

        sw = api.ok("getCacheLocation", {"trace_id": "t", "instance_id": "qwen-tp2",
                                         "query_type": "QT_REVERSE_ROLL_SW_MATCH",
                                         "block_keys": keys, "sw_size": 2})
        assert [l["spec_size"] for l in sw["locations"]] == [0, 2, 2, 0]
        status, bad = api.post("getCacheLocation", {"trace_id": "t", "instance_id": "qwen-tp2",
                                                    "query_type": "QT_REVERSE_ROLL_SW_MATCH",
                                                    "block_keys": keys, "sw_size": 0})
        assert bad["header"]["status"]["code"] == "INVALID_ARGUMENT"

        n = api.ok("getCacheLocationLen", {"trace_id": "t", "instance_id": "qwen-tp2",
                                           "query_type": "QT_PREFIX_MATCH", "block_keys": keys})
        assert n["cache_location_len"] == "3"  # int64 as a string

        meta = api.ok("getCacheMeta", {"trace_id": "t", "instance_id": "qwen-tp2",
                                       "block_keys": ["1001", "7"], "detail_level": 1})
        assert len(meta["locations"]) == 2 and len(meta["metas"]) == 2
        assert json.loads(meta["metas"][0])["exists"] is True and json.loads(meta["metas"][1])["exists"] is False

        api.ok("removeCache", {"trace_id": "t-rm", "instance_id": "qwen-tp2", "block_keys": ["1002"],
                               "block_mask": {"offset": 0}})
        after = api.ok("getCacheLocation", {"trace_id": "t", "instance_id": "qwen-tp2",
                                            "query_type": "QT_PREFIX_MATCH", "block_keys": keys})
        assert len(after["locations"]) == 1

        api.ok("trimCache", {"trace_id": "t-trim", "instance_id": "qwen-tp2",
                             "strategy": "TS_REMOVE_ALL_CACHE"})
        gone = api.ok("getCacheLocationLen", {"trace_id": "t", "instance_id": "qwen-tp2",
                                              "query_type": "QT_BATCH_GET", "block_keys": keys})
        assert gone["cache_location_len"] == "0"

    with_daemon(tmp_path, check)


def test_token_ids_partial_success_and_camel_case(tmp_path):
    def check(api: Api):
        api.ok("registerInstance", REGISTER)
        tokens = [str(t) for t in range(12)]  # three blocks of 4 tokens
        # lowerCamelCase field names and numeric enums are valid proto3 JSON too.
        start = api.ok("startWriteCache", {"traceId": "t", "instanceId": "qwen-tp2", "tokenIds": tokens,
                                           "writeTimeoutSeconds": 10})
        assert len(start["locations"]) == 3
        expected = chain_hashes(list(range(12)), 4)
        assert start["locations"][0]["location_specs"][0]["uri"].split("/")[-1].startswith(expected[0].hex())
        # Only the first two blocks were written: the third is reported failed and not stored.
        for loc in start["locations"][:2]:
            for spec in loc["location_specs"]:
                assert api.put(spec["uri"], b"\1" * SPEC) == 200
        api.ok("finishWriteCache", {"trace_id": "t", "instance_id": "qwen-tp2",
                                    "write_session_id": start["write_session_id"],
                                    "success_blocks": {"bool_masks": {"values": [True, True, False]}}})
        n = api.ok("getCacheLocationLen", {"traceId": "t", "instanceId": "qwen-tp2", "queryType": 2,
                                           "tokenIds": tokens})
        assert n["cache_location_len"] == "2"

    with_daemon(tmp_path, check)


def test_errors_in_the_managers_dialect(tmp_path):
    def check(api: Api):
        status, resp = api.post("getCacheLocation", {"trace_id": "t", "instance_id": "ghost",
                                                     "query_type": "QT_PREFIX_MATCH", "block_keys": ["1"]})
        assert status == 200 and resp["header"]["status"]["code"] == "INSTANCE_NOT_EXIST"
        status, resp = api.post("registerInstance", {"trace_id": "t", "instance_id": "x"})
        assert resp["header"]["status"]["code"] == "INVALID_ARGUMENT"
        assert "instance_group" in resp["header"]["status"]["message"]
        api.ok("registerInstance", REGISTER)
        status, resp = api.post("getCacheLocation", {"trace_id": "t", "instance_id": "qwen-tp2",
                                                     "query_type": "QT_PREFIX_MATCH"})
        assert resp["header"]["status"]["code"] == "INVALID_ARGUMENT"
        status, resp = api.post("getCacheLocation", {"trace_id": "t", "instance_id": "qwen-tp2",
                                                     "query_type": "QT_NOPE", "block_keys": ["1"]})
        assert resp["header"]["status"]["code"] == "INVALID_ARGUMENT"
        status, resp = api.post("finishWriteCache", {"trace_id": "t", "instance_id": "qwen-tp2",
                                                     "write_session_id": "1-nope",
                                                     "success_blocks": {"offset": 0}})
        assert resp["header"]["status"]["code"] == "INVALID_ARGUMENT"
        # Claiming success for a block that was never uploaded is refused, not stored.
        start = api.ok("startWriteCache", {"trace_id": "t", "instance_id": "qwen-tp2", "block_keys": ["42"]})
        status, resp = api.post("finishWriteCache", {"trace_id": "t", "instance_id": "qwen-tp2",
                                                     "write_session_id": start["write_session_id"],
                                                     "success_blocks": {"bool_masks": {"values": [True]}}})
        assert resp["header"]["status"]["code"] == "INVALID_ARGUMENT"
        status, resp = api.post("getClusterInfo", {"trace_id": "t"})
        assert resp["header"]["status"]["code"] == "UNSUPPORTED"
        status, resp = api.post("getCacheLocation", {}, raw=b"{broken")
        assert status == 400 and resp["header"]["status"]["code"] == "INVALID_ARGUMENT"

    with_daemon(tmp_path, check)
