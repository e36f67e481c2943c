"""Pod networks wired into the parent's pod runtime, on a live Linux
kernel: CreatePod gives the pod a netns and an address, container and
exec processes run inside it, hostPorts answer on the node, RemovePod
and a restart leave nothing behind.

Test-only names (netns ppt-*, veths tp*, bridge ppt0, nft table
pufflet_pnt) and the private CIDR 10.249.0.0/24 on that bridge: a
pufflet on this machine, and test_net_linux, are never touched.
Traffic is made from forked helpers that setns() into a pod's netns
(test_net_linux's in_ns and Server): the test image has no network
tools.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import imagetools
from pufflet import config
from pufflet.platform import linux_net as L
from pufflet.priv import netplan, podnet
from pufflet.priv.imagestore import Store
from pufflet.priv.pods import PodRuntime, kill_uid
from pufflet.priv.services import Services
from pufflet.privsep import spec as specmod
from pufflet.privsep.channel import Client, Server, Status
import test_net_linux
from test_net_linux import Server as NsServer, in_ns, talk
from test_pods_priv import _reap_all, _shell_layer, reaper  # noqa: F401 - a fixture

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not shutil.which("ip"), reason="needs ip(8) (iproute2)"),
    pytest.mark.skipif(not shutil.which("nft"), reason="needs nft(8) (Debian: nftables)"),
]

NAMES = L.Names(netns_prefix="ppt-", veth_prefix="tp", bridge="ppt0", table="pufflet_pnt")
CIDR, GATEWAY = "10.249.0.0/24", "10.249.0.1"
UID_LO, UID_HI = 3_291_000, 3_291_199
POD_A = "0a0a0a0a-0000-4000-8000-0000000000aa"
POD_B = "0b0b0b0b-0000-4000-8000-0000000000bb"
POD_H = "0c0c0c0c-0000-4000-8000-0000000000cc"
POD_GONE = "0d0d0d0d-0000-4000-8000-0000000000dd"
ALL = (POD_A, POD_B, POD_H, POD_GONE)


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True).stdout


def leftovers() -> list[str]:
    out = [n for n in sh("ip", "netns", "list").split() if n.startswith(NAMES.netns_prefix)]
    out += [line.split(":")[1].strip().split("@")[0]
            for line in sh("ip", "-o", "link", "show").splitlines()
            if line.split(":")[1].strip().startswith(NAMES.veth_prefix)]
    out += [line.strip() for line in sh("nft", "list", "table", "inet", NAMES.table)
            .splitlines() if "chain pod-" in line]
    return out


def wait_clean(timeout: float = 5.0) -> list[str]:
    end = time.monotonic() + timeout
    while (left := leftovers()) and time.monotonic() < end:
        time.sleep(0.02)
    return left


def backend() -> podnet.LinuxBackend:
    return podnet.LinuxBackend(names=NAMES, firewall="nft")


@pytest.fixture(scope="module")
def layers():
    return _shell_layer()


@pytest.fixture(autouse=True)
def helpers_reaped_by_anyone(monkeypatch):
    """The Priv loop reaps every child (waitpid(-1), as the Supervisor
    does), the traffic helpers included: their results come over pipes,
    so a helper already reaped is fine."""
    def reap(pid: int) -> None:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    monkeypatch.setattr(test_net_linux, "_reap", reap)


@pytest.fixture
def env(tmp_path, layers):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cfg = config.parse(f'node name n\nuser "nobody"\nstate directory "{state}"\n'
                       f'log directory "{tmp_path / "log"}"\n'
                       f"pod uid range {UID_LO} {UID_HI}\npod network {CIDR}\n")
    store = Store(str(state / "images"))
    img = imagetools.add_image(store, "example.org/shell:1", [layers])
    forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    e = Env(cfg, store, img.digest)
    try:
        yield e
    finally:
        for p in e.privs:
            p.stop()
        for uid in e.uids.values():
            kill_uid(uid, uid)
        _reap_all()
        node = L.Node(CIDR, GATEWAY, None, NAMES, "nft")
        L.sweep(node, ())
        netplan.teardown(L.node_teardown(node), L.runner())
        Path("/proc/sys/net/ipv4/ip_forward").write_text(forwarding)
        assert wait_clean() == []


class Env:
    def __init__(self, cfg, store, img):
        self.cfg, self.store, self.img = cfg, store, img
        self.privs: list[Priv] = []
        self.uids: dict[str, int] = {}

    def priv(self) -> "Priv":
        p = Priv(self.cfg, self.store)
        self.privs.append(p)
        return p

    def create(self, priv, pod, host_network=False, host_ports=(), resolv="", **kw):
        info = priv.call("CreatePod", {
            "pod_uid": pod, "namespace": "default", "name": "web", "hostname": "web",
            "images": [self.img], "hosts": [], "resolv_conf": resolv,
            "host_network": host_network, "own_names": ["web"],
            "host_ports": list(host_ports), **kw}).body
        self.uids[pod] = info["uid"]
        return info

    def root(self, pod) -> Path:
        return Path(self.cfg.state_dir, "pods", pod, "root")


class Priv:
    """Services + PodRuntime (with the test's network names) behind a real
    Server, on a thread, as in test_pods_priv."""

    def __init__(self, cfg, store):
        sp = specmod.load()
        net = podnet.PodNetworks(cfg.state_dir, cfg.pod_network.cidr, backend=backend())
        self.runtime = PodRuntime(cfg, lambda: store, net=net)
        self.runtime.logger.connect()
        a, b = socket.socketpair()
        self.server = Server(b, sp, Services(cfg, sp, self.runtime).table(),
                             logging.getLogger("test.priv"))
        self.runtime.waker = self.server.wake
        self.runtime.reaper = lambda: _reap_all(self.runtime)
        self.client = Client(a, sp)
        self._stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        self.call("Handshake", {"spec_version": sp.version, "spec_digest": sp.digest,
                                "agent_version": "test"})

    def _loop(self):
        p = select.poll()
        p.register(self.server.fileno(), select.POLLIN)
        p.register(self.runtime.fileno(), select.POLLIN)
        while not self._stop:
            ready = dict(p.poll(0 if self.server.busy() else 20))
            _reap_all(self.runtime)
            if self.runtime.fileno() in ready:
                self.runtime.poll()
            if self.server.fileno() in ready:
                if not self.server.on_readable():
                    break
            elif not self.server.on_idle():
                break

    def call(self, method, body):
        return self.client.call(method, body, timeout=20)

    def start(self, pod, argv, env):
        return self.call("StartContainer", {
            "pod_uid": pod, "name": "c", "restart_count": 0, "image": env.img,
            "argv": list(argv), "env": ["PATH=/bin"], "working_dir": "/", "mounts": [],
            "limits": {}, "stdin": False, "tty": False}).body

    def stop(self):
        if self._stop:
            return
        self._stop = True
        self.thread.join(5)
        self.client.close()
        self.server.close()
        loggers = self.runtime.logger.pid
        self.runtime.close()
        if loggers:
            try:
                os.kill(loggers, 15)
                os.waitpid(loggers, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def netns_ino(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def table(env) -> dict:
    return json.loads(Path(env.cfg.state_dir, podnet.TABLE).read_text())


# ---- tests ------------------------------------------------------------------

def test_pods_get_addresses_namespaces_and_reach_each_other(env):
    p = env.priv()
    a = env.create(p, POD_A, host_ports=[{"host_port": 18080, "container_port": 8080,
                                          "protocol": "TCP"}])
    b = env.create(p, POD_B)
    ip_a, ip_b = a["pod_ip"], b["pod_ip"]
    assert ip_a.startswith("10.249.0.") and ip_b.startswith("10.249.0.")
    assert len({ip_a, ip_b, GATEWAY}) == 3
    assert {x["pod_uid"]: x["pod_ip"] for x in p.call("ListPods", {}).body["pods"]} == \
        {POD_A: ip_a, POD_B: ip_b}
    assert set(table(env)["pods"]) == {POD_A, POD_B}
    # /etc/hosts names the pod by its own address.
    assert f"{ip_a}\tweb" in (env.root(POD_A) / "etc" / "hosts").read_text()

    # The container process, and an exec, run in the pod's netns.
    ns_a = NAMES.netns(POD_A)
    pid = p.start(POD_A, ["sleep", "30"], env)["pid"]
    assert netns_ino(pid) == os.stat(L.netns_path(ns_a)).st_ino != netns_ino("self")
    ex = p.client.call("StartExec", {"pod_uid": POD_A, "name": "c", "argv": ["sleep", "30"],
                                     "env": ["PATH=/bin"], "working_dir": "/",
                                     "tty": False}, timeout=20)
    for fd in ex.fds:
        os.close(fd)
    assert netns_ino(ex.body["pid"]) == os.stat(L.netns_path(ns_a)).st_ino
    # What port-forward uses: the runtime's entry, in a forked child.
    assert in_ns(None, lambda: (p.runtime.enter_pod_network(POD_A),
                                netns_ino("self"))[1]) == netns_ino(pid)

    # Pod to pod by address: a server in B, a client in A.
    srv = NsServer(NAMES.netns(POD_B), ip_b, 9000)
    assert talk(ns_a, ip_b, 9000) == b"ping"
    assert srv.peer() == ip_a
    # The hostPort, from the host, on the node's (gateway) address.
    srv = NsServer(ns_a, "0.0.0.0", 8080)
    assert talk(None, GATEWAY, 18080) == b"ping"
    srv.peer()

    # RemovePod: nothing left, addresses released.
    for pod in (POD_A, POD_B):
        p.call("RemovePod", {"pod_uid": pod})
    assert wait_clean() == []
    assert table(env)["pods"] == {}
    assert not (Path(env.cfg.state_dir) / "pods" / POD_A).exists()


def test_host_network_pod_has_no_netns(env):
    p = env.priv()
    before = leftovers()
    info = env.create(p, POD_H, host_network=True,
                      host_ports=[{"host_port": 18081, "container_port": 8081,
                                   "protocol": "TCP"}])
    assert info["pod_ip"] == ""
    assert leftovers() == before
    pid = p.start(POD_H, ["sleep", "30"], env)["pid"]
    assert netns_ino(pid) == netns_ino("self")
    assert "127.0.0.1\tweb" in (env.root(POD_H) / "etc" / "hosts").read_text()
    p.call("RemovePod", {"pod_uid": POD_H})


def test_restart_sweeps_networks_of_gone_pods(env):
    p = env.priv()
    env.create(p, POD_A)
    p.stop()
    # A crash between the network plan and pods.json: an allocation and a
    # netns for a pod the runtime never recorded.
    net = podnet.PodNetworks(env.cfg.state_dir, CIDR, backend=backend())
    net.setup(POD_GONE, None)
    assert os.path.exists(L.netns_path(NAMES.netns(POD_GONE)))
    p2 = env.priv()
    assert not os.path.exists(L.netns_path(NAMES.netns(POD_GONE)))
    assert set(table(env)["pods"]) == {POD_A}
    assert os.path.exists(L.netns_path(NAMES.netns(POD_A)))     # a live pod keeps its own
    p2.call("RemovePod", {"pod_uid": POD_A})
    assert wait_clean() == []


def test_failed_setup_rolls_back_everything(env):
    p = env.priv()
    veth = NAMES.veth(POD_B)
    # Something in the way of the veth: the plan fails at its second step.
    subprocess.run(("ip", "link", "add", veth, "type", "bridge"), check=True)
    try:
        with pytest.raises(Status) as e:
            env.create(p, POD_B)
        assert e.value.code == "UNAVAILABLE" and "File exists" in e.value.message
        assert not os.path.exists(L.netns_path(NAMES.netns(POD_B)))
        assert table(env)["pods"] == {}
        assert not (Path(env.cfg.state_dir) / "pods" / POD_B).exists()
        assert json.loads(Path(env.cfg.state_dir, "uids.json").read_text())["pods"] == {}
    finally:
        subprocess.run(("ip", "link", "del", veth), capture_output=True)


def test_resolv_conf_written_into_the_pod_root(env):
    from pufflet.agent import dns
    pod = {"metadata": {"namespace": "shop"}, "spec": {}}
    text, events = dns.resolv_conf(pod, ["10.96.0.10"], "cluster.local", "")
    assert events == []
    p = env.priv()
    env.create(p, POD_A, resolv=text)
    assert (env.root(POD_A) / "etc" / "resolv.conf").read_text() == (
        "nameserver 10.96.0.10\n"
        "search shop.svc.cluster.local svc.cluster.local cluster.local\n"
        "options ndots:5\n")
    p.call("RemovePod", {"pod_uid": POD_A})


@pytest.mark.parametrize("after", [0, 1, 2, 4])
def test_crash_halfway_through_create_is_cleaned_on_restart(env, after):
    """The parent dies in CreatePod's network setup, `after` steps into the
    pod's plan (0: the allocation is written, nothing made yet): the next
    start releases the allocation and removes what was made, and a live
    pod keeps its own."""
    p = env.priv()
    env.create(p, POD_A)
    p.stop()
    pid = os.fork()
    if pid == 0:
        try:
            net = podnet.PodNetworks(env.cfg.state_dir, CIDR, backend=backend())
            real, n = net.backend.run, 0

            def run(step):
                nonlocal n
                if n == after:
                    os._exit(9)         # no rollback: the process is gone
                real(step)
                n += 1
            net.backend.run = run
            net.setup(POD_GONE, None, [netplan.HostPort(18090, 80)])
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    assert POD_GONE in table(env)["pods"]
    made = os.path.exists(L.netns_path(NAMES.netns(POD_GONE)))
    assert made == (after >= 1)
    p2 = env.priv()
    assert set(table(env)["pods"]) == {POD_A}
    assert not os.path.exists(L.netns_path(NAMES.netns(POD_GONE)))
    assert NAMES.veth(POD_GONE) not in sh("ip", "-o", "link", "show")
    assert os.path.exists(L.netns_path(NAMES.netns(POD_A)))
    # The released address goes to the next pod; nothing stands in its way.
    env.create(p2, POD_B)
    p2.call("RemovePod", {"pod_uid": POD_B})
    p2.call("RemovePod", {"pod_uid": POD_A})
    assert wait_clean() == []
