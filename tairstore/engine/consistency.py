"""Do the index, the WAL and the segments belong together and agree? Decided before open (M1).

``open`` calls :func:`check_open` after taking the directory lock and before it changes any
file (before LMDB is opened for writing, the segment log starts a head segment, or a
background thread exists). ``fsck`` calls :func:`inspect_store` for the same findings without
raising. Everything here only reads: LMDB is opened read-only and without its lock file, the
data file is checked against its own header first (a truncated ``data.mdb`` would SIGBUS).

The problems, each refused with :class:`~tairstore.errors.MetadataMismatchError`:

==================  ===========================================================================
``index-missing``   ``index/data.mdb`` is gone while the WAL or the segments hold committed data
``index-empty``     it is empty, or a new LMDB without this store's identity, likewise
``index-damaged``   it fails its header check, LMDB cannot read it, or a value in it is
                    impossible (a size outside the format's ``1..2**32-1``, a record length that does
                    not fit the size, a location past the end of its segment file)
``index-foreign``   it names another store's identity
``index-stale``     its checkpoint is older than the WAL: the records in between are gone
``wal-missing``     the index has a checkpoint but ``wal/`` holds no file (a clean close leaves
                    an empty one)
``wal-damaged``     a damaged record is followed by valid ones that replay would drop
==================  ===========================================================================

A store whose index has no identity and whose WAL and segments hold nothing committed is new
(or its creation crashed): it is initialised, not refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tairstore.engine.datadir import DataDir, os_error
from tairstore.errors import CorruptionError, MetadataMismatchError
from tairstore.fileio import FileSystem
from tairstore.format.segment import FLAG_COMMITTED, MAX_PAYLOAD_LEN, header_length
from tairstore.index.header import DATA_FILE, read_header
from tairstore.index.lmdb_index import Index
from tairstore.index.records import check_value
from tairstore.tiers.ssd import _SEGMENT_NAME, scan_records, segment_file_name
from tairstore.wal import LogCheck, check_log

__all__ = ["Inspection", "inspect_store", "check_open"]

# How many impossible index values a report lists (the count is always complete).
_MAX_LISTED = 5


@dataclass
class Inspection:
    """What :func:`inspect_store` found.

    Attributes:
        fresh: the index has no identity and nothing on disk is committed: initialise it.
        checkpoint: the index's checkpoint LSN (0 when it has none).
        entries: the index's values, validated: ``(namespace, key, value tuple)``.
        segments: segment id -> file size.
        wal: the WAL check (None when the WAL could not be read).
        problems: ``(problem, detail)`` pairs, the first one decides the refusal.
        bad_entries: how many index values are impossible.
    """

    fresh: bool = False
    checkpoint: int = 0
    entries: list = field(default_factory=list)
    segments: dict[int, int] = field(default_factory=dict)
    wal: LogCheck | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    bad_entries: int = 0

    @property
    def ok(self) -> bool:
        """True when the store may be opened."""
        return not self.problems


def check_open(ddir: DataDir, fs: FileSystem) -> Inspection:
    """:func:`inspect_store`, raising :class:`MetadataMismatchError` for the first problem."""
    found = inspect_store(ddir, fs)
    if found.problems:
        problem, detail = found.problems[0]
        raise MetadataMismatchError(ddir.path, problem, detail)
    return found


def inspect_store(ddir: DataDir, fs: FileSystem) -> Inspection:
    """Read the index, the WAL and the segment list; report what does not agree. Read-only."""
    found = Inspection(segments=_segment_sizes(fs, ddir.sub("segments")))
    index_dir = ddir.sub("index")
    store_id, empty_file = _read_index(found, index_dir, ddir.store_id)
    wal_dir = ddir.sub("wal")
    try:
        found.wal = check_log(fs, wal_dir, from_lsn=found.checkpoint + 1)
    except OSError as exc:
        raise os_error(exc, "WAL", wal_dir) from exc
    if found.problems:
        return found
    wal = found.wal
    if store_id is None:
        if wal.max_lsn == 0 and not _any_committed(fs, ddir.sub("segments"), found.segments):
            found.fresh = True
            return found
        if not os.path.exists(os.path.join(index_dir, DATA_FILE)):
            found.problems.append(("index-missing", "the index (index/data.mdb) is missing while "
                                   "the WAL or the segments hold committed blocks"))
        else:
            what = "empty" if empty_file else "a new index without this store's identity"
            found.problems.append(("index-empty", f"the index (index/data.mdb) is {what} while "
                                   "the WAL or the segments hold committed blocks"))
        return found
    if store_id != ddir.store_id:
        found.problems.append(("index-foreign", f"the index belongs to store {store_id}, not to "
                               f"this store ({ddir.store_id})"))
    elif found.checkpoint > 0 and wal.files == 0:
        found.problems.append(("wal-missing", f"the index is checkpointed at LSN "
                               f"{found.checkpoint} but wal/ holds no file"))
    elif wal.starts_after:
        found.problems.append(("index-stale", f"the index is checkpointed at LSN "
                               f"{found.checkpoint} but the WAL starts at LSN {wal.first_lsn}: "
                               "the index is older than the log"))
    elif wal.damaged:
        found.problems.append(("wal-damaged", f"the WAL is damaged before its end "
                               f"({'; '.join(wal.reasons)}): {wal.valid_after} valid records "
                               f"after the damage, holding {wal.commits_after} committed "
                               "blocks, would be dropped"))
    return found


def _read_index(found: Inspection, index_dir: str, expected_id: str) -> tuple[str | None, bool]:
    """Fill ``found`` from the index; return its store id and whether data.mdb is 0 bytes."""
    path = os.path.join(index_dir, DATA_FILE)
    try:
        if os.path.exists(path) and os.path.getsize(path) == 0:
            return None, True
        header = read_header(index_dir)
    except CorruptionError as exc:
        found.problems.append(("index-damaged", str(exc)))
        return None, False
    except OSError as exc:
        raise os_error(exc, "index", path) from exc
    if header is None:
        return None, False
    try:
        index = Index(index_dir, readonly=True)
    except CorruptionError as exc:
        found.problems.append(("index-damaged", str(exc)))
        return None, False
    try:
        store_id = index.store_id()
        found.checkpoint = index.checkpoint_lsn()
        if store_id == expected_id:
            _load_entries(found, index)
        return store_id, False
    except CorruptionError as exc:
        found.problems.append(("index-damaged", str(exc)))
        return None, False
    finally:
        index.close()


def _load_entries(found: Inspection, index: Index) -> None:
    reasons = []
    sizes = found.segments
    entries = found.entries
    ns_header: dict[str, int] = {}
    for ns, key, value in index.raw_items():
        # This loop is most of a reopen: the common, plausible value passes a cheap inline
        # test; anything else gets check_value's verdict (which also names the reason).
        size, _, gen, _, seg, off, length = value
        hlen = ns_header.get(ns)
        if hlen is None:
            hlen = ns_header[ns] = header_length(len(ns.encode()), 0)
        hlen += len(key)
        seg_size = sizes.get(seg)
        if (0 < size <= MAX_PAYLOAD_LEN and gen and hlen < length <= hlen + size
                and (not seg_size or off + length <= seg_size)):
            entries.append((ns, key, value))
            continue
        # The format's limit, not this open's max_block_bytes: a store reopened with a smaller
        # limit still holds its larger blocks (recovery skips them, it does not refuse).
        why = check_value(ns, key, value, max_block_bytes=MAX_PAYLOAD_LEN, segment_sizes=sizes)
        if why is None:
            entries.append((ns, key, value))
            continue
        found.bad_entries += 1
        if len(reasons) < _MAX_LISTED:
            reasons.append(f"{ns}/{key.hex()[:16]}: {why}")
    if found.bad_entries:
        found.problems.append(("index-damaged", f"{found.bad_entries} index values are impossible "
                               f"({'; '.join(reasons)})"))


def _segment_sizes(fs: FileSystem, directory: str) -> dict[int, int]:
    out: dict[int, int] = {}
    if not fs.exists(directory):
        return out
    try:
        for name in fs.listdir(directory):
            m = _SEGMENT_NAME.match(name)
            if m:
                f = fs.open(os.path.join(directory, name), readonly=True)
                try:
                    out[int(m.group(1))] = f.size()
                finally:
                    f.close()
    except OSError as exc:
        raise os_error(exc, "segments", directory) from exc
    return out


def _any_committed(fs: FileSystem, directory: str, segments: dict[int, int]) -> bool:
    """True when some segment holds a committed record (header check only; stops at the first)."""
    for sid in sorted(segments, reverse=True):
        f = fs.open(os.path.join(directory, segment_file_name(sid)), readonly=True)
        try:
            for r in scan_records(f, sid, verify_payload=False):
                if r.flags & FLAG_COMMITTED:
                    return True
        except OSError:
            return True  # unreadable is not empty: refuse rather than start over it
        finally:
            f.close()
    return False
