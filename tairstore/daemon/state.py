"""The daemon's own small state (registered instances, namespaces), kept in one JSON file.

The file lives in the data directory beside the store (``DIR/daemon.json``). It is replaced
whole on every change: written to ``daemon.json.tmp``, fsynced, renamed over the old file, and
the directory fsynced. A crash therefore leaves either the old or the new file, never a torn one;
a leftover ``.tmp`` is ignored and overwritten. Changes are rare (a registration, a quota
change), so rewriting the whole file is cheaper than any log.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from typing import Any

from tairstore.errors import FormatError

__all__ = ["STATE_FILE", "DaemonState"]

STATE_FILE = "daemon.json"
STATE_VERSION = 1


class DaemonState:
    """A JSON document persisted atomically; thread-safe.

    Args:
        path: the file, or None to keep the state in memory only (tests, volatile daemons).
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._doc: dict[str, Any] = {"version": STATE_VERSION, "instances": {}, "namespaces": {}}
        if path is not None and os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    doc = json.load(f)
            except (ValueError, OSError) as exc:
                raise FormatError(f"{path} is damaged ({exc}); fix or remove it (it only holds "
                                  "instance registrations and namespace records)") from None
            if not isinstance(doc, dict) or doc.get("version", 0) > STATE_VERSION:
                raise FormatError(f"{path} was written by a newer tairstore; upgrade tairstore")
            for key in ("instances", "namespaces"):
                doc.setdefault(key, {})
            self._doc = doc

    def get(self, table: str, name: str) -> dict | None:
        """A copy of one record, or None."""
        with self._lock:
            rec = self._doc[table].get(name)
            return copy.deepcopy(rec) if rec is not None else None

    def items(self, table: str) -> dict[str, dict]:
        """A copy of a whole table."""
        with self._lock:
            return copy.deepcopy(self._doc[table])

    def put(self, table: str, name: str, record: dict) -> None:
        """Set one record and persist the document before returning."""
        with self._lock:
            old = self._doc[table].get(name)
            self._doc[table][name] = copy.deepcopy(record)
            try:
                self._save()
            except BaseException:
                # Keep memory and disk in agreement: the change did not happen.
                if old is None:
                    del self._doc[table][name]
                else:
                    self._doc[table][name] = old
                raise

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path + ".tmp"
        data = json.dumps(self._doc, indent=1, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
