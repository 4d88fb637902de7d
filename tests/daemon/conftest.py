"""Shared fixtures of the daemon tests."""

from __future__ import annotations

import os
import sys
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.dirname(__file__))  # shmsupport.py, for the shared-memory tests


def _metric_counters(text: bytes | str, family: str) -> dict[tuple, float]:
    text = text.decode() if isinstance(text, bytes) else text
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            return {tuple(sorted(s.labels.items())): s.value for s in fam.samples
                    if s.name.endswith("_total")}
    return {}


@pytest.fixture
def metric_counters() -> Callable[[bytes | str, str], dict[tuple, float]]:
    """``metric_counters(text, family)``: ``{sorted (label, value) pairs: count}`` of one
    counter family in a ``/metrics`` text."""
    return _metric_counters
