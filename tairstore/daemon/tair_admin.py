"""Tair KVCache's AdminService subset on its own HTTP port, and the daemon's Tair set-up.

``POST /api/<method>`` on the admin port (``[tair] admin_http_port``; off unless set) answers the
calls Tair KVCache's operators and integration tests use: storages (``addStorage``,
``enableStorage``, ``disableStorage``, ``removeStorage``, ``listStorage``), instance groups
(``createInstanceGroup``, ``updateInstanceGroup`` with a version check, ``getInstanceGroup``,
``listInstanceGroup``, ``removeInstanceGroup``), instances (``listInstanceInfo``,
``removeInstance``), ``checkHealth`` and ``getManagerClusterInfo``. Every call needs an admin
token when auth is on, as the rest of tairstore's admin operations do.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from tairstore.errors import InvalidArgumentError, PermissionDeniedError, StoreError
from tairstore.daemon.auth import ALL_NAMESPACES
from tairstore.daemon.httpserver import Request, Response
from tairstore.daemon.tair_storage import TABLE_FILE, TairStorage

if TYPE_CHECKING:
    from tairstore.daemon.api import HttpApi
    from tairstore.daemon.config import TairConfig

__all__ = ["TairAdmin", "open_tair_storage"]


def open_tair_storage(cfg: "TairConfig", data_dir: str) -> TairStorage:
    """Open the Tair tables under ``data_dir`` and create the configured storages and groups."""
    root = os.path.abspath(cfg.root_path or os.path.join(data_dir, "tair-files"))
    storage = TairStorage(os.path.join(data_dir, TABLE_FILE), root)
    for s in cfg.storages:
        storage.add_storage(s)
    for g in cfg.instance_groups:
        old = storage.groups.get(g["name"])
        want = (list(g.get("storages") or []), int(g.get("quota_bytes", 0)))
        if old is None or (old["storage_candidates"], old["quota_bytes"]) != want:
            storage.put_group(g["name"], *want, create=old is None)
    return storage


class TairAdmin:
    """The HTTP application behind the admin port."""

    def __init__(self, api: "HttpApi", storage: TairStorage) -> None:
        self.api = api
        self.storage = storage
        self.methods: dict[str, Callable[[dict], Any]] = {
            "addStorage": lambda b: self.storage.add_storage(b.get("storage") or b) and {},
            "enableStorage": lambda b: self.storage.set_storage_enabled(_name(b, "global_unique_name"), True),
            "disableStorage": lambda b: self.storage.set_storage_enabled(_name(b, "global_unique_name"), False),
            "removeStorage": lambda b: self.storage.remove_storage(_name(b, "global_unique_name")),
            "listStorage": lambda b: {"storages": [s.config() for s in self.storage.storages.values()]},
            "createInstanceGroup": lambda b: self._put_group(b, create=True),
            "updateInstanceGroup": lambda b: self._put_group(b, create=False),
            "getInstanceGroup": lambda b: {"instance_group": _group_out(self.storage.group(_name(b, "name")))},
            "listInstanceGroup": lambda b: {"instance_groups": [
                _group_out(self.storage.group(n)) for n in list(self.storage.groups)]},
            "removeInstanceGroup": lambda b: self.storage.remove_group(_name(b, "name")),
            "listInstanceInfo": self._list_instances,
            "removeInstance": lambda b: self.storage.remove_instance(_name(b, "instance_id")) and {},
            "checkHealth": lambda b: {"is_health": True},
            "getManagerClusterInfo": self._cluster,
        }

    def max_body_bytes(self, method: str, path: str) -> int:
        """Admin bodies are small."""
        return 1 << 20

    async def __call__(self, req: Request) -> Response:
        """Answer one AdminService call in the manager's dialect."""
        from tairstore.daemon.api import error_response, json_response, parse_json
        from tairstore.daemon.tair_compat import _header, _snake, _with_header, request_id_of, status_code

        method = req.path.rsplit("/", 1)[-1] if req.path.startswith("/api/") else ""
        try:
            body = _snake(parse_json(req.body)) if req.body else {}
        except InvalidArgumentError:
            return json_response({}, 400)
        rid = request_id_of(body)
        fn = self.methods.get(method)
        if req.method != "POST" or fn is None:
            return json_response({"header": _header("UNSUPPORTED", f"no AdminService method {req.path}", rid)})
        try:
            self.api.check(req, ALL_NAMESPACES, admin=True)
        except PermissionDeniedError as exc:  # 401/403, as the rest of tairstore answers
            self.api.events.auth("http", exc)
            return _with_header(error_response(exc), "INVALID_ARGUMENT", str(exc), rid)
        try:
            out = await self.api.run(fn, body)
        except StoreError as exc:
            return json_response({"header": _header(status_code(exc), str(exc), rid)})
        return json_response({"header": _header("OK", "OK", rid), **(out if isinstance(out, dict) else {})})

    def _put_group(self, b: dict, *, create: bool) -> dict:
        from tairstore.daemon.tair_compat import _int, _names

        g = b.get("instance_group") or b
        if not isinstance(g, dict):
            raise InvalidArgumentError("instance_group must be an object")
        version = b.get("current_version", g.get("version"))
        rec = self.storage.put_group(_name(g, "name"), _names(g, "storage_candidates"),
                                     _int(g.get("quota_bytes", 0) or 0, "quota_bytes", 0),
                                     version=_int(version, "current_version") if version not in (None, "") and not create else None,
                                     create=create)
        return {"instance_group": _group_out(rec)}

    def _list_instances(self, b: dict) -> dict:
        group = b.get("instance_group_name") or b.get("instance_group")
        with self.storage.lock:
            out = [dict(r) for r in self.storage.instances.values() if not group or r["instance_group"] == group]
        return {"instance_infos": out}

    def _cluster(self, b: dict) -> dict:
        compat = self.api.compat
        return {"self_node_id": compat.node_id, "leader_node_id": compat.node_id,
                "nodes": [{"node_id": compat.node_id, "is_leader": True}]}


def _name(b: dict, field: str) -> str:
    v = b.get(field)
    if not isinstance(v, str) or not v:
        raise InvalidArgumentError(f"missing or invalid fields: {field}")
    return v


def _group_out(rec: dict) -> dict:
    return {"name": rec["name"], "storage_candidates": rec["storage_candidates"],
            "quota_bytes": str(rec["quota_bytes"]), "version": str(rec["version"]),
            "used_bytes": str(rec.get("used_bytes", 0))}
