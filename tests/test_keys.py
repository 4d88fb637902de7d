"""Tests for chained page keys, including byte-for-byte agreement with SGLang's HiCache keys."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from tairstore.errors import InvalidArgumentError
from tairstore.keys import KEY_SIZES, chain_hashes


def sglang_hash_str(token_ids, prior_hash=None):
    """SGLang's ``get_hash_str`` as documented: sha256 over the parent's hex-decoded digest
    (skipped when falsy), then each id as 4 unsigned little-endian bytes; returns hex."""
    hasher = hashlib.sha256()
    if prior_hash:
        hasher.update(bytes.fromhex(prior_hash))
    for t in token_ids:
        hasher.update(t.to_bytes(4, byteorder="little", signed=False))
    return hasher.hexdigest()


def sglang_page_hashes(token_ids, page_size, prior_hash=None):
    """How SGLang's HiCache controller walks a sequence: one chained hash per full page."""
    out = []
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        prior_hash = sglang_hash_str(token_ids[start : start + page_size], prior_hash)
        out.append(prior_hash)
    return out


TOKENS = [(i * 7919 + 13) % 151_936 for i in range(1000)]  # Qwen-sized vocabulary


@pytest.mark.parametrize("page_size", [1, 16, 64, 333])
def test_matches_sglang_hex(page_size):
    ours = chain_hashes(TOKENS, page_size)
    theirs = sglang_page_hashes(TOKENS, page_size)
    assert len(ours) == len(theirs) == len(TOKENS) // page_size
    assert [k.hex() for k in ours] == theirs
    assert all(len(k) == 32 for k in ours)


def test_matches_sglang_with_prior():
    prior_hex = sglang_hash_str([5, 6, 7, 8])
    ours = chain_hashes(TOKENS[:256], 64, prior=bytes.fromhex(prior_hex))
    assert [k.hex() for k in ours] == sglang_page_hashes(TOKENS[:256], 64, prior_hex)


def test_ids_above_int31_match_sglang_unsigned_layout():
    tokens = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 42, 7, 9]
    assert [k.hex() for k in chain_hashes(tokens, 4)] == sglang_page_hashes(tokens, 4)


def test_page_counts_and_partial_page_dropped():
    assert len(chain_hashes(TOKENS[:63], 64)) == 0
    assert len(chain_hashes(TOKENS[:64], 64)) == 1
    assert len(chain_hashes(TOKENS[:200], 64)) == 3
    assert chain_hashes(TOKENS[:200], 64) == chain_hashes(TOKENS[:192], 64)
    assert chain_hashes([], 16) == []


def test_keys_are_chained_not_per_page():
    page = list(range(16))
    first, second = chain_hashes(page + page, 16)
    assert first != second  # same tokens, different prefix


@settings(max_examples=50, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=80),
    page_size=st.integers(1, 9),
    split_pages=st.integers(0, 10),
    algo=st.sampled_from(sorted(KEY_SIZES)),
)
def test_hashing_in_two_halves_equals_hashing_whole(tokens, page_size, split_pages, algo):
    cut = min(split_pages * page_size, len(tokens) - len(tokens) % page_size)
    head = chain_hashes(tokens[:cut], page_size, algo=algo)
    prior = head[-1] if head else None
    tail = chain_hashes(tokens[cut:], page_size, prior=prior, algo=algo)
    assert head + tail == chain_hashes(tokens, page_size, algo=algo)


@pytest.mark.parametrize("dtype", ["<i4", "<i8", "<u4", ">i4", "u2", "<u8"])
def test_numpy_and_list_give_the_same_keys(dtype):
    tokens = [t % 30_000 for t in TOKENS[:320]]  # fits every dtype tested, u2 included
    array = np.array(tokens, dtype=dtype)
    for algo in KEY_SIZES:
        assert chain_hashes(array, 32, algo=algo) == chain_hashes(tokens, 32, algo=algo)


def test_other_sequences_and_iterables():
    expected = chain_hashes(TOKENS[:64], 16)
    assert chain_hashes(tuple(TOKENS[:64]), 16) == expected
    assert chain_hashes(iter(TOKENS[:64]), 16) == expected
    assert chain_hashes(np.array(TOKENS[:64])[::1], 16) == expected
    assert chain_hashes(np.array(TOKENS[:128])[::2], 16) == chain_hashes(TOKENS[:128:2], 16)
    assert chain_hashes(range(64), 16) == chain_hashes(list(range(64)), 16)


def test_xxh3_keys_are_8_bytes_and_chained():
    keys = chain_hashes(TOKENS[:96], 32, algo="xxh3")
    assert [len(k) for k in keys] == [8, 8, 8]
    wire = np.asarray(TOKENS[:96], dtype="<u4").tobytes()
    expected, prev = [], b""
    for i in range(3):
        prev = xxhash.xxh3_64(prev + wire[i * 128 : (i + 1) * 128], seed=0).digest()
        expected.append(prev)
    assert keys == expected
    assert keys != [k[:8] for k in chain_hashes(TOKENS[:96], 32)]


@pytest.mark.parametrize(
    "tokens",
    [[1, 2, -1, 4], [1, 2, 2**32, 4], [1, 2, 2**70, 4], [1.0, 2.0, 3.0, 4.0], ["a", "b"],
     [(1, 2), (3, 4)], np.array([1, -5, 3, 4], dtype=np.int8), np.array([True, False])],
    ids=["negative", "2**32", "huge", "floats", "strings", "tuples", "int8-negative", "bools"],
)
def test_bad_token_ids_are_refused(tokens):
    with pytest.raises(InvalidArgumentError):
        chain_hashes(tokens, 2)


@pytest.mark.parametrize(
    "kwargs",
    [{"page_size": 0}, {"page_size": -4}, {"page_size": 2.0}, {"page_size": True},
     {"page_size": 2, "algo": "md5"}, {"page_size": 2, "prior": b"x" * 8},
     {"page_size": 2, "algo": "xxh3", "prior": b"x" * 32}],
)
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(InvalidArgumentError):
        chain_hashes([1, 2, 3, 4], **kwargs)
