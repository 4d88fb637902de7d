"""The remote tier's configuration: one table of keys per kind, checked in one place.

The same dict comes from ``tairstore.open(..., remote={...})`` and from the ``[remote]`` table of
a daemon's TOML file. Unknown keys, missing required keys and values of the wrong type or range
are refused with :class:`~tairstore.errors.InvalidArgumentError` naming the key, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tairstore.errors import InvalidArgumentError
from tairstore.tiers.remote.health import DEFAULT_FAILURE_THRESHOLD, DEFAULT_RETRY_S

__all__ = ["KINDS", "validate_remote_config", "MIN_SLOT_BYTES"]

#: Smallest 3FS slot; blocks are rounded up to a power of two of at least this.
MIN_SLOT_BYTES = 64 << 10
_HOSTPORT = re.compile(r"^[A-Za-z0-9.\-]+:\d{1,5}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.\-/]{0,64}$")


@dataclass(frozen=True)
class _Key:
    """One configuration key: its type(s), default (``required`` when None) and a value check."""

    types: tuple[type, ...]
    default: Any
    check: Callable[[Any], bool]
    rule: str
    required: bool = False


def _positive(v: Any) -> bool:
    return v > 0


def _any(v: Any) -> bool:
    return True


_COMMON = {
    "kind": _Key((str,), None, _any, "'mooncake' or 'hf3fs'", required=True),
    "prefix": _Key((str,), "tairstore/", lambda v: bool(_PREFIX.match(v)),
                   "up to 64 of [A-Za-z0-9_.-/]"),
    "retry_s": _Key((int, float), DEFAULT_RETRY_S, _positive, "seconds > 0"),
    "failure_threshold": _Key((int,), DEFAULT_FAILURE_THRESHOLD, _positive, "an int >= 1"),
    # The usage ratio at which a namespace with strategy "prefer:<tier>" falls back to the
    # local tiers (tairstore.engine.strategy).
    "prefer_max_usage": _Key((int, float), 0.9, lambda v: 0 < v <= 1, "a ratio in (0, 1]"),
}

KINDS: dict[str, dict[str, _Key]] = {
    "mooncake": {
        **_COMMON,
        "master": _Key((str,), None, lambda v: bool(_HOSTPORT.match(v)), "host:port", required=True),
        "metadata_server": _Key((str,), None,
                                lambda v: v.startswith(("http://", "etcd://", "P2PHANDSHAKE")) or "://" not in v,
                                "an http:// URL, etcd address or P2PHANDSHAKE", required=True),
        "protocol": _Key((str,), "tcp", lambda v: v in ("tcp", "rdma"), "'tcp' or 'rdma'"),
        "local_hostname": _Key((str,), "127.0.0.1", lambda v: bool(v), "a host name or address"),
        "rdma_devices": _Key((str,), "", _any, "a comma-separated device list"),
        # The memory this process lends to the shared pool: objects placed here live and die
        # with this process.
        "segment_bytes": _Key((int,), 1 << 30, _positive, "bytes > 0"),
        # Registered staging memory for one batch (payloads and their trailers).
        "buffer_bytes": _Key((int,), 64 << 20, lambda v: v >= (1 << 20), "bytes >= 1 MiB"),
        # The master's Prometheus endpoint (mooncake_master --metrics_port): when set, usage is
        # the whole pool's (master_allocated_bytes / master_total_capacity_bytes), refreshed by
        # the maintenance pass; "" : this process's own puts and segment.
        "metrics_url": _Key((str,), "", lambda v: v == "" or v.startswith(("http://", "https://")),
                            "an http:// URL of the master's /metrics, or empty"),
    },
    "hf3fs": {
        **_COMMON,
        "path": _Key((str,), None, lambda v: bool(v), "a directory on the 3FS mount", required=True),
        "file_bytes": _Key((int,), 256 << 20, lambda v: v >= MIN_SLOT_BYTES, f"bytes >= {MIN_SLOT_BYTES}"),
        "max_block_bytes": _Key((int,), 64 << 20, lambda v: v >= MIN_SLOT_BYTES, f"bytes >= {MIN_SLOT_BYTES}"),
        # 0: grow without a limit (the file system's free space is the limit).
        "capacity_bytes": _Key((int,), 0, lambda v: v >= 0, "bytes >= 0 (0: no limit)"),
        "index_map_bytes": _Key((int,), 1 << 30, lambda v: v >= (1 << 20), "bytes >= 1 MiB"),
    },
}


def validate_remote_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check a remote-tier config and return it with defaults filled in.

    Raises:
        InvalidArgumentError: not a mapping, unknown kind, unknown or missing key, or a value
            of the wrong type or out of range; the message names the key and the rule.
    """
    if not isinstance(config, Mapping):
        raise InvalidArgumentError(f"remote config must be a dict, got {type(config).__name__}")
    kind = config.get("kind")
    if kind not in KINDS:
        raise InvalidArgumentError(f"remote kind must be one of {sorted(KINDS)}, got {kind!r}")
    table = KINDS[kind]
    unknown = sorted(set(config) - set(table))
    if unknown:
        raise InvalidArgumentError(f"unknown remote config key(s) for kind {kind!r}: {unknown}; "
                                   f"known: {sorted(table)}")
    out: dict[str, Any] = {}
    for name, spec in table.items():
        if name not in config:
            if spec.required:
                raise InvalidArgumentError(f"remote config for kind {kind!r} needs {name!r} ({spec.rule})")
            out[name] = spec.default
            continue
        value = config[name]
        # bool is an int subclass; a size of True is a typo, not 1 byte.
        if isinstance(value, bool) or not isinstance(value, spec.types):
            raise InvalidArgumentError(f"remote config {name!r} must be {spec.rule}, got {value!r}")
        if not spec.check(value):
            raise InvalidArgumentError(f"remote config {name!r} must be {spec.rule}, got {value!r}")
        out[name] = value
    return out
