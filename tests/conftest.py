"""Fixtures shared by the whole test tree."""

from __future__ import annotations

import time

import pytest

from tairstore.tiers.remote.master import MooncakeMaster, find_master_binary

#: Generous bound on waiting for a condition on a loaded machine; tests never assert timing.
WAIT_S = 120.0


def _mooncake_missing() -> str | None:
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        return f"Mooncake wheel not importable (pip install '.[mooncake]'; needs libibverbs1): {exc}"
    if find_master_binary() is None:
        return "mooncake_master not found beside the interpreter or on PATH"
    return None


@pytest.fixture
def master():
    """A fresh, real ``mooncake_master`` on 127.0.0.1 (no objects) for one test."""
    reason = _mooncake_missing()
    if reason:
        pytest.skip(reason)
    with MooncakeMaster() as m:
        yield m


def _wait_for(cond, deadline_s: float = WAIT_S) -> bool:
    """Poll ``cond`` until it holds or ``deadline_s`` passes; its last answer."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return bool(cond())


@pytest.fixture
def wait_for():
    """``wait_for(cond)``: True once ``cond()`` holds, within a generous deadline."""
    return _wait_for
