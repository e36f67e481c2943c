"""The agent's pod workers end to end: the API emulator over real HTTPS on
one side, the real parent pod runtime (priv/pods.py: real pod roots, real
pod uids, real processes in real chroots) on the other, over a real
privsep channel.  The image is built from this host's /bin/sh and a few
tools into a real image store, and pods use imagePullPolicy Never."""

import json
import logging
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client as k8s

from apiserver import ApiServer
from daemon import wait_until
from imagetools import add_image, layer
from pufflet import config
from pufflet.agent import kube
from pufflet.agent.pods import PodManager
from pufflet.agent.runtime import Runtime
from pufflet.images import registry
from pufflet.images.privstore import PrivStore
from pufflet.images.puller import Puller
from pufflet.privsep import spec as specmod
from pufflet.privsep.channel import Client, Server

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="needs Linux and root: real chroots as real pod uids")

NODE = "pn1"
IMAGE = "local/shell:1"
TOOLS = ("/bin/sh", "/bin/sleep", "/bin/cat")
UID_MIN = 3_300_000


# ---------------------------------------------------------------------------
# the parent, in this process: PodRuntime + Services behind a real Server

def _libs(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    return re.findall(r"(/\S+) \(0x", out) + re.findall(r"^\s*(/\S+) \(0x", out, re.M)


def shell_layer() -> bytes:
    files = {}
    for tool in TOOLS:
        real = os.path.realpath(tool)
        files["bin/" + os.path.basename(tool)] = real
        for lib in _libs(real):
            files[lib.lstrip("/")] = os.path.realpath(lib)
    dirs = sorted({os.path.dirname(p) for p in files for _ in [0]})
    entries = []
    seen = set()
    for d in dirs:
        parts = d.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and sub not in seen:
                seen.add(sub)
                entries.append(("dir", sub))
    for dest, src in sorted(files.items()):
        entries.append(("file", dest, Path(src).read_bytes(), 0o755))
    entries.append(("dir", "tmp", 0o1777))
    return layer(*entries)


class Parent:
    """The daemon's parent, reduced to what pods need: one selector loop
    over the channel and the process watcher, as supervisor.run() does."""

    def __init__(self, cfg):
        from pufflet.priv.pods import PodRuntime
        from pufflet.priv.services import Services
        from pufflet.priv.imagestore import Store
        self.cfg = cfg
        self.store = None

        def store():
            if self.store is None:
                self.store = Store(os.path.join(cfg.state_dir, "images"))
            return self.store
        self.pods = PodRuntime(cfg, store)
        self.pods.logger.connect()
        spec = specmod.load()
        mine, theirs = socket.socketpair()
        self.server = Server(theirs, spec, Services(cfg, spec, self.pods).table(),
                             logging.getLogger("test.priv"))
        self.pods.waker = self.server.wake
        self.pods.reaper = self._reap
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        self.client = Client(mine, spec)
        self.client.call("Handshake", {"spec_version": spec.version,
                                       "spec_digest": spec.digest, "agent_version": "t"})

    def _reap(self):
        """The supervisor's waitpid(-1), limited to the pods' own children:
        this is pytest's process, whose other children are not ours."""
        for pid in list(self.pods.procs):
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got:
                self.pods.child_exited(pid, status)

    def _loop(self):
        sel = selectors.DefaultSelector()
        sel.register(self.server.fileno(), selectors.EVENT_READ, "agent")
        sel.register(self.pods.fileno(), selectors.EVENT_READ, "pods")
        while not self.stopping:
            events = sel.select(0 if self.server.busy() else 0.2)
            for key, _ in events:
                if key.data == "pods":
                    self.pods.poll()
                elif not self.server.on_readable():
                    return
            if not events and not self.server.on_idle():
                return
            self.pods.poll()

    def close(self):
        for pod_uid in list(self.pods.pods):
            try:
                self.pods.remove_pod({"pod_uid": pod_uid}, [])
            except Exception:
                pass
        self.stopping = True
        self.client.close()
        self.thread.join(5)
        self.pods.close()


# ---------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def image_layer():
    return shell_layer()


@pytest.fixture
def cfg(public_tmp, image_layer):
    state = public_tmp / "state"
    state.mkdir(mode=0o711)
    (public_tmp / "log").mkdir()
    text = (f'node name "{NODE}"\nstate directory "{state}"\n'
            f'log directory "{public_tmp}/log"\n'
            f'pod uid range {UID_MIN} {UID_MIN + 199}\nmax pods 20\n')
    from pufflet.priv.imagestore import Store
    st = Store(str(state / "images"))
    add_image(st, IMAGE, [image_layer], config={"Cmd": ["/bin/sh"], "WorkingDir": "/"})
    st.close()
    return config.parse(text)


@pytest.fixture
def parent(cfg):
    p = Parent(cfg)
    yield p
    p.close()


@pytest.fixture
def api(tmp_path):
    server = ApiServer(tmp_path / "api", bookmark_interval=0.5).start()
    yield server
    server.stop()
    assert not server.bugs, "\n".join(server.bugs)


@pytest.fixture
def admin(api):
    c = kube.api_client(kube.load_kubeconfig(str(api.kubeconfig("admin"))))
    return k8s.CoreV1Api(c)


@pytest.fixture
def node_obj(admin):
    return admin.create_node({"metadata": {"name": NODE}}, _preload_content=False)


@pytest.fixture
def manager(cfg, parent, api, node_obj):
    made = []

    def make(static_dir=None, standalone=False):
        c = cfg
        if static_dir is not None:
            c = config.parse(f'node name "{NODE}"\nstate directory "{cfg.state_dir}"\n'
                             f'log directory "{cfg.log_dir}"\n'
                             f'pod uid range {UID_MIN} {UID_MIN + 199}\nmax pods 20\n'
                             f'static pods "{static_dir}"\n')
        api_client = None
        node_uid = None
        if not standalone:
            access = kube.load_kubeconfig(str(api.kubeconfig(f"system:node:{NODE}")))
            api_client = kube.api_client(access)
            node_uid = json.loads(node_obj.data)["metadata"]["uid"]
        stop = threading.Event()
        runtime = Runtime(parent.client, None, stop)
        puller = Puller(PrivStore(parent.client), registry.Client())
        m = PodManager(c, runtime, puller, api=api_client, node_uid=lambda: node_uid,
                       host_ip=lambda: "127.0.0.1", stop=stop, resync=1.0,
                       backoff_base=0.5, backoff_max=2.0, static_interval=0.3)
        m.start()
        made.append(m)
        return m
    yield make
    for m in made:
        m.close()


def pod(name, *containers, restart="Always", init=(), grace=30, **spec):
    def cont(c):
        if isinstance(c, dict):
            c = dict(c)
        else:
            c = {"name": c[0], "command": ["/bin/sh", "-c", c[1]]}
        c.setdefault("image", IMAGE)
        c.setdefault("imagePullPolicy", "Never")
        return c
    body = {"metadata": {"name": name},
            "spec": {"nodeName": NODE, "restartPolicy": restart,
                     "terminationGracePeriodSeconds": grace,
                     "containers": [cont(c) for c in containers], **spec}}
    if init:
        body["spec"]["initContainers"] = [cont(c) for c in init]
    return body


def create(admin, body, ns="default"):
    return json.loads(admin.create_namespaced_pod(ns, body, _preload_content=False).data)


def get(admin, name, ns="default"):
    try:
        return json.loads(admin.read_namespaced_pod(name, ns, _preload_content=False).data)
    except k8s.ApiException as e:
        if e.status == 404:
            return None
        raise


def wait_pod(admin, name, pred, timeout=15.0):
    got = {}

    def check():
        p = get(admin, name)
        got["pod"] = p
        return p is not None and pred(p)
    if not wait_until(check, timeout, 0.1):
        raise AssertionError(f"pod {name} never matched: "
                             + json.dumps((got.get("pod") or {}).get("status"), indent=1))
    return got["pod"]


def events(admin, name, ns="default"):
    doc = json.loads(admin.list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name}", _preload_content=False).data)
    return [(e["type"], e["reason"], e["message"]) for e in doc["items"]]


def wait_event(admin, name, pred, timeout=10.0):
    """Events are posted by a thread of their own: wait for one."""
    got = []

    def check():
        got[:] = events(admin, name)
        return any(pred(e) for e in got)
    assert wait_until(check, timeout, 0.1), f"no such event for {name}: {got}"
    return got


def cstatus(p, name, field="containerStatuses"):
    for c in p["status"].get(field) or ():
        if c["name"] == name:
            return c
    return None


def cond(p, ctype):
    for c in p["status"].get("conditions") or ():
        if c["type"] == ctype:
            return c["status"]
    return None


# ---------------------------------------------------------------------------
# tests

def test_pod_runs_and_is_ready(admin, manager, api):
    manager()
    create(admin, pod("web", ("main", "sleep 30")))
    p = wait_pod(admin, "web", lambda p: p["status"].get("phase") == "Running"
                 and cond(p, "Ready") == "True")
    cs = cstatus(p, "main")
    assert cs["ready"] is True and cs["started"] is True
    assert cs["restartCount"] == 0
    assert "running" in cs["state"] and cs["state"]["running"]["startedAt"]
    assert cs["containerID"].startswith("pufflet://")
    assert cs["imageID"].endswith(cs["imageID"].split("@")[-1]) and "@sha256:" in cs["imageID"]
    assert p["status"]["hostIP"] == "127.0.0.1" and p["status"]["podIP"] == "127.0.0.1"
    for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready"):
        assert cond(p, t) == "True", t
    got = wait_event(admin, "web", lambda e: e[1] == "Started")
    assert {"Pulled", "Created", "Started"} <= {e[1] for e in got}


def test_exit_zero_never_succeeds(admin, manager):
    manager()
    create(admin, pod("once", ("main", "exit 0"), restart="Never"))
    p = wait_pod(admin, "once", lambda p: p["status"].get("phase") == "Succeeded")
    term = cstatus(p, "main")["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"


def test_crash_loop_backs_off(admin, manager):
    manager()
    create(admin, pod("crash", ("main", "exit 3")))
    p = wait_pod(admin, "crash", lambda p: (cstatus(p, "main") or {}).get("restartCount", 0) >= 2
                 and "waiting" in cstatus(p, "main")["state"], timeout=20)
    cs = cstatus(p, "main")
    assert cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert cs["lastState"]["terminated"]["exitCode"] == 3
    assert cs["lastState"]["terminated"]["reason"] == "Error"
    assert p["status"]["phase"] == "Running"
    wait_event(admin, "crash", lambda e: e[1] == "BackOff")


def test_init_container_failure_fails_pod(admin, manager):
    manager()
    create(admin, pod("initfail", ("main", "sleep 30"), restart="Never",
                      init=[("first", "exit 0"), ("second", "exit 7")]))
    p = wait_pod(admin, "initfail", lambda p: p["status"].get("phase") == "Failed")
    assert cstatus(p, "first", "initContainerStatuses")["state"]["terminated"]["exitCode"] == 0
    assert cstatus(p, "second", "initContainerStatuses")["state"]["terminated"]["exitCode"] == 7
    main = cstatus(p, "main")
    assert main is None or "waiting" in main["state"]


def test_env_from_config_map(admin, manager):
    admin.create_namespaced_config_map("default", {"metadata": {"name": "cm"},
                                                   "data": {"greeting": "hello"}})
    manager()
    c = {"name": "main", "command": ["/bin/sh", "-c", 'test "$GREETING" = hello && '
                                     'test "$(cat /etc/cfg/greeting)" = hello'],
         "env": [{"name": "GREETING", "valueFrom": {"configMapKeyRef": {
             "name": "cm", "key": "greeting"}}}],
         "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}]}
    create(admin, pod("envpod", c, restart="Never",
                      volumes=[{"name": "cfg", "configMap": {"name": "cm"}}]))
    p = wait_pod(admin, "envpod", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"))
    assert p["status"]["phase"] == "Succeeded", p["status"]


def test_config_maps_read_once_for_pods_starting_together(admin, manager, api):
    """A ConfigMap two pods mount, and kube-root-ca.crt (in every pod's
    service account volume), are read once for pods starting within
    OBJECT_TTL of each other, and again after it (once: the read that
    overlaps CreatePod serves the volumes made after it)."""
    admin.create_namespaced_config_map("default", {"metadata": {"name": "shared"},
                                                   "data": {"k": "v"}})
    m = manager()

    def reads(name):
        return sum(1 for r in api.request_log
                   if r.verb == "get" and r.path.endswith(f"/configmaps/{name}")
                   and r.user == f"system:node:{NODE}")

    def start(name):
        c = {"name": "c", "command": ["/bin/sh", "-c", "test -r /etc/cfg/k && sleep 60"],
             "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}]}
        create(admin, pod(name, c, grace=0,
                          volumes=[{"name": "cfg", "configMap": {"name": "shared"}}]))

    start("share-a")
    start("share-b")
    for name in ("share-a", "share-b"):
        wait_pod(admin, name, lambda p: p["status"].get("phase") == "Running")
    assert (reads("shared"), reads("kube-root-ca.crt")) == (1, 1)
    with m.lock:
        m._objects.clear()      # as OBJECT_TTL later
    start("share-c")
    wait_pod(admin, "share-c", lambda p: p["status"].get("phase") == "Running")
    assert (reads("shared"), reads("kube-root-ca.crt")) == (2, 2)


def test_volume_reads_overlap_create_pod(admin, manager, api, monkeypatch):
    """The service account token (and kube-root-ca.crt) are asked for
    while the parent builds the pod root, not after it: here CreatePod
    waits until the TokenRequest has reached the API server."""
    real = Runtime.create_pod
    overlapped = []

    def token_asked():
        return any(r.verb == "create" and r.path.endswith("/token") for r in api.request_log)

    def create_pod(self, req):
        overlapped.append(wait_until(token_asked, 10, 0.01))
        return real(self, req)
    monkeypatch.setattr(Runtime, "create_pod", create_pod)
    manager()
    create(admin, pod("overlap", ("c", "sleep 60"), grace=0))
    wait_pod(admin, "overlap", lambda p: p["status"].get("phase") == "Running")
    assert overlapped == [True]


def test_one_time_event_logged_once(admin, manager, caplog):
    # The node has no podCIDR: one NoPodCIDR event, and one log line of it.
    caplog.set_level(logging.INFO, logger="pufflet.agent")
    manager()
    create(admin, pod("nocidr", ("c", "sleep 60"), grace=0))
    wait_pod(admin, "nocidr", lambda p: p["status"].get("phase") == "Running")
    wait_event(admin, "nocidr", lambda e: e[1] == "NoPodCIDR")
    assert sum("NoPodCIDR" in r.getMessage() for r in caplog.records) == 1


def test_volume_files_made_once_the_pod_address_is_known(admin, manager, monkeypatch):
    """The reads overlap CreatePod, the files do not: a downward API
    status.podIP is the address CreatePod gave (here a made-up one, as
    the Linux twin's pod networks are not set up in this test)."""
    real = Runtime.create_pod

    def create_pod(self, req):
        return {**real(self, req), "pod_ip": "10.1.2.3"}
    monkeypatch.setattr(Runtime, "create_pod", create_pod)
    manager()
    c = {"name": "c", "command": ["/bin/sh", "-c", 'test "$(cat /etc/info/ip)" = 10.1.2.3'],
         "volumeMounts": [{"name": "info", "mountPath": "/etc/info"}]}
    create(admin, pod("podip", c, restart="Never", volumes=[{"name": "info", "downwardAPI": {
        "items": [{"path": "ip", "fieldRef": {"fieldPath": "status.podIP"}}]}}]))
    p = wait_pod(admin, "podip", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"))
    assert p["status"]["phase"] == "Succeeded", p["status"]


def test_delete_stops_and_deletes_with_grace_zero(admin, manager, api, parent):
    manager()
    script = 'trap "exit 0" TERM; while :; do sleep 0.1; done'
    created = create(admin, pod("victim", ("main", script)))
    wait_pod(admin, "victim", lambda p: p["status"].get("phase") == "Running")
    t0 = time.monotonic()
    admin.delete_namespaced_pod("victim", "default")
    assert wait_until(lambda: get(admin, "victim") is None, 10)
    assert time.monotonic() - t0 < 5, "SIGTERM was not honoured before the grace period"
    deletes = [r for r in api.request_log if r.verb == "delete" and "victim" in r.path
               and r.user == f"system:node:{NODE}"]
    assert deletes and deletes[-1].status == 200
    assert created["metadata"]["uid"] not in parent.pods.pods
    wait_event(admin, "victim", lambda e: e[1] == "Killing")


def test_liveness_failure_restarts(admin, manager):
    manager()
    c = {"name": "main", "command": ["/bin/sh", "-c", "sleep 60"],
         "livenessProbe": {"exec": {"command": ["/bin/sh", "-c", "exit 1"]},
                           "periodSeconds": 1, "failureThreshold": 1,
                           "terminationGracePeriodSeconds": 1}}
    create(admin, pod("sick", c))
    wait_pod(admin, "sick", lambda p: (cstatus(p, "main") or {}).get("restartCount", 0) >= 1,
                 timeout=20)
    wait_event(admin, "sick", lambda e: e[1] == "Unhealthy" and "Liveness probe failed" in e[2])
    wait_event(admin, "sick", lambda e: e[1] == "Killing")


def test_readiness_flips_ready(admin, manager):
    manager()
    c = {"name": "main",
         "command": ["/bin/sh", "-c", "sleep 1; echo x > /tmp/ready; sleep 3; "
                     ": > /tmp/ready; sleep 60"],
         "readinessProbe": {"exec": {"command": ["/bin/sh", "-c", "test -s /tmp/ready"]},
                            "periodSeconds": 1}}
    create(admin, pod("flip", c))
    wait_pod(admin, "flip", lambda p: p["status"].get("phase") == "Running"
             and cond(p, "Ready") == "False")
    wait_pod(admin, "flip", lambda p: cond(p, "Ready") == "True"
             and cstatus(p, "main")["ready"] is True)
    wait_pod(admin, "flip", lambda p: cond(p, "Ready") == "False"
             and cstatus(p, "main")["ready"] is False, timeout=10)


def test_admission_refuses_privileged(admin, manager):
    manager()
    c = {"name": "main", "command": ["/bin/sh", "-c", "sleep 1"],
         "securityContext": {"privileged": True}}
    create(admin, pod("priv", c))
    p = wait_pod(admin, "priv", lambda p: p["status"].get("phase") == "Failed")
    assert p["status"].get("reason") and "privileged" in p["status"].get("message", "")
    wait_event(admin, "priv", lambda e: e[0] == "Warning" and "privileged" in e[2])


STATIC = """apiVersion: v1
kind: Pod
metadata:
  name: hello
spec:
  containers:
  - name: hello
    image: local/shell:1
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "sleep 60"]
"""


def test_static_pod_standalone(manager, parent, public_tmp):
    d = public_tmp / "manifests"
    d.mkdir()
    (d / "hello.yaml").write_text(STATIC)
    manager(static_dir=str(d), standalone=True)

    def running():
        return any(c["running"] for p in parent.pods.pods.values()
                   for c in p["containers"].values())
    assert wait_until(running, 15)
    (pod_uid,) = parent.pods.pods
    assert re.fullmatch(r"[0-9a-f]{32}", pod_uid)
    assert parent.pods.pods[pod_uid]["name"] == f"hello-{NODE}"
    (d / "hello.yaml").unlink()
    assert wait_until(lambda: not parent.pods.pods, 45)


def test_mirror_pod(admin, manager, public_tmp):
    d = public_tmp / "manifests"
    d.mkdir()
    (d / "hello.yaml").write_text(STATIC)
    manager(static_dir=str(d))
    p = wait_pod(admin, f"hello-{NODE}", lambda p: p["status"].get("phase") == "Running")
    ann = p["metadata"]["annotations"]
    assert ann["kubernetes.io/config.source"] == "file"
    assert re.fullmatch(r"[0-9a-f]{32}", ann["kubernetes.io/config.mirror"])
    (owner,) = p["metadata"]["ownerReferences"]
    assert owner["kind"] == "Node" and owner["name"] == NODE and owner["controller"]
    # Deleting the mirror pod does not stop the static pod: it comes back.
    old = p["metadata"]["uid"]
    admin.delete_namespaced_pod(f"hello-{NODE}", "default", grace_period_seconds=0)
    wait_pod(admin, f"hello-{NODE}", lambda p: p["metadata"]["uid"] != old
             and p["status"].get("phase") == "Running")
    # The file goes: the pod stops and its mirror is deleted.
    (d / "hello.yaml").unlink()
    assert wait_until(lambda: get(admin, f"hello-{NODE}") is None, 45)
