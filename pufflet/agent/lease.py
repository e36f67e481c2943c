"""The node's heartbeat: a Lease kube-node-lease/<node>, renewed every
quarter of its duration, as the kubelet's lease controller does
(k8s.io/component-helpers/apimachinery/lease/controller.go).

The node lifecycle controller calls a node unreachable when its lease
is not renewed within leaseDurationSeconds; the Node status itself is
sent only when it changes, so this is the only steady traffic.
"""

from __future__ import annotations

import datetime
import json
import logging
import random
import threading
from typing import Any, Callable

from kubernetes import client as k8s
from kubernetes.client.api import coordination_v1_api  # noqa: F401 - see node.py

from pufflet.agent import kube

log = logging.getLogger("pufflet.agent.lease")

NAMESPACE = "kube-node-lease"
# The kubelet renews at 1/4 of the duration with 4% jitter, and after a
# failure backs off from 100 ms up to 7 s.
RENEW_FRACTION = 0.25
JITTER = 0.04
BACKOFF_BASE, BACKOFF_CAP = 0.1, 7.0


def micro_time(t: datetime.datetime | None = None) -> str:
    """metav1.MicroTime: microseconds, UTC."""
    t = t or datetime.datetime.now(datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseKeeper:
    """Creates and renews the lease; node_uid() gives the owning Node's
    uid (None until the Node exists), so that deleting the Node deletes
    the lease and a recreated Node gets it back."""

    def __init__(self, api: k8s.CoordinationV1Api, node: str, duration: int,
                 node_uid: Callable[[], str | None], stop: threading.Event) -> None:
        self.api = api
        self.node = node
        self.duration = duration
        self.node_uid = node_uid
        self.stop = stop
        self.lease: dict[str, Any] | None = None   # as last read or written
        self.renewals = 0
        self._wake = threading.Event()
        self._last_error: str | None = None

    @property
    def interval(self) -> float:
        return self.duration * RENEW_FRACTION

    def wake(self) -> None:
        """Renew now (the owner changed)."""
        self._wake.set()

    def run(self) -> None:
        backoff = kube.Backoff(BACKOFF_BASE, min(BACKOFF_CAP, self.interval * 2))
        while not self.stop.is_set():
            try:
                self.renew()
                backoff.reset()
                if self._last_error:
                    log.info("lease %s/%s renewed again", NAMESPACE, self.node)
                self._last_error = None
                wait = self.interval * (1 + JITTER * random.random())
            except Exception as e:     # noqa: BLE001 - never fatal
                self._report(e)
                wait = backoff.next()
            self._wake.wait(wait)
            self._wake.clear()

    def _report(self, e: BaseException) -> None:
        msg = kube.describe(e)
        if msg == self._last_error:
            return
        self._last_error = msg
        what = f"renewing lease {NAMESPACE}/{self.node}"
        if kube.status_of(e) in (401, 403):
            log.error("%s: refused by the API server: %s; retrying", what, msg)
        else:
            log.warning("%s: %s; retrying", what, msg)

    def renew(self) -> None:
        """One renewal: update what we last saw; on 409 read it again and
        retry, on 404 create it."""
        for _ in range(3):
            if self.lease is None:
                self.lease, created = self._get_or_create()
                if created:         # a fresh lease is a renewal too
                    self.renewals += 1
                    return
            body = self.desired(self.lease)
            try:
                resp = self.api.replace_namespaced_lease(
                    self.node, NAMESPACE, body, _preload_content=False)
            except k8s.ApiException as e:
                if e.status in (404, 409):
                    # Deleted, or changed behind our back: start from what
                    # the server has now.
                    self.lease = None
                    continue
                raise
            self.lease = json.loads(resp.data)
            self.renewals += 1
            return
        raise RuntimeError("lease kept changing under us")

    def desired(self, current: dict[str, Any] | None) -> dict[str, Any]:
        lease = json.loads(json.dumps(current)) if current else {}
        meta = lease.setdefault("metadata", {})
        meta["name"], meta["namespace"] = self.node, NAMESPACE
        uid = self.node_uid()
        if uid:
            refs = [r for r in meta.get("ownerReferences") or ()
                    if not (r.get("kind") == "Node" and r.get("apiVersion") == "v1")]
            refs.append({"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": uid})
            meta["ownerReferences"] = refs
        spec = lease.setdefault("spec", {})
        spec["holderIdentity"] = self.node
        spec["leaseDurationSeconds"] = self.duration
        spec["renewTime"] = micro_time()
        return lease

    def _get_or_create(self) -> tuple[dict[str, Any], bool]:
        try:
            resp = self.api.read_namespaced_lease(self.node, NAMESPACE,
                                                  _preload_content=False)
            return json.loads(resp.data), False
        except k8s.ApiException as e:
            if e.status != 404:
                raise
        body = self.desired(None)
        body.update(apiVersion="coordination.k8s.io/v1", kind="Lease")
        resp = self.api.create_namespaced_lease(NAMESPACE, body, _preload_content=False)
        log.info("created lease %s/%s", NAMESPACE, self.node)
        return json.loads(resp.data), True
