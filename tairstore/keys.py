"""Page keys: the prefix-chained hashes that name KV-cache blocks.

Key ``i`` of a token sequence covers tokens ``0 .. (i+1) * page_size``: it hashes the previous
page's key followed by page ``i``'s token ids, so a hit on key ``i`` implies the whole prefix
(a *chain*, see DESIGN.md). Only full pages get a key; a trailing partial page is dropped,
because its key would change as soon as the page fills.

Byte layout (``algo="sha256"``), identical to SGLang's HiCache ``get_hash_str``::

    key[i] = sha256( key[i-1] | page_i[0].to_bytes(4, "little", signed=False) | ... )

where ``key[-1]`` is ``prior`` (nothing at all when ``prior`` is None). SGLang returns
``hexdigest()``; we return the 32 raw digest bytes, so ``key.hex()`` is SGLang's string and
``bytes.fromhex(sglang_hash)`` is our key. SGLang writes ids *unsigned*: ids are accepted in
``0 .. 2**32 - 1`` (real vocabularies sit far below 2**31, where signed and unsigned int32 bytes
agree); a negative or larger id is refused rather than wrapped, since wrapping would silently
alias two different prefixes.

``algo="xxh3"`` chains the same way with XXH3-64 (seed 0) and yields 8-byte keys (the digest in
xxhash's canonical big-endian order). It is faster (about 2.5x on a numpy input) but not
collision-resistant against an adversary: use it only where tenants cannot choose token ids to
collide with each other's keys.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from typing import Callable

import numpy as np
import xxhash

from tairstore.errors import InvalidArgumentError

__all__ = ["ALGORITHMS", "KEY_SIZES", "chain_hashes"]

# Digest length per algorithm, which is also the length a ``prior`` key must have.
KEY_SIZES: dict[str, int] = {"sha256": 32, "xxh3": 8}
ALGORITHMS = tuple(KEY_SIZES)

# SGLang serialises each id with to_bytes(4, signed=False): these are the ids it can encode.
_TOKEN_MIN = 0
_TOKEN_MAX = 2**32 - 1
_TOKEN_BYTES = 4
_WIRE_DTYPE = np.dtype("<u4")

_HASHERS: dict[str, Callable[[bytes], object]] = {
    "sha256": hashlib.sha256,
    "xxh3": xxhash.xxh3_64,
}


def chain_hashes(
    token_ids: Sequence[int] | np.ndarray,
    page_size: int,
    *,
    prior: bytes | None = None,
    algo: str = "sha256",
) -> list[bytes]:
    """Return one chained key per full page of ``token_ids``.

    Args:
        token_ids: token ids as a list, any sequence or iterable of ints, or a 1-D numpy integer
            array (the fast path: converted once, then hashed page by page without copies).
        page_size: tokens per page (>= 1); a trailing partial page gets no key.
        prior: the key of the page before ``token_ids[0]`` (to continue a chain), or None at
            the start of a sequence. Must be ``KEY_SIZES[algo]`` bytes long.
        algo: ``"sha256"`` (SGLang-compatible, 32-byte keys) or ``"xxh3"`` (8-byte keys).

    Returns:
        ``len(token_ids) // page_size`` keys; ``chain_hashes(a + b, n)`` equals
        ``ka + chain_hashes(b, n, prior=ka[-1])`` with ``ka = chain_hashes(a, n)`` when
        ``len(a)`` is a multiple of ``n``.

    Raises:
        InvalidArgumentError: bad ``page_size``, unknown ``algo``, a ``prior`` of the wrong
            length, ids that are not integers, or an id outside ``0 .. 2**32 - 1``.
    """
    if isinstance(page_size, bool):
        raise InvalidArgumentError(f"page_size must be an integer, got {page_size!r}")
    try:
        page_size = operator.index(page_size)
    except TypeError:
        raise InvalidArgumentError(f"page_size must be an integer, got {page_size!r}") from None
    if page_size < 1:
        raise InvalidArgumentError(f"page_size must be at least 1, got {page_size}")
    new_hasher = _HASHERS.get(algo)
    if new_hasher is None:
        raise InvalidArgumentError(f"unknown hash algo {algo!r}; expected one of {ALGORITHMS}")
    if prior is not None:
        prior = bytes(prior)
        if len(prior) != KEY_SIZES[algo]:
            raise InvalidArgumentError(
                f"prior must be a {KEY_SIZES[algo]}-byte {algo} key, got {len(prior)} bytes"
            )

    ids = _as_id_array(token_ids)
    pages = len(ids) // page_size
    if pages == 0:
        return []
    # One conversion of every full page to the wire layout, then zero-copy slices of it.
    wire = memoryview(ids[: pages * page_size].astype(_WIRE_DTYPE, copy=False).tobytes())
    step = page_size * _TOKEN_BYTES

    keys: list[bytes] = []
    prev = prior
    for start in range(0, pages * step, step):
        hasher = new_hasher()
        if prev is not None:
            hasher.update(prev)
        hasher.update(wire[start : start + step])
        prev = hasher.digest()
        keys.append(prev)
    return keys


def _as_id_array(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """``token_ids`` as a 1-D integer array whose values all fit the unsigned 32-bit layout."""
    if isinstance(token_ids, np.ndarray):
        ids = token_ids
    else:
        if not isinstance(token_ids, Sequence):
            token_ids = list(token_ids)  # generators and other one-shot iterables
        if len(token_ids) == 0:
            return np.empty(0, dtype=_WIRE_DTYPE)
        try:
            ids = np.asarray(token_ids)
        except (OverflowError, ValueError) as exc:
            raise InvalidArgumentError(f"token ids must be integers: {exc}") from None
    if ids.ndim != 1:
        raise InvalidArgumentError(f"token ids must be one-dimensional, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        # Floats would truncate and bools or objects have no defined id layout: refuse them.
        raise InvalidArgumentError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < _TOKEN_MIN or hi > _TOKEN_MAX:
            bad = lo if lo < _TOKEN_MIN else hi
            raise InvalidArgumentError(
                f"token id {bad} is outside {_TOKEN_MIN}..{_TOKEN_MAX} "
                "(ids are hashed as unsigned 32-bit little-endian, as SGLang does)"
            )
    return ids
