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
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client as k8s

from apiserver import ApiServer
from daemon import wait_until
from imagetools import add_image, host_tools_layer
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
# Pod uids are killed by uid: a range of this run's own (from the pid),
# so that two runs on one machine never kill each other's containers.
UID_MIN = 3_300_000 + (os.getpid() % 500) * 200


# ---------------------------------------------------------------------------
# the parent, in this process: PodRuntime + Services behind a real Server

def shell_layer() -> bytes:
    return host_tools_layer(TOOLS)


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
        # The loop thread first: the runtime is single-threaded, as in the
        # real parent, and remove_pod from here raced its poll().
        self.stopping = True
        self.client.close()
        self.thread.join(5)
        for pod_uid in list(self.pods.pods):
            try:
                self.pods.remove_pod({"pod_uid": pod_uid}, [])
            except Exception:
                pass
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

    def make(static_dir=None, standalone=False, extra=""):
        c = cfg
        if static_dir is not None or extra:
            c = config.parse(f'node name "{NODE}"\nstate directory "{cfg.state_dir}"\n'
                             f'log directory "{cfg.log_dir}"\n'
                             f'pod uid range {UID_MIN} {UID_MIN + 199}\nmax pods 20\n'
                             + (f'static pods "{static_dir}"\n' if static_dir else "")
                             + extra)
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
                       backoff_base=0.5, backoff_max=2.0, static_interval=0.3,
                       eviction_interval=0.3)
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


def log_text(cfg, p, container, restart=0):
    """A container's log as the logger wrote it (the text of each line)."""
    meta = p["metadata"]
    f = Path(cfg.log_dir) / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}" \
        / container / f"{restart}.log"
    try:
        return "\n".join(line.split(" ", 3)[3] for line in f.read_text().splitlines())
    except FileNotFoundError:
        return ""


class Probed:
    """An HTTP server on the node's loopback (pods share the node's network
    here, so a probe's 127.0.0.1 reaches it): answers each path with the
    status set in codes, and records what it was asked."""

    def __init__(self):
        import http.server
        outer = self
        self.codes = {}
        self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.seen.append((self.path, dict(self.headers)))
                code = outer.codes.get(self.path, 404)
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no" if code >= 400 else b"ok")

            def log_message(self, *a):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self):
        return [p for p, _ in self.seen]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def probed():
    srv = Probed()
    yield srv
    srv.close()


def unused_port():
    """A bound socket that does not listen (connections are refused) and
    its port; listen() on it opens the port."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


# ---------------------------------------------------------------------------
# tests

def test_pod_runs_and_is_ready(admin, manager, api):
    manager()
    create(admin, pod("web", ("main", "exec sleep 30")))
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
    create(admin, pod("initfail", ("main", "exec sleep 30"), restart="Never",
                      init=[("first", "exit 0"), ("second", "exit 7")]))
    p = wait_pod(admin, "initfail", lambda p: p["status"].get("phase") == "Failed")
    assert cstatus(p, "first", "initContainerStatuses")["state"]["terminated"]["exitCode"] == 0
    assert cstatus(p, "second", "initContainerStatuses")["state"]["terminated"]["exitCode"] == 7
    main = cstatus(p, "main")
    assert main is None or "waiting" in main["state"]


def test_sidecar_init_container(admin, manager):
    """An init container with restartPolicy Always (a native sidecar): the
    next init container waits until it has started, it runs beside the app
    container, and it is restarted when it ends, the app untouched."""
    manager()
    sidecar = {"name": "side", "restartPolicy": "Always",
               "command": ["/bin/sh", "-c", "sleep 0.5; : > /tmp/up; sleep 1.5; exit 1"],
               "startupProbe": {"exec": {"command": ["/bin/sh", "-c", "test -e /tmp/up"]},
                                "periodSeconds": 1, "failureThreshold": 30}}
    create(admin, pod("sidecar", ("main", "exec sleep 60"), restart="Never",
                      init=[sidecar, ("after", "test -e /tmp/up")]))
    p = wait_pod(admin, "sidecar", lambda p: p["status"].get("phase") == "Running"
                 and "running" in (cstatus(p, "main") or {}).get("state", {}))
    # "after" ran once the sidecar had started, and succeeded
    after = cstatus(p, "after", "initContainerStatuses")
    assert after["state"]["terminated"]["exitCode"] == 0
    p = wait_pod(admin, "sidecar", lambda p: cstatus(
        p, "side", "initContainerStatuses")["restartCount"] >= 1, timeout=10)
    assert p["status"]["phase"] == "Running"
    main = cstatus(p, "main")
    assert main["restartCount"] == 0 and "running" in main["state"]
    assert cond(p, "Initialized") == "True"


def _on_term(name, then="exit 0", before=""):
    """A container that, on its stop signal, appends its name to the shared
    /shared/order (an emptyDir), prints the file, and ends."""
    return {"name": name, "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
            "command": ["/bin/sh", "-c",
                        f"trap '{before}echo {name} >> /shared/order; echo order: $(cat /shared/order); "
                        f"{then}' "
                        "TERM; : > /tmp/up; while :; do sleep 0.05; done"]}


def _order(log):
    (line,) = [x for x in log.splitlines() if x.startswith("order: ")]
    return line.split()[1:]


def test_sidecars_stop_after_the_app_in_reverse_order(admin, manager, cfg):
    """Deletion: the app container gets its stop signal first (here it
    takes 1 s to go); the sidecars only after it exited, the last declared
    first; a sidecar's preStop hook runs at once, with the app's."""
    manager()
    s1, s2 = _on_term("s1"), _on_term("s2")
    for s in (s1, s2):
        s["restartPolicy"] = "Always"
    s2["lifecycle"] = {"preStop": {"exec": {"command": [
        "/bin/sh", "-c", "echo pre-s2 >> /shared/order"]}}}
    app = _on_term("app", before="sleep 1; ")
    create(admin, pod("order", app, init=[s1, s2], grace=10,
                      volumes=[{"name": "shared", "emptyDir": {}}]))
    p = wait_pod(admin, "order", lambda p: p["status"].get("phase") == "Running"
                 and "running" in (cstatus(p, "app") or {}).get("state", {}))
    t0 = time.monotonic()
    admin.delete_namespaced_pod("order", "default")
    assert wait_until(lambda: get(admin, "order") is None, 10)
    took = time.monotonic() - t0
    assert 1.0 <= took < 5, took
    # s1 went last: its log holds the whole file as it was then
    assert wait_until(lambda: "order: " in log_text(cfg, p, "s1"), 5)
    order = _order(log_text(cfg, p, "s1"))
    assert order == ["pre-s2", "app", "s2", "s1"], order


def test_sidecar_deaf_to_sigterm_is_killed_at_the_grace_deadline(admin, manager):
    """A sidecar that ignores its stop signal: SIGKILL when the pod's grace
    is over, not before (the app container left at once)."""
    manager()
    deaf = {"name": "deaf", "restartPolicy": "Always",
            "command": ["/bin/sh", "-c", 'trap "" TERM; while :; do sleep 0.05; done']}
    create(admin, pod("deafside", ("app", 'trap "exit 0" TERM; while :; do sleep 0.05; done'),
                      init=[deaf], grace=3))
    wait_pod(admin, "deafside", lambda p: p["status"].get("phase") == "Running"
             and "running" in (cstatus(p, "app") or {}).get("state", {}))
    t0 = time.monotonic()
    admin.delete_namespaced_pod("deafside", "default")
    assert wait_until(lambda: get(admin, "deafside") is None, 10)
    took = time.monotonic() - t0
    assert 2.8 <= took < 5.5, took


def test_sidecars_stop_when_the_app_containers_are_done(admin, manager, cfg):
    """restartPolicy Never: once the app container has ended, its sidecars
    are stopped (in reverse order, not restarted) and the pod ends
    Succeeded, its sidecars terminated."""
    manager()
    s1, s2 = _on_term("s1"), _on_term("s2")
    for s in (s1, s2):
        s["restartPolicy"] = "Always"
    app = {"name": "app", "command": ["/bin/sh", "-c", "sleep 0.5; echo app >> /shared/order"],
           "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}
    create(admin, pod("done", app, init=[s1, s2], restart="Never", grace=10,
                      volumes=[{"name": "shared", "emptyDir": {}}]))
    p = wait_pod(admin, "done", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"),
                 timeout=15)
    assert p["status"]["phase"] == "Succeeded", p["status"]
    assert cstatus(p, "app")["state"]["terminated"]["exitCode"] == 0
    for name in ("s1", "s2"):
        st = cstatus(p, name, "initContainerStatuses")
        assert "terminated" in st["state"] and st["restartCount"] == 0, st
    assert wait_until(lambda: "order: " in log_text(cfg, p, "s1"), 5)
    assert _order(log_text(cfg, p, "s1")) == ["app", "s2", "s1"]


def test_env_from_config_map(admin, manager):
    admin.create_namespaced_config_map("default", {"metadata": {"name": "cm"},
                                                   "data": {"greeting": "hello"}})
    manager()
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    c = {"name": "main", "command": ["/bin/sh", "-c", 'test "$GREETING" = hello && '
                                     'test "$(cat /etc/cfg/greeting)" = hello && '
                                     # the API server's projected kube-api-access volume
                                     f'test "$(cat {sa}/namespace)" = default && '
                                     f'case "$(cat {sa}/ca.crt)" in *"BEGIN CERTIFICATE"*) ;; '
                                     '*) exit 5;; esac && '
                                     f'case "$(cat {sa}/token)" in ?*.?*.?*) ;; *) exit 6;; esac'],
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


def test_sigkill_at_grace_and_the_images_stop_signal(admin, manager, cfg, image_layer):
    from pufflet.priv.imagestore import Store
    st = Store(os.path.join(cfg.state_dir, "images"))
    add_image(st, "local/stop:1", [image_layer], config={"Cmd": ["/bin/sh"],
                                                        "StopSignal": "SIGUSR1"})
    st.close()
    manager()
    deaf = 'trap "" TERM; trap "exit 0" USR1; while :; do sleep 0.1; done'
    create(admin, pod("stubborn", ("main", deaf), grace=1))
    create(admin, pod("stopsig", {"name": "main", "image": "local/stop:1",
                                  "command": ["/bin/sh", "-c", deaf]}, grace=30))
    for name in ("stubborn", "stopsig"):
        wait_pod(admin, name, lambda p: p["status"].get("phase") == "Running")
    t0 = time.monotonic()
    for name in ("stubborn", "stopsig"):
        admin.delete_namespaced_pod(name, "default")
    # The image says SIGUSR1: the container ends at once, its 30 s unused.
    assert wait_until(lambda: get(admin, "stopsig") is None, 5)
    # SIGTERM is ignored: SIGKILL once the 1 s grace is over, not before.
    assert wait_until(lambda: get(admin, "stubborn") is None, 5)
    assert time.monotonic() - t0 >= 1.0
    wait_event(admin, "stubborn", lambda e: e[1] == "Killing")


def test_exit_while_a_new_agent_takes_over_is_not_lost(admin, manager, parent, monkeypatch):
    """A new agent lists what the parent holds, then learns of exits from
    the stream: a container that ends between the two (before the pod's
    worker exists) must still be seen to end."""
    first = manager()
    created = create(admin, pod("handover", ("main", "exec sleep 60")))
    uid = created["metadata"]["uid"]
    wait_pod(admin, "handover", lambda p: p["status"].get("phase") == "Running")
    first.close()
    pid = parent.pods.pods[uid]["containers"]["main"]["pid"]
    listed = Runtime.list_pods

    def list_then_exit(self):
        got = listed(self)
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not parent.pods.pods[uid]["containers"]["main"]["running"],
                          5)
        return got
    monkeypatch.setattr(Runtime, "list_pods", list_then_exit)
    manager()
    p = wait_pod(admin, "handover", lambda p: cstatus(p, "main")["restartCount"] >= 1)
    term = cstatus(p, "main")["lastState"]["terminated"]
    assert term["exitCode"] == 137 and term["signal"] == 9


def test_a_new_agent_probes_and_stops_adopted_containers_as_started(admin, manager, cfg,
                                                                     image_layer):
    """Exec probes run with the container's env and working directory, and
    deletion sends the image's stop signal, after an agent restart too."""
    from pufflet.priv.imagestore import Store
    st = Store(os.path.join(cfg.state_dir, "images"))
    add_image(st, "local/stop:1", [image_layer], config={"Cmd": ["/bin/sh"],
                                                        "StopSignal": "SIGUSR1"})
    st.close()
    first = manager()
    c = {"name": "main", "image": "local/stop:1", "workingDir": "/tmp",
         "command": ["/bin/sh", "-c", 'trap "" TERM; trap "exit 0" USR1; '
                     'while :; do sleep 0.1; done'],
         "env": [{"name": "FLAG", "value": "on"}],
         "readinessProbe": {"exec": {"command": [
             "/bin/sh", "-c", 'test "$FLAG" = on && test "$(pwd)" = /tmp']},
             "periodSeconds": 1, "failureThreshold": 1}}
    create(admin, pod("adopted", c, grace=30))
    create(admin, pod("adopted2", c, grace=30))
    for name in ("adopted", "adopted2"):
        wait_pod(admin, name, lambda p: cond(p, "Ready") == "True")
    first.close()
    # Deleted while no agent runs: the new one stops it with SIGUSR1 too.
    admin.delete_namespaced_pod("adopted2", "default")
    t0 = time.monotonic()
    manager()
    assert wait_until(lambda: get(admin, "adopted2") is None, 5), "not stopped by SIGUSR1"
    time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))     # probe periods, new agent
    p = wait_pod(admin, "adopted", lambda p: cond(p, "Ready") == "True")
    assert cstatus(p, "main")["ready"] and cstatus(p, "main")["restartCount"] == 0
    assert not [e for e in events(admin, "adopted") if e[1] == "Unhealthy"]
    t0 = time.monotonic()
    admin.delete_namespaced_pod("adopted", "default")
    assert wait_until(lambda: get(admin, "adopted") is None, 5), "not stopped by SIGUSR1"
    assert time.monotonic() - t0 < 5


def test_a_finished_pod_is_not_run_again_by_a_new_agent(admin, manager, parent):
    first = manager()
    create(admin, pod("done", ("main", "echo ran >> /tmp/runs"), restart="Never"))
    create(admin, pod("evicted", ("main", "exec sleep 60")))
    p = wait_pod(admin, "done", lambda p: p["status"].get("phase") == "Succeeded")
    uid = p["metadata"]["uid"]
    assert wait_until(lambda: uid not in parent.pods.pods, 10)     # its root is gone
    # Failed for a reason the containers do not show (an eviction).
    ev = wait_pod(admin, "evicted", lambda p: p["status"].get("phase") == "Running")
    first.close()
    parent.pods.remove_pod({"pod_uid": ev["metadata"]["uid"]}, [])
    admin.patch_namespaced_pod_status("evicted", "default", {"status": {
        "phase": "Failed", "reason": "Evicted", "message": "gone"}})
    manager()
    time.sleep(1.0)         # a sync at once, another at the resync (1 s here)
    assert parent.pods.pods == {}, "a finished pod was started again"
    assert get(admin, "done")["status"]["phase"] == "Succeeded"
    p = get(admin, "evicted")
    assert (p["status"]["phase"], p["status"]["reason"]) == ("Failed", "Evicted")


def test_liveness_failure_restarts(admin, manager):
    manager()
    c = {"name": "main", "command": ["/bin/sh", "-c", "exec sleep 60"],
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
                     ": > /tmp/ready; exec sleep 60"],
         "readinessProbe": {"exec": {"command": ["/bin/sh", "-c", "test -s /tmp/ready"]},
                            "periodSeconds": 1}}
    create(admin, pod("flip", c))
    wait_pod(admin, "flip", lambda p: p["status"].get("phase") == "Running"
             and cond(p, "Ready") == "False")
    wait_pod(admin, "flip", lambda p: cond(p, "Ready") == "True"
             and cstatus(p, "main")["ready"] is True)
    wait_pod(admin, "flip", lambda p: cond(p, "Ready") == "False"
             and cstatus(p, "main")["ready"] is False, timeout=10)


def test_exec_probe_is_killed_at_its_timeout(admin, manager, parent):
    manager()
    c = {"name": "main", "command": ["/bin/sh", "-c", "exec sleep 60"],
         "readinessProbe": {"exec": {"command": [
             "/bin/sh", "-c", "echo $$ >> /tmp/probes; exec sleep 30"]},
             "periodSeconds": 1, "timeoutSeconds": 1}}
    created = create(admin, pod("slowprobe", c))
    uid = created["metadata"]["uid"]
    probes_file = Path(parent.pods._root(uid)) / "tmp" / "probes"

    def pids():
        try:
            return [int(x) for x in probes_file.read_text().split()]
        except (FileNotFoundError, ValueError):
            return []
    assert wait_until(lambda: len(pids()) >= 3, 15)
    # Each timed-out probe was killed: at most the one running now is left.
    def running(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    alive = [p for p in pids() if running(p)]
    assert len(alive) <= 1, alive
    p = get(admin, "slowprobe")
    assert cond(p, "Ready") == "False"
    wait_event(admin, "slowprobe", lambda e: e[1] == "Unhealthy"
               and "Readiness probe failed: command timed out after 1s" in e[2])


# Writes n KiB into /data, then waits.
FILL_ONLY = ('s=x; for i in 1 2 3 4 5 6 7 8 9 10; do s=$s$s; done; i=0; '
             'while [ $i -lt {n} ]; do echo "$s"; i=$((i+1)); done > /data/f')
FILL = FILL_ONLY + "; exec sleep 60"


CRITICAL = """apiVersion: v1
kind: Pod
metadata:
  name: critical
spec:
  containers:
  - name: main
    image: local/shell:1
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", {script}]
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes: [{{name: data, emptyDir: {{sizeLimit: 1Mi}}}}]
"""


def test_empty_dir_over_its_size_limit_evicts_the_pod(admin, manager, parent, monkeypatch,
                                                      public_tmp):
    from pufflet.priv import stats
    monkeypatch.setattr(stats, "DU_TTL", 0.2)
    d = public_tmp / "manifests"
    d.mkdir()
    script = json.dumps(FILL_ONLY.format(n=1500) + "; : > /data/done; exec sleep 60")
    (d / "critical.yaml").write_text(CRITICAL.format(script=script))
    manager(static_dir=str(d))
    vols = [{"name": "data", "emptyDir": {"sizeLimit": "1Mi"}}]
    for name, kib in (("big", 1500), ("small", 100)):
        c = {"name": "main", "command": ["/bin/sh", "-c", FILL.format(n=kib)],
             "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
        create(admin, pod(name, c, volumes=vols))
    p = wait_pod(admin, "big", lambda p: p["status"].get("phase") == "Failed")
    msg = 'Usage of EmptyDir volume "data" exceeds the limit "1Mi". '
    assert (p["status"]["reason"], p["status"]["message"]) == ("Evicted", msg)
    (dt,) = [c for c in p["status"]["conditions"] if c["type"] == "DisruptionTarget"]
    assert (dt["status"], dt["reason"], dt["message"]) == ("True", "TerminationByKubelet", msg)
    wait_event(admin, "big", lambda e: e == ("Warning", "Evicted", msg))
    # Killed at once, not restarted, its root gone; the object stays.
    p = wait_pod(admin, "big", lambda p: "terminated" in cstatus(p, "main")["state"])
    assert cstatus(p, "main")["state"]["terminated"]["exitCode"] == 137
    assert cstatus(p, "main")["restartCount"] == 0
    uid = p["metadata"]["uid"]
    assert wait_until(lambda: uid not in parent.pods.pods, 10)
    # Under its limit, the other pod runs on.
    p = get(admin, "small")
    assert p["status"]["phase"] == "Running" and "running" in cstatus(p, "main")["state"]
    # A static pod is critical: over its limit too, yet never evicted.
    (static_uid,) = [u for u, h in parent.pods.pods.items() if h["name"] == f"critical-{NODE}"]
    done = Path(parent.pods._root(static_uid)) / ".pufflet" / "volumes" / "data" / "done"
    assert wait_until(done.exists, 10)
    time.sleep(0.7)     # two checks at least
    assert parent.pods.pods[static_uid]["containers"]["main"]["running"]


def test_http_tcp_and_startup_probes(admin, manager, probed):
    manager()
    dead, dead_port = unused_port()
    late, late_port = unused_port()
    probed.codes.update({"/ready": 200, "/alive": 200})
    sleep = ["/bin/sh", "-c", "exec sleep 60"]
    ready_probe = {"httpGet": {"path": "/ready", "port": "web",
                               "httpHeaders": [{"name": "X-Probe", "value": "yes"}]},
                   "periodSeconds": 1, "failureThreshold": 1}
    containers = [
        {"name": "http", "command": sleep, "readinessProbe": ready_probe,
         "ports": [{"name": "web", "containerPort": probed.port}]},
        {"name": "tcp", "command": sleep,
         "livenessProbe": {"tcpSocket": {"port": dead_port}, "periodSeconds": 1,
                           "failureThreshold": 1, "terminationGracePeriodSeconds": 1}},
        {"name": "slow", "command": sleep,
         "startupProbe": {"tcpSocket": {"port": late_port}, "periodSeconds": 1,
                          "failureThreshold": 60},
         "livenessProbe": {"httpGet": {"path": "/alive", "port": probed.port},
                           "periodSeconds": 1},
         "readinessProbe": {"httpGet": {"path": "/ready", "port": probed.port},
                            "periodSeconds": 1}}]
    try:
        create(admin, pod("probes", *containers))
        # httpGet: 200 is ready, with the probe's headers, to a named port.
        p = wait_pod(admin, "probes", lambda p: (cstatus(p, "http") or {}).get("ready") is True)
        (_, headers), *_ = [x for x in probed.seen if x[0] == "/ready"]
        assert headers["X-Probe"] == "yes" and headers["User-Agent"].startswith("kube-probe/")
        # tcpSocket liveness on a refused port: killed and restarted.
        p = wait_pod(admin, "probes", lambda p: cstatus(p, "tcp")["restartCount"] >= 1)
        wait_event(admin, "probes", lambda e: e[1] == "Unhealthy"
                   and e[2].startswith(f"Liveness probe failed: dial tcp 127.0.0.1:{dead_port}"))
        # A startup probe that has not succeeded holds the others back:
        # not started, not ready, and its liveness probe never ran.
        slow = cstatus(p, "slow")
        assert slow["started"] is False and slow["ready"] is False
        assert slow["restartCount"] == 0 and "running" in slow["state"]
        assert "/alive" not in probed.paths()
        late.listen()
        p = wait_pod(admin, "probes", lambda p: cstatus(p, "slow")["started"] is True
                     and cstatus(p, "slow")["ready"] is True)
        assert wait_until(lambda: "/alive" in probed.paths(), 3)
        assert cstatus(p, "slow")["restartCount"] == 0
        # httpGet: 500 is not ready.
        probed.codes["/ready"] = 500
        wait_pod(admin, "probes", lambda p: cstatus(p, "http")["ready"] is False
                 and cond(p, "Ready") == "False")
        wait_event(admin, "probes", lambda e: e[1] == "Unhealthy" and e[2].startswith(
            "Readiness probe failed: HTTP probe failed with statuscode: 500"))
    finally:
        dead.close()
        late.close()


HOOKED = ('while [ ! -e /tmp/poststart ]; do sleep 0.05; done; echo "after $(cat /tmp/poststart)"; '
          'trap \'echo "term $(cat /tmp/prestop 2>/dev/null)"; exit 0\' TERM; '
          'while :; do sleep 0.05; done')


def test_lifecycle_hooks(admin, manager, cfg, probed):
    manager()
    probed.codes.update({"/poststart": 200, "/prestop": 200})
    hook_exec = {"name": "main", "command": ["/bin/sh", "-c", HOOKED], "lifecycle": {
        "postStart": {"exec": {"command": ["/bin/sh", "-c", "echo hook > /tmp/poststart"]}},
        "preStop": {"exec": {"command": ["/bin/sh", "-c", "echo pre > /tmp/prestop"]}}}}
    hook_http = {"name": "side", "command": ["/bin/sh", "-c", "exec sleep 60"], "lifecycle": {
        "postStart": {"httpGet": {"path": "/poststart", "port": probed.port}},
        "preStop": {"httpGet": {"path": "/prestop", "port": probed.port,
                                "httpHeaders": [{"name": "X-Hook", "value": "1"}]}}}}
    failing = {"name": "main", "command": ["/bin/sh", "-c", "exec sleep 60"], "lifecycle": {
        "postStart": {"exec": {"command": ["/bin/sh", "-c", "echo nope; exit 3"]}}}}
    create(admin, pod("hooks", hook_exec, hook_http, grace=10))
    create(admin, pod("badhook", failing, restart="Never"))
    # postStart: exec ran in the container's pod, httpGet was sent.
    p = wait_pod(admin, "hooks", lambda p: p["status"].get("phase") == "Running")
    assert wait_until(lambda: "after hook" in log_text(cfg, p, "main"), 5)
    assert "/poststart" in probed.paths()
    # A failed postStart hook: an Event, and the container is killed.
    b = wait_pod(admin, "badhook", lambda p: p["status"].get("phase") == "Failed")
    assert "terminated" in cstatus(b, "main")["state"]
    wait_event(admin, "badhook", lambda e: e[1] == "FailedPostStartHook"
               and "exited with 3" in e[2] and "nope" in e[2])
    # preStop: before the stop signal, within the grace period.
    t0 = time.monotonic()
    admin.delete_namespaced_pod("hooks", "default")
    assert wait_until(lambda: get(admin, "hooks") is None, 15)
    assert time.monotonic() - t0 < 8, "the pod waited for its grace period"
    # (the logger, a process of its own, may still be draining the pipe)
    assert wait_until(lambda: "term pre" in log_text(cfg, p, "main"), 5), \
        log_text(cfg, p, "main")
    (headers,) = [h for path, h in probed.seen if path == "/prestop"]
    assert headers["X-Hook"] == "1"


def test_config_map_and_secret_updates_reach_the_pod(admin, manager, cfg, parent, monkeypatch):
    import pufflet.agent.pods as pods_mod
    monkeypatch.setattr(pods_mod, "VOLUME_REFRESH", 0.3)
    admin.create_namespaced_config_map("default", {"metadata": {"name": "cm"},
                                                   "data": {"greeting": "hello"}})
    admin.create_namespaced_secret("default", {"metadata": {"name": "sec"},
                                               "stringData": {"token": "one"}})
    manager()
    script = ('while :; do echo "$(cat /etc/cfg/greeting) $(cat /etc/sec/token) '
              '$(cat /etc/info/labels)"; sleep 0.1; done')
    c = {"name": "main", "command": ["/bin/sh", "-c", script],
         "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"},
                          {"name": "sec", "mountPath": "/etc/sec", "readOnly": True},
                          {"name": "info", "mountPath": "/etc/info"}]}
    body = pod("upd", c, volumes=[
        {"name": "cfg", "configMap": {"name": "cm"}},
        {"name": "sec", "secret": {"secretName": "sec", "defaultMode": 0o400}},
        {"name": "info", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}])
    body["metadata"]["labels"] = {"tier": "a"}
    p = create(admin, body)
    assert wait_until(lambda: 'hello one tier="a"' in log_text(cfg, p, "main"), 10)
    vol = Path(parent.pods._root(p["metadata"]["uid"])) / ".pufflet" / "volumes"
    old_data = os.readlink(vol / "cfg" / "..data")
    admin.patch_namespaced_config_map("cm", "default", {"data": {"greeting": "bye"}})
    admin.patch_namespaced_secret("sec", "default", {"stringData": {"token": "two"}})
    admin.patch_namespaced_pod("upd", "default", {"metadata": {"labels": {"tier": "b"}}})
    # Seen by the running container, without a restart.
    assert wait_until(lambda: 'bye two tier="b"' in log_text(cfg, p, "main"), 10), \
        log_text(cfg, p, "main")
    # Swapped in whole: ..data points at a new directory, the old one goes.
    new_data = os.readlink(vol / "cfg" / "..data")
    assert new_data != old_data
    assert wait_until(lambda: not (vol / "cfg" / old_data).exists(), 5)
    assert os.readlink(vol / "cfg" / "greeting") == "..data/greeting"
    # (each volume is swapped on its own: "hello two" may be seen between)
    assert cstatus(get(admin, "upd"), "main")["restartCount"] == 0


def _claims(token):
    import base64
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_service_account_token_is_refreshed_before_it_expires(admin, manager, api, parent):
    """A projected serviceAccountToken: asked for with TokenRequest (600 s,
    the least the API server takes), which the API server shortens to 5 s
    (token_duration, as --service-account-max-token-expiration does); the
    file in the pod is replaced by a new token once 80 % of the life the
    answer gave has passed, before the old one expires, and swapped in
    whole (..data) under a reader that never sees a partial file."""
    api.token_duration = 5
    manager()
    auth = k8s.AuthenticationV1Api(admin.api_client)

    def valid(token):
        return auth.create_token_review({"spec": {"token": token}}).status.authenticated
    c = {"name": "main", "command": ["/bin/sh", "-c", "exec sleep 60"],
         "volumeMounts": [{"name": "tok", "mountPath": "/var/run/tok"}]}
    p = create(admin, pod("tok", c, volumes=[{"name": "tok", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 600}}]}}]))
    wait_pod(admin, "tok", lambda p: p["status"].get("phase") == "Running")
    vol = Path(parent.pods._root(p["metadata"]["uid"])) / ".pufflet" / "volumes" / "tok"
    first = (vol / "token").read_text()
    claims = _claims(first)
    assert claims["exp"] - claims["iat"] == 5
    assert claims["kubernetes.io"]["pod"]["uid"] == p["metadata"]["uid"]
    assert valid(first)
    data = os.readlink(vol / "..data")
    seen, errors, stop = set(), [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                seen.add((vol / "token").read_text())
            except OSError as e:
                errors.append(e)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: (vol / "token").read_text() != first, 8, 0.02)
        changed = time.time()
    finally:
        stop.set()
        reader.join(5)
    second = (vol / "token").read_text()
    # Not before 80 % of its life (less the second its iat was rounded
    # down by), and before it expired.
    assert claims["iat"] + 0.8 * 5 - 1 <= changed < claims["exp"], (changed, claims)
    assert valid(first), "the old token was replaced only after it had expired"
    assert second != first and valid(second)
    assert _claims(second)["iat"] >= claims["iat"]
    # swapped whole: a new ..data, the name still points through it, and
    # the reader saw the old token or a new one, nothing in between
    assert os.readlink(vol / "..data") != data
    assert os.readlink(vol / "token") == "..data/token"
    assert not errors, errors[:3]
    assert seen and all(t.count(".") == 2 and _claims(t)["sub"] ==
                        "system:serviceaccount:default:default" for t in seen), seen
    # the old one does expire: the refresh was needed
    assert wait_until(lambda: not valid(first), 5)


def test_admission_refuses_privileged(admin, manager):
    manager()
    c = {"name": "main", "command": ["/bin/sh", "-c", "sleep 1"],
         "securityContext": {"privileged": True}}
    create(admin, pod("priv", c))
    p = wait_pod(admin, "priv", lambda p: p["status"].get("phase") == "Failed")
    assert p["status"].get("reason") and "privileged" in p["status"].get("message", "")
    wait_event(admin, "priv", lambda e: e[0] == "Warning" and "privileged" in e[2])


def test_hostpath_is_refused_with_status_and_event(admin, manager):
    manager(extra='hostpath "/srv" read-write\n')
    c = {"name": "main", "command": ["/bin/sh", "-c", "sleep 1"],
         "volumeMounts": [{"name": "h", "mountPath": "/h"}]}
    create(admin, pod("hp", c, volumes=[{"name": "h", "hostPath": {"path": "/srv/x"}}]))
    create(admin, pod("hp2", c, volumes=[{"name": "h", "hostPath": {"path": "/etc"}}]))
    p = wait_pod(admin, "hp", lambda p: p["status"].get("phase") == "Failed")
    assert p["status"]["reason"] == "UnsupportedVolume"
    assert "hostPath /srv/x cannot be given to a pod" in p["status"]["message"]
    assert "bind mount" in p["status"]["message"]
    wait_event(admin, "hp", lambda e: e[0] == "Warning" and e[1] == "UnsupportedVolume"
               and "bind mount" in e[2])
    p = wait_pod(admin, "hp2", lambda p: p["status"].get("phase") == "Failed")
    assert "hostPath /etc is not under a prefix this node allows" in p["status"]["message"]
    wait_event(admin, "hp2", lambda e: e[1] == "UnsupportedVolume")


STATIC = """apiVersion: v1
kind: Pod
metadata:
  name: hello
spec:
  containers:
  - name: hello
    image: local/shell:1
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "exec sleep 60"]
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
