"""One regression test per bug the fuzz harness found, named after the behaviour it guards.

Each docstring describes the failure and gives the harness run that first showed it.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import subprocess
import sys
import time

import pytest

import tairstore
from tairstore.errors import FatalIOError, InvalidArgumentError, StoreLockedError
from tairstore.engine.fsck import fsck
from tairstore.fuzz.check import abandon, quiet_simulated_crashes
from tairstore.fuzz.faultfs import FaultFS

_BLOCK = bytes(range(256)) * 16
# The background WAL flush runs every batch_interval_ms; this bounds the wait for it to fail.
# Generous: on a loaded machine the flusher thread may not run for seconds.
_WAIT_S = 30.0


def _wait_for(predicate, timeout: float = _WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def test_close_after_background_wal_failure_releases_the_directory(tmp_path):
    """Found by ``tairstore fuzz crashpoints --random-seed 1066082176735``.

    A WAL fsync that fails in a background thread (here the batch-mode flush; in the fuzz run
    the compactor) poisons the WAL without marking the store failed. ``close()`` with a write
    session still open then tries to log that session's ABORT, gets FatalIOError, and returns
    half way: the directory stays locked and LMDB stays open, so nothing in this process can
    reopen the store. An fsync failure must stop writes, not make the store impossible to
    close.
    """
    path = str(tmp_path / "store")
    fs = FaultFS(path, seed=0)
    store = tairstore.open(path, fs=fs, durability="batch", dram_bytes=1 << 20, ssd_bytes=4 << 20)
    session = store.start_write([b"open-session"], [len(_BLOCK)])
    assert session.keys_to_write == [b"open-session"]
    fs.fail_next("fsync", errno.EIO, path_contains="wal")
    try:
        # The background flush may fail while this put is still in its write-through (a loaded
        # machine): then the put reports the failure itself. Either way the WAL is poisoned.
        store.put(b"k", _BLOCK)
    except FatalIOError:
        pass
    _wait_for(lambda: fs.injected["eio"] == 1)
    try:
        store.close()
    except FatalIOError:
        pass  # saying so is right; leaving the store open is not
    try:
        again = tairstore.open(path, durability="batch", dram_bytes=1 << 20, ssd_bytes=4 << 20)
    except StoreLockedError:
        abandon(store)  # let the rest of the suite go on
        pytest.fail("close() after a failed WAL fsync left the data directory locked")
    again.close()


def test_none_mode_power_loss_leaves_no_index_entry_for_lost_bytes(tmp_path):
    """Found by ``tairstore fuzz crashpoints --random-seed 522284859645`` (durability="none").

    In ``durability="none"`` the index writer commits LMDB transactions (which LMDB fsyncs)
    naming segment records that were never fsynced. After a power loss that drops those
    records, the durable index still names them; recovery loads LMDB entries without checking
    them, so ``exists``/``match`` report blocks whose bytes are gone and ``fsck`` reports them
    corrupt until someone repairs by hand. W2 wants such a key absent.
    """
    path = str(tmp_path / "store")
    fs = FaultFS(path, seed=0)
    store = tairstore.open(path, fs=fs, durability="none", dram_bytes=1 << 20, ssd_bytes=4 << 20)
    assert store.put(b"k", _BLOCK)
    store._index.wait_applied(timeout=_WAIT_S)  # LMDB has committed the entry
    fs.crash()
    abandon(store)
    fs.materialise(fate="drop")  # power loss: nothing unsynced reached the disk
    with tairstore.open(path, durability="none", dram_bytes=1 << 20, ssd_bytes=4 << 20) as again:
        # Once LMDB names the block, its bytes must have been made durable first: present
        # and byte-exact (the fix: the index writer fsyncs the segments before committing).
        if again.exists([b"k"]) == [True]:
            view = again.get(b"k")
            assert view is not None, "the index names a block whose bytes were lost"
            assert bytes(view) == bytes(_BLOCK)
    report = fsck(path)
    assert report["ok"], f"fsck needs a repair after a power loss: {report}"


_KILLED_WRITER = r"""
import os, signal, sys
import tairstore
store = tairstore.open(sys.argv[1], durability=sys.argv[2], batch_interval_ms=60_000,
                       dram_bytes=1 << 20, ssd_bytes=4 << 20)
for i in range(20):
    assert store.put(b"k%d" % i, bytes(range(256)) * 16)  # acknowledged
print("acked", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # a process crash: the page cache survives it
"""


@pytest.mark.parametrize("durability", ["batch", "none"])
def test_kill9_keeps_acknowledged_puts_in_batch_and_none_modes(tmp_path, durability):
    """Found by ``tairstore fuzz crash --seed 1 --iterations 16`` (iteration 15, "batch").

    docs/ARCHITECTURE.md's durability table promises that in ``batch`` (and ``none``) mode an
    acknowledged write survives ``kill -9`` ("nothing lost (the OS has it)"); only a power loss
    may take the last ``batch_interval_ms``. But ``put`` / ``finish_write`` / ``delete`` only
    append the WAL record to an in-process buffer (``WalWriter.append``) and acknowledge; the
    record reaches the OS when the background flush runs. A SIGKILL inside that interval loses
    acknowledged puts and commits, and brings deleted keys back. The kill loop saw exactly
    that: an acknowledged put absent, acknowledged deletes undone.
    """
    path = str(tmp_path / "store")
    child = subprocess.run([sys.executable, "-c", _KILLED_WRITER, path, durability],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout.strip() == "acked"
    with tairstore.open(path, durability=durability, dram_bytes=1 << 20,
                        ssd_bytes=4 << 20) as store:
        lost = [i for i in range(20) if store.get(b"k%d" % i) is None]
        assert not lost, (f"acknowledged puts {lost} (of 20) were lost to kill -9 in "
                          f"{durability!r} mode")


def test_load_config_of_a_non_utf8_file_raises_invalid_argument(tmp_path):
    """Found while writing the TOML config target of the decoder fuzzers (issue 5).

    ``load_config`` promises that a file that is missing, not TOML or invalid raises
    InvalidArgumentError (``FILE: reason``), so ``tairstore serve`` refuses it with a clear
    message. ``tomllib.load`` decodes the bytes as UTF-8 itself and lets UnicodeDecodeError
    out, which is not a TOMLDecodeError, so any config file holding one byte that is not UTF-8
    escapes as a raw UnicodeDecodeError. TOML files are UTF-8 by definition: such a file is
    "not valid TOML".
    """
    from tairstore.daemon.config import load_config

    path = tmp_path / "tairstore.toml"
    path.write_bytes(b"\xff")
    with pytest.raises(InvalidArgumentError):
        load_config(str(path))


def test_client_fed_bytes_after_a_connection_error_frame_stays_broken():
    """Found by ``python -m tairstore.fuzz.atheris_targets protocol`` (issue 5, in a minute).

    A client that receives the server's connection-level ERROR frame (request id 0) marks the
    connection BROKEN and returns the ProtocolErrorEvent, but ``receive_data`` keeps decoding
    the rest of the same chunk: once 28 more bytes (one prelude) follow in that chunk it looks
    up the BROKEN state in its table of receive steps and raises ``KeyError: 'BROKEN'``. The
    protocol's rule 6 says every malformed input gives a ProtocolError (raised or as an
    event), never another exception; a server that sends its id-0 ERROR and then anything in
    the same TCP segment, or one corrupted stream, crashes the client's reader instead.
    The fuzzer's input was 83 bytes: an OK frame with request id 0 and unknown flags, then
    zeros.
    """
    from tairstore.errors import ProtocolError, StoreError
    from tairstore.net.protocol import PRELUDE, Connection, Op, ProtocolErrorEvent, Request, Response, Role

    client = Connection(Role.CLIENT)
    client.send(Request(1, Op.PING))
    server = Connection(Role.SERVER)
    goodbye = b"".join(bytes(b) for b in server.send(Response(0, error=StoreError("shutting down"))))
    try:
        events = client.receive_data(goodbye + bytes(PRELUDE.size))
    except ProtocolError:
        events = None  # a local "the connection is broken" is a fine answer too
    if events is not None:
        assert any(isinstance(e, ProtocolErrorEvent) and e.fatal for e in events), events
    assert client.broken


def _fds_under(path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if str(path) in target:
            out.append(target)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_an_open_that_dies_after_the_segment_log_opened_keeps_no_descriptor(tmp_path):
    """Found by CI's ``test_random_workloads_crashed_at_random_points`` (run seed 1039856952467,
    point 8) on a loaded machine.

    ``tairstore.open`` failed after the segment log had created its head segment; the teardown
    closed the log, whose final sync died of something that is not a ``FatalIOError`` and
    returned before closing any file. The store object was garbage, its files with it, and each
    such failed open leaked a descriptor (in a daemon that retries opening, until it runs out).
    Every crash point of a store's creation and first open must leave nothing open once the
    crashed store's garbage is collected (the harness closes only files still referenced).
    """
    for point in range(1, 40):
        path = tmp_path / f"p{point}"
        fs = FaultFS(str(path), seed=point)
        fs.arm_crash(point)
        store = None
        try:
            store = tairstore.open(str(path), fs=fs, dram_bytes=64 << 10, ssd_bytes=2 << 20,
                                   durability="sync", background=False)
        except BaseException:  # noqa: BLE001 - the simulated crash
            assert fs.crashed
        if store is not None:
            # The open survived this point: this is the end of the creation phase.
            abandon(store)
            break
        gc.collect()
        assert _fds_under(path) == [], f"crash point {point}"
    else:
        raise AssertionError("the open never got past 40 crash points")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_closes_whose_final_sync_dies_still_close_their_files(tmp_path):
    """The same bug at its root: ``SegmentLog.close`` and ``WalWriter.close`` close their files
    even when the final sync raises something other than an I/O error."""
    from tairstore.fuzz.faultfs import SimulatedCrash
    from tairstore.tiers.ssd import SegmentLog
    from tairstore.wal.log import WalWriter
    from tairstore.wal.records import Abort

    fs = FaultFS(str(tmp_path))
    log = SegmentLog(fs, str(tmp_path / "segments"), capacity_bytes=1 << 20,
                     segment_bytes=64 << 10).open()
    res = log.reserve("default", b"k", 100)
    log.write(res, "default", b"k", b"x" * 100, generation=1)
    wal = WalWriter(fs, str(tmp_path / "wal"), durability="none", next_lsn=1)
    wal.append(Abort(1))  # buffered: close() must write it, and that write dies
    fs.crash()
    with pytest.raises(SimulatedCrash):
        log.close()
    with pytest.raises((SimulatedCrash, FatalIOError)):
        wal.close()
    assert _fds_under(tmp_path) == []


def test_a_block_dropped_on_a_checksum_failure_may_come_back_from_a_rebuild_byte_exact(tmp_path):
    """Found by the Hypothesis stateful model on a loaded machine: ``UNEXPECTED VERSION
    default/k001: holds version 4, expected one of [None] (rule=crash)``.

    A read that sees a flipped bit drops the block (R1) but writes no tombstone, and the flip
    may have been in transit only: the record on disk is intact. After a reopen the model took
    the key as absent for good, yet a later ``fsck --rebuild`` (after a crash that tore the
    WAL) indexes that intact record again. That is correct (the bytes verify and are the key's;
    only explicit deletes are tombstoned), so the model allows it after a rebuild, and only
    then: a plain reopen must not bring the block back.
    """
    from tairstore.fuzz.check import check_store, observe
    from tairstore.fuzz.model import Expected, Tally, content
    from tairstore.fuzz.workload import key_name, store_options

    root = str(tmp_path / "s")
    fs = FaultFS(root, 7)
    opts = store_options("sync")
    store = tairstore.open(root, fs=fs, background=False, promote_on="never", **opts)
    model = Expected("sync")
    key = key_name(1)
    change = [("default", key, 4)]
    model.begin(change)
    assert store.put(key, content("default", key, 4), tier="ssd")
    model.ack(change)
    fs.flip_next_read(path_contains="segments")
    assert store.get(key) is None  # the flip is caught: a miss, the block dropped
    fs.clear_faults()
    model.dropped("default", key)
    store.close()
    fs.close_all()

    store = tairstore.open(root, background=False, promote_on="never", **opts)
    tally = Tally()
    assert check_store(store, model, tally, "reopen") == []
    model.restart(observe(store))
    store.close()

    report = fsck(root, rebuild=True)
    assert report["ok"] and report["rebuilt_blocks"] == 1
    store = tairstore.open(root, background=False, promote_on="never", **opts)
    try:
        view = store.get(key)
        assert bytes(view) == content("default", key, 4)  # back, byte-exact
        view.release()
        assert check_store(store, model, tally, "rebuilt", rebuilt=True) == []
        failures = check_store(store, model, tally, "not rebuilt")
        assert len(failures) == 1 and "UNEXPECTED VERSION default/k001" in failures[0]
    finally:
        store.close()


@pytest.mark.parametrize("how", ["delete", "trim"])
def test_a_delete_of_an_evicted_key_survives_a_power_loss(tmp_path, how):
    """Found by ``tairstore fuzz stateful --seed 617436441932 --steps 40`` (step 36; in about
    one run in four, as thread timing decides whether the DELETE below is fsynced in time).

    A write session in a namespace at its quota evicts an older block of that namespace: the
    eviction logs a DELETE but, like every eviction, does not wait for it to be durable. The
    session is then aborted (nothing fsynced), and the application deletes that same key (or
    trims the namespace): the store finds it already gone, logs nothing and, in
    ``durability="sync"``, acknowledged without an fsync. A power loss then took the
    eviction's DELETE, and the deleted block was back after the reopen. An acknowledged delete
    must stay a delete: it now makes every record logged before it durable.
    """
    path = str(tmp_path / "store")
    opts = dict(durability="sync", dram_bytes=1 << 20, ssd_bytes=4 << 20, background=False)
    fs = FaultFS(path, seed=0)
    store = tairstore.open(path, fs=fs, **opts)
    store.set_quota("q", total_bytes=len(_BLOCK))
    assert store.put(b"a", _BLOCK, namespace="q")
    session = store.start_write([b"c"], [len(_BLOCK)], namespace="q")  # evicts a
    assert store.exists([b"a"], namespace="q") == [False]
    store.abort_write(session)
    # a is already gone: the delete (or trim) finds nothing, and is acknowledged all the same.
    assert (store.delete([b"a"], namespace="q") if how == "delete" else store.trim("q")) == 0
    with quiet_simulated_crashes():  # the index thread meets the crash too
        fs.crash()
        abandon(store)
    fs.materialise(fate="drop")  # power loss: nothing unsynced reached the disk
    with tairstore.open(path, **opts) as again:
        assert again.get(b"a", namespace="q") is None, "a deleted block came back after a crash"


def test_quotas_hold_after_a_rebuild_from_the_segments(tmp_path):
    """Found by ``tairstore fuzz all --minutes 5 --seed 1210``: the random crash run
    ``tairstore fuzz crashpoints --random-seed 922384473854`` (durability "batch") crashes with
    the WAL damaged before its end, so the store is rebuilt from its segments. The rebuild
    dropped the namespace settings (they live in the index it replaced) and brought back the
    blocks the quota had evicted (evictions leave no tombstone): the quota namespace held 54,005
    bytes against its 49,152 (C1). A rebuild now carries the settings over, and an open evicts
    down to each quota what recovery brought back beyond it.
    """
    from tairstore.fuzz.crashpoints import random_run_spec, run_crash
    from tairstore.fuzz.model import Tally

    tally = Tally()
    failures, _ = run_crash(str(tmp_path), random_run_spec(922384473854), tally)
    assert not failures, failures
    assert tally.quota_violations == 0


def test_fsck_finds_the_records_after_one_torn_by_a_crash(tmp_path):
    """Found by ``tairstore fuzz all --minutes 5 --seed 1212`` (durability "writeback"): the
    replay below failed in about one run in three, as thread timing decides what the crash
    cuts. A write-back flush into an earlier reservation was torn by the crash while later
    records of the segment were durable; the segment scan stopped at the torn header, so fsck
    called those intact, committed blocks corrupt. The deterministic check is
    ``tests/tiers/test_ssd.py::test_scan_resyncs_after_a_bad_header``.
    """
    from tairstore.fuzz.crashpoints import random_run_spec, run_crash
    from tairstore.fuzz.model import Tally

    tally = Tally()
    failures, _ = run_crash(str(tmp_path), random_run_spec(534806265928), tally)
    assert not failures, failures


def test_a_delete_writes_its_tombstone_before_logging_its_delete(tmp_path):
    """Found by ``tairstore fuzz all --minutes 5 --seed 1213``: the random crash run
    ``tairstore fuzz crashpoints --random-seed 759457935005`` (durability "batch", about one run
    in three) brought a deleted block back. The DELETE was logged before its tombstone was
    written; the background WAL flush made the DELETE durable in between, its segment fsync
    (``pre_sync``) running before the tombstone existed, and the acknowledged ``sync()`` then
    found the WAL durable and fsynced nothing. The crash took the tombstone, left the WAL
    damaged, and the rebuild from the segments brought the block back. Every segment byte a WAL
    record implies must be written before the record is logged, and ``sync()`` fsyncs the
    segments as well.
    """
    from tairstore.engine.lifecycle import Journal
    from tairstore.fuzz.crashpoints import random_run_spec, run_crash
    from tairstore.fuzz.model import Tally
    from tairstore.tiers.ssd import SegmentLog
    from tairstore.wal.records import Delete

    events = []
    real_log, real_tomb = Journal.log, SegmentLog.write_tombstone

    def log(self, rec, ops):
        events.append(type(rec).__name__)
        return real_log(self, rec, ops)

    def tomb(self, ns, key, generation):
        events.append("tombstone")
        return real_tomb(self, ns, key, generation)

    path = str(tmp_path / "store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Journal, "log", log)
        mp.setattr(SegmentLog, "write_tombstone", tomb)
        with tairstore.open(path, durability="batch", dram_bytes=1 << 20, ssd_bytes=4 << 20) as s:
            assert s.put(b"a", _BLOCK) and s.put(b"b", _BLOCK)
            events.clear()
            assert s.delete([b"a", b"b"]) == 2
    assert events == ["tombstone", "tombstone", Delete.__name__]
    tally = Tally()
    failures, _ = run_crash(str(tmp_path / "replay"), random_run_spec(759457935005), tally)
    assert not failures, failures
