"""Fixtures of the adapter tests; helpers live in connsupport.py (importable from the tests
because this directory is put on sys.path here: pytest runs with --import-mode=importlib)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from connsupport import Daemon  # noqa: E402


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(str(tmp_path_factory.mktemp("daemon")))
    yield d
    d.stop()


@pytest.fixture
def own_daemon(tmp_path):
    d = Daemon(str(tmp_path / "daemon"))
    yield d
    d.stop()


@pytest.fixture
def store_dir(tmp_path):
    """A directory for an embedded store, closed after the test (adapters share one per path)."""
    from tairstore.connectors.common import close_embedded

    d = str(tmp_path / "kv")
    yield d
    close_embedded(d)
