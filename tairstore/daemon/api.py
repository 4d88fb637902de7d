"""The daemon's HTTP/JSON API: health, stats, metrics, namespaces, instances, cache control.

Routes are a table (method, path pattern, handler). Each handler checks the caller's token
against the namespace it touches, runs the store work in a worker thread (a store call may wait
for an fsync) and returns JSON. Errors become ``{"error": {"type", "message"}}`` with the status
of :data:`ERROR_STATUS`; nothing a client sends can crash the server: an unexpected exception is
logged and answered with 500.

``POST /api/<method>`` answers Tair KVCache's MetaService (see :mod:`tairstore.daemon.tair_compat`).
The endpoint reference with examples is ``docs/DAEMON.md``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from typing import Any, Awaitable, Callable
from urllib.parse import quote

import trio

from tairstore import __version__
from tairstore.config import DEFAULT_NAMESPACE, MAX_KEY_BYTES
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
    StoreLockedError,
    TierUnavailableError,
)
from tairstore.daemon.auth import ALL_NAMESPACES, Authenticator, Unauthenticated
from tairstore.daemon.control import KEEP, ConflictError, ControlPlane, UnsupportedError, check_namespace
from tairstore.daemon.events import ConnectionEvents
from tairstore.daemon.httpserver import Request, Response
from tairstore.daemon.metrics import Metrics

__all__ = ["ERROR_STATUS", "HttpApi", "json_response", "error_response"]

log = logging.getLogger(__name__)

MAX_KEYS = 1 << 20  # keys in one request; a 1M-token prompt at page size 1

#: Exception type -> HTTP status; the first match wins, so subclasses come first.
ERROR_STATUS: list[tuple[type[BaseException], int]] = [
    (Unauthenticated, 401),
    (PermissionDeniedError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (SessionError, 409),
    (InvalidArgumentError, 400),
    (CapacityError, 507),
    (TierUnavailableError, 503),
    (UnsupportedError, 501),
    (ClosedError, 503),
    (FatalIOError, 503),
    (StoreLockedError, 503),
    (CorruptionError, 500),
    (StoreError, 500),
]


def status_of(exc: BaseException) -> int:
    """The HTTP status for an exception."""
    for cls, status in ERROR_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def json_response(obj: Any, status: int = 200) -> Response:
    """A JSON response."""
    return Response(status, json.dumps(obj, separators=(",", ":")).encode())


def error_response(exc: BaseException, status: int | None = None) -> Response:
    """``{"error": {"type", "message"}}`` for an exception."""
    status = status or status_of(exc)
    resp = json_response({"error": {"type": type(exc).__name__, "message": str(exc)}}, status)
    if status == 401:
        resp.headers.append(("www-authenticate", 'Bearer realm="tairstore"'))
    return resp


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object ({} for an empty body)."""
    if not body.strip():
        return {}
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    return obj


def hex_key(text: Any) -> bytes:
    """A block key from its hex string."""
    if not isinstance(text, str):
        raise InvalidArgumentError("keys are hex strings")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise InvalidArgumentError(f"key {text[:20]!r} is not hex") from None
    if not 1 <= len(key) <= MAX_KEY_BYTES:
        raise InvalidArgumentError(
            f"keys are 1..{MAX_KEY_BYTES} bytes (2..{2 * MAX_KEY_BYTES} hex digits), got {len(key)} bytes")
    return key


Handler = Callable[..., Awaitable[Response]]


class HttpApi:
    """The application behind :class:`~tairstore.daemon.httpserver.HttpServer`.

    Args:
        control: the control plane over the store.
        auth: token checks.
        metrics: where requests are counted and ``/metrics`` comes from.
        http_max_body_bytes: the largest JSON body accepted.
        data_url: ``tairstore://host:port`` of the data protocol (for location URIs).
        http_url: ``http://host:port`` of this API (for upload URLs).
        worker_threads: store calls running at once.
    """

    def __init__(self, control: ControlPlane, auth: Authenticator, metrics: Metrics, *,
                 http_max_body_bytes: int = 8 << 20, data_url: str = "", http_url: str = "",
                 worker_threads: int = 4) -> None:
        from tairstore.daemon.tair_compat import TairCompat

        self.control = control
        self.auth = auth
        self.metrics = metrics
        self.events = ConnectionEvents(metrics)
        self.http_max_body_bytes = http_max_body_bytes
        self.data_url = data_url
        self.http_url = http_url
        self.limiter = trio.CapacityLimiter(worker_threads)
        self.started = time.monotonic()
        self.compat = TairCompat(self)
        self.routes: list[tuple[str, re.Pattern, str, Handler]] = []
        for method, pattern, op, handler in (
            ("GET", r"/health", "health", self.health),
            ("GET", r"/stats", "stats", self.stats),
            ("GET", r"/metrics", "metrics", self.metrics_text),
            ("GET", r"/namespaces", "namespaces_list", self.namespaces_list),
            ("POST", r"/namespaces", "namespaces_create", self.namespaces_create),
            ("GET", r"/namespaces/(?P<name>[^/]+)", "namespaces_get", self.namespaces_get),
            ("PUT", r"/namespaces/(?P<name>[^/]+)", "namespaces_update", self.namespaces_update),
            ("GET", r"/instances", "instances_list", self.instances_list),
            ("POST", r"/instances", "instances_register", self.instances_register),
            ("GET", r"/instances/(?P<iid>[^/]+)", "instances_get", self.instances_get),
            ("POST", r"/cache/location", "cache_location", self.cache_location),
            ("POST", r"/cache/write/start", "write_start", self.write_start),
            ("PUT", r"/sessions/(?P<sid>[^/]+)/blocks/(?P<key>[0-9a-fA-F]+)", "write_block", self.write_block),
            ("POST", r"/cache/write/finish", "write_finish", self.write_finish),
            ("POST", r"/cache/write/abort", "write_abort", self.write_abort),
            ("POST", r"/cache/remove", "cache_remove", self.cache_remove),
            ("POST", r"/cache/trim", "cache_trim", self.cache_trim),
            ("GET", r"/blocks/(?P<ns>[^/]+)/(?P<key>[0-9a-fA-F]+)", "block_get", self.block_get),
            ("POST", r"/api/(?P<method>[A-Za-z]+)", "tair_api", self.tair_api),
        ):
            self.routes.append((method, re.compile(pattern + r"/?\Z"), op, handler))

    # --------------------------------------------------------------------------- plumbing
    def max_body_bytes(self, method: str, path: str) -> int:
        """Block uploads may be as large as a block; everything else is JSON."""
        if method == "PUT" and path.startswith("/sessions/"):
            return max(self.http_max_body_bytes, self.control.store.config.max_block_bytes)
        return self.http_max_body_bytes

    async def __call__(self, req: Request) -> Response:
        t0 = time.perf_counter()
        op = "http_unknown"
        try:
            resp = None
            allowed = []
            for method, pattern, name, handler in self.routes:
                m = pattern.match(req.path)
                if m is None:
                    continue
                if method != req.method:
                    allowed.append(method)
                    continue
                op = f"http_{name}"
                if name != "tair_api":  # (it answers a refusal in its own format)
                    # Before any lookup: an unauthenticated caller learns nothing, not even
                    # whether the instance, session or namespace it names exists.
                    self.authenticate(req)
                resp = await handler(req, **m.groupdict())
                break
            if resp is None:
                if allowed:
                    resp = json_response({"error": {"type": "MethodNotAllowed", "message":
                                          f"{req.method} is not allowed here; use {', '.join(allowed)}"}}, 405)
                    resp.headers.append(("allow", ", ".join(allowed)))
                else:
                    resp = json_response({"error": {"type": "NotFoundError", "message":
                                          f"no endpoint {req.path}; see docs/DAEMON.md"}}, 404)
        except StoreError as exc:
            if isinstance(exc, PermissionDeniedError):
                self.events.auth("http", exc)
            resp = error_response(exc)
        except Exception as exc:  # noqa: BLE001 - answer 500, keep serving
            log.exception("HTTP %s %s failed", req.method, req.path)
            resp = json_response({"error": {"type": "InternalError",
                                            "message": f"internal error: {type(exc).__name__}: {exc}"}}, 500)
        self.metrics.observe_request(op, time.perf_counter() - t0, len(req.body) + len(resp.body),
                                     resp.status < 400)
        return resp

    async def run(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking store call in a worker thread."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self.limiter)

    def authenticate(self, req: Request) -> None:
        """Refuse (401) a request without a known token, when tokens are configured."""
        if self.auth.enabled and self.auth.identify(req.bearer_token()) is None:
            self.auth.check(req.bearer_token(), ALL_NAMESPACES)  # raises Unauthenticated

    def check(self, req: Request, namespace: str, *, admin: bool = False) -> None:
        """Refuse the request unless its token covers ``namespace`` (and is admin if asked)."""
        self.auth.check(req.bearer_token(), namespace, admin=admin)

    async def target(self, body: dict) -> tuple[str, dict | None]:
        """(namespace, instance record or None) named by ``instance_id`` or ``namespace``."""
        if body.get("instance_id") is not None:
            inst = await self.run(self.control.instance, body["instance_id"])
            return inst["instance_group"], inst
        return check_namespace(body.get("namespace", DEFAULT_NAMESPACE)), None

    def keys(self, body: dict, instance: dict | None) -> tuple[list[bytes], int | None]:
        """Keys from ``keys`` (hex) or ``token_ids`` (+ the instance's or given ``block_size``)."""
        if "keys" in body:
            raw = body["keys"]
            if not isinstance(raw, list):
                raise InvalidArgumentError("keys must be a list of hex strings")
            if len(raw) > MAX_KEYS:
                raise InvalidArgumentError(f"at most {MAX_KEYS} keys per request")
            return [hex_key(k) for k in raw], None
        if "token_ids" in body:
            bs = body.get("block_size") or (instance or {}).get("block_size")
            if bs is None:
                raise InvalidArgumentError("token_ids need block_size (tokens per block) or an instance_id")
            return self.control.keys_for_tokens(body["token_ids"], bs), bs
        raise InvalidArgumentError("give keys (hex strings) or token_ids")

    # --------------------------------------------------------------------- observability
    async def health(self, req: Request) -> Response:
        # Any valid token (a probe has no namespace): authenticate() already ran.
        try:
            st = await self.run(self.control.store.stats)
        except ClosedError:
            return json_response({"status": "closing"}, 503)
        return json_response({"status": "ok" if st["writable"] else "read_only",
                              "writable": st["writable"], "version": __version__,
                              "uptime_s": round(time.monotonic() - self.started, 3),
                              "data_url": self.data_url, "http_url": self.http_url})

    async def stats(self, req: Request) -> Response:
        self.check(req, ALL_NAMESPACES)
        st = await self.run(self.control.store.stats)
        st["daemon"] = {"version": __version__, "http_write_sessions": self.control.sessions_open(),
                        "instances": len(self.control.state.items("instances")),
                        "store_quotas": self.control.store_has_quotas}
        return json_response(st)

    async def metrics_text(self, req: Request) -> Response:
        self.check(req, ALL_NAMESPACES)
        text = await self.run(self.metrics.render)
        return Response(200, text, content_type=Metrics.CONTENT_TYPE)

    # ------------------------------------------------------------------------ namespaces
    async def namespaces_list(self, req: Request) -> Response:
        names = self.auth.visible(req.bearer_token(), await self.run(self.control.namespaces))
        infos = [await self.run(self.control.namespace_info, n) for n in names]
        return json_response({"namespaces": infos})

    async def namespaces_create(self, req: Request) -> Response:
        body = parse_json(req.body)
        name = check_namespace(body.get("name"))
        self.check(req, name, admin=True)
        return json_response(await self.run(self.control.create_namespace, name, body.get("quota"),
                                            body.get("strategy")), 201)

    async def namespaces_get(self, req: Request, name: str) -> Response:
        self.check(req, check_namespace(name))
        return json_response(await self.run(self.control.namespace_info, name))

    async def namespaces_update(self, req: Request, name: str) -> Response:
        self.check(req, check_namespace(name), admin=True)
        body = parse_json(req.body)
        if "quota" not in body and "strategy" not in body:
            raise InvalidArgumentError('give the new quota, strategy or both: {"quota": {"total_bytes": ..., '
                                       '"tier_bytes": {...}}, "strategy": "prefer:remote"}')
        return json_response(await self.run(self.control.update_namespace, name, body.get("quota", KEEP),
                                            body.get("strategy", KEEP)))

    # ------------------------------------------------------------------------- instances
    async def instances_list(self, req: Request) -> Response:
        insts = await self.run(self.control.instances)
        visible = set(self.auth.visible(req.bearer_token(), [i["instance_group"] for i in insts]))
        return json_response({"instances": [i for i in insts if i["instance_group"] in visible]})

    async def instances_register(self, req: Request) -> Response:
        body = parse_json(req.body)
        self.check(req, check_namespace(body.get("instance_group")))
        created, rec = await self.run(self.control.register_instance, body)
        return json_response({"created": created, "instance": rec}, 201 if created else 200)

    async def instances_get(self, req: Request, iid: str) -> Response:
        rec = await self.run(self.control.instance, iid)
        self.check(req, rec["instance_group"])
        return json_response(rec)

    # ---------------------------------------------------------------------- cache control
    async def cache_location(self, req: Request) -> Response:
        body = parse_json(req.body)
        ns, inst = await self.target(body)
        self.check(req, ns)
        keys, bs = self.keys(body, inst)
        mode = body.get("mode", "prefix")
        window = body.get("window")
        m = await self.run(self.control.locate, ns, keys, mode, window)
        matched = {"prefix": m.prefix_len, "exact": m.hit_count, "sliding_window": m.window_len}[m.mode]
        out = {"namespace": ns, "mode": m.mode, "matched": matched, "prefix_len": m.prefix_len,
               "window_start": m.window_start,
               "keys": [{"key": k.hex(), "hit": h, "tier": t} for k, h, t in zip(keys, m.hits, m.tiers)]}
        if bs is not None:
            out["block_size"] = bs
            out["matched_tokens"] = matched * bs
        return json_response(out)

    async def write_start(self, req: Request) -> Response:
        body = parse_json(req.body)
        ns, inst = await self.target(body)
        self.check(req, ns)
        keys, _ = self.keys(body, inst)
        if "sizes" in body:
            sizes = body["sizes"]
            if not isinstance(sizes, list):
                raise InvalidArgumentError("sizes must be a list of byte counts, one per key")
        elif "size" in body:
            sizes = [body["size"]] * len(keys)
        elif inst is not None and self.control.block_bytes(inst):
            sizes = [self.control.block_bytes(inst)] * len(keys)
        else:
            raise InvalidArgumentError("give sizes (one per key) or size (the same for every key)")
        lease = body.get("lease_s", 30.0)
        rec = await self.run(self.control.start_write, ns, keys, sizes, lease_s=lease)
        todo = set(rec.keys_to_write)
        return json_response({
            "session_id": rec.id, "namespace": ns, "lease_s": rec.session.lease_s,
            "keys_to_write": [k.hex() for k in rec.keys_to_write],
            "existing": [k.hex() for k in keys if k not in todo],
            "uploads": [{"key": k.hex(), "size": rec.sizes[k], "url": self.upload_url(rec.id, k)}
                        for k in rec.keys_to_write],
        }, 201)

    def upload_url(self, sid: str, key: bytes, spec: str | None = None) -> str:
        """Where a key's payload (or one named part of it) is PUT."""
        url = f"{self.http_url}/sessions/{quote(sid, safe='')}/blocks/{key.hex()}"
        return url + (f"?spec={quote(spec, safe='')}" if spec else "")

    async def write_block(self, req: Request, sid: str, key: str) -> Response:
        rec = await self.run(self.control.session, sid)
        self.check(req, rec.namespace)
        complete = await self.run(self.control.write_block, sid, hex_key(key), req.body,
                                  spec=req.query.get("spec"))
        return json_response({"complete": complete})

    async def write_finish(self, req: Request) -> Response:
        body = parse_json(req.body)
        rec = await self.run(self.control.session, body.get("session_id"))
        self.check(req, rec.namespace)
        ok = body.get("ok_keys")
        if not isinstance(ok, list):
            raise InvalidArgumentError("ok_keys must list the hex keys written successfully ([] aborts all)")
        n = await self.run(self.control.finish_write, rec.id, [hex_key(k) for k in ok])
        return json_response({"committed": n})

    async def write_abort(self, req: Request) -> Response:
        body = parse_json(req.body)
        rec = await self.run(self.control.session, body.get("session_id"))
        self.check(req, rec.namespace)
        await self.run(self.control.abort_write, rec.id)
        return json_response({"aborted": True})

    async def cache_remove(self, req: Request) -> Response:
        body = parse_json(req.body)
        ns, inst = await self.target(body)
        self.check(req, ns)
        keys, _ = self.keys(body, inst)
        return json_response({"removed": await self.run(self.control.remove, ns, keys)})

    async def cache_trim(self, req: Request) -> Response:
        body = parse_json(req.body)
        ns, _ = await self.target(body)
        mode = body.get("mode", "all")
        # Emptying a namespace is an admin's decision; dropping old blocks is routine upkeep.
        self.check(req, ns, admin=(mode == "all"))
        n = await self.run(self.control.trim, ns, mode, body.get("ts"))
        return json_response({"removed": n})

    async def block_get(self, req: Request, ns: str, key: str) -> Response:
        self.check(req, check_namespace(ns))
        data = await self.run(self.control.read_block, ns, hex_key(key))
        if data is None:
            raise NotFoundError(f"no block {key[:16]}… in namespace {ns!r}")
        off = _int_param(req.query, "offset", 0)
        size = _int_param(req.query, "size", len(data) - off)
        if off < 0 or size < 0 or off + size > len(data):
            raise InvalidArgumentError(f"range offset={off} size={size} is outside the {len(data)}-byte block")
        return Response(200, data[off:off + size], content_type="application/octet-stream")

    # ------------------------------------------------------------------ Tair KVCache API
    async def tair_api(self, req: Request, method: str) -> Response:
        return await self.compat.handle(req, method)


def _int_param(query: dict[str, str], name: str, default: int) -> int:
    if name not in query:
        return default
    try:
        return int(query[name])
    except ValueError:
        raise InvalidArgumentError(f"query parameter {name} must be an integer") from None
