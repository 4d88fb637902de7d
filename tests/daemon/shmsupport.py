"""Helpers of the shared-memory tests (importable from them: conftest.py puts this directory on
sys.path, as pytest runs with --import-mode=importlib)."""

from __future__ import annotations

import os

import numpy as np

from tairstore.daemon.process import DaemonProcess

MiB = 1 << 20
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


def block(i: int, size: int) -> np.ndarray:
    """Block i: its index in the first 8 bytes, then one byte value derived from it, so a torn
    or reused slot can never pass for it."""
    b = np.full(size, (i * 7 + 3) % 256, np.uint8)
    b[:8] = np.frombuffer(int(i).to_bytes(8, "little"), np.uint8)
    return b


def is_block(view, i: int) -> bool:
    """Whether ``view`` holds exactly block i."""
    a = np.frombuffer(view, np.uint8)
    return int.from_bytes(a[:8].tobytes(), "little") == i and bool((a[8:] == (i * 7 + 3) % 256).all())


def daemon(tmp_path, dram: int = 8 * MiB, ssd: int = 0, extra: dict | None = None,
           shm: dict | None = None, **store) -> DaemonProcess:
    """``tairstore serve`` with ``[shm]`` in SHM_DIR (plus ``shm`` keys), ``[store]`` sizes and
    ``store`` options, and the ``extra`` tables (an ``extra["shm"]`` replaces the section)."""
    return DaemonProcess(tmp_path / "data", store={"dram_bytes": dram, "ssd_bytes": ssd, **store},
                         extra={"shm": {"dir": SHM_DIR, **(shm or {})}, **(extra or {})})
