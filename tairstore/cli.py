"""The ``tairstore`` command line.

Subcommands: ``serve`` (the cache daemon), ``demo`` (a tour of the embedded store), ``fsck``
(check or rebuild a data directory), ``sim`` (HiSim) and ``optimize`` (trace replay).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

from tairstore.config import DURABILITY_MODES

__all__ = ["main", "build_parser"]


def _size(text: str) -> int:
    """Parse ``512M``, ``4G``, ``1048576`` into bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M, 4G)") from None


def cmd_demo(args: argparse.Namespace) -> int:
    """Write a few chained blocks, match and read them back, print stats."""
    import numpy as np

    import tairstore
    from tairstore.keys import chain_hashes

    path = args.data_dir or tempfile.mkdtemp(prefix="tairstore-demo-")
    page, pages = 16, args.blocks
    tokens = np.arange(page * pages, dtype=np.int32)
    keys = chain_hashes(tokens, page)
    block = np.random.default_rng(0).integers(0, 255, args.block_bytes, dtype=np.uint8)
    print(f"store at {path}: {pages} blocks of {args.block_bytes} bytes, durability={args.durability}")
    with tairstore.open(path, dram_bytes=args.dram, ssd_bytes=args.ssd, durability=args.durability) as store:
        t0 = time.perf_counter()
        for i, k in enumerate(keys[: pages // 2]):
            block[:8] = i
            store.put(k, block)
        dt = time.perf_counter() - t0
        print(f"put {pages // 2} blocks in {dt * 1e3:.1f} ms")
        m = store.match(keys)
        print(f"match over {len(keys)} keys: prefix_len={m.prefix_len} tiers={m.tiers[:3]}…")
        view = store.get(keys[0])
        print(f"get(keys[0]) -> {len(view)} bytes, first byte {view[0]}")
        view.release()
        print(json.dumps(store.stats(), indent=2))
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    """Check a data directory; optionally repair it or rebuild its index from the segments."""
    from tairstore.engine.fsck import fsck

    report = fsck(args.dir, repair=args.repair, rebuild=args.rebuild)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, value in report.items():
            print(f"{name:>24}: {value}")
    return 0 if report["ok"] else 1


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r} (0..65535; 0 picks a free port)")
    return n


def _leaf_error(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``types`` inside (possibly nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _leaf_error(inner, types)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, types) else None


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the cache daemon until SIGTERM or Ctrl-C (see docs/DAEMON.md)."""
    import trio

    from tairstore.daemon.main import run_daemon
    from tairstore.daemon.config import load_config
    from tairstore.errors import StoreError

    cfg = load_config(args.config)
    # Flags beat the file: a quick "--port 0" must not need a config edit.
    for name in ("data_dir", "host", "port", "http_port"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.dram is not None:
        cfg.store["dram_bytes"] = args.dram
    if args.ssd is not None:
        cfg.store["ssd_bytes"] = args.ssd
    # The startup and shutdown lines are the daemon's main output: show them without -v.
    logging.getLogger("tairstore.daemon.main").setLevel(logging.INFO)
    try:
        trio.run(run_daemon, cfg)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - unwrap trio's exception groups for the user
        leaf = _leaf_error(exc, (OSError, StoreError))
        if leaf is None:
            raise
        if isinstance(leaf, OSError):
            print(f"tairstore serve: cannot listen on {cfg.host} (ports {cfg.port}, {cfg.http_port}): "
                  f"{leaf.strerror or leaf}; pick other ports with --port/--http-port", file=sys.stderr)
        else:
            print(f"tairstore serve: {type(leaf).__name__}: {leaf}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tairstore`` command."""
    p = argparse.ArgumentParser(prog="tairstore", description="tairstore: a tiered KV-cache block store")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the cache daemon (data protocol + HTTP API)",
                       description="Run the cache daemon. With no options: data in ./tairstore-data, "
                                   "loopback only, data port 7480, HTTP port 7481, tier sizes chosen "
                                   "from free memory and disk. Flags override the config file.")
    s.add_argument("--config", help="TOML config file (see docs/DAEMON.md)")
    s.add_argument("--data-dir", help="store directory (default ./tairstore-data)")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=_port, help="data protocol port (default 7480; 0: any free port)")
    s.add_argument("--http-port", type=_port, help="HTTP API port (default 7481; 0: any free port)")
    s.add_argument("--dram", type=_size, help="DRAM tier size, e.g. 4G (default: 25%% of available memory, cap 8G)")
    s.add_argument("--ssd", type=_size, help="SSD tier size, e.g. 64G; 0 for none (default: 50%% of free disk, cap 64G)")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="write, match and read a few blocks in an embedded store")
    d.add_argument("--data-dir", help="store directory (default: a new temporary directory)")
    d.add_argument("--blocks", type=int, default=32)
    d.add_argument("--block-bytes", type=_size, default=_size("256K"))
    d.add_argument("--dram", type=_size, default=_size("64M"))
    d.add_argument("--ssd", type=_size, default=_size("256M"))
    d.add_argument("--durability", choices=DURABILITY_MODES, default="sync")
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("fsck", help="check a data directory against its segments")
    f.add_argument("dir")
    f.add_argument("--repair", action="store_true", help="drop damaged blocks and empty segments")
    f.add_argument("--rebuild", action="store_true", help="rebuild the index from the segments alone")
    f.add_argument("--json", action="store_true", help="print the report as JSON")
    f.set_defaults(func=cmd_fsck)

    try:
        from tairstore.hisim.cli import add_parser as add_sim
    except ImportError:  # pragma: no cover - HiSim ships with the package
        add_sim = None
    if add_sim is not None:
        add_sim(sub)
    from tairstore.fuzz.cli import add_parser as add_fuzz

    add_fuzz(sub)
    from tairstore.policy.cli import add_parser as add_optimize

    add_optimize(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tairstore`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from tairstore.errors import StoreError

    try:
        return int(args.func(args) or 0)
    except StoreError as exc:
        print(f"tairstore: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
