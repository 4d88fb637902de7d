"""zstd compression and the 16-bit byte-plane shuffle."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tairstore.errors import CorruptionError
from tairstore.format.codec import compress, decompress_into, shuffle2, unshuffle2
from tairstore.format.segment import FLAG_SHUFFLE2, FLAG_ZSTD


def _fp16_page(n: int = 32768, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).normal(0, 1, n).astype(np.float16).tobytes()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 11, 4097])
def test_shuffle_round_trip_and_layout(n):
    src = bytes(range(256)) * (n // 256 + 1)
    src = src[:n]
    sh = shuffle2(src)
    pairs = n // 2
    assert sh[:pairs] == src[0:2 * pairs:2] and sh[pairs:2 * pairs] == src[1:2 * pairs:2]
    assert sh[2 * pairs:] == src[2 * pairs:]  # an odd trailing byte stays as is
    out = bytearray(n)
    unshuffle2(sh, out)
    assert out == src


def test_shuffle_helps_fp16():
    raw = _fp16_page()
    plain, f1 = compress(raw, 3, False)
    shuffled, f2 = compress(raw, 3, True)
    assert f2 == FLAG_ZSTD | FLAG_SHUFFLE2 and len(shuffled) < len(raw)
    if f1:  # zstd's entropy stage already finds much of it; shuffling must not hurt
        assert len(shuffled) <= len(plain)
    for stored, flags in ((plain, f1), (shuffled, f2)):
        if flags:
            out = bytearray(len(raw))
            assert decompress_into(stored, flags, out) == len(raw) and out == raw


def test_incompressible_stays_raw():
    raw = np.random.default_rng(1).bytes(65536)
    stored, flags = compress(raw, 3, True)
    assert flags == 0 and stored is raw


def test_tiny_payload_stays_raw():
    assert compress(b"aaaa", 3, False) == (b"aaaa", 0)


def test_garbage_frame_is_corruption():
    with pytest.raises(CorruptionError):
        decompress_into(b"\x28\xb5\x2f\xfdnot really zstd", FLAG_ZSTD, bytearray(100))
    with pytest.raises(CorruptionError):
        decompress_into(b"junk", FLAG_ZSTD, bytearray(100))


def test_frame_larger_than_buffer_is_corruption():
    stored, flags = compress(b"a" * 10000, 3, False)
    with pytest.raises(CorruptionError, match="declares"):
        decompress_into(stored, flags, bytearray(9999))


def test_truncated_frame_is_corruption():
    stored, flags = compress(b"ab" * 10000, 3, False)
    with pytest.raises(CorruptionError):
        decompress_into(stored[:-3], flags, bytearray(20000))


def test_threads_compress_independently():
    pages = [_fp16_page(8192, seed) for seed in range(8)]
    errors = []

    def work(page):
        try:
            for _ in range(20):
                stored, flags = compress(page, 1, True)
                out = bytearray(len(page))
                decompress_into(stored, flags, out)
                assert out == page
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in pages]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
