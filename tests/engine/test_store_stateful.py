"""Stateful property test of the store against a dict model, in every durability mode.

Hypothesis drives random sequences of put / get / get_into / delete / exists / match (all three
modes) / two-phase sessions (start, write some keys, finish with a subset, abort) and
close-and-reopen. The store is sized so that nothing is ever evicted, so the model is exact:
a durable store must equal it after every reopen, and a volatile one (no SSD tier) must come
back empty.

``TAIRSTORE_STATEFUL_EXAMPLES`` raises the number of examples per mode (default 150).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pytest

import tairstore
from tairstore.errors import SessionError

settings.register_profile(
    "tairstore-stateful",
    max_examples=int(os.environ.get("TAIRSTORE_STATEFUL_EXAMPLES", "150")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
STATEFUL = settings.get_profile("tairstore-stateful")

KEYS = [b"key-%d" % i for i in range(8)]
MAX_BLOCK = 8 << 10
MAX_SESSIONS = 3

keys_st = st.sampled_from(KEYS)
key_lists = st.lists(keys_st, min_size=1, max_size=8)


def make_block(size: int, seed: int) -> bytes:
    """``size`` pseudo-random bytes; small and cheap, so examples stay fast."""
    return random.Random(seed).randbytes(size)


blocks = st.builds(make_block, st.integers(1, MAX_BLOCK), st.integers(0, 1 << 16))


@dataclass
class OpenSession:
    """The model of a write session: its keys to write, their payloads, and what was written."""

    session: tairstore.WriteSession
    payloads: dict[bytes, bytes]
    written: list[bytes] = field(default_factory=list)

    def unwritten(self) -> list[bytes]:
        return [k for k in self.session.keys_to_write if k not in self.written]


def expected_match(hits: list[bool], mode: str, window: int | None) -> tuple[int, int | None, int]:
    """(prefix_len, window_start, window_len), written independently of ``tairstore.engine.match``."""
    prefix = next((i for i, h in enumerate(hits) if not h), len(hits))
    if mode != "sliding_window":
        return prefix, None, 0
    # The last run of `window` consecutive hits: the rightmost start whose window is all hits.
    for start in range(len(hits) - window, -1, -1):
        if all(hits[start:start + window]):
            return prefix, start, window
    return prefix, None, 0


class StoreMachine(RuleBasedStateMachine):
    """The store against ``dict[key, bytes]``; subclasses pick the durability mode."""

    durability = "sync"
    volatile = False

    def __init__(self) -> None:
        super().__init__()
        # A fresh directory per example: examples must not see each other's blocks.
        self.dir = tempfile.mkdtemp(prefix="tairstore-stateful-")
        self.path = os.path.join(self.dir, "store")
        self.model: dict[bytes, bytes] = {}
        self.sessions: list[OpenSession] = []
        self.store = self._open()

    def _open(self) -> tairstore.Store:
        if self.volatile:
            return tairstore.open(self.path, dram_bytes=4 << 20, ssd_bytes=0)
        # Far more room than 30 steps of <= 8 KiB blocks can use: nothing is evicted.
        return tairstore.open(self.path, dram_bytes=4 << 20, ssd_bytes=256 << 20,
                              segment_bytes=4 << 20, durability=self.durability)

    def teardown(self) -> None:
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _inflight(self) -> set[bytes]:
        return {k for s in self.sessions for k in s.session.keys_to_write}

    # -- single-key operations ------------------------------------------------------------
    @rule(key=keys_st, data=blocks)
    def put(self, key: bytes, data: bytes) -> None:
        expected = key not in self.model and key not in self._inflight()
        assert self.store.put(key, data) == expected
        if expected:
            self.model[key] = data

    @rule(key=keys_st)
    def get(self, key: bytes) -> None:
        view = self.store.get(key)
        if key in self.model:
            assert view is not None, f"{key!r} is committed but get() missed"
            assert bytes(view) == self.model[key]
            view.release()
        else:
            assert view is None, f"{key!r} is not committed but get() returned it"

    @rule(key=keys_st)
    def get_into(self, key: bytes) -> None:
        out = bytearray(MAX_BLOCK)
        n = self.store.get_into(key, out)
        if key in self.model:
            assert n == len(self.model[key]) and out[:n] == self.model[key]
        else:
            assert n == 0

    @rule(keys=key_lists)
    def delete(self, keys: list[bytes]) -> None:
        distinct = set(keys)
        expected = sum(k in self.model for k in distinct)
        assert self.store.delete(keys) == expected
        for k in distinct:
            self.model.pop(k, None)

    @rule(keys=key_lists)
    def exists(self, keys: list[bytes]) -> None:
        assert self.store.exists(keys) == [k in self.model for k in keys]

    @rule(keys=key_lists, mode=st.sampled_from(["prefix", "exact", "sliding_window"]),
          data=st.data())
    def match(self, keys: list[bytes], mode: str, data) -> None:
        window = data.draw(st.integers(1, len(keys))) if mode == "sliding_window" else None
        res = self.store.match(keys, mode=mode, window=window)
        hits = [k in self.model for k in keys]
        assert res.hits == hits
        assert [t is not None for t in res.tiers] == hits
        prefix, start, length = expected_match(hits, mode, window)
        assert (res.prefix_len, res.window_start, res.window_len) == (prefix, start, length)

    # -- two-phase sessions ---------------------------------------------------------------
    @precondition(lambda self: len(self.sessions) < MAX_SESSIONS)
    @rule(keys=st.lists(keys_st, min_size=1, max_size=4, unique=True),
          payloads=st.lists(blocks, min_size=4, max_size=4))
    def start_session(self, keys: list[bytes], payloads: list[bytes]) -> None:
        taken = set(self.model) | self._inflight()
        s = self.store.start_write(keys, [len(p) for p in payloads[:len(keys)]])
        assert s.keys_to_write == [k for k in keys if k not in taken]
        if s.keys_to_write:
            self.sessions.append(OpenSession(s, dict(zip(keys, payloads))))
        else:
            # Nothing reserved: finishing with no keys is the documented way to close it.
            assert self.store.finish_write(s, []) == 0

    @precondition(lambda self: any(s.unwritten() for s in self.sessions))
    @rule(data=st.data())
    def write_session_key(self, data) -> None:
        s = data.draw(st.sampled_from([s for s in self.sessions if s.unwritten()]))
        key = data.draw(st.sampled_from(s.unwritten()))
        self.store.write(s.session, key, s.payloads[key])
        s.written.append(key)

    @precondition(lambda self: any(s.unwritten() for s in self.sessions))
    @rule(data=st.data())
    def finish_with_unwritten_key_is_refused(self, data) -> None:
        s = data.draw(st.sampled_from([s for s in self.sessions if s.unwritten()]))
        key = data.draw(st.sampled_from(s.unwritten()))
        with pytest.raises(SessionError):
            self.store.finish_write(s.session, [key])
        # The refusal changed nothing: the session is still open and its keys still in flight.
        assert not any(self.store.exists([key]))

    @precondition(lambda self: bool(self.sessions))
    @rule(data=st.data())
    def finish_session(self, data) -> None:
        s = data.draw(st.sampled_from(self.sessions))
        ok = data.draw(st.lists(st.sampled_from(s.written), unique=True)) if s.written else []
        assert self.store.finish_write(s.session, ok) == len(ok)
        for k in ok:
            self.model[k] = s.payloads[k]
        self.sessions.remove(s)

    @precondition(lambda self: bool(self.sessions))
    @rule(data=st.data())
    def abort_session(self, data) -> None:
        s = data.draw(st.sampled_from(self.sessions))
        self.store.abort_write(s.session)
        self.sessions.remove(s)

    # -- restart --------------------------------------------------------------------------
    @rule()
    def close_and_reopen(self) -> None:
        # close() aborts open sessions: their keys never existed.
        self.store.close()
        self.sessions.clear()
        self.store = self._open()
        if self.volatile:
            self.model.clear()
        for key in KEYS:
            view = self.store.get(key)
            if key in self.model:
                assert view is not None, f"{key!r} was committed before close but is gone"
                assert bytes(view) == self.model[key], f"{key!r} changed across reopen"
                view.release()
            else:
                assert view is None, f"{key!r} came back after reopen"

    @invariant()
    def store_equals_model(self) -> None:
        assert self.store.exists(KEYS) == [k in self.model for k in KEYS]
        st_ = self.store.stats()
        assert st_["blocks"] == len(self.model)
        assert st_["sessions_open"] == len(self.sessions)
        assert st_["volatile"] is self.volatile


class SyncMachine(StoreMachine):
    durability = "sync"


class BatchMachine(StoreMachine):
    durability = "batch"


class NoneMachine(StoreMachine):
    durability = "none"


class VolatileMachine(StoreMachine):
    volatile = True


class PartitionedMachine(StoreMachine):
    """The default namespace in a DRAM partition of its own (not partition 0), beside another."""

    durability = "batch"

    def _open(self) -> tairstore.Store:
        parts = {"other": {"bytes": 1 << 20, "namespaces": ["other"]},
                 "mine": {"bytes": 2 << 20, "namespaces": ["default"]}}
        return tairstore.open(self.path, dram_bytes=4 << 20, ssd_bytes=256 << 20,
                              segment_bytes=4 << 20, durability=self.durability,
                              dram_partitions=parts)


TestStoreSync = SyncMachine.TestCase
TestStoreSync.settings = STATEFUL
TestStoreBatch = BatchMachine.TestCase
TestStoreBatch.settings = STATEFUL
TestStoreNone = NoneMachine.TestCase
TestStoreNone.settings = STATEFUL
TestStoreVolatile = VolatileMachine.TestCase
TestStoreVolatile.settings = STATEFUL
TestStorePartitioned = PartitionedMachine.TestCase
TestStorePartitioned.settings = settings(STATEFUL, max_examples=max(STATEFUL.max_examples // 3, 1))
