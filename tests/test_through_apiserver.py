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
