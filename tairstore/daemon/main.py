"""The cache daemon: one store, the binary data server and the HTTP control API, in one process.

Theory of operation
-------------------
:func:`run_daemon` opens the store (in a worker thread: recovery may read for a while), then
runs in one trio nursery:

- a signal watcher (SIGTERM, SIGINT): the first signal starts a graceful shutdown, a second one
  cancels whatever is still running;
- the HTTP server (:mod:`tairstore.daemon.httpserver` + :mod:`tairstore.daemon.api`);
- the data server (:func:`tairstore.daemon.dataserver.serve_data`).

Once both listen it logs one line saying where, and what sizes and durability it chose.

Graceful shutdown: both listeners stop accepting at once; idle HTTP connections close; requests
already being served finish (the data server gives them ``shutdown_grace_s``, the HTTP server the
same, after which the nursery is cancelled); then ``store.sync()`` and ``store.close()``, so
every acknowledged write is durable whatever the durability mode, and the directory lock is
released for the next start.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import trio

from tairstore.daemon.config import DaemonConfig, is_loopback
from tairstore.errors import StoreError
from tairstore.daemon.auth import Authenticator
from tairstore.daemon.control import ControlPlane
from tairstore.daemon.api import HttpApi
from tairstore.daemon.httpserver import HttpServer
from tairstore.daemon.metrics import Metrics
from tairstore.daemon.state import STATE_FILE, DaemonState
from tairstore.tiers.dram import SharedBacking

__all__ = ["DaemonInfo", "choose_sizes", "run_daemon"]

log = logging.getLogger("tairstore.daemon.main")

GiB = 1 << 30
MiB = 1 << 20
# Defaults when the config leaves the tier sizes out: a share of what the machine has now, capped
# so that a big server does not hand a cache it never asked for most of its memory or disk.
DRAM_SHARE, DRAM_CAP, DRAM_FLOOR = 0.25, 8 * GiB, 64 * MiB
SSD_SHARE, SSD_CAP, SSD_FLOOR = 0.50, 64 * GiB, 256 * MiB


@dataclass
class DaemonInfo:
    """What :func:`run_daemon` reports through ``task_status.started``.

    Attributes:
        host: the bound address.
        port: the data protocol port (None when the data server is not available).
        http_port: the HTTP API port.
        data_dir: the absolute store directory.
        store_options: the options the store was opened with.
        shutdown: call to start a graceful shutdown (as SIGTERM does).
    """

    host: str
    port: int | None
    http_port: int
    data_dir: str
    store_options: dict
    shutdown: Callable[[], None]


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _free_disk(path: str) -> int:
    # The data directory may not exist yet: measure the nearest existing parent.
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return shutil.disk_usage(p).free


def _fmt(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def choose_sizes(data_dir: str, store: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Fill in ``dram_bytes`` / ``ssd_bytes`` left out of the config.

    Returns:
        (store options, a human description of how the sizes were chosen).
    """
    out = dict(store)
    how = []
    if "dram_bytes" not in out:
        avail = _available_memory()
        out["dram_bytes"] = max(DRAM_FLOOR, min(DRAM_CAP, int(avail * DRAM_SHARE)) // MiB * MiB)
        how.append(f"dram={_fmt(out['dram_bytes'])} ({DRAM_SHARE:.0%} of {_fmt(avail)} available memory, "
                   f"cap {_fmt(DRAM_CAP)})")
    else:
        how.append(f"dram={_fmt(out['dram_bytes'])} (configured)")
    if "ssd_bytes" not in out:
        free = _free_disk(data_dir)
        out["ssd_bytes"] = max(SSD_FLOOR, min(SSD_CAP, int(free * SSD_SHARE)) // MiB * MiB)
        how.append(f"ssd={_fmt(out['ssd_bytes'])} ({SSD_SHARE:.0%} of {_fmt(free)} free disk, cap {_fmt(SSD_CAP)})")
    else:
        how.append(f"ssd={_fmt(out['ssd_bytes'])} (configured)" if out["ssd_bytes"] else "ssd=off (volatile cache)")
    if out["ssd_bytes"]:
        out.setdefault("segment_bytes", min(256 * MiB, max(4096, out["ssd_bytes"] // 8)))
    return out, " ".join(how)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _data_limits(config: DaemonConfig) -> Any:
    from tairstore.net.limits import Limits

    return Limits(**config.limits.data_limits(), shutdown_grace_s=config.shutdown_grace_s)


async def _watch_signals(stop: trio.Event, hard_stop: Callable[[], None], *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for sig in signals:
            name = signal.Signals(sig).name
            if not stop.is_set():
                log.info("%s: shutting down (finishing requests in progress; send it again to stop now)", name)
                stop.set()
            else:
                log.warning("%s again: stopping now", name)
                hard_stop()
                return


async def _serve_data_in(scope: trio.CancelScope, store: Any, config: DaemonConfig, auth: Authenticator,
                         metrics: Metrics, backing: Any, access_log: Any, *,
                         task_status: trio.TaskStatus[int | None]) -> None:
    try:
        from tairstore.daemon.dataserver import serve_data
    except ImportError as exc:  # the data path ships separately in some builds
        log.warning("data server unavailable (%s): serving HTTP only", exc)
        task_status.started(None)
        return
    with scope:
        await serve_data(store, host=config.host, port=config.port, limits=_data_limits(config),
                         auth=auth, metrics=metrics, shm=backing,
                         lease_s=config.shm.lease_s if config.shm else None, access_log=access_log,
                         task_status=task_status)


def _attach_tair(config: DaemonConfig, api: HttpApi, data_dir: str) -> HttpServer | None:
    """Open Tair KVCache's tables for ``/api/*``; the admin server if ``[tair]`` asks for one."""
    from tairstore.daemon.tair_admin import TairAdmin, open_tair_storage

    storage = open_tair_storage(config.tair, data_dir)
    api.compat.attach(storage, meta_rpc_port=config.port)
    if config.tair.admin_http_port is None:
        return None
    app = TairAdmin(api, storage)
    return HttpServer(app, max_body_bytes=app.max_body_bytes)


async def _serve_tair_admin(admin: HttpServer, config: DaemonConfig, *,
                            task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    await admin.serve(config.host, config.tair.admin_http_port or 0, task_status=task_status)


async def run_daemon(config: DaemonConfig, *, handle_signals: bool = True,
                     task_status: trio.TaskStatus[DaemonInfo] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until SIGTERM/SIGINT (or ``DaemonInfo.shutdown()``), then stop cleanly.

    Args:
        config: everything it needs (:func:`tairstore.daemon.config.load_config`).
        handle_signals: watch SIGTERM/SIGINT (only possible in the main thread).
        task_status: receives a :class:`DaemonInfo` once both listeners accept connections.

    Raises:
        StoreError: the store cannot open (locked by another process, not a store, ...).
        OSError: a port cannot be bound.
    """
    import tairstore

    data_dir = os.path.abspath(config.data_dir)
    options, sizing = choose_sizes(data_dir, config.store)
    auth = Authenticator(config.tokens)
    if not is_loopback(config.host) and not auth.enabled:
        log.warning("binding %s with no [[tokens]] configured: anyone who can reach this host can read, "
                    "write and delete cached blocks; add tokens to the config file", config.host)
    backing = None
    if (config.shm is not None and options.get("dram_bytes") and config.shm.partitions == "auto"
            and config.tokens and not options.get("dram_partitions")):
        # Isolation by default with auth: each limited token's namespaces get a file of their own.
        from tairstore.daemon.shm import partitions_from_tokens

        derived = partitions_from_tokens(config.tokens, config.namespaces, options["dram_bytes"])
        if derived:
            options["dram_partitions"] = derived
            log.info("shared memory: DRAM partitions from the tokens: %s", ", ".join(
                f"{name} {p['bytes'] >> 20} MiB {p['namespaces']}" for name, p in derived.items()))
    if config.shm is not None and options.get("dram_bytes"):
        # One file per DRAM partition (the default one first), each with its own group.
        group = config.shm.group or None
        parts = (options.get("dram_partitions") or {}).values()
        backing = [SharedBacking(config.shm.dir, group)] + [
            SharedBacking(config.shm.dir, group if p.get("group") is None else p["group"])
            for p in parts]  # a numeric group may be 0
    try:
        # The store maps its DRAM arena from the backing (None: private memory).
        store = await trio.to_thread.run_sync(
            partial(tairstore.open, data_dir, dram_backing=backing, **options))
    except BaseException:
        for b in backing or ():
            b.unlink()
        raise
    access_log = None
    try:
        if config.access_log:
            from tairstore.policy.accesslog import AccessLogWriter

            access_log = AccessLogWriter(config.access_log)
        control = ControlPlane(store, DaemonState(os.path.join(data_dir, STATE_FILE)))
        for name, q in config.namespaces.items():
            await trio.to_thread.run_sync(control.ensure_namespace, name, q.total_bytes, q.tier_bytes,
                                         q.strategy)
        metrics = Metrics(store)
        api = HttpApi(control, auth, metrics, http_max_body_bytes=config.limits.http_max_body_bytes,
                      worker_threads=config.limits.worker_threads or 4)
        http = HttpServer(api, max_body_bytes=api.max_body_bytes, events=api.events)
        admin = await trio.to_thread.run_sync(_attach_tair, config, api, data_dir)
        stop = trio.Event()
        data_scope = trio.CancelScope()
        serving = trio.CancelScope()  # cancelled by a second signal: stop without waiting
        async with trio.open_nursery() as outer:
            if handle_signals:
                await outer.start(partial(_watch_signals, stop, serving.cancel))
            with serving:
                async with trio.open_nursery() as nursery:
                    http_port = await nursery.start(http.serve, config.host, config.http_port)
                    data_port = await nursery.start(
                        partial(_serve_data_in, data_scope, store, config, auth, metrics, backing,
                                access_log))
                    if admin is not None:
                        await nursery.start(_serve_tair_admin, admin, config)
                    host = _url_host(config.host)
                    api.http_url = f"http://{host}:{http_port}"
                    api.data_url = f"tairstore://{host}:{data_port}" if data_port else ""
                    log.info("tairstore serve: listening data=%s http=%s | data_dir=%s | %s durability=%s "
                             "| auth=%s%s", api.data_url or "off", api.http_url, data_dir, sizing,
                             options.get("durability", "sync"),
                             f"{len(config.tokens)} token(s)" if auth.enabled else "off",
                             f" | config={config.source}" if config.source else "")
                    task_status.started(DaemonInfo(config.host, data_port, http_port, data_dir, options,
                                                   stop.set))
                    await stop.wait()
                    # Stop accepting on both ports now; requests in progress get the grace period,
                    # then whatever is left is cancelled.
                    http.shutdown()
                    if admin is not None:
                        admin.shutdown()
                    data_scope.cancel()
                    nursery.cancel_scope.deadline = trio.current_time() + config.shutdown_grace_s + 1.0
            outer.cancel_scope.cancel()  # the signal watcher
        try:
            await trio.to_thread.run_sync(store.sync)
        except StoreError as exc:
            log.error("final sync failed: %s", exc)
    finally:
        with trio.CancelScope(shield=True):
            if access_log is not None:
                access_log.close()
            await trio.to_thread.run_sync(store.close)
            for b in backing or ():
                b.unlink()
    log.info("tairstore serve: stopped cleanly")
