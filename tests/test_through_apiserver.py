"""kubectl's path to a pod: client -> API server -> node API -> pod.

The real daemon runs a pod from an image built offline (examples/mkimage.sh);
the kubernetes client talks only to the API emulator, which relays pods/log,
exec and portforward to the node as kube-apiserver does (apiserver/nodeproxy.py),
authenticating with its kubelet-client certificate; pufflet checks that
certificate against its `tls client ca` and asks the API server, with a
SubjectAccessReview, whether that user may use nodes/proxy."""

from __future__ import annotations

import os
import shutil
import tempfile
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client, config as kconfig
from kubernetes.client.rest import ApiException
from kubernetes.stream import portforward, stream

from apiserver import ApiServer
from daemon import REPO, Daemon, write_config

APISERVER_USER = "kube-apiserver-kubelet-client"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    tmp = Path(tempfile.mkdtemp(prefix="pufflet-test-"))
    tmp.chmod(0o755)
    api = ApiServer(tmp / "api").start()
    port = _free_port()
    cfg = write_config(tmp, f'kubeconfig "{api.kubeconfig("system:node:test-node")}"\n'
                            f"node address 127.0.0.1\n"
                            f"listen on 127.0.0.1 port {port}\n"
                            f'tls client ca "{api.ca.cert}"\n')
    env = dict(os.environ, PUFFLETCTL=f"{sys.executable} -m pufflet.ctl")
    r = subprocess.run(["sh", str(REPO / "examples/mkimage.sh"), "-f", str(cfg)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    api.allow(APISERVER_USER, "*", "nodes/proxy")
    d = Daemon(cfg)
    try:
        d.wait_for(r"node API listening on 127.0.0.1:\d+", timeout=20)
        core = client.CoreV1Api(kconfig.new_client_from_config(str(api.kubeconfig("admin"))))
        core.create_namespaced_pod("default", {
            "metadata": {"name": "web"},
            "spec": {"nodeName": "test-node", "terminationGracePeriodSeconds": 1,
                     "containers": [{
                         "name": "app", "image": "local/base:latest",
                         "imagePullPolicy": "Never",
                         "command": ["/bin/sh", "-c",
                                     "echo started; i=0; while :; do echo tick $i; "
                                     "i=$((i+1)); sleep 0.2; done"]}]}})
        deadline = time.monotonic() + 30
        while (core.read_namespaced_pod("web", "default").status.phase != "Running"):
            assert time.monotonic() < deadline, "\n".join(d.lines[-30:])
            time.sleep(0.1)
        yield api, core, d
    finally:
        d.stop()
        api.stop()
        # The pod outlives pufflet by design; end it here.
        subprocess.run(["pkill", "-KILL", "-f", "echo started; i=0"], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not api.bugs, api.bugs


def test_logs(cluster):
    _, core, _ = cluster
    text = core.read_namespaced_pod_log("web", "default")
    assert text.startswith("started\ntick 0\n")
    last = core.read_namespaced_pod_log("web", "default", tail_lines=1)
    assert last.count("\n") == 1 and last.startswith("tick ")
    stamped = core.read_namespaced_pod_log("web", "default", tail_lines=1, timestamps=True)
    assert stamped.split(" ", 1)[0].endswith("Z")
    with pytest.raises(ApiException) as e:
        core.read_namespaced_pod_log("web", "default", container="nope")
    assert e.value.status == 400 and "not valid for pod web" in e.value.body


def test_logs_follow(cluster):
    _, core, _ = cluster
    r = core.read_namespaced_pod_log("web", "default", follow=True, tail_lines=0,
                                     _preload_content=False)
    got = b""
    deadline = time.monotonic() + 10
    while got.count(b"\n") < 3 and time.monotonic() < deadline:
        got += r.read1(4096) if hasattr(r, "read1") else r.read(64)
    r.release_conn()
    lines = got.decode().splitlines()
    assert len(lines) >= 3
    n = [int(line.split()[1]) for line in lines[:3]]
    assert n[1] == n[0] + 1 and n[2] == n[1] + 1       # new lines, in order


def test_node_refuses_an_api_server_it_does_not_trust(cluster, tmp_path):
    """Closed by default, end to end: an API server whose kubelet-client
    certificate is not signed by pufflet's `tls client ca` is refused in
    the TLS handshake (the kubelet answers 401 after it; either way no
    log), which the API server reports as its own 500."""
    from apiserver.pki import CA
    api, core, _ = cluster
    other = CA(tmp_path / "other-ca")
    saved = api.kubelet_client_cert
    api.kubelet_client_cert = other.issue("impostor", APISERVER_USER, ["kubeadm:cluster-admins"])
    try:
        with pytest.raises(ApiException) as e:
            core.read_namespaced_pod_log("web", "default", _request_timeout=10)
        # Over TLS 1.3 the client may see the connection end before the
        # alert arrives; either way the handshake failed and nothing leaked.
        assert e.value.status == 500, e.value.body
        assert "UNKNOWN_CA" in e.value.body or "EOF occurred" in e.value.body, e.value.body
        assert "tick" not in e.value.body
    finally:
        api.kubelet_client_cert = saved
    assert core.read_namespaced_pod_log("web", "default", tail_lines=1).startswith("tick ")


def test_exec_through_the_api_server(cluster):
    """kubectl exec's path with the kubernetes client's stream module
    (WebSocket to the API server, relayed to the node): stdin, stdout,
    stderr apart, the exit code from the error channel's Status."""
    _, core, _ = cluster
    ws = stream(core.connect_get_namespaced_pod_exec, "web", "default", container="app",
                command=["/bin/sh", "-c", 'read l; echo "got $l"; echo oops >&2; exit 3'],
                stdin=True, stdout=True, stderr=True, tty=False, _preload_content=False)
    ws.write_stdin("hello\n")
    ws.run_forever(timeout=20)
    assert ws.read_stdout() == "got hello\n"
    assert ws.read_stderr() == "oops\n"
    assert ws.returncode == 3
    out = stream(core.connect_get_namespaced_pod_exec, "web", "default", container="app",
                 command=["/bin/sh", "-c", "echo $HOME; pwd"], stdout=True, stderr=True,
                 stdin=False, tty=False)
    assert out.splitlines()[-1] == "/"


def test_port_forward_through_the_api_server(cluster):
    """kubectl port-forward's path: the pod shares the node's network here
    (no pod CIDR), so a server on the node's 127.0.0.1 is the pod's."""
    _, core, _ = cluster
    ls = socket.create_server(("127.0.0.1", 0))
    port = ls.getsockname()[1]

    def serve():
        conn, _ = ls.accept()
        while d := conn.recv(100):
            conn.sendall(b"pod:" + d)
        conn.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        pf = portforward(core.connect_get_namespaced_pod_portforward, "web", "default",
                         ports=str(port))
        s = pf.socket(port)
        s.settimeout(10)
        s.sendall(b"ping")
        got = b""
        while len(got) < 8:
            got += s.recv(100)
        assert got == b"pod:ping" and pf.error(port) is None
        pf.close()
    finally:
        ls.close()


def test_exec_over_spdy_through_the_api_server(cluster):
    """What kubectl up to 1.30 and every API server up to 1.35 speak: SPDY
    from the client (tests/spdyclient.py, as client-go), relayed to the
    node; a tty (it echoes, with CRLF) with a resize stream, the exit code
    in the v4 Status.  (The base image has no stty(1): test_remotecommand
    checks the window size itself.)"""
    import json
    import ssl
    import urllib.parse
    import yaml
    import spdyclient as sc
    api, _, _ = cluster
    user = yaml.safe_load(api.kubeconfig("admin").read_text())["users"][0]["user"]
    ctx = ssl.create_default_context(cafile=str(api.ca.cert))
    ctx.load_cert_chain(user["client-certificate"], user["client-key"])
    query = urllib.parse.urlencode([("command", "/bin/sh"), ("command", "-c"),
                                    ("command", 'read l; echo "[$l]"; exit 5'), ("container", "app"),
                                    ("stdin", "true"), ("stdout", "true"), ("tty", "true")])
    c = sc.SpdyClient.connect(("127.0.0.1", api.port), ["v4.channel.k8s.io"], tls=ctx,
                              path=f"/api/v1/namespaces/default/pods/web/exec?{query}")
    assert c.status == 101 and c.protocol == "v4.channel.k8s.io", c.body
    s = {k: c.open({"streamtype": k}) for k in ("error", "stdin", "stdout", "resize")}
    for st in s.values():
        c.wait_reply(st)
    c.send(s["resize"], json.dumps({"Width": 77, "Height": 22}).encode())
    c.send(s["stdin"], b"go\n")
    assert c.read_all(s["stdout"], timeout=10) == b"go\r\n[go]\r\n"
    assert sc.parse_exit_code(c.read_all(s["error"], timeout=10)) == 5
    c.close()
