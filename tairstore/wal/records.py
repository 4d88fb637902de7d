"""Typed WAL record bodies and their msgpack encoding.

Each body is a msgpack array with a fixed arity per type (positional, not a map: the WAL is on
the commit path and field names would be most of its bytes)::

    PREPARE  [session, namespace, [key, ...], [size, ...]]
    COMMIT   [session, [[namespace, key, size, crc, generation, ssd], ...]]
             ssd = [segment_id, offset, record_length] or nil (block lives only in DRAM)
    ABORT    [session]
    DELETE   [namespace, [key, ...]]

Strings are msgpack str (UTF-8), keys are msgpack bin, integers are unsigned and fit in u64
(``crc`` in u32). A new field means a new record type, never a longer array: decoding checks the
arity exactly, so an old reader cannot half-understand a new record.

The frame checksum (``tairstore.format.wal``) already vouches that these bytes are what a writer
wrote, so a body that fails to decode is not a torn write but a bug or a foreign format; decoding
reports it as :class:`~tairstore.errors.CorruptionError` and never as any other exception.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Union

import msgpack

from tairstore.errors import CorruptionError, InvalidArgumentError
from tairstore.validate import MAX_KEY_BYTES
from tairstore.format.wal import RecordType

__all__ = ["Prepare", "CommitEntry", "Commit", "Abort", "Delete", "Record", "encode", "decode"]

# DESIGN: keys are 1..MAX_KEY_BYTES bytes. Checked here too so a damaged body cannot smuggle a
# key the index would reject later, far from the cause.
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1

# Error messages show a bounded repr: a damaged body can decode to a deeply nested value whose
# full repr would be huge or hit the recursion limit (an exception other than CorruptionError).
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = 60


def _brief(value) -> str:
    return _REPR.repr(value)


def _uint(value, name: str, limit: int = _U64) -> None:
    # ``type(...) is int`` rejects bool, which msgpack would otherwise round-trip as an int.
    if type(value) is not int or not 0 <= value <= limit:
        raise InvalidArgumentError(f"{name} must be an int in 0..{limit}, got {_brief(value)}")


def _key(value, name: str = "key") -> None:
    if type(value) is not bytes or not 0 < len(value) <= MAX_KEY_BYTES:
        raise InvalidArgumentError(f"{name} must be 1..{MAX_KEY_BYTES} bytes, got {_brief(value)}")


def _str(value, name: str) -> None:
    if type(value) is not str:
        raise InvalidArgumentError(f"{name} must be str, got {_brief(value)}")


def _tuple(obj, field: str) -> tuple:
    # Accept lists from callers but store tuples, so records stay hashable and immutable.
    value = getattr(obj, field)
    if type(value) is not tuple:
        if not isinstance(value, (list, tuple)):
            raise InvalidArgumentError(f"{field} must be a sequence, got {_brief(value)}")
        value = tuple(value)
        object.__setattr__(obj, field, value)
    return value


@dataclass(frozen=True, slots=True)
class Prepare:
    """A write session reserved space for ``keys`` (phase one of the two-phase write)."""

    session: int
    namespace: str
    keys: tuple[bytes, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        _uint(self.session, "session")
        _str(self.namespace, "namespace")
        keys, sizes = _tuple(self, "keys"), _tuple(self, "sizes")
        if len(keys) != len(sizes):
            raise InvalidArgumentError("keys and sizes differ in length")
        for k in keys:
            _key(k)
        for s in sizes:
            _uint(s, "size")


@dataclass(frozen=True, slots=True)
class CommitEntry:
    """One committed block: where it lives and how to verify it.

    ``ssd`` is ``(segment_id, offset, record_length)`` of the block's record in the SSD segment
    log, or ``None`` when the block only lives in (volatile) DRAM.
    """

    namespace: str
    key: bytes
    size: int
    crc: int
    generation: int
    ssd: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        _str(self.namespace, "namespace")
        _key(self.key)
        _uint(self.size, "size")
        _uint(self.crc, "crc", _U32)
        _uint(self.generation, "generation")
        if self.ssd is not None:
            ssd = _tuple(self, "ssd")
            if len(ssd) != 3:
                raise InvalidArgumentError(f"ssd must be (segment, offset, length): {_brief(ssd)}")
            for v in ssd:
                _uint(v, "ssd location")


@dataclass(frozen=True, slots=True)
class Commit:
    """A write session's blocks are durable and visible (phase two)."""

    session: int
    entries: tuple[CommitEntry, ...]

    def __post_init__(self) -> None:
        _uint(self.session, "session")
        for e in _tuple(self, "entries"):
            if type(e) is not CommitEntry:
                raise InvalidArgumentError(f"entries must be CommitEntry, got {_brief(e)}")


@dataclass(frozen=True, slots=True)
class Abort:
    """A write session ended without committing; its reserved space is released."""

    session: int

    def __post_init__(self) -> None:
        _uint(self.session, "session")


@dataclass(frozen=True, slots=True)
class Delete:
    """``keys`` of ``namespace`` were deleted."""

    namespace: str
    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _str(self.namespace, "namespace")
        for k in _tuple(self, "keys"):
            _key(k)


Record = Union[Prepare, Commit, Abort, Delete]


# --- body layouts: one packer and one unpacker per type, in a table -------------------------


def _pack_entry(e: CommitEntry) -> tuple:
    return (e.namespace, e.key, e.size, e.crc, e.generation, e.ssd)


def _unpack_entry(a) -> CommitEntry:
    _arity(a, 6, "commit entry")
    return CommitEntry(a[0], a[1], a[2], a[3], a[4], a[5])


def _arity(a, n: int, what: str) -> None:
    if type(a) is not tuple or len(a) != n:
        raise InvalidArgumentError(f"{what} must be an array of {n}, got {_brief(a)}")


def _array(a, what: str) -> tuple:
    if type(a) is not tuple:
        raise InvalidArgumentError(f"{what} must be an array, got {_brief(a)}")
    return a


def _unpack_prepare(a) -> Prepare:
    _arity(a, 4, "PREPARE")
    return Prepare(a[0], a[1], _array(a[2], "keys"), _array(a[3], "sizes"))


def _unpack_commit(a) -> Commit:
    _arity(a, 2, "COMMIT")
    return Commit(a[0], tuple(_unpack_entry(e) for e in _array(a[1], "entries")))


def _unpack_abort(a) -> Abort:
    _arity(a, 1, "ABORT")
    return Abort(a[0])


def _unpack_delete(a) -> Delete:
    _arity(a, 2, "DELETE")
    return Delete(a[0], _array(a[1], "keys"))


_PACKERS = {
    Prepare: (RecordType.PREPARE, lambda r: (r.session, r.namespace, r.keys, r.sizes)),
    Commit: (RecordType.COMMIT, lambda r: (r.session, [_pack_entry(e) for e in r.entries])),
    Abort: (RecordType.ABORT, lambda r: (r.session,)),
    Delete: (RecordType.DELETE, lambda r: (r.namespace, r.keys)),
}

_UNPACKERS = {
    RecordType.PREPARE: _unpack_prepare,
    RecordType.COMMIT: _unpack_commit,
    RecordType.ABORT: _unpack_abort,
    RecordType.DELETE: _unpack_delete,
}


def encode(rec: Record) -> tuple[int, bytes]:
    """Return ``(record_type, body_bytes)`` for a record object.

    Raises:
        InvalidArgumentError: ``rec`` is not one of the record classes.
    """
    try:
        rtype, pack = _PACKERS[type(rec)]
    except KeyError:
        raise InvalidArgumentError(f"not a WAL record: {_brief(rec)}") from None
    try:
        return int(rtype), msgpack.packb(pack(rec), use_bin_type=True)
    except (UnicodeEncodeError, ValueError, TypeError, OverflowError) as exc:
        # e.g. a namespace with a lone surrogate, which is a str but has no UTF-8 form.
        raise InvalidArgumentError(f"cannot encode {type(rec).__name__}: {exc}") from exc


def decode(rtype: int, body) -> Record:
    """Parse a body of type ``rtype`` back into its record object.

    Raises:
        CorruptionError: unknown type, bytes that are not one msgpack value, or a value that does
            not have the layout of that type. Nothing else escapes.
    """
    unpack = _UNPACKERS.get(rtype)
    if unpack is None:
        raise CorruptionError(f"unknown WAL record type {rtype!r}")
    try:
        # use_list=False: arrays become tuples, which the records store as-is. raw=False
        # decodes str as UTF-8 and keeps bin as bytes, so a key sent as str is rejected below.
        value = msgpack.unpackb(body, use_list=False, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a family of types (ExtraData, ValueError, ...)
        raise CorruptionError(f"WAL body is not msgpack: {exc}") from exc
    try:
        return unpack(value)
    except InvalidArgumentError as exc:
        raise CorruptionError(f"malformed {RecordType(rtype).name} body: {exc}") from exc
