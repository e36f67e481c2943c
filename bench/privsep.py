"""Benchmark: validated Ping round trips through the privsep channel.

The server runs in a forked child, as the priv does.  A naive baseline is
measured in the same run on the same topology: msgpack with a 4-byte length
prefix, no validation, no fds, no threads.  Prints rates and their ratio
(target >= 0.7), best of 3 runs each.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))

import msgpack  # noqa: E402

from pufflet.privsep import channel, spec  # noqa: E402

CALLS = 20000
WARMUP = 2000
RUNS = 3
PAYLOAD = b"x" * 64
LEN = struct.Struct(">I")


def fork_server(serve) -> tuple[socket.socket, int]:
    """Run serve(sock) in a child; returns the parent's end and the pid."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        parent.close()
        try:
            serve(child)
        finally:
            os._exit(0)
    child.close()
    return parent, pid


def privsep_serve(sock: socket.socket) -> None:
    log = logging.getLogger("bench")
    channel.Server(sock, spec.load(), {"Ping": lambda body, fds: body},
                   log).serve_forever()


def privsep_run() -> float:
    sock, pid = fork_server(privsep_serve)
    client = channel.Client(sock, spec.load())
    call = client.call
    for i in range(WARMUP):
        call("Ping", {"seq": i, "payload": PAYLOAD})
    t0 = time.perf_counter()
    for i in range(CALLS):
        r = call("Ping", {"seq": i, "payload": PAYLOAD})
    dt = time.perf_counter() - t0
    assert r.body["seq"] == CALLS - 1
    client.close()
    os.waitpid(pid, 0)
    return CALLS / dt


def naive_recv(sock: socket.socket, buf: bytearray) -> object:
    """One length-prefixed msgpack object; usually a single recv."""
    while True:
        if len(buf) >= 4:
            n = LEN.unpack_from(buf)[0]
            if len(buf) >= 4 + n:
                obj = msgpack.unpackb(buf[4:4 + n])
                del buf[:4 + n]
                return obj
        data = sock.recv(65536)
        if not data:
            raise EOFError
        buf += data


def naive_serve(sock: socket.socket) -> None:
    buf = bytearray()
    while True:
        try:
            req = naive_recv(sock, buf)
        except EOFError:
            return
        out = msgpack.packb({"id": req["id"], "code": "OK", "message": "",
                             "body": req["body"]})
        sock.sendall(LEN.pack(len(out)) + out)


def naive_run() -> float:
    sock, pid = fork_server(naive_serve)
    buf = bytearray()

    def call(i: int) -> object:
        out = msgpack.packb({"id": i + 1, "method": "Ping",
                             "body": {"seq": i, "payload": PAYLOAD}})
        sock.sendall(LEN.pack(len(out)) + out)
        return naive_recv(sock, buf)

    for i in range(WARMUP):
        call(i)
    t0 = time.perf_counter()
    for i in range(CALLS):
        r = call(i)
    dt = time.perf_counter() - t0
    assert r["body"]["seq"] == CALLS - 1
    sock.close()
    os.waitpid(pid, 0)
    return CALLS / dt


def main() -> int:
    spec.load()
    naive, privsep = [], []
    for _ in range(RUNS):           # interleaved, so drift hits both alike
        naive.append(naive_run())
        privsep.append(privsep_run())
    p, n = max(privsep), max(naive)
    print(f"privsep_rtt_per_s={p:.0f} naive_rtt_per_s={n:.0f} "
          f"ratio={p / n:.2f}")
    print(f"(best of {RUNS} runs of {CALLS} Ping calls, {len(PAYLOAD)}-byte "
          f"payload, server in a forked child; target ratio >= 0.7)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
