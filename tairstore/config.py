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

``write_back=True`` (with ``batch`` or ``none``, and both tiers) acknowledges a write once its
bytes are in the DRAM arena and checksummed: the SSD record and its COMMIT follow from the
maintenance thread (every ``maintenance_interval_s``), from ``sync()`` and from ``close()``. Until
then the block is readable but not durable: a crash takes it back whole (it is absent after
recovery, never torn), as the page cache does for a file system. At most half of ``dram_bytes`` is
waiting at any time; past that, writes go through to SSD as without the option.

With ``ssd_bytes=0`` there is no SSD tier and the store is a volatile cache: nothing survives
``close()``; ``stats()["volatile"]`` is True.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from tairstore.errors import InvalidArgumentError
from tairstore.fileio import REAL_FS, FileSystem
from tairstore.validate import (  # noqa: F401 - the limits are part of this module's API
    MAX_KEY_BYTES,
    MAX_LEASE_S,
    MAX_NAMESPACE_BYTES,
    check_bool,
    check_choice,
    check_int,
    check_namespace,
    check_real,
)

__all__ = ["StoreConfig", "DURABILITY_MODES", "TIERS", "MAX_KEY_BYTES", "MAX_NAMESPACE_BYTES", "MAX_LEASE_S",
           "DEFAULT_NAMESPACE", "physical_memory"]

DURABILITY_MODES = ("sync", "batch", "none")
PROMOTE_ON = ("first", "second", "never")
COMPRESSIONS = (None, "zstd")
#: The storage tiers, fastest first (quotas, watermarks, eviction policies and stats name them).
TIERS = ("dram", "ssd")
#: The namespace of every operation that does not name one.
DEFAULT_NAMESPACE = "default"


def physical_memory() -> int | None:
    """This machine's RAM in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_dram_partitions(parts: Any, dram_bytes: int) -> dict | None:
    """``StoreConfig.dram_partitions``, checked; a namespace may be in one partition only."""
    if parts is None or parts == {}:
        return None
    if not isinstance(parts, dict):
        raise InvalidArgumentError(f"dram_partitions must be a dict of name -> settings, got {parts!r}")
    if not dram_bytes:
        raise InvalidArgumentError("dram_partitions need a DRAM tier (dram_bytes > 0)")
    out: dict[str, dict] = {}
    owner: dict[str, str] = {}
    for name, spec in parts.items():
        where = f"dram_partitions[{name!r}]"
        if not isinstance(name, str) or not name or name == "default":
            raise InvalidArgumentError(f"{where}: a partition's name is a non-empty str other than 'default'")
        if not isinstance(spec, dict) or not set(spec) <= {"bytes", "namespaces", "group"}:
            raise InvalidArgumentError(f"{where} must be a dict with 'bytes', 'namespaces' and "
                                       f"optionally 'group', got {spec!r}")
        nbytes = check_int(f"{where}['bytes']", spec.get("bytes"), 4096)
        names = spec.get("namespaces")
        if not isinstance(names, (list, tuple)) or not names:
            raise InvalidArgumentError(f"{where}['namespaces'] must be a non-empty list of namespaces")
        for ns in names:
            check_namespace(ns)
            if ns == "*":  # SHM_HELLO's namespaces ["*"] name the default partition
                raise InvalidArgumentError(f"{where}['namespaces']: '*' is not a namespace a partition can hold")
            if ns in owner:
                raise InvalidArgumentError(f"dram_partitions: namespace {ns!r} is in both {owner[ns]!r} and {name!r}")
            owner[ns] = name
        group = spec.get("group")
        if group is not None and (isinstance(group, bool) or not isinstance(group, (str, int)) or group == ""):
            raise InvalidArgumentError(f"{where}['group'] must be a group name or id, got {group!r}")
        out[name] = {"bytes": nbytes, "namespaces": list(names), "group": group}
    if sum(p["bytes"] for p in out.values()) >= dram_bytes:
        raise InvalidArgumentError(
            f"dram_partitions take {sum(p['bytes'] for p in out.values())} bytes, which leaves nothing "
            f"of dram_bytes={dram_bytes} for the default partition (every other namespace)")
    return out


def dram_partition_index(parts: dict | None) -> dict[str, int]:
    """namespace -> the index of its DRAM partition, from checked ``dram_partitions`` (1, 2, ...
    in their order; a namespace absent is in the default partition, 0)."""
    return {ns: i for i, spec in enumerate((parts or {}).values(), 1) for ns in spec["namespaces"]}


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
    #: Acknowledge writes from DRAM and write them to SSD in the background (see above).
    write_back: bool = False
    #: Run the maintenance thread. ``False`` (fsck, tools) leaves the store exactly as opened:
    #: no reaping, watermark eviction, TTL expiry or compaction unless called explicitly.
    background: bool = True
    #: A remote tier shared with other stores (``{"kind": "mooncake", "master": ..., ...}`` or
    #: ``{"kind": "hf3fs", "path": ...}``, docs/REMOTE.md); None: no remote tier.
    remote: dict | None = None
    create: bool = True
    fs: FileSystem = field(default=REAL_FS, repr=False)
    #: DRAM partitions, ``{name: {"bytes": n, "namespaces": [ns, ...], "group": g}}``: each
    #: holds the DRAM copies of its namespaces only, which never take DRAM of another
    #: partition nor lose theirs to another's puts; the rest of ``dram_bytes`` is the default
    #: partition, of every other namespace. ``group`` (optional) is the group that may map the
    #: partition's file when the arena is shared (the daemon's ``[shm]``: docs/PROTOCOL.md,
    #: isolation). None: one arena for every namespace.
    dram_partitions: dict | None = None
    #: Map the DRAM arena from this :class:`tairstore.tiers.dram.SharedBacking` (a file in
    #: ``/dev/shm`` or hugetlbfs that local clients map read-only); None: private memory. Set
    #: by the daemon's ``[shm]`` section, not a config-file key of ``[store]``.
    dram_backing: Any = field(default=None, repr=False)

    def validate(self) -> "StoreConfig":
        """Check every option; raise :class:`InvalidArgumentError` naming the bad one.

        Types are checked before values, so a string or a bool where a number belongs is
        refused by name rather than failing later in a comparison or in numpy.
        """
        if self.remote is not None:
            from tairstore.tiers.remote.config import validate_remote_config

            self.remote = validate_remote_config(self.remote)
        self.dram_bytes = check_int("dram_bytes", self.dram_bytes, 0)
        self.ssd_bytes = check_int("ssd_bytes", self.ssd_bytes, 0)
        memory = physical_memory()
        if memory is not None and self.dram_bytes > memory:
            # The arena is one allocation of dram_bytes: past RAM it fails (numpy's
            # MemoryError) or swaps, and a DRAM tier in swap is slower than the SSD tier.
            raise InvalidArgumentError(
                f"dram_bytes={self.dram_bytes} is more than this machine's memory ({memory} bytes)")
        if self.dram_bytes == 0 and self.ssd_bytes == 0:
            raise InvalidArgumentError("a store needs dram_bytes or ssd_bytes > 0")
        check_choice("durability", self.durability, DURABILITY_MODES)
        check_choice("compression", self.compression, COMPRESSIONS)
        for name in ("segment_bytes", "wal_file_bytes", "max_block_bytes"):
            setattr(self, name, check_int(name, getattr(self, name), 4096))
        self.batch_interval_ms = check_real("batch_interval_ms", self.batch_interval_ms, 0, 60_000)
        self.zstd_level = check_int("zstd_level", self.zstd_level, 1, 22)
        for name in ("verify_dram_reads", "prefault_dram", "background", "create", "write_back"):
            check_bool(name, getattr(self, name))
        if self.write_back and (self.dram_bytes == 0 or self.ssd_bytes == 0):
            raise InvalidArgumentError("write_back needs a DRAM and an SSD tier (dram_bytes and "
                                       "ssd_bytes > 0)")
        if self.write_back and self.durability == "sync":
            raise InvalidArgumentError("write_back acknowledges writes before they are durable; "
                                       "it cannot be combined with durability='sync' (use "
                                       "'batch' or 'none')")
        self.dram_partitions = check_dram_partitions(self.dram_partitions, self.dram_bytes)
        check_choice("promote_on", self.promote_on, PROMOTE_ON)
        if isinstance(self.policy, str):
            self.policy = {"dram": self.policy, "ssd": self.policy}
        if not isinstance(self.policy, dict) or not set(self.policy) <= set(TIERS):
            raise InvalidArgumentError(f"policy must be a name or {{'dram': name, 'ssd': name}}, got {self.policy!r}")
        from tairstore.policy import POLICIES

        for tier, name in self.policy.items():
            if not isinstance(name, str) or name not in POLICIES:
                raise InvalidArgumentError(
                    f"unknown {tier} eviction policy {name!r}; choose one of {sorted(POLICIES)}")
        self.policy = {"dram": "lru", "ssd": "leaf_lru", **self.policy}
        from tairstore.engine.capacity import parse_watermarks

        parse_watermarks(self.watermarks)
        self.compaction_live_ratio = check_real("compaction_live_ratio", self.compaction_live_ratio, 0, 1)
        if self.compaction_live_ratio == 1:
            raise InvalidArgumentError("compaction_live_ratio must be in (0, 1), got 1.0")
        self.maintenance_interval_s = check_real("maintenance_interval_s", self.maintenance_interval_s, 0, 60)
        return self

    @classmethod
    def from_kwargs(cls, **kwargs) -> "StoreConfig":
        """Build from keyword arguments, refusing unknown names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown store option(s): {', '.join(unknown)}")
        return cls(**kwargs).validate()
