"""Tair KVCache compatibility: the request bodies Tair's vLLM, SGLang (plain and hybrid) and
TRT-LLM connectors send, replayed against a real ``tairstore serve``; bytes are written to the
handed-out ``file://`` / ``3fs://`` locations directly, as Tair's SDK writes them, and read back
from the locations ``getCacheLocation`` returns."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.request
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from tairstore.daemon.process import DaemonProcess

SPEC = 256
DEPLOY = {"model_name": "qwen3-8b", "dtype": "BF16", "use_mla": False, "tp_size": 2, "dp_size": 1,
          "lora_name": "", "pp_size": 1, "extra": "", "user_data": ""}


def _post(base: str, method: str, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}/api/{method}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ok(base: str, method: str, body: dict) -> dict:
    status, resp = _post(base, method, body)
    assert status == 200 and resp["header"]["status"]["code"] == "OK", resp
    return resp


def parse_hf3fs_configs(storage_configs: str) -> list[dict]:
    """What Tair's vLLM/SGLang connectors read from registerInstance."""
    out = []
    for c in json.loads(storage_configs):
        if c["type"] in ("hf3fs", "vcns_hf3fs") and c["is_available"]:
            out.append({"mountpoint": c["storage_spec"]["mountpoint"], "root_dir": c["storage_spec"]["root_dir"]})
    return out


def local_path(uri: str, mount: str | None = None) -> tuple[str, int, int]:
    scheme, _, rest = uri.partition("://")  # "3fs" is no RFC 3986 scheme: split by hand
    u = urlsplit("x://" + rest)
    q = parse_qs(u.query)
    # The host names the storage (Tair's SDK picks its backend by it); 3FS paths are below the mount.
    path = u.path if scheme == "file" else os.path.join(mount, u.path.lstrip("/"))
    return path, int(q["offset"][0]), int(q["size"][0])


def sdk_write(uri: str, data: bytes, mount: str | None = None) -> None:
    """Write one spec's bytes straight to its storage, as Tair's SDK does."""
    path, off, size = local_path(uri, mount)
    assert len(data) == size
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def sdk_read(uri: str, mount: str | None = None) -> bytes:
    path, off, size = local_path(uri, mount)
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(size)


@contextlib.contextmanager
def tair_daemon(data_dir) -> Iterator[tuple[DaemonProcess, str]]:
    """A small daemon with the Tair admin port on; (daemon, admin URL)."""
    with socket.socket() as sock:  # a free port for the admin listener
        sock.bind(("127.0.0.1", 0))
        admin_port = sock.getsockname()[1]
    with DaemonProcess(data_dir, store={"dram_bytes": 8 << 20, "ssd_bytes": 0, "durability": "none"},
                       extra={"tair": {"admin_http_port": admin_port}}) as d:
        yield d, f"http://127.0.0.1:{admin_port}"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("tair")
    mount = base / "3fs-mount"
    mount.mkdir()
    with tair_daemon(base / "data") as (d, admin):
        ok(admin, "addStorage", {"storage": {"global_unique_name": "hf3fs_main", "type": "hf3fs", "storage_spec": {
            "mountpoint": str(mount), "root_dir": "kvcache", "cluster_name": "c1"}}})
        ok(admin, "addStorage", {"storage": {"global_unique_name": "mc", "type": "mooncake",
                                             "storage_spec": {"local_hostname": "n1"}}})
        ok(admin, "createInstanceGroup", {"instance_group": {"name": "g3fs", "storage_candidates": ["hf3fs_main", "mc"]}})
        ok(admin, "createInstanceGroup", {"instance_group": {"name": "small", "storage_candidates": ["local_file"],
                                                             "quota_bytes": 2 * 2 * SPEC}})
        stale = _post(admin, "updateInstanceGroup", {"current_version": 7, "instance_group": {
            "name": "small", "storage_candidates": ["local_file"], "quota_bytes": 1}})[1]
        assert stale["header"]["status"]["code"] == "INVALID_ARGUMENT"
        groups = ok(admin, "listInstanceGroup", {})["instance_groups"]
        assert {g["name"] for g in groups} == {"default", "g3fs", "small"}
        d.mount = str(mount)
        yield d


def register(base: str, iid: str, group: str, specs=("tp0", "tp1"), groups=None) -> dict:
    body = {"trace_id": f"t-{iid}", "instance_group": group, "instance_id": iid, "block_size": 16,
            "location_spec_infos": [{"name": s, "size": str(SPEC)} for s in specs],
            "model_deployment": DEPLOY, "location_spec_groups": groups or []}
    return ok(base, "registerInstance", body)


def test_vllm_3fs_write_read_and_storage_configs(daemon):
    base = daemon.http_url
    resp = register(base, "vllm-0", "g3fs")
    configs = json.loads(resp["storage_configs"])
    assert {c["type"]: c["is_available"] for c in configs} == {"hf3fs": True, "mooncake": False}
    assert parse_hf3fs_configs(resp["storage_configs"]) == [{"mountpoint": daemon.mount, "root_dir": "kvcache"}]
    start = ok(base, "startWriteCache", {"trace_id": "w", "instance_id": "vllm-0", "block_keys": ["11", "12"],
                                         "write_timeout_seconds": 30})
    assert start["block_mask"] == {"offset": 0}
    payload = {}
    for i, loc in enumerate(start["locations"]):
        assert loc["type"] == "ST_3FS"
        for spec in loc["location_specs"]:
            assert spec["uri"].startswith("3fs://hf3fs_main/kvcache/g3fs/vllm-0/")
            payload[spec["uri"]] = bytes([i * 7 + len(spec["name"])]) * SPEC
            sdk_write(spec["uri"], payload[spec["uri"]], daemon.mount)
    ok(base, "finishWriteCache", {"instance_id": "vllm-0", "write_session_id": start["write_session_id"],
                                  "success_blocks": {"bool_masks": {"values": [True, True]}}})
    got = ok(base, "getCacheLocation", {"instance_id": "vllm-0", "query_type": "QT_PREFIX_MATCH",
                                        "block_keys": ["11", "12", "13"]})
    assert got["locations"] == start["locations"]
    for loc in got["locations"]:
        for spec in loc["location_specs"]:
            assert sdk_read(spec["uri"], daemon.mount) == payload[spec["uri"]]
    n = ok(base, "getCacheLocationLen", {"instance_id": "vllm-0", "block_keys": ["11", "12", "13"]})
    assert n["cache_location_len"] == "2"
    # A second start of the same keys writes nothing: a clean prefix mask.
    again = ok(base, "startWriteCache", {"instance_id": "vllm-0", "block_keys": ["11", "12", "14"]})
    assert again["block_mask"] == {"offset": 2} and len(again["locations"]) == 1


def test_keys_are_per_instance_and_batch_get_misses(daemon):
    base = daemon.http_url
    register(base, "sgl-a", "default")
    register(base, "sgl-b", "default")
    start = ok(base, "startWriteCache", {"instance_id": "sgl-a", "block_keys": ["5"]})
    for spec in start["locations"][0]["location_specs"]:
        assert spec["uri"].startswith("file://local_file/")
        sdk_write(spec["uri"], b"x" * SPEC)
    ok(base, "finishWriteCache", {"instance_id": "sgl-a", "write_session_id": start["write_session_id"],
                                  "success_blocks": {"offset": 1}})
    other = ok(base, "getCacheLocation", {"instance_id": "sgl-b", "query_type": "QT_BATCH_GET",
                                          "block_keys": ["5"], "block_mask": {"offset": 1}})
    assert other["locations"] == [{"type": "ST_UNSPECIFIED", "spec_size": 2, "location_specs": [
        {"name": "tp0", "uri": ""}, {"name": "tp1", "uri": ""}]}]
    mine = ok(base, "getCacheLocation", {"instance_id": "sgl-a", "query_type": "QT_BATCH_GET",
                                         "block_keys": ["5"], "block_mask": {"offset": 1}})
    assert mine["locations"][0]["type"] == "ST_NFS" and mine["locations"][0]["spec_size"] == 2
    by = {"instance_id": "sgl-a", "query_type": "QT_BATCH_GET", "block_keys": ["5", "6"]}
    nfs = ok(base, "getCacheLocationsByBackend", {**by, "backend_selectors": [{"backend_type": "ST_NFS"}]})
    assert nfs["key_locations"] == [{"locations": mine["locations"]}, {"locations": []}]
    other3fs = ok(base, "getCacheLocationsByBackend", {**by, "backend_selectors": [{"backend_type": "ST_3FS"}]})
    assert other3fs["key_locations"] == [{"locations": []}, {"locations": []}]
    _, resp = _post(base, "getCacheLocationsByBackend", {**by, "backend_selectors": []})
    assert resp["header"]["status"]["code"] == "INVALID_ARGUMENT" and resp["key_locations"] == []


def test_sglang_hybrid_full_linear_partial_groups(daemon):
    base = daemon.http_url
    groups = [{"name": "Full", "spec_names": ["full0"]}, {"name": "Linear", "spec_names": ["lin0"]}]
    register(base, "hybrid", "default", specs=("full0", "lin0"), groups=groups)
    start = ok(base, "startWriteCache", {"instance_id": "hybrid", "block_keys": ["1", "2"],
                                         "location_spec_group_names": ["Full", "Linear"]})
    assert [[s["name"] for s in loc["location_specs"]] for loc in start["locations"]] == [["full0"], ["lin0"]]
    for loc in start["locations"]:
        for spec in loc["location_specs"]:
            sdk_write(spec["uri"], b"h" * SPEC)
    ok(base, "finishWriteCache", {"instance_id": "hybrid", "write_session_id": start["write_session_id"],
                                  "success_blocks": {"bool_masks": {"values": [True, True]}}})
    lin = ok(base, "getCacheLocation", {"instance_id": "hybrid", "query_type": "QT_BATCH_GET",
                                        "block_keys": ["1", "2"], "location_spec_names": ["lin0"]})
    assert [loc["location_specs"][0]["uri"] != "" for loc in lin["locations"]] == [False, True]


def test_trtllm_token_ids_and_errors_in_the_managers_dialect(daemon):
    base = daemon.http_url
    register(base, "trt", "default")
    start = ok(base, "startWriteCache", {"instance_id": "trt", "token_ids": list(range(32))})
    assert len(start["locations"]) == 2
    status, resp = _post(base, "registerInstance", {"instance_group": "nope", "instance_id": "x", "block_size": 4,
                                                    "model_deployment": DEPLOY,
                                                    "location_spec_infos": [{"name": "a", "size": 1}]})
    assert resp["header"]["status"]["code"] == "INSTANCE_NOT_EXIST" and "nope" in resp["header"]["status"]["message"]
    assert resp["storage_configs"] == "" and resp["extra_info"] == ""
    assert _post(base, "getCacheLocation", b"{not json") == (400, {})
    status, resp = _post(base, "finishWriteCache", {"trace_id": "tr", "instance_id": "trt", "write_session_id": "nope",
                                                    "success_blocks": {"offset": 0}})
    assert resp["header"]["status"]["code"] == "INTERNAL_ERROR"  # the manager's EC_ERROR
    assert resp["header"]["request_id"].startswith("tr_") and resp["header"]["request_id"][3:].isdigit()
    assert ok(base, "reportEvent", {"instance_id": "trt", "host_ip_port": "10.0.0.1:80"})["item_results"] == []
    _, resp = _post(base, "reportEvent", {"instance_id": "trt", "host_ip_port": ""})
    assert resp["header"]["status"]["code"] == "INVALID_ARGUMENT"
    ci = ok(base, "getClusterInfo", {"instance_id": "unregistered"})
    assert ci["self_node_id"] == ci["leader_node_id"] == ci["leader_endpoint"]["node_id"]
    # finish claiming success for a block whose file vanished is refused
    start = ok(base, "startWriteCache", {"instance_id": "trt", "block_keys": ["77"]})
    os.unlink(local_path(start["locations"][0]["location_specs"][0]["uri"])[0])
    status, resp = _post(base, "finishWriteCache", {"instance_id": "trt", "write_session_id": start["write_session_id"],
                                                    "success_blocks": {"offset": 1}})
    assert resp["header"]["status"]["code"] == "INVALID_ARGUMENT"


def test_quota_evicts_least_recent_and_deletes_bytes(daemon):
    base = daemon.http_url
    register(base, "q", "small")
    paths = []
    for key in ("1", "2", "3"):
        start = ok(base, "startWriteCache", {"instance_id": "q", "block_keys": [key]})
        paths.append(local_path(start["locations"][0]["location_specs"][0]["uri"])[0])
        ok(base, "finishWriteCache", {"instance_id": "q", "write_session_id": start["write_session_id"],
                                      "success_blocks": {"offset": 1}})
    assert not os.path.exists(paths[0]) and os.path.exists(paths[2])
    n = ok(base, "getCacheLocationLen", {"instance_id": "q", "query_type": "QT_BATCH_GET", "block_keys": ["1", "2", "3"]})
    assert n["cache_location_len"] == "2"


def test_cache_meta_and_trim_as_the_manager(daemon):
    base = daemon.http_url
    register(base, "meta", "default")
    start = ok(base, "startWriteCache", {"instance_id": "meta", "block_keys": ["1", "2"]})
    ok(base, "finishWriteCache", {"instance_id": "meta", "write_session_id": start["write_session_id"],
                                  "success_blocks": {"bool_masks": {"values": [True, False]}}})
    pending = ok(base, "startWriteCache", {"instance_id": "meta", "block_keys": ["3"]})
    metas = ok(base, "getCacheMeta", {"instance_id": "meta", "block_keys": ["1", "2", "3"]})["metas"]
    assert [json.loads(m)["status"] for m in metas] == ["CLS_SERVING", "CLS_NOT_FOUND", "CLS_WRITING"]
    for strategy in ("TS_REMOVE_ALL_META", "TS_TIMESTAMP"):
        _, resp = _post(base, "trimCache", {"instance_id": "meta", "strategy": strategy, "end_timestamp": 1})
        assert resp["header"]["status"]["code"] == "UNSUPPORTED"
    path = local_path(pending["locations"][0]["location_specs"][0]["uri"])[0]
    ok(base, "trimCache", {"instance_id": "meta", "strategy": "TS_REMOVE_ALL_CACHE"})
    assert not os.path.exists(path)
    n = ok(base, "getCacheLocationLen", {"instance_id": "meta", "query_type": "QT_BATCH_GET", "block_keys": ["1"]})
    assert n["cache_location_len"] == "0"
