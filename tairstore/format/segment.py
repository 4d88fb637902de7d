"""The record layout of SSD segment files — defined here and nowhere else.

A segment file (``<12-digit id>.seg``) is a sequence of records written back to back at the
offsets the segment log reserved for them. Every record describes itself, so an index can be
rebuilt from segment files alone::

    offset  size  field
    0       4     magic           u32 LE, the bytes b"TSKV"
    4       1     format_version  u8, = FORMAT_VERSION
    5       1     flags           u8, FLAG_* bits below
    6       1     ns_len          u8, 1..255 (bytes of the utf-8 namespace)
    7       1     key_len         u8, 1..64
    8       8     generation      u64 LE, orders the versions of one key: the highest wins
    16      4     raw_len         u32 LE, payload length after decoding
    20      4     stored_len      u32 LE, payload length on disk
    24      4     payload_crc     u32 LE, crc32c of the RAW (decoded) payload
    28      4     header_crc      u32 LE, crc32c of bytes 0..28 + namespace + key
    32      ns_len                namespace (utf-8)
    ..      key_len               key
    ..      stored_len            payload

``payload_crc`` is over the raw payload so that it equals the block checksum the store keeps in
its index and the WAL's COMMIT record: one number identifies the bytes in every tier, whatever
codec a tier applied.

The header crc covers the namespace and key, so a location that now points at a different
record (stale index, reused offsets after a bug) can never be mistaken for the one asked for:
the reader compares the verified namespace and key with the expected ones.

Flags:
    ``FLAG_ZSTD``      payload is one zstd frame; ``stored_len < raw_len``.
    ``FLAG_SHUFFLE2``  the raw payload was byte-plane shuffled (16-bit elements) before zstd;
                       only valid together with ``FLAG_ZSTD``.
    ``FLAG_TOMBSTONE`` a delete marker, ``raw_len == stored_len == 0``: an index rebuilt from
                       segments alone must not resurrect a deleted key.
    ``FLAG_COMMITTED`` the record's write session committed it. A two-phase write lays the
                       record down without it; ``finish_write`` rewrites the header in place
                       with it set (same length, new header crc) before logging COMMIT. An
                       index rebuilt from segments alone takes only committed records, so a
                       block its writer aborted is never resurrected.
Without flags the payload is stored as is and ``stored_len == raw_len``.

Records are not aligned; gaps between them (a reservation that was abandoned, or the unused
tail of one whose payload compressed) are zero bytes, never written. A record never starts with
a zero byte (the magic's first byte is ``T``), which is what lets a scan step over such gaps.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tairstore.errors import CorruptionError, InvalidArgumentError
from tairstore.format.checksum import crc32c
from tairstore.validate import MAX_KEY_BYTES, MAX_NAMESPACE_BYTES

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "FLAG_ZSTD",
    "FLAG_SHUFFLE2",
    "FLAG_TOMBSTONE",
    "FLAG_COMMITTED",
    "KNOWN_FLAGS",
    "HEADER_SIZE",
    "MAX_NAMESPACE_LEN",
    "MAX_KEY_LEN",
    "MAX_HEADER_LEN",
    "MAX_PAYLOAD_LEN",
    "RecordHeader",
    "encode_header",
    "decode_header",
    "record_length",
    "header_length",
]

_FIXED = struct.Struct("<IBBBBQIIII")
#: Bytes of the fixed part of a header.
HEADER_SIZE = _FIXED.size
assert HEADER_SIZE == 32
# The header crc covers everything before it: the fixed fields except the crc itself.
_CRC_COVERED = HEADER_SIZE - 4

#: b"TSKV" read as a little-endian u32; its first byte is non-zero (see the module docstring).
MAGIC = int.from_bytes(b"TSKV", "little")
#: The version this code writes; it reads this version only (older ones do not exist yet).
FORMAT_VERSION = 1

FLAG_ZSTD = 1
FLAG_SHUFFLE2 = 2
FLAG_TOMBSTONE = 4
FLAG_COMMITTED = 8
#: Any other bit set means a newer writer used a feature this reader does not know.
KNOWN_FLAGS = FLAG_ZSTD | FLAG_SHUFFLE2 | FLAG_TOMBSTONE | FLAG_COMMITTED

#: Namespace length limit (stored in a u8) and key length limit of the store (DESIGN: keys are
#: 1–64 bytes): :data:`tairstore.validate.MAX_NAMESPACE_BYTES` and ``MAX_KEY_BYTES``.
MAX_NAMESPACE_LEN = MAX_NAMESPACE_BYTES
MAX_KEY_LEN = MAX_KEY_BYTES
#: The longest header with namespace and key: reading this many bytes at a record start always
#: covers its whole header, so a scan needs one read per header.
MAX_HEADER_LEN = HEADER_SIZE + MAX_NAMESPACE_LEN + MAX_KEY_LEN
#: Payload lengths are stored in u32 fields.
MAX_PAYLOAD_LEN = 0xFFFFFFFF
_MAX_GENERATION = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """A decoded and verified record header (see the module docstring for the fields)."""

    format_version: int
    flags: int
    namespace: str
    key: bytes
    generation: int
    raw_len: int
    stored_len: int
    payload_crc: int
    header_crc: int

    @property
    def header_length(self) -> int:
        """Bytes from the record start to its payload."""
        return HEADER_SIZE + len(self.namespace.encode("utf-8")) + len(self.key)

    @property
    def length(self) -> int:
        """Bytes of the whole record on disk."""
        return self.header_length + self.stored_len

    @property
    def is_tombstone(self) -> bool:
        """True for a delete marker."""
        return bool(self.flags & FLAG_TOMBSTONE)

    @property
    def is_committed(self) -> bool:
        """True once the record's write session committed it."""
        return bool(self.flags & FLAG_COMMITTED)


def header_length(ns_len: int, key_len: int) -> int:
    """Bytes of a header with a namespace of ``ns_len`` and a key of ``key_len`` bytes."""
    return HEADER_SIZE + ns_len + key_len


def record_length(ns_len: int, key_len: int, stored_len: int) -> int:
    """Bytes of a whole record on disk."""
    return HEADER_SIZE + ns_len + key_len + stored_len


def _check_lengths_for_write(flags: int, ns: bytes, key: bytes, raw_len: int, stored_len: int):
    # The writer refuses what the reader would call corrupt, so a bug shows at the write.
    if not 1 <= len(ns) <= MAX_NAMESPACE_LEN:
        raise InvalidArgumentError(f"namespace must be 1..{MAX_NAMESPACE_LEN} utf-8 bytes")
    if not 1 <= len(key) <= MAX_KEY_LEN:
        raise InvalidArgumentError(f"key must be 1..{MAX_KEY_LEN} bytes, got {len(key)}")
    reason = _payload_shape_error(flags, raw_len, stored_len)
    if reason:
        raise InvalidArgumentError(reason)


def _payload_shape_error(flags: int, raw_len: int, stored_len: int) -> str:
    """Why the flags and lengths cannot belong together, or '' when they can."""
    if flags & ~KNOWN_FLAGS:
        return f"unknown flags 0x{flags:02x}"
    if flags & FLAG_TOMBSTONE:
        if flags & ~(FLAG_TOMBSTONE | FLAG_COMMITTED) or raw_len or stored_len:
            return "tombstone with payload or codec flags"
        return ""
    if flags & FLAG_SHUFFLE2 and not flags & FLAG_ZSTD:
        return "shuffle flag without zstd"
    if flags & FLAG_ZSTD:
        # The codec stores a payload compressed only when that made it strictly smaller.
        if not 0 < stored_len < raw_len:
            return f"compressed length {stored_len} not below raw length {raw_len}"
    elif stored_len != raw_len:
        return f"stored length {stored_len} != raw length {raw_len} without a codec"
    if raw_len > MAX_PAYLOAD_LEN:
        return f"payload length {raw_len} out of range"
    return ""


def encode_header(
    *,
    flags: int,
    namespace: bytes,
    key: bytes,
    generation: int,
    raw_len: int,
    stored_len: int,
    payload_crc: int,
) -> bytes:
    """The header bytes (fixed part, namespace, key) of one record.

    Raises:
        InvalidArgumentError: a length or flag combination the format cannot represent.
    """
    _check_lengths_for_write(flags, namespace, key, raw_len, stored_len)
    if not 0 <= generation <= _MAX_GENERATION:
        raise InvalidArgumentError(f"generation {generation} out of the u64 range")
    fixed = _FIXED.pack(
        MAGIC, FORMAT_VERSION, flags, len(namespace), len(key),
        generation, raw_len, stored_len, payload_crc & 0xFFFFFFFF, 0,
    )
    covered = fixed[:_CRC_COVERED]
    hcrc = crc32c(key, crc32c(namespace, crc32c(covered)))
    return b"".join((covered, hcrc.to_bytes(4, "little"), namespace, key))


def decode_header(buf) -> RecordHeader:
    """Parse and verify the header at the start of ``buf``.

    ``buf`` must hold at least the whole header (fixed part, namespace and key); bytes after it
    are ignored, so a caller may pass ``MAX_HEADER_LEN`` bytes read at a record start.

    Raises:
        CorruptionError: the message starts with the reason — ``truncated header``,
            ``bad magic``, ``newer format version``, ``bad lengths``, ``bad header crc``,
            ``bad flags``.
    """
    view = memoryview(buf).cast("B")
    if len(view) < HEADER_SIZE:
        raise CorruptionError(f"truncated header: {len(view)} of {HEADER_SIZE} bytes")
    (magic, version, flags, ns_len, key_len,
     generation, raw_len, stored_len, payload_crc, hcrc) = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise CorruptionError(f"bad magic 0x{magic:08x}")
    # The version is checked before the crc: a newer format may checksum differently, and
    # "written by a newer version" is the actionable message for that case.
    if version != FORMAT_VERSION:
        what = "newer format version" if version > FORMAT_VERSION else "bad format version"
        raise CorruptionError(f"{what} {version} (this reader knows {FORMAT_VERSION})")
    if ns_len == 0 or not 1 <= key_len <= MAX_KEY_LEN:
        raise CorruptionError(f"bad lengths: namespace {ns_len}, key {key_len}")
    end = HEADER_SIZE + ns_len + key_len
    if len(view) < end:
        raise CorruptionError(f"truncated header: {len(view)} of {end} bytes")
    want = crc32c(view[HEADER_SIZE:end], crc32c(view[:_CRC_COVERED]))
    if want != hcrc:
        raise CorruptionError(f"bad header crc: stored 0x{hcrc:08x}, computed 0x{want:08x}")
    # The crc matched, so what follows was written by a writer of this version; a check that
    # fails now means a writer bug, still reported as corruption rather than trusted.
    reason = _payload_shape_error(flags, raw_len, stored_len)
    if reason:
        raise CorruptionError(f"bad flags: {reason}")
    try:
        namespace = bytes(view[HEADER_SIZE:HEADER_SIZE + ns_len]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptionError(f"bad lengths: namespace is not utf-8 ({exc})") from None
    return RecordHeader(
        format_version=version,
        flags=flags,
        namespace=namespace,
        key=bytes(view[HEADER_SIZE + ns_len:end]),
        generation=generation,
        raw_len=raw_len,
        stored_len=stored_len,
        payload_crc=payload_crc,
        header_crc=hcrc,
    )
