"""Prometheus metrics of a daemon: request counters kept here, store gauges read at scrape time.

Each :class:`Metrics` owns its own ``CollectorRegistry`` (never the process-global one), so a
test can build as many daemons as it likes and two daemons in one process never mix numbers.

Two kinds of series:

- **requests**, counted as they happen by whoever serves them (the data server and the HTTP API
  both call :meth:`Metrics.observe_request`): ``tairstore_requests_total{op,outcome}``,
  ``tairstore_request_bytes_total{op}``, ``tairstore_request_duration_seconds{op}``;
- **store state**, read from ``store.stats()`` each time ``/metrics`` is scraped, so they can
  never drift from what the store says: capacity and usage per tier and namespace, hits and
  misses per tier, checksum errors, evictions, and (when the store reports them) quotas,
  watermark state and compaction progress.

The full list of names is in ``docs/DAEMON.md``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

__all__ = ["Metrics", "PREFIX"]

log = logging.getLogger(__name__)

PREFIX = "tairstore"
# Latency buckets from 50 µs (a DRAM hit over loopback) to 10 s (a large SSD batch under load).
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0)

# store.stats()["counters"] name -> (metric name without _total, help, labels)
_COUNTERS: dict[str, tuple[str, str, dict[str, str]]] = {
    "hits_dram": ("hits", "Reads answered from a tier.", {"tier": "dram"}),
    "hits_ssd": ("hits", "Reads answered from a tier.", {"tier": "ssd"}),
    "misses": ("misses", "Reads that found no block (including dropped corrupt blocks).", {}),
    "checksum_errors": ("checksum_errors", "Blocks whose checksum failed on read and were dropped.", {}),
    "read_errors": ("read_errors", "Reads that failed with an I/O error (counted as misses).", {}),
    "evictions_dram": ("evictions", "Blocks evicted from a tier.", {"tier": "dram"}),
    "evictions_ssd": ("evictions", "Blocks evicted from a tier.", {"tier": "ssd"}),
    "segments_evicted": ("segments_evicted", "SSD segments evicted whole.", {}),
    "puts": ("blocks_written", "Blocks committed.", {}),
    "bytes_written": ("bytes_written", "Payload bytes committed.", {}),
    "deletes": ("blocks_deleted", "Blocks deleted.", {}),
    "promotions": ("promotions", "Blocks copied from SSD into DRAM on read.", {}),
    "leases_expired": ("leases_expired", "Write sessions aborted because their lease ran out.", {}),
    "watermark_evictions": ("watermark_evictions", "Blocks evicted by the high-watermark task.", {}),
    "trimmed": ("blocks_trimmed", "Blocks deleted by namespace trims.", {}),
    "expired": ("blocks_expired", "Blocks dropped because their namespace TTL ran out.", {}),
    "writeback_deferred": ("writeback_deferred", "Writes acknowledged from DRAM (write_back), their "
                           "SSD write to follow.", {}),
    "writeback_flushed": ("writeback_flushed", "Write-back blocks written to SSD and committed.", {}),
    "writeback_failed": ("writeback_failed", "Write-back blocks whose SSD write failed (kept in DRAM "
                         "only).", {}),
}


class _StoreCollector:
    """Turns one ``store.stats()`` snapshot into metric families at scrape time."""

    def __init__(self, stats: Callable[[], dict | None], quota: Callable[[str], dict | None]) -> None:
        self._stats = stats
        self._quota = quota

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_store_up", "1 when the store answered stats(), else 0.")
        try:
            st = self._stats()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the store did
            log.warning("metrics: store.stats() failed: %s", exc)
            st = None
        up.add_metric([], 1 if st else 0)
        yield up
        if not st:
            return
        yield from self._tiers(st)
        yield from self._namespaces(st)
        yield from self._counters(st)
        yield from self._remote(st)
        yield from self._optional(st)

    def _tiers(self, st: dict) -> Iterable[Metric]:
        cap = GaugeMetricFamily(f"{PREFIX}_tier_capacity_bytes", "Configured capacity of a tier.", labels=["tier"])
        used = GaugeMetricFamily(f"{PREFIX}_tier_used_bytes",
                                 "Bytes of committed blocks held in a tier.", labels=["tier"])
        blocks = GaugeMetricFamily(f"{PREFIX}_tier_blocks", "Blocks held in a tier.", labels=["tier"])
        alloc = GaugeMetricFamily(f"{PREFIX}_tier_allocated_bytes",
                                  "Bytes a tier has allocated (DRAM arena slots incl. reservations; "
                                  "SSD segment files).", labels=["tier"])
        for tier, t in sorted(st.get("tiers", {}).items()):
            if "capacity" in t:
                cap.add_metric([tier], t["capacity"])
            if "bytes" in t:
                used.add_metric([tier], t["bytes"])
            if "blocks" in t:
                blocks.add_metric([tier], t["blocks"])
            a = t.get("used_bytes", t.get("file_bytes"))
            if a is not None:
                alloc.add_metric([tier], a)
        yield from (cap, used, blocks, alloc)
        usage = GaugeMetricFamily(f"{PREFIX}_tier_usage_ratio",
                                  "Fraction of a tier's capacity in use, as the watermarks see it.",
                                  labels=["tier"])
        state = GaugeMetricFamily(f"{PREFIX}_watermark_state",
                                  "1 for the watermark level a tier is at (ok, warn, high), else 0.",
                                  labels=["tier", "level"])
        for tier, t in sorted(st.get("tiers", {}).items()):
            if isinstance(t.get("usage"), (int, float)):
                usage.add_metric([tier], t["usage"])
            if isinstance(t.get("watermark"), str):
                for level in ("ok", "warn", "high"):
                    state.add_metric([tier, level], 1 if t["watermark"] == level else 0)
        yield from (usage, state)
        total = GaugeMetricFamily(f"{PREFIX}_blocks", "Committed blocks in the store.")
        total.add_metric([], st.get("blocks", 0))
        yield total
        sessions = GaugeMetricFamily(f"{PREFIX}_write_sessions_open", "Write sessions holding reservations.")
        sessions.add_metric([], st.get("sessions_open", 0))
        yield sessions
        parts = (st.get("tiers", {}).get("dram") or {}).get("partitions")
        if isinstance(parts, dict):
            pcap = GaugeMetricFamily(f"{PREFIX}_dram_partition_capacity_bytes",
                                     "Size of a DRAM partition (dram_partitions; \"default\": the rest).",
                                     labels=["partition"])
            pused = GaugeMetricFamily(f"{PREFIX}_dram_partition_used_bytes",
                                      "Bytes a DRAM partition has allocated (slots incl. reservations).",
                                      labels=["partition"])
            for name, p in sorted(parts.items()):
                pcap.add_metric([name], p.get("capacity", 0))
                pused.add_metric([name], p.get("used_bytes", 0))
            yield from (pcap, pused)
        dirty = (st.get("tiers", {}).get("dram") or {}).get("dirty_bytes")
        if isinstance(dirty, int):
            g = GaugeMetricFamily(f"{PREFIX}_writeback_dirty_bytes",
                                  "Bytes acknowledged from DRAM and not yet written to SSD (write_back).")
            g.add_metric([], dirty)
            yield g
        writable = GaugeMetricFamily(f"{PREFIX}_store_writable",
                                     "0 once the store refuses writes after an I/O failure.")
        writable.add_metric([], 1 if st.get("writable", True) else 0)
        yield writable

    def _namespaces(self, st: dict) -> Iterable[Metric]:
        used = GaugeMetricFamily(f"{PREFIX}_namespace_used_bytes",
                                 "Bytes of committed blocks in a namespace (per tier when the store says).",
                                 labels=["namespace", "tier"])
        blocks = GaugeMetricFamily(f"{PREFIX}_namespace_blocks", "Committed blocks in a namespace.",
                                   labels=["namespace"])
        limit = GaugeMetricFamily(f"{PREFIX}_namespace_quota_bytes",
                                  "Quota of a namespace; tier=\"total\" for the whole namespace.",
                                  labels=["namespace", "tier"])
        for ns, d in sorted(st.get("namespaces", {}).items()):
            used.add_metric([ns, "total"], d.get("bytes", 0))
            blocks.add_metric([ns], d.get("blocks", 0))
            for tier, v in sorted((d.get("tiers") or {}).items()):
                b = v.get("bytes", v.get("used")) if isinstance(v, dict) else v
                if b is not None:
                    used.add_metric([ns, tier], b)
            q = d.get("quota")
            if q is None:
                try:
                    q = self._quota(ns)
                except Exception:  # noqa: BLE001 - quotas are optional in the store
                    q = None
            if q:
                if q.get("total_bytes") is not None:
                    limit.add_metric([ns, "total"], q["total_bytes"])
                for tier, tq in sorted((q.get("tiers") or {}).items()):
                    if isinstance(tq, dict) and tq.get("limit") is not None:
                        limit.add_metric([ns, tier], tq["limit"])
        yield from (used, blocks, limit)

    def _counters(self, st: dict) -> Iterable[Metric]:
        families: dict[str, CounterMetricFamily] = {}
        counters = st.get("counters", {})
        for src, (name, help_, labels) in _COUNTERS.items():
            if src not in counters:
                continue
            fam = families.get(name)
            if fam is None:
                fam = families[name] = CounterMetricFamily(f"{PREFIX}_{name}", help_, labels=list(labels))
            fam.add_metric(list(labels.values()), counters[src])
        yield from families.values()

    def _remote(self, st: dict) -> Iterable[Metric]:
        """The remote tier (Mooncake / 3FS), when the store has one: health, usage, traffic."""
        r = (st.get("tiers") or {}).get("remote")
        if not isinstance(r, dict):
            return
        kind = str(r.get("kind", ""))
        healthy = GaugeMetricFamily(f"{PREFIX}_remote_healthy",
                                    "1 while the remote tier is in rotation, 0 while it is skipped.",
                                    labels=["kind"])
        healthy.add_metric([kind], 1 if r.get("healthy") else 0)
        yield healthy
        for key, name, help_ in (("used_bytes", "remote_used_bytes", "Bytes the remote tier holds, as this "
                                  "store can tell (Mooncake: what it put; 3FS: the directory's total)."),
                                 ("capacity_bytes", "remote_capacity_bytes", "Capacity of the remote tier "
                                  "(Mooncake: the segment this store lends; 3FS: capacity_bytes or its files).")):
            if isinstance(r.get(key), (int, float)):
                g = GaugeMetricFamily(f"{PREFIX}_{name}", help_, labels=["kind"])
                g.add_metric([kind], r[key])
                yield g
        counters = st.get("counters") or {}
        for value, name, help_ in (
                (counters.get("hits_remote"), "remote_hits", "Local misses the remote tier answered "
                 "with a verified block."),
                (counters.get("misses_remote"), "remote_misses", "Local misses the remote tier did not "
                 "answer (absent, damaged, or the tier skipped while unhealthy)."),
                (r.get("corruptions"), "remote_corruptions", "Remote blocks that failed their checksum "
                 "(misses; removed)."),
                (r.get("puts"), "remote_puts", "Blocks stored on the remote tier."),
                (r.get("put_failures"), "remote_put_failures", "Blocks the remote tier did not store "
                 "(unreachable, full)."),
                (counters.get("demotions"), "remote_demotions", "Blocks evicted from SSD and put to the "
                 "remote tier."),
                (counters.get("demotion_failures"), "remote_demotion_failures",
                 "Evicted blocks the remote tier refused.")):
            if isinstance(value, (int, float)):
                c = CounterMetricFamily(f"{PREFIX}_{name}", help_, labels=["kind"])
                c.add_metric([kind], value)
                yield c

    def _optional(self, st: dict) -> Iterable[Metric]:
        """Watermark crossings and compaction, exported when (and as) the store reports them."""
        crossings = st.get("watermark_crossings")
        if isinstance(crossings, dict):
            c = CounterMetricFamily(f"{PREFIX}_watermark_crossings",
                                    "Times a tier went from ok to above its warn watermark.", labels=["tier"])
            for tier, n in sorted(crossings.items()):
                c.add_metric([tier], n)
            yield c
        comp = st.get("compaction")
        if isinstance(comp, dict):
            # Whatever numbers the compactor reports (segments done, bytes moved, ...).
            for key, v in sorted(comp.items()):
                if isinstance(v, bool):
                    v = int(v)  # "running"
                if isinstance(v, (int, float)):
                    g = GaugeMetricFamily(f"{PREFIX}_compaction_{_metric_name(key)}",
                                          f"Compaction progress: {key} (from store.stats()).")
                    g.add_metric([], v)
                    yield g


def _metric_name(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key.lower())


class Metrics:
    """The metrics of one daemon, in a dedicated registry.

    Args:
        store: the store whose ``stats()`` (and ``quota()``, when it has one) are read at scrape
            time; None for request metrics only (tests of a server without a store).
    """

    def __init__(self, store: Any = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._requests = Counter(f"{PREFIX}_requests", "Requests served, by operation and outcome.",
                                 ["op", "outcome"], registry=self.registry)
        self._bytes = Counter(f"{PREFIX}_request_bytes", "Payload bytes moved by requests, by operation.",
                              ["op"], registry=self.registry)
        self._latency = Histogram(f"{PREFIX}_request_duration_seconds",
                                  "Time to serve a request, by operation.", ["op"],
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self._children: dict[tuple[str, bool], list] = {}
        # Connection-level trouble, reported by ConnectionEvents (see tairstore.daemon.events).
        self._errors = {
            category: Counter(f"{PREFIX}_{name}", help_, ["server", "kind"], registry=self.registry)
            for category, name, help_ in (
                ("protocol", "protocol_errors", "Frames or HTTP requests that broke the protocol."),
                ("connection", "connection_errors", "Connections reset, timed out or left mid-answer."),
                ("auth", "auth_failures", "Requests refused for a missing, unknown or narrow token."),
            )
        }
        self._store = None
        if store is not None:
            self.bind_store(store)

    def bind_store(self, store: Any) -> None:
        """Export ``store``'s state from now on (once per Metrics)."""
        if self._store is not None:
            raise RuntimeError("this Metrics already exports a store")
        self._store = store
        quota = getattr(store, "quota", None)
        self.registry.register(_StoreCollector(store.stats, quota if callable(quota) else (lambda ns: None)))

    def observe_request(self, op: str, seconds: float, nbytes: int, ok: bool) -> None:
        """Count one request.

        Args:
            op: the operation (``"get"``, ``"put"``, ``"http_get_cache_location"``…); keep the
                set small, each value is a label.
            seconds: time from the request's arrival to its answer.
            nbytes: payload bytes read or written (0 for metadata-only requests).
            ok: False when it was answered with an error.
        """
        children = self._children.get((op, ok))
        if children is None:
            # labels() costs a few microseconds a call (it builds and checks a label tuple):
            # each (op, outcome)'s children are looked up once and kept. The bytes series of
            # an op appears with its first payload, as before.
            children = [self._requests.labels(op, "ok" if ok else "error"), None,
                        self._latency.labels(op)]
            self._children[(op, ok)] = children
        children[0].inc()
        if nbytes:
            if children[1] is None:
                children[1] = self._bytes.labels(op)
            children[1].inc(nbytes)
        children[2].observe(seconds)

    def observe_error(self, category: str, server: str, kind: str) -> None:
        """Count one connection-level error.

        Args:
            category: ``"protocol"``, ``"connection"`` or ``"auth"``.
            server: ``"data"`` or ``"http"``.
            kind: a short fixed name (a wire error code, an HTTP status, ``"reset"``...).
        """
        self._errors[category].labels(server, kind).inc()

    def render(self) -> bytes:
        """Every metric in the Prometheus text exposition format (version 0.0.4)."""
        with self._lock:  # one scrape at a time: stats() walks the key map
            return generate_latest(self.registry)

    #: The Content-Type of :meth:`render`'s output.
    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
