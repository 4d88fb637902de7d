"""The access log: what the daemon records per request so ``optimize`` can replay real traffic.

Format (``tairstore-events``, version 1)
---------------------------------------
A log is a file ``FILE`` and its rotated predecessors ``FILE.1`` (newest) .. ``FILE.N``
(oldest). Each file is::

    magic   b"TSAL1\\n"                      (6 bytes: format name and version, then a newline)
    record*                                 (msgpack arrays, back to back)

and each record is the msgpack array ``[ts_ms, namespace, instance, input_tokens, blocks]``:

- ``ts_ms``: int, milliseconds since the Unix epoch when the request arrived;
- ``namespace``, ``instance``: str (``""`` when the request named none);
- ``input_tokens``: int, the request's prompt length, or nil when unknown (then every block
  counts as full);
- ``blocks``: array of uint64, the request's block ids in chain order (a block key given as
  bytes is recorded as its xxh64 digest, so a record costs ~9 bytes a block).

Records are buffered and written whole; a crash can leave the last record of the newest file
cut short, and the reader ignores a truncated tail (it reports how many bytes it dropped), as
it cannot be told from a write in progress. Anything else that is not a record is corruption.

Rotation: when a write would take ``FILE`` past ``max_bytes``, ``FILE.i`` becomes ``FILE.i+1``
(the oldest beyond ``backups`` is deleted), ``FILE`` becomes ``FILE.1`` and a new ``FILE``
starts. The log is off unless the daemon is started with ``--access-log FILE``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import xxhash

from tairstore.errors import InvalidArgumentError
from tairstore.policy.traces import MOONCAKE_BLOCK_TOKENS, Trace, TraceFormatError

__all__ = ["AccessLogWriter", "AccessRecord", "read_access_log", "load_access_log", "MAGIC"]

MAGIC = b"TSAL1\n"
#: Rotate at this size by default: a few minutes of a busy daemon, small enough to copy around.
DEFAULT_MAX_BYTES = 64 << 20
#: Rotated files kept by default.
DEFAULT_BACKUPS = 4
#: Write the buffer out once it holds this much: one write per many requests.
_FLUSH_BYTES = 64 << 10


@dataclass(frozen=True)
class AccessRecord:
    """One logged request."""

    ts_ms: int
    namespace: str
    instance: str
    input_tokens: int | None
    blocks: list[int]


def block_id(key: bytes | int) -> int:
    """The uint64 a block key is logged as: ints as they are, bytes by their xxh64 digest."""
    if isinstance(key, int):
        if not 0 <= key < 1 << 64:
            raise InvalidArgumentError(f"block id {key} is not a uint64")
        return key
    return xxhash.xxh64_intdigest(key)


class AccessLogWriter:
    """Appends records to a rotating access log (not thread-safe: one owner, e.g. the daemon)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
    ) -> None:
        """Open (append to) the log at ``path``.

        Raises:
            InvalidArgumentError: ``max_bytes`` too small for a header, or ``backups`` < 0.
        """
        if max_bytes <= len(MAGIC) or backups < 0:
            raise InvalidArgumentError(
                f"access log needs max_bytes > {len(MAGIC)} and backups >= 0, "
                f"got {max_bytes}, {backups}"
            )
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._buf = bytearray()
        self._packer = msgpack.Packer()
        self._f = self._open()

    def _open(self):  # type: ignore[no-untyped-def]
        f = open(self.path, "ab")
        if f.tell() == 0:
            f.write(MAGIC)
        return f

    def record(
        self,
        namespace: str,
        instance: str,
        keys: Sequence[bytes | int],
        input_tokens: int | None = None,
        ts_ms: int | None = None,
    ) -> None:
        """Log one request: its block keys in chain order (see the module docstring)."""
        if ts_ms is None:
            ts_ms = time.time_ns() // 1_000_000
        rec = self._packer.pack(
            [ts_ms, namespace, instance, input_tokens, [block_id(k) for k in keys]]
        )
        if self._f.tell() + len(self._buf) + len(rec) > self.max_bytes and (
            self._f.tell() > len(MAGIC) or self._buf
        ):
            self.flush()
            self._rotate()
        self._buf += rec
        if len(self._buf) >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records to the file (whole records only)."""
        if self._buf:
            self._f.write(self._buf)
            self._buf.clear()
        self._f.flush()

    def _rotate(self) -> None:
        self._f.close()
        if self.backups == 0:
            self.path.unlink()
        else:
            oldest = _rotated(self.path, self.backups)
            if oldest.exists():
                oldest.unlink()
            for i in range(self.backups - 1, 0, -1):
                src = _rotated(self.path, i)
                if src.exists():
                    src.rename(_rotated(self.path, i + 1))
            self.path.rename(_rotated(self.path, 1))
        self._f = self._open()

    def close(self) -> None:
        """Flush and close; further records raise ``ValueError``."""
        if not self._f.closed:
            self.flush()
            self._f.close()

    def __enter__(self) -> AccessLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rotated(path: Path, i: int) -> Path:
    return path.with_name(f"{path.name}.{i}")


def log_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files of the log at ``path``, oldest first (``FILE.N`` .. ``FILE.1``, ``FILE``)."""
    p = Path(path)
    rotated = []
    i = 1
    while _rotated(p, i).exists():
        rotated.append(_rotated(p, i))
        i += 1
    files = rotated[::-1] + ([p] if p.exists() else [])
    if not files:
        raise TraceFormatError(f"access log not found: {p}")
    return files


def read_access_log(path: str | os.PathLike[str]) -> Iterator[AccessRecord]:
    """Every record of the log at ``path`` (all its files), oldest first.

    Raises:
        TraceFormatError: a file without the magic, or a record of the wrong shape.
    """
    for f in log_files(path):
        data = f.read_bytes()
        if not data.startswith(MAGIC):
            raise TraceFormatError(f"{f}: not a tairstore access log (bad magic)")
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(data[len(MAGIC):])
        while True:
            offset = len(MAGIC) + unpacker.tell()
            try:
                rec = unpacker.unpack()
            except msgpack.OutOfData:
                # A record cut short by a crash mid-write: dropped, not corruption (see above).
                break
            except (ValueError, msgpack.UnpackException) as exc:
                raise TraceFormatError(f"{f}@{offset}: bad record: {exc}") from None
            yield _check(rec, f, offset)


def _check(rec: object, f: Path, offset: int) -> AccessRecord:
    ok = (
        isinstance(rec, list)
        and len(rec) == 5
        and isinstance(rec[0], int)
        and isinstance(rec[1], str)
        and isinstance(rec[2], str)
        and (rec[3] is None or isinstance(rec[3], int))
        and isinstance(rec[4], list)
        and all(isinstance(b, int) for b in rec[4])
    )
    if not ok:
        raise TraceFormatError(f"{f}@{offset}: not an access record: {rec!r:.100}")
    assert isinstance(rec, list)
    return AccessRecord(rec[0], rec[1], rec[2], rec[3], rec[4])


def load_access_log(
    path: str | os.PathLike[str], block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> Trace:
    """The log at ``path`` as a :class:`Trace`, one group per ``namespace/instance``.

    Each group gets its own key space: two tenants' equal block ids are different blocks.
    """
    trace = Trace(block_tokens=block_tokens)
    group_of: dict[str, int] = {}
    key_of: dict[tuple[int, int], int] = {}
    stamps: list[int] = []
    for rec in read_access_log(path):
        stamps.append(rec.ts_ms)
        name = f"{rec.namespace}/{rec.instance}" if rec.instance else rec.namespace or "default"
        g = group_of.setdefault(name, len(group_of))
        if g == len(trace.group_names):
            trace.group_names.append(name)
        chain = [key_of.setdefault((g, b), len(key_of)) for b in rec.blocks]
        trace.add(chain, rec.input_tokens, g)
    if stamps:
        trace.duration_s = (max(stamps) - min(stamps)) / 1000
    return trace
