"""``tairstore fsck``: check a data directory, repair it, or rebuild its index.

- **check** (no flag) only reads: the open-time consistency check
  (:mod:`tairstore.engine.consistency`: identity, index against its header, WAL against the
  index's checkpoint, WAL damage and how many committed records replay would drop), then every
  segment is scanned and every index entry is checked against the record it names. LMDB is
  opened read-only without its lock file, the WAL is not truncated, no file is created,
  changed or removed. ``report["ok"]`` is True only when the store is consistent.
- **--repair** needs consistent metadata (else it changes nothing and says to rebuild): it
  drops index entries whose record is damaged (an entry whose read failed with an I/O error
  is kept and reported), and reclaims segments holding no live record — deleting one only when
  every committed record in it is placed (its key is indexed or tombstoned at a newer or equal
  generation), otherwise moving it to ``DIR/lost/``.
- **--rebuild** makes a new LMDB index from the segments alone: every record that verifies and
  was marked committed, the newest generation of each key winning, a tombstone hiding older
  records of its key. The old index moves to ``DIR/lost/``. An intact WAL is replayed on top
  at the next open (its records are a suffix of history); a damaged one moves to ``DIR/lost/``
  whole (the segments hold every committed block: a record is marked committed before its
  COMMIT is logged).

Neither ever deletes a segment or WAL file holding a committed record it could not place; what
moved is listed in ``report["moved_to_lost"]``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field

from tairstore.engine.consistency import inspect_store
from tairstore.engine.datadir import FORMAT_VERSION, LOST, DataDir
from tairstore.fileio import REAL_FS, FileSystem
from tairstore.format.segment import FLAG_COMMITTED, FLAG_TOMBSTONE
from tairstore.errors import StoreError
from tairstore.index.header import read_header
from tairstore.index.lmdb_index import Index
from tairstore.index.records import BlockRecord
from tairstore.tiers.ssd import ScannedRecord, scan_records, segment_file_name
from tairstore.wal import Commit, Delete, check_log, drop_applied, list_files, read_log

__all__ = ["fsck", "rebuild_index", "EXIT_OK", "EXIT_DAMAGE", "EXIT_FAILED"]

log = logging.getLogger(__name__)

#: ``tairstore fsck`` exit codes: consistent; damage found; fsck itself could not run.
EXIT_OK = 0
EXIT_DAMAGE = 1
EXIT_FAILED = 2

_STRAY = {"segments": re.compile(r"^\d{12}\.seg$"), "wal": re.compile(r"^\d{20}\.wal(\.stale)?$")}


@dataclass
class _Scan:
    """Every record of every segment, read once (header and payload verified)."""

    at: dict[tuple[int, int], ScannedRecord] = field(default_factory=dict)
    unreadable: dict[int, str] = field(default_factory=dict)  # segment -> the I/O error
    dropped_bytes: int = 0


def _scan(fs: FileSystem, seg_dir: str, segments: dict[int, int]) -> _Scan:
    out = _Scan()

    def report(n: int, why: str) -> None:
        out.dropped_bytes += n

    for sid in sorted(segments):
        try:
            f = fs.open(os.path.join(seg_dir, segment_file_name(sid)), readonly=True)
            try:
                for r in scan_records(f, sid, reporter=report):
                    out.at[(sid, r.location.offset)] = r
            finally:
                f.close()
        except OSError as exc:
            # EIO is not corruption: the segment and the blocks in it are kept and reported.
            out.unreadable[sid] = str(exc)
            log.error("segment %d cannot be read: %s", sid, exc)
    return out


def fsck(path: str, *, repair: bool = False, rebuild: bool = False, fs: FileSystem = REAL_FS) -> dict:
    """Check (and optionally repair or rebuild) the store in ``path``; return a report dict.

    ``report["ok"]`` is True when the store is consistent (after the repair or rebuild, if
    asked). ``report["problems"]`` lists the metadata problems that make ``open`` refuse.
    """
    moved: list[str] = []
    rebuilt = None
    if rebuild:
        rebuilt, moved = rebuild_index(path, fs=fs)
    repaired = 0
    ddir = DataDir(path, fs, create=False, readonly=not (repair or rebuild))
    try:
        report = _check(ddir, fs)
    finally:
        ddir.close()
    if repair and not report["problems"]:
        repaired, more = _repair(path, fs, report)
        moved += more
        ddir = DataDir(path, fs, create=False, readonly=True)
        try:
            report = _check(ddir, fs)
        finally:
            ddir.close()
    elif repair:
        report["advice"] = f"the metadata is damaged; run `tairstore fsck {path} --rebuild`"
    report["repaired"] = repaired
    report["rebuilt_blocks"] = rebuilt
    report["moved_to_lost"] = moved
    for private in ("_empty", "_corrupt"):
        del report[private]
    return report


def _check(ddir: DataDir, fs: FileSystem) -> dict:
    """The read-only check: the report dict (see :func:`fsck`)."""
    found = inspect_store(ddir, fs)
    seg_dir = ddir.sub("segments")
    scan = _scan(fs, seg_dir, found.segments)
    state = {(ns, key): value for ns, key, value in found.entries}
    tail = _replay_tail(fs, ddir, found, state) if found.ok else set()
    corrupt, unreadable, live, placed, unverified, dangling = [], [], {}, {}, 0, 0
    for (ns, key), value in state.items():
        size, crc, gen, _, seg, off, length = value
        placed[(ns, key)] = gen
        if not found.segments.get(seg):
            # Its segment file is gone (or empty, which open removes): recovery drops the
            # entry and counts it (recovery_dangling); the bytes were lost with the file.
            dangling += 1
            continue
        if seg in scan.unreadable:
            unreadable.append((ns, key))
            continue
        r = scan.at.get((seg, off))
        if (r is None or r.namespace != ns or r.key != key or r.location.length != length
                or r.crc != crc or r.flags & FLAG_TOMBSTONE):
            if (ns, key) in tail:
                # A COMMIT in the WAL's tail whose bytes never reached the disk (a crash):
                # recovery drops it, as W2 says; not damage.
                unverified += 1
                continue
            log.error("block %s/%s: no intact record at %d:%d", ns, key.hex()[:16], seg, off)
            corrupt.append((ns, key, seg))
            continue
        live[seg] = live.get(seg, 0) + length
    tombs: dict[int, int] = {}
    for (sid, _), r in scan.at.items():
        if r.flags & FLAG_TOMBSTONE:
            tombs[sid] = tombs.get(sid, 0) + r.location.length
    head = max(found.segments, default=0)
    empty = [sid for sid in found.segments if sid != head and not live.get(sid)
             and not tombs.get(sid) and sid not in scan.unreadable
             and not any(seg == sid for _, _, seg in corrupt)]
    total = sum(found.segments.values())
    stray = _stray_files(ddir)
    wal = found.wal
    problems = [{"problem": p, "detail": d} for p, d in found.problems]
    return {
        "ok": not problems and not corrupt,
        "format_version": FORMAT_VERSION,
        "store_id": ddir.store_id,
        "problems": problems,
        "blocks": len(state) - unverified - dangling,
        "blocks_ok": len(state) - unverified - dangling - len(corrupt) - len(unreadable),
        "index_entries_without_segment": dangling,
        "blocks_corrupt": len(corrupt),
        "blocks_unreadable": len(unreadable),
        "unreadable_segments": sorted(scan.unreadable),
        "index_values_impossible": found.bad_entries,
        "segment_only_blocks": _segment_only(scan, placed),
        "segments": len(found.segments),
        "segment_bytes": total,
        "live_bytes": sum(live.values()),
        "tombstone_bytes": sum(tombs.values()),
        "dead_bytes": total - sum(live.values()) - sum(tombs.values()),
        "empty_segments": len(empty),
        "orphan_bytes": sum(found.segments[s] for s in empty) + sum(stray.values()),
        "stray_files": sorted(stray),
        "wal_checkpoint_lsn": found.checkpoint,
        "wal_files": wal.files if wal else 0,
        "wal_dropped_bytes": wal.dropped_bytes if wal else 0,
        "wal_damaged": bool(wal and wal.damaged),
        "wal_records_after_damage": wal.valid_after if wal else 0,
        "wal_commits_would_drop": wal.commits_after if wal else 0,
        "wal_tail_commits_not_on_disk": unverified,
        "_empty": empty,
        "_corrupt": corrupt,
    }


def _replay_tail(fs: FileSystem, ddir: DataDir, found, state: dict) -> set:
    """Apply the WAL records after the checkpoint to ``state`` in memory, as recovery would;
    return the keys a tail COMMIT set (nothing is written)."""
    touched = set()
    for _, rec in read_log(fs, ddir.sub("wal"), from_lsn=found.checkpoint + 1,
                           reporter=lambda n, why: None):
        if isinstance(rec, Commit):
            for e in rec.entries:
                k = (e.namespace, e.key)
                if e.ssd is None:
                    continue
                old = state.get(k)
                created = old[3] if old is not None and old[2] == e.generation else e.generation
                state[k] = (e.size, e.crc, e.generation, created, *e.ssd)
                touched.add(k)
        elif isinstance(rec, Delete):
            for key in rec.keys:
                state.pop((rec.namespace, key), None)
                touched.discard((rec.namespace, key))
    return touched


def _segment_only(scan: _Scan, placed: dict[tuple[str, bytes], int]) -> int:
    """Committed records newer than anything the index holds for their key (informational:
    evicted blocks are legitimately such records too)."""
    newest: dict[tuple[str, bytes], int] = {}
    for r in scan.at.values():
        if r.flags & FLAG_COMMITTED or r.flags & FLAG_TOMBSTONE:
            k = (r.namespace, r.key)
            newest[k] = max(newest.get(k, 0), r.generation if not r.flags & FLAG_TOMBSTONE else -1)
    return sum(1 for k, g in newest.items() if g > placed.get(k, 0))


def _repair(path: str, fs: FileSystem, report: dict) -> tuple[int, list[str]]:
    """Drop damaged index entries, reclaim or set aside empty segments. Returns (count, moved)."""
    ddir = DataDir(path, fs, create=False)
    moved: list[str] = []
    repaired = 0
    try:
        index = Index(ddir.sub("index"))
        try:
            # Damaged records only: an unreadable (EIO) one is kept (it is not in _corrupt).
            ops = [(ns, key, None) for ns, key, _ in report["_corrupt"]]
            if ops:
                index.apply(ops)
                repaired += len(ops)
            placed = {(ns, key): rec.generation for ns, key, rec in index.items()}
        finally:
            index.close()
        seg_dir = ddir.sub("segments")
        sizes = {sid: 0 for sid in report["_empty"]}
        scan = _scan(fs, seg_dir, sizes)
        tomb = {}
        for r in _scan(fs, seg_dir, _all_segments(fs, seg_dir)).at.values():
            if r.flags & FLAG_TOMBSTONE:
                k = (r.namespace, r.key)
                tomb[k] = max(tomb.get(k, 0), r.generation)
        for sid in report["_empty"]:
            recs = [r for (s, _), r in scan.at.items() if s == sid and r.flags & FLAG_COMMITTED
                    and not r.flags & FLAG_TOMBSTONE]
            unplaced = [r for r in recs if max(placed.get((r.namespace, r.key), 0),
                                               tomb.get((r.namespace, r.key), 0)) < r.generation]
            src = os.path.join(seg_dir, segment_file_name(sid))
            if sid in scan.unreadable or unplaced:
                moved.append(_to_lost(fs, ddir, src, f"{len(unplaced)} committed records not placed"))
            else:
                fs.unlink(src)
            repaired += 1
        if report["_empty"]:
            fs.fsync_dir(seg_dir)
    finally:
        ddir.close()
    return repaired, moved


def _all_segments(fs: FileSystem, seg_dir: str) -> dict[int, int]:
    return {int(n[:12]): 0 for n in fs.listdir(seg_dir) if _STRAY["segments"].match(n)}


def _to_lost(fs: FileSystem, ddir: DataDir, src: str, why: str) -> str:
    """Move ``src`` under ``DIR/lost/`` (never overwriting); return its new relative path."""
    lost = ddir.sub(LOST)
    fs.makedirs(lost)
    name = os.path.basename(src)
    dst = os.path.join(lost, name)
    if fs.exists(dst):
        dst = os.path.join(lost, f"{name}.{time.time_ns()}")
    fs.rename(src, dst)
    fs.fsync_dir(lost)
    fs.fsync_dir(os.path.dirname(src))
    rel = os.path.relpath(dst, ddir.path)
    log.warning("moved %s to %s: %s", os.path.relpath(src, ddir.path), rel, why)
    return rel


def _stray_files(ddir: DataDir) -> dict[str, int]:
    """Files in the data directory that no part of the store owns, with their sizes."""
    out = {}
    for sub, pattern in _STRAY.items():
        d = ddir.sub(sub)
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if not pattern.match(name) or name.endswith(".stale"):
                out[os.path.join(sub, name)] = os.path.getsize(os.path.join(d, name))
    return out


def rebuild_index(path: str, *, fs: FileSystem = REAL_FS) -> tuple[int, list[str]]:
    """Rebuild the LMDB index of the store in ``path`` from its segment files.

    Returns ``(blocks indexed, paths moved to lost/)``. Nothing is deleted: the old index and
    a damaged WAL move to ``DIR/lost/``.
    """
    ddir = DataDir(path, fs, create=False)
    moved: list[str] = []
    try:
        seg_dir = ddir.sub("segments")
        scan = _scan(fs, seg_dir, _all_segments(fs, seg_dir))
        best: dict[tuple[str, bytes], ScannedRecord] = {}
        for r in scan.at.values():
            if not r.flags & (FLAG_COMMITTED | FLAG_TOMBSTONE):
                continue
            k = (r.namespace, r.key)
            cur = best.get(k)
            if cur is None or r.generation > cur.generation:
                best[k] = r
        ops = []
        for (ns, key), r in best.items():
            if r.flags & FLAG_TOMBSTONE:
                continue
            loc = r.location
            ops.append((ns, key, BlockRecord(r.raw_len, r.crc, r.generation, r.generation,
                                             loc.segment, loc.offset, loc.length)))
        index_dir = ddir.sub("index")
        settings = _old_settings(index_dir, ddir.store_id)
        for name in ("data.mdb", "lock.mdb"):
            if fs.exists(os.path.join(index_dir, name)):
                moved.append(_to_lost(fs, ddir, os.path.join(index_dir, name), "index rebuilt"))
        checkpoint = _settle_wal(fs, ddir, moved)
        index = Index(index_dir)
        try:
            index.set_identity(ddir.store_id, FORMAT_VERSION)
            index.apply(ops, lsn=checkpoint, clear=True)
            for name, ns_settings in settings.items():
                index.set_namespace(name, ns_settings)
        finally:
            index.close()
        return len(ops), moved
    finally:
        ddir.close()


def _old_settings(index_dir: str, store_id: str) -> dict[str, dict]:
    """The namespace settings (quotas, TTL, strategy) of the index a rebuild replaces, when
    it opens read-only and is this store's: the segments do not hold them, so without this a
    rebuild would drop them (and a store's blocks could then outgrow the quotas it had: C1).
    Empty when the old index cannot be read; the settings must then be set again."""
    try:
        if read_header(index_dir) is None:
            return {}
        index = Index(index_dir, readonly=True)
    except (StoreError, OSError) as exc:
        log.warning("the index a rebuild replaces is unreadable (%s): namespace quotas, TTLs "
                    "and strategies must be set again", exc)
        return {}
    try:
        if index.store_id() != store_id:
            return {}
        return index.namespaces()
    except (StoreError, OSError) as exc:
        log.warning("the namespace settings of the index a rebuild replaces are unreadable (%s): "
                    "set them again", exc)
        return {}
    finally:
        index.close()


def _settle_wal(fs: FileSystem, ddir: DataDir, moved: list[str]) -> int:
    """The checkpoint the rebuilt index starts from.

    An intact WAL is kept: the checkpoint sits just before its oldest file, so the next open
    replays every record it holds on top of what the segments said. A damaged one (valid
    records after a bad one) moves to lost/ whole, leaving an empty end marker past its highest
    LSN so LSNs never repeat.
    """
    wal_dir = ddir.sub("wal")
    files = list_files(fs, wal_dir)
    found = check_log(fs, wal_dir, from_lsn=0)
    if not found.damaged:
        return files[0][0] - 1 if files else 0
    for _, p in files:
        moved.append(_to_lost(fs, ddir, p, "WAL damaged before its end; the segments hold "
                              "every committed block"))
    drop_applied(fs, wal_dir, found.max_lsn + 1)
    return found.max_lsn

