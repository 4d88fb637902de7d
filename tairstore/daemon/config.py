"""The daemon's configuration: a TOML file, validated in one place.

Every option has a default, so ``tairstore serve`` runs with no file at all. A file may set any
subset::

    [server]
    host = "127.0.0.1"          # loopback unless you configure tokens
    port = 7480                 # binary data protocol; 0 picks a free port
    http_port = 7481            # HTTP/JSON control API; 0 picks a free port
    data_dir = "./tairstore-data"

    [store]                     # the fields of tairstore.config.StoreConfig
    dram_bytes = "4GiB"         # default: chosen from available memory at start
    ssd_bytes = "64GiB"         # default: chosen from free disk at start
    durability = "sync"

    [limits]
    max_frame_bytes = "80MiB"

    [[tokens]]
    token = "…"
    namespaces = ["team-a"]     # or "*"
    role = "user"               # or "admin"

    [namespaces.team-a]
    total_bytes = "10GiB"
    tier_bytes = { dram = "2GiB", ssd = "8GiB" }
    strategy = "prefer:dram"    # optional: always:/prefer: dram, ssd or remote

Anything unknown or invalid is refused at start with ``FILE: [section] key: reason`` (an
:class:`~tairstore.errors.InvalidArgumentError`), because a typo in a capacity or durability
option silently falling back to a default is worse than not starting.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from tairstore.config import COMPRESSIONS, DURABILITY_MODES, TIERS, StoreConfig
from tairstore.errors import InvalidArgumentError
from tairstore.validate import check_namespace
from tairstore.daemon.auth import ALL_NAMESPACES, ROLES, TokenSpec

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_HOST",
    "DEFAULT_HTTP_PORT",
    "DEFAULT_PORT",
    "DaemonConfig",
    "LimitsConfig",
    "NamespaceQuota",
    "TairConfig",
    "load_config",
    "parse_size",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7480  # data protocol
DEFAULT_HTTP_PORT = 7481  # HTTP control API, the data port + 1
DEFAULT_DATA_DIR = "./tairstore-data"
DEFAULT_HTTP_MAX_BODY_BYTES = 8 << 20  # a JSON request with ~500k token ids fits
DEFAULT_SHUTDOWN_GRACE_S = 10.0
MIN_TOKEN_CHARS = 16  # shorter secrets are guessable over a network

# Store options a daemon file may set; the rest (fs, create) make no sense for a daemon.
_STORE_KEYS = tuple(f.name for f in fields(StoreConfig) if f.name not in ("fs", "create", "dram_backing", "remote"))
_STORE_SIZES = {"dram_bytes", "ssd_bytes", "segment_bytes", "wal_file_bytes", "max_block_bytes"}

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*$")


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as ``"4GiB"``, ``"512M"``, ``"1.5 GiB"``, ``"10GB"``.

    ``K/M/G/T`` and ``KiB/MiB/GiB/TiB`` are powers of 1024; ``KB/MB/GB/TB`` powers of 1000.

    Raises:
        InvalidArgumentError: not a size, negative, or not a whole number of bytes.
    """
    if isinstance(value, bool):
        raise InvalidArgumentError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgumentError(f"a size must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value.lower())
        if m and m.group(2) in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2)]
            if n == math.floor(n):
                return int(n)
            raise InvalidArgumentError(f"{value!r} is not a whole number of bytes")
    raise InvalidArgumentError(f"expected a size such as 4096, \"512MiB\" or \"4GiB\", got {value!r}")


@dataclass
class LimitsConfig:
    """Limits of the daemon's listeners. None means the data server's own default."""

    max_frame_bytes: int | None = None
    max_header_bytes: int | None = None
    max_batch: int | None = None
    max_inflight: int | None = None
    worker_threads: int | None = None
    http_max_body_bytes: int = DEFAULT_HTTP_MAX_BODY_BYTES

    def data_limits(self) -> dict[str, int]:
        """The options set for the data server (the ones left None keep its defaults)."""
        return {k: v for k, v in (("max_frame_bytes", self.max_frame_bytes),
                                  ("max_header_bytes", self.max_header_bytes),
                                  ("max_batch", self.max_batch),
                                  ("max_inflight", self.max_inflight),
                                  ("worker_threads", self.worker_threads)) if v is not None}


@dataclass
class NamespaceQuota:
    """A namespace to create at start, with its quota (None: unlimited) and backend strategy
    (None: none; see tairstore.engine.strategy)."""

    total_bytes: int | None = None
    tier_bytes: dict[str, int] = field(default_factory=dict)
    strategy: str | None = None


@dataclass
class DaemonConfig:
    """Everything ``tairstore serve`` needs.

    Attributes:
        host: address both listeners bind (loopback by default).
        port: data protocol port (0: any free port; the startup log says which).
        http_port: HTTP control API port (0: any free port).
        data_dir: the store directory, relative to the working directory unless absolute.
        store: StoreConfig options; ``dram_bytes`` / ``ssd_bytes`` missing here are chosen from
            available memory and free disk at start.
        limits: listener limits.
        tokens: bearer tokens; none means auth is off.
        namespaces: namespaces to create (or update) at start, with their quotas.
        shutdown_grace_s: how long SIGTERM waits for in-flight requests before cancelling them.
        access_log: a file to record every prefix lookup (MATCH) in, for ``tairstore optimize
            --format tairstore-events`` (None: off); rotated at 64 MiB, 4 old files kept.
        source: the file this came from (None for defaults).
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    http_port: int = DEFAULT_HTTP_PORT
    data_dir: str = DEFAULT_DATA_DIR
    store: dict[str, Any] = field(default_factory=dict)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tokens: list[TokenSpec] = field(default_factory=list)
    namespaces: dict[str, NamespaceQuota] = field(default_factory=dict)
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    access_log: str | None = None
    source: str | None = None
    tair: "TairConfig" = field(default_factory=lambda: TairConfig())
    shm: "ShmConfig | None" = None  # [shm]: the DRAM arena in shared memory (None: private)


class _Where:
    """Builds ``FILE: [section] key: reason`` errors."""

    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, section: str, key: str | None, reason: str) -> InvalidArgumentError:
        where = f"[{section}]" + (f" {key}" if key else "")
        return InvalidArgumentError(f"{self.path}: {where}: {reason}")


def _check_keys(where: _Where, section: str, table: Any, known: tuple[str, ...]) -> dict:
    if not isinstance(table, dict):
        raise where.error(section, None, "must be a table")
    for key in table:
        if key not in known:
            raise where.error(section, key, f"unknown option (known: {', '.join(known)})")
    return table


def _port(where: _Where, section: str, key: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 65535:
        raise where.error(section, key, f"must be a port number 0..65535 (0: any free port), got {v!r}")
    return v


def _size(where: _Where, section: str, key: str, v: Any, *, minimum: int = 0) -> int:
    try:
        n = parse_size(v)
    except InvalidArgumentError as exc:
        raise where.error(section, key, str(exc)) from None
    if n < minimum:
        raise where.error(section, key, f"must be at least {minimum}, got {n}")
    return n


def _positive_int(where: _Where, section: str, key: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise where.error(section, key, f"must be an integer >= 1, got {v!r}")
    return v


def _server(where: _Where, cfg: DaemonConfig, table: Any) -> None:
    t = _check_keys(where, "server", table, ("host", "port", "http_port", "data_dir", "shutdown_grace_s",
                                              "access_log"))
    if "host" in t:
        if not isinstance(t["host"], str) or not t["host"]:
            raise where.error("server", "host", "must be an address such as \"127.0.0.1\"")
        cfg.host = t["host"]
    for key in ("port", "http_port"):
        if key in t:
            setattr(cfg, key, _port(where, "server", key, t[key]))
    if "data_dir" in t:
        if not isinstance(t["data_dir"], str) or not t["data_dir"]:
            raise where.error("server", "data_dir", "must be a directory path")
        cfg.data_dir = t["data_dir"]
    if "access_log" in t:
        if not isinstance(t["access_log"], str) or not t["access_log"]:
            raise where.error("server", "access_log", "must be a file path")
        cfg.access_log = t["access_log"]
    if "shutdown_grace_s" in t:
        v = t["shutdown_grace_s"]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 3600:
            raise where.error("server", "shutdown_grace_s", f"must be seconds in 0..3600, got {v!r}")
        cfg.shutdown_grace_s = float(v)


def _store(where: _Where, cfg: DaemonConfig, table: Any) -> None:
    t = _check_keys(where, "store", table, _STORE_KEYS)
    defaults = StoreConfig()
    out: dict[str, Any] = {}
    for key, v in t.items():
        default = getattr(defaults, key)
        if key in _STORE_SIZES:
            out[key] = _size(where, "store", key, v)
        elif key == "dram_partitions":
            # [store.dram_partitions.NAME] tables: bytes = "2GiB", namespaces = [...], group = "..."
            if not isinstance(v, dict) or not all(isinstance(p, dict) for p in v.values()):
                raise where.error("store", key, "must hold one table per partition "
                                  "([store.dram_partitions.NAME] with bytes and namespaces)")
            out[key] = {name: dict(p, bytes=_size(where, "store", f"{key}.{name}.bytes", p["bytes"]))
                        if "bytes" in p else dict(p) for name, p in v.items()}
        elif key == "compression":
            # TOML has no null: "none" (or "") spells no compression.
            v = None if v in ("none", "") else v
            if v not in COMPRESSIONS:
                raise where.error("store", key, f'must be "none" or "zstd", got {v!r}')
            out[key] = v
        elif key == "durability" and v not in DURABILITY_MODES:
            raise where.error("store", key, f"must be one of {', '.join(DURABILITY_MODES)}, got {v!r}")
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise where.error("store", key, f"must be true or false, got {v!r}")
            out[key] = v
        elif isinstance(default, str):
            if not isinstance(v, str):
                raise where.error("store", key, f"must be a string, got {v!r}")
            out[key] = v
        elif isinstance(default, dict) or default is None:
            # Tables such as policy = { dram = "lru", ssd = "leaf_lru" } or watermarks.
            if not isinstance(v, (dict, str)):
                raise where.error("store", key, f"must be a table (or a name), got {v!r}")
            out[key] = v
        else:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise where.error("store", key, f"must be a number, got {v!r}")
            out[key] = v
    # Check the values the way the store will, so a bad one is refused with this file's name.
    probe = {"dram_bytes": defaults.dram_bytes if "dram_partitions" in out else 1 << 20,
             "ssd_bytes": 1 << 30, **out}
    try:
        StoreConfig.from_kwargs(**probe)
    except InvalidArgumentError as exc:
        msg = str(exc)
        bad = next((k for k in out if msg.startswith(k)), None) or next((k for k in out if k in msg), None)
        raise where.error("store", bad, msg) from None
    cfg.store = out


def _limits(where: _Where, cfg: DaemonConfig, table: Any) -> None:
    known = ("max_frame_bytes", "max_header_bytes", "max_batch", "max_inflight", "worker_threads",
             "http_max_body_bytes")
    t = _check_keys(where, "limits", table, known)
    lim = LimitsConfig()
    for key, v in t.items():
        if key in ("max_frame_bytes", "max_header_bytes", "http_max_body_bytes"):
            setattr(lim, key, _size(where, "limits", key, v, minimum=4096))
        else:
            setattr(lim, key, _positive_int(where, "limits", key, v))
    if lim.max_header_bytes and lim.max_frame_bytes and lim.max_header_bytes > lim.max_frame_bytes:
        raise where.error("limits", "max_header_bytes", "cannot exceed max_frame_bytes")
    cfg.limits = lim


def _tokens(where: _Where, cfg: DaemonConfig, items: Any) -> None:
    if not isinstance(items, list):
        raise where.error("tokens", None, "write each token as a [[tokens]] table")
    out: list[TokenSpec] = []
    for i, t in enumerate(items):
        sec = f"tokens #{i + 1}"
        t = _check_keys(where, sec, t, ("token", "namespaces", "role"))
        token = t.get("token")
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise where.error(sec, "token", f"must be a string of at least {MIN_TOKEN_CHARS} characters "
                              "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        ns = t.get("namespaces", ALL_NAMESPACES)
        if ns != ALL_NAMESPACES and (not isinstance(ns, list) or not ns
                                     or not all(isinstance(n, str) and n for n in ns)):
            raise where.error(sec, "namespaces", 'must be "*" or a non-empty list of namespace names')
        role = t.get("role", "user")
        if role not in ROLES:
            raise where.error(sec, "role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if any(s.token == token for s in out):
            raise where.error(sec, "token", "the same token appears twice")
        out.append(TokenSpec(token=token, namespaces=ns, role=role))
    cfg.tokens = out


def _namespaces(where: _Where, cfg: DaemonConfig, table: Any) -> None:
    if not isinstance(table, dict):
        raise where.error("namespaces", None, "write each namespace as a [namespaces.NAME] table")
    out: dict[str, NamespaceQuota] = {}
    for name, t in table.items():
        sec = f"namespaces.{name}"
        try:
            check_namespace(name)
        except InvalidArgumentError as exc:
            raise where.error(sec, None, str(exc)) from None
        t = _check_keys(where, sec, t, ("total_bytes", "tier_bytes", "strategy"))
        q = NamespaceQuota()
        if "strategy" in t:
            from tairstore.engine.strategy import STRATEGIES

            if t["strategy"] not in STRATEGIES:
                raise where.error(sec, "strategy", f"must be one of {', '.join(STRATEGIES)}, "
                                  f"got {t['strategy']!r}")
            q.strategy = t["strategy"]
        if "total_bytes" in t:
            q.total_bytes = _size(where, sec, "total_bytes", t["total_bytes"])
        if "tier_bytes" in t:
            tiers = t["tier_bytes"]
            if not isinstance(tiers, dict):
                raise where.error(sec, "tier_bytes", 'must be a table such as { dram = "2GiB", ssd = "8GiB" }')
            for tier, v in tiers.items():
                if tier not in TIERS:
                    raise where.error(sec, f"tier_bytes.{tier}", f"unknown tier (known: {', '.join(TIERS)})")
                q.tier_bytes[tier] = _size(where, sec, f"tier_bytes.{tier}", v)
        out[name] = q
    cfg.namespaces = out


@dataclass
class ShmConfig:
    """``[shm]``: put the DRAM arena in a file clients on this host map read-only.

    Attributes:
        dir: where the arena file is created (``/dev/shm``, or a hugetlbfs mount).
        group: a group allowed to map it (mode 0640); empty: owner only (0600).
        lease_s: how long a client's read lease lasts unless given back.
        partitions: ``"auto"``: with ``[[tokens]]`` and no ``[store.dram_partitions]``, give the
            namespaces of each token limited to some namespaces a DRAM partition (a file) of
            their own, so such a token maps only its own namespaces' memory
            (:func:`tairstore.daemon.shm.partitions_from_tokens`); ``"none"``: one arena file,
            mapped only by tokens that cover every namespace.
    """

    dir: str = "/dev/shm"
    group: str = ""
    lease_s: float = 60.0
    partitions: str = "auto"


def _shm(where: _Where, cfg: DaemonConfig, table: Any) -> None:
    t = _check_keys(where, "shm", table, ("enabled", "dir", "group", "lease_s", "partitions"))
    if not isinstance(t.get("enabled", True), bool):
        raise where.error("shm", "enabled", "must be true or false")
    out = ShmConfig()
    for key in ("dir", "group"):
        if key in t:
            if not isinstance(t[key], str):
                raise where.error("shm", key, "must be a string")
            setattr(out, key, t[key])
    if "partitions" in t:
        if t["partitions"] not in ("auto", "none"):
            raise where.error("shm", "partitions", f'must be "auto" or "none", got {t["partitions"]!r}')
        out.partitions = t["partitions"]
    if "lease_s" in t:
        v = t["lease_s"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise where.error("shm", "lease_s", "must be a positive number of seconds")
        out.lease_s = float(v)
    if not out.dir or not os.path.isdir(out.dir):
        raise where.error("shm", "dir", f"{out.dir!r} is not a directory")
    cfg.shm = out if t.get("enabled", True) else None


def _remote(where: _Where, cfg: DaemonConfig, table: Any) -> None:
    """``[remote]``: the store's remote tier, the same keys as ``tairstore.open(remote=...)``."""
    from tairstore.tiers.remote.config import validate_remote_config

    if not isinstance(table, dict):
        raise where.error("remote", None, "must be a table")
    try:
        cfg.store["remote"] = validate_remote_config(table)
    except InvalidArgumentError as exc:
        raise where.error("remote", None, str(exc)) from None


@dataclass
class TairConfig:
    """The ``[tair]`` section: Tair KVCache's manager, as tairstore answers it (docs/TAIR.md).

    Attributes:
        admin_http_port: the AdminService HTTP port (None: off; 0: any free port).
        root_path: the default ``file`` storage's directory (None: ``<data_dir>/tair-files``).
        storages: storages created at start (``name``, ``type``, ``storage_spec`` fields).
        instance_groups: groups created at start (``name``, ``storages``, ``quota_bytes``).
    """

    admin_http_port: int | None = None
    root_path: str | None = None
    storages: list[dict] = field(default_factory=list)
    instance_groups: list[dict] = field(default_factory=list)


def _tair(where: _Where, cfg: DaemonConfig, table: Any) -> None:
    t = _check_keys(where, "tair", table, ("admin_http_port", "root_path", "storages", "instance_groups"))
    if "admin_http_port" in t:
        cfg.tair.admin_http_port = _port(where, "tair", "admin_http_port", t["admin_http_port"])
    if "root_path" in t:
        if not isinstance(t["root_path"], str) or not t["root_path"]:
            raise where.error("tair", "root_path", "must be a directory path")
        cfg.tair.root_path = t["root_path"]
    for key in ("storages", "instance_groups"):
        items = t.get(key, [])
        if not isinstance(items, list) or not all(isinstance(x, dict) and x.get("name") for x in items):
            raise where.error("tair", key, "must be an array of tables, each with a name")
        setattr(cfg.tair, key, items)
    for g in cfg.tair.instance_groups:
        if "quota_bytes" in g:
            g["quota_bytes"] = _size(where, "tair", "instance_groups.quota_bytes", g["quota_bytes"])


_SECTIONS = {
    "remote": _remote,
    "server": _server,
    "store": _store,
    "limits": _limits,
    "tokens": _tokens,
    "namespaces": _namespaces,
    "tair": _tair,
    "shm": _shm,
}


def load_config(path: str | os.PathLike | None) -> DaemonConfig:
    """Read and validate a daemon config file (None: every default).

    Raises:
        InvalidArgumentError: the file is missing, not TOML, or has an unknown or invalid
            option; the message is ``FILE: [section] key: reason``.
    """
    if path is None:
        return DaemonConfig()
    path = os.fspath(path)
    where = _Where(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise InvalidArgumentError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        # TOML is UTF-8 by definition: other bytes are not valid TOML either.
        raise InvalidArgumentError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise InvalidArgumentError(f"{path}: cannot read: {exc.strerror}") from None
    cfg = DaemonConfig(source=path)
    for section, value in doc.items():
        parse = _SECTIONS.get(section)
        if parse is None:
            raise where.error(section, None, f"unknown section (known: {', '.join(_SECTIONS)})")
        parse(where, cfg, value)
    for name, q in cfg.namespaces.items():
        if q.strategy is not None and q.strategy.endswith(":remote") and not cfg.store.get("remote"):
            raise where.error(f"namespaces.{name}", "strategy", f"{q.strategy!r} needs a [remote] section")
    return cfg


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts local connections."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
