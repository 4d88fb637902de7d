"""Tair KVCache's own ``integration_test/meta_service/http_interface_test.py``, run unchanged
against tairstore by ``scripts/tair-conformance`` (with the ``kv_cache_manager_bin`` stand-in).
Also: Tair's vLLM and SGLang connectors' own ``parse_hf3fs_configs`` on tairstore's
``storage_configs``. Tair's files are read from the checkout named by ``TAIR_KVCACHE_DIR``;
nothing is fetched."""

from __future__ import annotations

import os
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
    import importlib.util
    import types

    # The daemon and client helpers of the sibling test module (tests/ is no package).
    spec = importlib.util.spec_from_file_location("tair_compat_helpers", Path(__file__).with_name("test_tair_compat.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    ok, tair_daemon = helpers.ok, helpers.tair_daemon

    parse = _tair_function(relpath, "parse_hf3fs_configs")
    stub = types.SimpleNamespace(read_iov_block_size=0, iov_size=0, write_iov_block_size=0, _iov_size=0,
                                 _extra_config=types.SimpleNamespace(read_iov_block_size=0, write_iov_block_size=0))

    with tair_daemon(tmp_path / "d") as (d, admin):
        ok(admin, "addStorage", {"storage": {"global_unique_name": "h3", "type": "hf3fs", "storage_spec": {
            "mountpoint": str(tmp_path), "root_dir": "kv"}}})
        ok(admin, "createInstanceGroup", {"instance_group": {"name": "g", "storage_candidates": ["h3", "local_file"]}})
        body = {"instance_group": "g", "instance_id": "i", "block_size": 16,
                "location_spec_infos": [{"name": "tp0", "size": 64}],
                "model_deployment": {"model_name": "m", "dtype": "BF16", "tp_size": 1}}
        resp = ok(d.http_url, "registerInstance", body)
    # Tair's own parser reads the 3FS storage out of tairstore's answer and skips the file one.
    got = parse(stub, resp["storage_configs"])
    assert [(c["type"], c["mountpoint"], c["root_dir"]) for c in got] == [("hf3fs", str(tmp_path), "kv")]
