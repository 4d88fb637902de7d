"""Every ```python and ```bash block of README.md runs as written.

Each block runs in a fresh temporary directory (the README's relative paths, ``kv-data`` and
``./tairstore-data``, land there), python blocks with this interpreter and bash blocks with
``bash -e -o pipefail``, with this interpreter's ``bin`` first on PATH so that ``tairstore`` is
the installed console command. Any non-zero exit fails the test.

A block may be preceded by one marker line, which says how it runs (and why, for the reader):

- ``<!-- readme-test: with-daemon (...) -->``: the test starts ``tairstore serve`` with its
  defaults (127.0.0.1:7480 and :7481) in the block's directory before the block and stops it
  after, as the README tells the reader to have a daemon running;
- ``<!-- readme-test: skip (reason) -->``: not run; the reason must be given (the install block,
  which would build a virtual environment and run this very suite).

Other fenced blocks must say what they are (``text``, ``toml``...): a block without a
language would silently escape this test.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
RUN = ("python", "bash")
MARKER = re.compile(r"<!-- readme-test: (skip|with-daemon) \((.+)\) -->")
#: What one block may take: the embedded examples fsync a few blocks; the daemon examples start
#: and stop a daemon (generous: CI machines are loaded; a hang must still end).
BLOCK_TIMEOUT_S = 300


def blocks() -> list[tuple[int, str, str, tuple[str, str] | None]]:
    """(line, language, code, marker) of every fenced block in README.md; a marker is
    (``"skip"`` or ``"with-daemon"``, the reason given)."""
    lines = README.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i + 1, m.group(1)
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        assert j < len(lines), f"README.md:{start}: unclosed code block"
        marker = MARKER.match(lines[i - 1]) if i else None
        out.append((start, lang, "\n".join(lines[i + 1:j]) + "\n", marker.groups() if marker else None))
        i = j + 1
    return out


def test_every_block_says_its_language_and_markers_are_understood():
    found = blocks()
    assert any(lang == "python" for _, lang, _, _ in found)
    for line, lang, _, _ in found:
        assert lang, f"README.md:{line}: a code block without a language (```python, ```bash, ```text…)"
    text = README.read_text()
    assert text.count("<!-- readme-test:") == len(MARKER.findall(text)), "a readme-test marker this test ignores"


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _Daemon:
    """``tairstore serve`` with its defaults, in ``cwd``; ready once its startup line is out."""

    def __init__(self, cwd: Path) -> None:
        self.log = cwd / "daemon.log"
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tairstore", "serve"], cwd=cwd, env=_env(),
                                     stdout=self._out, stderr=subprocess.STDOUT)
        # Bounded wait for the startup line (the daemon's own, as DaemonProcess reads it).
        for _ in range(BLOCK_TIMEOUT_S * 10):
            if "listening data=" in self.log.read_text() or self.proc.poll() is not None:
                break
            try:
                self.proc.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is not None or "listening data=" not in self.log.read_text():
            self.stop()
            raise AssertionError("tairstore serve did not start:\n" + self.log.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@pytest.mark.parametrize("line, lang, code, marker",
                         [b for b in blocks() if b[1] in RUN],
                         ids=[f"README.md:{b[0]}-{b[1]}" for b in blocks() if b[1] in RUN])
def test_readme_block_runs_as_written(tmp_path, line, lang, code, marker):
    kind = marker[0] if marker else None
    if kind == "skip":
        pytest.skip(f"README.md:{line} is marked skip: {marker[1]}")
    if lang == "bash" and "curl " in code and shutil.which("curl") is None:
        pytest.fail(f"README.md:{line} uses curl, which is not installed (.ci/run installs it)")
    script = tmp_path / ("block.py" if lang == "python" else "block.sh")
    script.write_text(code)
    cmd = [sys.executable, str(script)] if lang == "python" else ["bash", "-e", "-o", "pipefail", str(script)]
    daemon = _Daemon(tmp_path) if kind == "with-daemon" else None
    # Its own process group: whatever the block starts (a daemon in the background) is stopped
    # with it, even when the block fails or hangs.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _end_group(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"README.md:{line} ({lang}) did not finish:\n{out}\n{err}")
    finally:
        _end_group(proc.pid)
        if daemon is not None:
            daemon.stop()
    assert proc.returncode == 0, (f"README.md:{line} ({lang}) exited with {proc.returncode}\n"
                                  f"--- stdout\n{out}\n--- stderr\n{err}")


def _end_group(pgid: int) -> None:
    """SIGTERM every process left in the group (a graceful stop), SIGKILL what outlives it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        for _ in range(300):  # bounded: up to ~30 s for a daemon to close its store
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            try:
                os.waitpid(-pgid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
