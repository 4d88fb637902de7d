"""What a Python event loop costs per request: an echo server three ways, over loopback.

The daemon's data path is trio around a sans-IO codec. This measures the part that is the
loop alone: a server that reads a small request and writes it back, built as

- ``trio``: a task per connection, non-blocking ``os.readv``, ``trio.lowlevel.wait_readable``
  when the socket is empty, ``os.writev`` (the daemon's reader does the same);
- ``epoll``: one thread, a plain ``select.epoll`` loop over every connection;
- ``thread``: a thread per connection with blocking ``recv_into`` / ``sendall``.

Clients are processes with one 32-byte request in flight each. It prints requests per second,
the server process's CPU time per request (user + system, from ``/proc/PID/stat``) and the
mean latency, at each concurrency. Compare the CPU column with ``benchmarks/net.py``'s server
CPU per request: what the daemon spends beyond this is the protocol and the store.

Run: ``python benchmarks/echo_loops.py [--requests 20000] [--clients 1,4]`` (Linux).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import socket
import sys
import threading
import time

from net import process_cpu  # benchmarks/net.py, beside this script

REQUEST = b"x" * 32


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def serve_trio(ls: socket.socket) -> None:
    import trio

    async def handle(sock) -> None:
        fd, buf = sock.fileno(), bytearray(64)
        while True:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if n == 0:
                return
            os.writev(fd, [memoryview(buf)[:n]])

    async def main() -> None:
        listener = trio.socket.from_stdlib_socket(ls)
        async with trio.open_nursery() as nursery:
            while True:
                sock, _ = await listener.accept()
                _nodelay(sock)
                nursery.start_soon(handle, sock)

    trio.run(main)


def serve_epoll(ls: socket.socket) -> None:
    ep, conns, buf = select.epoll(), {}, bytearray(64)
    ls.setblocking(False)
    ep.register(ls.fileno(), select.EPOLLIN)
    while True:
        for fd, _ in ep.poll():
            if fd == ls.fileno():
                sock, _ = ls.accept()
                sock.setblocking(False)
                _nodelay(sock)
                conns[sock.fileno()] = sock
                ep.register(sock.fileno(), select.EPOLLIN)
                continue
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                continue
            if n == 0:
                ep.unregister(fd)
                conns.pop(fd).close()
                continue
            os.writev(fd, [memoryview(buf)[:n]])


def serve_thread(ls: socket.socket) -> None:
    def handle(sock: socket.socket) -> None:
        buf = bytearray(64)
        with sock:
            while True:
                n = sock.recv_into(buf)
                if not n:
                    return
                sock.sendall(memoryview(buf)[:n])

    while True:
        sock, _ = ls.accept()
        _nodelay(sock)
        threading.Thread(target=handle, args=(sock,), daemon=True).start()


SERVERS = {"trio": serve_trio, "epoll": serve_epoll, "thread": serve_thread}


def client(port: int, requests: int, results) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    _nodelay(sock)
    buf = bytearray(64)
    t0 = time.perf_counter()
    for _ in range(requests):
        sock.sendall(REQUEST)
        got = 0
        while got < len(REQUEST):
            got += sock.recv_into(memoryview(buf)[got:])
    results.put(time.perf_counter() - t0)
    sock.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000, help="per client")
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--servers", default=",".join(SERVERS))
    args = ap.parse_args()
    ctx = mp.get_context("fork")
    print(f"{os.cpu_count()} CPUs; {args.requests} requests per client, one in flight each")
    print(f"{'server':7} {'clients':>7} {'req/s':>9} {'server CPU us/req':>18} {'mean latency us':>16}")
    for name in args.servers.split(","):
        ls = socket.create_server(("127.0.0.1", 0), backlog=64)
        port = ls.getsockname()[1]
        server = ctx.Process(target=SERVERS[name], args=(ls,), daemon=True)
        server.start()
        try:
            for n in (int(c) for c in args.clients.split(",")):
                results = ctx.Queue()
                procs = [ctx.Process(target=client, args=(port, args.requests, results)) for _ in range(n)]
                cpu0, t0 = sum(process_cpu(server.pid)), time.perf_counter()
                for p in procs:
                    p.start()
                times = [results.get(timeout=600) for _ in procs]
                wall = time.perf_counter() - t0
                for p in procs:
                    p.join()
                total = n * args.requests
                cpu = (sum(process_cpu(server.pid)) - cpu0) / total * 1e6
                print(f"{name:7} {n:>7} {total / wall:9.0f} {cpu:18.1f} {sum(times) / n / args.requests * 1e6:16.1f}",
                      flush=True)
        finally:
            server.kill()
            server.join()
            ls.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
