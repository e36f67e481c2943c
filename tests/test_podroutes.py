"""Routes to other nodes' pods ('pod routes'): the parent's checks, the
OpenBSD argv (route(8)), the Linux twin on a live kernel, and the agent
keeping them in step with the Nodes of the API emulator.

The live tests use a veth pair pfrt0/pfrt1 with 203.0.113.1/24 (TEST-NET-3)
as the nodes' network and 198.51.100.0/24 (TEST-NET-2) as the cluster's
pod network, and mark their routes with protocol 81, not pufflet's 80:
a pufflet on this machine is never touched.  Everything is removed at
the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from pufflet import config
from pufflet.agent import kube, podroutes as agent_routes
from pufflet.platform import openbsd_net as B
from pufflet.priv import netplan, podnet
from pufflet.priv.netplan import EXISTS, Step, StepError
from pufflet.priv.podroutes import PodRoutes
from pufflet.privsep import spec as specmod
from pufflet.privsep.channel import Status

CLUSTER = "198.51.100.0/24"
OWN = "198.51.100.0/28"
DUMMY, PEER = "pfrt0", "pfrt1"
PROTO = 81

LIVE = pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0
                          or not shutil.which("ip"),
                          reason="needs Linux, root and ip(8) (iproute2)")


def route(cidr: str, gw: str, node: str) -> dict:
    return {"cidr": cidr, "gateway": gw, "node": node}


def node(name: str, cidrs: list[str], ips: list[str], **meta) -> dict:
    return {"metadata": {"name": name, **meta},
            "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs} if cidrs else {},
            "status": {"addresses": [{"type": "Hostname", "address": name}] +
                       [{"type": "InternalIP", "address": a} for a in ips]}}


# ---------------------------------------------------------------------------
# the agent's half: which routes the Nodes ask for

def test_wanted_routes_from_nodes():
    nodes = [
        node("self", ["198.51.100.0/28"], ["203.0.113.1"]),
        node("b", ["198.51.100.16/28", "fd00:10:0:2::/64"], ["203.0.113.12", "2001:db8::12"]),
        node("c", ["198.51.100.32/28", "fd00:10:0:3::/64"], ["203.0.113.13"]),   # no v6 address
        node("d", ["100.64.0.0/28"], ["203.0.113.14"]),          # outside the cluster
        node("e", [], ["203.0.113.15"]),                          # no podCIDR yet
        node("f", ["198.51.100.48/28"], ["203.0.113.16"], deletionTimestamp="2026-01-01T00:00:00Z"),
        node("a", ["198.51.100.64/28"], ["203.0.113.17"]),
        node("g", ["fd00:10:0:7::/64"], ["fe80::7%eth0", "bogus"]),     # nothing usable
    ]
    got = agent_routes.wanted(nodes, "self", [CLUSTER, "fd00:10::/56"])
    assert got == [route("198.51.100.64/28", "203.0.113.17", "a"),
                   route("198.51.100.16/28", "203.0.113.12", "b"),
                   route("fd00:10:0:2::/64", "2001:db8::12", "b"),
                   route("198.51.100.32/28", "203.0.113.13", "c")]
    # Only IPv4 configured: the IPv6 podCIDRs are not asked for.
    assert all(":" not in r["cidr"] for r in agent_routes.wanted(nodes, "self", [CLUSTER]))


# ---------------------------------------------------------------------------
# the parent's checks

class Kernel:
    """A routing table for the parent's logic: what set and delete did, and
    refusals where a real kernel would refuse (a gateway off the link)."""

    def __init__(self, onlink: str = "203.0.113.0/24") -> None:
        import ipaddress
        self.onlink = ipaddress.ip_network(onlink)
        self.table: dict[str, str] = {}

    def route_set(self, cidr, gw):
        import ipaddress
        if ipaddress.ip_address(gw) not in self.onlink:
            raise StepError(Step(("route", "add", cidr, gw)), 1, "Network is unreachable")
        self.table[cidr] = gw

    def route_delete(self, cidr, gw):
        self.table.pop(cidr, None)
        return []


def routes(tmp_path, backend=None, clusters=(CLUSTER,), own=OWN) -> PodRoutes:
    return PodRoutes(str(tmp_path), clusters, backend if backend is not None else Kernel(),
                     lambda: own)


@pytest.mark.parametrize("cidr,gw,why", [
    ("198.51.100.0/28", "203.0.113.12", "overlaps this node's pod network 198.51.100.0/28"),
    ("198.51.100.0/27", "203.0.113.12", "overlaps this node's pod network"),
    ("198.51.100.0/24", "203.0.113.12", "not a network inside 'pod routes' 198.51.100.0/24"),
    ("0.0.0.0/0", "203.0.113.12", "not a network inside"),
    ("100.64.0.0/28", "203.0.113.12", "not a network inside"),
    ("198.51.100.17/28", "203.0.113.12", "has host bits set"),
    ("198.51.100.16/28", "198.51.100.40", "in the pod network 198.51.100.0/24: pods are never"),
    ("198.51.100.16/28", "198.51.100.2", "in the pod network"),
    ("198.51.100.16/28", "127.0.0.1", "not a unicast address"),
    ("198.51.100.16/28", "224.0.0.5", "not a unicast address"),
    ("198.51.100.16/28", "0.0.0.0", "not a unicast address"),
    ("198.51.100.16/28", "255.255.255.255", "not a unicast address"),
    ("198.51.100.16/28", "169.254.1.1", "not a unicast address"),
    ("198.51.100.16/28", "2001:db8::1", "is not an IPv4 address"),
    ("198.51.100.16/28", "192.0.2", "does not appear to be an IPv4 or IPv6 address"),
])
def test_parent_refuses(tmp_path, cidr, gw, why):
    r = routes(tmp_path)
    ans = r.set_pod_routes({"routes": [route(cidr, gw, "b"),
                                       route("198.51.100.64/28", "203.0.113.17", "ok")]}, [])
    assert ans["installed"] == 1
    assert [(x["cidr"], x["node"]) for x in ans["refused"]] == [(cidr, "b")]
    assert why in ans["refused"][0]["reason"]
    assert r.backend.table == {"198.51.100.64/28": "203.0.113.17"}


def test_overlapping_nodes_first_by_name_wins(tmp_path):
    r = routes(tmp_path)
    ans = r.set_pod_routes({"routes": [route("198.51.100.32/27", "203.0.113.13", "z"),
                                       route("198.51.100.48/28", "203.0.113.12", "m"),
                                       route("198.51.100.16/28", "203.0.113.14", "a")]}, [])
    assert r.backend.table == {"198.51.100.48/28": "203.0.113.12",
                               "198.51.100.16/28": "203.0.113.14"}
    assert ans["refused"] == [{"cidr": "198.51.100.32/27", "node": "z", "reason":
                               "198.51.100.32/27 overlaps 198.51.100.48/28 of node m"}]


def test_kernel_refusal_is_reported_and_forgotten(tmp_path):
    r = routes(tmp_path)
    ans = r.set_pod_routes({"routes": [route("198.51.100.16/28", "198.18.0.9", "far")]}, [])
    assert ans["installed"] == 0
    assert ans["refused"][0]["reason"] == "the kernel refused it: Network is unreachable"
    assert json.loads((tmp_path / "routes.json").read_text())["routes"] == {}


def test_without_pod_routes_the_parent_refuses_and_removes_its_routes(tmp_path):
    k = Kernel()
    r = routes(tmp_path, k)
    r.set_pod_routes({"routes": [route("198.51.100.16/28", "203.0.113.12", "b")]}, [])
    assert k.table == {"198.51.100.16/28": "203.0.113.12"}
    # Restarted with 'pod routes' gone from pufflet.conf.
    off = routes(tmp_path, k, clusters=())
    assert k.table == {}
    with pytest.raises(Status) as e:
        off.set_pod_routes({"routes": []}, [])
    assert e.value.code == "FAILED_PRECONDITION"


def test_spec_bounds_the_request():
    spec = specmod.load()
    spec.check_request("SetPodRoutes", {"routes": [route("198.51.100.16/28", "203.0.113.12",
                                                         "b")]}, 0)
    for bad in ({"routes": [route("198.51.100.16/28; rm", "203.0.113.12", "b")]},
                {"routes": [route("198.51.100.16/28", "-label", "b")]},
                {"routes": [route("198.51.100.16/28", "203.0.113.12", "B_")]},
                {"routes": [route("1.0.0.0/8", "203.0.113.1", "n")] * 1001}):
        with pytest.raises(specmod.Invalid):
            spec.check_request("SetPodRoutes", bad, 0)


# ---------------------------------------------------------------------------
# OpenBSD: route(8)

def test_openbsd_route_argv():
    assert B.route_add("10.244.1.0/24", "203.0.113.11").argv == (
        "/sbin/route", "-qn", "add", "-inet", "-label", "pufflet", "10.244.1.0/24",
        "203.0.113.11")
    assert B.route_change("10.244.1.0/24", "203.0.113.12").argv == (
        "/sbin/route", "-qn", "change", "-inet", "-label", "pufflet", "10.244.1.0/24",
        "203.0.113.12")
    d = B.route_delete("fd00:10:0:1::/64", "2001:db8::11")
    assert d.argv == ("/sbin/route", "-qn", "delete", "-inet6", "fd00:10:0:1::/64",
                      "2001:db8::11")
    assert d.missing_ok
    assert B.classify("route: writing to routing socket: File exists") == EXISTS
    assert B.classify("delete net 10.244.1.0/24: not in table") == netplan.MISSING


def test_openbsd_backend_adds_then_changes(monkeypatch):
    ran = []

    def run(step):
        ran.append(step.argv[2])
        if step.argv[2] == "add" and len(ran) > 1:
            raise StepError(step, 1, "route: writing to routing socket: File exists",
                            EXISTS)
    be = podnet.OpenBSDBackend()
    be.run = run
    be.route_set("10.244.1.0/24", "203.0.113.11")
    assert ran == ["add"]
    be.route_set("10.244.1.0/24", "203.0.113.12")      # there already: changed
    assert ran == ["add", "add", "change"]
    with pytest.raises(StepError):
        be.run = lambda step: (_ for _ in ()).throw(
            StepError(step, 1, "Network is unreachable"))
        be.route_set("10.244.1.0/24", "198.18.0.1")


# ---------------------------------------------------------------------------
# Linux, live

def ip_routes() -> dict[str, str]:
    out = subprocess.run(("ip", "-o", "route", "show", "proto", str(PROTO)),
                         capture_output=True, text=True, check=True).stdout
    got = {}
    for line in out.splitlines():
        words = line.split()
        got[words[0]] = words[words.index("via") + 1]
    return got


@pytest.fixture
def link():
    subprocess.run(("ip", "link", "del", DUMMY), capture_output=True)
    # A veth pair: this kernel may lack the dummy driver, and a link
    # needs a carrier for routes through it.
    subprocess.run(("ip", "link", "add", DUMMY, "type", "veth", "peer", "name", PEER),
                   check=True)
    try:
        subprocess.run(("ip", "addr", "add", "203.0.113.1/24", "dev", DUMMY), check=True)
        subprocess.run(("ip", "link", "set", DUMMY, "up"), check=True)
        subprocess.run(("ip", "link", "set", PEER, "up"), check=True)
        yield podnet.LinuxBackend(route_proto=PROTO)
    finally:
        subprocess.run(("ip", "link", "del", DUMMY), capture_output=True)
    # Routes through the link went with it.
    assert ip_routes() == {}


@LIVE
def test_linux_routes_added_changed_removed_and_swept(tmp_path, link):
    r = routes(tmp_path, link)
    ans = r.set_pod_routes({"routes": [
        route("198.51.100.16/28", "203.0.113.12", "b"),
        route("198.51.100.32/28", "203.0.113.13", "c"),
        route("198.51.100.48/28", "198.18.0.9", "far")]}, [])
    assert ip_routes() == {"198.51.100.16/28": "203.0.113.12", "198.51.100.32/28": "203.0.113.13"}
    assert ans["installed"] == 2
    assert [x["node"] for x in ans["refused"]] == ["far"]
    assert "the kernel refused it" in ans["refused"][0]["reason"]
    # An admin's route to a network nobody asks for: never pufflet's to remove.
    subprocess.run(("ip", "route", "add", "198.51.100.128/28", "via", "203.0.113.99"),
                   check=True)
    # Node c moved to another address, node b is gone.
    r.set_pod_routes({"routes": [route("198.51.100.32/28", "203.0.113.14", "c")]}, [])
    assert ip_routes() == {"198.51.100.32/28": "203.0.113.14"}
    # Someone removed it by hand: set again at the next refresh (the agent
    # sends its set every 5 minutes) or by a restarted parent.
    subprocess.run(("ip", "route", "del", "198.51.100.32/28", "proto", str(PROTO)),
                   check=True)
    want = [route("198.51.100.32/28", "203.0.113.14", "c")]
    r.set_pod_routes({"routes": want}, [])
    assert ip_routes() == {}                    # not yet: nothing changed
    r.refreshed -= r.refresh
    r.set_pod_routes({"routes": want}, [])
    assert ip_routes() == {"198.51.100.32/28": "203.0.113.14"}
    subprocess.run(("ip", "route", "del", "198.51.100.32/28", "proto", str(PROTO)),
                   check=True)
    r2 = routes(tmp_path, link)
    r2.set_pod_routes({"routes": want + [route("198.51.100.64/28", "203.0.113.15", "d")]},
                      [])
    assert ip_routes() == {"198.51.100.32/28": "203.0.113.14",
                           "198.51.100.64/28": "203.0.113.15"}
    # Restarted while node c went away: its route stays until the first
    # sync, which has only d.
    r3 = routes(tmp_path, link)
    assert ip_routes() == {"198.51.100.32/28": "203.0.113.14",
                           "198.51.100.64/28": "203.0.113.15"}
    r3.set_pod_routes({"routes": [route("198.51.100.64/28", "203.0.113.15", "d")]}, [])
    assert ip_routes() == {"198.51.100.64/28": "203.0.113.15"}
    # A crash after the table was written and before the route went in:
    # the next start finds nothing to remove and says nothing.
    st = json.loads((tmp_path / "routes.json").read_text())
    st["routes"]["198.51.100.80/28"] = ["203.0.113.16"]
    (tmp_path / "routes.json").write_text(json.dumps(st))
    # Restarted without 'pod routes': its routes go, the admin's stays.
    routes(tmp_path, link, clusters=())
    assert ip_routes() == {}
    assert json.loads((tmp_path / "routes.json").read_text())["routes"] == {}
    assert "198.51.100.128/28 via 203.0.113.99" in subprocess.run(
        ("ip", "route", "show", "198.51.100.128/28"), capture_output=True, text=True).stdout


# ---------------------------------------------------------------------------
# the agent and the parent, against the API emulator

@pytest.fixture
def api(tmp_path):
    from apiserver import ApiServer
    server = ApiServer(tmp_path / "api", bookmark_interval=0.5).start()
    yield server
    server.stop()
    assert not server.bugs, "\n".join(server.bugs)


def put_node(admin, name, cidr, ip):
    body = {"metadata": {"name": name}, "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}
    made = json.loads(admin.create_node(body, _preload_content=False).data)
    made["status"] = {"addresses": [{"type": "InternalIP", "address": ip}]}
    admin.replace_node_status(name, made, _preload_content=False)


@LIVE
def test_agent_keeps_routes_in_step_with_the_nodes(tmp_path, link, api, caplog):
    from kubernetes import client as k8s
    from daemon import wait_until
    admin = k8s.CoreV1Api(kube.api_client(kube.load_kubeconfig(str(api.kubeconfig("admin")))))
    put_node(admin, "self", OWN, "203.0.113.1")
    put_node(admin, "b", "198.51.100.16/28", "203.0.113.12")
    put_node(admin, "c", "198.51.100.32/28", "203.0.113.13")
    spec = specmod.load()
    parent = routes(tmp_path, link)
    answers = []

    def send(rs):
        # Through the spec's checks both ways, as over the channel.
        body = {"routes": rs}
        spec.check_request("SetPodRoutes", body, 0)
        ans = parent.set_pod_routes(body, [])
        spec.check_response("SetPodRoutes", ans, 0)
        answers.append(ans)
        return ans

    node_api = kube.api_client(kube.load_kubeconfig(str(api.kubeconfig("system:node:self"))))
    stop = threading.Event()
    keeper = agent_routes.RouteKeeper(node_api, "self", [CLUSTER], send, stop, resync=60)
    keeper.start()
    try:
        # The Node authorizer lets a node read only its own Node.
        assert wait_until(lambda: any(r.user == "system:node:self" and r.verb == "list"
                                      and r.status == 403 for r in api.request_log), 5)
        assert answers == [] and ip_routes() == {}
        assert wait_until(lambda: "grant list and watch on nodes to the group "
                          "system:nodes" in caplog.text, 5)
        api.allow("group:system:nodes", "list", "nodes")
        api.allow("group:system:nodes", "watch", "nodes")
        want = {"198.51.100.16/28": "203.0.113.12", "198.51.100.32/28": "203.0.113.13"}
        assert wait_until(lambda: ip_routes() == want, 10), ip_routes()
        calls = len(answers)
        # A new node, a node deleted, a node with a new address.
        put_node(admin, "d", "198.51.100.64/28", "203.0.113.15")
        admin.delete_node("b")
        c = json.loads(admin.read_node("c", _preload_content=False).data)
        c["status"]["addresses"] = [{"type": "InternalIP", "address": "203.0.113.14"}]
        admin.replace_node_status("c", c, _preload_content=False)
        want = {"198.51.100.32/28": "203.0.113.14", "198.51.100.64/28": "203.0.113.15"}
        assert wait_until(lambda: ip_routes() == want, 10), ip_routes()
        assert all(not a["refused"] for a in answers)
        # Updates that change no route send nothing.
        n = len(answers)
        assert n > calls
        c = json.loads(admin.read_node("c", _preload_content=False).data)
        c["metadata"].setdefault("labels", {})["x"] = "y"
        admin.replace_node("c", c, _preload_content=False)
        assert wait_until(lambda: keeper.informer.get(c["metadata"]["uid"])["metadata"]
                          .get("labels", {}).get("x") == "y", 5)
        stop.wait(0.5)
        assert len(answers) == n
    finally:
        stop.set()
        keeper.close()


# ---------------------------------------------------------------------------
# pods reach other nodes' pods without NAT

def test_config_pod_routes():
    c = config.parse("pod routes 10.244.0.0/16\npod routes fd00:10::/56\n")
    assert c.pod_routes == ("10.244.0.0/16", "fd00:10::/56")
    assert config.parse("").pod_routes == ()
    for text, why in (("pod routes 10.244.0.1/16\n", "has host bits set"),
                      ("pod routes 0.0.0.0/0\n", "a cluster network, not every address"),
                      ("pod routes 10.0.0.0/8\npod routes 11.0.0.0/8\n",
                       "an IPv4 network is given already (10.0.0.0/8)"),
                      ("pod routes\n", "needs the cluster's pod network")):
        with pytest.raises(config.ConfigError) as e:
            config.parse(text)
        assert why in str(e.value)


def test_openbsd_nat_skips_the_cluster_network():
    from pufflet.priv.netplan import PodNet
    pod = PodNet("0a0a0a0a-0000-4000-8000-0000000000aa", "10.244.1.5", 24, "10.244.1.1", 5)
    rules = B.pf_rules(B.Node("10.244.1.1", 24, no_nat="10.244.0.0/16"), pod)
    assert rules.splitlines()[1] == (
        "match out on egress inet from 10.244.1.5 to ! 10.244.0.0/16 nat-to (egress:0)")
    assert "to any nat-to" in B.pf_rules(B.Node("10.244.1.1", 24), pod)


def test_linux_nat_skips_the_cluster_network():
    from pufflet.platform import linux_net as L
    node = L.Node("10.244.1.0/24", "10.244.1.1", None, no_nat=("10.244.0.0/16",))
    nft = L.node_plan(node)[3].stdin
    assert ("add rule inet pufflet postrouting ip saddr 10.244.1.0/24 "
            "ip daddr != 10.244.1.0/24 ip daddr != 10.244.0.0/16 masquerade") in nft
    ipt = [s.argv for s in L.node_plan(L.Node("10.244.1.0/24", "10.244.1.1", "eth0",
                                              firewall="iptables",
                                              no_nat=("10.244.0.0/16",)))]
    ret = ipt.index(("iptables", "-w", "-t", "nat", "-A", "PUFFLET-POST", "-s",
                     "10.244.1.0/24", "-d", "10.244.0.0/16", "-j", "RETURN"))
    assert ipt[ret + 1][-2:] == ("-j", "MASQUERADE")


@LIVE
@pytest.mark.skipif(not shutil.which("nft"), reason="needs nft(8)")
def test_a_pod_reaches_a_pod_of_another_node_by_its_address(tmp_path, link):
    """Two nodes on one link: this host (pod network 198.51.100.0/28, a pod
    in a netns) and node "b", a netns behind pfrt1 at 203.0.113.2 whose
    pod 198.51.100.17 routes back to us.  With the route pufflet keeps, our
    pod reaches b's pod, and b's pod sees our pod's own address: no NAT
    inside the cluster network (without no_nat it sees 203.0.113.1)."""
    from pufflet.platform import linux_net as L
    from pufflet.priv.netplan import PodNet
    from test_net_linux import Server, talk
    names = L.Names(netns_prefix="pfrx-", veth_prefix="rv", bridge="pfrx0",
                    table="pufflet_rx")
    here = L.Node(OWN, "198.51.100.1", None, names, "nft", no_nat=(CLUSTER,))
    pod = PodNet("0e0e0e0e-0000-4000-8000-0000000000ee", "198.51.100.2", 28,
                 "198.51.100.1", 1)
    b = "pfrx-nodeb"
    forwarding = open("/proc/sys/net/ipv4/ip_forward").read()
    run = L.runner()
    try:
        subprocess.run(("ip", "netns", "add", b), check=True)
        for argv in (("ip", "link", "set", PEER, "netns", b),
                     ("ip", "-n", b, "addr", "add", "203.0.113.2/24", "dev", PEER),
                     ("ip", "-n", b, "link", "set", PEER, "up"),
                     ("ip", "-n", b, "link", "set", "lo", "up"),
                     ("ip", "-n", b, "addr", "add", "198.51.100.17/32", "dev", "lo"),
                     ("ip", "-n", b, "route", "add", OWN, "via", "203.0.113.1")):
            subprocess.run(argv, check=True)
        netplan.apply(L.node_plan(here), run)
        netplan.apply(L.pod_plan(here, pod), run)
        r = routes(tmp_path, link, own=OWN)
        ans = r.set_pod_routes({"routes": [route("198.51.100.16/28", "203.0.113.2", "b")]}, [])
        assert ans == {"installed": 1, "refused": []}
        srv = Server(b, "198.51.100.17", 7100)
        assert talk(names.netns(pod.pod_uid), "198.51.100.17", 7100) == b"ping"
        assert srv.peer() == pod.ip
    finally:
        netplan.teardown(L.pod_teardown(here, pod.pod_uid, False), run)
        netplan.teardown(L.node_teardown(here), run)
        subprocess.run(("ip", "netns", "del", b), capture_output=True)
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write(forwarding)


@pytest.mark.parametrize("text", ['[1, 2]', '{"version": 9, "routes": {}}',
                                  '{"version": 1, "routes": {"x": ["y"]}}', 'not json'])
def test_a_damaged_table_is_logged_and_replaced(tmp_path, caplog, text):
    (tmp_path / "routes.json").write_text(text)
    r = routes(tmp_path)
    assert r.recorded == {}
    assert "routes.json" in caplog.text
    r.set_pod_routes({"routes": [route("198.51.100.16/28", "203.0.113.12", "b")]}, [])
    assert json.loads((tmp_path / "routes.json").read_text())["routes"] == {
        "198.51.100.16/28": ["203.0.113.12"]}


def test_openbsd_route_sync_golden(tmp_path):
    """SetPodRoutes on OpenBSD, argv for argv (route(8)): add, a moved
    node's change, a gone node's delete naming its gateway."""
    table: dict[str, str] = {}
    ran = []

    def run(step):
        ran.append(step.argv)
        verb, cidr = step.argv[2], step.argv[-2]
        if verb == "add" and cidr in table:
            raise StepError(step, 1, "route: writing to routing socket: File exists",
                            EXISTS)
        if verb == "delete" and cidr not in table:
            raise StepError(step, 1, f"delete net {cidr}: not in table", netplan.MISSING)
        if verb == "delete":
            del table[cidr]
        else:
            table[cidr] = step.argv[-1]
    be = podnet.OpenBSDBackend()
    be.run = run
    r = PodRoutes(str(tmp_path), ["10.244.0.0/16"], be, lambda: "10.244.0.0/24")
    r.set_pod_routes({"routes": [route("10.244.1.0/24", "192.0.2.11", "b"),
                                 route("10.244.2.0/24", "192.0.2.12", "c")]}, [])
    r.set_pod_routes({"routes": [route("10.244.2.0/24", "192.0.2.13", "c")]}, [])
    R = ("/sbin/route", "-qn")
    assert ran == [
        (*R, "add", "-inet", "-label", "pufflet", "10.244.1.0/24", "192.0.2.11"),
        (*R, "add", "-inet", "-label", "pufflet", "10.244.2.0/24", "192.0.2.12"),
        (*R, "delete", "-inet", "10.244.1.0/24", "192.0.2.11"),
        (*R, "add", "-inet", "-label", "pufflet", "10.244.2.0/24", "192.0.2.13"),
        (*R, "change", "-inet", "-label", "pufflet", "10.244.2.0/24", "192.0.2.13")]
    assert table == {"10.244.2.0/24": "192.0.2.13"}
