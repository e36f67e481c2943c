"""The Node object: what it says about this machine, its registration,
and its status, computed often and sent only when it changed.

The first half builds plain dicts from the configuration and the facts
the priv reports (pure functions, so tests can check every field).  The
second half, NodeAgent, keeps the Node in the API server the way the
kubelet does (pkg/kubelet/kubelet_node_status.go, pkg/kubelet/nodestatus):
create it or adopt the one of the same name, then every status interval
compute the status and PATCH nodes/<name>/status when anything but the
heartbeat times changed, or when the report interval has passed.  A
watch on its own Node (the kubelet's informer) tells it when the Node is
deleted or its conditions were changed behind its back.
"""

from __future__ import annotations

import datetime
import json
import logging
import random
import socket
import threading
import time
import urllib.parse
from typing import Any, Callable

from kubernetes import client as k8s
# The client loads its API classes on first use; the sandboxed agent
# cannot, so load them here, before the drop.
from kubernetes.client.api import core_v1_api  # noqa: F401

from pufflet import __version__
from pufflet.agent import kube
from pufflet.agent.arch import goarch
from pufflet.agent.lease import LeaseKeeper
from pufflet.config import Config
from pufflet.images import reference

log = logging.getLogger("pufflet.agent.node")

# The Kubernetes release whose node behaviour pufflet follows.  The build
# metadata keeps kubeletVersion valid semver while saying what runs.
KUBE_VERSION = "v1.34.0"

# The kubelet's reflector watches for 5 to 10 minutes at a time.
WATCH_MIN, WATCH_MAX = 300.0, 600.0

MEMORY, DISK, PID, READY = "MemoryPressure", "DiskPressure", "PIDPressure", "Ready"

# (type) -> (reason, message) when False / when True, as the kubelet words them
_WORDS = {
    MEMORY: (("KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
             ("KubeletHasInsufficientMemory", "kubelet has insufficient memory available")),
    DISK: (("KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
           ("KubeletHasDiskPressure", "kubelet has disk pressure")),
    PID: (("KubeletHasSufficientPID", "kubelet has sufficient PID available"),
          ("KubeletHasInsufficientPID", "kubelet has insufficient PID available")),
}


def kubelet_version() -> str:
    return f"{KUBE_VERSION}+pufflet.{__version__}"


def now_rfc3339() -> str:
    """metav1.Time: whole seconds, UTC."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------
# quantities, as resource.Quantity prints them

_BINARY = ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def bytes_quantity(n: int) -> str:
    """Bytes in the canonical form of a binary quantity: the largest
    suffix that divides exactly (1073741824 → "1Gi"), else plain bytes."""
    n = max(int(n), 0)
    if n == 0:
        return "0"
    suffix = ""
    for s in _BINARY:
        if n % 1024:
            break
        n //= 1024
        suffix = s
    return f"{n}{suffix}"


def memory_quantity(n: int) -> str:
    """Memory is reported in whole KiB, as the kubelet does."""
    return bytes_quantity(max(int(n), 0) // 1024 * 1024)


def cpu_quantity(millis: int) -> str:
    millis = max(int(millis), 0)
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


# ---------------------------------------------------------------------------
# the object

def os_label(facts: dict) -> str:
    """kubernetes.io/os: the real OS, lowercased (openbsd, linux)."""
    return facts["os_name"].lower()


def labels(cfg: Config, facts: dict) -> dict[str, str]:
    out = {
        "kubernetes.io/os": os_label(facts),
        "kubernetes.io/arch": goarch(facts["machine"]),
        "kubernetes.io/hostname": cfg.node_name,
    }
    out.update(dict(cfg.labels))
    return out


def taints(cfg: Config) -> list[dict[str, str]]:
    return [{"key": t.key, "value": t.value, "effect": t.effect} if t.value
            else {"key": t.key, "effect": t.effect} for t in cfg.taints]


def capacity(cfg: Config, facts: dict) -> dict[str, str]:
    return {
        "cpu": cpu_quantity(facts["cpus"] * 1000),
        "memory": memory_quantity(facts["memory_bytes"]),
        "pods": str(cfg.max_pods),
        "ephemeral-storage": bytes_quantity(facts["state_fs_bytes"]),
    }


def allocatable(cfg: Config, facts: dict) -> dict[str, str]:
    """Capacity less what is reserved for the system and, for memory and
    storage, less the hard eviction threshold: the kubelet's formula
    (pkg/kubelet/cm/node_container_manager_linux.go GetNodeAllocatableAbsolute
    and nodestatus.MachineInfo)."""
    mem, disk = facts["memory_bytes"], facts["state_fs_bytes"]
    return {
        "cpu": cpu_quantity(facts["cpus"] * 1000 - cfg.reserved_cpu_millis),
        "memory": memory_quantity(mem - cfg.reserved_memory - cfg.pressure_memory.of(mem)),
        "pods": str(cfg.max_pods),
        "ephemeral-storage": bytes_quantity(
            disk - cfg.reserved_storage - cfg.pressure_disk.of(disk)),
    }


def kernel_version(facts: dict) -> str:
    """What names the running kernel: on Linux the release (uname -r, as
    the kubelet reports it); on OpenBSD the version (uname -v,
    "GENERIC.MP#338"), the release being the OS's, already in osImage."""
    if os_label(facts) == "linux":
        return facts["os_release"]
    return facts["kernel_version"]


def node_info(facts: dict) -> dict[str, str]:
    return {
        "machineID": facts["machine_id"],
        "systemUUID": facts["machine_id"],
        "bootID": facts["boot_id"],
        "kernelVersion": kernel_version(facts),
        "osImage": facts["os_image"],
        "containerRuntimeVersion": f"pufflet://{__version__}",
        "kubeletVersion": kubelet_version(),
        "kubeProxyVersion": "",
        "operatingSystem": os_label(facts),
        "architecture": goarch(facts["machine"]),
    }


def addresses(facts: dict, address: str | None) -> list[dict[str, str]]:
    out = []
    if address:
        out.append({"type": "InternalIP", "address": address})
    out.append({"type": "Hostname", "address": facts["hostname"].lower()})
    return out


def pressures(cfg: Config, facts: dict) -> dict[str, bool]:
    """Each pressure condition's status from the figures and thresholds,
    as the kubelet's eviction signals: memory.available, nodefs.available
    and nodefs.inodesFree (both DiskPressure), pid.available."""
    disk, inodes = facts["state_fs_bytes"], facts["state_fs_inodes"]
    maxproc = facts["max_processes"]
    return {
        MEMORY: facts["memory_available_bytes"]
        < cfg.pressure_memory.of(facts["memory_bytes"]),
        DISK: (disk > 0 and facts["state_fs_free_bytes"] < cfg.pressure_disk.of(disk))
        or (inodes > 0 and facts["state_fs_free_inodes"] < cfg.pressure_inodes.of(inodes)),
        # 0: the system does not say; never claim pressure then
        PID: maxproc > 0 and maxproc - facts["processes"] < cfg.pressure_pids.of(maxproc),
    }


def readiness(facts: dict, address: str | None) -> list[str]:
    """Why the node is not ready; empty when it is.  The kubelet's Ready
    setter refuses readiness without cpu/memory capacity, and a node
    without an address cannot be reached."""
    why = []
    missing = [r for r, k in (("cpu", "cpus"), ("memory", "memory_bytes")) if facts[k] <= 0]
    if missing:
        why.append("missing node capacity for resources: " + ", ".join(missing))
    if not address:
        why.append("no node address: set one with 'node address'")
    return why


def condition(ctype: str, status: bool, reason: str, message: str,
              previous: dict[str, dict], now: str) -> dict[str, str]:
    """lastHeartbeatTime is now; lastTransitionTime stays unless the
    status flipped (or the condition is new)."""
    value = "True" if status else "False"
    old = previous.get(ctype)
    since = old["lastTransitionTime"] if old and old.get("status") == value \
        and old.get("lastTransitionTime") else now
    return {"type": ctype, "status": value, "lastHeartbeatTime": now,
            "lastTransitionTime": since, "reason": reason, "message": message}


def conditions(cfg: Config, facts: dict, address: str | None,
               previous: dict[str, dict], now: str) -> list[dict[str, str]]:
    out = []
    for ctype, flag in pressures(cfg, facts).items():
        reason, message = _WORDS[ctype][flag]
        out.append(condition(ctype, flag, reason, message, previous, now))
    why = readiness(facts, address)
    if why:
        out.append(condition(READY, False, "KubeletNotReady", "; ".join(why), previous, now))
    else:
        out.append(condition(READY, True, "KubeletReady",
                             "pufflet is posting ready status", previous, now))
    return out


# The kubelet lists at most this many images in node status
# (nodeStatusMaxImages), biggest first.
MAX_STATUS_IMAGES = 50


def node_images(images: list[dict]) -> list[dict[str, Any]]:
    """status.images from the parent's image summaries: tag names and the
    digest reference, as the kubelet reports repoTags and repoDigests."""
    out = []
    for im in sorted(images, key=lambda i: i["size"], reverse=True)[:MAX_STATUS_IMAGES]:
        names = [n for n in im["names"] if "@" not in n]
        for n in im["names"]:
            try:
                names.append(f"{reference.parse(n).name}@{im['digest']}")
            except reference.ReferenceError:
                continue
        out.append({"names": list(dict.fromkeys(names)) or [im["digest"]],
                    "sizeBytes": im["size"]})
    return out


def status(cfg: Config, facts: dict, address: str | None,
           previous: dict[str, dict], now: str,
           images: list[dict] | None = None) -> dict[str, Any]:
    return {
        "images": node_images(images or []),
        "capacity": capacity(cfg, facts),
        "allocatable": allocatable(cfg, facts),
        "conditions": conditions(cfg, facts, address, previous, now),
        "addresses": addresses(facts, address),
        "daemonEndpoints": {"kubeletEndpoint": {"Port": cfg.listen_port}},
        "nodeInfo": node_info(facts),
    }


def new_node(cfg: Config, facts: dict, address: str | None, now: str,
             images: list[dict] | None = None) -> dict[str, Any]:
    """The Node to create: labels and taints go only here (NodeRestriction
    forbids a node to change its taints later), status too, as the
    kubelet's initialNode does."""
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": cfg.node_name, "labels": labels(cfg, facts)},
        "spec": {"taints": taints(cfg)} if cfg.taints else {},
        "status": status(cfg, facts, address, {}, now, images),
    }


def without_heartbeats(st: dict[str, Any]) -> str:
    """What decides whether a status is worth sending: everything but
    the heartbeat times (the kubelet's nodeStatusHasChanged)."""
    conds = [{k: v for k, v in c.items() if k != "lastHeartbeatTime"}
             for c in st.get("conditions", ())]
    return json.dumps({**st, "conditions": conds}, sort_keys=True)


def detect_address(server: str) -> str | None:
    """The source address the kernel picks to reach the API server: a
    UDP connect(2) chooses a route and sends nothing."""
    url = urllib.parse.urlsplit(server)
    try:
        infos = socket.getaddrinfo(url.hostname, url.port or 443, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for family, kind, proto, _, sa in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.connect(sa)
                return s.getsockname()[0]
        except OSError:
            continue
    return None


# ---------------------------------------------------------------------------
# keeping it in the API server

class NodeAgent:
    """Registration, status and lease of one Node.  start() runs three
    daemon threads: status (registration first), lease, watch."""

    def __init__(self, cfg: Config, api: k8s.ApiClient, facts: Callable[[], dict],
                 server: str, stop: threading.Event | None = None,
                 images: Callable[[], list[dict]] | None = None) -> None:
        self.cfg = cfg
        self.images = images or list
        self.name = cfg.node_name
        self.core = k8s.CoreV1Api(api)
        self.facts = facts
        self.server = server
        self.stop = stop or threading.Event()
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.uid: str | None = None
        self.gone = True                    # no Node of ours known yet
        # node.spec.podCIDR: None until our Node has been read, "" when it
        # has none (the controller manager allocates it, if at all, after
        # registration: the watch brings it).
        self.pod_cidr: str | None = None
        # (uid, podCIDR) of the last ADDED/MODIFIED event of a Node of our
        # name: the watch may see the controller manager set the podCIDR
        # before register() has learnt the new Node's uid.
        self._seen_cidr: tuple[str, str] | None = None
        self.previous: dict[str, dict] = {}  # conditions last posted
        self.posted_key: str | None = None
        self.posted_at = 0.0
        self.lease = LeaseKeeper(k8s.CoordinationV1Api(api), self.name,
                                 cfg.lease_duration, lambda: self.uid, self.stop)
        self.threads: list[threading.Thread] = []
        self._watch_resp: Any = None

    # -- threads -------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._status_loop, "node-status"),
                             (self.lease.run, "node-lease"),
                             (self._watch_loop, "node-watch")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)

    def close(self) -> None:
        self.stop.set()
        self.wake.set()
        self.lease.wake()
        resp = self._watch_resp
        if resp is not None:
            try:
                resp.shutdown()     # wake the watch thread out of its read
            except Exception:       # noqa: BLE001 - closing anyway
                pass

    def _status_loop(self) -> None:
        backoff = kube.Backoff(0.1, min(7.0, self.cfg.status_interval * 2))
        while not self.stop.is_set():
            if self.sync():
                backoff.reset()
                wait = self.cfg.status_interval
            else:
                wait = backoff.next()
            self.wake.wait(wait)
            self.wake.clear()

    # -- one round -----------------------------------------------------------

    def sync(self) -> bool:
        """Register if needed, then post the status if due.  True when
        all went well; every error is logged, none raised."""
        try:
            if self.gone:
                self.register()
            self.post_status()
            self._last_error = None
            return True
        except Exception as e:     # noqa: BLE001 - the agent must go on
            self._report(e)
            return False

    _last_error: str | None = None

    def _report(self, e: BaseException) -> None:
        what = getattr(e, "pufflet_what", "node status")
        msg = kube.describe(e)
        if f"{what}: {msg}" == self._last_error:
            return              # said already; keep the log readable
        self._last_error = f"{what}: {msg}"
        if kube.status_of(e) in (401, 403):
            # Say exactly what was refused: the node's RBAC or identity is
            # wrong, and only an admin can fix it.
            log.error("%s: refused by the API server: %s; retrying", what, msg)
        else:
            log.warning("%s: %s; retrying", what, msg)

    def register(self) -> None:
        """Create our Node, or adopt the existing one of the same name."""
        facts = self.facts()
        address = self.address()
        body = new_node(self.cfg, facts, address, now_rfc3339(), self.images())
        try:
            node = _call("create Node " + self.name,
                         lambda: self.core.create_node(body, _preload_content=False))
            log.info("registered node %s", self.name)
        except k8s.ApiException as e:
            if e.status != 409:
                raise
            node = _call(f"get Node {self.name}",
                         lambda: self.core.read_node(self.name, _preload_content=False))
            log.info("adopted existing node %s", self.name)
            node = self._reconcile(node, facts)
        with self.lock:
            self.uid = node["metadata"]["uid"]
            self.gone = False
            uid, seen = self.uid, self._seen_cidr
            self.pod_cidr = (seen[1] if seen is not None and seen[0] == uid and seen[1]
                             else (node.get("spec") or {}).get("podCIDR") or "")
            # Keep the transition times the Node already has.
            self.previous = {c["type"]: c for c in
                             (node.get("status") or {}).get("conditions") or ()}
            self.posted_key = None
        self.lease.wake()

    def _reconcile(self, node: dict, facts: dict) -> dict:
        """Labels we own are set on an adopted Node (the kubelet updates
        its default labels the same way); a stale resourceVersion is a 409:
        read again and retry."""
        want = labels(self.cfg, facts)
        for _ in range(5):
            have = node["metadata"].get("labels") or {}
            diff = {k: v for k, v in want.items() if have.get(k) != v}
            if not diff:
                break
            patch = {"metadata": {"labels": diff,
                                  "resourceVersion": node["metadata"]["resourceVersion"]}}
            try:
                node = _call(f"patch labels of Node {self.name}",
                             lambda: self.core.patch_node(self.name, patch,
                                                          _preload_content=False))
            except k8s.ApiException as e:
                if e.status != 409:
                    raise
                node = _call(f"get Node {self.name}",
                             lambda: self.core.read_node(self.name, _preload_content=False))
        have = {(t.get("key"), t.get("effect"), t.get("value", ""))
                for t in (node.get("spec") or {}).get("taints") or ()}
        missing = [f"{t.key}={t.value}:{t.effect}" for t in self.cfg.taints
                   if (t.key, t.effect, t.value) not in have]
        if missing:
            log.warning("adopted node %s lacks the configured taints %s: a node may "
                        "not change its own taints, an admin must add them",
                        self.name, ", ".join(missing))
        return node

    def post_status(self, force: bool = False) -> bool:
        """Compute the status; PATCH it if it changed or is due.  True if
        it was sent."""
        facts = self.facts()
        address = self.address()
        st = status(self.cfg, facts, address, self.previous, now_rfc3339(),
                    self.images())
        key = without_heartbeats(st)
        due = time.monotonic() - self.posted_at >= self.cfg.status_report
        if not (force or due or key != self.posted_key):
            return False
        try:
            # PATCH nodes/<name>/status straight away: a node may not GET
            # its status subresource, and a strategic merge patch of the
            # fields we own leaves everyone else's alone.  Conditions and
            # addresses merge by type.
            _call(f"patch nodes/{self.name}/status",
                  lambda: self.core.patch_node_status(self.name, {"status": st},
                                                      _preload_content=False))
        except k8s.ApiException as e:
            if e.status == 404:
                log.warning("node %s was deleted; registering it again", self.name)
                with self.lock:
                    self.gone = True
            raise
        if key != self.posted_key:
            log.info("node status sent: %s", _summary(st))
        with self.lock:
            self.previous = {c["type"]: c for c in st["conditions"]}
            self.posted_key = key
            self.posted_at = time.monotonic()
        return True

    def address(self) -> str | None:
        return self.cfg.node_address or detect_address(self.server)

    # -- watching our own Node ----------------------------------------------

    def _watch_loop(self) -> None:
        backoff = kube.Backoff(0.5, 30.0)
        rv: str | None = None
        while not self.stop.is_set():
            try:
                rv = self._watch(rv)
                backoff.reset()
            except Exception as e:     # noqa: BLE001
                if kube.status_of(e) == 410:
                    rv = None
                    continue
                log.debug("watching node %s: %s", self.name, kube.describe(e))
                self.stop.wait(backoff.next())

    def _watch(self, rv: str | None) -> str | None:
        timeout = int(random.uniform(WATCH_MIN, WATCH_MAX))
        resp = self.core.list_node(
            field_selector=f"metadata.name={self.name}", watch=True,
            resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=timeout,
            _preload_content=False, _request_timeout=(kube.CONNECT_TIMEOUT, timeout + 30))
        self._watch_resp = resp
        try:
            for line in resp:
                if self.stop.is_set():
                    break
                ev = json.loads(line)
                obj = ev.get("object") or {}
                if ev.get("type") == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise RuntimeError(obj.get("message", "watch error"))
                rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                self._observe(ev.get("type"), obj)
        finally:
            self._watch_resp = None
            resp.release_conn()
        return rv

    def _observe(self, kind: str | None, obj: dict) -> None:
        uid = (obj.get("metadata") or {}).get("uid")
        with self.lock:
            if kind in ("ADDED", "MODIFIED") and uid:
                self._seen_cidr = (uid, (obj.get("spec") or {}).get("podCIDR") or "")
            if kind in ("ADDED", "MODIFIED") and uid == self.uid:
                cidr = (obj.get("spec") or {}).get("podCIDR") or ""
                if cidr != self.pod_cidr:
                    log.info("node %s: podCIDR %s", self.name, cidr or "none")
                    self.pod_cidr = cidr
            if kind == "DELETED" and uid == self.uid:
                log.warning("node %s was deleted; registering it again", self.name)
                self.gone = True
            elif kind in ("ADDED", "MODIFIED") and not self.gone and uid == self.uid:
                # Conditions changed by someone else: send ours again now
                # rather than at the next report.
                theirs = {c.get("type"): (c.get("status"), c.get("reason"))
                          for c in (obj.get("status") or {}).get("conditions") or ()}
                ours = {t: (c["status"], c["reason"]) for t, c in self.previous.items()}
                if self.posted_key is None or any(theirs.get(t) != v for t, v in ours.items()):
                    self.posted_key = None
                else:
                    return
            else:
                return
        self.wake.set()


def _call(what: str, fn: Callable[[], Any]) -> dict:
    """Run one API call with _preload_content=False and decode the JSON;
    an error carries what was attempted, for the log."""
    try:
        resp = fn()
    except Exception as e:
        e.pufflet_what = what    # type: ignore[attr-defined]
        raise
    return json.loads(resp.data)


def _summary(st: dict) -> str:
    return ", ".join(f"{c['type']}={c['status']}" for c in st["conditions"])
