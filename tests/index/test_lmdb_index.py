"""The LMDB index: layouts, checkpoints, the writer thread and a map that grows by itself."""

from __future__ import annotations

import threading

import pytest

from tairstore.errors import CorruptionError, FatalIOError
from tairstore.index.lmdb_index import Index
from tairstore.index.records import BlockRecord, decode_block, decode_key, encode_block, encode_key


def rec(i: int) -> BlockRecord:
    return BlockRecord(4096 + i, i & 0xFFFFFFFF, 1000 + i, 2000 + i, 1 + i % 7, 64 * i, 4200)


def test_key_and_value_layouts_round_trip():
    k = encode_key("tenant-α", b"\x00\x01key")
    assert decode_key(k) == ("tenant-α", b"\x00\x01key")
    assert encode_key("a", b"bc") != encode_key("ab", b"c")  # the length prefix keeps them apart
    assert decode_block(encode_block(rec(5))) == rec(5)
    with pytest.raises(CorruptionError):
        decode_block(b"short")
    with pytest.raises(CorruptionError):
        decode_key(b"")
    with pytest.raises(CorruptionError):
        decode_key(bytes([9]) + b"ab")


def test_apply_sets_checkpoint_and_items(tmp_path):
    ix = Index(str(tmp_path / "ix"))
    assert ix.checkpoint_lsn() == 0 and ix.count() == 0
    ix.apply([("ns", b"a", rec(1)), ("ns", b"b", rec(2))], lsn=7)
    ix.apply([("ns", b"a", None)], lsn=9)
    assert ix.checkpoint_lsn() == 9
    assert [(ns, k) for ns, k, _ in ix.items()] == [("ns", b"b")]
    assert [v for _, _, v in ix.raw_items()] == [tuple(rec(2))]
    ix.close()
    ix = Index(str(tmp_path / "ix"))
    assert ix.checkpoint_lsn() == 9 and ix.count() == 1
    ix.close()


def test_map_grows_by_itself(tmp_path):
    ix = Index(str(tmp_path / "ix"), map_size=256 << 10)  # far too small for what follows
    ix.apply([("ns", i.to_bytes(8, "little") * 4, rec(i)) for i in range(20_000)], lsn=1)
    assert ix.count() == 20_000
    ix.close()


def test_writer_applies_in_lsn_order_after_the_log_is_durable(tmp_path):
    ix = Index(str(tmp_path / "ix"))
    durable_asked: list[int] = []
    checkpoints: list[int] = []
    ix.start_writer(before_commit=durable_asked.append, on_checkpoint=checkpoints.append)
    for lsn in range(1, 201):
        key = (lsn % 10).to_bytes(2, "little")
        ix.enqueue(lsn, [("ns", key, rec(lsn))] if lsn % 3 else [("ns", key, None)])
    assert ix.wait_applied(200, timeout=60)  # generous: the writer thread may be starved
    ix.close()
    # Each batch asked for durability up to its last LSN before committing it.
    assert durable_asked == sorted(durable_asked) and durable_asked[-1] == 200
    assert checkpoints[-1] == 200
    ix = Index(str(tmp_path / "ix"))
    assert ix.checkpoint_lsn() == 200
    # The last operation on each key won: a put unless its last LSN was a multiple of 3.
    present = {k for _, k, _ in ix.items()}
    for kk in range(10):
        last = max(lsn for lsn in range(1, 201) if lsn % 10 == kk)
        assert (kk.to_bytes(2, "little") in present) == bool(last % 3)
    ix.close()


def test_writer_failure_is_reported_not_swallowed(tmp_path):
    ix = Index(str(tmp_path / "ix"))

    def fail(lsn: int) -> None:
        raise OSError(5, "simulated WAL fsync failure")

    ix.start_writer(before_commit=fail)
    ix.enqueue(1, [("ns", b"k", rec(1))])
    with pytest.raises(FatalIOError):
        ix.wait_applied(1, timeout=60)  # generous: the writer thread may be starved
    assert isinstance(ix.failure, OSError)
    # Nothing reached LMDB: the log was never durable.
    ix.close()
    ix = Index(str(tmp_path / "ix"))
    assert ix.count() == 0 and ix.checkpoint_lsn() == 0
    ix.close()


def test_namespace_settings_persist(tmp_path):
    ix = Index(str(tmp_path / "ix"))
    ix.set_namespace("a", {"total_bytes": 5, "tier_bytes": {"dram": 2}, "ttl_s": None})
    ix.close()
    ix = Index(str(tmp_path / "ix"))
    assert ix.namespaces() == {"a": {"total_bytes": 5, "tier_bytes": {"dram": 2}, "ttl_s": None}}
    ix.close()


def test_concurrent_enqueue_is_safe(tmp_path):
    ix = Index(str(tmp_path / "ix"))
    ix.start_writer(before_commit=lambda lsn: None)
    lock = threading.Lock()
    counter = iter(range(1, 10_001))

    def worker() -> None:
        for _ in range(500):
            # Callers enqueue in LSN order: the store does it under one lock.
            with lock:
                lsn = next(counter)
                ix.enqueue(lsn, [("ns", lsn.to_bytes(4, "little"), rec(lsn))])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ix.wait_applied(2000, timeout=60)  # generous: the writer thread may be starved
    assert ix.count() == 2000
    ix.close()
