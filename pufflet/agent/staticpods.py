"""Static pods: pods from manifest files, run with or without an API
server (the kubelet's pkg/kubelet/config/file.go, written anew).

Every file in the directory (not hidden, not a directory) is read as YAML
or JSON, one Pod or several as a multi-document YAML stream.  Each pod
is defaulted the way the kubelet defaults file pods:
  * name <name>-<node name>, namespace "default" unless given, nodeName
    this node;
  * uid: md5 of "host:<node>", "file:<path>" and the pod's own content,
    as 32 hex digits — stable across restarts, new when the file changes,
    so a changed file is a new pod (the old one stops);
  * annotations kubernetes.io/config.source=file, config.hash=<uid>,
    config.seen;
  * the API server's defaults the pod will not get from one: restart
    policy, grace period, pull policy, termination message fields.
The directory is read again every interval (the kubelet's
fileCheckFrequency is 20 s); a file that fails to parse is logged once
per change and its pods are kept, as a half-written file is likely.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import threading
from typing import Callable

import yaml

from pufflet.images import reference

log = logging.getLogger("pufflet.agent.staticpods")

CHECK_EVERY = 20.0
MAX_FILE = 1 << 20

SOURCE_ANN = "kubernetes.io/config.source"
HASH_ANN = "kubernetes.io/config.hash"
SEEN_ANN = "kubernetes.io/config.seen"
MIRROR_ANN = "kubernetes.io/config.mirror"


class ManifestError(Exception):
    pass


def static_uid(node: str, path: str, pod: dict) -> str:
    h = hashlib.md5(usedforsecurity=False)
    h.update(f"host:{node}".encode())
    h.update(f"file:{path}".encode())
    h.update(json.dumps(pod, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def default_pull_policy(image: str) -> str:
    """Always for :latest or no tag (and no digest), else IfNotPresent:
    the API server's defaulting, which file pods do not go through."""
    try:
        ref = reference.parse(image)
    except reference.ReferenceError:
        return "IfNotPresent"
    if ref.digest is None and ref.tag in (None, "latest"):
        return "Always"
    return "IfNotPresent"


def parse_manifests(data: bytes, path: str) -> list[dict]:
    """Every Pod in one file; ManifestError for anything else."""
    try:
        docs = [d for d in yaml.safe_load_all(data.decode("utf-8")) if d is not None]
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not YAML or JSON: {e}") from None
    pods = []
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise ManifestError(f"{path}: document {i + 1} is not an object")
        if d.get("kind") == "List":
            items = d.get("items") or []
        else:
            items = [d]
        for p in items:
            if not isinstance(p, dict) or p.get("kind") != "Pod" \
                    or (p.get("apiVersion") or "v1") != "v1":
                raise ManifestError(f"{path}: document {i + 1}: not a v1 Pod")
            meta = p.get("metadata")
            if not isinstance(meta, dict) or not meta.get("name"):
                raise ManifestError(f"{path}: document {i + 1}: a pod needs metadata.name")
            spec = p.get("spec")
            if not isinstance(spec, dict) or not spec.get("containers"):
                raise ManifestError(f"{path}: pod {meta['name']}: no containers")
            pods.append(p)
    return pods


def apply_defaults(pod: dict, node: str, path: str) -> dict:
    uid = static_uid(node, path, pod)
    pod = json.loads(json.dumps(pod))       # our own copy
    meta = pod.setdefault("metadata", {})
    meta["name"] = f"{meta['name']}-{node.lower()}"
    meta.setdefault("namespace", "default")
    meta["uid"] = uid
    meta["creationTimestamp"] = datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    ann = meta.setdefault("annotations", {})
    ann[SOURCE_ANN] = "file"
    ann[HASH_ANN] = uid
    ann[SEEN_ANN] = meta["creationTimestamp"]
    spec = pod["spec"]
    spec["nodeName"] = node
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    for field in ("initContainers", "containers"):
        for c in spec.get(field) or ():
            if c.get("image"):
                c.setdefault("imagePullPolicy", default_pull_policy(c["image"]))
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
    pod.setdefault("status", {"phase": "Pending"})
    return pod


class StaticPods:
    """Reads the directory every interval; on_change(uid, pod or None)
    for every pod that appeared, changed (a new uid) or went away."""

    def __init__(self, directory: str, node: str,
                 on_change: Callable[[str, dict | None], None],
                 stop: threading.Event, interval: float = CHECK_EVERY) -> None:
        self.directory = directory
        self.node = node
        self.on_change = on_change
        self.stop = stop
        self.interval = interval
        self.lock = threading.Lock()
        self.pods: dict[str, dict] = {}             # uid -> pod
        self._by_file: dict[str, list[str]] = {}    # path -> uids
        self._errors: dict[str, str] = {}
        self.synced = threading.Event()
        self.wake = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="static-pods", daemon=True).start()

    def get(self, uid: str) -> dict | None:
        with self.lock:
            return self.pods.get(uid)

    def list(self) -> list[dict]:
        with self.lock:
            return list(self.pods.values())

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.scan()
            except Exception:       # noqa: BLE001 - keep watching the directory
                log.exception("static pods: scanning %s", self.directory)
            self.wake.wait(self.interval)
            self.wake.clear()

    def scan(self) -> None:
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as e:
            self._error(self.directory, f"static pods: {self.directory}: {e.strerror}")
            names = None
        found: dict[str, list[dict]] = {}
        if names is not None:
            self._errors.pop(self.directory, None)
            for name in names:
                if name.startswith("."):
                    continue        # editors' swap files, dot files: the kubelet skips them too
                path = os.path.join(self.directory, name)
                pods = self._read(path)
                if pods is not None:
                    found[path] = pods
                elif path in self._by_file:
                    # Unreadable now (being written?): keep what ran.
                    with self.lock:
                        found[path] = [self.pods[u] for u in self._by_file[path]
                                       if u in self.pods]
        else:
            with self.lock:     # an unreadable directory stops nothing
                found = {p: [self.pods[u] for u in uids if u in self.pods]
                         for p, uids in self._by_file.items()}
        fresh: dict[str, dict] = {}
        by_file: dict[str, list[str]] = {}
        for path, pods in found.items():
            for p in pods:
                uid = p["metadata"]["uid"]
                if uid in fresh:
                    self._error(path, f"static pods: {path}: pod {p['metadata']['name']} "
                                "repeats another: ignored")
                    continue
                fresh[uid] = p
                by_file.setdefault(path, []).append(uid)
        with self.lock:
            gone = [u for u in self.pods if u not in fresh]
            new = [u for u in fresh if u not in self.pods]
            self.pods = fresh
            self._by_file = by_file
        for u in gone:
            self.on_change(u, None)
        for u in new:
            self.on_change(u, fresh[u])
        self.synced.set()

    def _read(self, path: str) -> list[dict] | None:
        try:
            st = os.stat(path)
            if not os.path.isfile(path):
                return None
            if st.st_size > MAX_FILE:
                raise ManifestError(f"{path}: larger than {MAX_FILE} bytes")
            with open(path, "rb") as f:
                data = f.read(MAX_FILE + 1)
            raw = parse_manifests(data, path)
        except OSError as e:
            self._error(path, f"static pods: {path}: {e.strerror}")
            return None
        except ManifestError as e:
            self._error(path, f"static pods: {e}")
            return None
        self._errors.pop(path, None)
        # The file as a whole is hashed per pod: its path and the pod.
        with self.lock:
            old = {u: self.pods[u] for u in self._by_file.get(path, ()) if u in self.pods}
        out = []
        for p in raw:
            pod = apply_defaults(p, self.node, path)
            # Keep the first sighting's times for a pod that did not change.
            prev = old.get(pod["metadata"]["uid"])
            out.append(prev if prev is not None else pod)
        return out

    def _error(self, key: str, msg: str) -> None:
        if self._errors.get(key) != msg:
            log.error("%s", msg)
        self._errors[key] = msg
