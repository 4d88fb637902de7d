"""The segment record layout: encoding, decoding and every way decoding refuses bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tairstore.errors import CorruptionError, InvalidArgumentError
from tairstore.format.checksum import crc32c
from tairstore.format.segment import (
    FLAG_SHUFFLE2, FLAG_TOMBSTONE, FLAG_ZSTD, FORMAT_VERSION, HEADER_SIZE, MAX_HEADER_LEN,
    decode_header, encode_header, header_length, record_length,
)


def _header(**kw) -> bytes:
    args = dict(flags=0, namespace=b"tenant", key=b"k" * 16, generation=7, raw_len=100,
                stored_len=100, payload_crc=0x1234)
    args.update(kw)
    return encode_header(**args)


def _refix_crc(buf: bytearray) -> bytearray:
    """Recompute the header crc after a mutation, so a later check is the one that fires."""
    ns_len, key_len = buf[6], buf[7]
    crc = crc32c(bytes(buf[HEADER_SIZE:HEADER_SIZE + ns_len + key_len]), crc32c(bytes(buf[:28])))
    buf[28:32] = crc.to_bytes(4, "little")
    return buf


def test_round_trip():
    h = decode_header(_header() + b"payload follows")
    assert (h.namespace, h.key, h.generation, h.raw_len, h.stored_len, h.payload_crc) == (
        "tenant", b"k" * 16, 7, 100, 100, 0x1234)
    assert h.format_version == FORMAT_VERSION and h.flags == 0 and not h.is_tombstone
    assert h.header_length == header_length(6, 16) == len(_header())
    assert h.length == record_length(6, 16, 100)


def test_fixed_header_is_32_bytes_little_endian():
    buf = _header(generation=0x0102030405060708)
    assert buf[:4] == b"TSKV" and HEADER_SIZE == 32
    assert struct.unpack_from("<Q", buf, 8)[0] == 0x0102030405060708


def test_compressed_and_tombstone_round_trip():
    h = decode_header(_header(flags=FLAG_ZSTD | FLAG_SHUFFLE2, stored_len=40))
    assert h.flags == FLAG_ZSTD | FLAG_SHUFFLE2 and h.stored_len == 40
    t = decode_header(_header(flags=FLAG_TOMBSTONE, raw_len=0, stored_len=0, payload_crc=0))
    assert t.is_tombstone


@pytest.mark.parametrize("kw", [
    dict(namespace=b""), dict(namespace=b"n" * 256), dict(key=b""), dict(key=b"k" * 65),
    dict(flags=0x10), dict(flags=FLAG_SHUFFLE2), dict(flags=FLAG_ZSTD, stored_len=100),
    dict(stored_len=99), dict(flags=FLAG_TOMBSTONE), dict(generation=-1),
    dict(generation=1 << 64),
])
def test_encode_refuses_what_decode_would_call_corrupt(kw):
    with pytest.raises(InvalidArgumentError):
        _header(**kw)


# Named corruption cases, each a tiny mutator of a valid header (LevelDB log_test style).
def _flip(i):
    def mutate(b):
        b[i] ^= 0x40
        return b
    return mutate


CASES = {
    "shorter than a fixed header": (lambda b: b[:HEADER_SIZE - 1], "truncated header"),
    "namespace cut off": (lambda b: b[:HEADER_SIZE + 2], "truncated header"),
    "bad magic": (lambda b: b"XXXX" + b[4:], "bad magic"),
    "newer format version": (lambda b: _refix_crc(b[:4] + bytes([2]) + b[5:]),
                             "newer format version"),
    "version zero": (lambda b: _refix_crc(b[:4] + bytes([0]) + b[5:]), "bad format version"),
    "zero namespace length": (lambda b: _refix_crc(b[:6] + bytes([0]) + b[7:]), "bad lengths"),
    "key too long": (lambda b: _refix_crc(b[:7] + bytes([65]) + b[8:]), "bad lengths"),
    "flipped generation": (_flip(9), "bad header crc"),
    "flipped raw length": (_flip(17), "bad header crc"),
    "flipped payload crc": (_flip(25), "bad header crc"),
    "flipped header crc": (_flip(29), "bad header crc"),
    "flipped namespace byte": (_flip(HEADER_SIZE + 1), "bad header crc"),
    "flipped key byte": (_flip(HEADER_SIZE + 7), "bad header crc"),
    "unknown flag with good crc": (lambda b: _refix_crc(b[:5] + bytes([0x80]) + b[6:]),
                                   "bad flags"),
    "stored != raw with good crc": (lambda b: _refix_crc(b[:20] + b"\x05\0\0\0" + b[24:]),
                                    "bad flags"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_named_corruption(name):
    mutate, reason = CASES[name]
    with pytest.raises(CorruptionError, match=f"^{reason}"):
        decode_header(bytes(mutate(bytearray(_header()))))


def test_bad_utf8_namespace_with_good_crc():
    buf = _refix_crc(bytearray(_header(namespace=b"ab")))
    buf[HEADER_SIZE] = 0xFF
    with pytest.raises(CorruptionError, match="bad lengths"):
        decode_header(bytes(_refix_crc(buf)))


def _check_decoded(buf: bytes) -> None:
    """decode_header either raises CorruptionError or returns a header that re-encodes exactly."""
    try:
        h = decode_header(buf)
    except CorruptionError:
        return
    again = encode_header(flags=h.flags, namespace=h.namespace.encode(), key=h.key,
                          generation=h.generation, raw_len=h.raw_len, stored_len=h.stored_len,
                          payload_crc=h.payload_crc)
    assert buf[:len(again)] == again


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_HEADER_LEN + 8))
def test_decode_arbitrary_bytes(buf):
    _check_decoded(buf)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_mutated_header(data):
    base = bytearray(_header(namespace=data.draw(st.binary(min_size=1, max_size=8)).hex().encode()
                             or b"n"))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        base = _refix_crc(base)  # make the later checks the ones that must hold
    cut = data.draw(st.integers(0, len(base)))
    _check_decoded(bytes(base[:cut] if data.draw(st.booleans()) else base))
