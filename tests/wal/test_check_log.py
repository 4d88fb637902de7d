"""``check_log``: a torn tail is the end of the log; valid records after damage are damage."""

from __future__ import annotations

import os

from tairstore.fileio import REAL_FS
from tairstore.wal import Commit, CommitEntry, WalWriter, check_log, list_files


def _log(path, n: int = 10) -> str:
    d = str(path)
    w = WalWriter(REAL_FS, d, next_lsn=1)
    for i in range(n):
        lsn = w.append(Commit(1, (CommitEntry("ns", b"k%d" % i, 10, 1, i + 1, (1, 0, 60)),)))
        w.sync(lsn)
    w.close()
    return list_files(REAL_FS, d)[0][1]


def test_intact_log(tmp_path):
    _log(tmp_path)
    c = check_log(REAL_FS, str(tmp_path), from_lsn=1)
    assert not c.damaged and c.last_lsn == 10 and c.max_lsn == 10


def test_torn_tail_is_not_damage(tmp_path):
    f = _log(tmp_path)
    os.truncate(f, os.path.getsize(f) - 5)
    c = check_log(REAL_FS, str(tmp_path), from_lsn=1)
    assert not c.damaged and c.last_lsn == 9 and c.dropped_bytes > 0


def test_damage_followed_by_valid_records(tmp_path):
    f = _log(tmp_path)
    raw = bytearray(open(f, "rb").read())
    at = raw.find((4).to_bytes(8, "little"))
    raw[at + 12] ^= 0xFF
    open(f, "wb").write(raw)
    c = check_log(REAL_FS, str(tmp_path), from_lsn=1)
    assert c.damaged and c.last_lsn == 3 and c.valid_after == 6 and c.commits_after == 6
    assert c.max_lsn == 10
    # Damage below the checkpoint, with nothing valid above it, loses nothing.
    assert not check_log(REAL_FS, str(tmp_path), from_lsn=11).damaged
