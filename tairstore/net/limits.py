"""Limits of the data-path protocol: what one peer may ask of the other.

One dataclass, shared by the codec (frame and batch sizes, checked before anything is buffered)
and the server (concurrency). Each default carries its reason; the daemon config maps onto the
fields one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from tairstore.errors import InvalidArgumentError

__all__ = ["Limits", "DEFAULT_LIMITS", "MAX_DRAIN_BYTES"]

MiB = 1 << 20

#: The largest block the store accepts by default (``StoreConfig.max_block_bytes``).
MAX_BLOCK_BYTES = 64 * MiB
#: A header lists at most ``max_batch`` keys of <= MAX_KEY_BYTES (64) bytes plus sizes: 1024 keys are ~72 KiB of
#: msgpack. 1 MiB leaves room for long namespaces and error messages while keeping the work a
#: hostile header can cause small.
MAX_HEADER_BYTES = 1 * MiB
#: The largest frame the clients send (and accept). A server that receives a PUT/WRITE frame over
#: its own ``max_frame_bytes`` but within this reads and discards its payload and answers that
#: request with a CapacityError, as the embedded store answers a block over ``max_block_bytes``
#: (closing the connection instead would reset it under a client still sending, which then sees
#: a broken connection rather than the reason). Past it, the frame is a framing error.
MAX_DRAIN_BYTES = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Per-connection limits of the data-path server (and of the codec on both sides).

    Attributes:
        max_frame_bytes: the largest frame (header + payload) a peer may send; checked from the
            length prefix before the body is buffered. Default: one largest block plus its header.
        max_header_bytes: the largest msgpack header of one frame.
        max_batch: the most keys one request may name (put/get/exists/match/delete batches).
        max_inflight: requests one connection may have in flight; past it the server stops
            reading from that socket (TCP backpressure) until a response goes out.
        worker_threads: store calls running at once in worker threads, over all connections
            (the store does blocking LMDB, disk I/O and memcpy of large blocks).
        shutdown_grace_s: on shutdown, how long requests already read may take to finish.
    """

    max_frame_bytes: int = MAX_BLOCK_BYTES + MAX_HEADER_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES
    max_batch: int = 1024
    max_inflight: int = 64
    worker_threads: int = 8
    shutdown_grace_s: float = 10.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "shutdown_grace_s":
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                    raise InvalidArgumentError(f"Limits.{f.name} must be a number >= 0, got {v!r}")
            elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidArgumentError(f"Limits.{f.name} must be an int >= 1, got {v!r}")
        if self.max_header_bytes > self.max_frame_bytes:
            raise InvalidArgumentError("Limits.max_header_bytes cannot exceed max_frame_bytes")


DEFAULT_LIMITS = Limits()
