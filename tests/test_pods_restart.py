"""Restart safety, end to end: the real daemon (both halves) against the
API emulator runs a pod of real processes; pufflet is killed with SIGKILL
and started again; the pod must not notice.

The daemon runs below a subreaper that plays init (tests/daemon.py), so
a container that ends while pufflet is down is reaped as on a real
machine, and its exit status is lost to pufflet as it would be there."""

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client as k8s

from apiserver import ApiServer
from daemon import Daemon, alive, status, wait_until, write_config
from imagetools import add_image
from pufflet.agent import kube
from test_pods_agent import IMAGE, shell_layer

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="needs Linux and root: the real daemon, real chroots, real pod uids")

NODE = "test-node"
# A range of its own, and of this run's (from the pid): pod uids are
# killed by uid, and two runs on one machine must not kill each other's.
UID_MIN = 3_470_000 + (os.getpid() % 500) * 50

MAIN = 'i=0; while :; do i=$((i+1)); echo "tick $i"; sleep 0.1; done'
# Ends once told to; its next run stays.
QUICK = ('[ -e /tmp/stopped ] && exec sleep 600; '
         'while [ ! -e /tmp/stop ]; do sleep 0.05; done; : > /tmp/stopped; exit 3')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_json(admin, name):
    try:
        return json.loads(admin.read_namespaced_pod(name, "default",
                                                    _preload_content=False).data)
    except k8s.ApiException as e:
        if e.status == 404:
            return None
        raise


def cstatus(p, name):
    return next((c for c in (p or {}).get("status", {}).get("containerStatuses") or ()
                 if c["name"] == name), None)


def ready(p):
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in (p or {}).get("status", {}).get("conditions") or ())


def wait_pod(admin, name, pred, timeout=20.0):
    got = {}

    def check():
        got["p"] = pod_json(admin, name)
        return got["p"] is not None and pred(got["p"])
    assert wait_until(check, timeout, 0.1), json.dumps((got.get("p") or {}).get("status"),
                                                       indent=1)
    return got["p"]


def held(state: Path) -> dict:
    """The parent's record of the pods (pods.json)."""
    return json.loads((state / "pods.json").read_text())["pods"]


def agent_of(d: Daemon) -> int:
    """The agent's pid, as the parent logs it."""
    return int(d.wait_for(r"agent started, pid (\d+)").group(1))


def ticks(log: Path) -> list[int]:
    out = []
    for line in log.read_text().splitlines():
        _, stream, tag, text = line.split(" ", 3)
        assert (stream, tag) == ("stdout", "F"), line
        out.append(int(text.split()[1]))
    return out


def test_pods_survive_sigkill_of_pufflet(public_tmp):
    api = ApiServer(public_tmp / "api", bookmark_interval=0.5).start()
    state = public_tmp / "state"
    state.mkdir(mode=0o711)
    from pufflet.priv.imagestore import Store
    st = Store(str(state / "images"))
    add_image(st, IMAGE, [shell_layer()], config={"Cmd": ["/bin/sh"], "WorkingDir": "/"})
    st.close()
    cfg = write_config(public_tmp, f'kubeconfig "{api.kubeconfig("system:node:" + NODE)}"\n'
                                   f'listen on 127.0.0.1 port {free_port()}\n'
                                   f'pod uid range {UID_MIN} {UID_MIN + 49}\nmax pods 10\n')
    admin = k8s.CoreV1Api(kube.api_client(kube.load_kubeconfig(str(api.kubeconfig("admin")))))
    daemons = []
    try:
        d1 = Daemon(cfg, subreaper=True)
        daemons.append(d1)
        assert wait_until(lambda: _node_ready(admin), 20), "the node never registered"
        uids = {}
        for name, script in (("web", MAIN), ("quick", QUICK)):
            created = json.loads(admin.create_namespaced_pod("default", {
                "metadata": {"name": name},
                "spec": {"nodeName": NODE, "terminationGracePeriodSeconds": 5,
                         "containers": [{"name": "main", "image": IMAGE,
                                         "imagePullPolicy": "Never",
                                         "command": ["/bin/sh", "-c", script]}]}},
                _preload_content=False).data)
            uids[name] = created["metadata"]["uid"]
        before = wait_pod(admin, "web", ready)
        wait_pod(admin, "quick", ready)
        main0 = cstatus(before, "main")
        main_pid = held(state)[uids["web"]]["containers"]["main"]["pid"]
        quick_pid = held(state)[uids["quick"]]["containers"]["main"]["pid"]
        log = public_tmp / "log" / "pods" / f"default_web_{uids['web']}" / "main" / "0.log"
        assert wait_until(lambda: log.exists() and len(ticks(log)) >= 3, 10)

        # Watched from outside from now on: Ready must never go away.
        seen: list[bool] = []
        watching = threading.Event()
        watching.set()

        def watch():
            while watching.is_set():
                try:
                    seen.append(ready(pod_json(admin, "web")))
                except Exception:       # noqa: BLE001 - a slow answer; ask again
                    pass
                time.sleep(0.05)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        # Both halves of pufflet die at once, as in a crash.
        agent = agent_of(d1)
        os.kill(agent, signal.SIGKILL)
        os.kill(d1.pid, signal.SIGKILL)
        assert wait_until(lambda: not alive(agent) and not alive(d1.pid), 5)
        # While it is down, one container ends (its parent, the reaper, reaps
        # it) and the other keeps writing to its log.
        (state / "pods" / uids["quick"] / "root" / "tmp" / "stop").write_text("")
        assert wait_until(lambda: not alive(quick_pid), 5)
        n_down = len(ticks(log))
        assert wait_until(lambda: len(ticks(log)) >= n_down + 3, 5), \
            "the log stopped when pufflet died"

        # Started again: it takes the pod over.
        d2 = Daemon(cfg, subreaper=True)
        daemons.append(d2)
        d2.wait_for(r"adopting them", timeout=20)
        # The one that ended is told as the kubelet tells a lost container,
        # saying why its exit status is unknown, and restarted.
        quick = cstatus(wait_pod(admin, "quick", lambda p: (cstatus(p, "main") or {}).get(
            "lastState", {}).get("terminated") is not None), "main")
        term = quick["lastState"]["terminated"]
        assert term["reason"] == "ContainerStatusUnknown" and term["exitCode"] == 137, term
        assert "exit status unknown" in term["message"] and "restart" in term["message"]
        assert quick["restartCount"] == 1
        wait_pod(admin, "quick", lambda p: ready(p) and "running" in cstatus(p, "main")["state"])
        after = pod_json(admin, "web")
        # The running container is the same process, untouched.
        main1 = cstatus(after, "main")
        assert alive(main_pid)
        assert held(state)[uids["web"]]["containers"]["main"]["pid"] == main_pid
        for k in ("containerID", "restartCount", "state", "imageID"):
            assert main1[k] == main0[k], k
        assert main1["ready"] and ready(after)
        # Ready never went away, as seen from outside all along.
        watching.clear()
        watcher.join(5)
        assert len(seen) > 20 and all(seen), "the pod was not Ready for a while"
        assert [c["lastTransitionTime"] for c in after["status"]["conditions"]
                if c["type"] == "Ready"] == \
            [c["lastTransitionTime"] for c in before["status"]["conditions"]
             if c["type"] == "Ready"]
        # Its log went on in the same file, with nothing lost.
        n = len(ticks(log))
        assert wait_until(lambda: len(ticks(log)) >= n + 3, 5)
        got = ticks(log)
        assert got == list(range(got[0], got[0] + len(got)))
        assert not (log.parent / "1.log").exists()

        # rcctl restart (SIGTERM, then a start): the same again.
        d2.stop()
        d3 = Daemon(cfg, subreaper=True)
        daemons.append(d3)
        d3.wait_for(r"adopting them", timeout=20)
        n = len(ticks(log))
        assert wait_until(lambda: len(ticks(log)) >= n + 3, 5)
        again = pod_json(admin, "web")
        assert alive(main_pid) and ready(again)
        for k in ("containerID", "restartCount", "state"):
            assert cstatus(again, "main")[k] == main0[k], k

        # And they can still be deleted: the adopted process goes too.
        admin.delete_namespaced_pod("web", "default")
        admin.delete_namespaced_pod("quick", "default")
        assert wait_until(lambda: pod_json(admin, "web") is None
                          and pod_json(admin, "quick") is None, 20)
        assert wait_until(lambda: not alive(main_pid), 5)
        assert held(state) == {}
        assert not [line for d in daemons for line in d.lines if "Traceback" in line]
    finally:
        for d in daemons:
            d.stop()
            print("\n".join(d.lines))     # shown when the test fails
        # Whatever a failure left running: every process of the test's uids.
        from pufflet.priv.pods import kill_uid
        for uid in range(UID_MIN, UID_MIN + 50):
            kill_uid(uid, uid)
        api.stop()
    assert not api.bugs, api.bugs


def _node_ready(admin) -> bool:
    try:
        n = json.loads(admin.read_node(NODE, _preload_content=False).data)
    except k8s.ApiException:
        return False
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in n.get("status", {}).get("conditions") or ())
