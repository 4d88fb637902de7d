"""Fuzz targets for every decoder of untrusted bytes, and the seeded loop that drives them.

Each target takes one input (bytes) and either parses it or raises the one error type its
decoder promises; anything else escaping is a finding. The designated errors:

==========  =========================================================  =====================
target      decoder                                                    may raise
==========  =========================================================  =====================
``wal``     ``format.wal.FrameDecoder`` + ``wal.records.decode``        CorruptionError (and
                                                                       stops with a reason)
``segment`` ``format.segment.decode_header``; ``tiers.ssd.scan_records``  CorruptionError from
            on an in-memory file (yields verified records, reports       the header only;
            the rest)                                                   the scan never raises
``protocol`` ``net.protocol.Connection.receive_data`` (both roles,       ProtocolError only
            random chunking, a small ``Limits``), or the server's
            scatter path ``get_buffers``/``buffers_filled``
``config``  ``daemon_config.load_config`` on a file of these bytes        InvalidArgumentError
``http``    ``net.http.HttpApi`` (JSON and Tair MetaService endpoints)   never a 500; a body
                                                                       that is not a JSON
                                                                       object is a 400
==========  =========================================================  =====================

Inputs come from :func:`generate`: seeded random bytes, structure-aware inputs where a target
has them (random JSON bodies built from the fields the HTTP endpoints read), and mutations of a small corpus of
valid inputs (LevelDB's byte mutators: flip a bit, set a byte to an interesting value, insert,
delete, truncate, duplicate a run, splice two inputs; for framed formats, also a mutated body
re-framed with a *valid* checksum, so mutations reach past the checksum). A time guard fails an
input that takes longer than :data:`HANG_S` (a decoder that waits for bytes no frame announced,
or loops). :mod:`tairstore.fuzz.atheris_targets` hands the same targets to atheris.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tairstore.fuzz.decoder_targets import TARGETS, Finding, corpus, structured

__all__ = ["TARGETS", "HANG_S", "Finding", "generate", "mutate", "run_target", "run_seeded",
           "check_one", "time_guard"]

#: An input taking longer than this is a hang (every valid input decodes in milliseconds).
HANG_S = 5.0
#: The longest random input: longer than a header of each format, short enough to be fast.
_MAX_RANDOM = 600
_INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0x20, 0x0A, 0x22, 0x5B, 0x7B)


class _Hang(BaseException):
    """Raised by the time guard's alarm (a BaseException, so targets cannot swallow it)."""


def mutate(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """One to four of LevelDB-style byte mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        n = len(buf)
        if op == 0 and n:  # flip one bit
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # an interesting byte
            buf[rng.randrange(n)] = rng.choice(_INTERESTING)
        elif op == 2:  # insert random bytes
            i = rng.randint(0, n)
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and n:  # delete a run
            i = rng.randrange(n)
            del buf[i:i + rng.randint(1, 16)]
        elif op == 4 and n:  # truncate
            del buf[rng.randrange(n):]
        elif op == 5 and n:  # duplicate a run
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 32))
            buf[j:j] = buf[i:j]
        elif op == 6 and others:  # splice with another input
            other = rng.choice(others)
            buf = buf[:rng.randint(0, n)] + other[rng.randint(0, len(other)):]
        elif op == 7 and n >= 4:  # overwrite a little-endian integer field
            i = rng.randrange(n - 3)
            v = rng.choice((0, 1, 0x7FFFFFFF, 0xFFFFFFFF, n, rng.getrandbits(32)))
            buf[i:i + 4] = v.to_bytes(4, "little")
    return bytes(buf)


def generate(name: str, seed: int, count: int) -> Iterator[bytes]:
    """``count`` inputs for target ``name``: a share of random bytes, the rest mutations."""
    rng = random.Random(f"{name}/{seed}")
    seeds = corpus(name)
    for i in range(count):
        r = rng.random()
        if i < len(seeds):
            yield seeds[i]  # every valid input once, as is
        elif r < 0.2:
            yield rng.randbytes(rng.randint(0, _MAX_RANDOM))
        elif r < 0.6 and (made := structured(name, rng)) is not None:
            yield made
        else:
            yield mutate(rng, rng.choice(seeds), seeds)


@contextlib.contextmanager
def time_guard(seconds: float) -> Iterator[None]:
    """Raise :class:`_Hang` in the main thread if the block runs longer than ``seconds``.

    Off the main thread (no signals there) the caller's elapsed-time check is the guard.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_target(name: str, inputs: Iterator[bytes] | list[bytes], *, replay: str = "",
               deadline: float | None = None) -> tuple[int, list[str]]:
    """Feed ``inputs`` to target ``name``; returns (inputs run, failure messages).

    Each failure carries the input (hex, truncated) and ``replay``. Stops at ``deadline``.
    """
    make = TARGETS[name]
    failures: list[str] = []
    n = 0
    with make() as target:
        for i, data in enumerate(inputs):
            if deadline is not None and time.monotonic() > deadline:
                break
            n += 1
            t0 = time.monotonic()
            try:
                with time_guard(HANG_S):
                    target(data)
                    if time.monotonic() - t0 > HANG_S:
                        raise _Hang()
            except _Hang:
                failures.append(_describe(name, i, data, f"took more than {HANG_S} s", replay))
            except Finding as exc:
                failures.append(_describe(name, i, data, str(exc), replay))
            except Exception as exc:  # noqa: BLE001 - anything else escaping is the finding
                failures.append(_describe(name, i, data, f"raised {type(exc).__name__}: {exc}",
                                          replay))
            if len(failures) >= 20:
                break  # enough to act on; the rest is usually the same bug
    return n, failures


def _describe(name: str, i: int, data: bytes, what: str, replay: str) -> str:
    shown = data[:256].hex() + ("…" if len(data) > 256 else "")
    return f"{name} input #{i} ({len(data)} bytes) {what}; input hex: {shown}; replay: {replay}"


def run_seeded(name: str, seed: int, count: int, *,
               deadline: float | None = None) -> tuple[int, list[str]]:
    """``count`` generated inputs for ``name``; the failures name the replay command."""
    replay = f"tairstore fuzz decoders --target {name} --seed {seed} --count {count}"
    return run_target(name, generate(name, seed, count), replay=replay, deadline=deadline)


def check_one(name: str, data: bytes) -> None:
    """Run one input through target ``name`` and raise what a fuzzer should report."""
    replay = (f"python -c \"from tairstore.fuzz.decoders import check_one; "
              f"check_one('{name}', bytes.fromhex('{data.hex()}'))\"" if len(data) <= 512
              else "check_one() on the input above")
    _, failures = run_target(name, [data], replay=replay)
    if failures:
        raise Finding(failures[0])


_Target = Callable[[bytes], Any]
