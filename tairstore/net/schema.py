"""What the frames of the data-path protocol say: opcodes, header fields, error codes.

:mod:`tairstore.net.protocol` does the framing; this module is the content, as tables:

- :class:`Op`: the frame kinds (requests below 0x80, responses OK / ERROR);
- ``REQUEST_FIELDS`` / ``RESPONSE_FIELDS``: per opcode, the msgpack header fields, their type
  check and whether they are required (unknown fields are ignored);
- :class:`Code` and ``ERROR_CLASSES``: one wire code per :mod:`tairstore.errors` class, so a
  client re-raises exactly the exception type the store raised; codes >= 100 are protocol
  errors and travel as :class:`ProtocolError` with that ``code``.

Each check raises :class:`ProtocolError` (``remote=True``) with ``BAD_HEADER`` or
``BATCH_TOO_LARGE``; nothing else escapes.
"""

from __future__ import annotations

import enum
import operator
from itertools import repeat
from typing import Any, Callable

from tairstore import errors
from tairstore.errors import ProtocolError, StoreError
from tairstore.engine.match import MatchResult

__all__ = [
    "Op", "Code", "ERROR_CLASSES", "REQUEST_FIELDS", "RESPONSE_FIELDS", "BLOCK_OPS_REQUEST",
    "BLOCK_OPS_RESPONSE", "FRAMING_CODES", "validate_fields", "error_to_fields",
    "error_from_fields", "match_to_fields", "match_from_fields", "TIER_CODES",
]


class Op(enum.IntEnum):
    """Frame kinds. Requests travel client → server; OK and ERROR answer them."""

    PING = 0x01
    AUTH = 0x02
    PUT = 0x10
    GET = 0x11
    EXISTS = 0x12
    MATCH = 0x13
    DELETE = 0x14
    START_WRITE = 0x20
    WRITE = 0x21
    FINISH_WRITE = 0x22
    ABORT_WRITE = 0x23
    STATS = 0x30
    #: Shared memory (same host): learn the arena, lease blocks in place, give leases back.
    SHM_HELLO = 0x40
    GET_SHM = 0x41
    RELEASE = 0x42
    #: Local puts: a staging file the client writes blocks into, then PUT_SHM stores them.
    SHM_STAGE = 0x43
    PUT_SHM = 0x44
    OK = 0x80
    ERROR = 0x81


class Code(enum.IntEnum):
    """Error codes of ERROR frames (and ``ProtocolError.code``)."""

    STORE = 1
    INVALID_ARGUMENT = 2
    SESSION = 3
    LEASE_EXPIRED = 4
    CAPACITY = 5
    DISK_FULL = 6
    CORRUPTION = 7
    CLOSED = 8
    STORE_LOCKED = 9
    FORMAT = 10
    FATAL_IO = 11
    PERMISSION_DENIED = 12
    NOT_FOUND = 13
    TIER_UNAVAILABLE = 14
    #: The server failed in a way it did not expect (a bug); re-raised as StoreError.
    INTERNAL = 99
    PROTOCOL = 100
    BAD_MAGIC = 101
    BAD_VERSION = 102
    FRAME_TOO_LARGE = 103
    HEADER_TOO_LARGE = 104
    BAD_HEADER = 105
    UNKNOWN_OPCODE = 106
    BATCH_TOO_LARGE = 107
    PAYLOAD_MISMATCH = 108
    BAD_REQUEST_ID = 109
    UNEXPECTED_RESPONSE = 110
    BROKEN = 111


#: Wire code -> exception class; the inverse is found along the exception's MRO, so a subclass
#: the table does not name (e.g. the daemon's ``Unauthenticated``) travels as its nearest base.
ERROR_CLASSES: dict[int, type[StoreError]] = {
    Code.STORE: StoreError,
    Code.INVALID_ARGUMENT: errors.InvalidArgumentError,
    Code.SESSION: errors.SessionError,
    Code.LEASE_EXPIRED: errors.LeaseExpiredError,
    Code.CAPACITY: errors.CapacityError,
    Code.DISK_FULL: errors.DiskFullError,
    Code.CORRUPTION: errors.CorruptionError,
    Code.CLOSED: errors.ClosedError,
    Code.STORE_LOCKED: errors.StoreLockedError,
    Code.FORMAT: errors.FormatError,
    Code.FATAL_IO: errors.FatalIOError,
    Code.PERMISSION_DENIED: errors.PermissionDeniedError,
    Code.NOT_FOUND: errors.NotFoundError,
    Code.TIER_UNAVAILABLE: errors.TierUnavailableError,
    Code.PROTOCOL: ProtocolError,
}
_CODE_OF = {cls: code for code, cls in ERROR_CLASSES.items()}

#: Codes of framing errors: after one, the connection is closed.
FRAMING_CODES = frozenset({Code.BAD_MAGIC, Code.BAD_VERSION, Code.FRAME_TOO_LARGE,
                           Code.HEADER_TOO_LARGE, Code.BAD_REQUEST_ID, Code.UNEXPECTED_RESPONSE,
                           Code.BROKEN})


def _bad(message: str, code: Code = Code.BAD_HEADER) -> ProtocolError:
    return ProtocolError(message, remote=True, code=int(code))


# ----------------------------------------------------------------------------- field checks
# Each check gets the value and the batch limit (None: not checked, e.g. in responses).
Check = Callable[[Any, "int | None"], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str(v: Any, _: int | None) -> bool:
    return isinstance(v, str)


def _uint(v: Any, _: int | None) -> bool:
    return _is_int(v) and v >= 0


def _opt_int(v: Any, _: int | None) -> bool:
    return v is None or _is_int(v)


def _num(v: Any, _: int | None) -> bool:
    return (_is_int(v) or isinstance(v, float))


def _bin(v: Any, _: int | None) -> bool:
    return isinstance(v, bytes)


def _map(v: Any, _: int | None) -> bool:
    return isinstance(v, dict)


def _batch(v: Any, max_batch: int | None) -> None:
    if max_batch is not None and len(v) > max_batch:
        raise _bad(f"batch of {len(v)} keys exceeds the limit of {max_batch}", Code.BATCH_TOO_LARGE)


def _keys(v: Any, max_batch: int | None) -> bool:
    # set(map(type, v)): a C-level pass (msgpack decodes binary as exactly bytes).
    if not isinstance(v, list) or (v and set(map(type, v)) != {bytes}):
        return False
    _batch(v, max_batch)
    return True


def _ints(v: Any, max_batch: int | None) -> bool:
    if not isinstance(v, list) or not all(_is_int(n) for n in v):
        return False
    _batch(v, max_batch)
    return True


def _parts(v: Any, _: int | None) -> bool:
    return isinstance(v, list) and all(
        isinstance(p, dict) and isinstance(p.get("path"), str) and isinstance(p.get("name", ""), str)
        and all(_is_int(p.get(k)) and p.get(k) >= 0 for k in ("size", "shift", "cap", "base"))
        for p in v)


def _bools(v: Any, _: int | None) -> bool:
    return isinstance(v, list) and all(isinstance(b, bool) for b in v)


REQ, OPT = True, False
_NS = ("ns", _str, OPT)  # absent: "default"
_KEYS = ("keys", _keys, REQ)

#: Request header fields per opcode: (name, check, required).
REQUEST_FIELDS: dict[Op, tuple] = {
    Op.PING: (),
    Op.AUTH: (("token", _str, REQ),),
    Op.PUT: (_NS, _KEYS, ("sizes", _ints, REQ)),
    Op.GET: (_NS, _KEYS, ("cap", _uint, OPT)),  # cap: get_into's buffer size
    Op.EXISTS: (_NS, _KEYS),
    Op.MATCH: (_NS, _KEYS, ("mode", _str, REQ), ("window", _opt_int, OPT)),
    Op.DELETE: (_NS, _KEYS),
    Op.START_WRITE: (_NS, _KEYS, ("sizes", _ints, REQ), ("lease", _num, OPT)),
    Op.WRITE: (("sid", _uint, REQ), _KEYS, ("sizes", _ints, REQ)),
    Op.FINISH_WRITE: (("sid", _uint, REQ), _KEYS),
    Op.ABORT_WRITE: (("sid", _uint, REQ),),
    Op.STATS: (),
    Op.SHM_HELLO: (),
    # rel_o/rel_g: (offset, generation) of leases given back before this get (saves a RELEASE).
    Op.GET_SHM: (_NS, _KEYS, ("rel_o", _ints, OPT), ("rel_g", _ints, OPT)),
    Op.RELEASE: (("rel_o", _ints, REQ), ("rel_g", _ints, REQ)),
    Op.SHM_STAGE: (("size", _uint, REQ),),
    Op.PUT_SHM: (_NS, _KEYS, ("sizes", _ints, REQ), ("offs", _ints, REQ)),  # offs: in the staging file
}

#: OK-response header fields per request opcode.
RESPONSE_FIELDS: dict[Op, tuple] = {
    Op.PING: (),
    Op.AUTH: (),
    Op.PUT: (("stored", _bools, REQ),),
    Op.GET: (("sizes", _ints, REQ),),  # -1: a miss, no bytes in the payload
    Op.EXISTS: (("hits", _bools, REQ),),
    Op.MATCH: (("mode", _str, REQ), ("tiers", _bin, REQ), ("ws", _opt_int, OPT), ("wl", _uint, OPT)),
    Op.DELETE: (("count", _uint, REQ),),
    Op.START_WRITE: (("sid", _uint, REQ), ("keys", _keys, REQ), ("lease", _num, REQ)),
    Op.WRITE: (),
    Op.FINISH_WRITE: (("count", _uint, REQ),),
    Op.ABORT_WRITE: (),
    Op.STATS: (("stats", _map, REQ),),
    # path: the arena file ("" when the daemon has no shared arena, or when the connection's
    # token may not map the default partition's file); shift: where arena offset base is in
    # it; size: its mapped bytes; cap: the usable bytes in it. parts: the same for every file
    # (one per DRAM partition) the connection's token may map, the top-level one included.
    Op.SHM_HELLO: (("path", _str, REQ), ("size", _uint, REQ), ("shift", _uint, REQ), ("cap", _uint, REQ),
                   ("base", _uint, OPT), ("parts", _parts, OPT)),
    # Per key: size -1 a miss, -2 stored but not in DRAM (read it with GET); else its slot.
    Op.GET_SHM: (("sizes", _ints, REQ), ("offs", _ints, REQ), ("gens", _ints, REQ)),
    Op.RELEASE: (("count", _uint, REQ),),
    Op.SHM_STAGE: (("path", _str, REQ), ("size", _uint, REQ)),
    Op.PUT_SHM: (("stored", _bools, REQ),),
}
ERROR_FIELDS = (("code", _uint, REQ), ("msg", _str, REQ), ("dim", _str, OPT))

#: Frames whose payload is the blocks listed by the header's ``sizes``.
BLOCK_OPS_REQUEST = frozenset({Op.PUT, Op.WRITE})
BLOCK_OPS_RESPONSE = frozenset({Op.GET})


def validate_fields(fields: dict, spec: tuple, max_batch: int | None) -> None:
    """Check ``fields`` against a spec table; raise a remote ProtocolError on the first fault."""
    for name, check, required in spec:
        if name not in fields:
            if required:
                raise _bad(f"header field {name!r} is missing")
            continue
        if not check(fields[name], max_batch):
            raise _bad(f"header field {name!r} has the wrong type")


# ---------------------------------------------------------------------------------- errors
def error_to_fields(exc: BaseException) -> dict:
    """The ERROR header for ``exc``: its wire code, message and (capacity) dimension."""
    if isinstance(exc, ProtocolError) and exc.code >= Code.PROTOCOL:
        code = exc.code
    else:
        code = next((_CODE_OF[c] for c in type(exc).__mro__ if c in _CODE_OF), Code.INTERNAL)
    fields = {"code": int(code), "msg": str(exc) or type(exc).__name__}
    dim = getattr(exc, "dimension", "")
    if dim:
        fields["dim"] = dim
    return fields


def error_from_fields(fields: dict) -> StoreError:
    """The exception an ERROR header describes, ready to raise on the receiving side.

    A ProtocolError reported by the peer was caused by what *this* side sent: ``remote=False``.
    """
    validate_fields(fields, ERROR_FIELDS, None)
    code, msg = fields["code"], fields["msg"]
    if code >= Code.PROTOCOL:
        return ProtocolError(msg, remote=False, code=code)
    cls = ERROR_CLASSES.get(code, StoreError)
    if code == Code.INTERNAL:
        msg = f"internal server error: {msg}"
    if issubclass(cls, errors.CapacityError):
        return cls(msg, dimension=fields.get("dim", ""))
    return cls(msg)


# ----------------------------------------------------------------------------------- match
#: One byte per key in a MATCH answer: the fastest tier holding it.
TIER_CODES = {None: 0, "dram": 1, "ssd": 2, "remote": 3}
_TIER_NAMES = {v: k for k, v in TIER_CODES.items()}


def match_to_fields(result: MatchResult) -> dict:
    """A :class:`MatchResult` as OK-response fields (hits are implied by the tiers)."""
    # Per key: its tier's code (an unknown tier counts as DRAM), 0 where it is not a hit.
    # Built with C-level maps: a MATCH carries up to a batch of keys.
    codes = map(TIER_CODES.get, result.tiers, repeat(TIER_CODES["dram"]))
    tiers = bytes(map(operator.mul, codes, result.hits))  # hits are bools: code or 0
    return {"mode": result.mode, "tiers": tiers, "ws": result.window_start, "wl": result.window_len}


def match_from_fields(fields: dict) -> MatchResult:
    """The :class:`MatchResult` an OK response to MATCH carries."""
    raw = fields["tiers"]
    try:
        tiers = list(map(_TIER_NAMES.__getitem__, raw))
    except KeyError:
        raise _bad("unknown tier code in a match answer") from None
    hits = list(map(bool, raw))  # code 0 is "not stored"
    prefix = raw.find(0)
    if prefix < 0:
        prefix = len(raw)
    return MatchResult(mode=fields["mode"], prefix_len=prefix, hits=hits, tiers=tiers,
                       window_start=fields.get("ws"), window_len=fields.get("wl", 0))
