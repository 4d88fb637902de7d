"""The fault-injecting file layer itself: what survives a simulated crash, and injected faults."""

from __future__ import annotations

import errno
import os

import pytest

from tairstore.fuzz.faultfs import ALL_KINDS, FaultFS, SimulatedCrash


def _fs(tmp_path, seed: int = 0) -> tuple[FaultFS, str]:
    root = tmp_path / "root"
    root.mkdir()
    return FaultFS(str(root), seed), str(root)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_synced_write_survives_and_unsynced_write_is_dropped(tmp_path):
    fs, root = _fs(tmp_path)
    f = fs.open(os.path.join(root, "a"), create=True)
    f.pwrite(b"durable", 0)
    f.fsync()
    fs.fsync_dir(root)
    f.pwrite(b"XXXXXXXlost", 0)
    fs.materialise(fate="drop")
    assert _read(os.path.join(root, "a")) == b"durable"


def test_kept_write_survives(tmp_path):
    fs, root = _fs(tmp_path)
    f = fs.open(os.path.join(root, "a"), create=True)
    fs.fsync_dir(root)
    f.pwrite(b"kept", 0)
    fs.materialise(fate="keep")
    assert _read(os.path.join(root, "a")) == b"kept"


def test_torn_write_keeps_a_prefix(tmp_path):
    fs, root = _fs(tmp_path, seed=3)
    f = fs.open(os.path.join(root, "a"), create=True)
    fs.fsync_dir(root)
    data = bytes(range(256)) * 8
    f.pwrite(data, 0)
    fs.materialise(fate="torn")
    got = _read(os.path.join(root, "a"))
    assert got != data
    # Whatever landed starts with a prefix of the write; the rest is zeros, garbage or nothing.
    n = next((i for i, (a, b) in enumerate(zip(got, data)) if a != b), min(len(got), len(data)))
    assert n < len(data)


def test_created_file_without_directory_fsync_vanishes(tmp_path):
    fs, root = _fs(tmp_path)
    f = fs.open(os.path.join(root, "new"), create=True)
    f.pwrite(b"data", 0)
    f.fsync()  # the data is durable, the name is not
    fs.materialise(fate="drop")
    assert not os.path.exists(os.path.join(root, "new"))


def test_rename_and_unlink_revert_without_directory_fsync(tmp_path):
    fs, root = _fs(tmp_path)
    for name in ("a", "b"):
        f = fs.open(os.path.join(root, name), create=True)
        f.pwrite(name.encode(), 0)
        f.fsync()
        f.close()
    fs.fsync_dir(root)
    fs.rename(os.path.join(root, "a"), os.path.join(root, "c"))
    fs.unlink(os.path.join(root, "b"))
    fs.materialise(fate="drop")
    assert sorted(os.listdir(root)) == ["a", "b"]
    assert _read(os.path.join(root, "b")) == b"b"


def test_rename_over_a_file_reverts_to_the_old_file(tmp_path):
    fs, root = _fs(tmp_path)
    for name, body in (("t", b"old"), ("t.tmp", b"new")):
        f = fs.open(os.path.join(root, name), create=True)
        f.pwrite(body, 0)
        f.fsync()
    fs.fsync_dir(root)
    fs.rename(os.path.join(root, "t.tmp"), os.path.join(root, "t"))
    fs.materialise(fate="drop")
    assert _read(os.path.join(root, "t")) == b"old"
    assert _read(os.path.join(root, "t.tmp")) == b"new"


def test_crash_at_the_nth_point_and_every_later_operation_fails(tmp_path):
    fs, root = _fs(tmp_path)
    f = fs.open(os.path.join(root, "a"), create=True)
    fs.arm_crash(2, ALL_KINDS)
    f.pwrite(b"1", 0)
    with pytest.raises(SimulatedCrash):
        f.pwrite(b"2", 1)
    with pytest.raises(SimulatedCrash):
        f.pread(1, 0)
    with pytest.raises(SimulatedCrash):
        fs.listdir(root)
    assert fs.injected["crash"] == 1
    f.close()  # closing changes nothing on disk and stays allowed


def test_injected_enospc_fails_the_write_without_touching_the_file(tmp_path):
    fs, root = _fs(tmp_path)
    f = fs.open(os.path.join(root, "a"), create=True)
    fs.fail_next("write", errno.ENOSPC)
    with pytest.raises(OSError) as info:
        f.pwrite(b"data", 0)
    assert info.value.errno == errno.ENOSPC
    assert f.size() == 0
    f.pwrite(b"data", 0)  # one failure only
    assert fs.injected["enospc"] == 1


def test_flipped_bit_changes_what_is_read_not_the_disk(tmp_path):
    fs, root = _fs(tmp_path)
    f = fs.open(os.path.join(root, "a"), create=True)
    f.pwrite(bytes(64), 0)
    fs.flip_next_read()
    flipped = f.pread(64, 0)
    assert sum(bin(b).count("1") for b in flipped) == 1
    assert f.pread(64, 0) == bytes(64)


def test_same_seed_same_image(tmp_path):
    images = []
    for run in range(2):
        root = tmp_path / f"r{run}"
        root.mkdir()
        fs = FaultFS(str(root), seed=42)
        f = fs.open(str(root / "a"), create=True)
        for i in range(20):
            f.pwrite(bytes([i]) * 700, i * 700)
        fs.materialise()
        images.append(_read(str(root / "a")) if os.path.exists(root / "a") else None)
    assert images[0] == images[1]
