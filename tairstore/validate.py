"""Argument checks shared by the embedded Store and the network clients.

One place decides what a valid key, namespace, block or output buffer is, so the Store and a
``Client`` refuse the same inputs with the same :class:`~tairstore.errors.InvalidArgumentError`
(the conformance suite runs against both).
"""

from __future__ import annotations

from typing import Any

from tairstore.config import MAX_KEY_BYTES, MAX_NAMESPACE_BYTES
from tairstore.errors import InvalidArgumentError

__all__ = ["check_namespace", "check_key", "check_keys", "check_data", "check_out"]


def check_namespace(namespace: Any) -> str:
    """A namespace: a str of 1..255 bytes of UTF-8."""
    if not isinstance(namespace, str):
        raise InvalidArgumentError(f"namespace must be a str, got {type(namespace).__name__}")
    if not 1 <= len(namespace.encode()) <= MAX_NAMESPACE_BYTES:
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
    try:
        return [check_key(k) for k in keys]
    except TypeError:
        raise InvalidArgumentError(f"keys must be a list of bytes, got {type(keys).__name__}") from None


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
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


def check_out(out: Any) -> memoryview:
    """``get_into``'s destination as a flat writable byte view."""
    try:
        dst = memoryview(out)
    except TypeError:
        raise InvalidArgumentError("out must be a writable buffer (bytearray, numpy array…)") from None
    if dst.readonly or not dst.c_contiguous:
        raise InvalidArgumentError("out must be a writable, C-contiguous buffer")
    return dst.cast("B") if (dst.format != "B" or dst.ndim != 1) else dst
