"""Work split across the calling thread and one shared helper thread.

Copies (``memoryview`` assignment, ``np.copyto``), ``preadv`` / ``pwritev`` and crc32c all
release the GIL, so on a machine with a spare core two threads moving and checksumming halves
of a batch run side by side. One helper thread serves the whole process: its tasks never wait
on each other, so sharing it cannot deadlock; a caller that finds the helper taken by another
caller's half does all its work itself rather than queue behind it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["SPLIT_MIN_BYTES", "half_cut", "helper_pool", "split_parts", "split_run"]

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_on_helper = threading.local()  # .yes on the helper thread
_split_free = threading.Lock()  # held while a split_run's half is on the helper


def _mark_helper() -> None:
    _on_helper.yes = True


def helper_pool() -> ThreadPoolExecutor:
    """The process's one helper thread (started on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tairstore-helper",
                                       initializer=_mark_helper)
        return _pool


#: Below this many bytes a batch is not split across two threads (the hand-off costs more).
SPLIT_MIN_BYTES = 1 << 20


def half_cut(sizes: Sequence[int]) -> int:
    """Where to cut a list of sizes into two parts of about equal bytes (1 <= cut < len, for
    two or more sizes)."""
    n, total = len(sizes), sum(sizes)
    cut, acc = 0, 0
    while cut < n - 1 and acc + sizes[cut] <= total // 2:
        acc += sizes[cut]
        cut += 1
    return max(cut, 1) if n > 1 else n


def split_parts(fn: Callable[[int, int], list], sizes: Sequence[int]) -> list:
    """``fn(0, n)`` as two parts, ``fn(0, cut) + fn(cut, n)`` (about half the bytes each), the
    later part on the helper thread while the caller does the first.

    ``fn(lo, hi)`` handles items ``lo`` to ``hi - 1`` and returns a list. For copies and I/O that
    release the GIL, each followed or preceded by its crc32c (``preadv`` then the checksum, a
    copy into the DRAM arena then the checksum, the checksum then ``pwritev``): each thread
    checksums bytes it has just moved, while they are still in its core's cache, and the two
    parts' copies run side by side. ``fn`` must be safe to call from two threads at once. If
    either part raises, both parts finish first and the first error raised is re-raised.
    """
    n = len(sizes)
    if (n < 2 or sum(sizes) < SPLIT_MIN_BYTES or getattr(_on_helper, "yes", False)
            or not _split_free.acquire(blocking=False)):
        # Small; or already on the helper thread (waiting there for itself would deadlock); or
        # the helper is taken by another caller's part (queueing behind it could make this
        # call slower than doing it all here).
        return fn(0, n)
    cut = half_cut(sizes)

    def run_later() -> list:
        try:
            return fn(cut, n)
        finally:
            _split_free.release()

    try:
        later = helper_pool().submit(run_later)
    except BaseException:
        _split_free.release()
        raise
    try:
        first = fn(0, cut)
    finally:
        rest = later.result() if later.exception() is None else None
    if rest is None:
        raise later.exception()
    return first + rest


def split_run(fn: Callable[[int], Any], sizes: Sequence[int]) -> list[Any]:
    """``[fn(i) for i in range(len(sizes))]`` split as :func:`split_parts` splits."""
    return split_parts(lambda lo, hi: [fn(i) for i in range(lo, hi)], sizes)
