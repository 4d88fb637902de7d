"""The Store API as protocol requests: shared by the blocking and the trio client.

Each builder checks its arguments the way :class:`tairstore.Store` does for everything the
wire cannot carry (a str key, a float size, a non-buffer block), raising the same exception
classes; every check on values (key lengths, block sizes, quotas, modes) is left to the
daemon's store, whose error comes back with its own class and message. A builder returns a
:class:`Call`: the request's opcode, header and payload, whether a retry on a fresh connection
is safe, and how to turn the OK response into the method's return value.
"""

from __future__ import annotations

from typing import Any, Callable

from tairstore.config import DEFAULT_NAMESPACE
from tairstore.errors import InvalidArgumentError, ProtocolError, SessionError
from tairstore.engine.match import MatchResult
from tairstore.net.limits import DEFAULT_LIMITS, Limits
from tairstore.net.protocol import Response
from tairstore.net.schema import Code, Op, match_from_fields
from tairstore.validate import (
    check_block_size,
    check_data,
    check_key,
    check_keys,
    check_lease,
    check_namespace,
    check_out,
)

__all__ = ["Call", "RemoteWriteSession", "DEFAULT_NAMESPACE", "batches"]


class Call:
    """One request to send and how to read its answer."""

    __slots__ = ("op", "fields", "blocks", "sink", "idempotent", "parse", "session")

    def __init__(self, op: Op, fields: dict, parse: Callable[[Response], Any], *,
                 blocks: list | None = None, sink: memoryview | None = None,
                 idempotent: bool = False, session: "RemoteWriteSession | None" = None) -> None:
        self.op = op
        self.fields = fields
        self.parse = parse
        self.blocks = blocks or []
        self.sink = sink
        self.idempotent = idempotent
        self.session = session


class RemoteWriteSession:
    """A write session opened on the daemon by ``start_write``.

    It belongs to the connection that opened it (the daemon aborts it if that connection
    closes), so ``write``/``finish_write``/``abort_write`` go over that same connection.

    Attributes:
        id: the daemon's session id.
        namespace: the namespace of its keys.
        keys_to_write: the keys that were not stored or in flight yet: only these are written.
        lease_s: the lease the daemon granted.
    """

    def __init__(self, owner: Any, conn: Any, sid: int, namespace: str, keys_to_write: list[bytes],
                 lease_s: float) -> None:
        self.id = sid
        self.namespace = namespace
        self.keys_to_write = keys_to_write
        self.lease_s = lease_s
        self._owner = owner
        self._conn = conn

    def __repr__(self) -> str:
        return f"<RemoteWriteSession {self.id} ns={self.namespace!r} keys={len(self.keys_to_write)}>"


# ---------------------------------------------------------------------------- argument checks
# The same checks as the embedded Store (tairstore.validate), so both refuse the same inputs
# with the same errors; the daemon checks again on its side.
check_ns = check_namespace


def check_session(owner: Any, session: Any) -> RemoteWriteSession:
    """The session must come from this client's ``start_write``."""
    if not isinstance(session, RemoteWriteSession):
        raise SessionError(f"expected a WriteSession from start_write, got {type(session).__name__}")
    if session._owner is not owner:
        raise SessionError("not a write session from this store")
    return session


def _sized(resp: Response, field: str, n: int) -> list:
    values = resp.fields[field]
    if len(values) != n:
        raise ProtocolError(f"the daemon answered {len(values)} {field} for {n} keys",
                            remote=True, code=int(Code.BAD_HEADER))
    return values


# ----------------------------------------------------------------------------------- builders
def ping() -> Call:
    return Call(Op.PING, {}, lambda r: None, idempotent=True)


def auth(token: str) -> Call:
    return Call(Op.AUTH, {"token": token}, lambda r: None, idempotent=True)


def batches(sizes: list[int], limits: Limits = DEFAULT_LIMITS) -> list[slice]:
    """Split a batch into requests the server accepts: at most ``max_batch`` keys and at most
    one largest block's worth of payload each (a single larger block goes alone, and the
    server answers it with its own error)."""
    out: list[slice] = []
    start, nbytes = 0, 0
    cap = limits.max_frame_bytes - limits.max_header_bytes
    for i, size in enumerate(sizes):
        if i > start and (i - start >= limits.max_batch or nbytes + size > cap):
            out.append(slice(start, i))
            start, nbytes = i, 0
        nbytes += size
    if start < len(sizes) or not sizes:
        out.append(slice(start, len(sizes)))
    return out


def put_many(keys: Any, blocks: Any, namespace: Any) -> Call:
    ks = check_keys(keys)
    views = [check_data(b) for b in blocks]
    if len(views) != len(ks):
        raise InvalidArgumentError(f"{len(ks)} keys but {len(views)} blocks")
    fields = {"ns": check_ns(namespace), "keys": ks, "sizes": [v.nbytes for v in views]}
    return Call(Op.PUT, fields, lambda r: _sized(r, "stored", len(ks)), blocks=views)


def put(key: Any, data: Any, namespace: Any) -> Call:
    view = check_data(data)
    fields = {"ns": check_ns(namespace), "keys": [check_key(key)], "sizes": [view.nbytes]}
    return Call(Op.PUT, fields, lambda r: _sized(r, "stored", 1)[0], blocks=[view])


def _readonly(block: memoryview | None) -> memoryview | None:
    return None if block is None else block.toreadonly()


def get_many(keys: Any, namespace: Any) -> Call:
    ks = check_keys(keys)

    def parse(r: Response) -> list:
        _sized(r, "sizes", len(ks))
        return [_readonly(b) for b in r.blocks]

    return Call(Op.GET, {"ns": check_ns(namespace), "keys": ks}, parse, idempotent=True)


def get(key: Any, namespace: Any) -> Call:
    fields = {"ns": check_ns(namespace), "keys": [check_key(key)]}

    def parse(r: Response) -> memoryview | None:
        _sized(r, "sizes", 1)
        return _readonly(r.blocks[0])

    return Call(Op.GET, fields, parse, idempotent=True)


def get_into(key: Any, out: Any, namespace: Any) -> Call:
    k, ns, dst = check_key(key), check_ns(namespace), check_out(out)

    def parse(r: Response) -> int:
        _sized(r, "sizes", 1)
        block = r.blocks[0]
        if block is None:
            return 0
        if block.obj is not dst.obj:
            dst[:block.nbytes] = block  # the codec could not use the sink (it never fails to)
        return block.nbytes

    return Call(Op.GET, {"ns": ns, "keys": [k], "cap": dst.nbytes}, parse, sink=dst, idempotent=True)


def exists(keys: Any, namespace: Any) -> Call:
    ks = check_keys(keys)
    return Call(Op.EXISTS, {"ns": check_ns(namespace), "keys": ks},
                lambda r: _sized(r, "hits", len(ks)), idempotent=True)


def match(keys: Any, mode: Any, window: Any, namespace: Any) -> Call:
    ks = check_keys(keys)
    if not isinstance(mode, str):
        raise InvalidArgumentError(f"unknown match mode {mode!r}; use one of prefix, exact, sliding_window")
    if window is not None and not isinstance(window, int):
        if mode == "sliding_window":
            raise InvalidArgumentError("sliding_window matching needs window >= 1 (number of keys)")
        window = None  # the Store ignores the window of other modes
    fields = {"ns": check_ns(namespace), "keys": ks, "mode": mode,
              "window": None if window is None else int(window)}

    def parse(r: Response) -> MatchResult:
        result = match_from_fields(r.fields)
        if len(result.hits) != len(ks):
            raise ProtocolError("the daemon's match answer does not cover every key", remote=True,
                                code=int(Code.BAD_HEADER))
        return result

    return Call(Op.MATCH, fields, parse, idempotent=True)


def delete(keys: Any, namespace: Any) -> Call:
    return Call(Op.DELETE, {"ns": check_ns(namespace), "keys": check_keys(keys)},
                lambda r: r.fields["count"])


def start_write(owner: Any, keys: Any, sizes: Any, lease_s: Any, namespace: Any) -> Call:
    ns, ks = check_ns(namespace), check_keys(keys)
    # The Store's own checks (its max_block_bytes is the daemon's to apply), so both refuse the
    # same sizes and leases with the same errors.
    sizes = [check_block_size(s) for s in sizes]
    lease_s = check_lease(lease_s)
    # Clamped into what msgpack encodes; the store refuses it with its own CapacityError.
    sizes = [min(s, 1 << 62) for s in sizes]
    fields = {"ns": ns, "keys": ks, "sizes": sizes, "lease": lease_s}

    def parse(r: Response) -> RemoteWriteSession:
        f = r.fields
        return RemoteWriteSession(owner, None, f["sid"], ns, f["keys"], f["lease"])

    return Call(Op.START_WRITE, fields, parse)


def write(owner: Any, session: Any, key: Any, data: Any) -> Call:
    s, k, view = check_session(owner, session), check_key(key), check_data(data)
    return Call(Op.WRITE, {"sid": s.id, "keys": [k], "sizes": [view.nbytes]}, lambda r: None,
                blocks=[view], session=s)


def finish_write(owner: Any, session: Any, ok_keys: Any) -> Call:
    s = check_session(owner, session)
    return Call(Op.FINISH_WRITE, {"sid": s.id, "keys": check_keys(ok_keys)},
                lambda r: r.fields["count"], session=s)


def abort_write(owner: Any, session: Any) -> Call:
    s = check_session(owner, session)
    return Call(Op.ABORT_WRITE, {"sid": s.id}, lambda r: None, session=s)


def stats() -> Call:
    return Call(Op.STATS, {}, lambda r: r.fields["stats"], idempotent=True)
