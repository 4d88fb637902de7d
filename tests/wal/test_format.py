"""The WAL frame codec and record bodies, on in-memory buffers.

Corruption cases are named after what they model and built from tiny byte mutators, as in
LevelDB's log_test; the same cases are replayed from real files in test_log.py.
"""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tairstore.errors import CorruptionError, InvalidArgumentError
from tairstore.format.checksum import crc32c, mask
from tairstore.format.wal import (
    HEADER,
    HEADER_SIZE,
    MAX_BODY_LENGTH,
    FrameDecoder,
    RecordType,
    encode_record,
)
from tairstore.wal.records import Abort, Commit, CommitEntry, Delete, Prepare, decode, encode

SAMPLES = [
    Prepare(7, "ns", (b"k1", b"k2"), (65536, 8 << 20)),
    Prepare(0, "", (), ()),
    Commit(
        7,
        (
            CommitEntry("ns", b"k1", 65536, 0xDEADBEEF, 3, (12, 4096, 65600)),
            CommitEntry("ns", b"\x00" * 64, 8 << 20, 0, (1 << 64) - 1, None),
        ),
    ),
    Commit(8, ()),
    Abort(9),
    Delete("tenant-\u00e9", (b"x",)),
]


# --- byte mutators --------------------------------------------------------------------------


def log_of(*recs, first_lsn: int = 1) -> bytearray:
    """A buffer holding ``recs`` framed with consecutive LSNs."""
    out = bytearray()
    for i, rec in enumerate(recs):
        rtype, body = encode(rec)
        out += encode_record(rtype, first_lsn + i, body)
    return out


def increment_byte(buf: bytearray, offset: int, delta: int = 1) -> None:
    buf[offset] = (buf[offset] + delta) & 0xFF


def set_u32(buf: bytearray, offset: int, value: int) -> None:
    struct.pack_into("<I", buf, offset, value)


def fix_checksum(buf: bytearray, record_offset: int) -> None:
    """Recompute the crc of the record at ``record_offset`` after a deliberate edit."""
    _, length, _, _ = HEADER.unpack_from(buf, record_offset)
    end = min(len(buf), record_offset + HEADER_SIZE + length)
    set_u32(buf, record_offset, mask(crc32c(bytes(buf[record_offset + 4 : end]))))


def frames(buf) -> tuple[list, FrameDecoder]:
    dec = FrameDecoder(buf)
    return list(dec), dec


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("rec", SAMPLES, ids=lambda r: type(r).__name__)
def test_every_record_type_round_trips(rec):
    rtype, body = encode(rec)
    assert decode(rtype, body) == rec
    (frame,), dec = frames(encode_record(rtype, 42, body))
    assert (frame.type, frame.lsn, bytes(frame.body)) == (rtype, 42, body)
    assert dec.reason is None and dec.dropped == 0


def test_header_layout_is_17_bytes_little_endian():
    raw = encode_record(RecordType.ABORT, 0x0102030405060708, b"\x91\x05")
    assert len(raw) == HEADER_SIZE + 2
    crc, length, rtype, lsn = HEADER.unpack_from(raw)
    assert (length, rtype, lsn) == (2, 3, 0x0102030405060708)
    assert raw[9:17] == bytes.fromhex("0807060504030201")
    assert crc == mask(crc32c(raw[4:]))  # covers length, type, lsn and body


def test_lists_are_accepted_and_stored_as_tuples():
    rec = Prepare(1, "ns", [b"a"], [3])
    assert rec.keys == (b"a",) and rec.sizes == (3,)
    assert hash(rec) == hash(Prepare(1, "ns", (b"a",), (3,)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Prepare(1, "ns", (b"a",), ()),  # keys and sizes differ
        lambda: Prepare(-1, "ns", (), ()),
        lambda: Prepare(True, "ns", (), ()),  # bool is not an int here
        lambda: Delete("ns", (b"",)),
        lambda: Delete("ns", (b"x" * 65,)),
        lambda: Delete("ns", ("str-key",)),
        lambda: CommitEntry("ns", b"k", 1, 1 << 32, 0),  # crc is u32
        lambda: CommitEntry("ns", b"k", 1, 0, 0, (1, 2)),
        lambda: Commit(1, ("not an entry",)),
        lambda: Abort(1 << 64),
    ],
)
def test_invalid_records_are_refused_at_construction(make):
    with pytest.raises(InvalidArgumentError):
        make()


def test_encode_refuses_non_records_and_bad_frames():
    with pytest.raises(InvalidArgumentError):
        encode("hello")
    with pytest.raises(InvalidArgumentError):
        encode_record(0, 1, b"")
    with pytest.raises(InvalidArgumentError):
        encode_record(RecordType.ABORT, 0, b"")  # LSN 0 is never assigned


# --- named corruption cases -----------------------------------------------------------------


def test_truncated_trailing_record_is_ignored():
    buf = log_of(Abort(1), Abort(2))
    second = len(buf) // 2
    for cut in range(1, len(buf) - second):
        got, dec = frames(buf[:-cut])
        assert [f.lsn for f in got] == [1]
        assert dec.offset == second and dec.dropped == len(buf) - second - cut
        expected = "truncated header" if len(buf) - cut - second < HEADER_SIZE else "truncated"
        assert dec.reason.startswith(expected)


def test_bad_length_too_large():
    buf = log_of(Abort(1))
    set_u32(buf, 4, MAX_BODY_LENGTH + 1)
    fix_checksum(buf, 0)
    got, dec = frames(buf)
    assert got == [] and dec.reason.startswith("bad length") and dec.dropped == len(buf)


def test_bad_length_beyond_end():
    buf = log_of(Abort(1), Abort(2))
    set_u32(buf, 4, 1000)
    got, dec = frames(buf)
    assert got == [] and dec.reason.startswith("truncated record")


def test_bad_length_inside_buffer_is_a_checksum_mismatch():
    buf = log_of(Abort(1), Abort(2))
    increment_byte(buf, 4)  # body length 2 -> 3: still inside the buffer
    got, dec = frames(buf)
    assert got == [] and dec.reason == "checksum mismatch"


def test_checksum_mismatch():
    buf = log_of(Abort(1), Abort(2))
    increment_byte(buf, len(buf) // 2)  # the second record's crc
    got, dec = frames(buf)
    assert [f.lsn for f in got] == [1] and dec.reason == "checksum mismatch"


@pytest.mark.parametrize("offset", [8, 9, 16], ids=["type", "lsn-low", "lsn-high"])
def test_flipped_byte_in_header(offset):
    buf = log_of(Delete("ns", (b"k",)))
    buf[offset] ^= 0x10
    got, dec = frames(buf)
    assert got == [] and dec.reason == "checksum mismatch"


def test_flipped_byte_in_body():
    buf = log_of(Delete("ns", (b"k",)))
    buf[-1] ^= 0x01
    got, dec = frames(buf)
    assert got == [] and dec.reason == "checksum mismatch"


def test_zero_filled_tail():
    buf = log_of(Abort(1)) + bytes(4096)
    got, dec = frames(buf)
    assert [f.lsn for f in got] == [1]
    assert dec.reason == "zero-filled tail" and dec.dropped == 4096


def test_short_zero_tail():
    got, dec = frames(log_of(Abort(1)) + bytes(5))
    assert len(got) == 1 and dec.reason == "zero-filled tail" and dec.dropped == 5


def test_buffer_shorter_than_a_header():
    got, dec = frames(b"\x01" * (HEADER_SIZE - 1))
    assert got == [] and dec.reason == "truncated header" and dec.dropped == HEADER_SIZE - 1


def test_unknown_record_type_with_valid_crc():
    buf = log_of(Abort(1))
    buf[8] = 9
    fix_checksum(buf, 0)
    got, dec = frames(buf)
    assert got == [] and dec.reason == "unknown record type 9"


@pytest.mark.parametrize(
    "rtype, body",
    [
        (RecordType.ABORT, b"\xc1"),  # a byte msgpack never uses
        (RecordType.ABORT, b"\x92\x01"),  # truncated array
        (RecordType.ABORT, b"\x91\x01\x01"),  # extra data after the value
        (RecordType.ABORT, msgpack.packb([1, 2])),  # wrong arity
        (RecordType.ABORT, msgpack.packb({"session": 1})),
        (RecordType.ABORT, msgpack.packb([True])),
        (RecordType.DELETE, msgpack.packb(["ns", ["str-key"]])),  # str where bin belongs
        (RecordType.DELETE, b"\x92\xa2\xff\xfe\x90"),  # invalid UTF-8 namespace
        (RecordType.COMMIT, msgpack.packb([1, [["ns", b"k", 1, 2, 3, [1, 2]]]])),
        (RecordType.COMMIT, b"\x92\x01" + b"\x91" * 5000),  # deep nesting
        (RecordType.ABORT, msgpack.packb([msgpack.ExtType(5, b"x")])),
        (99, msgpack.packb([1])),
    ],
)
def test_garbage_body_with_valid_crc_is_corruption(rtype, body):
    with pytest.raises(CorruptionError):
        decode(rtype, body)


# --- property: the decoder never does anything but yield valid frames or stop ----------------


def check_decoder(buf) -> None:
    dec = FrameDecoder(buf)
    pos = 0
    for frame in dec:
        assert frame.offset == pos and frame.end > pos
        # Every frame yielded re-encodes to exactly the bytes it came from.
        assert encode_record(frame.type, frame.lsn, frame.body) == bytes(buf[pos : frame.end])
        try:
            decode(frame.type, frame.body)
        except CorruptionError:
            pass
        pos = frame.end
    assert dec.offset == pos and dec.dropped == len(buf) - pos
    assert (dec.reason is None) == (pos == len(buf))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_decoder_on_arbitrary_bytes(data):
    check_decoder(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.integers(0, 64),
    st.booleans(),
)
def test_decoder_on_mutated_logs(recs, edits, cut, refix):
    buf = log_of(*recs)
    for pos, byte in edits:
        buf[pos % len(buf)] = byte
    if refix:
        fix_checksum(buf, 0)  # the nastiest case: a damaged first record that checks out
    check_decoder(buf[: max(0, len(buf) - cut)])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(RecordType) + [0, 5, 255]), st.binary(max_size=256))
def test_body_decoder_raises_only_corruption(rtype, body):
    try:
        rec = decode(rtype, body)
    except CorruptionError:
        return
    assert encode(rec)[0] == rtype
