"""Tair KVCache's own ``integration_test/meta_service/http_interface_test.py``, run unchanged
against tairstore by ``scripts/tair-conformance`` (with the ``kv_cache_manager_bin`` stand-in).
Also: Tair's vLLM and SGLang connectors' own ``parse_hf3fs_configs`` on tairstore's
``storage_configs``. Tair's files are read from the checkout named by ``TAIR_KVCACHE_DIR``;
nothing is fetched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TAIR = os.environ.get("TAIR_KVCACHE_DIR")


@pytest.mark.skipif(not TAIR, reason="TAIR_KVCACHE_DIR is unset")
def test_tair_meta_service_http_interface_test_passes_unchanged():
    out = subprocess.run([str(ROOT / "scripts" / "tair-conformance"), TAIR], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "7 passed" in out.stdout, out.stdout[-4000:]


def _tair_function(relpath: str, name: str):
    """A method of Tair's own source, compiled alone from the checkout (its module imports vLLM or
    SGLang, which these tests do not install)."""
    import ast
    import json
    import logging

    src = (Path(TAIR) / relpath).read_text()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            ns = {"json": json, "logger": logging.getLogger("tair")}
            exec(compile(ast.Module([node], []), relpath, "exec"), ns)
            return ns[name]
    raise AssertionError(f"{relpath} has no {name}")


@pytest.mark.skipif(not TAIR, reason="TAIR_KVCACHE_DIR is unset")
@pytest.mark.parametrize("relpath", ["kv_cache_manager/py_connector/vllm/v1_connector.py",
                                     "kv_cache_manager/py_connector/sglang/connector.py"])
def test_tair_connectors_parse_our_storage_configs(tmp_path, relpath):
    import json
    import types
    import urllib.request

    from tairstore.daemon.process import DaemonProcess

    parse = _tair_function(relpath, "parse_hf3fs_configs")
    stub = types.SimpleNamespace(read_iov_block_size=0, iov_size=0, write_iov_block_size=0, _iov_size=0,
                                 _extra_config=types.SimpleNamespace(read_iov_block_size=0, write_iov_block_size=0))
    def post(base: str, method: str, body: dict) -> dict:
        req = urllib.request.Request(f"{base}/api/{method}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            out = json.loads(r.read())
        assert out["header"]["status"]["code"] == "OK", out
        return out

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        admin_port = sock.getsockname()[1]
    with DaemonProcess(tmp_path / "d", store={"dram_bytes": 8 << 20, "ssd_bytes": 0, "durability": "none"},
                       extra={"tair": {"admin_http_port": admin_port}}) as d:
        admin = f"http://127.0.0.1:{admin_port}"
        post(admin, "addStorage", {"storage": {"global_unique_name": "h3", "type": "hf3fs", "storage_spec": {
            "mountpoint": str(tmp_path), "root_dir": "kv"}}})
        post(admin, "createInstanceGroup", {"instance_group": {"name": "g", "storage_candidates": ["h3", "local_file"]}})
        body = {"instance_group": "g", "instance_id": "i", "block_size": 16,
                "location_spec_infos": [{"name": "tp0", "size": 64}],
                "model_deployment": {"model_name": "m", "dtype": "BF16", "tp_size": 1}}
        resp = post(d.http_url, "registerInstance", body)
    # Tair's own parser reads the 3FS storage out of tairstore's answer and skips the file one.
    got = parse(stub, resp["storage_configs"])
    assert [(c["type"], c["mountpoint"], c["root_dir"]) for c in got] == [("hf3fs", str(tmp_path), "kv")]
