"""Tair KVCache's own ``integration_test/meta_service/http_interface_test.py``, run unchanged
against tairstore by ``scripts/tair-conformance`` (with the ``kv_cache_manager_bin`` stand-in).
Tair's files are read from the checkout named by ``TAIR_KVCACHE_DIR``; nothing is fetched."""

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
