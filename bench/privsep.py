"""Benchmark: validated Ping round trips through the privsep channel.

The server runs in a forked child, as the priv does.  A naive baseline is
measured in the same run on the same topology: msgpack with a 4-byte length
prefix, no validation, no fds, no threads.  Prints rates and their ratio
(target >= 0.7), best of 3 runs each; on a machine with several CPUs, once
with both processes on one CPU and once free to spread (see main()).
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


def compare() -> tuple[float, float]:
    """Best of RUNS for each, interleaved so drift hits both alike."""
    naive, privsep = [], []
    for _ in range(RUNS):
        naive.append(naive_run())
        privsep.append(privsep_run())
    return max(privsep), max(naive)


def line(label: str, p: float, n: float) -> str:
    return (f"{label}privsep_rtt_per_s={p:.0f} naive_rtt_per_s={n:.0f} "
            f"ratio={p / n:.2f}")


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages count once across processes."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for row in f:
            if row.startswith("Pss:"):
                return int(row.split()[1])
    raise RuntimeError("no Pss in smaps_rollup")


def idle_pss() -> tuple[float, float]:
    """Start the real daemon (standalone, user nobody), let it settle, and
    read the PSS of the priv and of the agent."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "pufflet.conf")
        with open(cfg, "w") as f:
            f.write(f'user "nobody"\nstate directory "{tmp}/state"\n'
                    f'log directory "{tmp}/log"\nnode name "bench"\n')
        proc = subprocess.Popen([sys.executable, "-m", "pufflet", "-d", "-f", cfg],
                                stderr=subprocess.PIPE, text=True,
                                cwd=os.path.join(os.path.dirname(__file__), ".."))
        try:
            for row in proc.stderr:
                if "agent ready" in row:
                    break
            time.sleep(1.0)
            kids = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
            return pss_kib(proc.pid) / 1024, pss_kib(int(kids[0])) / 1024
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> int:
    spec.load()
    if os.geteuid() == 0 and os.path.exists("/proc/self/smaps_rollup"):
        priv, agent = idle_pss()
        print(f"priv_pss_mib={priv:.1f} agent_pss_mib={agent:.1f} "
              f"(idle, standalone; target priv <= 20)")
    print(f"# best of {RUNS} runs of {CALLS} Ping calls, {len(PAYLOAD)}-byte "
          f"payload, server in a forked child; target ratio >= 0.7")
    allowed = (os.sched_getaffinity(0)
               if hasattr(os, "sched_getaffinity") else set())
    if len(allowed) > 1:
        # Both processes on one CPU: the ratio of CPU cost per round trip.
        # Spread over CPUs, each round trip also pays two cross-CPU wakeups,
        # whose cost on a VM (an idle vCPU halts; waking it is an IPI
        # through the hypervisor) grows with the time the peer has been
        # asleep, and so magnifies every microsecond of work several times.
        os.sched_setaffinity(0, {min(allowed)})
        print(line("", *compare()) + "  (one CPU)")
        os.sched_setaffinity(0, allowed)
        print(line("", *compare()) + f"  ({len(allowed)} CPUs)")
    else:
        print(line("", *compare()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
