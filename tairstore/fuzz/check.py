"""Checking a reopened store against the expected state, and abandoning a crashed one.

:func:`check_store` is where the invariants are decided, for every harness:

- **W2 / no loss**: a key the model says must be present holds one of its allowed versions;
  being absent when the model requires it is a *lost block*.
- **W1 / R1 / byte-exactness**: whatever a key holds is exactly one version of it
  (:func:`~tairstore.fuzz.model.identify`) and that version is allowed: bytes of an aborted
  session, of a never-acknowledged write outside the in-flight operation, or damaged bytes are
  a *corrupt payload served*.
- **C1**: the quota'd namespace uses no more than its quota.
- **bookkeeping**: :meth:`Store.check` finds the catalog's counts and the SSD space's
  per-segment accounting consistent with the blocks it holds.

:func:`abandon` is what a simulated crash does to the store object: the file system is already
crashed (every operation raises :class:`~tairstore.fuzz.faultfs.SimulatedCrash`), so closing it
cannot change the disk; it only stops its threads and frees the directory lock and the LMDB
environment so the same process can reopen the directory, as a new process would.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from tairstore.errors import MetadataMismatchError, NotFoundError
from tairstore.fuzz.faultfs import SimulatedCrash
from tairstore.fuzz.model import Expected, Tally, identify
from tairstore.fuzz.workload import NAMESPACES, QUOTA_BYTES, QUOTA_NS, key_name, KEYS_PER_NS

__all__ = ["check_store", "check_quota", "observe", "abandon", "quiet_simulated_crashes", "all_keys",
           "fsck_then_open"]

#: How long abandoning may take before it counts as a hang (threads stuck after a crash).
ABANDON_TIMEOUT_S = 20.0


def all_keys() -> list[tuple[str, bytes]]:
    """Every ``(namespace, key)`` a workload can touch."""
    return [(ns, key_name(i)) for ns in NAMESPACES for i in range(KEYS_PER_NS)]


def observe(store) -> dict[tuple[str, bytes], int | None]:
    """The version every key holds now (None: absent or not a valid version)."""
    out = {}
    for ns, key in all_keys():
        view = store.get(key, namespace=ns)
        if view is None:
            out[(ns, key)] = None
            continue
        version, _ = identify(ns, key, view)
        view.release()
        out[(ns, key)] = version
    return out


def check_store(store, model: Expected, tally: Tally, where: str, *,
                rebuilt: bool = False) -> list[str]:
    """Compare every key of the store with the model; count into ``tally``; return failures.

    Args:
        where: the replay hint printed with each failure (seed and command).
        rebuilt: the index was rebuilt from the segments (``fsck --rebuild``) before the open,
            so versions the store had dropped on its own may be back (:meth:`Expected.allowed`).
    """
    failures: list[str] = []
    for ns, key in all_keys():
        allowed = model.allowed(ns, key, rebuilt=rebuilt)
        required = None not in allowed
        view = store.get(key, namespace=ns)
        if view is None:
            if required:
                tally.blocks_lost += 1
                failures.append(f"LOST {ns}/{key.decode()}: absent, expected one of "
                                f"{sorted(allowed)} ({where})")
            continue
        if model.current(ns, key) is not None:
            tally.acked_checked += 1
        version, why = identify(ns, key, view)
        view.release()
        if version is None:
            tally.corrupt_served += 1
            failures.append(f"CORRUPT {ns}/{key.decode()}: {why} ({where})")
        elif version not in allowed:
            # Bytes that are a real version but not one the model allows: an aborted or lost
            # write resurfacing (W1), or an acknowledged overwrite undone (a lost block).
            if model.current(ns, key) is not None and version < model.current(ns, key):
                tally.blocks_lost += 1
                kind = "LOST (older version back)"
            else:
                tally.corrupt_served += 1
                kind = "UNEXPECTED VERSION"
            failures.append(f"{kind} {ns}/{key.decode()}: holds version {version}, expected "
                            f"one of {sorted(allowed, key=str)} ({where})")
    failures += check_quota(store, tally, where)
    # The store's own bookkeeping (catalog counts, SSD space per segment) against itself.
    failures += [f"BOOKKEEPING {problem} ({where})" for problem in store.check()]
    return failures


def check_quota(store, tally: Tally, where: str) -> list[str]:
    """C1: the quota'd namespace uses no more than its total quota, nor any tier's limit."""
    try:
        report = store.quota(QUOTA_NS)
    except NotFoundError:
        return []
    failures = []
    limit = report["total_bytes"] if report["total_bytes"] is not None else QUOTA_BYTES
    if report["used_bytes"] > limit:
        tally.quota_violations += 1
        failures.append(f"C1 namespace {QUOTA_NS!r} uses {report['used_bytes']} bytes > quota "
                        f"{limit} ({where})")
    for tier, t in report["tiers"].items():
        if t["limit"] is not None and t["used"] > t["limit"]:
            tally.quota_violations += 1
            failures.append(f"C1 namespace {QUOTA_NS!r} tier {tier} uses {t['used']} bytes > "
                            f"its limit {t['limit']} ({where})")
    return failures


def abandon(store) -> None:
    """Drop a store whose file system has crashed, without letting it touch the disk.

    Raises:
        RuntimeError: the store's threads did not stop within ``ABANDON_TIMEOUT_S``.
    """
    def close() -> None:
        with contextlib.suppress(BaseException):
            store.close()
        if not store.closed:
            # close() gave up half way (an open session's ABORT could not be logged to the
            # poisoned WAL: see test_close_after_background_wal_failure_releases_the_directory).
            # A killed process releases everything; do the same.
            with contextlib.suppress(BaseException):
                store.abandon()

    t = threading.Thread(target=close, name="tairstore-fuzz-abandon", daemon=True)
    t.start()
    t.join(ABANDON_TIMEOUT_S)
    if t.is_alive():
        raise RuntimeError(f"store threads did not stop within {ABANDON_TIMEOUT_S} s after a crash")
    # close() releases the directory lock even when parts of it failed; make sure.
    with contextlib.suppress(BaseException):
        store._dir.close()
    # A close() that died of the crash leaves segment and WAL files open; the kernel would
    # close them for a killed process. Without this, thousands of crash runs run out of fds.
    fs = getattr(store, "_fs", None)
    if hasattr(fs, "close_all"):
        fs.close_all()


@contextlib.contextmanager
def quiet_simulated_crashes() -> Iterator[None]:
    """Keep background threads that die of a SimulatedCrash from printing a traceback.

    A killed process prints nothing either; any other exception in a thread still shows.
    """
    previous = threading.excepthook

    def hook(args) -> None:
        if isinstance(args.exc_value, SimulatedCrash) or isinstance(
                args.exc_value.__cause__ if args.exc_value else None, SimulatedCrash):
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def fsck_then_open(path: str, open_store, tally: Tally, where: str) -> tuple[dict, object, list[str]]:
    """M1's rule for reopening a damaged or crashed store: ``(fsck report, store, failures)``.

    ``fsck`` (read-only) runs first. When it finds metadata problems (a WAL torn before its
    end by a power loss, an index that does not agree), the open must refuse with
    :class:`~tairstore.errors.MetadataMismatchError`, and ``fsck --rebuild`` must then make
    the store consistent: the caller's :func:`check_store` decides whether every acknowledged
    block came back. An open that accepts metadata fsck calls damaged is a failure.
    """
    from tairstore.engine.fsck import fsck

    failures: list[str] = []
    report = fsck(path)
    if report["problems"]:
        try:
            open_store().close()
        except MetadataMismatchError:
            tally.refused_opens += 1
        else:
            tally.other_failures += 1
            failures.append(f"OPEN ACCEPTED what fsck calls damaged: {report['problems']} ({where})")
        report = fsck(path, rebuild=True)
    return report, open_store(), failures
