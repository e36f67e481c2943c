"""Pod networks through the whole daemon: `pufflet -d` (both halves, the
agent unprivileged and sandboxed) against the API emulator, with the pod
CIDR taken from node.spec.podCIDR as the controller manager sets it, and
'pod routes' to another node's podCIDR.

The pod gets an address of that CIDR in its own network namespace and
status.podIP/podIPs say so.  When the Node is registered again with
another podCIDR while the pod holds an address, a new pod is refused with
a clear reason and the running pod keeps its address and network.

This is pufflet's real naming (bridge pufflet0, netns pufflet-*, nft table
inet pufflet) on 10.247.0.0/24 and 10.247.1.0/24: no other test creates
those, and everything is removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

import imagetools
from apiserver import ApiServer
from daemon import Daemon, wait_until, write_config
from pufflet.agent import kube
from pufflet.platform import linux_net as L
from pufflet.priv import netplan
from pufflet.priv.imagestore import Store
from test_pods_priv import _shell_layer

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                       reason="needs Linux and root"),
    pytest.mark.skipif(not shutil.which("ip") or not shutil.which("nft"),
                       reason="needs ip(8) and nft(8)"),
]

CIDR, CIDR2 = "10.247.0.0/24", "10.247.1.0/24"
UID_LO = 3_292_000
IMAGE = "local/shell:1"
LINK = "pfrd0"


def pod(name: str) -> dict:
    return {"metadata": {"name": name},
            "spec": {"nodeName": "test-node", "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": IMAGE,
                                     "imagePullPolicy": "Never",
                                     "command": ["/bin/sleep", "3600"]}]}}


def netns_ino(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def pids_of_uid(uid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    out.append(int(d))
            except FileNotFoundError:
                pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pod_ip_from_the_node_pod_cidr_end_to_end(public_tmp):
    state = public_tmp / "state"
    state.mkdir(mode=0o700)
    store = Store(str(state / "images"))
    imagetools.add_image(store, IMAGE, [_shell_layer()])
    store.close()
    api = ApiServer(public_tmp / "api", bookmark_interval=0.5).start()
    admin = kube.api_client(kube.load_kubeconfig(str(api.kubeconfig("admin"))))
    from kubernetes import client as k8s
    core = k8s.CoreV1Api(admin)
    kc = api.kubeconfig("system:node:test-node")
    cfg = write_config(public_tmp, f'kubeconfig "{kc}"\npod network from node\n'
                                   f"pod uid range {UID_LO} {UID_LO + 99}\nmax pods 10\n"
                                   f"listen on 127.0.0.1 port {free_port()}\n"
                                   "pod routes 10.247.0.0/16\n")
    # Another node, on a link of this host (a veth pair, TEST-NET-3), that
    # 'pod routes' routes to; the node may list Nodes (RBAC).
    subprocess.run(("ip", "link", "add", LINK, "type", "veth", "peer", "name", LINK + "p"),
                   check=True)
    subprocess.run(("ip", "addr", "add", "203.0.113.1/24", "dev", LINK), check=True)
    subprocess.run(("ip", "link", "set", LINK, "up"), check=True)
    subprocess.run(("ip", "link", "set", LINK + "p", "up"), check=True)
    api.allow("group:system:nodes", "list", "nodes")
    api.allow("group:system:nodes", "watch", "nodes")
    other = json.loads(core.create_node(
        {"metadata": {"name": "other"},
         "spec": {"podCIDR": "10.247.9.0/24", "podCIDRs": ["10.247.9.0/24"]}},
        _preload_content=False).data)
    other["status"] = {"addresses": [{"type": "InternalIP", "address": "203.0.113.9"}]}
    core.replace_node_status("other", other, _preload_content=False)
    forwarding = open("/proc/sys/net/ipv4/ip_forward").read()
    d = Daemon(cfg)

    def get(name):
        return json.loads(core.read_namespaced_pod(name, "default",
                                                   _preload_content=False).data)

    def set_pod_cidr(cidr):
        # The controller manager's node IPAM, once the Node exists.
        assert wait_until(lambda: core.list_node(_preload_content=False).data.count(
            b'"test-node"') > 0, 10), "\n".join(d.lines)
        core.patch_node("test-node", {"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}},
                        _preload_content=False)

    try:
        set_pod_cidr(CIDR)
        core.create_namespaced_pod("default", pod("web"), _preload_content=False)
        assert wait_until(lambda: get("web")["status"].get("phase") == "Running"
                          and get("web")["status"].get("podIP"), 20), \
            json.dumps(get("web")["status"]) + "\n".join(d.lines)
        st = get("web")["status"]
        ip = st["podIP"]
        assert ip.startswith("10.247.0.") and ip not in ("10.247.0.0", "10.247.0.1")
        assert st["podIPs"] == [{"ip": ip}]
        assert st["hostIP"] != ip
        # Its process is in a namespace of its own, which holds that address.
        table = json.loads((state / "network.json").read_text())
        uid = get("web")["metadata"]["uid"]
        assert table["cidr"] == CIDR and table["pods"][uid]["ip"] == ip
        ns = L.Names().netns(uid)
        procs = pids_of_uid(json.loads((state / "pods.json").read_text())
                            ["pods"][uid]["uid"])
        assert procs and all(netns_ino(p) == os.stat(L.netns_path(ns)).st_ino
                             for p in procs)
        assert netns_ino(procs[0]) != netns_ino("self")
        addrs = subprocess.run(("ip", "-n", ns, "-o", "addr", "show", "eth0"),
                               capture_output=True, text=True).stdout
        assert f"inet {ip}/24" in addrs
        # The route to the other node's pods, kept by the parent for the agent.
        assert wait_until(lambda: "10.247.9.0/24 via 203.0.113.9 dev " + LINK in
                          subprocess.run(("ip", "route", "show", "proto", "80"),
                                         capture_output=True, text=True).stdout, 10), \
            "\n".join(d.lines)
        assert json.loads((state / "routes.json").read_text())["routes"] == {
            "10.247.9.0/24": ["203.0.113.9"]}

        # The Node is deleted and registered again; the controller manager
        # gives it another podCIDR while "web" holds an address of the old.
        mark = d.mark()
        core.delete_node("test-node", _preload_content=False)
        d.wait_for(r"registered node test-node", after=mark, timeout=15)
        set_pod_cidr(CIDR2)
        core.create_namespaced_pod("default", pod("late"), _preload_content=False)

        def refused():
            evs = json.loads(core.list_namespaced_event(
                "default", field_selector="involvedObject.name=late",
                _preload_content=False).data)["items"]
            return [e["message"] for e in evs if e["reason"] == "FailedCreatePodSandBox"]
        assert wait_until(lambda: refused(), 20), "\n".join(d.lines)
        msg = refused()[0]
        assert f"pod CIDR changed from {CIDR} to {CIDR2} while 1 pods hold addresses" in msg
        assert "stop those pods (or restore the old CIDR) first" in msg
        assert get("late")["status"].get("podIP") is None
        # Nothing lost: the running pod keeps its address and its network.
        assert json.loads((state / "network.json").read_text())["pods"][uid]["ip"] == ip
        assert f"inet {ip}/24" in subprocess.run(
            ("ip", "-n", ns, "-o", "addr", "show", "eth0"),
            capture_output=True, text=True).stdout
        assert all(os.path.exists(f"/proc/{p}") for p in procs)

        # Once "web" is gone, the new CIDR is taken and "late" starts.
        core.delete_namespaced_pod("web", "default", grace_period_seconds=0,
                                   _preload_content=False)
        assert wait_until(lambda: (get("late")["status"].get("podIP") or "")
                          .startswith("10.247.1."), 30), \
            json.dumps(get("late")["status"]) + "\n".join(d.lines[-30:])
        assert not os.path.exists(L.netns_path(ns))
        late_ns = L.Names().netns(get("late")["metadata"]["uid"])
        assert os.path.exists(L.netns_path(late_ns))
        core.delete_namespaced_pod("late", "default", grace_period_seconds=0,
                                   _preload_content=False)
        assert wait_until(lambda: not os.path.exists(L.netns_path(late_ns)), 20)
        assert not [line for line in d.lines if "Traceback" in line]
    finally:
        d.stop()
        api.stop()
        _clean()
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write(forwarding)
    assert not api.bugs, "\n".join(api.bugs)


def _clean() -> None:
    """What the daemon leaves on purpose (the node side survives a stop)
    and anything a failed run left: pods' processes, namespaces, the
    bridge, the nft table, the link to the other node and the route
    through it."""
    for uid in range(UID_LO, UID_LO + 100):
        for p in pids_of_uid(uid):
            try:
                os.kill(p, 9)
            except ProcessLookupError:
                pass
    for n in subprocess.run(("ip", "netns", "list"), capture_output=True,
                            text=True).stdout.split():
        if n.startswith("pufflet-"):
            subprocess.run(("ip", "netns", "del", n), capture_output=True)
    subprocess.run(("ip", "link", "del", LINK), capture_output=True)
    for cidr, gw in ((CIDR, "10.247.0.1"), (CIDR2, "10.247.1.1")):
        node = L.Node(cidr, gw, None, L.Names(), "nft")
        L.sweep(node, ())
        netplan.teardown(L.node_teardown(node), L.runner())
