"""Data-path throughput over loopback: tairstore's daemon beside Redis and a raw socket.

What is measured, for each block size (default 64 KiB, 256 KiB, 1 MiB, 4 MiB), each operation
(``put``, ``get``) and each concurrency (default 1, 4 and 16 clients):

- ``tairstore``: ``tairstore serve`` with a volatile DRAM-only store (``ssd_bytes =
  0``: no disk, like Redis with persistence off), driven by :class:`tairstore.net.client.Client`.
  ``put`` writes a fresh key every time (a put of an existing key is a no-op that returns False),
  so the arena evicts LRU blocks once full; ``get`` reads a pre-written set of keys and returns
  a new buffer per call, as redis-py does. The arena is prefaulted (``prefault_dram``, as a
  dedicated cache host runs it): a first write to a fresh page costs a page fault and its
  zeroing, 15-150 us per 64 KiB here, while Redis's overwrites reuse memory it already touched.
- ``redis``: ``redis-server`` on 127.0.0.1 with ``--save '' --appendonly no``, driven by redis-py
  at the same concurrency and the same pipelining (none: one request in flight per client).
  ``put`` is SET over a rotating set of keys (overwrites), ``get`` is GET. Three client set-ups
  run, and each cell's ratio is taken against the fastest of them ("Redis's best"):
  ``hiredis`` (the default with hiredis installed: its C packer copies a large value into one
  command buffer), ``py-pack`` (redis-py's ``PythonRespSerializer``, which sends a large value as
  its own buffer, plus the hiredis reply parser), ``pure-py`` (Python packer and parser).
- ``raw``: a loopback socket server in Python that only moves the same bytes (``recv_into`` a
  preallocated buffer, ``sendall`` of one), with a 1-byte acknowledgement per put and a 9-byte
  request per get: the transport's ceiling for a Python client and server.

Pipelining is the same on every side: none. Each client process has exactly one request in
flight (tairstore ``Client.put``/``get``, redis-py ``set``/``get`` without ``pipeline()``, the raw
client's request/answer), so the comparison is at equal concurrency and equal pipelining depth.

Clients are separate processes (``fork``), so that client-side Python does not share one GIL;
on a small machine the clients and the server compete for the same cores, as they would on a
loaded inference host, and that contention is part of the numbers. Throughput is payload bytes
(10^9 per GB) over the wall time of the run; latency percentiles are over every request of
every client. A batched ``match`` of 1,024 keys (one client) is timed separately.

Each row also gives the CPU time per request (round trip) that the server process (all its
threads, from ``/proc/PID/stat``) and the clients (summed, from ``os.times()``) spent while the
clients ran, split into user and system time: where the time goes, beside the throughput. The
ratio line of each cell also says how the raw socket itself compares with Redis: where that is
under 1.2x, ">= 1.2x Redis" asks for more than the transport's ceiling for a Python client and
server.

Setup (Debian/Ubuntu)::

    apt-get install -y redis-server      # the benchmark starts its own instance on a free port
    pip install redis hiredis

Run: ``python benchmarks/net.py`` (a few minutes), or e.g. ``--sizes 256K,4M --clients 1,4
--seconds 1``. ``--json FILE`` writes every cell. Targets checked at the end: tairstore >= 1.2x
Redis's best for 256 KiB - 4 MiB put and get, >= 0.8x the raw socket, match p50 < 1 ms.

Shared memory (``--no-shm`` leaves them out): a second daemon with ``[shm]`` serves clients
that map its arena read-only (``shm+tcp://``, :mod:`tairstore.net.shmclient`):

- ``shm``: ``get`` hands back a zero-copy view of the block under a lease (one round trip, no
  payload on the socket; the lease returns with the next request): bytes made readable per
  second, against Redis's best client (target >= 5x at 1 MiB). ``put`` copies the block into
  the client's staging file and sends its offset (PUT_SHM; the daemon copies it into the
  arena), against Redis's best (target >= 3x);
- ``shm-into``: ``get_into`` a caller's buffer (a round trip and one copy out of the arena),
  against ``memcpy``: ``np.copyto`` of the same bytes from a 64 MiB working set into one
  buffer, in the same number of processes (target >= 0.5x);
- ``memcpy`` of a put: ``np.copyto`` of the block into the next slot of a buffer the size of
  the shared-memory daemon's arena (256 MiB, shared by the clients, faulted in first): the one
  copy any put that keeps the bytes must make, into memory last written a whole arena ago.
  It is printed beside the staged put's ratio to Redis, as that ratio's ceiling.

``--batch N`` moves N blocks per round trip on every side instead (tairstore ``put_many`` /
``get_many``, one request; redis-py ``pipeline(transaction=False)`` of N commands; raw one
transfer of N blocks): how an engine loads or saves the pages of one prefix. Per-request costs
are then shared by N blocks; ops/s counts blocks, latencies are per round trip.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from tairstore.daemon.process import DaemonProcess

KiB, MiB = 1 << 10, 1 << 20
RAW_REQUEST = struct.Struct("<BQQ")  # op (0 put, 1 get), size, slot
WORKING_SET = 64 * MiB  # bytes of keys each (op, size, concurrency) cell cycles through
SERVER_DRAM = 768 * MiB
SHM_DRAM = 256 * MiB  # the shared-memory daemon's arena: get cells only, WORKING_SET fits
SHM_TARGETS = ("shm", "shm-into", "memcpy")


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": KiB, "M": MiB}.get(text[-1], 1)
    return int(text.rstrip("KM")) * mult


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


# ---------------------------------------------------------------------------------- servers
def start_tairstore(tmp: str, shm: bool = False) -> tuple[DaemonProcess, int]:
    """``tairstore serve`` with a volatile DRAM-only store, arena prefaulted (``shm``: a
    smaller arena in shared memory, see ``[shm]``)."""
    dram = SHM_DRAM if shm else SERVER_DRAM
    proc = DaemonProcess(os.path.join(tmp, "shm" if shm else "ts"), store={
        "ssd_bytes": 0, "dram_bytes": dram, "prefault_dram": True},
        extra={"shm": {}} if shm else None).start()
    port = int(proc.data_url.rsplit(":", 1)[1])
    # Touch the whole arena once, as a long-running daemon has: first-touch page faults are
    # a start-up cost, not a per-put one (benchmarks/engine.py reports them separately).
    from tairstore.net.client import Client

    with Client(f"tcp://127.0.0.1:{port}", timeout=60) as c:
        block = bytes(4 * MiB)
        keys = [b"warm-%d" % i for i in range(dram // (4 * MiB))]
        for k in keys:
            c.put(k, block)
        c.delete(keys)
    return proc, port


def start_redis() -> tuple[subprocess.Popen, int] | None:
    exe = shutil.which("redis-server")
    if exe is None:
        print("redis-server not found: Redis columns skipped (apt-get install -y redis-server)")
        return None
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--protected-mode", "no", "--loglevel", "warning"], stdout=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def _raw_serve_conn(conn: socket.socket) -> None:
    # The same working set as the stores hold, so that the server side reads and writes
    # memory that is not all in the CPU cache, as theirs does.
    buf = memoryview(bytearray(WORKING_SET + 8 * MiB))
    head = bytearray(RAW_REQUEST.size)
    with conn:
        while True:
            got = 0
            while got < len(head):
                n = conn.recv_into(memoryview(head)[got:])
                if not n:
                    return
                got += n
            op, size, slot = RAW_REQUEST.unpack(head)
            base = slot * size % WORKING_SET
            if op == 0:
                got = 0
                while got < size:
                    n = conn.recv_into(buf[base + got:base + size])
                    if not n:
                        return
                    got += n
                conn.sendall(b"\x01")
            else:
                conn.sendall(buf[base:base + size])


def raw_server_main(port: int) -> None:
    """A thread per connection that moves bytes and nothing else."""
    lsock = socket.create_server(("127.0.0.1", port), backlog=64)
    print("READY", flush=True)
    while True:
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_raw_serve_conn, args=(conn,), daemon=True).start()


def start_raw() -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--raw-server", str(port)], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    wait_port(port)
    return proc, port


# ---------------------------------------------------------------------------------- clients
def _redis_client(variant: str, port: int):
    import redis
    from redis._parsers import _RESP2Parser
    from redis.connection import PythonRespSerializer

    class PyPackConnection(redis.Connection):
        def _construct_command_packer(self, packer):
            return PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)

    kwargs: dict = {"host": "127.0.0.1", "port": port}
    if variant in ("py-pack", "pure-py"):
        kwargs["connection_class"] = PyPackConnection
    if variant == "pure-py":
        kwargs["parser_class"] = _RESP2Parser
    return redis.Redis(connection_pool=redis.ConnectionPool(**kwargs))


class RawClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = memoryview(bytearray(8 * MiB))
        self.ack = bytearray(1)

    def put(self, slot: int, block: memoryview, count: int = 1) -> None:
        self.sock.sendmsg([RAW_REQUEST.pack(0, len(block) * count, slot)] + [block] * count)
        self.sock.recv_into(self.ack)

    def get(self, slot: int, size: int) -> None:
        self.sock.sendall(RAW_REQUEST.pack(1, size, slot))
        got = 0
        while got < size:
            got += self.sock.recv_into(self.buf[got:size])


def make_ops(target: str, port: int, size: int, worker: int, nkeys: int, run_id: str, batch: int = 1):
    """(put(i), get(i), prepare()) closures for one client process.

    With ``batch`` > 1 each call moves ``batch`` blocks in one round trip: tairstore
    ``put_many``/``get_many`` (one request), redis-py ``pipeline(transaction=False)`` of
    ``batch`` SET/GET, raw one request of ``batch * size`` bytes.
    """
    block = memoryview(np.random.default_rng(worker).integers(0, 256, size, dtype=np.uint8)).cast("B")
    keys = [f"{run_id}-{worker}-{i}".encode() for i in range(nkeys)]

    def key_batch(i: int) -> list[bytes]:
        return [keys[(i * batch + j) % nkeys] for j in range(batch)]

    if target == "tairstore":
        from tairstore.net.client import Client

        c = Client(f"tcp://127.0.0.1:{port}", timeout=60)
        counter = iter(range(1 << 62))
        if batch == 1:
            def put(i: int) -> None:
                c.put(f"{run_id}-{worker}-p{next(counter)}".encode(), block)

            def get(i: int) -> None:
                assert c.get(keys[i % nkeys]) is not None
        else:
            blocks = [block] * batch

            def put(i: int) -> None:
                c.put_many([f"{run_id}-{worker}-p{next(counter)}".encode() for _ in range(batch)], blocks)

            def get(i: int) -> None:
                assert all(v is not None for v in c.get_many(key_batch(i)))

        return put, get, lambda: [c.put(k, block) for k in keys]
    if target in SHM_TARGETS:
        return _shm_ops(target, port, size, block, keys, batch)
    if target == "raw":
        c = RawClient(port)
        return (lambda i: c.put(i, block, batch)), (lambda i: c.get(i, size * batch)), (lambda: None)
    r = _redis_client(target.split(":", 1)[1], port)
    if batch == 1:
        def rput(i: int) -> None:
            r.set(keys[i % nkeys], block)

        def rget(i: int) -> None:
            assert r.get(keys[i % nkeys]) is not None
    else:
        def rput(i: int) -> None:
            pipe = r.pipeline(transaction=False)
            for k in key_batch(i):
                pipe.set(k, block)
            pipe.execute()

        def rget(i: int) -> None:
            pipe = r.pipeline(transaction=False)
            for k in key_batch(i):
                pipe.get(k)
            assert all(v is not None for v in pipe.execute())

    return rput, rget, lambda: [r.set(k, block) for k in keys]


def _shm_ops(target: str, port: int, size: int, block: memoryview, keys: list[bytes], batch: int = 1):
    """(put, get, prepare) of the shared-memory cells (``shm-into`` and ``memcpy``: get only).

    With ``batch`` > 1 a call moves ``batch`` blocks: ``put_many`` (one staged request),
    ``get_many`` (one lease round trip for the batch; ``shm-into`` then copies each view out),
    ``memcpy`` ``batch`` copies."""
    outs = [np.empty(size, np.uint8) for _ in range(batch)]
    out = outs[0]
    if target == "memcpy":
        src = np.random.default_rng(0).integers(0, 256, WORKING_SET, dtype=np.uint8)
        slots = WORKING_SET // size
        # Puts: into the next slot of an arena-sized buffer (each client its share of it).
        clients = max(1, WORKING_SET // (size * max(len(keys), 1)))
        payload = np.frombuffer(block, np.uint8)
        arenas: list[np.ndarray] = []  # allocated by the first (warm-up) put, untimed

        def copy(i: int) -> None:
            for b, dst in enumerate(outs):
                j = (i * batch + b) % slots * size
                np.copyto(dst, src[j:j + size])

        def copy_in(i: int) -> None:
            if not arenas:
                arenas.append(np.ones(max(SHM_DRAM // clients, 2 * size * batch), np.uint8))
            arena = arenas[0]
            for b in range(batch):
                j = (i * batch + b) % (arena.nbytes // size) * size
                np.copyto(arena[j:j + size], payload)

        return copy_in, copy, lambda: None
    from tairstore.net.client import Client

    c = Client(f"shm+tcp://127.0.0.1:{port}", timeout=60)
    n = len(keys)
    counter = iter(range(1 << 62))
    fresh = keys[0].rsplit(b"-", 1)[0] + b"-p"

    if batch > 1:
        blocks = [block] * batch

        def put(i: int) -> None:
            c.put_many([fresh + b"%d" % next(counter) for _ in range(batch)], blocks)

        def get(i: int) -> None:
            views = c.get_many([keys[(i * batch + j) % n] for j in range(batch)])
            if target == "shm-into":
                for v, dst in zip(views, outs):
                    np.copyto(dst, np.frombuffer(v, np.uint8))
            assert all(v is not None for v in views)  # the views die here: their leases go back
    else:
        def put(i: int) -> None:
            c.put(fresh + b"%d" % next(counter), block)

        if target == "shm":
            def get(i: int) -> None:
                assert c.get(keys[i % n]) is not None  # the view dies here: its lease goes back
        else:
            def get(i: int) -> None:
                assert c.get_into(keys[i % n], out) == size

    return put, get, lambda: [c.put(k, block) for k in keys]


def client_main(target, port, op, size, worker, nkeys, seconds, run_id, barrier, results, batch) -> None:
    try:
        _client_loop(target, port, op, size, worker, nkeys, seconds, run_id, barrier, results, batch)
    except BaseException as exc:  # reported by run_cell instead of a silent timeout
        barrier.abort()
        results.put(f"{target} client {worker}: {type(exc).__name__}: {exc}")


def _client_loop(target, port, op, size, worker, nkeys, seconds, run_id, barrier, results, batch) -> None:
    put, get, prepare = make_ops(target, port, size, worker, nkeys, run_id, batch)
    fn = put if op == "put" else get
    if op == "get":
        prepare()
    fn(0)  # warm the connection
    barrier.wait()
    lat: list[float] = []
    cpu0 = os.times()
    start = time.perf_counter()
    end = start + seconds
    i = 0
    while True:
        t0 = time.perf_counter()
        fn(i)
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        i += 1
        if t1 >= end:
            break
    cpu1 = os.times()
    results.put((start, t1, i, lat, cpu1.user - cpu0.user, cpu1.system - cpu0.system))


def process_cpu(pid: int | None) -> tuple[float, float] | None:
    """(user, system) CPU seconds of process ``pid``, all its threads (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def run_cell(target: str, port: int, op: str, size: int, clients: int, seconds: float,
             batch: int = 1, server_pid: int | None = None) -> dict:
    """One (target, op, size, concurrency) cell; also the CPU time per request that the server
    process (all threads) and the clients (summed) spent while the clients ran."""
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(clients + 1), ctx.Queue()
    nkeys = max(2, batch, WORKING_SET // size // clients)
    run_id = f"{op}{size}c{clients}t{time.monotonic_ns()}"
    procs = [ctx.Process(target=client_main, args=(target, port, op, size, w, nkeys, seconds, run_id, barrier,
                                                   results, batch)) for w in range(clients)]
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout=seconds * 10 + 120)  # every client is connected and warm
    except threading.BrokenBarrierError:
        pass  # a client failed: its message is in results
    cpu0 = process_cpu(server_pid)
    out = [results.get(timeout=seconds * 10 + 120) for _ in procs]
    cpu1 = process_cpu(server_pid)
    for p in procs:
        p.join()
    failed = [o for o in out if isinstance(o, str)]
    if failed:
        raise RuntimeError("; ".join(failed))
    start, end = min(o[0] for o in out), max(o[1] for o in out)
    ops = sum(o[2] for o in out) * batch  # blocks moved
    lat = np.concatenate([np.asarray(o[3]) for o in out])
    wall = end - start
    requests = sum(o[2] for o in out)
    cell = {"target": target, "op": op, "size": size, "clients": clients, "batch": batch, "ops": ops,
            "gbps": ops * size / wall / 1e9, "ops_s": ops / wall,
            "p50_us": float(np.percentile(lat, 50) * 1e6), "p99_us": float(np.percentile(lat, 99) * 1e6),
            # CPU microseconds per request (round trip): what each side costs the machine.
            "client_user_us": sum(o[4] for o in out) / requests * 1e6,
            "client_sys_us": sum(o[5] for o in out) / requests * 1e6}
    if cpu0 is not None and cpu1 is not None:
        cell["server_user_us"] = (cpu1[0] - cpu0[0]) / requests * 1e6
        cell["server_sys_us"] = (cpu1[1] - cpu0[1]) / requests * 1e6
    return cell


def match_p50(port: int) -> float:
    from tairstore.net.client import Client

    with Client(f"tcp://127.0.0.1:{port}") as c:
        keys = [b"match-%06d" % i for i in range(1024)]
        c.put_many(keys[:768], [b"x" * 1024] * 768)
        for _ in range(20):
            c.match(keys)
        lat = []
        for _ in range(300):
            t0 = time.perf_counter()
            c.match(keys)
            lat.append(time.perf_counter() - t0)
    return float(np.percentile(lat, 50) * 1e3)


# ---------------------------------------------------------------------------------- report
def fmt_size(n: int) -> str:
    return f"{n // MiB}M" if n >= MiB else f"{n // KiB}K"


def report(cells: list[dict], redis_variants: list[str]) -> list[tuple]:
    print(f"\n{'op':4} {'size':>5} {'cl':>3} | {'target':16} {'GB/s':>6} {'ops/s':>8} {'p50 us':>8} {'p99 us':>8}"
          f" | {'server CPU us/req':>17} | {'client CPU us/req':>17}")
    print(f"{'':14} | {'':16} {'':>6} {'':>8} {'':>8} {'':>8} | {'user':>8} {'sys':>8} | {'user':>8} {'sys':>8}")
    checks = []
    keyf = lambda c: (c["op"], c["size"], c["clients"])  # noqa: E731
    for k in sorted({keyf(c) for c in cells}, key=lambda k: (k[0] != "put", k[1], k[2])):
        row = {c["target"]: c for c in cells if keyf(c) == k}
        for name, c in row.items():
            server = (f"{c['server_user_us']:8.1f} {c['server_sys_us']:8.1f}" if "server_user_us" in c
                      else f"{'-':>8} {'-':>8}")
            print(f"{k[0]:4} {fmt_size(k[1]):>5} {k[2]:>3} | {name:16} {c['gbps']:6.2f} {c['ops_s']:8.0f} "
                  f"{c['p50_us']:8.0f} {c['p99_us']:8.0f} | {server} | "
                  f"{c['client_user_us']:8.1f} {c['client_sys_us']:8.1f}")
        ts = row.get("tairstore")
        best = max((row[f"redis:{v}"] for v in redis_variants if f"redis:{v}" in row),
                   key=lambda c: c["gbps"], default=None)
        line = []
        if ts and best:
            ratio = ts["gbps"] / best["gbps"]
            line.append(f"vs Redis best ({best['target']}) {ratio:.2f}x")
            if k[1] >= 256 * KiB:
                checks.append((f"{k[0]} {fmt_size(k[1])} x{k[2]} >= 1.2x Redis", ratio, 1.2))
        if ts and "raw" in row:
            ratio = ts["gbps"] / row["raw"]["gbps"]
            line.append(f"vs raw {ratio:.2f}x")
            checks.append((f"{k[0]} {fmt_size(k[1])} x{k[2]} >= 0.8x raw", ratio, 0.8))
            if best:
                # Where the raw socket itself is under 1.2x Redis, 1.2x Redis is above the
                # transport's ceiling for a Python client and server.
                line.append(f"raw itself {row['raw']['gbps'] / best['gbps']:.2f}x Redis")
        if line:
            print(f"{'':15}   tairstore: " + ", ".join(line))
        checks += shm_checks(k, row, best)
    return checks


def shm_checks(k: tuple, row: dict, best: dict | None) -> list[tuple]:
    """The shared-memory targets of one (op, size, clients) cell: view get >= 5x Redis's best,
    put >= 3x, get_into >= 0.5x memcpy."""
    checks, line = [], []
    shm, into, memcpy = row.get("shm"), row.get("shm-into"), row.get("memcpy")
    batch = next((c["batch"] for c in (shm, into) if c), 1)
    batch_tag = f" batch {batch}" if batch > 1 else ""
    if shm and best:
        ratio, want = shm["gbps"] / best["gbps"], 5.0 if k[0] == "get" else 3.0
        line.append(f"{'view get' if k[0] == 'get' else 'put'} {ratio:.2f}x Redis best")
        if k[0] == "put" and memcpy:
            line.append(f"(one memcpy into an arena-sized buffer: {memcpy['gbps'] / best['gbps']:.2f}x)")
        checks.append((f"shm {k[0]} {fmt_size(k[1])} x{k[2]}{batch_tag} >= {want:g}x Redis", ratio, want))
    if into and memcpy:
        ratio = into["gbps"] / memcpy["gbps"]
        line.append(f"get_into {ratio:.2f}x memcpy")
        checks.append((f"shm get_into {fmt_size(k[1])} x{k[2]}{batch_tag} >= 0.5x memcpy", ratio, 0.5))
    if line:
        print(f"{'':15}   shared memory: " + ", ".join(line))
    return checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64K,256K,1M,4M")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--ops", default="put,get")
    ap.add_argument("--seconds", type=float, default=1.5, help="per cell")
    ap.add_argument("--redis-variants", default="hiredis,py-pack,pure-py")
    ap.add_argument("--no-raw", action="store_true")
    ap.add_argument("--no-shm", action="store_true", help="leave out the shared-memory get cells")
    ap.add_argument("--batch", type=int, default=1,
                    help="blocks per round trip (tairstore put_many/get_many, redis-py pipeline, raw: "
                         "one transfer); latencies are then per round trip, ops/s per block")
    ap.add_argument("--json", help="write every cell to this file")
    ap.add_argument("--raw-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_server:
        raw_server_main(args.raw_server)
        return 0
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    variants = [v for v in args.redis_variants.split(",") if v]
    tmp = tempfile.mkdtemp(prefix="tairstore-netbench-")
    procs: list[subprocess.Popen] = []
    daemons: list[DaemonProcess] = []
    try:
        ts_daemon, ts_port = start_tairstore(tmp)
        daemons.append(ts_daemon)
        targets = [("tairstore", ts_port)]
        redis = start_redis() if variants else None
        if redis is not None:
            procs.append(redis[0])
            targets += [(f"redis:{v}", redis[1]) for v in variants]
        if not args.no_raw:
            raw_proc, raw_port = start_raw()
            procs.append(raw_proc)
            targets.append(("raw", raw_port))
        shm_targets: list[tuple[str, int]] = []
        if not args.no_shm and os.path.isdir("/dev/shm"):
            shm_daemon, shm_port = start_tairstore(tmp, shm=True)
            daemons.append(shm_daemon)
            shm_targets = [(t, shm_port) for t in SHM_TARGETS]
        pids = {ts_port: ts_daemon.proc.pid}
        if shm_targets:
            pids[shm_port] = shm_daemon.proc.pid
        if redis is not None:
            pids[redis[1]] = redis[0].pid
        if not args.no_raw:
            pids[raw_port] = raw_proc.pid
        print(f"{os.cpu_count()} CPUs; clients are processes; {args.seconds:g} s per cell")
        if args.batch == 1:
            print("pipelining: none on any side - every client (tairstore Client, redis-py, raw) has one "
                  "request in flight at a time (redis-py without pipeline(), tairstore without put_many)")
        else:
            print(f"batches of {args.batch} blocks per round trip on every side: tairstore put_many/get_many "
                  f"(one request), redis-py pipeline(transaction=False) of {args.batch} commands, raw one "
                  "transfer; p50/p99 are per round trip")
        if args.batch < 1:
            raise SystemExit("--batch must be >= 1")
        cells = []
        for op in args.ops.split(","):
            for size in sizes:
                for n in clients:
                    if size * args.batch * n > SERVER_DRAM // 2:
                        # Blocks being received are reserved DRAM that nothing can evict: with
                        # this much in flight the server rightly refuses (CapacityError).
                        print(f"  {op} {fmt_size(size)} x{n}: skipped, {n} clients x {args.batch} "
                              f"blocks in flight exceed half the server's {SERVER_DRAM // MiB} MiB DRAM")
                        continue
                    extra = shm_targets if op == "get" else [t for t in shm_targets if t[0] != "shm-into"]
                    for name, port in targets + extra:  # interleaved: background noise hits all alike
                        if name == "raw" and size * args.batch > 8 * MiB:
                            continue  # the raw server's per-connection buffer
                        cells.append(run_cell(name, port, op, size, n, args.seconds, args.batch,
                                              None if name == "memcpy" else pids.get(port)))
                        c = cells[-1]
                        print(f"  {op} {fmt_size(size)} x{n} {name}: {c['gbps']:.2f} GB/s p50 {c['p50_us']:.0f} us",
                              flush=True)
        checks = report(cells, variants)
        p50 = match_p50(ts_port)
        print(f"\nmatch of 1,024 keys (one client): p50 {p50:.3f} ms")
        checks.append(("match 1024 keys p50 < 1 ms", 1.0 / p50 if p50 else float("inf"), 1.0))
        print("\ntargets:")
        for name, value, target in checks:
            print(f"  {'met   ' if value >= target else 'MISSED'} {name}: {value:.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"cells": cells, "match_p50_ms": p50}, f, indent=1)
    finally:
        for d in daemons:
            d.stop()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
