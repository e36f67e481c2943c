"""List+watch of the pods bound to this node, and a cache of them.

The kubelet's reflector in small: list (the Node authorizer allows it
only with fieldSelector spec.nodeName=<self>), remember the list's
resourceVersion, watch from there with bookmarks; on 410 Gone list again
and call the deleted what vanished in between; on any other error back
off and watch again from the last version seen.  Pods are kept as plain
dicts (json of the raw response): the generated model classes are slow
and drop fields they do not know.

on_change(uid, pod or None) is called from the informer's thread for
every add, update and delete (None), after the cache has it.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from typing import Any, Callable

from kubernetes import client as k8s

from pufflet.agent import kube

log = logging.getLogger("pufflet.agent.informer")

# A watch lasts 5 to 10 minutes, as the kubelet's reflector's do; the
# spread keeps a fleet from reconnecting in step.
WATCH_MIN, WATCH_MAX = 300.0, 600.0


class PodInformer:
    what = "pods"       # for the log

    def __init__(self, core: k8s.CoreV1Api, node: str,
                 on_change: Callable[[str, dict | None], None],
                 stop: threading.Event) -> None:
        self.core = core
        self.selector = f"spec.nodeName={node}"
        self.on_change = on_change
        self.stop = stop
        self.lock = threading.Lock()
        self.pods: dict[str, dict] = {}     # uid -> pod
        self.synced = threading.Event()     # set after the first list
        self.rv: str | None = None
        self._resp: Any = None
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.what}-informer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()         # wake the thread out of its read
            except Exception:           # noqa: BLE001 - closing anyway
                pass

    def get(self, uid: str) -> dict | None:
        with self.lock:
            return self.pods.get(uid)

    def list(self) -> list[dict]:
        with self.lock:
            return list(self.pods.values())

    def _list(self, **kw: Any) -> Any:
        """The list or watch call; NodeInformer (agent/podroutes.py) lists Nodes."""
        return self.core.list_pod_for_all_namespaces(field_selector=self.selector, **kw)

    # -- the loop ----------------------------------------------------------

    def _run(self) -> None:
        backoff = kube.Backoff(0.5, 30.0)
        while not self.stop.is_set():
            try:
                if self.rv is None:
                    self._relist()
                self._watch()
                backoff.reset()
                self._last_error = None
            except Exception as e:     # noqa: BLE001 - logged, retried
                if kube.status_of(e) == 410:
                    log.info("%s watch expired; listing again", self.what)
                    self.rv = None
                    continue
                if self.stop.is_set():
                    return
                msg = kube.describe(e)
                if msg != self._last_error:
                    log.warning("watching %s: %s; retrying", self.what, msg)
                self._last_error = msg
                self.stop.wait(backoff.next())

    def _relist(self) -> None:
        resp = self._list(_preload_content=False,
                          _request_timeout=(kube.CONNECT_TIMEOUT, 60))
        doc = json.loads(resp.data)
        fresh = {p["metadata"]["uid"]: p for p in doc.get("items") or ()}
        with self.lock:
            gone = [uid for uid in self.pods if uid not in fresh]
            changed = [uid for uid, p in fresh.items()
                       if _rv(self.pods.get(uid)) != _rv(p)]
            self.pods = fresh
        self.rv = doc["metadata"]["resourceVersion"]
        for uid in gone:
            self.on_change(uid, None)
        for uid in changed:
            self.on_change(uid, fresh[uid])
        self.synced.set()

    def _watch(self) -> None:
        timeout = int(random.uniform(WATCH_MIN, WATCH_MAX))
        resp = self._list(
            watch=True, resource_version=self.rv,
            allow_watch_bookmarks=True, timeout_seconds=timeout,
            _preload_content=False, _request_timeout=(kube.CONNECT_TIMEOUT, timeout + 30))
        self._resp = resp
        try:
            for line in resp:
                if self.stop.is_set():
                    return
                if not line.strip():
                    continue
                ev = json.loads(line)
                kind, obj = ev.get("type"), ev.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        log.info("%s watch: %s; listing again", self.what,
                                 obj.get("message", "gone"))
                        self.rv = None
                        return
                    raise RuntimeError(obj.get("message", "watch error"))
                meta = obj.get("metadata") or {}
                if meta.get("resourceVersion"):
                    self.rv = meta["resourceVersion"]
                if kind == "BOOKMARK":
                    continue
                uid = meta.get("uid")
                if not uid:
                    continue
                with self.lock:
                    if kind == "DELETED":
                        self.pods.pop(uid, None)
                    else:
                        self.pods[uid] = obj
                self.on_change(uid, None if kind == "DELETED" else obj)
        finally:
            self._resp = None
            resp.release_conn()


def _rv(pod: dict | None) -> str | None:
    return None if pod is None else pod["metadata"].get("resourceVersion")
