"""``tairstore serve`` as a user runs it: a subprocess in an empty directory, found by its startup
log line, asked over HTTP, stopped with SIGTERM, and expected to exit 0 promptly."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

STARTUP = re.compile(r"listening data=(\S+) http=http://127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 20


def _tairstore_command() -> list[str]:
    exe = shutil.which("tairstore") or os.path.join(os.path.dirname(sys.executable), "tairstore")
    if not os.path.exists(exe):
        pytest.skip("the tairstore console script is not installed (pip install -e .)")
    return [exe]


def test_serve_starts_answers_and_stops_cleanly(tmp_path):
    cmd = _tairstore_command() + ["serve", "--port", "0", "--http-port", "0"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        port = None
        while port is None:
            assert time.monotonic() < deadline, "no startup line:\n" + "".join(log)
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"tairstore serve exited with {proc.wait()}:\n" + "".join(log))
            log.append(line)
            m = STARTUP.search(line)
            if m:
                port = int(m.group(2))
        assert "dram=" in log[-1] and "ssd=" in log[-1], log[-1]  # it says what it chose
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert json.load(r)["status"] == "ok"
        req = urllib.request.Request(f"http://127.0.0.1:{port}/namespaces", method="POST",
                                     data=json.dumps({"name": "smoke"}).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 201
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=STOP_TIMEOUT_S)
        log.append(proc.stdout.read())
        assert rc == 0, "".join(log)
        assert "stopped cleanly" in "".join(log)
        # The embedded default: data under ./tairstore-data of the working directory.
        assert (tmp_path / "tairstore-data" / "TAIRSTORE").exists()
        assert (tmp_path / "tairstore-data" / "daemon.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_readme_command_serves_the_default_ports(tmp_path):
    """Exactly the README's first command's last step, ``tairstore serve`` with no flags."""
    import numpy as np

    import tairstore

    if not (_port_free(7480) and _port_free(7481)):
        pytest.fail("the default ports 7480/7481 are taken on this machine; free them to run the "
                    "README's command as written")
    proc = subprocess.Popen(_tairstore_command() + ["serve"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert time.monotonic() < deadline, "no startup line:\n" + "".join(log)
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"tairstore serve exited with {proc.wait()}:\n" + "".join(log))
            log.append(line)
            if STARTUP.search(line):
                break
        assert "127.0.0.1:7480" in line and "127.0.0.1:7481" in line, line
        block = np.arange(1 << 16, dtype=np.uint8)
        with tairstore.Client("tcp://127.0.0.1:7480") as c:
            assert c.put(b"readme-key", block)
            assert bytes(c.get(b"readme-key")) == block.tobytes()
            assert c.match([b"readme-key", b"missing"]).prefix_len == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The acknowledged put survived the shutdown (durability=sync by default).
    with tairstore.open(tmp_path / "tairstore-data", dram_bytes=1 << 20, ssd_bytes=64 << 20) as s:
        assert bytes(s.get(b"readme-key")) == block.tobytes()


def test_access_log_records_prefix_lookups_that_optimize_replays(tmp_path):
    import numpy as np

    import tairstore
    from tairstore.daemon.process import DaemonProcess
    from tairstore.policy.traces import load_trace

    log = tmp_path / "access.log"
    with DaemonProcess(tmp_path / "d", store={"dram_bytes": 8 << 20, "ssd_bytes": 0},
                       extra={"server": {"host": "127.0.0.1", "access_log": str(log)}}) as d:
        keys = [bytes([i]) * 16 for i in range(4)]
        with tairstore.Client(d.data_url, shm=False) as c:
            c.put_many(keys[:2], [np.zeros(4096, np.uint8)] * 2)
            assert c.match(keys).prefix_len == 2
            assert c.match(keys[:3], namespace="other").prefix_len == 0
    trace = load_trace(str(log), fmt="tairstore-events")
    assert [len(chain) for chain in trace.chains] == [4, 3]
    assert sorted(trace.group_names) == ["default", "other"]
    assert trace.chains[0][:3] != trace.chains[1]  # one key space per namespace
