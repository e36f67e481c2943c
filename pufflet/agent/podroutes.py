"""Routes to other nodes' pods, the agent's half ('pod routes').

For every other Node with a podCIDR inside a 'pod routes' network and an
InternalIP of the same family, a route to the podCIDR via that address:
the agent lists and watches the Nodes and sends the whole set to the
parent (SetPodRoutes) whenever it changes, and every RESYNC seconds
anyway; the parent sets every route again every 5 minutes, which repairs
a route someone removed by hand.  The parent
checks each route and keeps its own routes in step (priv/podroutes.py).

The first set is sent only after the first complete list of Nodes: a
partial one would remove the routes of nodes not yet seen.

Listing every Node needs more than the Node authorizer gives a node
(it may read only its own Node object): grant list and watch on nodes
to the node's user or to the group system:nodes, see pufflet.conf(5).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes import client as k8s

from pufflet.agent import kube
from pufflet.agent.informer import PodInformer

log = logging.getLogger("pufflet.agent.podroutes")

RESYNC = 300.0          # seconds between sends of an unchanged set
SETTLE = 0.2            # a burst of Node updates makes one send
MAX_ROUTES = 1000       # as the spec's SetPodRoutesRequest


class NodeInformer(PodInformer):
    """The list+watch of PodInformer over every Node."""
    what = "nodes"

    def __init__(self, core: k8s.CoreV1Api, on_change: Callable[[str, dict | None], None],
                 stop: threading.Event) -> None:
        super().__init__(core, "", on_change, stop)
        self._told = False

    def _list(self, **kw: Any) -> Any:
        try:
            return self.core.list_node(**kw)
        except k8s.ApiException as e:
            if e.status == 403 and not self._told:
                # What to do about it, once; the informer logs the refusal.
                log.error("'pod routes' needs to list and watch every Node, which "
                          "the Node authorizer does not allow a node: grant list and "
                          "watch on nodes to the group system:nodes (pufflet.conf(5))")
                self._told = True
            raise


def wanted(nodes: Iterable[dict], self_name: str, clusters: Iterable[str]) -> list[dict]:
    """The routes this node wants: {cidr, gateway, node} for every podCIDR
    of another node inside one of clusters, via that node's first
    InternalIP of the same family.  Sorted, so equal sets compare equal."""
    nets = [ipaddress.ip_network(c) for c in clusters]
    out = []
    for node in nodes:
        meta, spec = node.get("metadata") or {}, node.get("spec") or {}
        name = meta.get("name", "")
        if name == self_name or meta.get("deletionTimestamp"):
            continue
        addrs = []
        for a in (node.get("status") or {}).get("addresses") or ():
            if a.get("type") == "InternalIP":
                try:
                    ip = ipaddress.ip_address(a.get("address", ""))
                except ValueError:
                    continue
                if getattr(ip, "scope_id", None) is None:     # no fe80::1%em0
                    addrs.append(ip)
        for cidr in spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []):
            try:
                net = ipaddress.ip_network(cidr)
            except ValueError:
                log.info("node %s: podCIDR %r is not a network; no route", name, cidr)
                continue
            if not any(net.version == c.version and net.subnet_of(c) for c in nets):
                continue
            gw = next((a for a in addrs if a.version == net.version), None)
            if gw is not None:
                out.append({"cidr": str(net), "gateway": str(gw), "node": name})
    out.sort(key=lambda r: (r["node"], r["cidr"]))
    if len(out) > MAX_ROUTES:
        log.warning("%d routes to other nodes' pods: only the first %d are kept",
                    len(out), MAX_ROUTES)
    return out[:MAX_ROUTES]


class RouteKeeper:
    """Watches the Nodes and keeps the parent's routes in step.  send(routes)
    calls SetPodRoutes and returns its answer."""

    def __init__(self, api: k8s.ApiClient, self_name: str, clusters: Iterable[str],
                 send: Callable[[list[dict]], dict], stop: threading.Event,
                 resync: float = RESYNC) -> None:
        self.self_name = self_name
        self.clusters = tuple(clusters)
        self.send = send
        self.stop = stop
        self.resync = resync
        self.changed = threading.Event()
        self.informer = NodeInformer(k8s.CoreV1Api(api),
                                     lambda uid, node: self.changed.set(), stop)
        self.sent: list[dict] | None = None     # the last set the parent took
        self.refused: list[dict] = []
        self.sent_at = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.informer.start()
        self._thread = threading.Thread(target=self._run, name="pod-routes", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.informer.close()
        self.changed.set()

    def _run(self) -> None:
        backoff = kube.Backoff(0.5, 30.0)
        while not self.stop.is_set():
            if not self.informer.synced.is_set():
                self.informer.synced.wait(1.0)
                continue
            self.stop.wait(SETTLE)      # let a burst of updates land
            self.changed.clear()
            routes = wanted(self.informer.list(), self.self_name, self.clusters)
            due = self.sent_at + self.resync - time.monotonic()
            if routes == self.sent and due > 0:
                self.changed.wait(due)      # Node heartbeats: nothing to send
                continue
            try:
                answer = self.send(routes)
            except Exception as e:      # noqa: BLE001 - logged, retried
                if self.stop.is_set():
                    return
                log.warning("pod routes: %s; retrying", e)
                self.stop.wait(backoff.next())
                continue
            backoff.reset()
            if routes != self.sent:
                log.info("pod routes: %d to other nodes' pods", answer.get("installed", 0))
            refused = answer.get("refused") or []
            if refused != self.refused:
                for r in refused:
                    log.warning("pod route to %s (node %s) refused: %s", r["cidr"],
                                r["node"] or "?", r["reason"])
            self.sent, self.refused = routes, refused
            self.sent_at = time.monotonic()
            self.changed.wait(self.resync)
