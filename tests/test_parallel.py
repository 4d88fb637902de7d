"""split_run: a batch's I/O and checksums on two threads, results in order, errors raised."""

from __future__ import annotations

import threading

import pytest

from tairstore.parallel import SPLIT_MIN_BYTES, half_cut, split_run


def test_results_keep_their_order_and_large_batches_use_two_threads():
    threads: dict[int, int] = {}

    def fn(i: int) -> int:
        threads[i] = threading.get_ident()
        return i * i

    sizes = [SPLIT_MIN_BYTES // 4] * 8
    assert split_run(fn, sizes) == [i * i for i in range(8)]
    assert sorted(threads) == list(range(8)), "every item exactly once"
    caller = threading.get_ident()
    assert threads[0] == caller and threads[7] != caller, "the later half runs on the helper"


def test_small_batches_stay_on_the_caller():
    seen = []
    assert split_run(lambda i: seen.append(threading.get_ident()) or i, [100, 200, 300]) == [0, 1, 2]
    assert set(seen) == {threading.get_ident()}
    assert split_run(lambda i: i, []) == []


@pytest.mark.parametrize("bad", [0, 7])
def test_an_error_in_either_half_is_raised_after_both_halves_ran(bad):
    ran = set()

    def fn(i: int) -> int:
        ran.add(i)
        if i == bad:
            raise OSError(f"item {i}")
        return i

    with pytest.raises(OSError, match=f"item {bad}"):
        split_run(fn, [SPLIT_MIN_BYTES] * 8)
    # The half without the error ran to its end; nothing is left running on the helper.
    half = range(4, 8) if bad == 0 else range(0, 4)
    assert set(half) <= ran


def test_half_cut_balances_bytes():
    assert half_cut([1, 1, 1, 1]) == 2
    assert half_cut([10, 1, 1, 1]) == 1
    assert half_cut([1, 1, 1, 10]) == 3
    assert half_cut([5]) == 1
    assert half_cut([5, 5]) == 1


def test_a_split_run_started_on_the_helper_thread_runs_there_without_waiting_on_itself():
    from tairstore.parallel import helper_pool

    def outer() -> list[int]:
        return split_run(lambda i: i + 1, [SPLIT_MIN_BYTES] * 4)

    assert helper_pool().submit(outer).result(timeout=60) == [1, 2, 3, 4]


def test_a_caller_that_finds_the_helper_busy_does_everything_itself():
    started, release = threading.Event(), threading.Event()
    threads: dict[int, int] = {}

    def held(i: int) -> int:  # another caller's batch: its helper half waits for the test
        if i == 1:
            started.set()
            release.wait(60)
        return i

    def fn(i: int) -> int:
        threads[i] = threading.get_ident()
        return i

    blocker = threading.Thread(target=split_run, args=(held, [SPLIT_MIN_BYTES] * 2))
    blocker.start()
    try:
        assert started.wait(60), "the other caller's half reached the helper"
        assert split_run(fn, [SPLIT_MIN_BYTES] * 6) == list(range(6))
        assert set(threads.values()) == {threading.get_ident()}, "all of it on the caller"
    finally:
        release.set()
        blocker.join(60)
    assert split_run(fn, [SPLIT_MIN_BYTES] * 2) == [0, 1]
    assert threads[1] != threading.get_ident(), "the helper is free again"


def test_split_parts_hands_each_part_its_range():
    from tairstore.parallel import split_parts

    calls = []

    def part(lo: int, hi: int) -> list[tuple[int, int]]:
        calls.append((lo, hi))
        return [(lo, hi)]

    assert split_parts(part, [SPLIT_MIN_BYTES] * 4) == [(0, 2), (2, 4)]
    assert sorted(calls) == [(0, 2), (2, 4)]
    assert split_parts(part, [10, 10]) == [(0, 2)], "small: one part on the caller"
