"""Optional payload compression for the SSD tier: zstd, with a byte-plane shuffle first.

KV-cache pages are mostly fp16/bf16 values. Their high bytes (sign, exponent) repeat a lot and
their low bytes look random; interleaved, zstd sees noise. ``shuffle2`` puts all low bytes first
and all high bytes after (Blosc's "shuffle" for 2-byte elements), so the high-byte plane
compresses well. Compression is only kept when it makes the payload strictly smaller; otherwise
the payload is stored raw with no flags, and reading it costs nothing extra.

zstd contexts are not thread-safe, so each thread keeps its own (``threading.local``).
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

from tairstore.errors import CorruptionError, InvalidArgumentError
from tairstore.format.segment import FLAG_SHUFFLE2, FLAG_ZSTD

__all__ = ["shuffle2", "unshuffle2", "compress", "decompress_into", "MIN_COMPRESS_LEN"]

#: Below this a zstd frame header and the call overhead outweigh any saving.
MIN_COMPRESS_LEN = 64

_local = threading.local()


def _cctx(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    ctx = cache.get(level)
    if ctx is None:
        # write_content_size (the default) lets the reader check the decoded size against its
        # buffer before decompressing anything.
        ctx = cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=False)
    return ctx


def _dctx() -> zstandard.ZstdDecompressor:
    ctx = getattr(_local, "dctx", None)
    if ctx is None:
        ctx = _local.dctx = zstandard.ZstdDecompressor()
    return ctx


def shuffle2(src) -> bytes:
    """Byte planes of 16-bit elements: all low bytes, then all high bytes.

    An odd trailing byte stays at the end as is.
    """
    a = np.frombuffer(src, dtype=np.uint8)
    pairs = len(a) // 2
    out = np.empty(len(a), dtype=np.uint8)
    out[:pairs] = a[0:2 * pairs:2]
    out[pairs:2 * pairs] = a[1:2 * pairs:2]
    out[2 * pairs:] = a[2 * pairs:]
    return out.tobytes()


def unshuffle2(src, out) -> None:
    """Invert :func:`shuffle2`: write the interleaved bytes of ``src`` into ``out``.

    ``out`` is a writable buffer of at least ``len(src)`` bytes.
    """
    a = np.frombuffer(src, dtype=np.uint8)
    n = len(a)
    dst = np.frombuffer(out, dtype=np.uint8, count=n)
    pairs = n // 2
    dst[0:2 * pairs:2] = a[:pairs]
    dst[1:2 * pairs:2] = a[pairs:2 * pairs]
    dst[2 * pairs:n] = a[2 * pairs:]


def compress(raw, level: int, shuffle: bool):
    """Compress ``raw`` for storage.

    Returns:
        ``(stored, flags)``: the zstd frame and ``FLAG_ZSTD`` (``| FLAG_SHUFFLE2`` if shuffled),
        or ``(raw, 0)`` unchanged when compression does not make it strictly smaller.
    """
    view = memoryview(raw).cast("B")
    if len(view) < MIN_COMPRESS_LEN:
        return raw, 0
    flags = FLAG_ZSTD
    src = view
    if shuffle:
        src = shuffle2(view)
        flags |= FLAG_SHUFFLE2
    stored = _cctx(level).compress(src)
    if len(stored) >= len(view):
        return raw, 0
    return stored, flags


def decompress_into(stored, flags: int, out) -> int:
    """Decode ``stored`` (encoded with ``flags``) into the writable buffer ``out``.

    Returns:
        The number of raw bytes written.

    Raises:
        CorruptionError: the frame does not decode, or decodes to more than ``len(out)``.
        InvalidArgumentError: ``flags`` carry no codec (the caller should copy instead).
    """
    if not flags & FLAG_ZSTD:
        raise InvalidArgumentError("decompress_into needs FLAG_ZSTD")
    dst = memoryview(out).cast("B")
    try:
        size = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise CorruptionError(f"bad zstd frame: {exc}") from None
    # Check the declared size before decoding: a damaged frame must not make us allocate or
    # write past the caller's buffer.
    if size < 0 or size > len(dst):
        raise CorruptionError(f"zstd frame declares {size} bytes, buffer holds {len(dst)}")
    try:
        data = _dctx().decompress(stored, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CorruptionError(f"zstd decode failed: {exc}") from None
    if len(data) != size:
        raise CorruptionError(f"zstd frame decoded to {len(data)} bytes, declared {size}")
    if flags & FLAG_SHUFFLE2:
        unshuffle2(data, dst)
    else:
        dst[:size] = data
    return size
