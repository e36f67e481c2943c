"""Pod admission: whether pufflet can run a pod as asked, before anything
is made for it.

A pod refused here fails for good, as one the kubelet's admit handlers
reject: an Event with the reason, then status phase Failed with that
reason and "Pod was rejected: <message>" (rejection_status()).

Reasons.  The kubelet's own where it has one:
  OutOfpods, OutOf<resource>   too many pods; a resource the node has none of
                               ("Node didn't have enough resource: ...")
  NodeAffinity                 nodeSelector / required node affinity
  PodOSNotSupported            spec.os.name is not this node's OS
  SysctlForbidden              spec.securityContext.sysctls
and pufflet's, for what a kubelet would run but pufflet cannot:
  UnsupportedRuntimeClass      no such RuntimeClass, or its handler is not
                               pufflet's; no runtimeClassName on a node
                               that is not dedicated to pufflet
  UnsupportedHostNamespace     hostIPC, hostPID, windows hostProcess
  UnsupportedSecurityContext   privileged, capabilities.add, runAsUser 0,
                               containers asking for different users
  UnsupportedVolume            volume types, every hostPath (see below),
                               subPath(Expr), mount propagation,
                               volumeDevices
  UnsupportedProbe             grpc probes (pufflet has exec, httpGet and
                               tcpSocket; a probe it could not run would
                               fail forever and, for liveness, restart the
                               container in a loop)

What is accepted, and what it means here:
- Every pod runs under its own uid/gid from the configured range, never 0.
  A runAsUser (pod or container level) other than 0 is accepted and
  mapped to that uid; since all containers share it, the containers must
  not ask for different users.  An explicit runAsUser 0 is refused: the
  author asked for root, which pufflet never gives.  An image whose USER
  is root (or unset) is mapped like any other, as most images are.
- runAsGroup (0 included), supplementalGroups, fsGroup: accepted, mapped
  to the pod's gid (volume files are readable by it).  runAsNonRoot:
  always satisfied.
- allowPrivilegeEscalation: accepted either way; pod processes cannot
  gain privileges (images carry no setuid files, there are no file
  capabilities).  capabilities.drop: accepted (there are none to drop).
  readOnlyRootFilesystem: accepted; image files are not writable by pods.
- seccompProfile, appArmorProfile, seLinuxOptions, procMount: accepted
  and not applied (OpenBSD has pledge/unveil, not these).
- hostNetwork: accepted.  shareProcessNamespace: accepted (one uid).
- Ephemeral containers: ignored.
- emptyDir of medium Memory is disk-backed here.
- hostPath: refused, always.  A pod runs in a root of its own, and the
  only ways to show a host directory inside it are a bind mount or
  nullfs, which OpenBSD does not have (mount(2)); copies or hard links
  would not be the host's directory.  The message still says what
  pufflet.conf's hostpath rules make of the path (not allowed, allowed
  read-only but mounted writable) so that the author fixes the right
  thing first.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pufflet.config import HostPath
from pufflet.priv.rlimits import QuantityError, parse_quantity

__all__ = ["admission_error", "rejection_status", "hostpath_rule",
           "SUPPORTED_VOLUMES", "SUPPORTED_PROJECTIONS", "NODE_RESOURCES"]

Lookup = Callable[[str, str, str], "Mapping[str, Any] | None"]

SUPPORTED_VOLUMES = frozenset({"emptyDir", "configMap", "secret", "downwardAPI",
                               "projected"})
SUPPORTED_PROJECTIONS = frozenset({"serviceAccountToken", "configMap", "secret",
                                   "downwardAPI"})
# What a pufflet node has; requests of anything else cannot be met.
NODE_RESOURCES = frozenset({"cpu", "memory", "ephemeral-storage", "pods"})
# hostPath types that name something pufflet could give; devices and
# sockets are the host's.
_HOSTPATH_TYPES = frozenset({"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File"})

Rejection = tuple[str, str]


def rejection_status(pod: Mapping[str, Any], reason: str, message: str) -> dict[str, Any]:
    """The status the kubelet's rejectPod sets."""
    from pufflet.agent.podstatus import qos_class
    qos = (pod.get("status") or {}).get("qosClass") or qos_class(pod)
    return {"phase": "Failed", "reason": reason, "message": "Pod was rejected: " + message,
            "qosClass": qos}


def hostpath_rule(path: str, hostpaths: Iterable[HostPath]) -> HostPath | None:
    """The pufflet.conf hostpath rule covering path (component-wise: /data
    covers /data and /data/x, not /database), the longest prefix first;
    None if no rule does or the path is not absolute and clean."""
    if not path.startswith("/"):
        return None
    if path != "/" and posixpath.normpath(path) != path.rstrip("/"):
        return None                          # "..", ".", "//" in it
    best: HostPath | None = None
    for hp in hostpaths:
        prefix = hp.prefix.rstrip("/") or "/"
        if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
            if best is None or len(prefix) > len(best.prefix.rstrip("/")):
                best = hp
    return best


def _containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    spec = pod.get("spec") or {}
    return list(spec.get("initContainers") or ()) + list(spec.get("containers") or ())


def _runtime_class(pod: Mapping[str, Any], lookup: Lookup | None,
                   handlers: Sequence[str], dedicated: bool) -> Rejection | None:
    name = (pod.get("spec") or {}).get("runtimeClassName")
    if not name:
        if dedicated:
            return None
        return ("UnsupportedRuntimeClass",
                "this node runs only pods whose runtimeClassName has the handler "
                f"{_either(handlers)}; the pod names no RuntimeClass")
    rc = lookup("runtimeclasses", "", name) if lookup is not None else None
    if rc is None:
        return "UnsupportedRuntimeClass", f'RuntimeClass "{name}" not found'
    handler = rc.get("handler")
    if handler not in handlers:
        return ("UnsupportedRuntimeClass",
                f'RuntimeClass "{name}" has handler "{handler}"; this node runs '
                f"{_either(handlers)}")
    return None


def _either(words: Sequence[str]) -> str:
    q = [f'"{w}"' for w in words]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " or " + q[-1]


def _security(pod: Mapping[str, Any]) -> Rejection | None:
    spec = pod.get("spec") or {}
    for key in ("hostIPC", "hostPID"):
        if spec.get(key):
            return ("UnsupportedHostNamespace",
                    f"{key} is not supported: pods never share the node's "
                    f"{'IPC' if key == 'hostIPC' else 'process'} namespace here")
    psc = spec.get("securityContext") or {}
    if psc.get("sysctls"):
        names = ", ".join(str(s.get("name")) for s in psc["sysctls"])
        return "SysctlForbidden", f"forbidden sysctl: {names}: pods cannot set sysctls here"
    users: dict[int, list[str]] = {}
    for c in _containers(pod):
        name = c.get("name")
        sc = c.get("securityContext") or {}
        win = {**(psc.get("windowsOptions") or {}), **(sc.get("windowsOptions") or {})}
        if win.get("hostProcess"):
            return ("UnsupportedHostNamespace",
                    f"container {name}: windowsOptions.hostProcess is not supported")
        if sc.get("privileged"):
            return ("UnsupportedSecurityContext",
                    f"container {name}: privileged containers are not supported")
        added = (sc.get("capabilities") or {}).get("add") or []
        if added:
            return ("UnsupportedSecurityContext",
                    f"container {name}: capabilities cannot be added "
                    f"({', '.join(map(str, added))}): pod processes have none")
        user = sc.get("runAsUser", psc.get("runAsUser"))
        if user is not None:
            if int(user) == 0:
                return ("UnsupportedSecurityContext",
                        f"container {name}: runAsUser 0: pufflet never runs containers as root")
            users.setdefault(int(user), []).append(str(name))
    if len(users) > 1:
        asked = "; ".join(f"{u} ({', '.join(n)})" for u, n in sorted(users.items()))
        return ("UnsupportedSecurityContext",
                f"containers ask for different users: {asked}; pufflet runs all "
                "containers of a pod under one uid")
    return None


def _volumes(pod: Mapping[str, Any], supported: Iterable[str],
             hostpaths: Sequence[HostPath]) -> Rejection | None:
    supported = set(supported)
    spec = pod.get("spec") or {}
    for v in spec.get("volumes") or ():
        name = v.get("name")
        kinds = [k for k in v if k != "name"]
        kind = kinds[0] if kinds else "?"
        if kind == "hostPath":
            return _host_path(pod, name, v["hostPath"] or {}, hostpaths)
        if kind not in supported:
            return ("UnsupportedVolume",
                    f"volume {name}: {kind} volumes are not supported; this node has "
                    f"{', '.join(sorted(supported))}")
        if kind == "emptyDir":
            medium = (v["emptyDir"] or {}).get("medium") or ""
            if medium not in ("", "Memory"):
                return "UnsupportedVolume", f"volume {name}: emptyDir medium {medium} is not supported"
        if kind == "projected":
            for s in (v["projected"] or {}).get("sources") or ():
                for sk in s:
                    if sk not in SUPPORTED_PROJECTIONS:
                        return ("UnsupportedVolume",
                                f"volume {name}: projected {sk} sources are not supported")
    for c in _containers(pod):
        cname = c.get("name")
        if c.get("volumeDevices"):
            return "UnsupportedVolume", f"container {cname}: volumeDevices are not supported"
        for m in c.get("volumeMounts") or ():
            if m.get("subPath") or m.get("subPathExpr"):
                return ("UnsupportedVolume",
                        f"container {cname}: mount of {m.get('name')} at {m.get('mountPath')}: "
                        "subPath and subPathExpr are not supported")
            prop = m.get("mountPropagation") or "None"
            if prop != "None":
                return ("UnsupportedVolume",
                        f"container {cname}: mountPropagation {prop} is not supported")
    return None


def _host_path(pod: Mapping[str, Any], name: str, hp: Mapping[str, Any],
               hostpaths: Sequence[HostPath]) -> Rejection:
    """Every hostPath volume is refused (see the module's doc); the
    message says first what pufflet.conf would say of it."""
    path = str(hp.get("path") or "")
    htype = hp.get("type") or ""
    if htype not in _HOSTPATH_TYPES:
        return ("UnsupportedVolume",
                f"volume {name}: hostPath type {htype} is not supported")
    rule = None if ".." in path.split("/") else hostpath_rule(path, hostpaths)
    if rule is None:
        return ("UnsupportedVolume",
                f"volume {name}: hostPath {path} is not under a prefix this "
                "node allows (pufflet.conf hostpath)")
    writers = [m.get("mountPath") for c in _containers(pod)
               for m in c.get("volumeMounts") or ()
               if m.get("name") == name and not m.get("readOnly")]
    if writers and not rule.writable:
        return ("UnsupportedVolume",
                f"volume {name}: hostPath {path} is mounted read-write at {writers[0]}, "
                f"but pufflet.conf allows {rule.prefix} read-only")
    return ("UnsupportedVolume",
            f"volume {name}: hostPath {path} cannot be given to a pod on this node: "
            "it needs a bind mount, which OpenBSD does not have (each pod runs in a "
            "root of its own)")


_PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def _probes(pod: Mapping[str, Any]) -> Rejection | None:
    for c in _containers(pod):
        for kind in _PROBES:
            if "grpc" in (c.get(kind) or {}):
                return ("UnsupportedProbe",
                        f"container {c.get('name')}: {kind} uses grpc, which pufflet "
                        "does not support; use exec, httpGet or tcpSocket")
    return None


def _value(q: Any) -> int:
    try:
        return math.ceil(parse_quantity(str(q)))
    except QuantityError:
        return 0


def _extended(pod: Mapping[str, Any], allocatable: Mapping[str, Any] | None) -> Rejection | None:
    """A request (or a limit, which implies the request) of a resource the
    node does not have: the predicate's InsufficientResourceError."""
    have = dict.fromkeys(NODE_RESOURCES, None) if allocatable is None else dict(allocatable)
    spec = pod.get("spec") or {}

    def asked(c: Mapping[str, Any]) -> dict[str, int]:
        res = c.get("resources") or {}
        out = {k: _value(v) for k, v in (res.get("limits") or {}).items()}
        out.update({k: _value(v) for k, v in (res.get("requests") or {}).items()})
        return out

    total: dict[str, int] = {}
    for c in spec.get("containers") or ():
        for k, v in asked(c).items():
            total[k] = total.get(k, 0) + v
    for c in spec.get("initContainers") or ():
        for k, v in asked(c).items():
            total[k] = max(total.get(k, 0), v)
    for k in sorted(total):
        if k in NODE_RESOURCES or total[k] <= 0:
            continue
        cap = _value(have[k]) if have.get(k) is not None else 0
        if total[k] > cap:
            return (f"OutOf{k}", f"Node didn't have enough resource: {k}, "
                    f"requested: {total[k]}, used: 0, capacity: {cap}")
    return None


def _match_expr(e: Mapping[str, Any], value: str | None) -> bool:
    op, vals = e.get("operator"), list(e.get("values") or ())
    if op == "In":
        return value is not None and value in vals
    if op == "NotIn":
        return value is None or value not in vals
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt"):
        try:
            a, b = int(value or ""), int(vals[0])
        except (ValueError, IndexError):
            return False
        return a > b if op == "Gt" else a < b
    return False


def _node_affinity(pod: Mapping[str, Any], labels: Mapping[str, str],
                   node_name: str | None) -> Rejection | None:
    spec = pod.get("spec") or {}
    msg = ("NodeAffinity",
           "Predicate NodeAffinity failed: node(s) didn't match Pod's node affinity/selector")
    for k, v in (spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return msg
    req = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution")
    if req is None:
        return None
    for term in req.get("nodeSelectorTerms") or ():
        exprs, fields = term.get("matchExpressions") or (), term.get("matchFields") or ()
        if not exprs and not fields:
            continue                         # an empty term matches nothing
        if all(_match_expr(e, labels.get(e.get("key"))) for e in exprs) and \
                all(_match_expr(f, node_name if f.get("key") == "metadata.name" else None)
                    for f in fields):
            return None
    return msg


def admission_error(pod: Mapping[str, Any], *,
                    node_is_dedicated: bool,
                    max_pods: int,
                    running_pods: int,
                    lookup: Lookup | None = None,
                    runtime_handlers: Sequence[str] = ("pufflet",),
                    hostpaths: Sequence[HostPath] = (),
                    supported_volume_types: Iterable[str] = SUPPORTED_VOLUMES,
                    node_labels: Mapping[str, str] | None = None,
                    node_name: str | None = None,
                    node_os: str = "openbsd",
                    allocatable: Mapping[str, Any] | None = None) -> Rejection | None:
    """(reason, message) if pufflet must refuse the pod, else None.

    lookup(kind, namespace, name) as elsewhere; here it is asked for
    ("runtimeclasses", "", name).  A RuntimeClass that does not exist
    refuses the pod (the kubelet would retry the sandbox forever).
    running_pods: admitted pods that are not terminal, this one not
    included.  node_labels: the node's labels, to check nodeSelector and
    required node affinity (None: not checked).  allocatable: the node's
    (None: cpu, memory, ephemeral-storage and pods only)."""
    spec = pod.get("spec") or {}
    want_os = (spec.get("os") or {}).get("name")
    if want_os and want_os != node_os:
        return ("PodOSNotSupported",
                f"Failed to admit pod as the OS field doesn't match node OS ({want_os}, "
                f"node is {node_os})")
    for check in (lambda: _runtime_class(pod, lookup, runtime_handlers, node_is_dedicated),
                  lambda: _security(pod),
                  lambda: _volumes(pod, supported_volume_types, hostpaths),
                  lambda: _probes(pod),
                  lambda: _extended(pod, allocatable),
                  lambda: (_node_affinity(pod, node_labels, node_name)
                           if node_labels is not None else None)):
        err = check()
        if err is not None:
            return err
    if running_pods + 1 > max_pods:
        return ("OutOfpods", f"Node didn't have enough resource: pods, requested: 1, "
                f"used: {running_pods}, capacity: {max_pods}")
    return None
