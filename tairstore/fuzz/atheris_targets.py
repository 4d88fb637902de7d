"""Coverage-guided fuzzing of the decoders with atheris (optional; not needed by the tests).

Usage::

    pip install atheris
    python -m tairstore.fuzz.atheris_targets wal|segment|protocol|http|config [libFuzzer args]

e.g. ``python -m tairstore.fuzz.atheris_targets wal -max_total_time=600 corpus-wal/``. The
targets are those of :mod:`tairstore.fuzz.decoder_targets` (the CI loop runs the same ones);
the valid corpus is written into a fresh seed directory when none is given, and an input that
breaks a target's contract makes libFuzzer save it as a crash file for replay.
"""

from __future__ import annotations

import os
import sys
import tempfile

__all__ = ["main"]


def _seed_dir(name: str) -> str:
    from tairstore.fuzz.decoder_targets import corpus

    d = tempfile.mkdtemp(prefix=f"tairstore-atheris-{name}-")
    for i, data in enumerate(corpus(name)):
        with open(os.path.join(d, f"seed-{i}"), "wb") as f:
            f.write(data)
    return d


def main(argv: list[str] | None = None) -> int:
    """Run atheris on one target; a clear message and status 2 when atheris is absent."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from tairstore.fuzz.decoder_targets import TARGETS

    if not argv or argv[0] not in TARGETS:
        print(f"usage: python -m tairstore.fuzz.atheris_targets {{{'|'.join(TARGETS)}}} "
              "[libFuzzer options] [corpus dir]", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: `pip install atheris` (it needs a clang-built CPython "
              "on some platforms). Without it, `tairstore fuzz decoders` runs the same targets "
              "with a seeded mutation loop.", file=sys.stderr)
        return 2
    import logging

    logging.disable(logging.CRITICAL)
    # ``import tairstore`` above already loaded every decoder, so instrumenting later imports
    # would see none of them: instrument everything that is loaded instead.
    atheris.instrument_all()
    if not any(not a.startswith("-") for a in rest):
        rest.append(_seed_dir(name))
    context = TARGETS[name]()
    target = context.__enter__()
    try:
        atheris.Setup([sys.argv[0], *rest], target)
        atheris.Fuzz()
    finally:
        context.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
