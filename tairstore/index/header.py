"""Checking LMDB's ``data.mdb`` against its own header before anything maps it.

LMDB maps its data file and trusts it: a file shorter than the pages its meta page names makes
the first access past the end a SIGBUS, which no ``try`` can catch. So before the index is
opened the file's two meta pages are read with plain ``pread`` and checked (LMDB's on-disk
layout, ``mdb.c``, 64-bit build)::

    page p at offset p * page_size, p in {0, 1}; page 0 is read at a guessed 4 KiB first
    offset  size  field
    0       8     mp_pgno         = p
    10      2     mp_flags        P_META (0x08)
    16      4     mm_magic        0xBEEFC0DE
    20      4     mm_version      1
    40      4     mm_dbs[FREE].md_pad   = page size
    136     8     mm_last_pg      the last page in use
    144     8     mm_txnid        the meta with the larger txnid is current

The current meta page's ``(last_pg + 1) * page_size`` must fit in the file. This catches an
emptied, truncated or overwritten file; damage inside the B-tree pages is LMDB's to report
(``lmdb.CorruptedError``), and the index layer turns that into a typed error too.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from tairstore.errors import CorruptionError

__all__ = ["DATA_FILE", "LmdbHeader", "read_header"]

DATA_FILE = "data.mdb"
_MAGIC = 0xBEEFC0DE
_VERSION = 1
_P_META = 0x08
_PAGE_HEAD = struct.Struct("<QHH")  # mp_pgno, mp_pad, mp_flags
_MAGIC_VERSION = struct.Struct("<II")
_U32 = struct.Struct("<I")
_LAST_TXN = struct.Struct("<QQ")
_META_END = 152
_PAGE_SIZES = tuple(1 << n for n in range(9, 17))  # 512 B .. 64 KiB, what LMDB accepts


class LmdbHeader(NamedTuple):
    """What the current meta page of ``data.mdb`` says."""

    page_size: int
    last_page: int
    txnid: int
    file_size: int


def _meta(buf: bytes, pgno: int) -> tuple[int, int, int] | None:
    """``(page_size, last_pg, txnid)`` of a valid meta page, else None."""
    if len(buf) < _META_END:
        return None
    got_pgno, _, flags = _PAGE_HEAD.unpack_from(buf, 0)
    magic, version = _MAGIC_VERSION.unpack_from(buf, 16)
    if got_pgno != pgno or not flags & _P_META or magic != _MAGIC or version != _VERSION:
        return None
    page_size = _U32.unpack_from(buf, 40)[0]
    if page_size not in _PAGE_SIZES:
        return None
    last_pg, txnid = _LAST_TXN.unpack_from(buf, 136)
    return page_size, last_pg, txnid


def read_header(index_dir: str) -> LmdbHeader | None:
    """Check ``index_dir/data.mdb`` against its header; None when the file does not exist.

    Raises:
        CorruptionError: the file is empty, shorter than its meta pages or than the pages the
            current meta page names, or neither meta page is valid.
        OSError: the file could not be read (the caller types it).
    """
    path = os.path.join(index_dir, DATA_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise CorruptionError(f"{path} is empty")
        first = _meta(os.pread(fd, _META_END, 0), 0)
        if first is None:
            raise CorruptionError(f"{path} does not start with an LMDB meta page")
        page_size = first[0]
        if size < 2 * page_size:
            raise CorruptionError(f"{path} is {size} bytes, shorter than its two meta pages")
        second = _meta(os.pread(fd, _META_END, page_size), 1)
        current = first if second is None or first[2] >= second[2] else second
        _, last_pg, txnid = current
        need = (last_pg + 1) * page_size
        if need > size:
            raise CorruptionError(
                f"{path} is {size} bytes but its meta page names {last_pg + 1} pages of "
                f"{page_size} bytes ({need} bytes): the file was truncated")
        return LmdbHeader(page_size, last_pg, txnid, size)
    finally:
        os.close(fd)
