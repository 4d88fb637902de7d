"""``data.mdb`` is checked against its own meta page before LMDB maps it (no SIGBUS)."""

from __future__ import annotations

import os

import pytest

from tairstore.errors import CorruptionError
from tairstore.index.header import read_header
from tairstore.index.lmdb_index import Index
from tairstore.index.records import BlockRecord


def _index(path) -> str:
    index = Index(str(path))
    index.apply([("ns", b"k%d" % i, BlockRecord(10, 1, 1, 1, 1, 0, 60)) for i in range(2000)], lsn=3)
    index.close()
    return str(path)


def test_a_whole_file_passes_and_a_missing_one_is_none(tmp_path):
    h = read_header(_index(tmp_path / "i"))
    assert h is not None and h.page_size >= 512 and (h.last_page + 1) * h.page_size <= h.file_size
    assert read_header(str(tmp_path / "nothing")) is None


@pytest.mark.parametrize("keep", [0, 100, 4096 + 10, 0.5])
def test_short_or_empty_files_are_corruption(tmp_path, keep):
    d = _index(tmp_path / "i")
    size = os.path.getsize(os.path.join(d, "data.mdb"))
    os.truncate(os.path.join(d, "data.mdb"), int(size * keep) if isinstance(keep, float) else keep)
    with pytest.raises(CorruptionError):
        read_header(d)


def test_overwritten_meta_page_is_corruption(tmp_path):
    d = _index(tmp_path / "i")
    with open(os.path.join(d, "data.mdb"), "r+b") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(CorruptionError):
        read_header(d)
