"""Benchmark: the node API's exec and logs -f against plain pipes.

The whole stack of the tests (tests/streamenv.py): the real parent with a
real pod, the agent's Runtime, the node API server over TLS on loopback.

exec round trip: `cat` exec'd in the pod; N small messages written to its
stdin one at a time, each awaited on stdout before the next (as typing in
a shell), over SPDY (tests/spdyclient.py, as client-go) and WebSocket v5
(websocket-client), each client in a process of its own.  Baseline: the same cat(1) behind a local TCP socket
(ratios are to it); a cat on plain pipes is printed too.

logs -f: a container cat(1)s a file of 80-byte lines as fast as it can;
GET /containerLogs?follow=true is read until all of it came out (through
the logger, its CRI file, the reader and chunked HTTPS).  Baseline: the
same cat into a plain pipe, read by us.

Needs root (pod uids, chroot).   python3 bench/nodeapi.py [messages] [MiB]
"""

from __future__ import annotations

import ctypes
import hashlib
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import imagetools  # noqa: E402
import streamenv  # noqa: E402
import test_pods_priv as tpp  # noqa: E402
import websocket  # noqa: E402
from spdyclient import SpdyClient  # noqa: E402

from pufflet import config  # noqa: E402
from pufflet.nodeapi import logs as nodelogs, pods as nodepods  # noqa: E402
from pufflet.priv.imagestore import Store  # noqa: E402

MSG = b"x" * 63 + b"\n"


def env_in(tmp: Path):
    state = tmp / "state"
    state.mkdir(mode=0o700)
    cfg = config.parse(f'node name n\nuser "nobody"\nstate directory "{state}"\n'
                       f'log directory "{tmp / "log"}"\n'
                       f"pod uid range {tpp.UID_LO} {tpp.UID_HI}\n")
    store = Store(str(state / "images"))
    img = imagetools.add_image(store, "example.org/tools:1", [streamenv.tool_layer()])
    return tpp.Env(cfg, store, img.digest, None, None)


def q(**kw) -> str:
    pairs = []
    for k, v in kw.items():
        pairs += [(k, x) for x in v] if isinstance(v, list) else [(k, v)]
    return urllib.parse.urlencode(pairs)


def rtt_pipe(n: int) -> float:
    p = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    t0 = time.perf_counter()
    for _ in range(n):
        os.write(p.stdin.fileno(), MSG)
        got = 0
        while got < len(MSG):
            got += len(os.read(p.stdout.fileno(), 65536))
    t = (time.perf_counter() - t0) / n
    p.stdin.close()
    p.wait()
    return t


def rtt_socket(n: int) -> float:
    """The same cat(1), its stdin and stdout a TCP connection on loopback
    (TCP_NODELAY, as ours): what any network round trip costs here."""
    ls = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    ls.close()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    p = subprocess.Popen(["cat"], stdin=s, stdout=s)
    s.close()
    t0 = time.perf_counter()
    for _ in range(n):
        c.sendall(MSG)
        got = 0
        while got < len(MSG):
            got += len(c.recv(65536))
    t = (time.perf_counter() - t0) / n
    c.close()
    p.wait()
    return t


def rtt_spdy(node, n: int) -> float:
    c = SpdyClient.connect(node.addr, ["v4.channel.k8s.io"], tls=node.client_tls,
                           path="/exec/default/web/c?" + q(command="cat", stdin="1", stdout="1"))
    # As client-go: Go sets TCP_NODELAY on every connection.  Without it,
    # Nagle holds our stdin frame behind our own WINDOW_UPDATE until the
    # server's delayed ACK (~40 ms a message).
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s = {k: c.open({"streamtype": k}) for k in ("error", "stdin", "stdout")}
    for st in s.values():
        c.wait_reply(st)
    out = s["stdout"]
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        c.send(s["stdin"], MSG)
        with c.cond:
            while len(out.data) < i * len(MSG):
                c.cond.wait()
    t = (time.perf_counter() - t0) / n
    c.send(s["stdin"], b"", fin=True)
    c.read_all(s["error"])
    c.close()
    return t


def rtt_ws(node, n: int) -> float:
    ws = websocket.create_connection(
        f"wss://127.0.0.1:{node.addr[1]}/exec/default/web/c?" + q(command="cat", stdin="1",
                                                                  stdout="1"),
        subprotocols=["v5.channel.k8s.io"], sslopt={"ca_certs": node.ca})
    ws.recv()                                   # the "streams are up" message
    t0 = time.perf_counter()
    for _ in range(n):
        ws.send_binary(b"\x00" + MSG)
        got = 0
        while got < len(MSG):
            m = ws.recv()
            if m and m[0] == 1:
                got += len(m) - 1
    t = (time.perf_counter() - t0) / n
    ws.send_binary(b"\xff\x00")                 # v5: close stdin
    while ws.recv():
        pass
    ws.close()
    return t


class Remote:
    """What the exec clients need of a node: enough to run in a process of
    their own, as kubectl or the API server does (in ours, the client's
    threads would compete with the server's for one GIL)."""

    def __init__(self, port: int, ca: str) -> None:
        self.addr = ("127.0.0.1", port)
        self.ca = ca
        self.client_tls = ssl.create_default_context(cafile=ca)


def rtt_in_process(kind: str, node, n: int) -> float:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--client", kind,
                          str(node.addr[1]), node.ca, str(n)],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        sys.exit(f"{kind} client failed: {out.stderr.strip()}")
    return float(out.stdout)


def client_main(kind: str, port: str, ca: str, n: str) -> None:
    fn = {"spdy": rtt_spdy, "ws": rtt_ws}[kind]
    print(fn(Remote(int(port), ca), int(n)))


def follow_logs(node, size: int, big: str, want: str) -> float:
    # It stays up after the cat: a follow ends with the run, and the
    # logger may still be draining the pipe when the exit is seen.
    st = node.container(["sh", "-c", f"cat {big}; sleep 600"], name="writer")
    t0 = time.perf_counter()
    conn = http.client.HTTPSConnection("127.0.0.1", node.addr[1], context=node.client_tls)
    conn.request("GET", "/containerLogs/default/web/writer?follow=true")
    r = conn.getresponse()
    assert r.status == 200, r.read()
    got = 0
    digest = hashlib.sha256()
    while got < size:
        d = r.read1(1 << 20)
        if not d:
            break
        got += len(d)
        digest.update(d)
    t = time.perf_counter() - t0
    conn.close()
    # Every byte once, in order: a throughput figure of wrong output is
    # worth nothing (rotation once made a follower read files twice).
    if got != size or digest.hexdigest() != want:
        sys.exit(f"logs -f gave {got} bytes for {size} written, "
                 f"{'not ' if digest.hexdigest() != want else ''}the same "
                 f"({st['container_id'][:20]}...)")
    return t


def cat_pipe(path: str, size: int) -> float:
    t0 = time.perf_counter()
    p = subprocess.Popen(["cat", path], stdout=subprocess.PIPE, bufsize=0)
    got = 0
    while d := os.read(p.stdout.fileno(), 1 << 20):
        got += len(d)
    p.wait()
    assert got == size
    return time.perf_counter() - t0


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    ctypes.CDLL(None).prctl(tpp.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    tmp = Path(tempfile.mkdtemp(prefix="pufflet-bench-"))
    env = env_in(tmp)
    node = None
    try:
        node = streamenv.Node(env, tmp)
        lookup, listing = nodepods.from_manager(node.mgr)
        nodelogs.add_routes(node.server, os.path.join(env.cfg.log_dir, "pods"), lookup)
        node.container(["sleep", "600"])

        pipe_t = min(rtt_pipe(n) for _ in range(3))
        base = min(rtt_socket(n) for _ in range(3))
        spdy_t = min(rtt_in_process("spdy", node, n) for _ in range(3))
        ws_t = min(rtt_in_process("ws", node, n) for _ in range(3))
        print(f"exec round trip, {n} x {len(MSG)} B, best of 3 (ratio to the local socket):")
        print(f"  plain pipe (cat)      {pipe_t * 1e6:8.1f} us")
        print(f"  local TCP socket (cat){base * 1e6:8.1f} us   x1")
        print(f"  SPDY/3.1 over TLS     {spdy_t * 1e6:8.1f} us   x{spdy_t / base:.1f}")
        print(f"  WebSocket v5 over TLS {ws_t * 1e6:8.1f} us   x{ws_t / base:.1f}")

        line = b"y" * 79 + b"\n"
        size = (mib << 20) // len(line) * len(line)
        big = env.root(tpp.POD_A) / "tmp" / "big"
        big.write_bytes(line * (size // len(line)))
        base = cat_pipe(str(big), size)
        t = follow_logs(node, size, "/tmp/big", hashlib.sha256(big.read_bytes()).hexdigest())
        print(f"logs -f, {size >> 20} MiB of 80-byte lines:")
        print(f"  plain pipe (cat)     {size / base / 2**20:8.1f} MiB/s")
        print(f"  /containerLogs -f    {size / t / 2**20:8.1f} MiB/s   x{base / t:.3f} of the pipe")
    finally:
        if node is not None:
            node.close()
        env.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        client_main(*sys.argv[2:6])
    else:
        main()
