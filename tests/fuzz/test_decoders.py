"""CI's short version of the decoder fuzzers (:mod:`tairstore.fuzz.decoders`).

Per decoder ``TAIRSTORE_FUZZ_EXAMPLES`` inputs (10,000 by default): nine tenths from the
seeded random-bytes + mutation loop (what ``tairstore fuzz decoders`` runs), one tenth from
Hypothesis (random bytes and mutated corpus entries, shrunk on failure). The invariant of each
target: it parses, or raises its one designated error; never anything else, never a hang
(the loop's time guard). The corpus of valid inputs each target starts from is in
:mod:`tairstore.fuzz.decoder_targets`; every entry is also run as is.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tairstore.fuzz.decoder_targets import TARGETS, corpus
from tairstore.fuzz.decoders import HANG_S, check_one, mutate, run_seeded, time_guard

EXAMPLES = int(os.environ.get("TAIRSTORE_FUZZ_EXAMPLES", "10000"))
SEED = int(os.environ.get("TAIRSTORE_FUZZ_SEED", "20240601"))
#: Hypothesis' share of the inputs: it shrinks well but costs more per input than the loop.
HYPOTHESIS_SHARE = 0.1
NAMES = sorted(TARGETS)


@pytest.mark.parametrize("name", NAMES)
def test_decoder_survives_seeded_inputs(name):
    count = EXAMPLES - int(EXAMPLES * HYPOTHESIS_SHARE)
    n, failures = run_seeded(name, SEED, count)
    assert not failures, "\n".join(failures[:5])
    assert n == count


@st.composite
def _inputs(draw, name: str) -> bytes:
    seeds = corpus(name)
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    base = draw(st.sampled_from(seeds))
    rng = random.Random(draw(st.integers(0, 2**32)))
    return mutate(rng, base, seeds)


@pytest.mark.parametrize("name", NAMES)
def test_decoder_survives_hypothesis_inputs(name):
    examples = max(1, int(EXAMPLES * HYPOTHESIS_SHARE))

    with TARGETS[name]() as target:  # set up once (the HTTP target opens a store)

        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(_inputs(name))
        def run(data: bytes) -> None:
            with time_guard(HANG_S):
                target(data)

        run()


@pytest.mark.parametrize("name", NAMES)
def test_every_corpus_entry_is_accepted(name):
    # The valid inputs are where mutations start: each must pass the target as is.
    for data in corpus(name):
        check_one(name, data)


def test_wal_corpus_decodes_to_records():
    from tairstore.format.wal import FrameDecoder
    from tairstore.wal.records import decode

    frames = list(FrameDecoder(corpus("wal")[0]))
    assert len(frames) == 5
    assert all(decode(f.type, f.body) is not None for f in frames)
