"""Argument checks shared by the embedded Store, its options and the network clients.

One place decides what a valid key, namespace, block, output buffer, lease, TTL, time stamp or
option value is, so the Store and a ``Client`` refuse the same inputs with the same
:class:`~tairstore.errors.InvalidArgumentError` (the conformance suite runs against both), and
no value the store cannot use reaches numpy, LMDB or the clock arithmetic (where it would fail
later, untyped, or every second in a background thread).

Numbers: a bool is never a number here (``True`` is an ``int`` to Python, never a lease or a
size to a caller), and a float must be finite (``nan`` compares False with everything, so a
``nan`` TTL would pass a ``> 0`` test and then break every TTL sweep).

This module imports nothing of tairstore but its errors, so that every other module may use it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from tairstore.errors import CapacityError, InvalidArgumentError

__all__ = [
    "MAX_KEY_BYTES", "MAX_NAMESPACE_BYTES", "MAX_LEASE_S",
    "check_namespace", "check_key", "check_keys", "check_block_size", "check_data", "check_out",
    "check_int", "check_real", "check_bool", "check_choice", "check_lease", "check_ttl",
    "check_timestamp",
]

#: Keys are 1..64 bytes: a sha256 chain hash is 32 bytes; 64 leaves room for a prefix or a salt.
MAX_KEY_BYTES = 64
#: Namespaces are stored with a one-byte length in index keys and segment records.
MAX_NAMESPACE_BYTES = 255
#: The longest write-session lease: a session holds reserved space, and an hour is more than any
#: engine needs to fill its blocks.
MAX_LEASE_S = 3600.0


def check_namespace(namespace: Any) -> str:
    """A namespace: a str of 1..255 bytes of UTF-8."""
    if not isinstance(namespace, str):
        raise InvalidArgumentError(f"namespace must be a str, got {type(namespace).__name__}")
    try:
        encoded = namespace.encode()
    except UnicodeEncodeError:
        # A lone surrogate (e.g. from os.fsdecode of bad bytes) has no UTF-8 form.
        raise InvalidArgumentError(
            f"namespace {namespace!r} is not valid Unicode text (it holds a lone surrogate)") from None
    if not 1 <= len(encoded) <= MAX_NAMESPACE_BYTES:
        raise InvalidArgumentError(f"namespace must be 1..{MAX_NAMESPACE_BYTES} bytes of UTF-8")
    return namespace


def check_key(key: Any) -> bytes:
    """A key: bytes (or a bytes-like object) of 1..64 bytes."""
    if isinstance(key, (bytearray, memoryview)):
        key = bytes(key)
    if not isinstance(key, bytes):
        raise InvalidArgumentError(
            f"keys are bytes (1..{MAX_KEY_BYTES}), got {type(key).__name__}; encode strings first")
    if not 1 <= len(key) <= MAX_KEY_BYTES:
        raise InvalidArgumentError(f"keys are 1..{MAX_KEY_BYTES} bytes, got {len(key)}")
    return key


def check_keys(keys: Any) -> list[bytes]:
    """A list of keys; a single key (or a str) is refused rather than iterated bytewise."""
    if isinstance(keys, (bytes, bytearray, memoryview, str)):
        raise InvalidArgumentError("pass a list of keys, not a single key")
    if type(keys) is list and keys and set(map(type, keys)) == {bytes}:
        # The common case (a chain of page hashes), checked by C-level loops: a 1,024-key
        # match spent most of its time in per-key calls of check_key. Keys of one chain
        # mostly share a length, so the set of lengths is tiny.
        lengths = set(map(len, keys))
        if 1 <= min(lengths) and max(lengths) <= MAX_KEY_BYTES:
            return list(keys)
    try:
        return [check_key(k) for k in keys]
    except TypeError:
        raise InvalidArgumentError(f"keys must be a list of bytes, got {type(keys).__name__}") from None


def check_block_size(size: Any, max_block_bytes: int | None = None) -> int:
    """A block's size: an int >= 1 (never a bool); past ``max_block_bytes`` (when given) a
    :class:`~tairstore.errors.CapacityError` with ``dimension="block_size"``."""
    if not isinstance(size, int) or isinstance(size, bool):
        raise InvalidArgumentError(f"block sizes are ints, got {type(size).__name__}")
    if size < 1:
        raise InvalidArgumentError("empty blocks are not stored; a block has >= 1 byte")
    if max_block_bytes is not None and size > max_block_bytes:
        raise CapacityError(f"block of {size} bytes exceeds max_block_bytes={max_block_bytes}",
                            dimension="block_size")
    return size


def _flat_bytes(mv: memoryview, what: str) -> memoryview:
    # The buffer protocol exports an object array as its PyObject* pointers ("O"): storing
    # those would store addresses, not data, and reading them back would forge references.
    if "O" in mv.format:
        raise InvalidArgumentError(
            f"{what} holds Python objects (format {mv.format!r}), not raw bytes; "
            "convert it to a numeric dtype or bytes first")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


def check_data(data: Any) -> memoryview:
    """A block's payload as a flat byte view, without copying it."""
    try:
        mv = memoryview(data)
    except TypeError:
        raise InvalidArgumentError(
            f"block data must be bytes, bytearray, memoryview or a numpy array, not {type(data).__name__}"
        ) from None
    if not mv.c_contiguous:
        raise InvalidArgumentError("block data must be C-contiguous")
    return _flat_bytes(mv, "block data")


def check_out(out: Any) -> memoryview:
    """``get_into``'s destination as a flat writable byte view."""
    try:
        dst = memoryview(out)
    except TypeError:
        raise InvalidArgumentError("out must be a writable buffer (bytearray, numpy array…)") from None
    if dst.readonly or not dst.c_contiguous:
        raise InvalidArgumentError("out must be a writable, C-contiguous buffer")
    return _flat_bytes(dst, "out")


# ------------------------------------------------------------------------------- numbers
def _bounds(lo: Any, hi: Any, lo_open: bool) -> str:
    left = "(" if lo_open else "["
    return f"{left}{lo}, {'inf' if hi is None else hi}]"


def check_int(name: str, value: Any, lo: int = 0, hi: int | None = None) -> int:
    """An integer (numpy integers too, never a bool or a float) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        raise InvalidArgumentError(f"{name} must be an int in {_bounds(lo, hi, False)}, got {value}")
    return value


def check_real(name: str, value: Any, lo: float, hi: float | None = None, *, lo_open: bool = True) -> float:
    """A finite real number (never a bool) in ``(lo, hi]`` (``[lo, hi]`` with ``lo_open=False``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value}")
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        raise InvalidArgumentError(f"{name} must be in {_bounds(lo, hi, lo_open)}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """True or False, not a truthy string (``create="no"`` is True to Python)."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """One of ``choices`` (compared by equality, so an unhashable value is refused too)."""
    if not any(value == c and type(value) is type(c) for c in choices):
        raise InvalidArgumentError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_lease(lease_s: Any) -> float:
    """A write session's lease in seconds: in ``(0, MAX_LEASE_S]`` (the Store and the clients)."""
    return check_real("lease_s", lease_s, 0.0, MAX_LEASE_S)


def check_ttl(ttl_s: Any) -> float | None:
    """A namespace TTL in seconds: None (no expiry) or a finite number > 0."""
    return None if ttl_s is None else check_real("ttl_s", ttl_s, 0.0)


def check_timestamp(name: str, ts: Any) -> float:
    """A Unix time in seconds: a finite number (nan and inf have no nanosecond count)."""
    return check_real(name, ts, -math.inf, None, lo_open=False)
