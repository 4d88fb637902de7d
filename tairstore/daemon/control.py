"""The daemon's control plane: instances, namespaces and quotas, HTTP write sessions.

Nothing here speaks HTTP. :mod:`tairstore.daemon.api` (the native JSON API) and
:mod:`tairstore.daemon.tair_compat` (Tair KVCache's MetaService) both translate requests into these
calls, so the two APIs cannot disagree about what a write session or a quota means. Every method
is synchronous and thread-safe: the HTTP layer runs them in worker threads, because store calls
may wait for an fsync.

Namespaces and quotas go through the store's ``set_quota`` / ``quota`` / ``namespaces`` /
``trim`` when it has them. A store without them still gets namespaces the daemon remembers
(``daemon.json``) and quota records, which the daemon then checks itself when an HTTP write
session starts (see :meth:`ControlPlane.start_write`); usage numbers always come from the store.

Write sessions started over HTTP are kept here by an unguessable id. The payload of each key is
uploaded with ``PUT /sessions/{id}/blocks/{key}`` (whole, or one named part at a time when the
instance registered several location specs, e.g. one per TP rank), and
:meth:`ControlPlane.finish_write` commits the keys the caller names.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tairstore.config import TIERS
from tairstore.errors import (
    CapacityError,
    InvalidArgumentError,
    NotFoundError,
    SessionError,
    StoreError,
)
from tairstore.keys import chain_hashes
from tairstore.engine.match import MatchResult
from tairstore.engine.session import OPEN, WriteSession
from tairstore.daemon.state import DaemonState
from tairstore import validate

__all__ = [
    "ConflictError",
    "ControlPlane",
    "HttpWriteSession",
    "TIERS",
    "UnsupportedError",
    "parse_quota",
]

DEFAULT_LEASE_S = 30.0
#: ``update_namespace``'s default: leave that setting as it is.
KEEP = object()
MAX_SESSIONS = 4096  # open HTTP write sessions; each holds reserved space, so bound them


class ConflictError(StoreError):
    """The request contradicts existing state (an instance registered differently, an existing
    namespace); HTTP 409."""


class UnsupportedError(StoreError):
    """The store this daemon runs lacks the operation (HTTP 501)."""


def parse_quota(obj: Any) -> tuple[int | None, dict[str, int]]:
    """``{"total_bytes": 10737418240, "tier_bytes": {"dram": "2GiB"}}`` -> (total, tiers).

    Sizes are ints or strings such as ``"2GiB"``; a missing or null total means unlimited.
    """
    from tairstore.daemon.config import parse_size

    if obj is None:
        return None, {}
    if not isinstance(obj, dict):
        raise InvalidArgumentError('quota must be an object such as {"total_bytes": "10GiB"}')
    unknown = set(obj) - {"total_bytes", "tier_bytes"}
    if unknown:
        raise InvalidArgumentError(f"unknown quota field(s) {sorted(unknown)}; use total_bytes, tier_bytes")
    total = obj.get("total_bytes")
    total = parse_size(total) if total is not None else None
    tiers_in = obj.get("tier_bytes") or {}
    if not isinstance(tiers_in, dict):
        raise InvalidArgumentError('tier_bytes must be an object such as {"dram": "2GiB", "ssd": "8GiB"}')
    tiers: dict[str, int] = {}
    for tier, v in tiers_in.items():
        if tier not in TIERS:
            raise InvalidArgumentError(f"unknown tier {tier!r} in tier_bytes; use {', '.join(TIERS)}")
        if v is not None:
            tiers[tier] = parse_size(v)
    return total, tiers


def check_namespace(name: Any) -> str:
    """``name`` if it is a valid namespace name."""
    validate.check_namespace(name)
    if name == "*":
        raise InvalidArgumentError('"*" means every namespace in tokens; it cannot name one')
    return name


@dataclass(eq=False)
class HttpWriteSession:
    """A write session started over HTTP.

    Attributes:
        id: the id clients use (unguessable; the store's own id is inside it).
        namespace: the namespace every key belongs to.
        keys: every requested key, in request order.
        session: the store's :class:`~tairstore.engine.session.WriteSession`.
        sizes: the byte size of each key to write.
        specs: named parts of each block as ``(name, offset, size)``; one part ``"block"``
            covering the whole block when the caller gave plain sizes.
    """

    id: str
    namespace: str
    keys: list[bytes]
    session: WriteSession
    sizes: dict[bytes, int]
    specs: list[tuple[str, int, int]] = field(default_factory=list)
    parts: dict[bytes, tuple[bytearray, set[str]]] = field(default_factory=dict, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def keys_to_write(self) -> list[bytes]:
        """The keys the store reserved space for (not already stored or in flight)."""
        return self.session.keys_to_write

    @property
    def open(self) -> bool:
        """False once finished, aborted or expired."""
        return self.session.state == OPEN and not self.session.expired and bool(self.session.keys_to_write)


class ControlPlane:
    """Instances, namespaces, quotas and HTTP write sessions over one store.

    Args:
        store: the open :class:`~tairstore.engine.store.Store`.
        state: where registrations and namespace records persist.
        max_sessions: how many HTTP write sessions may be open at once.
    """

    def __init__(self, store: Any, state: DaemonState, *, max_sessions: int = MAX_SESSIONS) -> None:
        self.store = store
        self.state = state
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._sessions: dict[str, HttpWriteSession] = {}

    # ------------------------------------------------------------------------ namespaces
    @property
    def store_has_quotas(self) -> bool:
        """True when the store enforces quotas itself."""
        return callable(getattr(self.store, "set_quota", None))

    def namespaces(self) -> list[str]:
        """Every namespace: created through the daemon, or holding blocks in the store."""
        names = set(self.state.items("namespaces"))
        listing = getattr(self.store, "namespaces", None)
        if callable(listing):
            names.update(listing())
        else:
            names.update(self.store.stats()["namespaces"])
        return sorted(names)

    def namespace_info(self, name: str) -> dict:
        """Usage and quota of one namespace.

        Raises:
            NotFoundError: the namespace was never created and holds no blocks.
        """
        check_namespace(name)
        if name not in self.namespaces():
            raise NotFoundError(f"no namespace {name!r}; create it with POST /namespaces")
        usage = self.store.stats()["namespaces"].get(name, {"blocks": 0, "bytes": 0})
        quota = self.quota(name)
        return {"name": name, "blocks": usage["blocks"], "bytes": usage["bytes"], "quota": quota,
                "strategy": quota.get("strategy")}

    def quota(self, name: str) -> dict:
        """The store's quota report, or the daemon's record with the store's usage."""
        if callable(getattr(self.store, "quota", None)):
            return self.store.quota(name)
        rec = self.state.get("namespaces", name) or {}
        q = rec.get("quota") or {}
        used = self.store.stats()["namespaces"].get(name, {}).get("bytes", 0)
        tiers = q.get("tier_bytes") or {}
        # Per-tier usage per namespace is not known without the store's quota support: say so
        # (None) rather than guess.
        return {"total_bytes": q.get("total_bytes"), "used_bytes": used,
                "tiers": {t: {"limit": tiers.get(t), "used": None} for t in TIERS}}

    def create_namespace(self, name: str, quota: Any = None, strategy: Any = None) -> dict:
        """Create a namespace, with an optional quota and backend strategy.

        Raises:
            ConflictError: it exists already (use :meth:`update_namespace`).
            InvalidArgumentError: a bad quota or strategy.
        """
        check_namespace(name)
        total, tiers = parse_quota(quota)
        strategy = self._check_strategy(strategy)
        with self._lock:
            if name in self.namespaces():
                raise ConflictError(f"namespace {name!r} exists; change its quota with PUT /namespaces/{name}")
            self._set_quota(name, total, tiers, created=True)
            self._set_strategy(name, strategy)
        return self.namespace_info(name)

    def update_namespace(self, name: str, quota: Any = KEEP, strategy: Any = KEEP) -> dict:
        """Replace a namespace's quota, its strategy, or both (:data:`KEEP`: leave it).

        Raises:
            NotFoundError: no such namespace (create it with :meth:`create_namespace`).
            InvalidArgumentError: a bad quota or strategy.
        """
        check_namespace(name)
        limits = None if quota is KEEP else parse_quota(quota)
        strategy = strategy if strategy is KEEP else self._check_strategy(strategy)
        with self._lock:
            if name not in self.namespaces():
                raise NotFoundError(f"no namespace {name!r}; create it with POST /namespaces")
            if limits is not None:
                self._set_quota(name, *limits, created=False)
            if strategy is not KEEP:
                self._set_strategy(name, strategy)
        return self.namespace_info(name)

    def ensure_namespace(self, name: str, total: int | None, tiers: dict[str, int],
                         strategy: str | None = None) -> None:
        """Create or update (the config file's ``[namespaces.NAME]`` at start)."""
        check_namespace(name)
        strategy = self._check_strategy(strategy)
        with self._lock:
            self._set_quota(name, total, tiers, created=name not in self.namespaces())
            self._set_strategy(name, strategy)

    def _check_strategy(self, strategy: Any) -> str | None:
        from tairstore.engine.strategy import check_strategy

        strategy = check_strategy(strategy)
        if strategy is not None and not callable(getattr(self.store, "set_strategy", None)):
            raise UnsupportedError("this store has no backend strategies")
        return strategy

    def _set_strategy(self, name: str, strategy: str | None) -> None:
        if callable(getattr(self.store, "set_strategy", None)):
            self.store.set_strategy(name, strategy)

    def _set_quota(self, name: str, total: int | None, tiers: dict[str, int], *, created: bool) -> None:
        if self.store_has_quotas:
            self.store.set_quota(name, total_bytes=total, tier_bytes=tiers or None)
        rec = self.state.get("namespaces", name) or {"created_ns": time.time_ns()}
        rec["quota"] = {"total_bytes": total, "tier_bytes": tiers}
        self.state.put("namespaces", name, rec)

    def _check_quota(self, namespace: str, nbytes: int) -> None:
        """Without store quotas, refuse a session that would take a namespace over its total."""
        if self.store_has_quotas:
            return
        q = (self.state.get("namespaces", namespace) or {}).get("quota") or {}
        limit = q.get("total_bytes")
        if limit is None:
            return
        used = self.store.stats()["namespaces"].get(namespace, {}).get("bytes", 0)
        if used + nbytes > limit:
            raise CapacityError(
                f"namespace {namespace!r} would hold {used + nbytes} bytes, over its quota of {limit}; "
                "delete or trim blocks, or raise the quota", dimension="quota:total")

    def trim(self, namespace: str, mode: str = "all", ts: float | None = None) -> int:
        """Delete a namespace's blocks (all, or those written before ``ts``, seconds since the
        epoch); returns how many.

        Raises:
            UnsupportedError: the store has no ``trim`` yet.
        """
        check_namespace(namespace)
        if mode not in ("all", "older_than"):
            raise InvalidArgumentError(f"trim mode must be 'all' or 'older_than', got {mode!r}")
        if mode == "older_than" and not isinstance(ts, (int, float)):
            raise InvalidArgumentError("trim mode 'older_than' needs ts (seconds since the epoch)")
        fn = getattr(self.store, "trim", None)
        if not callable(fn):
            raise UnsupportedError("this store cannot trim a namespace yet; delete keys with /cache/remove")
        return int(fn(namespace, mode=mode, ts=ts))

    # ------------------------------------------------------------------------- instances
    def register_instance(self, rec: dict) -> tuple[bool, dict]:
        """Register (or confirm) an instance.

        ``rec`` holds ``instance_id``, ``instance_group`` (the namespace), ``block_size``
        (tokens per block) and optionally ``location_spec_infos`` (``[{"name", "size"}]``),
        ``location_spec_groups``, ``model_deployment`` and ``query_type``.

        Returns:
            (True, record) when new; (False, record) when already registered identically.

        Raises:
            InvalidArgumentError: a field is missing or wrong, or the location specs add up to
                a block larger than the store takes (found now, not at the first write).
            ConflictError: the id is registered with different information.
        """
        rec = _check_instance(rec)
        total = self.block_bytes(rec)
        limit = self.store.config.max_block_bytes
        if total > limit:
            raise InvalidArgumentError(
                f"the location specs add up to {total} bytes per block; this daemon's store takes "
                f"blocks of at most max_block_bytes={limit}")
        with self._lock:
            old = self.state.get("instances", rec["instance_id"])
            if old is not None:
                if _identity(old) != _identity(rec):
                    raise ConflictError(
                        f"instance {rec['instance_id']!r} is registered with different information "
                        "(group, block size, specs or model); register it under a new instance_id")
                return False, old
            rec["registered_ns"] = time.time_ns()
            self.state.put("instances", rec["instance_id"], rec)
        return True, rec

    def instances(self) -> list[dict]:
        """Every registered instance."""
        return [v for _, v in sorted(self.state.items("instances").items())]

    def instance(self, instance_id: Any) -> dict:
        """One instance's record.

        Raises:
            NotFoundError: it was never registered.
        """
        if not isinstance(instance_id, str) or not instance_id:
            raise InvalidArgumentError("instance_id must be a non-empty string")
        rec = self.state.get("instances", instance_id)
        if rec is None:
            raise NotFoundError(f"no instance {instance_id!r}; register it first (POST /instances)")
        return rec

    def block_bytes(self, instance: dict) -> int:
        """The byte size of one block of ``instance`` (the sum of its location specs)."""
        return sum(int(s["size"]) for s in instance.get("location_spec_infos") or [])

    @staticmethod
    def keys_for_tokens(token_ids: Any, block_size: Any) -> list[bytes]:
        """Block keys of a token sequence: ``chain_hashes(token_ids, block_size)``."""
        if not isinstance(token_ids, list):
            raise InvalidArgumentError("token_ids must be a list of integers")
        if any(not isinstance(t, int) or isinstance(t, bool) for t in token_ids):
            raise InvalidArgumentError("token_ids must be integers")
        return chain_hashes(token_ids, block_size)

    # ----------------------------------------------------------------------- cache queries
    def locate(self, namespace: str, keys: list[bytes], mode: str = "prefix",
               window: int | None = None) -> MatchResult:
        """Which keys are stored, in which tier, and the matched length (``Store.match``)."""
        return self.store.match(keys, mode, window, namespace=namespace)

    def remove(self, namespace: str, keys: list[bytes]) -> int:
        """Delete keys; returns how many existed."""
        return self.store.delete(keys, namespace=namespace)

    def read_block(self, namespace: str, key: bytes) -> bytes | None:
        """A copy of a block's bytes, or None on a miss."""
        view = self.store.get(key, namespace=namespace)
        if view is None:
            return None
        try:
            return bytes(view)
        finally:
            view.release()

    # ------------------------------------------------------------------------ write path
    def start_write(self, namespace: str, keys: list[bytes], sizes: list[int], *,
                    lease_s: float = DEFAULT_LEASE_S,
                    specs: list[tuple[str, int]] | None = None) -> HttpWriteSession:
        """Reserve space for the keys not stored yet and open a session for their uploads.

        Args:
            specs: named parts of each block as ``(name, size)`` (their sizes sum to the block
                size); None for plain whole-block uploads.

        Raises:
            CapacityError: the namespace's quota or the store is full, or too many sessions are
                open.
        """
        check_namespace(namespace)
        self._check_quota(namespace, sum(s for s in sizes if isinstance(s, int)))
        with self._lock:
            self._purge_locked()
            if len(self._sessions) >= self.max_sessions:
                raise CapacityError(f"{self.max_sessions} write sessions are open; finish some first",
                                    dimension="sessions")
            session = self.store.start_write(keys, sizes, lease_s, namespace=namespace)
            sid = f"{session.id}-{secrets.token_hex(8)}"
            layout: list[tuple[str, int, int]] = []
            off = 0
            for name, size in specs or []:
                layout.append((name, off, size))
                off += size
            todo = set(session.keys_to_write)
            rec = HttpWriteSession(sid, namespace, list(keys), session,
                                   {k: s for k, s in zip(keys, sizes) if k in todo}, layout)
            self._sessions[sid] = rec
        return rec

    def session(self, sid: Any) -> HttpWriteSession:
        """The HTTP write session ``sid``.

        Raises:
            NotFoundError: unknown id, or a session already finished and forgotten.
        """
        with self._lock:
            rec = self._sessions.get(sid) if isinstance(sid, str) else None
        if rec is None:
            raise NotFoundError(f"no write session {sid!r} (finished, expired or never started)")
        return rec

    def write_block(self, sid: str, key: bytes, data: memoryview | bytes, *, spec: str | None = None) -> bool:
        """Upload a key's payload, whole or one named part.

        Returns:
            True once the whole block is in the store's reservation.

        Raises:
            SessionError: the key is not in the session, the size is wrong, or a part repeats.
        """
        rec = self.session(sid)
        if key not in rec.sizes:
            raise SessionError(f"key {key.hex()[:16]}… is not among write session {sid}'s keys to write")
        size = rec.sizes[key]
        if spec is None:
            self.store.write(rec.session, key, data)
            return True
        part = next((p for p in rec.specs if p[0] == spec), None)
        if part is None:
            names = ", ".join(p[0] for p in rec.specs) or "none (upload whole blocks)"
            raise SessionError(f"unknown location spec {spec!r}; this session's specs: {names}")
        _, off, psize = part
        if len(data) != psize:
            raise SessionError(f"spec {spec!r} is {psize} bytes, got {len(data)}")
        with rec.lock:
            buf, done = rec.parts.setdefault(key, (bytearray(size), set()))
            if spec in done:
                raise SessionError(f"spec {spec!r} of key {key.hex()[:16]}… was already uploaded")
            buf[off:off + psize] = data
            done.add(spec)
            complete = len(done) == len(rec.specs)
            if complete:
                del rec.parts[key]
        if complete:
            # The block is whole: one copy into the store's reservation, then the buffer goes.
            self.store.write(rec.session, key, buf)
        return complete

    def finish_write(self, sid: str, ok_keys: list[bytes]) -> int:
        """Commit ``ok_keys`` (every one uploaded), release the rest, forget the session.

        Returns:
            how many keys were committed.
        """
        rec = self.session(sid)
        n = self.store.finish_write(rec.session, ok_keys)
        with self._lock:
            self._sessions.pop(sid, None)
        return n

    def abort_write(self, sid: str) -> None:
        """Release every reservation of the session and forget it."""
        rec = self.session(sid)
        self.store.abort_write(rec.session)
        with self._lock:
            self._sessions.pop(sid, None)

    def sessions_open(self) -> int:
        """How many HTTP write sessions are open."""
        with self._lock:
            self._purge_locked()
            return len(self._sessions)

    def _purge_locked(self) -> None:
        # Sessions whose lease ran out were aborted by the store's reaper; forget them here too.
        for sid in [s for s, r in self._sessions.items()
                    if r.session.state != OPEN or r.session.expired]:
            del self._sessions[sid]


_INSTANCE_FIELDS = ("instance_id", "instance_group", "block_size", "location_spec_infos",
                    "location_spec_groups", "model_deployment", "query_type")


def _check_instance(rec: Any) -> dict:
    if not isinstance(rec, dict):
        raise InvalidArgumentError("an instance registration is a JSON object")
    unknown = set(rec) - set(_INSTANCE_FIELDS) - {"trace_id"}
    if unknown:
        raise InvalidArgumentError(f"unknown instance field(s) {sorted(unknown)}; known: {', '.join(_INSTANCE_FIELDS)}")
    iid = rec.get("instance_id")
    if not isinstance(iid, str) or not iid:
        raise InvalidArgumentError("instance_id must be a non-empty string")
    group = check_namespace(rec.get("instance_group"))
    bs = rec.get("block_size")
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise InvalidArgumentError("block_size (tokens per block) must be an integer >= 1")
    specs = rec.get("location_spec_infos") or []
    if not isinstance(specs, list):
        raise InvalidArgumentError("location_spec_infos must be a list of {name, size}")
    names = set()
    clean_specs = []
    for s in specs:
        if (not isinstance(s, dict) or not isinstance(s.get("name"), str) or not s["name"]
                or not isinstance(s.get("size"), int) or isinstance(s.get("size"), bool) or s["size"] < 1):
            raise InvalidArgumentError("each location spec is {\"name\": non-empty string, \"size\": bytes >= 1}")
        if s["name"] in names:
            raise InvalidArgumentError(f"location spec {s['name']!r} appears twice")
        names.add(s["name"])
        clean_specs.append({"name": s["name"], "size": s["size"]})
    groups = rec.get("location_spec_groups") or []
    if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("name"), str)
            and all(n in names for n in g.get("spec_names") or []) for g in groups):
        raise InvalidArgumentError("location_spec_groups must be a list of {name, spec_names} naming known specs")
    md = rec.get("model_deployment") or {}
    if not isinstance(md, dict):
        raise InvalidArgumentError("model_deployment must be an object")
    return {"instance_id": iid, "instance_group": group, "block_size": bs,
            "location_spec_infos": clean_specs,
            "location_spec_groups": [{"name": g["name"], "spec_names": list(g.get("spec_names") or [])}
                                     for g in groups],
            "model_deployment": md, "query_type": rec.get("query_type") or "QT_UNSPECIFIED"}


def _identity(rec: dict) -> tuple:
    """What must match for a repeated registration to be accepted (user_data may change)."""
    md = {k: v for k, v in (rec.get("model_deployment") or {}).items() if k != "user_data" and v not in ("", 0, False, None)}
    return (rec["instance_group"], rec["block_size"],
            tuple((s["name"], s["size"]) for s in rec.get("location_spec_infos") or []),
            tuple(sorted(md.items(), key=lambda kv: kv[0])))
