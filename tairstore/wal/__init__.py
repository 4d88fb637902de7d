"""The write-ahead log: metadata intents (PREPARE, COMMIT, ABORT, DELETE), never payloads.

``WalWriter`` appends with group commit; ``read_log`` replays after a restart. The framing is
defined in ``tairstore.format.wal`` and described in ``docs/wal-format.md``.
"""

from tairstore.wal.log import DURABILITY_MODES, WalWriter, drop_applied
from tairstore.wal.reader import (
    LogCheck, LogReplay, check_log, list_files, read_log, scan_end, wal_file_name,
)
from tairstore.wal.records import (
    Abort,
    Commit,
    CommitEntry,
    Delete,
    Prepare,
    Record,
    decode,
    encode,
)

__all__ = [
    "DURABILITY_MODES",
    "WalWriter",
    "drop_applied",
    "LogCheck",
    "check_log",
    "LogReplay",
    "read_log",
    "scan_end",
    "list_files",
    "wal_file_name",
    "Prepare",
    "CommitEntry",
    "Commit",
    "Abort",
    "Delete",
    "Record",
    "encode",
    "decode",
]
