"""The WAL writer and reader on real files (pytest's tmp_path, real fsync).

``HookFS`` delegates every call to ``REAL_FS``. It only records the calls and, where a test
asks, injects a failure. Injected failures are the one fake allowed.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tairstore.errors import ClosedError, CorruptionError, FatalIOError, InvalidArgumentError
from tairstore.fileio import REAL_FS
from tairstore.format.checksum import crc32c, mask
from tairstore.format.wal import HEADER_SIZE, encode_record
from tairstore.wal import Abort, Commit, CommitEntry, Delete, Prepare, WalWriter, read_log, scan_end
from tairstore.wal.reader import list_files, wal_file_name
from tairstore.wal.records import encode


class HookFile:
    def __init__(self, fs: HookFS, f) -> None:
        self._fs, self._f, self.path = fs, f, f.path

    def pwrite(self, data, offset):
        self._fs.events.append(("pwrite", os.path.basename(self.path)))
        if self._fs.fail_pwrite:
            raise OSError(errno.ENOSPC, "injected", self.path)
        return self._f.pwrite(data, offset)

    def fsync(self):
        self._fs.events.append(("fsync", os.path.basename(self.path)))
        self._fs.fsyncs += 1
        if self._fs.fail_fsync:
            raise OSError(errno.EIO, "injected", self.path)
        self._f.fsync()

    def __getattr__(self, name):
        return getattr(self._f, name)


class HookFS:
    """A real file system that counts and records calls, and fails on request."""

    def __init__(self, *, fail_fsync: bool = False, fail_pwrite: bool = False) -> None:
        self.events: list[tuple[str, str]] = []
        self.fsyncs = 0
        self.fail_fsync, self.fail_pwrite = fail_fsync, fail_pwrite

    def open(self, path, *, create=False, readonly=False):
        self.events.append(("open" if not create else "create", os.path.basename(path)))
        return HookFile(self, REAL_FS.open(path, create=create, readonly=readonly))

    def fsync_dir(self, path):
        self.events.append(("fsync_dir", ""))
        REAL_FS.fsync_dir(path)

    def __getattr__(self, name):
        return getattr(REAL_FS, name)


def rec(i: int) -> Delete:
    return Delete("ns", (b"key-%d" % i,))


def write_log(d: Path, n: int, *, next_lsn: int = 1, **kw) -> list[int]:
    with WalWriter(REAL_FS, str(d), next_lsn=next_lsn, **kw) as w:
        lsns = [w.append(rec(next_lsn + i)) for i in range(n)]
        w.sync(w.last_lsn)
    return lsns


def replay(d: Path, **kw):
    drops: list[tuple[int, str]] = []
    r = read_log(REAL_FS, str(d), reporter=lambda n, why: drops.append((n, why)), **kw)
    return list(r), drops, r


def wal_files(d: Path) -> list[Path]:
    return [Path(p) for _, p in list_files(REAL_FS, str(d))]


def frame_size(i: int) -> int:
    return HEADER_SIZE + len(encode(rec(i))[1])


# --- round trips ----------------------------------------------------------------------------


def test_empty_directory_replays_nothing(tmp_path):
    got, drops, r = replay(tmp_path / "missing")
    assert got == [] and drops == [] and r.next_lsn == 1
    assert scan_end(REAL_FS, str(tmp_path)) == 0


def test_every_record_type_round_trips(tmp_path):
    recs = [
        Prepare(1, "ns", (b"a", b"b"), (10, 20)),
        Commit(
            1, (CommitEntry("ns", b"a", 10, 7, 1, (3, 0, 64)), CommitEntry("ns", b"b", 20, 8, 1))
        ),
        Abort(2),
        Delete("ns", (b"a",)),
    ]
    with WalWriter(REAL_FS, str(tmp_path), next_lsn=1) as w:
        for r in recs:
            w.append(r)
        w.sync(4)
        assert w.durable_lsn == w.written_lsn == w.last_lsn == 4
    got, drops, r = replay(tmp_path)
    assert got == list(zip(range(1, 5), recs)) and drops == [] and r.next_lsn == 5


def test_reading_across_file_rolls(tmp_path):
    write_log(tmp_path, 40, file_bytes=200)
    files = wal_files(tmp_path)
    assert len(files) > 3 and all(f.stat().st_size <= 200 for f in files)
    got, drops, _ = replay(tmp_path)
    assert [lsn for lsn, _ in got] == list(range(1, 41)) and drops == []
    assert [r for _, r in got] == [rec(i) for i in range(1, 41)]


def test_from_lsn_filters_and_skips_older_files(tmp_path):
    write_log(tmp_path, 40, file_bytes=200)
    fs = HookFS()
    r = read_log(fs, str(tmp_path), from_lsn=30)
    assert [lsn for lsn, _ in r] == list(range(30, 41)) and r.next_lsn == 41
    assert ("open", wal_file_name(1)) not in fs.events


def test_writer_starts_a_new_file_and_never_appends_to_an_old_one(tmp_path):
    write_log(tmp_path, 3)
    (old,) = wal_files(tmp_path)
    before = old.read_bytes()
    write_log(tmp_path, 2, next_lsn=4)
    assert old.read_bytes() == before
    assert [f.name for f in wal_files(tmp_path)] == [wal_file_name(1), wal_file_name(4)]
    assert [lsn for lsn, _ in replay(tmp_path)[0]] == [1, 2, 3, 4, 5]


# --- named corruption cases, on files -------------------------------------------------------


def mutate(path: Path, fn) -> None:
    buf = bytearray(path.read_bytes())
    fn(buf)
    path.write_bytes(bytes(buf))


def shrink(n: int):
    def fn(buf):
        del buf[len(buf) - n :]

    return fn


def raw_file(d: Path, first_lsn: int, frames: list[bytes]) -> Path:
    d.mkdir(exist_ok=True)
    path = d / wal_file_name(first_lsn)
    path.write_bytes(b"".join(frames))
    return path


def frame(i: int, rtype: int | None = None, body: bytes | None = None) -> bytes:
    t, b = encode(rec(i))
    raw = bytearray(encode_record(t, i, b if body is None else body))
    if rtype is not None:  # a type no writer emits, with a checksum that still holds
        raw[8] = rtype
        raw[0:4] = mask(crc32c(bytes(raw[4:]))).to_bytes(4, "little")
    return bytes(raw)


def test_truncated_trailing_record_is_ignored(tmp_path):
    write_log(tmp_path, 5)
    (f,) = wal_files(tmp_path)
    mutate(f, shrink(3))
    got, drops, r = replay(tmp_path)
    assert [lsn for lsn, _ in got] == [1, 2, 3, 4] and r.next_lsn == 5
    left = frame_size(5) - 3
    body = frame_size(5) - HEADER_SIZE
    assert drops == [(left, f"{f.name}: truncated record (length {body}, {left} bytes left)")]


@pytest.mark.parametrize(
    "name, edit, reason",
    [
        ("checksum mismatch", lambda b: b.__setitem__(0, b[0] ^ 1), "checksum mismatch"),
        ("flipped header byte", lambda b: b.__setitem__(10, b[10] ^ 4), "checksum mismatch"),
        ("flipped body byte", lambda b: b.__setitem__(-1, b[-1] ^ 4), "checksum mismatch"),
        ("bad length, too large", lambda b: b.__setitem__(7, 0xFF), "bad length"),
        ("bad length, beyond end", lambda b: b.__setitem__(5, 0x01), "truncated record"),
    ],
)
def test_corrupt_last_record_ends_the_log(tmp_path, name, edit, reason):
    write_log(tmp_path, 1)
    write_log(tmp_path, 1, next_lsn=2)  # a second file, so the damage is mid-chain
    first = wal_files(tmp_path)[0]
    mutate(first, edit)
    got, drops, r = replay(tmp_path)
    assert got == [] and r.next_lsn == 1
    assert drops[0][0] == first.stat().st_size and reason in drops[0][1]
    assert "after the end of the log" in drops[1][1]  # the gap drops the later file too


def test_zero_filled_tail(tmp_path):
    write_log(tmp_path, 2)
    (f,) = wal_files(tmp_path)
    mutate(f, lambda b: b.extend(bytes(4096)))
    got, drops, _ = replay(tmp_path)
    assert len(got) == 2 and drops == [(4096, f"{f.name}: zero-filled tail")]


def test_file_shorter_than_a_header(tmp_path):
    write_log(tmp_path, 3)
    raw_file(tmp_path, 4, [b"\x07" * 10])  # a new file, torn in its first header
    got, drops, r = replay(tmp_path)
    assert len(got) == 3 and r.next_lsn == 4
    assert drops == [(10, f"{wal_file_name(4)}: truncated header")]


def test_unknown_record_type_with_valid_crc(tmp_path):
    raw_file(tmp_path, 1, [frame(1), frame(2, rtype=9), frame(3)])
    got, drops, r = replay(tmp_path)
    assert [lsn for lsn, _ in got] == [1] and r.next_lsn == 2
    assert drops[0][0] == len(frame(2)) + len(frame(3)) and "unknown record type 9" in drops[0][1]


def test_garbage_msgpack_body_with_valid_crc(tmp_path):
    raw_file(tmp_path, 1, [frame(1), frame(2, body=b"\xc1\x00garbage"), frame(3)])
    got, drops, r = replay(tmp_path)
    assert [lsn for lsn, _ in got] == [1] and r.next_lsn == 2
    assert "malformed body at LSN 2" in drops[0][1]


def test_lsn_not_previous_plus_one(tmp_path):
    raw_file(tmp_path, 1, [frame(1), frame(3), frame(4)])
    got, drops, _ = replay(tmp_path)
    assert [lsn for lsn, _ in got] == [1]
    dropped = len(frame(3)) + len(frame(4))
    assert drops == [(dropped, f"{wal_file_name(1)}: LSN 3 where 2 was expected")]


def test_lsn_gap_between_files_ends_the_log(tmp_path):
    write_log(tmp_path, 3)
    write_log(tmp_path, 2, next_lsn=10)
    got, drops, r = replay(tmp_path)
    assert [lsn for lsn, _ in got] == [1, 2, 3] and r.next_lsn == 4
    (size, why), = drops
    assert size == (tmp_path / wal_file_name(10)).stat().st_size
    assert "expected LSN 4, file starts at 10" in why


def test_continuation_into_a_new_file_after_a_torn_tail(tmp_path):
    write_log(tmp_path, 5)
    mutate(wal_files(tmp_path)[0], shrink(3))
    _, _, r = replay(tmp_path)
    assert r.next_lsn == 5
    with WalWriter(REAL_FS, str(tmp_path), next_lsn=r.next_lsn) as w:
        assert [w.append(Abort(i)) for i in range(3)] == [5, 6, 7]
    got, drops, r = replay(tmp_path)
    assert [lsn for lsn, _ in got] == list(range(1, 8)) and r.next_lsn == 8
    assert [rc for _, rc in got[4:]] == [Abort(0), Abort(1), Abort(2)]
    assert drops == [(frame_size(5) - 3, f"{wal_file_name(1)}: superseded by {wal_file_name(5)}")]


def test_stale_files_beyond_a_restart_are_moved_aside(tmp_path):
    write_log(tmp_path, 12, file_bytes=200)
    (_, first), (second, _), *_ = list_files(REAL_FS, str(tmp_path))
    k = second - 1  # the last LSN of the first file
    mutate(Path(first), lambda b: b.__setitem__(-1, b[-1] ^ 1))  # damage LSN k
    _, _, r = replay(tmp_path)
    assert r.next_lsn == k
    write_log(tmp_path, 2, next_lsn=k)  # takes LSNs k, k+1: must not splice into old k+2...
    got, _, r = replay(tmp_path)
    assert [lsn for lsn, _ in got] == list(range(1, k + 2)) and r.next_lsn == k + 2
    stale = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".wal.stale"))
    assert stale and stale[0] == wal_file_name(second) + ".stale"


def test_truncate_before_removes_only_whole_old_files(tmp_path):
    with WalWriter(REAL_FS, str(tmp_path), next_lsn=1, file_bytes=200) as w:
        for i in range(40):
            w.append(rec(i + 1))
        w.sync(40)
        firsts = [first for first, _ in list_files(REAL_FS, str(tmp_path))]
        w.truncate_before(21)
        left = [first for first, _ in list_files(REAL_FS, str(tmp_path))]
        # Kept: the file holding LSN 21 and everything after it.
        assert left == [f for f in firsts if f >= max(x for x in firsts if x <= 21)]
        w.truncate_before(10**6)
        assert len(list_files(REAL_FS, str(tmp_path))) == 1  # never the current file
        w.append(rec(41))
    assert [lsn for lsn, _ in replay(tmp_path, from_lsn=41)[0]] == [41]
    with pytest.raises(CorruptionError):
        replay(tmp_path, from_lsn=21)  # those records are gone


def test_next_lsn_is_never_below_from_lsn(tmp_path):
    write_log(tmp_path, 3)
    _, _, r = replay(tmp_path, from_lsn=100)  # a checkpoint ahead of a lost unsynced tail
    assert r.next_lsn == 100 and r.last_lsn == 3


# --- property: replaying a damaged log ------------------------------------------------------


_PRISTINE: dict[str, bytes] = {}


def pristine() -> dict[str, bytes]:
    if not _PRISTINE:
        with tempfile.TemporaryDirectory() as d:
            write_log(Path(d), 30, file_bytes=300)
            for _, p in list_files(REAL_FS, d):
                _PRISTINE[Path(p).name] = Path(p).read_bytes()
    return _PRISTINE


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 9), st.integers(0, 400), st.integers(0, 255)), max_size=3
    ),
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 60)), max_size=2),
)
def test_replay_of_a_damaged_log_yields_a_valid_prefix(edits, cuts):
    files = {name: bytearray(data) for name, data in pristine().items()}
    names = sorted(files)
    for which, pos, byte in edits:
        buf = files[names[which % len(names)]]
        buf[pos % len(buf)] = byte
    for which, n in cuts:
        buf = files[names[which % len(names)]]
        del buf[max(0, len(buf) - n) :]
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            Path(d, name).write_bytes(bytes(data))
        drops: list[int] = []
        r = read_log(REAL_FS, d, reporter=lambda n, why: drops.append(n))
        got = list(r)
    # Only consecutive LSNs from the start, each the record originally written there.
    assert [lsn for lsn, _ in got] == list(range(1, len(got) + 1))
    assert [rc for _, rc in got] == [rec(i) for i in range(1, len(got) + 1)]
    assert r.next_lsn == len(got) + 1
    # Every byte is either replayed or reported.
    replayed = sum(frame_size(lsn) for lsn, _ in got)
    assert replayed + sum(drops) == sum(len(b) for b in files.values())


# --- the writer: group commit, durability modes, failures -----------------------------------


def test_group_commit_from_many_threads(tmp_path):
    fs = HookFS()
    w = WalWriter(fs, str(tmp_path), next_lsn=1, file_bytes=4096)
    threads, per_thread = 8, 25
    got: dict[int, list[int]] = {}

    def worker(t: int) -> None:
        mine = got.setdefault(t, [])
        for i in range(per_thread):
            lsn = w.append(Prepare(t, "ns", (b"k",), (i,)))
            w.sync(lsn)
            assert w.durable_lsn >= lsn
            mine.append(lsn)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    total = threads * per_thread
    assert sorted(x for lsns in got.values() for x in lsns) == list(range(1, total + 1))
    assert all(lsns == sorted(lsns) for lsns in got.values())
    data_fsyncs = fs.fsyncs
    w.close()
    assert data_fsyncs < total  # followers rode along with a leader's fsync
    replayed = dict(replay(tmp_path)[0])
    for t, lsns in got.items():
        expected = [Prepare(t, "ns", (b"k",), (i,)) for i in range(per_thread)]
        assert [replayed[lsn] for lsn in lsns] == expected


def test_batch_mode_makes_records_durable_without_sync(tmp_path):
    fs = HookFS()
    with WalWriter(fs, str(tmp_path), next_lsn=1, durability="batch", batch_interval_s=0.005) as w:
        last = [w.append(rec(i)) for i in range(1, 11)][-1]
        deadline = time.monotonic() + 30.0  # generous: the flusher thread may be starved
        while w.durable_lsn < last and time.monotonic() < deadline:
            time.sleep(0.002)
        assert w.durable_lsn == last and fs.fsyncs >= 1
        assert [lsn for lsn, _ in replay(tmp_path)[0]] == list(range(1, 11))
        lsn = w.append(rec(11))
        w.sync(lsn)  # still blocks until durable for callers that want it
        assert w.durable_lsn >= lsn


def test_none_mode_writes_but_never_fsyncs_records(tmp_path):
    fs = HookFS()
    with WalWriter(fs, str(tmp_path), next_lsn=1, durability="none", file_bytes=200) as w:
        for i in range(1, 21):
            w.append(rec(i))
        w.sync(20)
        assert w.written_lsn == 20 and w.durable_lsn == 0
    assert fs.fsyncs == 0
    assert len(replay(tmp_path)[0]) == 20


def test_flush_hands_records_to_the_os_without_fsync(tmp_path):
    fs = HookFS()
    with WalWriter(fs, str(tmp_path), next_lsn=7) as w:
        w.append(rec(7))
        w.flush()
        assert (w.written_lsn, w.durable_lsn, fs.fsyncs) == (7, 6, 0)
        assert [lsn for lsn, _ in replay(tmp_path)[0]] == [7]


def test_pre_sync_runs_before_the_wal_write_and_fsync(tmp_path):
    fs = HookFS()
    def pre_sync() -> None:
        fs.events.append(("pre_sync", ""))

    with WalWriter(fs, str(tmp_path), next_lsn=1, pre_sync=pre_sync) as w:
        w.sync(w.append(rec(1)))
    kinds = [k for k, _ in fs.events]
    assert kinds.index("pre_sync") < kinds.index("pwrite") < kinds.index("fsync")


def test_batch_acknowledgements_never_wait_behind_the_background_segment_fsync(tmp_path):
    # The background flush of batch mode pays the segment fsync (pre_sync) in its sync phase;
    # a write_through (what a batch-mode commit acknowledges after) arriving meanwhile hands
    # its records to the OS without waiting for it. pre_sync blocks here until released; the
    # 60 s bounds are only there so a regression fails instead of hanging.
    fs = HookFS()
    entered, release = threading.Event(), threading.Event()
    calls = []

    def pre_sync() -> None:
        calls.append(threading.current_thread().name)
        fs.events.append(("pre_sync", ""))
        entered.set()
        release.wait(60)

    w = WalWriter(fs, str(tmp_path), next_lsn=1, durability="batch", batch_interval_s=0.001,
                  pre_sync=pre_sync)
    try:
        w.append(rec(1))
        assert entered.wait(60), "the background flush never ran"
        lsn = w.append(rec(2))
        done = threading.Thread(target=w.write_through, args=(lsn,))
        done.start()
        done.join(60)
        blocked = done.is_alive()
        release.set()
        done.join()
        assert not blocked, "write_through waited for the background segment fsync"
        assert w.written_lsn >= 2
        assert calls and set(calls) == {"tairstore-wal"}
    finally:
        release.set()
        w.close()
    # The fsync that made records durable still came after the segment fsync that covers them.
    kinds = [k for k, _ in fs.events]
    assert kinds.index("pre_sync") < kinds.index("fsync")
    assert [lsn for lsn, _ in replay(tmp_path)[0]] == [1, 2]


def test_roll_fsyncs_the_old_file_and_the_directory_first(tmp_path):
    fs = HookFS()
    with WalWriter(fs, str(tmp_path), next_lsn=1, file_bytes=100) as w:
        for i in range(1, 9):
            w.append(rec(i))
        w.sync(8)  # one batch, split at record boundaries across several files
    files = wal_files(tmp_path)
    assert len(files) > 2
    for old, new in zip(files, files[1:]):
        i = fs.events.index(("create", new.name))
        assert fs.events[i - 1] == ("fsync", old.name)
        assert fs.events[i + 1] == ("fsync_dir", "")
        assert fs.events.index(("pwrite", new.name)) > i + 1
    assert [lsn for lsn, _ in replay(tmp_path)[0]] == list(range(1, 9))


def test_fsync_failure_poisons_the_writer(tmp_path):
    fs = HookFS(fail_fsync=True)
    w = WalWriter(fs, str(tmp_path), next_lsn=1)
    lsn = w.append(rec(1))
    with pytest.raises(FatalIOError) as info:
        w.sync(lsn)
    assert isinstance(info.value.__cause__, OSError)
    fs.fail_fsync = False  # a later fsync "succeeding" proves nothing: it must not be tried
    with pytest.raises(FatalIOError):
        w.append(rec(2))
    with pytest.raises(FatalIOError) as again:
        w.sync(lsn)
    assert isinstance(again.value.__cause__, OSError)
    assert fs.fsyncs == 1
    w.close()  # already reported: close does not raise again
    assert fs.fsyncs == 1


def test_write_failure_poisons_the_writer(tmp_path):
    fs = HookFS(fail_pwrite=True)
    w = WalWriter(fs, str(tmp_path), next_lsn=1)
    w.append(rec(1))
    with pytest.raises(FatalIOError):
        w.flush()
    with pytest.raises(FatalIOError):
        w.append(rec(2))
    w.close()


def test_pre_sync_failure_poisons_the_writer(tmp_path):
    def boom() -> None:
        raise OSError(errno.EIO, "segment fsync failed")

    w = WalWriter(REAL_FS, str(tmp_path), next_lsn=1, pre_sync=boom)
    with pytest.raises(FatalIOError):
        w.sync(w.append(rec(1)))
    with pytest.raises(FatalIOError):
        w.append(rec(2))
    w.close()


def test_failed_close_reports_once(tmp_path):
    fs = HookFS()
    w = WalWriter(fs, str(tmp_path), next_lsn=1)
    w.append(rec(1))
    fs.fail_fsync = True
    with pytest.raises(FatalIOError):
        w.close()
    w.close()


def test_operations_after_close_raise_closed_error(tmp_path):
    w = WalWriter(REAL_FS, str(tmp_path), next_lsn=1, durability="batch")
    lsn = w.append(rec(1))
    w.close()
    w.close()  # idempotent
    ops = (lambda: w.append(rec(2)), lambda: w.sync(lsn), w.flush, lambda: w.truncate_before(1))
    for op in ops:
        with pytest.raises(ClosedError):
            op()
    assert w.durable_lsn == lsn  # close made the buffer durable


def test_bad_arguments(tmp_path):
    with pytest.raises(InvalidArgumentError):
        WalWriter(REAL_FS, str(tmp_path), next_lsn=0)
    with pytest.raises(InvalidArgumentError):
        WalWriter(REAL_FS, str(tmp_path), next_lsn=1, durability="fast")
    with WalWriter(REAL_FS, str(tmp_path), next_lsn=1) as w:
        with pytest.raises(InvalidArgumentError):
            w.sync(1)  # never appended
        with pytest.raises(InvalidArgumentError):
            w.append("not a record")
        assert w.last_lsn == 0


def test_a_raising_reporter_makes_replay_strict(tmp_path):
    write_log(tmp_path, 3)
    mutate(wal_files(tmp_path)[0], shrink(1))

    def strict(dropped: int, reason: str) -> None:
        raise CorruptionError(reason)

    with pytest.raises(CorruptionError, match="truncated record"):
        list(read_log(REAL_FS, str(tmp_path), reporter=strict))
