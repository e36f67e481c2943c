"""exec and port-forward through the node API into pods that have a
network of their own (issue 7 item 7): the real parent with pod networks
on a live Linux kernel (netns, veth, bridge, nftables), the real node API
server, the independent SPDY client.

Test-only names (netns pst-*, veths ts*, bridge pst0, nft table
pufflet_pst) and CIDR 10.248.0.0/24, distinct from test_podnet's and
test_net_linux's, so they can run beside them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

import imagetools
import streamenv
import test_pods_priv as tpp
from spdyclient import SpdyClient
from test_pods_priv import POD_A, POD_B, reaper  # noqa: F401 - a fixture

from pufflet import config
from pufflet.platform import linux_net as L
from pufflet.priv import netplan, podnet
from pufflet.priv.imagestore import Store
from pufflet.priv.pods import PodRuntime

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not shutil.which("ip"), reason="needs ip(8) (iproute2)"),
    pytest.mark.skipif(not shutil.which("nft"), reason="needs nft(8) (Debian: nftables)"),
]

NAMES = L.Names(netns_prefix="pst-", veth_prefix="ts", bridge="pst0", table="pufflet_pst")
CIDR, GATEWAY = "10.248.0.0/24", "10.248.0.1"


@pytest.fixture(scope="module")
def layers():
    return streamenv.tool_layer()


class NetPriv(tpp.Priv):
    """test_pods_priv's Priv, its runtime given pod networks with our names."""

    def __init__(self, cfg, store):
        net = podnet.PodNetworks(cfg.state_dir, cfg.pod_network.cidr,
                                 backend=podnet.LinuxBackend(names=NAMES, firewall="nft"))
        orig = tpp.PodRuntime
        tpp.PodRuntime = lambda c, s: PodRuntime(c, s, net=net)
        try:
            super().__init__(cfg, store)
        finally:
            tpp.PodRuntime = orig


@pytest.fixture
def node(tmp_path, layers):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cfg = config.parse(f'node name n\nuser "nobody"\nstate directory "{state}"\n'
                       f'log directory "{tmp_path / "log"}"\n'
                       f"pod uid range {tpp.UID_LO} {tpp.UID_HI}\npod network {CIDR}\n")
    store = Store(str(state / "images"))
    img = imagetools.add_image(store, "example.org/tools:1", [layers])
    env = tpp.Env(cfg, store, img.digest, None, None)
    forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    priv = NetPriv(cfg, store)
    env.privs.append(priv)
    n = None
    try:
        n = streamenv.Node(env, tmp_path, priv=priv)
        n.container(["sleep", "60"])
        yield n
    finally:
        if n is not None:
            n.close()
        env.close()
        node_ = L.Node(CIDR, GATEWAY, None, NAMES, "nft")
        L.sweep(node_, ())
        netplan.teardown(L.node_teardown(node_), L.runner())
        Path("/proc/sys/net/ipv4/ip_forward").write_text(forwarding)


def q(**kw):
    pairs = []
    for k, v in kw.items():
        pairs += [(k, x) for x in v] if isinstance(v, list) else [(k, v)]
    return urllib.parse.urlencode(pairs)


def pod_ip(node) -> str:
    pods = node.priv.call("ListPods", {}).body["pods"]
    return next(p["pod_ip"] for p in pods if p["pod_uid"] == POD_A)


def local_addresses(pid) -> set[str]:
    """The IPv4 addresses of the network namespace of pid: the entries of
    its fib_trie followed by a "/32 host LOCAL" leaf."""
    lines = Path(f"/proc/{pid}/net/fib_trie").read_text().splitlines()
    return {prev.split()[-1] for prev, line in zip(lines, lines[1:])
            if line.strip() == "/32 host LOCAL"}


def _is_sleep_of(pid: str, uid: int) -> bool:
    """Whether pid is our `sleep 30` as uid; processes of other tests come
    and go while /proc is read."""
    try:
        return (os.stat(f"/proc/{pid}").st_uid == uid
                and Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x0030\x00")
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_exec_runs_inside_the_pod(node):
    """The exec'd process is in the pod's netns (whose table holds the
    pod's address), chrooted in the pod root, as the pod's uid, with the
    container's env; seen from the host through /proc/<pid>."""
    ip = pod_ip(node)
    assert ip.startswith("10.248.0.")
    c = SpdyClient.connect(node.addr, ["v4.channel.k8s.io"], tls=node.client_tls,
                           path="/exec/default/web/c?" + q(
                               command=["sh", "-c", 'echo "$GREETING"; exec sleep 30'],
                               stdout="1"))
    s = {k: c.open({"streamtype": k}) for k in ("error", "stdout")}
    for st in s.values():
        c.wait_reply(st)
    assert c.wait(lambda: bytes(s["stdout"].data) == b"hello from the container env\n", 10)
    uid = node.env.uid_of[POD_A]
    pids = []
    deadline = time.monotonic() + 10
    while not pids:
        assert time.monotonic() < deadline
        pids = [p for p in os.listdir("/proc") if p.isdigit() and _is_sleep_of(p, uid)]
    pid = pids[0]
    pod_ns = os.stat(L.netns_path(NAMES.netns(POD_A))).st_ino
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == pod_ns != os.stat("/proc/self/ns/net").st_ino
    assert ip in local_addresses(pid) and ip not in local_addresses("self")
    assert os.readlink(f"/proc/{pid}/root") == str(node.env.root(POD_A))
    status = Path(f"/proc/{pid}/status").read_text()
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status
    c.close()               # the client leaves: the exec is hung up


def _server_in_netns(ns: str, port: int, tag: bytes, at_eof: bool = True) -> subprocess.Popen:
    """A server on 127.0.0.1:port inside ns: tag + what it got, after the
    client's EOF (at_eof) or at each read (WebSocket port-forward has no
    half-close)."""
    body = (" while (x:=c.recv(65536)): d+=x\n"
            f" c.sendall({tag!r}+d);c.close()") if at_eof else \
        (f" while (x:=c.recv(65536)): c.sendall({tag!r}+x)\n"
         " c.close()")
    srv = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c",
         "import socket\n"
         f"s=socket.create_server(('127.0.0.1',{port}));print('up',flush=True)\n"
         "while True:\n"
         " c,_=s.accept();d=b''\n" + body],
        stdout=subprocess.PIPE)
    assert srv.stdout.readline() == b"up\n"
    return srv


def _forward(node, pod: str, port: int, payload: bytes) -> tuple[bytes, bytes]:
    c = SpdyClient.connect(node.addr, ["portforward.k8s.io"], tls=node.client_tls,
                           path=f"/portForward/default/{pod}")
    assert c.status == 101
    h = {"port": str(port), "requestid": "0"}
    e = c.open({**h, "streamtype": "error"})
    d = c.open({**h, "streamtype": "data"})
    c.send(d, payload, fin=True)
    out = c.read_all(d, timeout=10), c.read_all(e, timeout=10)
    c.close()
    return out


def test_port_forward_dials_inside_the_pods_netns_and_host_network_on_the_host(node):
    """A server on 127.0.0.1:port inside the pod's netns answers; one on the
    host's 127.0.0.1 with the same port does not get the pod's traffic.  A
    hostNetwork pod's port-forward reaches the host's."""
    host = socket.create_server(("127.0.0.1", 0))
    port = host.getsockname()[1]
    host.settimeout(5)
    srv = _server_in_netns(NAMES.netns(POD_A), port, b"pod:")
    try:
        assert _forward(node, "web", port, b"hi" * 50000) == (b"pod:" + b"hi" * 50000, b"")
        # A hostNetwork pod has no netns: its port-forward is the host's.
        info = node.priv.call("CreatePod", {
            "pod_uid": POD_B, "namespace": "default", "name": "hostnet", "hostname": "h",
            "images": [node.env.img], "hosts": [], "resolv_conf": "", "host_network": True}).body
        node.env.uid_of[POD_B] = info["uid"]
        assert not info.get("pod_ip")
        node.mgr.add(POD_B, "default", "hostnet", "c",
                     {"container_id": "pufflet://x", "started_at": time.time()})
        import threading
        got = []

        def answer():
            conn, _ = host.accept()
            got.append(conn.recv(100))
            conn.sendall(b"host:" + got[0])
            conn.close()
        t = threading.Thread(target=answer)
        t.start()
        data, err = _forward(node, "hostnet", port, b"yo")
        t.join(5)
        assert (data, err, got) == (b"host:yo", b"", [b"yo"])
    finally:
        srv.kill()
        srv.wait()
        host.close()


def test_websocket_port_forward_into_the_pods_netns(node):
    """The kubernetes client's WebSocket port-forward reaches the server
    on the pod's loopback too."""
    from kubernetes.client import Configuration
    from kubernetes.stream import ws_client
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = _server_in_netns(NAMES.netns(POD_A), port, b"pod:", at_eof=False)
    try:
        cfg = Configuration()
        cfg.host = f"https://127.0.0.1:{node.addr[1]}"
        cfg.ssl_ca_cert = node.ca
        url = f"wss://127.0.0.1:{node.addr[1]}/portForward/default/web?ports={port}"
        ws = ws_client.create_websocket(cfg, url, {"sec-websocket-protocol": "v4.channel.k8s.io"})
        pf = ws_client.PortForward(ws, [port])
        sock = pf.socket(port)
        sock.settimeout(10)
        sock.sendall(b"over websocket")
        got = b""
        while len(got) < len(b"pod:over websocket"):
            d = sock.recv(100)
            if not d:
                break
            got += d
        assert got == b"pod:over websocket" and pf.error(port) is None
        pf.close()
    finally:
        srv.kill()
        srv.wait()
