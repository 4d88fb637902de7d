"""Store options, validated in one place.

Durability modes, and what an acknowledged write (``put`` / ``finish_write`` returning) means:

=============  ==================================================================================
``"sync"``     the block's bytes and its COMMIT are fsynced before the call returns (one group
               commit for all concurrent writers); survives ``kill -9`` and power loss.
``"batch"``    the call returns after the copy into DRAM, the (unsynced) SSD write and the
               COMMIT record's hand-off to the OS; a background flush makes it durable
               within ``batch_interval_ms``. ``kill -9``
               loses nothing the OS already has; power loss may lose the last interval.
``"none"``     never fsyncs on a request's path; the OS writes back when it likes (the index
               thread fsyncs segments before LMDB names them, so a power loss leaves keys
               absent, never indexed but unreadable). ``kill -9`` loses nothing the OS has;
               power loss may lose anything not yet written back.
=============  ==================================================================================

With ``ssd_bytes=0`` there is no SSD tier and the store is a volatile cache: nothing survives
``close()``; ``stats()["volatile"]`` is True.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from tairstore.errors import InvalidArgumentError
from tairstore.fileio import REAL_FS, FileSystem

__all__ = ["StoreConfig", "DURABILITY_MODES", "MAX_KEY_BYTES", "DEFAULT_NAMESPACE"]

DURABILITY_MODES = ("sync", "batch", "none")
PROMOTE_ON = ("first", "second", "never")
COMPRESSIONS = (None, "zstd")
#: The namespace of every operation that does not name one.
DEFAULT_NAMESPACE = "default"
MAX_KEY_BYTES = 64  # a sha256 chain hash is 32 bytes; 64 leaves room for a prefix or a salt
MAX_NAMESPACE_BYTES = 255  # stored with a one-byte length in index keys and segment records


@dataclass
class StoreConfig:
    """Every option of an embedded store (the daemon's config file maps onto these)."""

    dram_bytes: int = 1 << 30
    ssd_bytes: int = 16 << 30
    durability: str = "sync"
    batch_interval_ms: float = 5.0
    segment_bytes: int = 256 << 20
    wal_file_bytes: int = 64 << 20
    compression: str | None = None
    zstd_level: int = 3
    max_block_bytes: int = 64 << 20
    #: Verify the crc32c of DRAM copies on every read too (SSD reads are always verified).
    verify_dram_reads: bool = False
    #: When an SSD hit is copied into DRAM: on its "first" or "second" hit, or "never".
    promote_on: str = "second"
    #: Eviction policy per tier (names from :data:`tairstore.policy.POLICIES`).
    policy: dict = field(default_factory=lambda: {"dram": "lru", "ssd": "leaf_lru"})
    #: Watermarks (fractions of capacity): one spec for all tiers or one per tier.
    watermarks: dict | None = None
    #: Background compaction rewrites segments whose live bytes are at most this fraction.
    compaction_live_ratio: float = 0.5
    #: How often the maintenance thread runs (lease reaper, watermarks, TTL, compaction).
    maintenance_interval_s: float = 0.05
    #: Fault the DRAM arena in at open (in a background thread where Linux can populate
    #: pages without writing them), so puts do not pay first-touch page faults. The arena's
    #: memory is then resident from the start. See :meth:`DramArena.prefault`.
    prefault_dram: bool = False
    #: Run the maintenance thread. ``False`` (fsck, tools) leaves the store exactly as opened:
    #: no reaping, watermark eviction, TTL expiry or compaction unless called explicitly.
    background: bool = True
    create: bool = True
    fs: FileSystem = field(default=REAL_FS, repr=False)

    def validate(self) -> "StoreConfig":
        """Check every option; raise :class:`InvalidArgumentError` naming the bad one."""
        for name in ("dram_bytes", "ssd_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InvalidArgumentError(f"{name} must be an int >= 0, got {v!r}")
        if self.dram_bytes == 0 and self.ssd_bytes == 0:
            raise InvalidArgumentError("a store needs dram_bytes or ssd_bytes > 0")
        if self.durability not in DURABILITY_MODES:
            raise InvalidArgumentError(
                f"durability must be one of {DURABILITY_MODES}, got {self.durability!r}")
        if self.compression not in COMPRESSIONS:
            raise InvalidArgumentError(f"compression must be None or 'zstd', got {self.compression!r}")
        for name in ("segment_bytes", "wal_file_bytes", "max_block_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 4096:
                raise InvalidArgumentError(f"{name} must be an int >= 4096, got {v!r}")
        if not (0 < self.batch_interval_ms <= 60_000):
            raise InvalidArgumentError("batch_interval_ms must be in (0, 60000]")
        if not (1 <= self.zstd_level <= 22):
            raise InvalidArgumentError("zstd_level must be in 1..22")
        if self.promote_on not in PROMOTE_ON:
            raise InvalidArgumentError(f"promote_on must be one of {PROMOTE_ON}, got {self.promote_on!r}")
        if isinstance(self.policy, str):
            self.policy = {"dram": self.policy, "ssd": self.policy}
        if not isinstance(self.policy, dict) or not set(self.policy) <= {"dram", "ssd"}:
            raise InvalidArgumentError(f"policy must be a name or {{'dram': name, 'ssd': name}}, got {self.policy!r}")
        from tairstore.policy import POLICIES

        for tier, name in self.policy.items():
            if name not in POLICIES:
                raise InvalidArgumentError(
                    f"unknown {tier} eviction policy {name!r}; choose one of {sorted(POLICIES)}")
        self.policy = {"dram": "lru", "ssd": "leaf_lru", **self.policy}
        from tairstore.engine.capacity import parse_watermarks

        parse_watermarks(self.watermarks)
        if not 0 < self.compaction_live_ratio < 1:
            raise InvalidArgumentError("compaction_live_ratio must be in (0, 1)")
        if not 0 < self.maintenance_interval_s <= 60:
            raise InvalidArgumentError("maintenance_interval_s must be in (0, 60]")
        return self

    @classmethod
    def from_kwargs(cls, **kwargs) -> "StoreConfig":
        """Build from keyword arguments, refusing unknown names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown store option(s): {', '.join(unknown)}")
        return cls(**kwargs).validate()
