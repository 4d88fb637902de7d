"""Shared set-up of the fuzz and crash tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _quiet_engine_logs():
    # Every injected fault or simulated crash makes the engine (or the HTTP API) log its
    # correct refusal; thousands of them drown a report. Restored after each test, also for
    # the CLI tests, whose commands disable logging themselves.
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)
