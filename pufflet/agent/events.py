"""Events about pods: what `kubectl describe pod` shows under Events.

Recording never blocks a pod worker: events go into a bounded queue
served by one thread; when the API server is slow and the queue is
full, events are dropped (and logged), as client-go's broadcaster does.
A repeat of the same (object, type, reason, message) bumps the count of
the event already posted (a PATCH) instead of posting a new one, which is
the part of the kubelet's event correlation that users see ("x12 over
3m").  Without an API server (standalone), events are only logged.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
from typing import Any

from kubernetes import client as k8s

from pufflet.agent import kube

log = logging.getLogger("pufflet.agent.events")

NORMAL, WARNING = "Normal", "Warning"
COMPONENT = "pufflet"
QUEUE_MAX = 1000
# How many distinct events are remembered for counting repeats.
REMEMBER = 4096


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Recorder:
    def __init__(self, core: k8s.CoreV1Api | None, node: str,
                 stop: threading.Event | None = None) -> None:
        self.core = core
        self.node = node
        self.stop = stop or threading.Event()
        self._q: queue.Queue = queue.Queue(QUEUE_MAX)
        self._seen: dict[tuple, tuple[str, str, int]] = {}   # key -> (ns, name, count)
        self._dropped = 0
        self._thread: threading.Thread | None = None

    def start(self) -> "Recorder":
        if self.core is not None:
            self._thread = threading.Thread(target=self._run, name="events", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass

    def event(self, pod: dict, etype: str, reason: str, message: str,
              container: str | None = None) -> None:
        """Record an event about pod (or one of its containers)."""
        meta = pod["metadata"]
        log.log(logging.WARNING if etype == WARNING else logging.INFO,
                "pod %s/%s%s: %s: %s", meta.get("namespace", "default"), meta["name"],
                f" container {container}" if container else "", reason, message)
        if self.core is None:
            return
        try:
            self._q.put_nowait((pod, etype, reason, message, container))
        except queue.Full:
            self._dropped += 1
            if self._dropped in (1, 100, 10000):
                log.warning("events: queue full, %d dropped", self._dropped)

    def _run(self) -> None:
        while not self.stop.is_set():
            item = self._q.get()
            if item is None:
                return
            try:
                self._post(*item)
            except Exception as e:     # noqa: BLE001 - an event is not worth a retry loop
                log.debug("event %s not posted: %s", item[2], kube.describe(e))

    def _post(self, pod: dict, etype: str, reason: str, message: str,
              container: str | None) -> None:
        meta = pod["metadata"]
        ns = meta.get("namespace", "default")
        ref: dict[str, Any] = {"kind": "Pod", "apiVersion": "v1", "namespace": ns,
                               "name": meta["name"], "uid": meta.get("uid", "")}
        if meta.get("resourceVersion"):
            ref["resourceVersion"] = meta["resourceVersion"]
        idx = _container_path(pod, container)
        if idx:
            ref["fieldPath"] = idx
        key = (ref["uid"], ref.get("fieldPath"), etype, reason, message)
        now = _now()
        seen = self._seen.get(key)
        if seen is not None:
            ens, name, count = seen
            try:
                self.core.patch_namespaced_event(
                    name, ens, {"count": count + 1, "lastTimestamp": now},
                    _preload_content=False)
                self._seen[key] = (ens, name, count + 1)
                return
            except k8s.ApiException as e:
                if e.status != 404:
                    raise
                del self._seen[key]     # expired or deleted: post anew
        name = f"{meta['name']}.{time.time_ns():x}"
        body = {
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": ref, "reason": reason, "message": message[:1024],
            "type": etype, "count": 1, "firstTimestamp": now, "lastTimestamp": now,
            "eventTime": None, "source": {"component": COMPONENT, "host": self.node},
            "reportingComponent": COMPONENT, "reportingInstance": self.node,
        }
        self.core.create_namespaced_event(ns, body, _preload_content=False)
        if len(self._seen) >= REMEMBER:
            self._seen.pop(next(iter(self._seen)))
        self._seen[key] = (ns, name, 1)


def _container_path(pod: dict, container: str | None) -> str | None:
    """The fieldPath the kubelet gives container events."""
    if not container:
        return None
    spec = pod.get("spec") or {}
    for field in ("containers", "initContainers"):
        if any(c.get("name") == container for c in spec.get(field) or ()):
            return f"spec.{field}{{{container}}}"
    return None
