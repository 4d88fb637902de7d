"""Fixtures for the remote-tier tests: peers (the ``master`` fixture is in tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PEER = os.path.join(os.path.dirname(__file__), "peer.py")
#: Generous bound on any one step of a peer on a loaded machine; tests never assert timing.
STEP_TIMEOUT_S = 60


class Peer:
    """A peer.py process; see that file for its protocol."""

    def __init__(self, config: dict, ns: str, own: int, other: int, count: int, size: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, PEER, json.dumps(config), ns, str(own), str(other), str(count), str(size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def expect(self, word: str) -> int:
        """Read the peer's next line, which must start with ``word``; return its number."""
        line = self.proc.stdout.readline()
        assert line.startswith(word + " "), f"peer said {line!r} (exit {self.proc.poll()})"
        return int(line.split()[1])

    def check(self) -> int:
        """Ask the peer to read the other side's blocks; its count of byte-exact hits."""
        self.proc.stdin.write("check\n")
        self.proc.stdin.flush()
        return self.expect("ok")

    def close(self) -> None:
        """End the peer (its Mooncake objects go with it) and reap it."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=STEP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def peers():
    """Start peers with ``peers(config, ns, own, other, count, size)``; all are ended after."""
    started: list[Peer] = []

    def start(*args) -> Peer:
        p = Peer(*args)
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()
