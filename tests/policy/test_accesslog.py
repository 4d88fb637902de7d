"""The access log: round trip, rotation, a crash-truncated tail, corruption, and the replay of a
log through ``tairstore optimize --format tairstore-events``."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import xxhash

from tairstore.cli import main
from tairstore.errors import InvalidArgumentError
from tairstore.policy.accesslog import (
    MAGIC,
    AccessLogWriter,
    AccessRecord,
    load_access_log,
    log_files,
    read_access_log,
)
from tairstore.policy.traces import TraceFormatError, load_trace


def test_round_trip_with_int_and_bytes_keys(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    with AccessLogWriter(log) as w:
        w.record("ns", "gpu0", [1, 2, 3], input_tokens=1100, ts_ms=5)
        w.record("ns", "", [b"key-a", b"key-b"], ts_ms=6)
    assert list(read_access_log(log)) == [
        AccessRecord(5, "ns", "gpu0", 1100, [1, 2, 3]),
        AccessRecord(6, "ns", "", None, [xxhash.xxh64_intdigest(b"key-a"),
                                          xxhash.xxh64_intdigest(b"key-b")]),
    ]
    assert log.read_bytes().startswith(MAGIC)
    # Reopening appends; the header is not written twice.
    with AccessLogWriter(log) as w:
        w.record("ns", "gpu0", [1], ts_ms=7)
    assert [r.ts_ms for r in read_access_log(log)] == [5, 6, 7]


def test_rotation_keeps_backups_and_reads_oldest_first(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    with AccessLogWriter(log, max_bytes=200, backups=2) as w:
        for i in range(60):
            w.record("ns", "", list(range(i, i + 5)), ts_ms=i)
    files = log_files(log)
    assert [f.name for f in files] == ["a.log.2", "a.log.1", "a.log"]
    assert all(f.stat().st_size <= 200 for f in files)
    stamps = [r.ts_ms for r in read_access_log(log)]
    # The oldest files were dropped; what is left is the newest records, in order.
    assert stamps == list(range(stamps[0], 60)) and stamps[0] > 0


def test_a_record_cut_short_by_a_crash_is_ignored(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    with AccessLogWriter(log) as w:
        w.record("ns", "", [1, 2], ts_ms=1)
        w.record("ns", "", [3, 4], ts_ms=2)
    data = log.read_bytes()
    log.write_bytes(data[:-3])
    assert [r.ts_ms for r in read_access_log(log)] == [1]


def test_corruption_and_missing_logs_are_typed_errors(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    with pytest.raises(TraceFormatError, match="not found"):
        list(read_access_log(log))
    log.write_bytes(b"hello world\n")
    with pytest.raises(TraceFormatError, match="magic"):
        list(read_access_log(log))
    log.write_bytes(MAGIC + msgpack.packb([1, "ns", "", None, ["not", "ints"]]))
    with pytest.raises(TraceFormatError, match="not an access record"):
        list(read_access_log(log))
    log.write_bytes(MAGIC + msgpack.packb({"a": 1}))
    with pytest.raises(TraceFormatError):
        list(read_access_log(log))
    with pytest.raises(InvalidArgumentError):
        AccessLogWriter(log, max_bytes=3)
    with pytest.raises(InvalidArgumentError):
        AccessLogWriter(tmp_path / "b.log").record("ns", "", [-1])


def test_a_log_becomes_a_trace_with_one_key_space_per_group(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    with AccessLogWriter(log) as w:
        w.record("a", "", [7, 8], input_tokens=600, ts_ms=1000)
        w.record("b", "i1", [7, 8], ts_ms=2000)
        w.record("a", "", [7, 8, 9], ts_ms=4000)
    t = load_access_log(log)
    assert t.group_names == ["a", "b/i1"] and t.groups == [0, 1, 0]
    assert t.chains == [[0, 1], [2, 3], [0, 1, 4]]
    assert t.tokens[0] == [512, 88] and t.duration_s == 3.0
    assert load_trace(log, "tairstore-events").chains == t.chains


def test_optimize_reads_the_access_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "a.log"
    with AccessLogWriter(log) as w:
        for i in range(20):
            w.record("a", "", [1, 2, 3 + i], ts_ms=i)
            w.record("b", "", [1, 2], ts_ms=i)
    out = tmp_path / "r.csv"
    assert main(["optimize", "--trace", str(log), "--format", "tairstore-events",
                 "--policies", "lru", "--capacities", "64", "--groups",
                 "--output", str(out), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    # Group a hits its two shared blocks from the second request on; so does group b.
    lines = [ln.split() for ln in text.splitlines() if ln.strip().startswith("lru")]
    by_group = {ln[3]: (int(ln[4]), int(ln[5])) for ln in lines}
    assert by_group == {"*": (100, 76), "a": (60, 38), "b": (40, 38)}
