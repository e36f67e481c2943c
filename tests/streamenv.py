"""A node for the streaming endpoints' tests: the real parent (Services +
PodRuntime over a socketpair, tests/test_pods_priv.py's Priv) with a real
pod and container, the agent's Runtime reading its exits stream, a stand-in
for the pod manager's bookkeeping, and the real node API server over TLS
with the streaming routes on it."""

from __future__ import annotations

import os
import ssl
import subprocess
import threading
import time
from pathlib import Path

import imagetools
from test_pods_priv import PATH, POD_A, create, start

from pufflet.agent.pods import CState, Instance, PodWork
from pufflet.agent.runtime import Runtime
from pufflet.nodeapi import agentbackend, portforward, remotecommand, server

BINARIES = ("/bin/sh", "/bin/sleep", "/bin/cat", "/usr/bin/stty")


def tool_layer() -> bytes:
    """sh, sleep, cat and stty from the host, in /bin, with their libraries."""
    return imagetools.host_tools_layer(BINARIES)


def tls_contexts(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, str]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv.load_cert_chain(cert, key)
    cli = ssl.create_default_context(cafile=str(cert))
    return srv, cli, str(cert)


class AllowAll:
    def check(self, req, subresource):
        req.user = "test"


class Manager:
    """What AgentBackend reads of agent/pods.py's PodManager: works, lock,
    runtime; container exits mark the run finished, as the manager does."""

    def __init__(self, client):
        self.lock = threading.Lock()
        self.works: dict[str, PodWork] = {}
        self.stop = threading.Event()
        self.runtime = Runtime(client, self._exit, self.stop)

    def _exit(self, ex):
        with self.lock:
            w = self.works.get(ex.pod_uid)
            c = w.containers.get(ex.name) if w else None
            if c is not None and c.current and c.current.container_id == ex.container_id:
                c.current.running = False
                c.current.exit_code = ex.exit_code

    def add(self, pod_uid, namespace, name, container, started, restart=0):
        with self.lock:
            w = self.works.setdefault(pod_uid, PodWork(pod_uid, {"metadata": {
                "name": name, "namespace": namespace, "uid": pod_uid}}, False))
            w.containers[container] = CState(
                container, False, current=Instance(started["container_id"], restart,
                                                   started["started_at"]),
                env=list(PATH) + ["GREETING=hello from the container env"], working_dir="/tmp")


class Node:
    """The whole stack; url(path) for clients."""

    def __init__(self, env, tmp: Path, priv=None):
        self.env = env
        # The logger's root, should the logger not make it itself.
        os.makedirs(os.path.join(env.cfg.log_dir, "pods"), exist_ok=True)
        self.priv = priv if priv is not None else env.priv()
        self.mgr = Manager(self.priv.client)
        self.mgr.runtime.start()
        self.backend = agentbackend.AgentBackend(self.mgr, env.cfg.log_dir)
        srv_ctx, self.client_tls, self.ca = tls_contexts(tmp)
        self.server = server.Server(srv_ctx, AllowAll())
        remotecommand.register(self.server, self.backend)
        portforward.register(self.server, self.backend)
        self.addr = self.server.listen("127.0.0.1", 0)
        self.server.start()
        create(self.priv, env)

    def container(self, argv, name="c", restart=0):
        st = start(self.priv, self.env, argv, name=name, restart=restart)
        self.mgr.add(POD_A, "default", "web", name, st, restart)
        return st

    def close(self):
        self.mgr.stop.set()
        self.server.close()


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
