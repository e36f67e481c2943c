"""Joining a cluster: the Node object, registration, status and lease,
against the API emulator over real HTTPS, with node facts from a real
privsep Server running pufflet.priv.services on a socketpair."""

import base64
import json
import logging
import socket
import threading
import time

import pytest
import yaml

from apiserver import ApiServer
from daemon import Daemon, wait_until, write_config
from pufflet import __version__, config, platform
from pufflet.agent import kube, node
from pufflet.agent.arch import goarch
from pufflet.config import Threshold
from pufflet.priv.services import Services
from pufflet.privsep import spec as specmod
from pufflet.privsep.channel import Client, Server

NAME = "n1"
FAST = ("node status interval 0.1\nnode status report 100\n"
        "node lease duration 1\n")


# ---------------------------------------------------------------------------
# helpers

@pytest.fixture
def api(tmp_path):
    server = ApiServer(tmp_path / "api").start()
    yield server
    server.stop()
    assert not server.bugs, "\n".join(server.bugs)


class Facts:
    """GetNodeFacts over a real channel to a real priv Services; tests
    may override fields to make conditions flip."""

    def __init__(self, cfg):
        spec = specmod.load()
        mine, theirs = socket.socketpair()
        self.server = Server(theirs, spec, Services(cfg, spec).table(),
                             logging.getLogger("test.priv"))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.client = Client(mine, spec)
        self.client.call("Handshake", {"spec_version": spec.version,
                                       "spec_digest": spec.digest, "agent_version": "t"})
        self.override = {}

    def __call__(self):
        return {**self.client.call("GetNodeFacts", {}).body, **self.override}

    def images(self):
        return self.client.call("ListImages", {}).body["images"]

    def close(self):
        self.client.close()


@pytest.fixture
def agents(api, tmp_path):
    made = []

    def make(extra=FAST, name=NAME, start=True):
        cfg = config.parse(f"node name {name}\nstate directory \"{tmp_path}\"\n"
                           f"listen on * port 10251\n" + extra)
        access = kube.load_kubeconfig(str(api.kubeconfig(f"system:node:{name}")))
        facts = Facts(cfg)
        a = node.NodeAgent(cfg, kube.api_client(access), facts, access.server,
                           images=facts.images)
        a.test_facts = facts
        made.append(a)
        if start:
            a.start()
        return a
    yield make
    for a in made:
        a.close()
    for a in made:
        for t in a.threads:
            t.join(2)
        a.test_facts.close()


def get_node(api, name=NAME):
    return api.store.get("nodes", "", name)


def get_lease(api, name=NAME):
    try:
        return api.store.get("leases", "kube-node-lease", name)
    except Exception:
        return {"metadata": {}, "spec": {"renewTime": ""}}


def ready(api, name=NAME):
    try:
        n = get_node(api, name)
    except Exception:
        return False
    conds = {c["type"]: c for c in (n.get("status") or {}).get("conditions") or ()}
    return conds.get("Ready", {}).get("status") == "True"


def count(api, verb, path_part, since=0):
    return sum(1 for r in api.request_log[since:] if r.verb == verb and path_part in r.path)


def conds(n):
    return {c["type"]: c for c in n["status"]["conditions"]}


# ---------------------------------------------------------------------------
# pure pieces

@pytest.mark.parametrize("machine,want", [
    ("x86_64", "amd64"), ("amd64", "amd64"), ("aarch64", "arm64"), ("arm64", "arm64"),
    ("i386", "386"), ("i686", "386"), ("armv7", "arm"), ("armv7l", "arm"), ("arm", "arm"),
    ("riscv64", "riscv64"), ("ppc64le", "ppc64le"), ("powerpc64", "ppc64"),
    ("s390x", "s390x"), ("mips64", "mips64"), ("octeon", "mips64"),
    ("loongson", "mips64le"), ("sparc64", "sparc64"), ("vax", "vax")])
def test_goarch(machine, want):
    assert goarch(machine) == want


def test_quantities():
    assert node.bytes_quantity(0) == "0"
    assert node.bytes_quantity(1 << 30) == "1Gi"
    assert node.bytes_quantity(3 << 9) == "1536"
    assert node.bytes_quantity(3 << 10) == "3Ki"
    assert node.memory_quantity((16 << 30) + 100) == "16Gi"
    assert node.memory_quantity(1000 * 1024 + 5) == "1000Ki"
    assert node.cpu_quantity(4000) == "4" and node.cpu_quantity(3750) == "3750m"
    assert node.cpu_quantity(-5) == "0"


FACTS = {"hostname": "Obsd.Example", "os_name": "OpenBSD", "os_release": "7.6",
         "os_image": "OpenBSD 7.6", "kernel_version": "GENERIC.MP#338",
         "machine": "octeon", "cpus": 4, "memory_bytes": 8 << 30,
         "boot_id": "b", "machine_id": "m", "state_fs_bytes": 100 << 30,
         "state_fs_free_bytes": 50 << 30, "state_fs_inodes": 1000,
         "state_fs_free_inodes": 900, "memory_available_bytes": 4 << 30,
         "processes": 60, "max_processes": 1310}


def test_allocatable_as_the_kubelet_computes_it():
    cfg = config.parse("node name x\nreserve cpu 250m\nreserve memory 1G\n"
                       "reserve storage 10G\npressure memory 512M\npressure disk 10%\n")
    assert node.capacity(cfg, FACTS) == {"cpu": "4", "memory": "8Gi", "pods": "110",
                                         "ephemeral-storage": "100Gi"}
    alloc = node.allocatable(cfg, FACTS)
    assert alloc["cpu"] == "3750m"
    assert alloc["memory"] == node.bytes_quantity((8 << 30) - (1 << 30) - (512 << 20))
    assert alloc["ephemeral-storage"] == "80Gi"      # 100 - 10 reserved - 10%
    assert alloc["pods"] == "110"


def test_labels_and_info_on_openbsd():
    cfg = config.parse("node name x\nnode label a.example/b=c\n")
    assert node.labels(cfg, FACTS) == {
        "kubernetes.io/os": "openbsd", "kubernetes.io/arch": "mips64",
        "kubernetes.io/hostname": "x", "a.example/b": "c"}
    info = node.node_info(FACTS)
    assert info["operatingSystem"] == "openbsd"
    assert info["kernelVersion"] == "GENERIC.MP#338"
    assert node.addresses(FACTS, None) == [{"type": "Hostname", "address": "obsd.example"}]


def test_pressure_thresholds():
    cfg = config.parse("node name x\n")
    assert node.pressures(cfg, FACTS) == {"MemoryPressure": False, "DiskPressure": False,
                                          "PIDPressure": False}
    low = {**FACTS, "memory_available_bytes": 50 << 20, "state_fs_free_inodes": 10,
           "processes": 1300}
    assert node.pressures(cfg, low) == {"MemoryPressure": True, "DiskPressure": True,
                                        "PIDPressure": True}
    # a platform that cannot count processes never claims PID pressure
    assert not node.pressures(cfg, {**low, "max_processes": 0})["PIDPressure"]


def test_transition_time_moves_only_on_flips():
    cfg = config.parse("node name x\n")
    first = node.conditions(cfg, FACTS, "10.0.0.1", {}, "T1")
    prev = {c["type"]: c for c in first}
    second = {c["type"]: c for c in node.conditions(cfg, FACTS, "10.0.0.1", prev, "T2")}
    assert all(c["lastHeartbeatTime"] == "T2" and c["lastTransitionTime"] == "T1"
               for c in second.values())
    third = {c["type"]: c for c in node.conditions(cfg, FACTS, None, second, "T3")}
    assert third["Ready"] == {"type": "Ready", "status": "False", "lastHeartbeatTime": "T3",
                              "lastTransitionTime": "T3", "reason": "KubeletNotReady",
                              "message": "no node address: set one with 'node address'"}
    assert third["MemoryPressure"]["lastTransitionTime"] == "T1"
    # heartbeats alone do not make a status worth sending
    st = node.status(cfg, FACTS, "10.0.0.1", prev, "T9")
    assert node.without_heartbeats(st) == node.without_heartbeats(
        node.status(cfg, FACTS, "10.0.0.1", prev, "T1"))


def test_backoff_grows_jittered_and_capped():
    b = kube.Backoff(0.1, 7.0, rand=lambda: 1.0)
    assert [round(b.next(), 3) for _ in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 7.0]
    lo = kube.Backoff(0.1, 7.0, rand=lambda: 0.0)
    assert [round(lo.next(), 3) for _ in range(3)] == [0.05, 0.1, 0.2]
    b.reset()
    assert round(b.next(), 3) == 0.1


def test_detect_address():
    assert node.detect_address("https://127.0.0.1:6443") == "127.0.0.1"
    assert node.detect_address("https://nonexistent.invalid:6443") is None


# ---------------------------------------------------------------------------
# kubeconfig

def test_kubeconfig_inline_data_and_token(api, tmp_path):
    files = yaml.safe_load(api.kubeconfig("system:node:n1").read_text())
    user = files["users"][0]["user"]
    b64 = lambda p: base64.b64encode(open(p, "rb").read()).decode()
    inline = {**files, "users": [{"name": files["users"][0]["name"], "user": {
        "client-certificate-data": b64(user["client-certificate"]),
        "client-key-data": b64(user["client-key"])}}]}
    inline["clusters"][0]["cluster"] = {
        "server": api.url, "certificate-authority-data": b64(api.ca.cert)}
    path = tmp_path / "inline"
    path.write_text(yaml.safe_dump(inline))
    access = kube.load_kubeconfig(str(path))
    assert "token" not in repr(access)
    r = node.k8s.CoreV1Api(kube.api_client(access)).create_node(
        {"metadata": {"name": "n1"}}, _preload_content=False)
    assert r.status == 201
    # a bearer token, from a file relative to the kubeconfig
    (tmp_path / "tok").write_text("s3cret\n")
    api.add_token("s3cret", "system:node:n2", ["system:nodes"])
    tok = {**inline, "users": [{"name": files["users"][0]["name"],
                                "user": {"tokenFile": "tok"}}]}
    path.write_text(yaml.safe_dump(tok))
    access = kube.load_kubeconfig(str(path))
    assert access.token == "s3cret" and "s3cret" not in repr(access)
    r = node.k8s.CoreV1Api(kube.api_client(access)).create_node(
        {"metadata": {"name": "n2"}}, _preload_content=False)
    assert r.status == 201
    assert [q.user for q in api.request_log if q.verb == "create"] == \
        ["system:node:n1", "system:node:n2"]


@pytest.mark.parametrize("doc,fragment", [
    ("[1, 2]", "not a kubeconfig"),
    ("current-context: x\ncontexts: []\n", "no context named 'x'"),
    ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
     "clusters: [{name: k, cluster: {server: 'http://x'}}]\n"
     "users: [{name: u, user: {token: t}}]\n", "must be an https:// URL"),
    ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
     "clusters: [{name: k, cluster: {server: 'https://x', insecure-skip-tls-verify: true}}]\n"
     "users: [{name: u, user: {exec: {command: x}}}]\n", "plugins are not supported"),
    ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
     "clusters: [{name: k, cluster: {server: 'https://x', insecure-skip-tls-verify: true}}]\n"
     "users: [{name: u, user: {}}]\n", "no client certificate and no token"),
    ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
     "clusters: [{name: k, cluster: {server: 'https://x', certificate-authority: nope}}]\n"
     "users: [{name: u, user: {token: t}}]\n", "nope: No such file or directory"),
])
def test_kubeconfig_errors(tmp_path, doc, fragment):
    p = tmp_path / "kc"
    p.write_text(doc)
    with pytest.raises(kube.KubeconfigError, match=fragment):
        kube.load_kubeconfig(str(p))
    with pytest.raises(kube.KubeconfigError, match="No such file"):
        kube.load_kubeconfig(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------
# registration

def test_registration_fields(api, agents):
    t0 = time.monotonic()
    a = agents("node label example.com/rack=r1\nnode taint a.example/x=y:NoExecute\n"
               "reserve cpu 100m\n" + FAST)
    assert wait_until(lambda: ready(api), 5)
    assert time.monotonic() - t0 < 5
    n = get_node(api)
    facts = a.test_facts()
    local = platform.current().node_facts(a.cfg.state_dir)
    assert facts["boot_id"] == local["boot_id"]
    assert n["metadata"]["labels"] == {
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": goarch(facts["machine"]), "kubernetes.io/hostname": NAME,
        "example.com/rack": "r1"}
    assert n["spec"]["taints"] == [{"key": "a.example/x", "value": "y", "effect": "NoExecute"}]
    st = n["status"]
    assert st["capacity"] == {
        "cpu": str(facts["cpus"]), "memory": node.memory_quantity(facts["memory_bytes"]),
        "pods": "110", "ephemeral-storage": node.bytes_quantity(facts["state_fs_bytes"])}
    assert st["allocatable"]["cpu"] == f"{facts['cpus'] * 1000 - 100}m"
    assert st["allocatable"]["memory"] == node.memory_quantity(
        facts["memory_bytes"] - (100 << 20))
    info = st["nodeInfo"]
    assert info == {
        "machineID": facts["machine_id"], "systemUUID": facts["machine_id"],
        "bootID": facts["boot_id"], "kernelVersion": facts["os_release"],
        "osImage": facts["os_image"], "containerRuntimeVersion": f"pufflet://{__version__}",
        "kubeletVersion": f"v1.34.0+pufflet.{__version__}", "kubeProxyVersion": "",
        "operatingSystem": "linux", "architecture": goarch(facts["machine"])}
    assert st["addresses"] == [{"type": "InternalIP", "address": "127.0.0.1"},
                               {"type": "Hostname", "address": facts["hostname"].lower()}]
    assert st["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10251}}
    c = conds(n)
    assert {t: (v["status"], v["reason"]) for t, v in c.items()} == {
        "Ready": ("True", "KubeletReady"),
        "MemoryPressure": ("False", "KubeletHasSufficientMemory"),
        "DiskPressure": ("False", "KubeletHasNoDiskPressure"),
        "PIDPressure": ("False", "KubeletHasSufficientPID")}
    assert c["Ready"]["message"] == "pufflet is posting ready status"
    assert all(v["lastHeartbeatTime"] and v["lastTransitionTime"] for v in c.values())
    # only what a node may do: no GET of nodes/status, ever
    assert count(api, "get", "/status") == 0
    # (the lease is looked for before it is created)
    assert [r for r in api.request_log if r.status >= 400 and not
            (r.verb == "get" and "/leases/" in r.path and r.status == 404)] == []


def test_configured_address(api, agents):
    agents("node address 192.0.2.9\n" + FAST)
    assert wait_until(lambda: ready(api), 5)
    assert get_node(api)["status"]["addresses"][0] == {"type": "InternalIP",
                                                       "address": "192.0.2.9"}


def test_adopts_existing_node(api, agents, caplog):
    caplog.set_level(logging.INFO, "pufflet.agent")
    made = api.store.create("nodes", {"metadata": {"name": NAME, "labels": {"keep": "me"}},
                                      "status": {"conditions": [{
                                          "type": "Ready", "status": "True",
                                          "lastTransitionTime": "2020-01-01T00:00:00Z",
                                          "lastHeartbeatTime": "2020-01-01T00:00:00Z"}]}})
    agents()
    assert wait_until(lambda: ready(api) and "kubernetes.io/os" in
                      get_node(api)["metadata"]["labels"], 5)
    n = get_node(api)
    assert n["metadata"]["uid"] == made["metadata"]["uid"]
    assert n["metadata"]["labels"]["keep"] == "me"
    # Ready did not flip: its transition time is kept
    assert conds(n)["Ready"]["lastTransitionTime"] == "2020-01-01T00:00:00Z"
    assert "adopted existing node n1" in caplog.text
    assert wait_until(lambda: "lacks the configured taints pufflet.io/openbsd=true:"
                      "NoSchedule" in caplog.text, 2)
    assert count(api, "get", f"/nodes/{NAME}") == 1


# ---------------------------------------------------------------------------
# heartbeats

def test_lease_cadence_and_owner(api, agents):
    agents()        # lease duration 1 s: renewed every 0.25 s
    assert wait_until(lambda: ready(api), 5)
    assert wait_until(lambda: get_lease(api)["metadata"].get("ownerReferences"), 2)
    mark = len(api.request_log)
    time.sleep(2.0)
    n = count(api, "update", "/leases/n1", mark)
    assert 6 <= n <= 9, n         # 2 s / 0.25 s = 8, jitter makes it fewer
    lease = get_lease(api)
    assert lease["spec"]["holderIdentity"] == NAME
    assert lease["spec"]["leaseDurationSeconds"] == 1
    assert lease["metadata"]["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "Node", "name": NAME,
        "uid": get_node(api)["metadata"]["uid"]}]
    assert len(lease["spec"]["renewTime"]) == len("2025-01-01T00:00:00.000000Z")


def test_status_posted_on_change_only(api, agents):
    a = agents()    # computed every 0.1 s, reported every 100 s
    assert wait_until(lambda: ready(api), 5)
    time.sleep(0.3)
    mark = len(api.request_log)
    time.sleep(1.0)
    assert count(api, "patch", "/status", mark) == 0
    before = conds(get_node(api))
    a.test_facts.override = {"memory_available_bytes": 1 << 20}
    assert wait_until(lambda: conds(get_node(api))["MemoryPressure"]["status"] == "True", 3)
    time.sleep(0.5)
    after = conds(get_node(api))
    assert count(api, "patch", "/status", mark) == 1
    mp = after["MemoryPressure"]
    assert (mp["reason"], mp["message"]) == ("KubeletHasInsufficientMemory",
                                             "kubelet has insufficient memory available")
    assert mp["lastTransitionTime"] >= before["MemoryPressure"]["lastTransitionTime"]
    assert after["Ready"]["lastTransitionTime"] == before["Ready"]["lastTransitionTime"]
    a.test_facts.override = {}
    assert wait_until(lambda: conds(get_node(api))["MemoryPressure"]["status"] == "False", 3)


def test_status_reported_when_unchanged(api, agents):
    agents("node status interval 0.1\nnode status report 0.5\nnode lease duration 5\n")
    assert wait_until(lambda: ready(api), 5)
    mark = len(api.request_log)
    time.sleep(2.0)
    assert 3 <= count(api, "patch", "/status", mark) <= 5


def test_api_outage_and_recovery(api, agents, caplog):
    caplog.set_level(logging.INFO, "pufflet.agent")
    agents()
    assert wait_until(lambda: ready(api), 5)
    assert wait_until(lambda: get_lease(api)["metadata"].get("ownerReferences"), 2)
    before = get_lease(api)["spec"]["renewTime"]
    api.pause()
    time.sleep(1.5)
    assert "cannot connect; retrying" in caplog.text
    mark = len(api.request_log)
    api.resume()
    assert wait_until(lambda: get_lease(api)["spec"]["renewTime"] > before, 5)
    assert wait_until(lambda: "renewed again" in caplog.text, 5)
    assert ready(api)
    # backed off: an error is logged once, not at every retry
    assert caplog.text.count("renewing lease kube-node-lease/n1: cannot connect") == 1
    assert [r for r in api.request_log[mark:] if r.status >= 400] == []


def test_lease_backoff_on_errors(api, agents):
    agents()
    assert wait_until(lambda: ready(api), 5)
    api.fail_next(4, 500, method="PUT", path="leases")
    mark = len(api.request_log)
    t0 = time.monotonic()
    assert wait_until(lambda: any(r.verb == "update" and r.status == 200
                                  for r in api.request_log[mark:]), 5)
    # four failures (answered before the request log): at least
    # 0.05 + 0.1 + 0.2 + 0.4 s of backoff in between
    assert time.monotonic() - t0 >= 0.7
    assert api._take_failure("PUT", "/leases/n1") is None


def test_conflicts_reread_and_retry(api, agents):
    agents()
    assert wait_until(lambda: ready(api), 5)
    # someone else writes the lease: our resourceVersion is stale
    assert wait_until(lambda: get_lease(api)["metadata"].get("ownerReferences"), 2)
    lease = get_lease(api)
    lease["spec"]["holderIdentity"] = "intruder"
    api.store.update("leases.coordination.k8s.io", lease)
    assert wait_until(lambda: get_lease(api)["spec"]["holderIdentity"] == NAME, 3)
    log = [(r.verb, r.status) for r in api.request_log if "/leases/n1" in r.path]
    i = log.index(("update", 409))
    assert log[i + 1:i + 3] == [("get", 200), ("update", 200)]
    # and the Node's conditions, behind its back: put right at once
    n = get_node(api)
    for c in n["status"]["conditions"]:
        if c["type"] == "Ready":
            c["status"], c["reason"] = "False", "Meddling"
    api.store.update("nodes", n, subresource="status")
    assert not ready(api)
    assert wait_until(lambda: ready(api), 3)


def test_deleted_node_is_recreated(api, agents):
    agents()
    assert wait_until(lambda: ready(api), 5)
    old = get_node(api)["metadata"]["uid"]
    api.store.delete("nodes", "", NAME)
    assert wait_until(lambda: ready(api) and get_node(api)["metadata"]["uid"] != old, 5)
    new = get_node(api)["metadata"]["uid"]
    assert wait_until(
        lambda: get_lease(api)["metadata"]["ownerReferences"][0]["uid"] == new, 3)
    assert count(api, "create", "/api/v1/nodes") == 2


def test_forbidden_is_reported(api, agents, caplog):
    caplog.set_level(logging.INFO, "pufflet.agent")
    api.deny("system:node:n1", "patch", "nodes/status")
    agents()
    assert wait_until(lambda: "refused by the API server" in caplog.text, 5)
    line = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()][0]
    assert line.startswith("patch nodes/n1/status: refused by the API server: 403 Forbidden")
    assert 'User "system:node:n1" cannot patch resource "nodes/status"' in line
    assert [r.levelname for r in caplog.records if "refused" in r.getMessage()] == ["ERROR"]
    # the lease is not affected
    assert wait_until(lambda: count(api, "update", "/leases/n1") >= 2, 3)


def test_registration_forbidden_then_allowed(api, agents, caplog):
    caplog.set_level(logging.INFO, "pufflet.agent")
    api.deny("system:node:n1", "create", "nodes")
    agents()
    assert wait_until(lambda: "create Node n1: refused" in caplog.text, 5)
    api.authz.rules.clear()
    assert wait_until(lambda: ready(api), 10)


# ---------------------------------------------------------------------------
# the whole daemon

def test_daemon_joins_ready_within_5s(public_tmp):
    # in a directory the agent can reach, so that its sandbox can list
    # the kubeconfig (the files are read as root before the drop)
    api = ApiServer(public_tmp / "api").start()
    kc = api.kubeconfig("system:node:test-node")
    cfg = write_config(public_tmp, f'kubeconfig "{kc}"\nnode lease duration 2\n')
    t0 = time.monotonic()
    d = Daemon(cfg)
    try:
        assert wait_until(lambda: ready(api, "test-node"), 5), "\n".join(d.lines)
        assert time.monotonic() - t0 < 5
        first = get_lease(api, "test-node")["spec"]["renewTime"]
        assert wait_until(lambda: get_lease(api, "test-node")["spec"]["renewTime"] > first, 3)
        d.wait_for(r"joining the cluster at https://127.0.0.1:\d+ as node test-node")
        assert all(r.user == "system:node:test-node" for r in api.request_log)
        assert not [line for line in d.lines if "Traceback" in line
                    or "no sandbox" in line]
    finally:
        d.stop()
        api.stop()
    assert not api.bugs


def test_status_lists_stored_images(api, agents, tmp_path):
    """node.status.images comes from the parent's store: tag names plus the
    digest reference, biggest first, and a new image is posted at once."""
    import imagetools
    from pufflet.priv.imagestore import Store

    a = agents()
    assert wait_until(lambda: ready(api))
    assert get_node(api)["status"].get("images", []) == []
    store = Store(str(tmp_path / "images"))
    small = imagetools.add_image(store, "example.org/tools/small:1",
                                 [imagetools.layer(("file", "a", "x"))])
    big = imagetools.add_image(store, "example.org/tools/big:2",
                               [imagetools.layer(("file", "b", "y" * 100000))])
    a.wake.set()
    assert wait_until(lambda: len(get_node(api)["status"].get("images", [])) == 2)
    images = get_node(api)["status"]["images"]
    assert images[0]["names"] == ["example.org/tools/big:2",
                                  f"example.org/tools/big@{big.digest}"]
    assert images[0]["sizeBytes"] == big.size > small.size == images[1]["sizeBytes"]


def test_pod_cidr_set_before_registration_returns_is_kept(api, agents):
    """The controller manager gives the podCIDR as soon as the Node exists;
    the watch may bring that update before register() knows the new
    Node's uid.  It must not be lost (pods would wait for it for minutes)."""
    a = agents(start=False)
    create = a.core.create_node

    def create_then_allocate(body, **kw):
        resp = create(body, **kw)
        made = api.store.get("nodes", "", NAME)
        made["spec"]["podCIDR"], made["spec"]["podCIDRs"] = "10.9.0.0/24", ["10.9.0.0/24"]
        a._observe("MODIFIED", api.store.update("nodes", made))
        return resp
    a.core.create_node = create_then_allocate
    a.register()
    assert a.pod_cidr == "10.9.0.0/24"
