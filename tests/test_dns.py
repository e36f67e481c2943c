"""resolv.conf per dnsPolicy (agent/dns.py), and what the agent asks of
CreatePod for a pod's network (addresses, hostPorts, DNS, names)."""

from __future__ import annotations

import threading

import pytest

from pufflet import config
from pufflet.agent import dns
from pufflet.agent.pods import PodManager, PodWork

HOST = ("# the node's\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n"
        "search corp.example lab.example\noptions edns0 timeout:2\n")
CLUSTER = "nameserver 10.96.0.10\n" \
          "search ns1.svc.cluster.local svc.cluster.local cluster.local " \
          "corp.example lab.example\noptions ndots:5\n"


def pod(policy=None, host_net=False, dns_config=None, ns="ns1"):
    spec = {}
    if policy:
        spec["dnsPolicy"] = policy
    if host_net:
        spec["hostNetwork"] = True
    if dns_config is not None:
        spec["dnsConfig"] = dns_config
    return {"metadata": {"namespace": ns, "name": "p", "uid": "u"}, "spec": spec}


def rc(p, cluster=("10.96.0.10",), domain="cluster.local"):
    return dns.resolv_conf(p, cluster, domain, HOST)


def test_cluster_first_is_the_default():
    assert rc(pod()) == (CLUSTER, [])
    assert rc(pod("ClusterFirst")) == (CLUSTER, [])


def test_cluster_domain_and_namespace():
    text, _ = rc(pod(ns="shop"), domain="k.example")
    assert "search shop.svc.k.example svc.k.example k.example corp.example" in text


def test_cluster_first_without_cluster_dns_falls_back_to_default():
    text, events = rc(pod(), cluster=())
    assert text == ("nameserver 192.0.2.53\nnameserver 192.0.2.54\n"
                    "search corp.example lab.example\noptions edns0 timeout:2\n")
    assert [r for r, _ in events] == ["MissingClusterDNS"]
    assert 'Falling back to "Default" policy' in events[0][1]


def test_default_is_the_hosts():
    text, events = rc(pod("Default"))
    assert text.startswith("nameserver 192.0.2.53\n") and "ndots" not in text
    assert events == []


def test_host_network_cluster_first_is_default_with_host_net_is_cluster():
    assert rc(pod("ClusterFirst", host_net=True))[0] == rc(pod("Default"))[0]
    assert rc(pod("ClusterFirstWithHostNet", host_net=True)) == (CLUSTER, [])
    assert rc(pod("ClusterFirstWithHostNet")) == (CLUSTER, [])


def test_none_uses_dns_config_only():
    text, events = rc(pod("None", dns_config={
        "nameservers": ["1.1.1.1"], "searches": ["a.example"],
        "options": [{"name": "ndots", "value": "2"}, {"name": "rotate"}]}))
    assert text == "nameserver 1.1.1.1\nsearch a.example\noptions ndots:2 rotate\n"
    assert events == []
    assert rc(pod("None"))[0] == ""


def test_dns_config_merges_into_cluster_first():
    text, _ = rc(pod(dns_config={"nameservers": ["10.96.0.10", "9.9.9.9"],
                                 "searches": ["extra.example", "svc.cluster.local"],
                                 "options": [{"name": "ndots", "value": "1"},
                                             {"name": "single-request"}]}))
    assert text.splitlines() == [
        "nameserver 10.96.0.10", "nameserver 9.9.9.9",
        "search ns1.svc.cluster.local svc.cluster.local cluster.local corp.example "
        "lab.example extra.example",
        "options ndots:1 single-request"]


def test_limits_cut_with_an_event():
    text, events = rc(pod(dns_config={"nameservers": ["1.1.1.1", "2.2.2.2", "3.3.3.3"],
                                      "searches": [f"d{i}.example" for i in range(40)]}))
    assert text.count("nameserver") == 3
    assert len(text.split("search ")[1].split("\n")[0].split()) == 32
    assert sorted(r for r, _ in events) == ["DNSConfigForming", "DNSConfigForming"]


def test_parse_resolv_conf():
    assert dns.parse_resolv_conf("domain a.example\nsearch b c ; x\nnameserver 1.2.3.4 # y\n"
                                 "options a b\noptions c\nbogus\n") == \
        (["1.2.3.4"], ["b", "c"], ["a", "b", "c"])


# ---- CreatePod's request -----------------------------------------------------------

class _Runtime:
    on_exit = None


def manager(conf, pod_cidr):
    cfg = config.parse("node name n\n" + conf)
    return PodManager(cfg, _Runtime(), None, pod_cidr=lambda: pod_cidr,
                      host_ip=lambda: "192.0.2.7", stop=threading.Event())


def work(spec):
    p = {"metadata": {"namespace": "ns1", "name": "web", "uid": "u1"},
         "spec": {"containers": [{"name": "c", "image": "i"}], **spec}}
    w = PodWork("u1", p, False)
    from pufflet.agent.pods import CState
    w.containers["c"] = CState("c", False, digest="sha256:" + "a" * 64)
    return w


def test_request_for_a_pod_network():
    m = manager("cluster dns 10.96.0.10\n", "10.244.3.0/24")
    w = work({"containers": [{"name": "c", "image": "i", "ports": [
        {"containerPort": 80, "hostPort": 8080},
        {"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "192.0.2.7"},
        {"containerPort": 9000}]}]})
    req = m._create_request(w, w.pod["spec"]["containers"])
    assert req["pod_cidr"] == "10.244.3.0/24" and req["host_network"] is False
    assert req["host_ports"] == [
        {"host_port": 8080, "container_port": 80, "protocol": "TCP"},
        {"host_port": 5353, "container_port": 53, "protocol": "UDP", "host_ip": "192.0.2.7"}]
    assert req["own_names"] == ["web"]
    assert all("web" not in h["names"] for h in req["hosts"])
    assert req["resolv_conf"].startswith("nameserver 10.96.0.10\n")
    # Before the parent answers, the pod's IP is the node's; after, its own.
    assert m._pod_ip(w) == "192.0.2.7"
    w.info = {"pod_ip": "10.244.3.2"}
    assert m._pod_ip(w) == "10.244.3.2"


def test_request_waits_for_the_pod_cidr_and_host_network_does_not():
    m = manager("", None)
    w = work({})
    assert m._create_request(w, w.pod["spec"]["containers"]) is None
    w = work({"hostNetwork": True, "containers": [{"name": "c", "image": "i", "ports": [
        {"containerPort": 80, "hostPort": 80}]}]})
    req = m._create_request(w, w.pod["spec"]["containers"])
    assert req["host_network"] and req["host_ports"] == [] and "pod_cidr" not in req
    assert {"ip": "192.0.2.7", "names": ["web"]} in req["hosts"]
    # The configured network needs no podCIDR.
    m = manager("pod network 10.88.0.0/16\n", None)
    w = work({})
    req = m._create_request(w, w.pod["spec"]["containers"])
    assert req is not None and "pod_cidr" not in req


@pytest.mark.parametrize("cidr", ["", "10.1.0.0/24"])
def test_request_without_cluster_dns_uses_the_hosts(cidr):
    m = manager("", cidr)
    w = work({})
    req = m._create_request(w, w.pod["spec"]["containers"])
    assert "ndots:5" not in req["resolv_conf"]
