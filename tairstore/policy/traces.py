"""Block-access traces for the optimizer: one in-memory shape, three file formats.

A :class:`Trace` is a list of requests in arrival order. Each request is a prefix chain of block
keys (block ``i`` continues block ``i-1``), the tokens each block holds, and the group
(namespace, or namespace/instance) it belongs to. Keys are ints; blocks of different groups never
share a key, because the loaders give each group its own key space.

Formats (``FORMATS``):

``mooncake``
    JSONL, one request a line: ``{"timestamp", "input_length", "output_length", "hash_ids"}``.
    Each hash id is one block of ``block_tokens`` (512) tokens; the last block holds the
    remainder of ``input_length``. Everything is in group ``default``.
``azure``
    The Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``). It records
    no content identity, so no two requests can be shown to share a block: every request gets
    fresh blocks and the hit rate is 0. It still measures bytes written and evictions, and is
    the no-reuse baseline.
``tairstore-events``
    The daemon's access log (:mod:`tairstore.policy.accesslog`): a file or the rotated files of
    one log, grouped by namespace/instance.

A malformed line raises :class:`TraceFormatError` naming the file and line.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tairstore.errors import InvalidArgumentError

__all__ = ["Trace", "TraceFormatError", "FORMATS", "MOONCAKE_BLOCK_TOKENS", "load_trace"]

#: Tokens per hash id in the Mooncake traces (FAST'25 release notes).
MOONCAKE_BLOCK_TOKENS = 512
#: The group of traces that carry no namespace.
DEFAULT_GROUP = "default"


class TraceFormatError(InvalidArgumentError):
    """A trace file is not in the format it was said to be in (the message names file and line)."""


@dataclass
class Trace:
    """Requests as prefix chains of int block keys, with tokens per block and a group per request.

    Attributes:
        chains: the block keys of each request, in chain order.
        tokens: the tokens each block of each request holds (same shape as ``chains``).
        groups: the index into ``group_names`` of each request.
        group_names: namespace (or namespace/instance) names.
        block_tokens: tokens in a full block.
    """

    chains: list[list[int]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    group_names: list[str] = field(default_factory=list)
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    #: Seconds from the first request to the last, when the format records arrival times.
    duration_s: float | None = None

    def add(self, chain: list[int], input_tokens: int | None, group: int = 0) -> None:
        """Append a request; ``input_tokens`` None means every block is full."""
        self.chains.append(chain)
        self.tokens.append(block_token_counts(len(chain), input_tokens, self.block_tokens))
        self.groups.append(group)

    @property
    def accesses(self) -> int:
        """Block accesses in all."""
        return sum(map(len, self.chains))

    def __len__(self) -> int:
        return len(self.chains)


def block_token_counts(n_blocks: int, input_tokens: int | None, block_tokens: int) -> list[int]:
    """Tokens per block: full blocks, the last one holding the remainder of ``input_tokens``.

    The remainder is clamped to ``1..block_tokens``: a trace whose ``input_length`` disagrees
    with its block count (it happens in the Mooncake traces by a few tokens) still weighs every
    block it lists.
    """
    counts = [block_tokens] * n_blocks
    if n_blocks and input_tokens is not None:
        last = input_tokens - (n_blocks - 1) * block_tokens
        counts[-1] = min(block_tokens, max(1, last))
    return counts


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceFormatError(f"cannot read trace {path}: {exc}") from None


def load_mooncake(path: Path, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> Trace:
    """Read a Mooncake JSONL trace (see the module docstring)."""
    trace = Trace(group_names=[DEFAULT_GROUP], block_tokens=block_tokens)
    stamps: list[float] = []
    for n, line in _lines(path):
        try:
            rec = json.loads(line)
            chain = [int(h) for h in rec["hash_ids"]]
            length = rec.get("input_length")
            trace.add(chain, None if length is None else int(length))
            if "timestamp" in rec:
                stamps.append(float(rec["timestamp"]))  # milliseconds
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TraceFormatError(f"{path}:{n}: not a Mooncake request: {exc!r}") from None
    if stamps:
        trace.duration_s = (max(stamps) - min(stamps)) / 1000
    return trace


def load_azure(path: Path, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> Trace:
    """Read an Azure LLM inference CSV trace: fresh blocks per request (no identity recorded)."""
    trace = Trace(group_names=[DEFAULT_GROUP], block_tokens=block_tokens)
    next_key = 0
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "ContextTokens" not in reader.fieldnames:
                raise TraceFormatError(f"{path}: no ContextTokens column; not an Azure trace")
            for row in reader:
                try:
                    tokens = int(row["ContextTokens"])
                except (ValueError, TypeError):
                    raise TraceFormatError(
                        f"{path}:{reader.line_num}: bad ContextTokens {row.get('ContextTokens')!r}"
                    ) from None
                if tokens < 0:
                    raise TraceFormatError(f"{path}:{reader.line_num}: negative ContextTokens")
                n = -(-tokens // block_tokens)
                trace.add(list(range(next_key, next_key + n)), tokens)
                next_key += n
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TraceFormatError(f"cannot read trace {path}: {exc}") from None
    return trace


def load_trace(
    path: str | os.PathLike[str], fmt: str = "mooncake", block_tokens: int | None = None
) -> Trace:
    """Load ``path`` in format ``fmt`` (one of :data:`FORMATS`).

    Raises:
        InvalidArgumentError: an unknown format.
        TraceFormatError: the file is missing, unreadable or malformed.
    """
    try:
        loader = FORMATS[fmt]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown trace format {fmt!r}; valid formats: {', '.join(FORMATS)}"
        ) from None
    p = Path(path)
    if not p.exists() and fmt != "tairstore-events":
        raise TraceFormatError(f"trace file not found: {p}")
    if block_tokens is None:
        return loader(p)
    if block_tokens <= 0:
        raise InvalidArgumentError(f"block_tokens must be positive, got {block_tokens}")
    return loader(p, block_tokens)


def _load_events(path: Path, block_tokens: int | None = None) -> Trace:
    # Imported here: the access log module imports this one for Trace.
    from tairstore.policy.accesslog import load_access_log

    return load_access_log(path) if block_tokens is None else load_access_log(path, block_tokens)


#: Format name -> loader(path[, block_tokens]).
FORMATS = {"mooncake": load_mooncake, "azure": load_azure, "tairstore-events": _load_events}
