"""The streaming endpoints' Backend (nodeapi/streaming.py) over the agent:
pods and containers as the pod manager (agent/pods.py) knows them, execs
and port-forward connections from the parent through the privsep client,
exec exits from agent/runtime.py's exits stream, container logs from the
logger's files (readable by the agent's group).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from pufflet.logs.reader import container_log_files
from pufflet.logs.writer import container_log_dir
from pufflet.privsep.channel import Status

from .streaming import AttachedStdin, ExecError, StartedExec, Target, not_found

CALL = 30.0


class AgentBackend:
    def __init__(self, manager: Any, log_dir: str) -> None:
        self.manager = manager          # agent/pods.py PodManager
        self.runtime = manager.runtime  # agent/runtime.py Runtime
        self.log_root = os.path.join(log_dir, "pods")

    def _work(self, namespace: str, pod: str):
        with self.manager.lock:
            works = list(self.manager.works.values())
        for w in works:
            md = w.pod.get("metadata", {})
            if md.get("name") == pod and md.get("namespace", "default") == namespace \
                    and not w.removed:
                return w
        return None

    def resolve(self, namespace: str, pod: str, container: str | None,
                pod_uid: str | None = None) -> Target:
        w = self._work(namespace, pod)
        if w is None or (pod_uid and pod_uid != w.uid):
            raise not_found("pod does not exist")
        if container is None:
            return Target(w.uid, namespace, pod, "")
        c = w.containers.get(container)
        if c is None:
            raise not_found(f'container not found ("{container}")')
        run = c.current or c.last
        return Target(w.uid, namespace, pod, container, tuple(c.env), c.working_dir,
                      run.restart_count if run is not None else 0)

    def start_exec(self, target: Target, argv: list[str], tty: bool) -> StartedExec:
        try:
            exec_id, fds, fut = self.runtime.start_exec(
                target.pod_uid, target.container, argv, list(target.env),
                target.working_dir, tty)
        except Status as e:
            raise ExecError(e.message) from None
        return StartedExec(exec_id, fds, fut)

    def attach(self, target: Target) -> AttachedStdin | None:
        try:
            r = self.runtime.client.call("AttachContainer", {"pod_uid": target.pod_uid,
                                                             "name": target.container},
                                         timeout=CALL)
        except Status as e:
            if e.code in ("FAILED_PRECONDITION", "NOT_FOUND"):
                return None     # output only, from the log
            raise ExecError(e.message) from None
        return AttachedStdin(r.fds[0], r.body["tty"], r.body["stdin"])

    def log_files(self, target: Target) -> list:
        d = container_log_dir(self.log_root, target.namespace, target.pod, target.pod_uid,
                              target.container)
        return container_log_files(d, target.restart_count)

    def running(self, target: Target) -> bool:
        w = self._work(target.namespace, target.pod)
        c = w.containers.get(target.container) if w is not None else None
        run = c.current if c is not None else None
        return run is not None and run.running and run.restart_count == target.restart_count

    def port_forward(self, target: Target, port: int) -> socket.socket:
        # A stream: the parent answers once its dialer is done (bounded by
        # the parent's deadline), with one frame holding the connection.
        sock = None
        try:
            for r in self.runtime.client.stream("PortForward", {"pod_uid": target.pod_uid,
                                                                "port": port}):
                sock = socket.socket(fileno=r.fds[0])
        except Status as e:
            if sock is not None:
                sock.close()
            raise ExecError(e.message) from None
        if sock is None:        # the spec allows an empty stream; the parent never sends one
            raise ExecError("the node made no connection")
        sock.setblocking(True)
        return sock
