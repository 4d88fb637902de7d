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
import uuid
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import quote

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

if TYPE_CHECKING:
    from tairstore.daemon.api import HttpApi

__all__ = ["TairCompat", "key_of_int64", "STATUS_CODES"]

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
QUERY_TYPES = ("QT_UNSPECIFIED", "QT_BATCH_GET", "QT_PREFIX_MATCH", "QT_REVERSE_ROLL_SW_MATCH",
               "QT_PREFIX_MATCH_WITH_MAMBA")
TRIM_STRATEGIES = ("TS_UNSPECIFIED", "TS_REMOVE_ALL_CACHE", "TS_REMOVE_ALL_META", "TS_TIMESTAMP")
STORAGE_TYPE = "ST_UNSPECIFIED"  # the manager's StorageType enum has no member for tairstore
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


class _InstanceMissing(NotFoundError):
    pass


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


def _mask(obj: Any, n: int, field: str) -> list[bool]:
    """A BlockMask as one bool per key: True = masked ([0, offset), or bool_masks values)."""
    if not obj:
        return [False] * n
    if not isinstance(obj, dict):
        raise InvalidArgumentError(f"{field} must be an object with offset or bool_masks")
    if "bool_masks" in obj:
        vals = (obj["bool_masks"] or {}).get("values") or []
        if not isinstance(vals, list) or not all(isinstance(b, bool) for b in vals):
            raise InvalidArgumentError(f"{field}.bool_masks.values must be a list of booleans")
        if len(vals) != n:
            raise InvalidArgumentError(f"{field}.bool_masks has {len(vals)} values for {n} blocks")
        return list(vals)
    off = _int(obj.get("offset", 0), f"{field}.offset", 0, n)
    return [i < off for i in range(n)]


def _header(code: str, message: str, request_id: str) -> dict:
    return {"status": {"code": code, "message": message}, "request_id": request_id, "tracer_result": ""}


def _empty_location() -> dict:
    return {"type": STORAGE_TYPE, "spec_size": 0, "location_specs": []}


class TairCompat:
    """Dispatches ``POST /api/<method>`` to the MetaService methods tairstore answers."""

    def __init__(self, api: "HttpApi") -> None:
        self.api = api
        self.control = api.control
        self.methods: dict[str, Callable] = {
            "registerInstance": self.register_instance,
            "getInstanceInfo": self.get_instance_info,
            "getCacheLocation": self.get_cache_location,
            "getCacheLocationLen": self.get_cache_location_len,
            "getCacheMeta": self.get_cache_meta,
            "startWriteCache": self.start_write_cache,
            "finishWriteCache": self.finish_write_cache,
            "removeCache": self.remove_cache,
            "trimCache": self.trim_cache,
        }

    async def handle(self, req: Request, method: str) -> Response:
        """Answer one MetaService call."""
        from tairstore.daemon.api import error_response, json_response, parse_json

        request_id = uuid.uuid4().hex
        try:
            # Before anything is looked up: without a known token nothing is answered, not even
            # whether the instance named exists.
            self.api.authenticate(req)
        except PermissionDeniedError as exc:
            self.api.events.auth("http", exc)
            return _with_header(error_response(exc), "INVALID_ARGUMENT", str(exc), request_id)
        try:
            body = _snake(parse_json(req.body))
        except InvalidArgumentError as exc:
            resp = error_response(exc, 400)
            return _with_header(resp, "INVALID_ARGUMENT", str(exc), request_id)
        request_id = body.get("trace_id") or request_id
        fn = self.methods.get(method)
        try:
            if fn is None:
                raise UnsupportedError(f"tairstore does not implement MetaService.{method}; "
                                       f"supported: {', '.join(self.methods)}")
            out = await fn(req, body)
        except PermissionDeniedError as exc:
            self.api.events.auth("http", exc)
            return _with_header(error_response(exc), "INVALID_ARGUMENT", str(exc), request_id)
        except _InstanceMissing as exc:
            return json_response({"header": _header("INSTANCE_NOT_EXIST", str(exc), request_id)})
        except StoreError as exc:
            code = next((c for cls, c in STATUS_CODES if isinstance(exc, cls)), "INTERNAL_ERROR")
            if isinstance(exc, NotFoundError):
                code = "INVALID_ARGUMENT"  # an unknown write session id
            return json_response({"header": _header(code, str(exc), request_id)})
        message, fields = out
        return json_response({"header": _header("OK", message, request_id), **fields})

    # ------------------------------------------------------------------------- helpers
    async def _instance(self, req: Request, body: dict) -> dict:
        iid = _str(body, "instance_id")
        if not iid:
            raise InvalidArgumentError("missing or invalid fields: instance_id")
        try:
            inst = await self.api.run(self.control.instance, iid)
        except NotFoundError as exc:
            raise _InstanceMissing(str(exc)) from None
        self.api.check(req, inst["instance_group"])
        return inst

    def _keys(self, body: dict, inst: dict, keys_field: str = "block_keys") -> list[bytes]:
        block_keys = _int64s(body, keys_field)
        if block_keys:
            return [key_of_int64(k) for k in block_keys]
        tokens = _int64s(body, "token_ids")
        if not tokens:
            raise InvalidArgumentError("missing or invalid fields: block_keys and token_ids")
        return self.control.keys_for_tokens(tokens, inst["block_size"])

    def _location(self, inst: dict, ns: str, key: bytes, tier: str | None,
                  names: list[str] | None = None) -> dict:
        specs = []
        off = 0
        base = f"{self.api.data_url}/{quote(ns, safe='')}/{key.hex()}"
        for s in inst.get("location_spec_infos") or []:
            if not names or s["name"] in names:
                specs.append({"name": s["name"],
                              "uri": f"{base}?tier={tier}&spec={quote(s['name'], safe='')}"
                                     f"&offset={off}&size={s['size']}"})
            off += s["size"]
        return {"type": STORAGE_TYPE, "spec_size": len(specs), "location_specs": specs}

    async def _hits(self, ns: str, keys: list[bytes]):
        return await self.api.run(self.control.locate, ns, keys, "exact")

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
        if missing:
            raise InvalidArgumentError("missing or invalid fields: " + ", ".join(missing))
        self.api.check(req, check_namespace(body["instance_group"]))
        specs = [{"name": s.get("name"), "size": _int(s.get("size", 0), "location_spec_infos.size")}
                 for s in body["location_spec_infos"] if isinstance(s, dict)]
        rec = {"instance_id": body["instance_id"], "instance_group": body["instance_group"],
               "block_size": bs, "location_spec_infos": specs,
               "location_spec_groups": body.get("location_spec_groups") or [],
               "model_deployment": body["model_deployment"],
               "query_type": _enum(body.get("query_type"), QUERY_TYPES, "query_type")}
        await self.api.run(self.control.register_instance, rec)
        storage = [{"global_unique_name": "tairstore", "data_url": self.api.data_url,
                    "http_url": self.api.http_url}]
        return "Instance registered successfully", {"storage_configs": json.dumps(storage), "extra_info": ""}

    async def get_instance_info(self, req: Request, body: dict):
        inst = await self._instance(req, body)
        info = {"quota_group_name": inst["instance_group"], "instance_group_name": inst["instance_group"],
                "instance_id": inst["instance_id"], "block_size": inst["block_size"],
                "location_spec_infos": [{"name": s["name"], "size": str(s["size"])}
                                        for s in inst["location_spec_infos"]],
                "model_deployment": inst["model_deployment"],
                "location_spec_groups": inst.get("location_spec_groups") or [],
                "query_type": inst.get("query_type") or "QT_UNSPECIFIED"}
        return "OK", {"instance_group": inst["instance_group"], "instance_info": info}

    async def _match(self, req: Request, body: dict):
        """(instance, namespace, keys, query type, per-key located-or-None list)."""
        inst = await self._instance(req, body)
        ns = inst["instance_group"]
        keys = self._keys(body, inst)
        qt = _enum(body.get("query_type"), QUERY_TYPES, "query_type")
        if qt == "QT_UNSPECIFIED":
            qt = inst.get("query_type") if inst.get("query_type") not in (None, "QT_UNSPECIFIED") else "QT_PREFIX_MATCH"
        if qt == "QT_PREFIX_MATCH_WITH_MAMBA":
            raise UnsupportedError("QT_PREFIX_MATCH_WITH_MAMBA is not supported; use QT_PREFIX_MATCH")
        m = await self._hits(ns, keys)
        tiers = m.tiers
        if qt == "QT_REVERSE_ROLL_SW_MATCH":
            sw = _int(body.get("sw_size", 0), "sw_size", -(1 << 31), (1 << 31) - 1)
            if not 1 <= sw <= len(keys):
                raise InvalidArgumentError(f"QT_REVERSE_ROLL_SW_MATCH needs 1 <= sw_size <= {len(keys)}, got {sw}")
            run, start = 0, None
            for i in range(len(keys) - 1, -1, -1):
                run = run + 1 if tiers[i] else 0
                if run == sw:
                    start = i
                    break
            picked = [tiers[i] if start is not None and start <= i < start + sw else None
                      for i in range(len(keys))]
            return inst, ns, keys, qt, picked, (sw if start is not None else 0)
        masked = _mask(body.get("block_mask"), len(keys), "block_mask")
        if qt == "QT_BATCH_GET":
            picked = [t for t, mk in zip(tiers, masked) if not mk]
            return inst, ns, [k for k, mk in zip(keys, masked) if not mk], qt, picked, \
                sum(t is not None for t in picked)
        # Prefix: masked keys are the caller's already (they continue the run, no location).
        picked, out_keys = [], []
        for k, t, mk in zip(keys, tiers, masked):
            if mk:
                continue
            if t is None:
                break
            picked.append(t)
            out_keys.append(k)
        return inst, ns, out_keys, qt, picked, len(picked)

    async def get_cache_location(self, req: Request, body: dict):
        inst, ns, keys, qt, tiers, _ = await self._match(req, body)
        names = body.get("location_spec_names") or None
        locs = [self._location(inst, ns, k, t, names) if t else _empty_location() for k, t in zip(keys, tiers)]
        return "Cache locations retrieved successfully", {"locations": locs}

    async def get_cache_location_len(self, req: Request, body: dict):
        *_, n = await self._match(req, body)
        return "Cache location length retrieved successfully", {"cache_location_len": str(n)}

    async def get_cache_meta(self, req: Request, body: dict):
        inst = await self._instance(req, body)
        ns = inst["instance_group"]
        keys = self._keys(body, inst)
        masked = _mask(body.get("block_mask"), len(keys), "block_mask")
        keys = [k for k, mk in zip(keys, masked) if not mk]
        m = await self._hits(ns, keys)
        locs = [self._location(inst, ns, k, t) if t else _empty_location() for k, t in zip(keys, m.tiers)]
        metas = [json.dumps({"key": k.hex(), "exists": t is not None, "tier": t}) for k, t in zip(keys, m.tiers)]
        return "Cache metadata retrieved successfully", {"locations": locs, "metas": metas}

    async def start_write_cache(self, req: Request, body: dict):
        inst = await self._instance(req, body)
        ns = inst["instance_group"]
        keys = self._keys(body, inst)
        size = self.control.block_bytes(inst)
        if size < 1:
            raise InvalidArgumentError("the instance registered no location_spec_infos, so its block size is unknown")
        groups = body.get("location_spec_group_names") or []
        if groups:
            all_specs = {s["name"] for s in inst["location_spec_infos"]}
            by_name = {g["name"]: set(g.get("spec_names") or []) for g in inst.get("location_spec_groups") or []}
            if len(groups) != len(keys) or any(by_name.get(g) != all_specs for g in groups):
                raise UnsupportedError("tairstore stores whole blocks: every block must carry every location spec")
        lease = _int(body.get("write_timeout_seconds", 0), "write_timeout_seconds", 0, int(MAX_LEASE_S)) \
            or DEFAULT_WRITE_TIMEOUT_S
        # A key repeated in one request is written once: later copies are masked like stored ones.
        first = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        unique = list(first)
        specs = [(s["name"], s["size"]) for s in inst["location_spec_infos"]]
        rec = await self.api.run(self.control.start_write, ns, unique, [size] * len(unique),
                                 lease_s=float(lease), specs=specs)
        todo = set(rec.keys_to_write)
        mask = [not (k in todo and first[k] == i) for i, k in enumerate(keys)]
        locs = []
        for k in rec.keys_to_write:
            loc_specs = [{"name": n, "uri": self.api.upload_url(rec.id, k, n)} for n, _ in specs]
            locs.append({"type": STORAGE_TYPE, "spec_size": len(loc_specs), "location_specs": loc_specs})
        return "Write cache session started successfully", {
            "write_session_id": rec.id, "block_mask": {"bool_masks": {"values": mask}}, "locations": locs}

    async def finish_write_cache(self, req: Request, body: dict):
        inst = await self._instance(req, body)
        sid = _str(body, "write_session_id")
        if not sid:
            raise InvalidArgumentError("missing or invalid fields: write_session_id")
        if "success_blocks" not in body:
            raise InvalidArgumentError("missing or invalid fields: success_blocks")
        rec = await self.api.run(self.control.session, sid)
        if rec.namespace != inst["instance_group"]:
            raise InvalidArgumentError(f"write session {sid} belongs to another instance group")
        todo = rec.keys_to_write
        sb = body["success_blocks"] or {}
        if "bool_masks" in sb and len((sb["bool_masks"] or {}).get("values") or []) == len(rec.keys) != len(todo):
            # A mask over every key of startWriteCache rather than over its locations.
            ok_all = _mask(sb, len(rec.keys), "success_blocks")
            ok_set = {k for k, ok in zip(rec.keys, ok_all) if ok}
            ok = [k for k in todo if k in ok_set]
        elif "bool_masks" in sb:
            ok = [k for k, good in zip(todo, _mask(sb, len(todo), "success_blocks")) if good]
        else:
            # {"offset": n}: the first n locations were written (a chain written in order).
            n = _int(sb.get("offset", len(todo)), "success_blocks.offset", 0, len(todo))
            ok = todo[:n]
        await self.api.run(self.control.finish_write, sid, ok)
        return "Write cache session finished successfully", {}

    async def remove_cache(self, req: Request, body: dict):
        inst = await self._instance(req, body)
        keys = self._keys(body, inst)
        masked = _mask(body.get("block_mask"), len(keys), "block_mask")
        await self.api.run(self.control.remove, inst["instance_group"], [k for k, mk in zip(keys, masked) if not mk])
        return "Cache removed successfully", {}

    async def trim_cache(self, req: Request, body: dict):
        inst = await self._instance(req, body)
        ns = inst["instance_group"]
        strategy = _enum(body.get("strategy"), TRIM_STRATEGIES, "strategy")
        if strategy in ("TS_REMOVE_ALL_CACHE", "TS_REMOVE_ALL_META"):
            self.api.check(req, ns, admin=True)
            await self.api.run(self.control.trim, ns, "all")
        elif strategy == "TS_TIMESTAMP":
            ts = _int(body.get("end_timestamp", 0), "end_timestamp") or _int(body.get("begin_timestamp", 0), "begin_timestamp")
            if ts <= 0:
                raise InvalidArgumentError("TS_TIMESTAMP needs end_timestamp (or begin_timestamp), seconds since the epoch")
            await self.api.run(self.control.trim, ns, "older_than", ts)
        else:
            raise InvalidArgumentError("missing or invalid fields: strategy")
        return "Cache trimmed successfully", {}


def _with_header(resp: Response, code: str, message: str, request_id: str) -> Response:
    """Add the MetaService header to an HTTP error answer (401/403/400)."""
    obj = json.loads(resp.body)
    obj["header"] = _header(code, message, request_id)
    resp.body = json.dumps(obj, separators=(",", ":")).encode()
    return resp
