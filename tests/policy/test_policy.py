"""Eviction policies: hand-made orders per policy, then Hypothesis against reference models."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tairstore.errors import InvalidArgumentError
from tairstore.policy import leaf_lru
from tairstore.policy import LRU, POLICIES, S3FIFO, EvictionPolicy, LeafLRU, make_policy

ALL = sorted(POLICIES)


def drain(p: EvictionPolicy, skip=None) -> list:
    out = []
    while (k := p.pop_victim(skip)) is not None:
        out.append(k)
    return out


# ------------------------------------------------------------------------------ registry
def test_registry_names_and_protocol() -> None:
    assert set(POLICIES) == {"lru", "leaf_lru", "s3fifo"}
    for name in ALL:
        p = make_policy(name, capacity_bytes=100)
        assert isinstance(p, EvictionPolicy)
        assert p.name == name


def test_unknown_policy_lists_valid_ones() -> None:
    with pytest.raises(InvalidArgumentError, match="leaf_lru, lru, s3fifo"):
        make_policy("arc")


@pytest.mark.parametrize("name", ALL)
def test_double_insert_and_negative_size_raise(name: str) -> None:
    p = make_policy(name)
    p.on_insert("a", 1)
    with pytest.raises(ValueError):
        p.on_insert("a", 1)
    with pytest.raises(InvalidArgumentError):
        p.on_insert("b", -1)
    assert len(p) == 1 and p.bytes == 1


@pytest.mark.parametrize("name", ALL)
def test_unknown_keys_are_ignored(name: str) -> None:
    p = make_policy(name)
    p.on_access("nope")
    p.on_remove("nope")
    assert len(p) == 0 and p.bytes == 0 and p.pop_victim() is None
    assert p.victims(10) == []


@pytest.mark.parametrize("name", ALL)
def test_remove_then_pop_never_returns_removed(name: str) -> None:
    p = make_policy(name)
    for k in "abcd":
        p.on_insert(k, 3)
    p.on_remove("b")
    assert "b" not in p and len(p) == 3 and p.bytes == 9
    assert sorted(drain(p)) == ["a", "c", "d"]
    assert p.bytes == 0


@pytest.mark.parametrize("name", ALL)
def test_all_skipped_returns_none_and_keeps_keys(name: str) -> None:
    p = make_policy(name)
    for i in range(5):
        p.on_insert(i, 1, i - 1 if i else None)
        p.on_access(i)
    assert p.pop_victim(skip=lambda k: True) is None
    assert p.victims(3, skip=lambda k: True) == []
    assert len(p) == 5 and p.bytes == 5


@pytest.mark.parametrize("name", ALL)
def test_victims_sum_reaches_request(name: str) -> None:
    p = make_policy(name)
    sizes = {"a": 5, "b": 7, "c": 1, "d": 9}
    for k, s in sizes.items():
        p.on_insert(k, s)
    got = p.victims(10)
    assert sum(sizes[k] for k in got) >= 10
    # Minimal: without its last victim the sum was still short.
    assert sum(sizes[k] for k in got[:-1]) < 10
    assert p.bytes == sum(sizes.values()) - sum(sizes[k] for k in got)
    assert p.victims(0) == []
    rest = p.victims(10**9)
    assert sorted(got + rest) == sorted(sizes)


# ----------------------------------------------------------------------------------- LRU
def test_lru_order() -> None:
    p = LRU()
    for k in "abcde":
        p.on_insert(k, 1)
    p.on_access("a")
    p.on_access("c")
    assert drain(p) == ["b", "d", "e", "a", "c"]


def test_lru_skip_leaves_pinned_in_place() -> None:
    p = LRU()
    for k in "abc":
        p.on_insert(k, 1)
    assert p.pop_victim(skip=lambda k: k == "a") == "b"
    # "a" was pinned, not used: it is still the coldest once unpinned.
    assert drain(p) == ["a", "c"]


# ------------------------------------------------------------------------------ LeafLRU
def test_leaf_lru_evicts_tails_first() -> None:
    p = LeafLRU()
    # Chain r -> a -> b and a branch r -> x; r is the oldest and x the newest.
    p.on_insert("r", 1)
    p.on_insert("a", 1, "r")
    p.on_insert("b", 1, "a")
    p.on_insert("x", 1, "r")
    assert drain(p) == ["b", "a", "x", "r"]


def test_leaf_lru_parent_becomes_leaf_with_its_own_recency() -> None:
    p = LeafLRU()
    p.on_insert("a", 1)
    p.on_insert("a1", 1, "a")
    p.on_insert("z", 1)
    p.on_access("a")  # a is now newer than z, though it has a child
    assert p.pop_victim() == "a1"  # the only leaves: a1 (older) and z
    assert drain(p) == ["z", "a"]


def test_leaf_lru_pinned_leaf_protects_ancestors() -> None:
    p = LeafLRU()
    p.on_insert("a", 1)
    p.on_insert("b", 1, "a")
    p.on_insert("c", 1, "b")
    p.on_insert("z", 1)
    assert p.pop_victim(skip=lambda k: k == "c") == "z"
    assert p.pop_victim(skip=lambda k: k == "c") is None
    assert drain(p) == ["c", "b", "a"]


def test_leaf_lru_child_of_absent_parent_is_root_and_counts_later() -> None:
    p = LeafLRU()
    p.on_insert("b", 1, "a")  # a not resident: b is a root
    p.on_insert("a", 1)  # a arrives after its child: it must not be a leaf
    p.on_insert("z", 1)
    assert drain(p) == ["b", "a", "z"]


def test_leaf_lru_remove_middle_makes_children_roots() -> None:
    p = LeafLRU()
    p.on_insert("a", 1)
    p.on_insert("b", 1, "a")
    p.on_insert("c", 1, "b")
    p.on_remove("b")  # a has no resident child now; c's parent is absent
    assert drain(p) == ["a", "c"]


def test_leaf_lru_heap_stays_bounded_under_hits() -> None:
    p = LeafLRU()
    for i in range(10):
        p.on_insert(i, 1)
    for _ in range(10_000):
        p.on_access(3)
    assert len(p._heap) <= 64
    assert drain(p) == [0, 1, 2, 4, 5, 6, 7, 8, 9, 3]


# ------------------------------------------------------------------------------- S3FIFO
def test_s3fifo_one_hit_wonders_leave_before_reused_keys() -> None:
    p = S3FIFO(capacity_bytes=10)
    for k in range(10):
        p.on_insert(k, 1)
    for k in (2, 5):  # hit twice: freq 2 > 1 moves them to main instead of out
        p.on_access(k)
        p.on_access(k)
    order = drain(p)
    assert set(order[:8]) == {0, 1, 3, 4, 6, 7, 8, 9}
    assert order[:8] == [0, 1, 3, 4, 6, 7, 8, 9]  # FIFO among the wonders
    assert set(order[8:]) == {2, 5}


def test_s3fifo_single_hit_in_small_is_not_enough() -> None:
    # The paper's rule is freq > 1: a key hit once in S still leaves through the ghost.
    p = S3FIFO(capacity_bytes=10)
    p.on_insert("once", 1)
    p.on_insert("new", 1)
    p.on_access("once")
    assert p.pop_victim() == "once"
    assert p.in_ghost("once")


def test_s3fifo_ghost_hit_goes_to_main() -> None:
    p = S3FIFO(capacity_bytes=10)
    for k in "abc":
        p.on_insert(k, 1)
    assert p.pop_victim() == "a"
    assert p.in_ghost("a") and "a" not in p
    p.on_insert("a", 1)  # back soon: skips probation
    assert not p.in_ghost("a")
    assert p.small_bytes == 2  # b, c in small; a in main
    # Small holds >= 10% of 10 bytes, so b and c (never hit) go first.
    assert drain(p) == ["b", "c", "a"]


def test_s3fifo_main_reinserts_with_decremented_freq() -> None:
    p = S3FIFO(capacity_bytes=100)
    for k in "abc":  # a, b, c go through the ghost into main
        p.on_insert(k, 1)
    assert drain(p) == ["a", "b", "c"]
    for k in "abc":
        p.on_insert(k, 1)
    assert p.small_bytes == 0
    p.on_access("a")
    assert drain(p) == ["b", "c", "a"]  # a got a second chance


def test_s3fifo_freq_capped_at_three() -> None:
    p = S3FIFO(capacity_bytes=100)
    for k in "ab":
        p.on_insert(k, 1)
    assert drain(p) == ["a", "b"]
    for k in "ab":  # both back from the ghost: main is [a, b]
        p.on_insert(k, 1)
    for _ in range(10):
        p.on_access("a")
    for _ in range(2):
        p.on_access("b")
    assert p._main == {"a": 3, "b": 2}
    # Sweeps: a 3->2, b 2->1, a 2->1, b 1->0, a 1->0, b evicted; ten hits bought a no more
    # than three.
    assert p.pop_victim() == "b"
    assert p.pop_victim() == "a"


def test_s3fifo_ghost_bounded_by_main_share_in_bytes() -> None:
    p = S3FIFO(capacity_bytes=20)  # main share: 18 bytes
    for k in range(100):
        p.on_insert(k, 1)
        assert p.pop_victim() == k
    assert p._ghost_bytes <= 18
    assert list(p._ghost) == list(range(82, 100))


def test_s3fifo_remove_clears_ghost() -> None:
    p = S3FIFO(capacity_bytes=10)
    p.on_insert("a", 1)
    p.pop_victim()
    p.on_remove("a")
    assert not p.in_ghost("a")


def test_s3fifo_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError):
        S3FIFO(small_ratio=0)
    with pytest.raises(InvalidArgumentError):
        S3FIFO(move_to_main_freq=4)
    with pytest.raises(InvalidArgumentError):
        make_policy("lru", capacity_bytes=0)


# ---------------------------------------------------------------- Hypothesis: accounting
N_KEYS = 12

op = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, N_KEYS - 1), st.integers(0, 5)),
    st.tuples(st.just("access"), st.integers(0, N_KEYS - 1), st.just(0)),
    st.tuples(st.just("remove"), st.integers(0, N_KEYS - 1), st.just(0)),
    st.tuples(
        st.just("pop"), st.frozensets(st.integers(0, N_KEYS - 1), max_size=N_KEYS), st.just(0)
    ),
    st.tuples(st.just("victims"), st.integers(0, 12), st.just(0)),
)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, max_size=80), capacity=st.one_of(st.none(), st.integers(1, 40)))
def test_len_bytes_and_membership_exact(name: str, ops: list, capacity: int | None) -> None:
    p = make_policy(name, capacity_bytes=capacity)
    model: dict[int, int] = {}
    for kind, arg, size in ops:
        if kind == "insert":
            if arg in model:
                continue  # the store never double-inserts
            p.on_insert(arg, size, arg - 1 if arg else None)
            model[arg] = size
        elif kind == "access":
            p.on_access(arg)
        elif kind == "remove":
            p.on_remove(arg)
            model.pop(arg, None)
        elif kind == "pop":
            pinned = arg
            got = p.pop_victim(skip=lambda k: k in pinned)
            if got is None:
                # Nothing evictable must mean every resident key is pinned, except LeafLRU
                # which may also hold back prefixes of pinned tails.
                if name != "leaf_lru":
                    assert set(model) <= pinned
            else:
                assert got in model and got not in pinned
                del model[got]
        else:
            got_list = p.victims(arg)
            freed = sum(model.pop(k) for k in got_list)
            assert freed >= arg or not model
        assert len(p) == len(model)
        assert p.bytes == sum(model.values())
        for k in range(N_KEYS):
            assert (k in p) == (k in model)


# --------------------------------------------------- Hypothesis: LeafLRU and LRU vs models
@st.composite
def forests(draw) -> list[int | None]:
    """parents[i] for keys 0..n-1: None (a root) or an earlier key, as prefix chains are."""
    n = draw(st.integers(1, 16))
    return [None] + [draw(st.one_of(st.none(), st.integers(0, i - 1))) for i in range(1, n)]


tree_op = st.tuples(
    st.sampled_from(["insert", "insert", "access", "remove", "pop", "pop"]),
    st.integers(0, 15),
    st.frozensets(st.integers(0, 15), max_size=4),
)


def check_leaf_lru_against_model(parents: list[int | None], ops: list) -> None:
    """Replay ``ops`` on a LeafLRU and on a brute-force model; every pop must agree."""
    p = LeafLRU()
    n = len(parents)
    last_use: dict[int, int] = {}  # resident key -> tick of its last insert / access
    tick = 0
    for kind, key, pinned in ops:
        key %= n
        tick += 1
        if kind == "insert" and key not in last_use:
            p.on_insert(key, 1, parents[key])
            last_use[key] = tick
        elif kind == "access" and key in last_use:
            p.on_access(key)
            last_use[key] = tick
        elif kind == "remove":
            p.on_remove(key)
            last_use.pop(key, None)
        elif kind == "pop":
            got = p.pop_victim(skip=lambda k: k in pinned)
            leaves = [
                k for k in last_use if not any(parents[c] == k for c in last_use if c != k)
            ]
            eligible = [k for k in leaves if k not in pinned]
            if got is None:
                assert not eligible
                continue
            # The invariant: the popped block has no resident continuation.
            assert not any(parents[c] == got for c in last_use if c != got)
            # And among eligible leaves it is the least recently used.
            assert got == min(eligible, key=last_use.__getitem__)
            del last_use[got]
        assert len(p) == len(last_use)


@settings(max_examples=300, deadline=None)
@given(parents=forests(), ops=st.lists(tree_op, max_size=120))
def test_leaf_lru_never_evicts_a_prefix_of_a_resident_block(parents, ops) -> None:
    check_leaf_lru_against_model(parents, ops)


@settings(max_examples=100, deadline=None)
@given(parents=forests(), ops=st.lists(tree_op, max_size=120))
def test_leaf_lru_model_holds_across_heap_rebuilds(parents, ops) -> None:
    # A rebuild threshold of 1 compacts the lazy heap on nearly every push.
    saved = leaf_lru._MIN_HEAP_REBUILD
    leaf_lru._MIN_HEAP_REBUILD = 1
    try:
        check_leaf_lru_against_model(parents, ops)
    finally:
        leaf_lru._MIN_HEAP_REBUILD = saved


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(tree_op, max_size=120))
def test_lru_pops_least_recent_unpinned(ops) -> None:
    p = LRU()
    last_use: dict[int, int] = {}
    for tick, (kind, key, pinned) in enumerate(ops):
        if kind == "insert" and key not in last_use:
            p.on_insert(key, 1)
            last_use[key] = tick
        elif kind == "access" and key in last_use:
            p.on_access(key)
            last_use[key] = tick
        elif kind == "remove":
            p.on_remove(key)
            last_use.pop(key, None)
        elif kind == "pop":
            got = p.pop_victim(skip=lambda k: k in pinned)
            eligible = [k for k in last_use if k not in pinned]
            if not eligible:
                assert got is None
                continue
            assert got == min(eligible, key=last_use.__getitem__)
            del last_use[got]
