"""``tairstore fsck``: check a data directory, repair it, or rebuild its index.

- **check** opens the store (which runs normal recovery), then reads every indexed block back
  and verifies its crc32c, and adds up segment space: live bytes (records the index points at)
  and dead bytes (deleted, evicted, aborted or torn records awaiting compaction).
- **--repair** drops blocks that fail verification and deletes segments holding no live record.
- **--rebuild** throws the LMDB index away and rebuilds it from the segments alone: every
  record that verifies and was marked committed, the newest generation of each key winning, a
  tombstone hiding older records of its key. The WAL files still present are then replayed on
  top (their records are a suffix of history, so the result is the latest state).
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from tairstore.config import StoreConfig
from tairstore.engine.datadir import DataDir
from tairstore.errors import CorruptionError, StoreError
from tairstore.fileio import REAL_FS, FileSystem
from tairstore.format.segment import FLAG_COMMITTED, FLAG_TOMBSTONE
from tairstore.index.lmdb_index import META_FORMAT, Index
from tairstore.index.records import BlockRecord
from tairstore.wal import list_files

__all__ = ["fsck", "rebuild_index"]

log = logging.getLogger(__name__)

# fsck never writes blocks, so the capacity it opens the SSD tier with only has to be no less
# than what is on disk.
_UNBOUNDED = 1 << 62


def fsck(path: str, *, repair: bool = False, rebuild: bool = False, fs: FileSystem = REAL_FS) -> dict:
    """Check (and optionally repair or rebuild) the store in ``path``; return a report dict.

    ``report["ok"]`` is True when every indexed block verified.
    """
    from tairstore.engine.datadir import FORMAT_VERSION
    from tairstore.engine.store import Store

    rebuilt = rebuild_index(path, fs=fs) if rebuild else None
    store = Store(path, StoreConfig(dram_bytes=0, ssd_bytes=_UNBOUNDED, create=False, fs=fs,
                                    promote_on="never", segment_bytes=_UNBOUNDED >> 4,
                                    background=False))
    try:
        with store._lock:
            items = list(store._catalog.blocks.items())
        corrupt = []
        for (ns, key), b in items:
            buf = bytearray(b.size)
            seg, off, length = b.ssd
            try:
                store._ssd.read_into(seg, off, length, buf, namespace=ns, key=key, expected_crc=b.crc)
            except (CorruptionError, StoreError, OSError) as exc:
                log.error("block %s/%s: %s", ns, key.hex()[:16], exc)
                corrupt.append((ns, key))
        seg_stats = store._ssd.segment_stats()
        head = store._ssd.head_segment
        live: dict[int, int] = {}
        for (ns, key), b in items:
            live[b.ssd[0]] = live.get(b.ssd[0], 0) + b.ssd[2]
        tombs: dict[int, int] = {}
        for sid in seg_stats:
            for r in store._ssd.scan(sid, verify_payload=False, reporter=lambda n, why: None):
                if r.flags & FLAG_TOMBSTONE:
                    tombs[sid] = tombs.get(sid, 0) + r.location.length
        total = sum(s["total"] for s in seg_stats.values())
        live_bytes = sum(live.values())
        tomb_bytes = sum(tombs.values())
        # A segment with no live record and no tombstone holds nothing anyone needs: the
        # compactor reclaims it, and until then its bytes are orphaned.
        empty = [sid for sid in seg_stats
                 if sid != head and not live.get(sid) and not tombs.get(sid)]
        stray = _stray_files(store)
        report = {
            "ok": not corrupt,
            "format_version": FORMAT_VERSION,
            "blocks": len(items),
            "blocks_ok": len(items) - len(corrupt),
            "blocks_corrupt": len(corrupt),
            "segments": len(seg_stats),
            "segment_bytes": total,
            "live_bytes": live_bytes,
            "tombstone_bytes": tomb_bytes,
            "dead_bytes": total - live_bytes - tomb_bytes,
            "empty_segments": len(empty),
            "orphan_bytes": sum(seg_stats[s]["total"] for s in empty) + sum(stray.values()),
            "stray_files": sorted(stray),
            "wal_checkpoint_lsn": store._index.checkpoint_lsn(),
            "repaired": 0,
            "rebuilt_blocks": rebuilt,
        }
        if repair:
            for ns, key in corrupt:
                report["repaired"] += store.delete([key], namespace=ns)
            with store._lock:
                for sid in empty:
                    if not store._space.busy(sid):
                        store._ssd.delete_segment(sid)
                        report["repaired"] += 1
            report["ok"] = True
        return report
    finally:
        store.close()


def _stray_files(store) -> dict[str, int]:
    """Files in the data directory that no part of the store owns, with their sizes."""
    out = {}
    for sub, pattern in (("segments", r"^\d{12}\.seg$"), ("wal", r"^\d{20}\.wal$")):
        d = store._dir.sub(sub)
        for name in os.listdir(d):
            if not re.match(pattern, name):
                out[os.path.join(sub, name)] = os.path.getsize(os.path.join(d, name))
    return out


def rebuild_index(path: str, *, fs: FileSystem = REAL_FS) -> int:
    """Rebuild the LMDB index of the store in ``path`` from its segment files; return the blocks found."""
    from tairstore.tiers.ssd import SegmentLog

    ddir = DataDir(path, fs, create=False)
    try:
        ssd = SegmentLog(fs, ddir.sub("segments"), capacity_bytes=_UNBOUNDED)
        best: dict[tuple[str, bytes], tuple] = {}
        try:
            ssd.open()
            for sid in ssd.segment_ids():
                for r in ssd.scan(sid, reporter=lambda n, why, sid=sid: log.warning(
                        "segment %d: %d bytes dropped (%s)", sid, n, why)):
                    if not r.verified or not r.flags & (FLAG_COMMITTED | FLAG_TOMBSTONE):
                        continue
                    k = (r.namespace, r.key)
                    cur = best.get(k)
                    if cur is None or r.generation > cur[0]:
                        best[k] = (r.generation, r)
        finally:
            ssd.close()
        ops = []
        for (ns, key), (gen, r) in best.items():
            if r.flags & FLAG_TOMBSTONE:
                continue
            loc = r.location
            ops.append((ns, key, BlockRecord(r.raw_len, r.crc, gen, gen, loc.segment, loc.offset, loc.length)))
        # A fresh LMDB: the old one may be what is damaged.
        shutil.rmtree(ddir.sub("index"), ignore_errors=True)
        os.makedirs(ddir.sub("index"), exist_ok=True)
        from tairstore.engine.datadir import FORMAT_VERSION

        # The checkpoint sits just before the oldest WAL file still present, so the next open
        # replays every record that file set holds on top of what the segments said.
        files = list_files(fs, ddir.sub("wal"))
        checkpoint = files[0][0] - 1 if files else 0
        index = Index(ddir.sub("index"))
        try:
            index.apply(ops, lsn=checkpoint, meta={META_FORMAT: FORMAT_VERSION}, clear=True)
        finally:
            index.close()
        return len(ops)
    finally:
        ddir.close()
