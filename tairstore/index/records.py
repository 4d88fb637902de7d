"""The LMDB index's key and value layouts.

Databases inside the one LMDB environment:

``meta``
    ``format_version`` (u32), ``checkpoint_lsn`` (u64: every WAL record with an LSN at or below it
    is reflected in ``blocks``), ``created_ns`` (u64).
``blocks``
    key ``ns_len u8 | namespace utf-8 | block key`` → value :data:`BLOCK_VALUE` (below). Only
    blocks with a durable copy (an SSD record) are indexed; DRAM-only blocks are volatile.

Fixed-width little-endian values decode with one ``struct.unpack`` (no per-field Python work), so
reading 100,000 entries at open costs about 50 ms.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from tairstore.errors import CorruptionError
from tairstore.format.segment import header_length

__all__ = ["BlockRecord", "encode_key", "decode_key", "encode_block", "decode_block", "U64",
           "check_value"]

#: size, crc, generation, created_ns, segment, offset, record length.
BLOCK_VALUE = struct.Struct("<QIQQQQQ")
U64 = struct.Struct("<Q")


class BlockRecord(NamedTuple):
    """What the index knows about one durable block."""

    size: int
    crc: int
    generation: int
    created_ns: int
    segment: int
    offset: int
    length: int


def encode_key(namespace: str, key: bytes) -> bytes:
    """Index key of ``key`` in ``namespace``; the length prefix keeps namespaces apart."""
    ns = namespace.encode()
    return bytes((len(ns),)) + ns + key


_NS_CACHE: dict[bytes, str] = {}


def decode_key(raw: bytes) -> tuple[str, bytes]:
    """Inverse of :func:`encode_key`."""
    if not raw:
        raise CorruptionError("empty index key")
    n = raw[0]
    if len(raw) < 2 + n:
        raise CorruptionError("index key shorter than its namespace length")
    nsb = raw[1 : 1 + n]
    # A store has few namespaces and loads every key at open: decode each name once.
    ns = _NS_CACHE.get(nsb)
    if ns is None:
        try:
            ns = nsb.decode()
        except UnicodeDecodeError:
            raise CorruptionError(f"index key namespace {nsb!r} is not UTF-8") from None
        if len(_NS_CACHE) < 4096:
            _NS_CACHE[nsb] = ns
    return ns, raw[1 + n :]


def encode_block(rec: BlockRecord) -> bytes:
    """Pack a :class:`BlockRecord`."""
    return BLOCK_VALUE.pack(*rec)


def decode_block(raw: bytes) -> BlockRecord:
    """Unpack a :class:`BlockRecord`; a wrong length is corruption."""
    if len(raw) != BLOCK_VALUE.size:
        raise CorruptionError(f"index value of {len(raw)} bytes, expected {BLOCK_VALUE.size}")
    return BlockRecord._make(BLOCK_VALUE.unpack(raw))


def check_value(namespace: str, key: bytes, value: tuple, *, max_block_bytes: int,
                segment_sizes: dict[int, int]) -> str | None:
    """Why an index value cannot be right, or None when it is plausible.

    ``value`` is a :data:`BLOCK_VALUE` tuple. Nothing read from the index is used before this
    passes: the size is allocated by reads, and the location is read from a file. A plausible
    value may still name the wrong bytes; the segment record's own header and payload crc
    catch that on read. ``segment_sizes`` maps each existing segment to its file size; a
    segment not in it (or empty) is not judged here (recovery decides what a missing segment
    means).
    """
    size, _crc, generation, _created, seg, off, length = value
    if not 1 <= size <= max_block_bytes:
        return f"size {size} is outside 1..max_block_bytes={max_block_bytes}"
    if generation == 0:
        return "generation 0 is never assigned"
    try:
        hlen = header_length(len(namespace.encode()), len(key))
    except (ValueError, CorruptionError) as exc:
        return f"namespace or key cannot be stored ({exc})"
    # Stored payloads are at most the raw size (zstd is kept only when it shrinks the block).
    if not hlen < length <= hlen + size:
        return f"record length {length} is not consistent with a {size}-byte block"
    seg_size = segment_sizes.get(seg)
    # An empty segment file is as good as missing (open removes it): recovery decides.
    if seg_size and off + length > seg_size:
        return f"location {seg}:{off}+{length} runs past the segment's {seg_size} bytes"
    return None
