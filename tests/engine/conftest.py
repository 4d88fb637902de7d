"""Shared set-up of the engine tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def _run_maintenance(store) -> None:
    """Run one maintenance pass (leases, TTLs, watermarks, compaction step) now, in this thread."""
    store.maintain()


@pytest.fixture
def run_maintenance() -> Callable[[object], None]:
    """The one way engine tests drive maintenance themselves.

    Tests that check what maintenance does open the store with the longest
    ``maintenance_interval_s`` (60 s, so the background thread never ticks during the test) and
    call this instead of waiting for a tick, so they hold on a loaded machine. Should the
    store's entry point be renamed, this is the only place to change.
    """
    return _run_maintenance
