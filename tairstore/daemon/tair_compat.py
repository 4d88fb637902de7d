"""Tair KVCache's MetaService over HTTP/JSON, answered by tairstore.

A client written for Tair KVCache's manager POSTs to ``/api/<lowerCamelMethod>`` with the
request message in proto3's JSON mapping and reads ``header.status.code`` from the answer. This
module speaks that dialect on top of :class:`~tairstore.daemon.control.ControlPlane`:

- field names: requests may use the proto field names (``block_keys``) or lowerCamelCase
  (``blockKeys``), as any proto3 JSON parser accepts; responses use the proto field names, as
  the manager does;
- ``int64`` values are JSON strings in responses and strings or numbers in requests; enums are
  names (numbers accepted in requests);
- every response field is printed, defaults included, so clients may index it directly;
- application errors are HTTP 200 with ``header.status.code`` set (``INVALID_ARGUMENT``,
  ``INSTANCE_NOT_EXIST``, ``DUPLICATE_ENTITY``, ``UNSUPPORTED``, ...), as the manager answers;
  only a missing or refused token gets 401/403, and a body that is not JSON gets 400.

Mapping onto tairstore: an instance's ``instance_group`` is its namespace; an ``int64`` block key
``k`` is the 8-byte key ``k.to_bytes(8, "big", signed=True)``; ``token_ids`` become keys with
:func:`tairstore.keys.chain_hashes` at the instance's ``block_size``. A block of an instance is
``sum(location_spec_infos[].size)`` bytes, the specs laid out in registration order; each
``LocationSpec.uri`` names the block and the spec's byte range. The semantics kept and the ones
that differ are listed in ``docs/DAEMON.md``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Callable

from tairstore.config import MAX_LEASE_S
from tairstore.errors import (
    CapacityError,
    ClosedError,
    CorruptionError,
    FatalIOError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    SessionError,
    StoreError,
)
from tairstore.daemon.control import ConflictError, UnsupportedError, check_namespace
from tairstore.daemon.httpserver import Request, Response
from tairstore.daemon.tair_storage import STORAGE_TYPES, GroupMissing, InstanceMissing, TairStorage

__all__ = ["TairCompat", "key_of_int64", "STATUS_CODES"]

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
QUERY_TYPES = ("QT_UNSPECIFIED", "QT_BATCH_GET", "QT_PREFIX_MATCH", "QT_REVERSE_ROLL_SW_MATCH",
               "QT_PREFIX_MATCH_WITH_MAMBA")
TRIM_STRATEGIES = ("TS_UNSPECIFIED", "TS_REMOVE_ALL_CACHE", "TS_REMOVE_ALL_META", "TS_TIMESTAMP")
STORAGE_TYPE = "ST_UNSPECIFIED"  # a location with no storage (a miss)
STORAGE_ENUM = ("ST_UNSPECIFIED", "ST_3FS", "ST_MOONCAKE", "ST_TAIRMEMPOOL", "ST_NFS", "ST_VCNS_3FS",
                "ST_DUMMY", "ST_VINEYARD")
DEFAULT_WRITE_TIMEOUT_S = 30

#: The manager's ErrorCode for each failure kind (first match wins).
STATUS_CODES: list[tuple[type[BaseException], str]] = [
    (ConflictError, "DUPLICATE_ENTITY"),
    (UnsupportedError, "UNSUPPORTED"),
    (SessionError, "INVALID_ARGUMENT"),
    (InvalidArgumentError, "INVALID_ARGUMENT"),
    (CapacityError, "REACH_MAX_ENTITY_CAPACITY"),
    (ClosedError, "SERVICE_NOT_READY"),
    (FatalIOError, "IO_ERROR"),
    (CorruptionError, "IO_ERROR"),
    (StoreError, "INTERNAL_ERROR"),
]


def key_of_int64(v: int) -> bytes:
    """The tairstore key of a Tair KVCache ``int64`` block key."""
    return v.to_bytes(8, "big", signed=True)


# --------------------------------------------------------------------- proto3 JSON parsing
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def _snake(obj: Any) -> Any:
    """Accept lowerCamelCase field names as proto3 JSON parsers do (``blockKeys``)."""
    if isinstance(obj, dict):
        return {_CAMEL.sub("_", k).lower() if isinstance(k, str) else k: _snake(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_snake(v) for v in obj]
    return obj


def _int(v: Any, field: str, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    if isinstance(v, bool):
        raise InvalidArgumentError(f"{field}: expected an integer, got {v!r}")
    if isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            raise InvalidArgumentError(f"{field}: {v!r} is not an integer") from None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidArgumentError(f"{field}: expected an integer in {lo}..{hi}, got {v!r}")
    return v


def _int64s(req: dict, field: str) -> list[int]:
    raw = req.get(field) or []
    if not isinstance(raw, list):
        raise InvalidArgumentError(f"{field} must be a list")
    return [_int(v, field) for v in raw]


def _enum(v: Any, names: tuple[str, ...], field: str) -> str:
    if v is None:
        return names[0]
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names):
        return names[v]
    if v in names:
        return v
    raise InvalidArgumentError(f"{field}: unknown value {v!r}; expected one of {', '.join(names)}")


def _str(req: dict, field: str) -> str:
    v = req.get(field, "")
    if not isinstance(v, str):
        raise InvalidArgumentError(f"{field} must be a string")
    return v


def _names(req: dict, field: str) -> list[str]:
    """A repeated string field (empty list when absent)."""
    v = req.get(field) or []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise InvalidArgumentError(f"{field} must be a list of strings")
    return v


def _spec_infos(raw: Any) -> list[dict]:
    """``location_spec_infos``: unique names, sizes > 0."""
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        raise InvalidArgumentError("location_spec_infos must be a list of {name, size}")
    specs = [{"name": _str(s, "name"), "size": _int(s.get("size", 0), "location_spec_infos.size", 1)} for s in raw]
    names = [s["name"] for s in specs]
    if "" in names or len(set(names)) != len(names):
        raise InvalidArgumentError("location_spec_infos: every spec needs a unique, non-empty name")
    return specs


def _spec_groups(raw: Any, specs: list[dict]) -> list[dict]:
    """``location_spec_groups``: each names specs the instance has."""
    if not raw:
        return []
    if not isinstance(raw, list) or not all(isinstance(g, dict) for g in raw):
        raise InvalidArgumentError("location_spec_groups must be a list of {name, spec_names}")
    known = {s["name"] for s in specs}
    out = []
    for g in raw:
        names = _names(g, "spec_names")
        unknown = sorted(set(names) - known)
        if unknown:
            raise InvalidArgumentError(f"location_spec_groups {g.get('name')!r}: unknown spec(s) {', '.join(unknown)}")
        out.append({"name": _str(g, "name"), "spec_names": names})
    return out


def _mask(obj: Any, n: int, field: str) -> list[bool]:
    """A BlockMask as one bool per key: True = masked ([0, offset), or bool_masks values)."""
    if not obj:
        return [False] * n
    if not isinstance(obj, dict):
        raise InvalidArgumentError(f"{field} must be an object with offset or bool_masks")
    if "bool_masks" in obj:
        bm = obj["bool_masks"] or {}
        vals = (bm.get("values") or []) if isinstance(bm, dict) else None
        if not isinstance(vals, list) or not all(isinstance(b, bool) for b in vals):
            raise InvalidArgumentError(f"{field}.bool_masks.values must be a list of booleans")
        if len(vals) != n:
            raise InvalidArgumentError(f"{field}.bool_masks has {len(vals)} values for {n} blocks")
        return list(vals)
    off = _int(obj.get("offset", 0), f"{field}.offset", 0, n)
    return [i < off for i in range(n)]


def request_id_of(body: dict) -> str:
    """``header.request_id`` as the manager forms it: ``<trace_id>_<microseconds since the epoch>``."""
    trace = body.get("trace_id")
    return f"{trace if isinstance(trace, str) else ''}_{time.time_ns() // 1000}"


def status_code(exc: BaseException) -> str:
    """The manager's ErrorCode for a failure."""
    if isinstance(exc, (GroupMissing, InstanceMissing)):
        return "INSTANCE_NOT_EXIST"
    if isinstance(exc, NotFoundError):
        return "INVALID_ARGUMENT"
    return next((c for cls, c in STATUS_CODES if isinstance(exc, cls)), "INTERNAL_ERROR")


def _header(code: str, message: str, request_id: str) -> dict:
    return {"status": {"code": code, "message": message}, "request_id": request_id, "tracer_result": ""}


#: Every field of each answer with its default: the manager prints them all, errors included.
RESPONSE_DEFAULTS: dict[str, dict] = {
    "registerInstance": {"storage_configs": "", "extra_info": ""},
    "getInstanceInfo": {"instance_group": "", "instance_info": {}},
    "getCacheLocation": {"locations": []},
    "getCacheLocationLen": {"cache_location_len": "0"},
    "getCacheLocationsByBackend": {"key_locations": []},
    "getCacheMeta": {"locations": [], "metas": []},
    "startWriteCache": {"write_session_id": "", "block_mask": {}, "locations": []},
    "getClusterInfo": {"self_node_id": "", "leader_node_id": "", "leader_endpoint": {}},
    "reportEvent": {"item_results": [], "extra_info": ""},
}


class TairCompat:
    """Dispatches ``POST /api/<method>`` to the MetaService methods tairstore answers.

    The instances and blocks live in a :class:`~tairstore.daemon.tair_storage.TairStorage`
    attached by the daemon (:meth:`attach`): the engine's SDK writes the bytes to the storage the
    locations name, as with Tair KVCache's manager.

    Args:
        api: the :class:`tairstore.daemon.api.HttpApi` that owns it (its ``control`` plane and
            responses); not imported here, so that the two modules import in one direction.
    """

    def __init__(self, api: Any) -> None:
        self.api = api
        self.control = api.control
        self.storage: TairStorage | None = None
        self.node_id = uuid.uuid4().hex[:16]
        self.meta_rpc_port = 0
        self.methods: dict[str, Callable] = {
            "registerInstance": self.register_instance,
            "getInstanceInfo": self.get_instance_info,
            "getCacheLocation": self.get_cache_location,
            "getCacheLocationLen": self.get_cache_location_len,
            "getCacheLocationsByBackend": self.get_cache_locations_by_backend,
            "getCacheMeta": self.get_cache_meta,
            "startWriteCache": self.start_write_cache,
            "finishWriteCache": self.finish_write_cache,
            "removeCache": self.remove_cache,
            "trimCache": self.trim_cache,
            "getClusterInfo": self.get_cluster_info,
            "reportEvent": self.report_event,
        }

    def attach(self, storage: TairStorage, *, meta_rpc_port: int = 0) -> None:
        """Serve the MetaService from ``storage`` (the daemon calls this at start)."""
        self.storage = storage
        self.meta_rpc_port = meta_rpc_port

    async def handle(self, req: Request, method: str) -> Response:
        """Answer one MetaService call."""
        from tairstore.daemon.api import error_response, json_response, parse_json

        request_id = request_id_of({})  # the body is not read before the token is checked
        try:
            # Before anything is looked up: without a known token nothing is answered, not even
            # whether the instance named exists.
            self.api.authenticate(req)
        except PermissionDeniedError as exc:
            self.api.events.auth("http", exc)
            return _with_header(error_response(exc), "INVALID_ARGUMENT", str(exc), request_id)
        try:
            body = _snake(parse_json(req.body))
        except InvalidArgumentError:
            return json_response({}, 400)  # the manager answers an unparsable body 400 with {}
        request_id = request_id_of(body)
        defaults = RESPONSE_DEFAULTS.get(method, {})
        fn = self.methods.get(method)
        try:
            if fn is None:
                raise UnsupportedError(f"tairstore does not implement MetaService.{method}; "
                                       f"supported: {', '.join(self.methods)}")
            if self.storage is None:
                raise ClosedError("the Tair KVCache tables are not open")
            out = await fn(req, body)
        except PermissionDeniedError as exc:
            self.api.events.auth("http", exc)
            return _with_header(error_response(exc), "INVALID_ARGUMENT", str(exc), request_id)
        except StoreError as exc:
            return json_response({"header": _header(status_code(exc), str(exc), request_id), **defaults})
        message, fields = out
        return json_response({"header": _header("OK", message, request_id), **defaults, **fields})

    # ------------------------------------------------------------------------- helpers
    async def _instance(self, req: Request, body: dict) -> dict:
        iid = _str(body, "instance_id")
        if not iid:
            raise InvalidArgumentError("missing or invalid fields: instance_id")
        inst = await self.api.run(self.storage.instance, iid)
        self.api.check(req, inst["instance_group"])
        return inst

    def _keys(self, body: dict, inst: dict, keys_field: str = "block_keys") -> list[str]:
        block_keys = _int64s(body, keys_field)
        if block_keys:
            return [key_of_int64(k).hex() for k in block_keys]
        tokens = _int64s(body, "token_ids")
        if not tokens:
            raise InvalidArgumentError("missing or invalid fields: block_keys and token_ids")
        return [k.hex() for k in self.control.keys_for_tokens(tokens, inst["block_size"])]

    def _location(self, inst: dict, block: dict | None, names: list[str] | None = None) -> dict:
        """A CacheLocation: the block's specs (present ones, filtered by ``names``); a miss
        gets one ``{name, uri: ""}`` per wanted spec, as the manager answers a batch-get miss."""
        specs, off = [], 0
        have = set(block["specs"]) if block else set()
        for s in inst.get("location_spec_infos") or []:
            if not names or s["name"] in names:
                if block is None:
                    specs.append({"name": s["name"], "uri": ""})
                elif s["name"] in have:
                    specs.append({"name": s["name"], "uri": self.storage.uri(block, off, s["size"])})
            off += s["size"]
        typ = STORAGE_TYPES[self.storage.storages[block["storage"]].type][0] \
            if block and block["storage"] in self.storage.storages else STORAGE_TYPE
        return {"type": typ, "spec_size": len(specs), "location_specs": specs}

    # ------------------------------------------------------------------------- methods
    async def register_instance(self, req: Request, body: dict):
        missing = [f for f in ("instance_group", "instance_id") if not _str(body, f)]
        bs = _int(body.get("block_size", 0), "block_size", -(1 << 31), (1 << 31) - 1)
        if bs <= 0:
            missing.append("block_size (must be > 0)")
        if not isinstance(body.get("model_deployment"), dict):
            missing.append("model_deployment")
        if not body.get("location_spec_infos"):
            missing.append("location_spec_infos")
        group = _str(body, "instance_group")
        if group:
            # The group is checked first, as the manager does: its error names the group.
            await self.api.run(self.storage.group, group)
        if missing:
            raise InvalidArgumentError("missing or invalid fields: " + ", ".join(missing))
        self.api.check(req, check_namespace(group))
        specs = _spec_infos(body["location_spec_infos"])
        qt = body.get("default_query_type", body.get("query_type"))
        rec = {"instance_id": body["instance_id"], "instance_group": group,
               "block_size": bs, "location_spec_infos": specs,
               "location_spec_groups": _spec_groups(body.get("location_spec_groups"), specs),
               "model_deployment": body["model_deployment"],
               "query_type": _enum(qt, QUERY_TYPES, "default_query_type")}
        new = await self.api.run(self.storage.register, rec)
        try:
            # Also a tairstore instance (namespace = group), so tairstore's own endpoints and
            # clients know it; this also refuses blocks larger than the store takes.
            await self.api.run(self.control.register_instance, dict(rec))
        except StoreError:
            if new:
                await self.api.run(self.storage.remove_instance, rec["instance_id"])
            raise
        configs = await self.api.run(self.storage.storage_configs, group)
        return "Instance registered successfully", {"storage_configs": json.dumps(configs), "extra_info": ""}

    async def get_instance_info(self, req: Request, body: dict):
        inst = await self._instance(req, body)
        info = {"quota_group_name": inst["instance_group"], "instance_group_name": inst["instance_group"],
                "instance_id": inst["instance_id"], "block_size": inst["block_size"],
                "location_spec_infos": [{"name": s["name"], "size": str(s["size"])}
                                        for s in inst["location_spec_infos"]],
                "model_deployment": inst["model_deployment"],
                "location_spec_groups": inst.get("location_spec_groups") or [],
                "query_type": inst.get("query_type") or "QT_UNSPECIFIED",
                "default_query_type": inst.get("query_type") or "QT_UNSPECIFIED"}
        return "OK", {"instance_group": inst["instance_group"], "instance_info": info}

    async def _match(self, req: Request, body: dict):
        """(instance, per-key block-or-None list to answer, matched count)."""
        inst = await self._instance(req, body)
        keys = self._keys(body, inst)
        qt = _enum(body.get("query_type"), QUERY_TYPES, "query_type")
        if qt == "QT_UNSPECIFIED":
            qt = inst.get("query_type") if inst.get("query_type") not in (None, "QT_UNSPECIFIED") else "QT_PREFIX_MATCH"
        if qt == "QT_PREFIX_MATCH_WITH_MAMBA":
            raise UnsupportedError("QT_PREFIX_MATCH_WITH_MAMBA is not supported; use QT_PREFIX_MATCH")
        names = _names(body, "location_spec_names") or None
        found = await self.api.run(self.storage.lookup, inst["instance_id"], keys)
        if names:
            # A block serves a query only if it holds every spec asked for (hybrid models).
            found = [b if b and set(names) <= set(b["specs"]) else None for b in found]
        if qt == "QT_BATCH_GET":  # the manager ignores block_mask here
            return inst, found, sum(b is not None for b in found), names, True
        if qt == "QT_REVERSE_ROLL_SW_MATCH":
            sw = _int(body.get("sw_size", 0), "sw_size", -(1 << 31), (1 << 31) - 1)
            if not 1 <= sw <= len(keys):
                raise InvalidArgumentError(f"QT_REVERSE_ROLL_SW_MATCH needs 1 <= sw_size <= {len(keys)}, got {sw}")
            run, start = 0, None
            for i in range(len(keys) - 1, -1, -1):
                run = run + 1 if found[i] else 0
                if run == sw:
                    start = i
                    break
            picked = [found[i] if start is not None and start <= i < start + sw else None
                      for i in range(len(keys))]
            return inst, picked, (sw if start is not None else 0), names, False
        masked = _mask(body.get("block_mask"), len(keys), "block_mask")
        # Prefix: masked keys are the caller's already (they continue the run, no location).
        picked = []
        for b, mk in zip(found, masked):
            if mk:
                continue
            if b is None:
                break
            picked.append(b)
        return inst, picked, len(picked), names, False

    async def get_cache_location(self, req: Request, body: dict):
        inst, blocks, _, names, _ = await self._match(req, body)
        return "Cache locations retrieved successfully", {
            "locations": [self._location(inst, b, names) for b in blocks]}

    async def get_cache_location_len(self, req: Request, body: dict):
        *_, n, _, _ = await self._match(req, body)
        return "Cache location length retrieved successfully", {"cache_location_len": str(n)}

    async def get_cache_locations_by_backend(self, req: Request, body: dict):
        """One ``CacheLocationVector`` per key: the block's location when its storage type is one
        of ``backend_selectors[].backend_type`` (an empty vector for a miss), QT_BATCH_GET only."""
        if _enum(body.get("query_type"), QUERY_TYPES, "query_type") != "QT_BATCH_GET":
            raise InvalidArgumentError("GetCacheLocationsByBackend only supports QT_BATCH_GET")
        sel = body.get("backend_selectors") or []
        if not isinstance(sel, list) or not all(isinstance(x, dict) for x in sel):
            raise InvalidArgumentError("backend_selectors must be a list of {backend_type, strategy}")
        if not sel:
            raise InvalidArgumentError("backend_selectors must not be empty")
        wanted = {_enum(x.get("backend_type"), STORAGE_ENUM, "backend_selectors.backend_type") for x in sel}
        inst, blocks, _, names, _ = await self._match(req, body)
        out = []
        for b in blocks:
            loc = self._location(inst, b, names) if b else None
            out.append({"locations": [loc] if loc and loc["type"] in wanted else []})
        return "Cache locations retrieved successfully", {"key_locations": out}

    async def get_cache_meta(self, req: Request, body: dict):
        """Every requested key's block, serving or being written; ``metas[i]`` is the manager's
        JSON string ``{"id", "status"}`` (``CLS_SERVING``, ``CLS_WRITING``, ``CLS_NOT_FOUND``)."""
        inst = await self._instance(req, body)
        keys = self._keys(body, inst)
        masked = _mask(body.get("block_mask"), len(keys), "block_mask")
        keys = [k for k, mk in zip(keys, masked) if not mk]
        found = await self.api.run(self.storage.peek, inst["instance_id"], keys)
        all_specs = [s["name"] for s in inst["location_spec_infos"]]
        locs, metas = [], []
        for k, b in zip(keys, found):
            if b is None:
                locs.append({"type": STORAGE_TYPE, "spec_size": 0, "location_specs": []})
                metas.append(json.dumps({"status": "CLS_NOT_FOUND"}))
                continue
            serving = bool(b["specs"])
            locs.append(self._location(inst, b if serving else dict(b, specs=all_specs)))
            metas.append(json.dumps({"id": k, "status": "CLS_SERVING" if serving else "CLS_WRITING"}))
        return "Cache metadata retrieved successfully", {"locations": locs, "metas": metas}

    async def start_write_cache(self, req: Request, body: dict):
        inst = await self._instance(req, body)
        keys = self._keys(body, inst)
        all_specs = [s["name"] for s in inst["location_spec_infos"]]
        groups = _names(body, "location_spec_group_names")
        if groups:
            by_name = {g["name"]: list(g.get("spec_names") or []) for g in inst.get("location_spec_groups") or []}
            if len(groups) != len(keys):
                raise InvalidArgumentError(f"location_spec_group_names has {len(groups)} names for {len(keys)} blocks")
            unknown = sorted({g for g in groups if g not in by_name})
            if unknown:
                raise InvalidArgumentError(f"unknown location spec group(s): {', '.join(unknown)}")
            per_key = [by_name[g] for g in groups]
        else:
            per_key = [all_specs] * len(keys)
        lease = _int(body.get("write_timeout_seconds", 0), "write_timeout_seconds", 0, int(MAX_LEASE_S)) \
            or DEFAULT_WRITE_TIMEOUT_S
        rec = await self.api.run(self.storage.start_write, inst["instance_id"], keys, per_key, float(lease))
        todo = rec["todo"]
        seen: set[str] = set()
        mask = []
        for k in keys:
            mask.append(not (k in todo and k not in seen))
            seen.add(k)
        blocks = await self.api.run(self.storage.peek, inst["instance_id"], list(todo))
        locs = [self._location(inst, dict(b, specs=todo[k]), todo[k]) for k, b in zip(todo, blocks)]
        n = mask.index(False) if False in mask else len(mask)
        clean = all(mask[:n]) and not any(mask[n:])
        block_mask = {"offset": n} if clean else {"bool_masks": {"values": mask}}
        return "Write cache session started successfully", {
            "write_session_id": rec["id"], "block_mask": block_mask, "locations": locs}

    async def finish_write_cache(self, req: Request, body: dict):
        inst = await self._instance(req, body)
        sid = _str(body, "write_session_id")
        if not sid:
            raise InvalidArgumentError("missing or invalid fields: write_session_id")
        if "success_blocks" not in body:
            raise InvalidArgumentError("missing or invalid fields: success_blocks")
        n = await self.api.run(self.storage.session_len, inst["instance_id"], sid)
        sb = body["success_blocks"] or {}
        if not isinstance(sb, dict):
            raise InvalidArgumentError("success_blocks must be an object with offset or bool_masks")
        if "bool_masks" in sb:
            ok = _mask(sb, n, "success_blocks")
        else:
            # {"offset": n}: the first n locations were written (a chain written in order).
            k = _int(sb.get("offset", n), "success_blocks.offset", 0, n)
            ok = [i < k for i in range(n)]
        await self.api.run(self.storage.finish_write, inst["instance_id"], sid, ok)
        return "Write cache session finished successfully", {}

    async def remove_cache(self, req: Request, body: dict):
        inst = await self._instance(req, body)
        keys = self._keys(body, inst)
        masked = _mask(body.get("block_mask"), len(keys), "block_mask")
        await self.api.run(self.storage.remove, inst["instance_id"], [k for k, mk in zip(keys, masked) if not mk])
        return "Cache removed successfully", {}

    async def trim_cache(self, req: Request, body: dict):
        inst = await self._instance(req, body)
        strategy = _enum(body.get("strategy"), TRIM_STRATEGIES, "strategy")
        if strategy == "TS_UNSPECIFIED":
            raise InvalidArgumentError("missing or invalid fields: strategy")
        if strategy != "TS_REMOVE_ALL_CACHE":  # as the manager: only remove-all is implemented
            raise UnsupportedError(f"trim strategy {strategy} is not implemented; use TS_REMOVE_ALL_CACHE")
        self.api.check(req, inst["instance_group"], admin=True)
        await self.api.run(self.storage.trim, inst["instance_id"])
        return "Cache trimmed successfully", {}

    async def get_cluster_info(self, req: Request, body: dict):
        """A single node is its own leader (no instance check, as the manager answers)."""
        from urllib.parse import urlsplit

        u = urlsplit(self.api.http_url)
        ep = {"node_id": self.node_id, "host": u.hostname or "127.0.0.1",
              "meta_rpc_port": self.meta_rpc_port or (u.port or 0), "meta_http_port": u.port or 0,
              "custom_info": ""}
        return "OK", {"self_node_id": self.node_id, "leader_node_id": self.node_id, "leader_endpoint": ep}

    async def report_event(self, req: Request, body: dict):
        """Checked as the manager checks it; with events, ``INSTANCE_NOT_EXIST``: tairstore has
        no event-reporting storage backend (the manager's Vineyard events)."""
        iid, host = _str(body, "instance_id"), _str(body, "host_ip_port")
        if not iid or not host:
            raise InvalidArgumentError("empty instance_id or host_ip_port")
        if not body.get("events"):
            return "OK", {}
        if _enum(body.get("storage_type"), STORAGE_ENUM, "storage_type") == "ST_UNSPECIFIED":
            raise InvalidArgumentError("storage_type is required")
        raise InstanceMissing(f"EventReportingBackend not found for instance: {iid}")


def _with_header(resp: Response, code: str, message: str, request_id: str) -> Response:
    """Add the MetaService header to an HTTP error answer (401/403/400)."""
    obj = json.loads(resp.body)
    obj["header"] = _header(code, message, request_id)
    resp.body = json.dumps(obj, separators=(",", ":")).encode()
    return resp
