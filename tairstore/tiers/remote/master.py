"""Start and stop a local ``mooncake_master`` bound to 127.0.0.1 (tests, benchmarks, demos).

Production runs its master as a service; this helper exists so that every test and the
benchmark start a *real* master the same way: free ports picked by the OS, every listener on
127.0.0.1 (the HTTP metadata server otherwise may listen on all interfaces), ready when its
metrics port answers ``GET /health``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from tairstore.errors import InvalidArgumentError

__all__ = ["MooncakeMaster", "free_port", "find_master_binary"]

#: A cold master starts in well under a second; a loaded 2-core machine gets a wide margin.
_READY_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_master_binary() -> str | None:
    """``mooncake_master`` next to this interpreter (a venv's bin/) or on PATH, else None."""
    beside = os.path.join(os.path.dirname(sys.executable), "mooncake_master")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("mooncake_master")


@dataclass
class MooncakeMaster:
    """One ``mooncake_master`` process with its HTTP metadata server, all on 127.0.0.1.

    Ports are chosen once and kept across :meth:`restart`, so clients configured with
    :attr:`config` find the restarted master at the same address.
    """

    rpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def master(self) -> str:
        """The ``host:port`` clients pass as ``master``."""
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def metadata_server(self) -> str:
        """The URL clients pass as ``metadata_server``."""
        return f"http://127.0.0.1:{self.http_port}/metadata"

    def config(self, **extra: object) -> dict:
        """A remote-tier config dict for a client of this master."""
        return {"kind": "mooncake", "master": self.master, "metadata_server": self.metadata_server,
                "protocol": "tcp", "local_hostname": "127.0.0.1",
                "metrics_url": f"http://127.0.0.1:{self.metrics_port}/metrics", **extra}

    def start(self) -> "MooncakeMaster":
        """Start the process and wait until it answers its health check."""
        binary = find_master_binary()
        if binary is None:
            raise InvalidArgumentError("mooncake_master not found: install the 'mooncake' extra")
        args = [binary, "--rpc_address=127.0.0.1", f"--rpc_port={self.rpc_port}",
                "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
                f"--http_metadata_server_port={self.http_port}", "--metrics_host=127.0.0.1",
                f"--metrics_port={self.metrics_port}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        url = f"http://127.0.0.1:{self.metrics_port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mooncake_master exited with {self.proc.returncode} at start")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError("mooncake_master did not become healthy")

    def kill(self) -> None:
        """Kill the process (SIGKILL: a crash, not a clean shutdown) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Kill and start again on the same ports; the new master knows no objects."""
        self.kill()
        self.start()

    def __enter__(self) -> "MooncakeMaster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
