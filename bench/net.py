"""Benchmark: pod network setup and teardown on Linux, and what the bridge
costs in throughput.

- 100 pods' networks (netns, veth, bridge port, addresses, routes; one in
  four with a hostPort, so nftables is in it too) set up one by one, then
  torn down one by one, with the plans and runner pufflet uses.  Prints the
  mean and worst per pod (target: <= 50 ms each), then waits for the
  kernel to finish destroying the namespaces and checks nothing is left.
- TCP throughput from one pod to another through the bridge, against the
  host's loopback in the same run, as a ratio (each: best of 3, 1 s).

Needs root, ip(8) and nft(8) (or iptables).  Uses test-only names
(netns pfb-*, veths bv*, bridge pfb0, table pufflet_bench) and
10.251.0.0/24, and removes everything at the end, even on failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pufflet.platform import linux_net as L  # noqa: E402
from pufflet.priv import netplan  # noqa: E402
from pufflet.priv.netplan import HostPort, PodNet  # noqa: E402

PODS = 100
NAMES = L.Names(netns_prefix="pfb-", veth_prefix="bv", bridge="pfb0", table="pufflet_bench")
CIDR, GATEWAY = "10.251.0.0/24", "10.251.0.1"
SECONDS = 1.0
RUNS = 3
CHUNK = 1 << 17


def pod(i: int) -> PodNet:
    hp = (HostPort(19000 + i, 80),) if i % 4 == 0 else ()
    return PodNet(f"{i:08x}-be9c-4000-8000-{i:012x}", f"10.251.0.{i + 1}", 24,
                  GATEWAY, i, hp)


def leftovers() -> list[str]:
    out = subprocess.run(("ip", "netns", "list"), capture_output=True, text=True).stdout
    found = [n for n in out.split() if n.startswith(NAMES.netns_prefix)]
    links = subprocess.run(("ip", "-o", "link"), capture_output=True, text=True).stdout
    found += [l.split(":")[1].strip() for l in links.splitlines()
              if l.split(":")[1].strip().startswith(NAMES.veth_prefix)]
    return found


def setup_teardown(node: L.Node) -> None:
    run = L.runner()
    pods = [pod(i) for i in range(2, PODS + 2)]
    up, down = [], []
    for p in pods:
        t = time.perf_counter()
        netplan.apply(L.pod_plan(node, p), run)
        up.append(time.perf_counter() - t)
    for p in pods:
        t = time.perf_counter()
        errors = netplan.teardown(L.pod_teardown(node, p.pod_uid, bool(p.host_ports)), run)
        down.append(time.perf_counter() - t)
        assert not errors, errors
    t = time.perf_counter()
    while leftovers() and time.perf_counter() - t < 30:
        time.sleep(0.01)
    settle = time.perf_counter() - t
    left = leftovers()
    ms = lambda xs: f"mean {sum(xs) / len(xs) * 1000:5.1f} ms, worst {max(xs) * 1000:5.1f} ms"
    print(f"{PODS} pods ({sum(1 for p in pods if p.host_ports)} with a hostPort, "
          f"firewall {node.firewall})")
    print(f"  setup    per pod: {ms(up)}")
    print(f"  teardown per pod: {ms(down)}")
    print(f"  kernel finished destroying the namespaces {settle * 1000:.0f} ms later; "
          f"left over: {left or 'nothing'}")


# ---- throughput ------------------------------------------------------------------

def _sink(ns: str | None, host: str, port: int, ready_w: int, result_w: int) -> None:
    """Child: receive for one connection, report bytes/s."""
    if ns:
        L.enter_netns(ns)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(1)
    os.write(ready_w, b"R")
    c, _ = s.accept()
    n, t0 = 0, time.perf_counter()
    buf = bytearray(CHUNK)
    while (k := c.recv_into(buf)):
        n += k
    os.write(result_w, f"{n / (time.perf_counter() - t0)}".encode())


def _source(ns: str | None, host: str, port: int) -> None:
    if ns:
        L.enter_netns(ns)
    data = b"\0" * CHUNK
    with socket.create_connection((host, port)) as s:
        end = time.perf_counter() + SECONDS
        while time.perf_counter() < end:
            s.sendall(data)


def _fork(fn, *args) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
        finally:
            os._exit(0)
    return pid


def throughput(src_ns: str | None, dst_ns: str | None, host: str, port: int) -> float:
    ready_r, ready_w = os.pipe()
    res_r, res_w = os.pipe()
    sink = _fork(_sink, dst_ns, host, port, ready_w, res_w)
    os.close(ready_w)
    os.close(res_w)
    assert os.read(ready_r, 1) == b"R"
    src = _fork(_source, src_ns, host, port)
    os.waitpid(src, 0)
    rate = float(os.read(res_r, 64) or 0)
    os.waitpid(sink, 0)
    for fd in (ready_r, res_r):
        os.close(fd)
    return rate


def bandwidth(node: L.Node) -> None:
    run = L.runner()
    a, b = pod(2), pod(3)
    for p in (a, b):
        netplan.apply(L.pod_plan(node, p), run)
    try:
        na, nb = NAMES.netns(a.pod_uid), NAMES.netns(b.pod_uid)
        bridge = max(throughput(nb, na, a.ip, 7100 + i) for i in range(RUNS))
        loop = max(throughput(None, None, "127.0.0.1", 7200 + i) for i in range(RUNS))
        inpod = max(throughput(na, na, "127.0.0.1", 7300 + i) for i in range(RUNS))
    finally:
        for p in (a, b):
            netplan.teardown(L.pod_teardown(node, p.pod_uid, bool(p.host_ports)), run)
    gb = lambda r: f"{r * 8 / 1e9:6.2f} Gbit/s"
    print("TCP throughput, one connection, best of "
          f"{RUNS} x {SECONDS:.0f} s:")
    print(f"  pod -> pod through the bridge: {gb(bridge)}")
    print(f"  host loopback:                 {gb(loop)}")
    print(f"  loopback inside a pod:         {gb(inpod)}")
    print(f"  bridge / host loopback = {bridge / loop:.2f}")


def main() -> int:
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 1
    node = L.Node(CIDR, GATEWAY, None, NAMES, L.pick_firewall())
    run = L.runner()
    forwarding = open("/proc/sys/net/ipv4/ip_forward").read().strip()
    try:
        L.sweep(node, ())
        netplan.apply(L.node_plan(node), run)
        setup_teardown(node)
        bandwidth(node)
    finally:
        L.sweep(node, ())
        netplan.teardown(L.node_teardown(node), run)
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write(forwarding + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
