"""M1: the engine never deletes bytes it cannot account for.

Each damage case: ``open`` refuses with a typed error naming ``tairstore fsck DIR --rebuild``
and changes no file; ``tairstore fsck DIR`` changes no file and exits 1; ``fsck --rebuild``
exits 0 and the store then serves every committed block byte-exact. Plus the EIO ordering
regression and the typed errors of the open path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import tairstore
from tairstore.cli import main
from tairstore.engine.fsck import EXIT_DAMAGE, EXIT_FAILED, EXIT_OK, fsck
from tairstore.errors import (
    CorruptionError, DataDirError, DataDirPermissionError, InvalidArgumentError,
    MetadataMismatchError, ReadIOError, SegmentGoneError, StoreError,
)
from tairstore.fuzz.faultfs import FaultFS
from tairstore.index.lmdb_index import Index
from tairstore.index.records import encode_block

OPTS = dict(dram_bytes=0, ssd_bytes=64 << 20, durability="sync")
N = 40


def payload(i: int, version: int = 1) -> bytes:
    return bytes([(i * 7 + version) % 251]) * 3000 + i.to_bytes(4, "little")


def key(i: int) -> bytes:
    return b"blk-%04d" % i


def write(path: Path, keys: range, version: int = 1) -> None:
    with tairstore.open(path, **OPTS) as s:
        for i in keys:
            assert s.put(key(i), payload(i, version))


def snapshot(path: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under ``path``: its hash, size and mtime."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            st = os.stat(p)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = (hashlib.sha256(f.read()).hexdigest(), st.st_size,
                                                 st.st_mtime_ns)
    return out


def assert_serves_all(path: Path, expected: dict[bytes, bytes]) -> None:
    with tairstore.open(path, **OPTS) as s:
        for k, data in expected.items():
            view = s.get(k)
            assert view is not None, f"{k!r} was committed but is gone"
            assert bytes(view) == data
            view.release()


def check_m1_case(path: Path, expected: dict[bytes, bytes], problem: str) -> None:
    before = snapshot(path)
    with pytest.raises(MetadataMismatchError) as info:
        tairstore.open(path, **OPTS)
    assert isinstance(info.value, CorruptionError)
    assert info.value.problem == problem, str(info.value)
    assert f"tairstore fsck {path} --rebuild" in str(info.value)
    assert snapshot(path) == before, "a refused open changed files"
    assert main(["fsck", str(path), "--json"]) == EXIT_DAMAGE
    assert snapshot(path) == before, "fsck without flags changed files"
    assert main(["fsck", str(path), "--rebuild", "--json"]) == EXIT_OK
    assert_serves_all(path, expected)
    assert main(["fsck", str(path)]) == EXIT_OK


@pytest.fixture
def store40(tmp_path) -> tuple[Path, dict[bytes, bytes]]:
    """A cleanly closed store: 40 committed blocks, 5 deleted, one rewritten."""
    path = tmp_path / "s"
    write(path, range(N))
    with tairstore.open(path, **OPTS) as s:
        assert s.delete([key(i) for i in range(0, 10, 2)]) == 5
        assert s.put(key(0), payload(0, 2))
    expected = {key(i): payload(i) for i in range(N) if not (i < 10 and i % 2 == 0)}
    expected[key(0)] = payload(0, 2)
    return path, expected


def test_index_deleted(store40):
    path, expected = store40
    os.unlink(path / "index" / "data.mdb")
    check_m1_case(path, expected, "index-missing")


def test_index_emptied(store40):
    path, expected = store40
    os.truncate(path / "index" / "data.mdb", 0)
    check_m1_case(path, expected, "index-empty")


def test_index_foreign(store40, tmp_path):
    path, expected = store40
    other = tmp_path / "other"
    write(other, range(100, 110))
    shutil.copy(other / "index" / "data.mdb", path / "index" / "data.mdb")
    check_m1_case(path, expected, "index-foreign")


def test_index_stale(tmp_path):
    path = tmp_path / "s"
    write(path, range(20))
    old = (path / "index" / "data.mdb").read_bytes()
    write(path, range(20, N))
    (path / "index" / "data.mdb").write_bytes(old)
    check_m1_case(path, {key(i): payload(i) for i in range(N)}, "index-stale")


def test_index_truncated_is_refused_not_sigbus(store40):
    path, expected = store40
    size = os.path.getsize(path / "index" / "data.mdb")
    os.truncate(path / "index" / "data.mdb", size // 2)
    check_m1_case(path, expected, "index-damaged")


def test_index_values_flipped(store40):
    path, expected = store40
    index = Index(str(path / "index"))
    values = [encode_block(rec) for _, _, rec in index.items()]
    index.close()
    raw = bytearray((path / "index" / "data.mdb").read_bytes())
    flipped = 0
    for v in values[:10]:
        at = raw.find(v)
        while at >= 0:
            raw[at + 5] ^= 0x01  # bit 40 of the block size: 1 TiB more than the block holds
            flipped += 1
            at = raw.find(v, at + 1)
    assert flipped >= 10
    (path / "index" / "data.mdb").write_bytes(raw)
    check_m1_case(path, expected, "index-damaged")


_CRASH = textwrap.dedent("""
    import os, shutil, signal, sys
    import tairstore
    path = sys.argv[1]
    opts = dict(dram_bytes=0, ssd_bytes=64 << 20, durability="sync")
    s = tairstore.open(path, **opts)
    for i in range(20):
        s.put(b"blk-%04d" % i, bytes([(i * 7 + 1) % 251]) * 3000 + i.to_bytes(4, "little"))
    s._index.wait_applied()
    shutil.copy(os.path.join(path, "index", "data.mdb"), os.path.join(path, "snap.mdb"))
    for i in range(20, 40):
        s.put(b"blk-%04d" % i, bytes([(i * 7 + 1) % 251]) * 3000 + i.to_bytes(4, "little"))
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.fixture
def crashed(tmp_path) -> Path:
    """A store killed after 40 acknowledged sync puts, whose LMDB holds only the first 20:
    the WAL's tail holds the other 20 (a legitimate state after a crash)."""
    path = tmp_path / "s"
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(path)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    os.replace(path / "snap.mdb", path / "index" / "data.mdb")
    return path


def test_crashed_fixture_recovers_all(crashed):
    assert_serves_all(crashed, {key(i): payload(i) for i in range(N)})


def test_wal_damaged_mid_file(crashed):
    path = crashed
    wal = sorted((path / "wal").iterdir())[-1]
    raw = bytearray(wal.read_bytes())
    needle = (25).to_bytes(8, "little")  # the record with LSN 25 (a later put's COMMIT)
    at = raw.find(needle)
    assert at > 0
    raw[at + 20] ^= 0xFF  # its body: the checksum fails, later records stay valid
    wal.write_bytes(raw)
    report = fsck(str(path))
    assert report["wal_damaged"] and report["wal_commits_would_drop"] > 0
    check_m1_case(path, {key(i): payload(i) for i in range(N)}, "wal-damaged")
    assert any(p.startswith("lost") for p in os.listdir(path))


def test_eio_during_wal_replay_keeps_the_block(crashed):
    """Regression: an EIO while replay verifies a COMMIT's payload deleted the block from the
    index (ReadIOError was a CorruptionError, caught as one)."""
    assert not issubclass(ReadIOError, CorruptionError)
    assert not issubclass(SegmentGoneError, CorruptionError)
    fs = FaultFS(str(crashed))
    fs.fail_next("read", 5, count=10_000, path_contains="segments")  # EIO
    s = tairstore.open(crashed, fs=fs, **OPTS)
    try:
        assert s._counters["recovery_read_errors"] > 0
        assert s._counters["recovery_dropped"] == 0
        fs.clear_faults()
        assert bytes(s.get(key(30))) == payload(30)
    finally:
        s.close()
    assert_serves_all(crashed, {key(i): payload(i) for i in range(N)})


def test_fsck_keeps_unreadable_blocks(store40):
    path, expected = store40
    fs = FaultFS(str(path))
    fs.fail_next("read", 5, count=10_000, path_contains="segments")
    report = fsck(str(path), repair=True, fs=fs)
    assert report["blocks_unreadable"] > 0 and report["blocks_corrupt"] == 0
    assert_serves_all(path, expected)


def test_fsck_exit_code_when_it_cannot_run(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    assert main(["fsck", str(tmp_path / "f")]) == EXIT_FAILED
    assert main(["fsck", str(tmp_path / "nothing")]) == EXIT_FAILED


# -- typed errors of the open path -----------------------------------------------------------

def test_open_empty_and_nul_paths():
    with pytest.raises(InvalidArgumentError):
        tairstore.open("", **OPTS)
    with pytest.raises(InvalidArgumentError, match="NUL"):
        tairstore.open("/tmp/a\0b", **OPTS)


def test_open_under_a_file(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(DataDirError, match="file"):
        tairstore.open(tmp_path / "f" / "s", **OPTS)


def test_open_dangling_symlink(tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    with pytest.raises(DataDirError, match="symbolic link"):
        tairstore.open(tmp_path / "link", **OPTS)


_AS_OTHER = textwrap.dedent("""
    import sys
    import tairstore
    from tairstore.errors import DataDirPermissionError
    try:
        tairstore.open(sys.argv[1], dram_bytes=0, ssd_bytes=64 << 20).close()
        print("opened")
    except DataDirPermissionError as exc:
        print("DataDirPermissionError", exc)
    except BaseException as exc:
        print("untyped", type(exc).__name__, exc)
""")


@pytest.mark.parametrize("part", [".", "TAIRSTORE", "LOCK", "wal", "index", "index/data.mdb"])
def test_open_permission_denied(part):
    """Permission denied on the directory or a part of it is a DataDirPermissionError.

    As root (who ignores file modes) the open runs in a child process as ``nobody``."""
    base = tempfile.mkdtemp(prefix="tairstore-perm-")
    try:
        os.chmod(base, 0o755)
        path = os.path.join(base, "s")
        write(Path(path), range(3))
        root = os.geteuid() == 0
        if root:
            for d, dirs, files in os.walk(path):
                for name in [d] + [os.path.join(d, f) for f in files]:
                    os.chown(name, 65534, 65534)
        target = os.path.join(path, part)
        os.chmod(target, 0)
        if root:
            try:
                proc = subprocess.run(
                    [sys.executable, "-c", _AS_OTHER, path], capture_output=True, text=True,
                    user=65534, group=65534, env={**os.environ, "PYTHONPATH": os.getcwd()},
                    cwd=os.getcwd())
            except PermissionError:
                pytest.skip("running as root, and user nobody cannot run this interpreter")
            assert proc.stdout.startswith("DataDirPermissionError"), proc.stdout + proc.stderr
        else:
            with pytest.raises(DataDirPermissionError):
                tairstore.open(path, **OPTS)
    finally:
        for d, dirs, files in os.walk(base):
            os.chmod(d, 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_error_tree():
    assert issubclass(MetadataMismatchError, CorruptionError)
    assert issubclass(DataDirPermissionError, DataDirError)
    assert issubclass(DataDirError, StoreError)


def test_repair_moves_a_segment_with_unplaced_committed_records_to_lost(tmp_path):
    """An index that forgot a segment's blocks (but is otherwise consistent): --repair must not
    delete the segment that holds their only copies; it moves it to lost/."""
    path = tmp_path / "s"
    opts = dict(OPTS, ssd_bytes=8 << 20, segment_bytes=64 << 10)
    with tairstore.open(path, **opts) as s:
        for i in range(N):
            assert s.put(key(i), payload(i))
    index = Index(str(path / "index"))
    first = min(rec.segment for _, _, rec in index.items())
    forgotten = [(ns, k, None) for ns, k, rec in index.items() if rec.segment == first]
    index.apply(forgotten)
    index.close()
    seg_name = f"{first:012d}.seg"
    report = fsck(str(path), repair=True)
    assert not (path / "segments" / seg_name).exists()
    assert any(seg_name in p for p in report["moved_to_lost"]), report
    assert (path / "lost" / seg_name).exists()
