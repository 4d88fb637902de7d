"""Tair KVCache's storage model: the manager records locations, the engine writes the bytes.

In Tair KVCache the inference engine's SDK writes a block's bytes straight to a storage backend
(a shared ``file://`` / NFS directory, a 3FS mount, Mooncake) and the manager only hands out the
locations and records which of them hold finished blocks. :class:`TairStorage` is that
bookkeeping for tairstore's ``/api/*`` endpoints:

- *storages* (``file`` = a shared directory, ``hf3fs`` = a 3FS mount, which here is any
  directory; ``mooncake`` is listed but reports ``is_available: false`` because tairstore has no
  Mooncake tier wired into the daemon);
- *instance groups* (the storages they write to, a byte quota, a version for optimistic updates),
  which must exist before an instance registers into them;
- *instances*, and per instance (keys are scoped per instance, as the manager scopes them) the
  *blocks*: one file per block under the storage's directory, the location specs laid out in
  registration order, and which specs were reported written.

A block is counted in its group's quota from ``startWriteCache`` on; when a write would exceed the
quota the least recently used blocks of the group are evicted (their files deleted). The tables are
kept in one JSON file under the daemon's data directory, rewritten atomically on every change.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from tairstore.errors import CapacityError, InvalidArgumentError, NotFoundError, StoreError
from tairstore.daemon.control import ConflictError

__all__ = ["TairStorage", "StorageSpec", "GroupMissing", "InstanceMissing", "SessionMissing", "STORAGE_TYPES",
           "DEFAULT_GROUP", "DEFAULT_STORAGE", "TABLE_FILE"]

TABLE_FILE = "tair-meta.json"
DEFAULT_GROUP = "default"
DEFAULT_STORAGE = "local_file"
#: storage config ``type`` → the manager's ``StorageType`` enum name and the URI scheme.
STORAGE_TYPES = {"file": ("ST_NFS", "file"), "hf3fs": ("ST_3FS", "3fs"),
                 "mooncake": ("ST_MOONCAKE", "mooncake")}


_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class GroupMissing(NotFoundError):
    """An instance group that was never created (the manager answers ``INSTANCE_NOT_EXIST``)."""


class InstanceMissing(NotFoundError):
    """An instance that never registered (``INSTANCE_NOT_EXIST``)."""


class SessionMissing(StoreError):
    """An unknown (expired, finished or never started) write session; the manager answers
    ``INTERNAL_ERROR`` (its ``EC_ERROR``), so this is no ``InvalidArgumentError``."""


@dataclass
class StorageSpec:
    """One storage as the manager describes it (``global_unique_name``, ``type``, ``storage_spec``)."""

    name: str
    type: str
    spec: dict
    enabled: bool = True

    def directory(self) -> str | None:
        """The directory blocks live in (None for a storage tairstore cannot write)."""
        if self.type == "file":
            return self.spec.get("root_path") or None
        if self.type == "hf3fs":
            return os.path.join(self.spec.get("mountpoint", ""), self.spec.get("root_dir", "").lstrip("/"))
        return None

    def available(self) -> bool:
        """Whether the manager would report ``is_available: true``."""
        d = self.directory()
        return self.enabled and d is not None

    def config(self) -> dict:
        """The JSON the engine SDK parses out of ``storage_configs``."""
        return {"type": self.type, "is_available": self.available(), "global_unique_name": self.name,
                "storage_spec": dict(self.spec)}

    def uri(self, rel: str, offset: int, size: int) -> str:
        """A location spec's URI in Tair's form for ``rel`` (path below the storage's root).

        The host is the storage's ``global_unique_name``: Tair's SDK picks the backend it writes
        with by that name. A ``file`` path is absolute; a ``3fs`` path is below the mountpoint."""
        scheme = STORAGE_TYPES[self.type][1]
        if self.type == "file":
            path = os.path.join(os.path.abspath(self.spec["root_path"]), rel)
        elif self.type == "hf3fs":
            path = "/" + os.path.join(self.spec.get("root_dir", "").strip("/"), rel).lstrip("/")
        else:
            path = "/" + rel
        return f"{scheme}://{self.name}{path}?offset={offset}&size={size}"


def parse_storage(obj: Any) -> StorageSpec:
    """A storage from the admin API or the ``[tair]`` config (``global_unique_name``/``name``)."""
    if not isinstance(obj, dict):
        raise InvalidArgumentError("storage must be an object")
    name = obj.get("global_unique_name") or obj.get("name") or ""
    typ = obj.get("type", "")
    spec = obj.get("storage_spec") or {k: v for k, v in obj.items()
                                       if k not in ("global_unique_name", "name", "type", "is_available")}
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgumentError(f"storage: global_unique_name must be letters, digits, '_', '-' or '.' "
                                   f"(it is the host of its location URIs), got {name!r}")
    if typ not in STORAGE_TYPES:
        raise InvalidArgumentError(f"storage {name}: type must be one of {', '.join(STORAGE_TYPES)}, got {typ!r}")
    if typ == "file" and not spec.get("root_path"):
        raise InvalidArgumentError(f"storage {name}: a file storage needs storage_spec.root_path")
    if typ == "hf3fs" and not spec.get("mountpoint"):
        raise InvalidArgumentError(f"storage {name}: an hf3fs storage needs storage_spec.mountpoint")
    return StorageSpec(name, typ, dict(spec))


class TairStorage:
    """The manager's tables (storages, groups, instances, blocks, write sessions); thread-safe."""

    def __init__(self, path: str, default_root: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.storages: dict[str, StorageSpec] = {}
        self.groups: dict[str, dict] = {}
        self.instances: dict[str, dict] = {}
        self.blocks: dict[str, dict[str, dict]] = {}
        self.sessions: dict[str, dict] = {}
        if os.path.exists(path):
            with open(path) as f:
                doc = json.load(f)
            self.storages = {n: StorageSpec(**s) for n, s in doc.get("storages", {}).items()}
            self.groups, self.instances = doc.get("groups", {}), doc.get("instances", {})
            self.blocks = doc.get("blocks", {})
        else:
            # The manager starts with a default group on a default storage; so does tairstore.
            self.storages[DEFAULT_STORAGE] = StorageSpec(DEFAULT_STORAGE, "file", {"root_path": default_root})
            self.groups[DEFAULT_GROUP] = _group(DEFAULT_GROUP, [DEFAULT_STORAGE], 0)
            self._save()

    # ------------------------------------------------------------------ persistence
    def _save(self) -> None:
        doc = {"storages": {n: vars(s) for n, s in self.storages.items()}, "groups": self.groups,
               "instances": self.instances, "blocks": self.blocks}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # ------------------------------------------------------------------ storages and groups
    def add_storage(self, obj: Any) -> StorageSpec:
        """Add a storage; the same name again with another spec is ``DUPLICATE_ENTITY``."""
        s = parse_storage(obj)
        with self.lock:
            old = self.storages.get(s.name)
            if old is not None and (old.type, old.spec) != (s.type, s.spec):
                raise ConflictError(f"storage {s.name} exists with another spec")
            self.storages.setdefault(s.name, s)
            self._save()
            return self.storages[s.name]

    def set_storage_enabled(self, name: str, enabled: bool) -> None:
        """enableStorage / disableStorage."""
        with self.lock:
            self._storage(name).enabled = enabled
            self._save()

    def remove_storage(self, name: str) -> None:
        """removeStorage; refused while a group writes to it."""
        with self.lock:
            self._storage(name)
            users = [g for g, rec in self.groups.items() if name in rec["storage_candidates"]]
            if users:
                raise InvalidArgumentError(f"storage {name} is used by instance group(s) {', '.join(users)}")
            del self.storages[name]
            self._save()

    def _storage(self, name: str) -> StorageSpec:
        s = self.storages.get(name)
        if s is None:
            raise NotFoundError(f"storage {name} does not exist")
        return s

    def put_group(self, name: str, storages: list[str], quota_bytes: int, *,
                  version: int | None = None, create: bool) -> dict:
        """createInstanceGroup (``create``) or updateInstanceGroup (``version`` must match)."""
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError("instance group: missing name")
        with self.lock:
            for s in storages:
                self._storage(s)
            old = self.groups.get(name)
            if create and old is not None:
                raise ConflictError(f"instance group {name} already exists")
            if not create:
                if old is None:
                    raise GroupMissing(f"instance group {name} does not exist")
                if version is not None and version != old["version"]:
                    raise InvalidArgumentError(f"instance group {name}: version {version} is stale "
                                               f"(current {old['version']})")
            rec = _group(name, storages, quota_bytes, (old["version"] + 1) if old else 1)
            self.groups[name] = rec
            self._save()
            return dict(rec)

    def group(self, name: str) -> dict:
        """An instance group's record; :class:`GroupMissing` if absent."""
        with self.lock:
            rec = self.groups.get(name)
            if rec is None:
                raise GroupMissing(f"instance group {name} does not exist")
            return dict(rec, used_bytes=self._used(name))

    def remove_group(self, name: str) -> None:
        """removeInstanceGroup; refused while instances are registered in it."""
        with self.lock:
            self.group(name)
            users = [i for i, r in self.instances.items() if r["instance_group"] == name]
            if users:
                raise InvalidArgumentError(f"instance group {name} has instances: {', '.join(users)}")
            del self.groups[name]
            self._save()

    def storage_configs(self, group: str) -> list[dict]:
        """``storage_configs`` for an instance of ``group``: its storages, ``is_available`` each."""
        with self.lock:
            return [self.storages[s].config() for s in self.group(group)["storage_candidates"]
                    if s in self.storages]

    # ------------------------------------------------------------------ instances
    def register(self, rec: dict) -> bool:
        """registerInstance: the group must exist; the same id again must carry the same fields.
        Returns whether the instance is new."""
        with self.lock:
            self.group(rec["instance_group"])
            old = self.instances.get(rec["instance_id"])
            if old is not None:
                diff = [k for k in ("instance_group", "block_size", "model_deployment", "location_spec_infos")
                        if old.get(k) != rec.get(k)]
                if diff:
                    raise ConflictError(f"instance {rec['instance_id']} is registered with another "
                                        f"{', '.join(diff)}")
                return False
            self.instances[rec["instance_id"]] = rec
            self.blocks.setdefault(rec["instance_id"], {})
            self._save()
            return True

    def instance(self, iid: str) -> dict:
        """An instance's record; :class:`InstanceMissing` if absent."""
        with self.lock:
            rec = self.instances.get(iid)
            if rec is None:
                raise InstanceMissing(f"instance {iid} does not exist")
            return rec

    def remove_instance(self, iid: str) -> int:
        """removeInstance: forget the instance and delete its blocks' bytes; returns blocks removed."""
        with self.lock:
            self.instance(iid)
            n = self._drop(iid, list(self.blocks.get(iid, {})))
            del self.instances[iid]
            self.blocks.pop(iid, None)
            self._save()
            return n

    # ------------------------------------------------------------------ blocks
    def _writable(self, group: str) -> StorageSpec:
        for name in self.groups[group]["storage_candidates"]:
            s = self.storages.get(name)
            if s is not None and s.available():
                return s
        raise InvalidArgumentError(f"instance group {group} has no available storage tairstore can write "
                                   f"(file or hf3fs)")

    def _used(self, group: str) -> int:
        return sum(b["size"] for iid, r in self.instances.items() if r["instance_group"] == group
                   for b in self.blocks.get(iid, {}).values())

    def lookup(self, iid: str, keys: list[str]) -> list[dict | None]:
        """The serving block of each key (None: a miss); a hit refreshes its LRU time."""
        with self.lock:
            table = self.blocks.get(iid, {})
            now = time.time()
            out = []
            for k in keys:
                b = table.get(k)
                if b is not None and b["specs"]:
                    b["atime"] = now
                    out.append(b)
                else:
                    out.append(None)
            return out

    def peek(self, iid: str, keys: list[str]) -> list[dict | None]:
        """The block records of ``keys``, serving or being written (None: absent); no LRU touch."""
        with self.lock:
            table = self.blocks.get(iid, {})
            return [dict(table[k]) if k in table else None for k in keys]

    def session_len(self, iid: str, sid: str) -> int:
        """How many locations write session ``sid`` handed out."""
        with self.lock:
            sess = self.sessions.get(sid)
            if sess is None or sess["instance_id"] != iid:
                raise SessionMissing(f"finish write cache failed: write_session_id not found: {sid}")
            return len(sess["keys"])

    def start_write(self, iid: str, keys: list[str], spec_names: list[list[str]], lease_s: float) -> dict:
        """Reserve a file per key not already serving its specs; returns the session record."""
        with self.lock:
            inst = self.instance(iid)
            self._expire()
            group = inst["instance_group"]
            storage = self._writable(group)
            size = sum(s["size"] for s in inst["location_spec_infos"])
            table = self.blocks.setdefault(iid, {})
            todo: dict[str, list[str]] = {}
            for k, names in zip(keys, spec_names):
                have = set((table.get(k) or {}).get("specs") or [])
                if k not in todo and not set(names) <= have:
                    todo[k] = names
            new = [k for k in todo if k not in table]
            self._make_room(group, size * len(new))
            root = storage.directory()
            assert root is not None
            for k in new:
                rel = os.path.join(group, iid, k)
                path = os.path.join(root, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "ab") as f:
                    f.truncate(size)  # sparse: the range exists for the SDK's positioned writes
                table[k] = {"storage": storage.name, "rel": rel, "size": size, "specs": [],
                            "atime": time.time(), "mtime": time.time()}
            sid = uuid.uuid4().hex
            self.sessions[sid] = {"instance_id": iid, "keys": list(todo), "specs": todo,
                                  "deadline": time.monotonic() + lease_s, "new": new}
            self._save()
            return {"id": sid, "todo": todo}

    def finish_write(self, iid: str, sid: str, ok: list[bool]) -> None:
        """Record the successful blocks as serving; drop the failed new ones (files deleted)."""
        with self.lock:
            sess = self.sessions.get(sid)
            if sess is None or sess["instance_id"] != iid:
                raise SessionMissing(f"finish write cache failed: write_session_id not found: {sid}")
            if len(ok) != len(sess["keys"]):
                raise InvalidArgumentError(f"success_blocks has {len(ok)} values for {len(sess['keys'])} blocks")
            table = self.blocks.setdefault(iid, {})
            failed = []
            for k, good in zip(sess["keys"], ok):
                b = table.get(k)
                if b is None:
                    continue  # evicted or removed meanwhile
                if good:
                    path = self.path_of(b)
                    if path is None or not os.path.exists(path) or os.path.getsize(path) < b["size"]:
                        raise InvalidArgumentError(f"block {k}: its file {path} is missing or short")
                    b["specs"] = sorted(set(b["specs"]) | set(sess["specs"][k]))
                    b["mtime"] = time.time()
                elif not b["specs"]:
                    failed.append(k)
            self._drop(iid, failed)
            del self.sessions[sid]
            self._save()

    def path_of(self, b: dict) -> str | None:
        """The local file of a block (None if its storage is gone or not a directory)."""
        s = self.storages.get(b["storage"])
        d = s.directory() if s else None
        return os.path.join(d, b["rel"]) if d else None

    def uri(self, b: dict, offset: int, size: int) -> str:
        """A location spec URI of block ``b``."""
        return self._storage(b["storage"]).uri(b["rel"], offset, size)

    def remove(self, iid: str, keys: list[str]) -> int:
        """removeCache: delete these blocks (bytes too); returns how many existed."""
        with self.lock:
            n = self._drop(iid, keys)
            self._save()
            return n

    def trim(self, iid: str) -> int:
        """trimCache ``TS_REMOVE_ALL_CACHE``: every block of the instance, bytes too."""
        with self.lock:
            return self.remove(iid, list(self.blocks.get(iid, {})))

    def _drop(self, iid: str, keys: list[str]) -> int:
        table = self.blocks.get(iid, {})
        n = 0
        for k in keys:
            b = table.pop(k, None)
            if b is None:
                continue
            n += 1
            path = self.path_of(b)
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        return n

    def _make_room(self, group: str, need: int) -> None:
        quota = self.groups[group]["quota_bytes"]
        if not quota:
            return
        if need > quota:
            raise CapacityError(f"instance group {group}: {need} bytes exceed its quota of {quota}")
        over = self._used(group) + need - quota
        if over <= 0:
            return
        # Evict serving blocks of the group, least recently used first.
        pending = {k for s in self.sessions.values() for k in s["keys"]}
        cands = sorted(((b["atime"], iid, k, b["size"]) for iid, r in self.instances.items()
                        if r["instance_group"] == group for k, b in self.blocks.get(iid, {}).items()
                        if k not in pending), key=lambda t: t[0])
        for _, iid, k, size in cands:
            if over <= 0:
                break
            self._drop(iid, [k])
            over -= size
        if over > 0:
            raise CapacityError(f"instance group {group}: quota of {quota} bytes is held by writes in progress")

    def _expire(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if s["deadline"] < now:
                table = self.blocks.get(s["instance_id"], {})
                self._drop(s["instance_id"], [k for k in s["new"] if not (table.get(k) or {}).get("specs")])
                del self.sessions[sid]


def _group(name: str, storages: list[str], quota_bytes: int, version: int = 1) -> dict:
    return {"name": name, "storage_candidates": list(storages), "quota_bytes": int(quota_bytes),
            "version": version}
