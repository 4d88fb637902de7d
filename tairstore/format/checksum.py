"""CRC-32C (Castagnoli) helpers.

``crc32c`` uses the SSE4.2 / ARMv8 instruction through the ``crc32c`` package, so checksumming
runs at memory speed and every byte the store writes or returns can afford one.
"""

from __future__ import annotations

from crc32c import crc32c as _crc32c

__all__ = ["crc32c", "mask", "unmask"]

# Masking (as LevelDB does) keeps a CRC stored next to data from looking like a valid CRC of
# data that itself contains CRCs, e.g. a WAL record whose payload embeds other checksums.
_MASK_DELTA = 0xA282EAD8


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of a bytes-like object, continuing from ``value``."""
    return _crc32c(data, value)


def mask(crc: int) -> int:
    """Return the masked form of ``crc`` for storage."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    """Invert :func:`mask`."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF
