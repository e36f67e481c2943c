"""What the node API knows of the pods on this node, and /healthz, /pods.

The handlers never touch the pod manager's state: they see it through two
callables, pod_lookup(namespace, name) -> PodInfo | None and
pods_list() -> [pod dicts], so the server can be tested with stubs and the
pod manager may change its insides freely.  from_manager() builds both
from agent/pods.py's PodManager.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from pufflet.nodeapi.server import Request, Server


@dataclass(frozen=True)
class ContainerInfo:
    name: str
    restart_count: int | None       # of the newest run; None: never started
    running: bool = False
    waiting_reason: str = ""        # why it has not started, for the error


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    uid: str
    containers: dict[str, ContainerInfo] = field(default_factory=dict)


PodLookup = Callable[[str, str], "PodInfo | None"]
PodsList = Callable[[], "list[dict]"]


def add_routes(server: Server, pods_list: PodsList) -> None:
    server.add_route("GET", r"/healthz", "proxy", _healthz)
    server.add_route("GET", r"/pods/?", "proxy",
                     lambda req, m: _pods(req, pods_list))


def _healthz(req: Request, m: Any) -> None:
    req.send(200, "ok")


def _pods(req: Request, pods_list: PodsList) -> None:
    # The kubelet's answer: a v1 PodList of the pods bound here, with the
    # status it last computed.
    body = {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods_list()}
    req.send(200, json.dumps(body, separators=(",", ":")), "application/json")


def from_manager(mgr: Any) -> tuple[PodLookup, PodsList]:
    """pod_lookup and pods_list over agent/pods.py's PodManager."""

    def works() -> list:
        with mgr.lock:
            return [w for w in mgr.works.values() if not w.removed]

    def lookup(namespace: str, name: str) -> PodInfo | None:
        for w in works():
            md = w.pod.get("metadata", {})
            if md.get("name") != name or md.get("namespace", "default") != namespace:
                continue
            cs = {}
            for cname, c in list(w.containers.items()):
                run = c.current or c.last
                cs[cname] = ContainerInfo(cname, run.restart_count if run else None,
                                          c.running, c.waiting[0] if c.waiting else "")
            # Containers of the spec the manager has not met yet.
            spec = w.pod.get("spec", {})
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                cs.setdefault(c["name"], ContainerInfo(c["name"], None, False,
                                                       "ContainerCreating"))
            return PodInfo(namespace, name, md.get("uid", w.uid), cs)
        return None

    def listing() -> list[dict]:
        out = []
        for w in works():
            pod = dict(w.pod)
            if w.last_status is not None:
                pod["status"] = w.last_status
            out.append(pod)
        return out

    return lookup, listing
