"""Start ``tairstore serve`` as a child process, the way a user does, and find its ports.

Tests, benchmarks and the connectors' tests all need a real daemon in another process. They start
it through this module so that there is one way to do it: the console command with a generated
TOML config (``docs/DAEMON.md``), ``--port 0 --http-port 0``, and the startup log line that says
where it listens. Nothing here is used by the daemon itself.

Example::

    with DaemonProcess(tmp / "data", store={"dram_bytes": 64 << 20, "ssd_bytes": 0}) as d:
        with tairstore.Client(d.data_url) as c:
            c.put(b"k", b"v")
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tairstore.errors import InvalidArgumentError, StoreError

__all__ = ["DaemonProcess", "to_toml"]

#: The daemon's startup line (tairstore.daemon.main): where the data and HTTP ports listen.
STARTUP = re.compile(r"listening data=(\S+) http=(http://\S+)")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise InvalidArgumentError(f"cannot write {type(v).__name__} {v!r} as a TOML value")


def to_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Write ``{"store": {...}, "limits": {...}}`` (tables of scalars, one level of nesting for
    dict values such as ``policy``; a list of tables such as ``tokens`` as ``[[tokens]]``) as
    TOML text."""
    lines: list[str] = []
    for name, table in tables.items():
        if isinstance(table, list):  # an array of tables, e.g. [[tokens]]
            for item in table:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
            continue
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if k not in nested]
        for k, sub in nested.items():
            lines.append(f"[{name}.{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in sub.items()]
    return "\n".join(lines) + "\n"


class DaemonProcess:
    """``tairstore serve`` in a subprocess on 127.0.0.1 with free ports.

    Args:
        data_dir: the store directory (created by the daemon).
        store: ``[store]`` options (``StoreConfig`` names).
        limits: ``[limits]`` options.
        extra: other TOML tables (``{"namespaces": {...}}`` is not nested further).
        start_timeout_s: how long to wait for the startup line (generous: CI machines are loaded).

    Attributes (after start): ``data_url`` (``tcp://127.0.0.1:P``), ``http_url``, ``proc``, ``log``.
    """

    def __init__(self, data_dir: str | os.PathLike, *, store: dict | None = None,
                 limits: dict | None = None, extra: dict | None = None,
                 start_timeout_s: float = 60.0) -> None:
        self.data_dir = Path(data_dir)
        self.tables: dict[str, dict] = {"server": {"host": "127.0.0.1"}}
        if store:
            self.tables["store"] = dict(store)
        if limits:
            self.tables["limits"] = dict(limits)
        self.tables.update(extra or {})
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.data_url = ""
        self.http_url = ""
        self.log: list[str] = []
        self._config: str | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> "DaemonProcess":
        """Start the daemon and wait for its startup line; raises :class:`StoreError` if it exits."""
        fd, self._config = tempfile.mkstemp(prefix="tairstore-", suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write(to_toml(self.tables))
        cmd = [sys.executable, "-m", "tairstore", "serve", "--config", self._config,
               "--data-dir", str(self.data_dir), "--port", "0", "--http-port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + self.start_timeout_s
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                raise StoreError(f"tairstore serve exited with {self.proc.returncode}:\n" + "".join(self.log))
            self.log.append(line)
            m = STARTUP.search(line)
            if m:
                self.data_url = m.group(1).replace("tairstore://", "tcp://")
                self.http_url = m.group(2)
                break
            if time.monotonic() > deadline:
                self.stop()
                raise StoreError("tairstore serve printed no startup line:\n" + "".join(self.log))
        # Keep draining its output so a chatty daemon never blocks on a full pipe.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout_s``); returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        if self._config and os.path.exists(self._config):
            os.unlink(self._config)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the daemon dies without its shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
