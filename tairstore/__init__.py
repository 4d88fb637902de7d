"""tairstore: a tiered, log-structured KV-cache block store for LLM inference.

Embedded use::

    import tairstore
    with tairstore.open("data-dir", dram_bytes=1 << 30, ssd_bytes=16 << 30) as store:
        store.put(key, block)
        view = store.get(key)

See ``README.md`` for the daemon, and ``docs/ARCHITECTURE.md`` for how it works.
"""

from __future__ import annotations

from tairstore import errors, keys
from tairstore.config import StoreConfig
from tairstore.errors import (
    CapacityError,
    ClosedError,
    CorruptionError,
    FatalIOError,
    FormatError,
    InvalidArgumentError,
    LeaseExpiredError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    SessionError,
    StoreError,
    StoreLockedError,
)
from tairstore.engine.match import MatchResult
from tairstore.engine.session import WriteSession
from tairstore.engine.store import Store, open_store
from tairstore.net.client import Client

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``tairstore.AsyncClient`` is imported on first use, so ``import tairstore`` does not
    import trio (embedded users and the blocking client never need it)."""
    if name == "AsyncClient":
        from tairstore.net.aclient import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: ``tairstore.open(path, **options)`` — open (creating if needed) an embedded store.
open = open_store  # noqa: A001 - the public name the API promises

__all__ = [
    "open",
    "Store",
    "StoreConfig",
    "Client",
    "AsyncClient",
    "MatchResult",
    "WriteSession",
    "errors",
    "keys",
    "StoreError",
    "InvalidArgumentError",
    "SessionError",
    "LeaseExpiredError",
    "CapacityError",
    "CorruptionError",
    "ClosedError",
    "StoreLockedError",
    "FormatError",
    "FatalIOError",
    "ProtocolError",
    "PermissionDeniedError",
    "NotFoundError",
    "__version__",
]
