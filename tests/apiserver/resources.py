"""The resource table: what the emulator serves, and how each kind behaves.

One row per (group, version, plural).  Discovery documents are generated from
this table, so anything a client can discover is something the emulator serves.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resource:
    group: str                 # "" for the core group
    version: str
    kind: str
    plural: str
    singular: str
    namespaced: bool
    verbs: tuple[str, ...] = ("create", "delete", "deletecollection", "get",
                              "list", "patch", "update", "watch")
    subresources: tuple[str, ...] = ()
    short_names: tuple[str, ...] = ()
    # Objects that are answered, never stored (TokenReview, SubjectAccessReview).
    virtual: bool = False
    # metadata.generation tracks spec changes (pods since 1.33).
    generation: bool = False
    # Field selectors the real API server accepts for this kind, besides
    # metadata.name and metadata.namespace.
    fields: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """Storage key, e.g. "pods" or "leases.coordination.k8s.io"."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources


_CRUD = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
_CREATE_ONLY = ("create",)

RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "Namespace", "namespaces", "namespace", False,
             verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
             subresources=("status", "finalize"), short_names=("ns",), fields=("status.phase",)),
    Resource("", "v1", "Node", "nodes", "node", False, subresources=("status", "proxy"),
             short_names=("no",), fields=("spec.unschedulable",)),
    Resource("", "v1", "Pod", "pods", "pod", True,
             subresources=("status", "binding", "eviction", "log", "exec", "attach",
                           "portforward", "proxy", "ephemeralcontainers", "resize"),
             short_names=("po",), generation=True,
             fields=("spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
                     "spec.serviceAccountName", "spec.hostNetwork", "status.phase",
                     "status.podIP", "status.podIPs", "status.nominatedNodeName")),
    Resource("", "v1", "Event", "events", "event", True, short_names=("ev",),
             fields=("involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                     "involvedObject.uid", "involvedObject.apiVersion",
                     "involvedObject.resourceVersion", "involvedObject.fieldPath",
                     "reason", "reportingComponent", "source", "type")),
    Resource("", "v1", "ConfigMap", "configmaps", "configmap", True, short_names=("cm",)),
    Resource("", "v1", "Secret", "secrets", "secret", True, fields=("type",)),
    Resource("", "v1", "ServiceAccount", "serviceaccounts", "serviceaccount", True,
             subresources=("token",), short_names=("sa",)),
    Resource("", "v1", "Service", "services", "service", True, subresources=("status",),
             short_names=("svc",)),
    Resource("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims",
             "persistentvolumeclaim", True, subresources=("status",), short_names=("pvc",)),
    Resource("coordination.k8s.io", "v1", "Lease", "leases", "lease", True),
    Resource("events.k8s.io", "v1", "Event", "events", "event", True, short_names=("ev",)),
    Resource("node.k8s.io", "v1", "RuntimeClass", "runtimeclasses", "runtimeclass", False),
    Resource("certificates.k8s.io", "v1", "CertificateSigningRequest",
             "certificatesigningrequests", "certificatesigningrequest", False,
             subresources=("approval", "status"), short_names=("csr",),
             fields=("spec.signerName",)),
    Resource("authentication.k8s.io", "v1", "TokenReview", "tokenreviews", "tokenreview",
             False, verbs=_CREATE_ONLY, virtual=True),
    Resource("authorization.k8s.io", "v1", "SubjectAccessReview", "subjectaccessreviews",
             "subjectaccessreview", False, verbs=_CREATE_ONLY, virtual=True),
    Resource("authorization.k8s.io", "v1", "SelfSubjectAccessReview",
             "selfsubjectaccessreviews", "selfsubjectaccessreview", False,
             verbs=_CREATE_ONLY, virtual=True),
)

# Subresources whose verbs differ from the parent's: (plural, sub) -> verbs.
SUBRESOURCE_VERBS: dict[tuple[str, str], tuple[str, ...]] = {
    ("pods", "binding"): ("create",),
    ("pods", "eviction"): ("create",),
    ("pods", "log"): ("get",),
    ("pods", "exec"): ("create", "get"),
    ("pods", "attach"): ("create", "get"),
    ("pods", "portforward"): ("create", "get"),
    ("pods", "proxy"): ("create", "delete", "get", "patch", "update"),
    ("pods", "ephemeralcontainers"): ("get", "patch", "update"),
    ("pods", "resize"): ("get", "patch", "update"),
    ("nodes", "proxy"): ("create", "delete", "get", "patch", "update"),
    ("serviceaccounts", "token"): ("create",),
    ("namespaces", "finalize"): ("update",),
    ("certificatesigningrequests", "approval"): ("get", "patch", "update"),
}
STATUS_VERBS = ("get", "patch", "update")

# Subresources the emulator actually implements (the others are listed in
# discovery, like the real server, but answer 404 here).
IMPLEMENTED_SUBRESOURCES = {"status", "binding", "eviction", "token", "approval",
                            "log", "exec", "attach", "portforward"}

_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
_BY_KEY = {r.key: r for r in RESOURCES}


def lookup(group: str, version: str, plural: str) -> Resource | None:
    return _BY_PATH.get((group, version, plural))


def by_key(key: str) -> Resource:
    """Resolve "pods", "leases.coordination.k8s.io", or a unique short name/kind."""
    if key in _BY_KEY:
        return _BY_KEY[key]
    matches = [r for r in RESOURCES
               if key in (r.plural, r.kind, r.kind.lower(), r.singular) or key in r.short_names]
    if len(matches) > 1:
        # "events": the core group wins, as with kubectl.
        matches = [r for r in matches if not r.group] or matches
    if len(matches) == 1:
        return matches[0]
    raise KeyError(f"unknown or ambiguous resource {key!r}")


def groups() -> dict[str, list[str]]:
    """Non-core groups and their versions, in table order."""
    out: dict[str, list[str]] = {}
    for r in RESOURCES:
        if r.group and r.version not in out.setdefault(r.group, []):
            out[r.group].append(r.version)
    return out


def resource_list(group: str, version: str) -> dict | None:
    """The APIResourceList discovery document for one group/version."""
    rows = [r for r in RESOURCES if r.group == group and r.version == version]
    if not rows:
        return None
    items = []
    for r in rows:
        items.append({
            "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": list(r.verbs),
            **({"shortNames": list(r.short_names)} if r.short_names else {}),
        })
        for sub in r.subresources:
            verbs = STATUS_VERBS if sub == "status" else SUBRESOURCE_VERBS.get((r.plural, sub), ())
            kind = {"binding": "Binding", "eviction": "Eviction", "token": "TokenRequest",
                    "log": "Pod", "exec": "PodExecOptions", "attach": "PodAttachOptions",
                    "portforward": "PodPortForwardOptions", "proxy": "PodProxyOptions"}.get(sub, r.kind)
            items.append({"name": f"{r.plural}/{sub}", "singularName": "",
                          "namespaced": r.namespaced, "kind": kind, "verbs": list(verbs)})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": rows[0].api_version, "resources": items}
