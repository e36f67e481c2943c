"""Authentication, authorization and the NodeRestriction admission subset.

Authn: a TLS client certificate verified against the cluster CA gives
user=CN, groups=O values; a bearer token is looked up in a static table or
among TokenRequest-issued service account tokens.  Everyone authenticated
also gets the group system:authenticated.  Anonymous requests are refused.

Authz, in this order:
1. system:masters: everything;
2. the test's rules (ApiServer.allow/deny), deny first -- standing in for RBAC;
3. the Node authorizer (plugin/pkg/auth/authorizer/node, with
   AuthorizeNodeWithSelectors, the default since 1.32): nodes read only
   their own Node, list/watch pods only with fieldSelector
   spec.nodeName=<self>, read secrets/configmaps/PVCs/serviceaccount tokens
   only when a pod bound to them references the object, leases only their own
   in kube-node-lease; plus the static system:node rules;
4. every authenticated user may GET discovery paths and create
   selfsubjectaccessreviews (system:discovery / system:basic-user).
Then NodeRestriction limits node writes to their own Node, mirror pods
bound to themselves, status of their own pods, and their own lease.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ApiError, forbidden
from .resources import Resource

if TYPE_CHECKING:
    from .store import Store

MASTERS = "system:masters"
NODES = "system:nodes"
NODE_PREFIX = "system:node:"
NODE_LEASE_NS = "kube-node-lease"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: dict[str, list[str]] = field(default_factory=dict, hash=False, compare=False)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"username": self.name, "groups": list(self.groups)}
        if self.uid:
            out["uid"] = self.uid
        if self.extra:
            out["extra"] = self.extra
        return out


def node_name(user: User) -> str | None:
    """NodeIdentity(): the node name for a node user, else None."""
    if NODES in user.groups and user.name.startswith(NODE_PREFIX):
        return user.name[len(NODE_PREFIX):] or None
    return None


@dataclass
class _Token:
    user: User
    expires: dt.datetime | None = None
    audiences: tuple[str, ...] = ()
    sa: tuple[str, str, str] | None = None            # namespace, name, uid
    pod: tuple[str, str] | None = None                # name, uid


class Authenticator:
    def __init__(self, store: "Store") -> None:
        self.store = store
        self._tokens: dict[str, _Token] = {}
        self._lock = threading.Lock()

    def add_token(self, token: str, user: str, groups: tuple[str, ...] | list[str] = (),
                  uid: str = "") -> None:
        with self._lock:
            self._tokens[token] = _Token(User(user, tuple(groups), uid))

    def from_cert(self, peercert: dict[str, Any] | None) -> User | None:
        if not peercert:
            return None
        cn, orgs = "", []
        for rdn in peercert.get("subject", ()):
            for k, v in rdn:
                if k == "commonName":
                    cn = v
                elif k == "organizationName":
                    orgs.append(v)
        return User(cn, tuple(orgs)) if cn else None

    def issue_sa_token(self, namespace: str, sa: dict[str, Any], seconds: int,
                       audiences: list[str], pod: dict[str, Any] | None) -> tuple[str, str]:
        """A JWT-shaped token (claims readable, signature meaningless) and its
        RFC3339 expiry.  Only this emulator can validate it (by lookup)."""
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        exp = now + dt.timedelta(seconds=seconds)
        name, uid = sa["metadata"]["name"], sa["metadata"]["uid"]
        claims: dict[str, Any] = {
            "aud": audiences, "exp": int(exp.timestamp()), "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()), "iss": API_AUDIENCE, "jti": secrets.token_hex(16),
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "kubernetes.io": {"namespace": namespace,
                              "serviceaccount": {"name": name, "uid": uid}}}
        extra: dict[str, list[str]] = {}
        if pod:
            pmd = pod["metadata"]
            claims["kubernetes.io"]["pod"] = {"name": pmd["name"], "uid": pmd["uid"]}
            extra["authentication.kubernetes.io/pod-name"] = [pmd["name"]]
            extra["authentication.kubernetes.io/pod-uid"] = [pmd["uid"]]
            node = (pod.get("spec") or {}).get("nodeName")
            if node:
                claims["kubernetes.io"]["node"] = {"name": node}
                extra["authentication.kubernetes.io/node-name"] = [node]
        b64 = lambda d: base64.urlsafe_b64encode(json.dumps(d, separators=(",", ":")).encode()).rstrip(b"=").decode()
        token = ".".join([b64({"alg": "RS256", "kid": "pufflet-emulator"}), b64(claims),
                          base64.urlsafe_b64encode(secrets.token_bytes(64)).rstrip(b"=").decode()])
        user = User(claims["sub"], ("system:serviceaccounts", f"system:serviceaccounts:{namespace}"),
                    uid, extra)
        with self._lock:
            self._tokens[token] = _Token(user, exp, tuple(audiences), (namespace, name, uid),
                                         (pod["metadata"]["name"], pod["metadata"]["uid"]) if pod else None)
        return token, exp.strftime("%Y-%m-%dT%H:%M:%SZ")

    def from_token(self, token: str, audiences: list[str] | None = None
                   ) -> tuple[User, list[str]] | None:
        """(user, audiences it is good for) or None, checking expiry and that
        the service account (and bound pod) still exist with the same uid."""
        with self._lock:
            t = self._tokens.get(token)
        if t is None:
            return None
        if t.expires and dt.datetime.now(dt.timezone.utc) >= t.expires:
            return None
        auds = list(audiences or [API_AUDIENCE])
        if t.sa:
            sa = self.store.try_get("serviceaccounts", t.sa[0], t.sa[1])
            if sa is None or sa["metadata"]["uid"] != t.sa[2]:
                return None
            if t.pod:
                pod = self.store.try_get("pods", t.sa[0], t.pod[0])
                if pod is None or pod["metadata"]["uid"] != t.pod[1] \
                        or pod["metadata"].get("deletionTimestamp"):
                    return None
            auds = [a for a in auds if a in t.audiences]
            if not auds:
                return None
        return t.user, auds


def authenticated(user: User) -> User:
    if "system:authenticated" in user.groups:
        return user
    return User(user.name, user.groups + ("system:authenticated",), user.uid, user.extra)


# -- authorization -------------------------------------------------------
@dataclass
class Attributes:
    user: User
    verb: str
    resource: str = ""
    subresource: str = ""
    group: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""                  # non-resource requests
    fields: list[tuple[str, str, str]] = field(default_factory=list)  # (field, op, value)

    @property
    def is_resource(self) -> bool:
        return bool(self.resource)


@dataclass(frozen=True)
class Rule:
    subject: str                    # user name, or "group:<name>"
    verb: str = "*"
    resource: str = "*"             # may be "pods/status"
    group: str = "*"
    namespace: str = "*"
    name: str = "*"
    allow: bool = True

    def matches(self, a: Attributes) -> bool:
        subj = self.subject == a.user.name or (
            self.subject.startswith("group:") and self.subject[6:] in a.user.groups)
        res = a.resource + (f"/{a.subresource}" if a.subresource else "")
        return (subj and self.verb in ("*", a.verb)
                and self.resource in ("*", res, a.resource + "/*" if a.subresource else res)
                and self.group in ("*", a.group)
                and self.namespace in ("*", a.namespace) and self.name in ("*", a.name))


# Static rules of the system:node role (bootstrappolicy.NodeRules), for the
# resources the Node authorizer does not subdivide: (group, resource, verbs).
_NODE_RULES: list[tuple[str, str, set[str]]] = [
    ("authentication.k8s.io", "tokenreviews", {"create"}),
    ("authorization.k8s.io", "subjectaccessreviews", {"create"}),
    ("authorization.k8s.io", "localsubjectaccessreviews", {"create"}),
    ("", "services", {"get", "list", "watch"}),
    ("", "events", {"create", "update", "patch"}),
    ("events.k8s.io", "events", {"create", "update", "patch"}),
    ("certificates.k8s.io", "certificatesigningrequests", {"create", "get", "list", "watch"}),
    ("node.k8s.io", "runtimeclasses", {"get", "list", "watch"}),
]
_DISCOVERY = ("/api", "/apis", "/version", "/healthz", "/livez", "/readyz", "/openapi")


class Authorizer:
    def __init__(self, store: "Store") -> None:
        self.store = store
        self.rules: list[Rule] = []

    def authorize(self, a: Attributes) -> tuple[bool, str]:
        """(allowed, reason) -- reason is what the real authorizers report."""
        if MASTERS in a.user.groups:
            return True, ""
        for r in self.rules:
            if not r.allow and r.matches(a):
                return False, "denied by test rule"
        for r in self.rules:
            if r.allow and r.matches(a):
                return True, ""
        node = node_name(a.user)
        if node is not None:
            ok, why = self._node(node, a)
            if ok:
                return True, ""
        else:
            why = ""
        if not a.is_resource:
            if a.verb == "get" and any(a.path == p or a.path.startswith(p + "/") for p in _DISCOVERY):
                return True, ""
        elif a.resource == "selfsubjectaccessreviews" and a.verb == "create":
            return True, ""
        return False, why

    # The Node authorizer.
    def _node(self, node: str, a: Attributes) -> tuple[bool, str]:
        if not a.is_resource:
            return False, ""
        gr = (a.group, a.resource)
        if gr in (("", "secrets"), ("", "configmaps")):
            if a.verb not in ("get", "list", "watch"):
                return False, "can only read resources of this type"
            if a.subresource:
                return False, "cannot read subresource"
            if not a.namespace:
                return False, "can only read namespaced object of this type"
            return self._related(node, a)
        if gr == ("", "persistentvolumeclaims"):
            if a.subresource == "status":
                if a.verb not in ("update", "patch"):
                    return False, "can only get/update/patch this type"
            elif a.verb != "get" or a.subresource:
                return False, "can only get individual resources of this type"
            return self._related(node, a)
        if gr == ("", "serviceaccounts"):
            if a.verb != "create" or not a.name:
                return False, "can only create tokens for individual service accounts"
            if a.subresource != "token":
                return False, "can only create token subresource of serviceaccount"
            return self._related(node, a)
        if gr == ("coordination.k8s.io", "leases"):
            if a.verb not in ("get", "create", "update", "patch", "delete"):
                return False, "can only get, create, update, patch, or delete a node lease"
            if a.namespace != NODE_LEASE_NS:
                return False, f'can only access leases in the "{NODE_LEASE_NS}" system namespace'
            if a.verb != "create" and a.name != node:
                return False, "can only access node lease with the same name as the requesting node"
            return True, ""
        if gr == ("", "nodes"):
            if a.subresource == "" and a.verb in ("create", "update", "patch"):
                return True, ""
            if a.subresource == "" and a.verb in ("get", "list", "watch"):
                if a.name == node:
                    return True, ""
                if not a.name:
                    return False, f"node '{node}' cannot read all nodes, only its own Node object"
                return False, f"node '{node}' cannot read '{a.name}', only its own Node object"
            if a.subresource == "status" and a.verb in ("update", "patch"):
                return True, ""
            return False, ""
        if gr == ("", "pods"):
            if a.subresource == "":
                if a.verb == "get":
                    return self._related(node, a)
                if a.verb in ("list", "watch"):
                    if ("spec.nodeName", "=", node) in a.fields:
                        return True, ""
                    if a.name:
                        return self._related(node, a)
                    return False, "can only list/watch pods with spec.nodeName field selector"
                if a.verb in ("create", "delete"):
                    return True, ""
            if a.subresource == "status" and a.verb in ("update", "patch"):
                return True, ""
            if a.subresource == "eviction" and a.verb == "create":
                return True, ""
            return False, ""
        for g, r, verbs in _NODE_RULES:
            if (g, r) == gr and a.verb in verbs and not a.subresource:
                return True, ""
        return False, ""

    def _related(self, node: str, a: Attributes) -> tuple[bool, str]:
        why = f"no relationship found between node '{node}' and this object"
        if not a.name:
            return False, "No Object name found"
        if self.store.try_get("nodes", "", node) is None:
            return False, why
        kind = a.resource
        for pod in self.store.all_objects("pods"):
            spec = pod.get("spec") or {}
            if spec.get("nodeName") != node or pod["metadata"]["namespace"] != a.namespace:
                continue
            if kind == "pods" and pod["metadata"]["name"] == a.name:
                return True, ""
            if a.name in pod_references(pod).get(kind, set()):
                return True, ""
        return False, why


def pod_references(pod: dict[str, Any]) -> dict[str, set[str]]:
    """Names of secrets, configmaps, PVCs and the serviceaccount a pod uses
    (the edges the Node authorizer's graph records)."""
    spec = pod.get("spec") or {}
    refs: dict[str, set[str]] = {"secrets": set(), "configmaps": set(),
                                 "persistentvolumeclaims": set(), "serviceaccounts": set()}
    if spec.get("serviceAccountName"):
        refs["serviceaccounts"].add(spec["serviceAccountName"])
    for s in spec.get("imagePullSecrets") or []:
        refs["secrets"].add(s.get("name", ""))
    for v in spec.get("volumes") or []:
        if isinstance(v.get("secret"), dict):
            refs["secrets"].add(v["secret"].get("secretName", ""))
        if isinstance(v.get("configMap"), dict):
            refs["configmaps"].add(v["configMap"].get("name", ""))
        if isinstance(v.get("persistentVolumeClaim"), dict):
            refs["persistentvolumeclaims"].add(v["persistentVolumeClaim"].get("claimName", ""))
        if isinstance(v.get("ephemeral"), dict):
            refs["persistentvolumeclaims"].add(f"{pod['metadata']['name']}-{v.get('name', '')}")
        for src in (v.get("projected") or {}).get("sources") or []:
            if isinstance(src.get("secret"), dict):
                refs["secrets"].add(src["secret"].get("name", ""))
            if isinstance(src.get("configMap"), dict):
                refs["configmaps"].add(src["configMap"].get("name", ""))
        for k in ("csi", "flexVolume", "cephfs", "rbd", "iscsi", "azureFile", "scaleIO", "storageos"):
            ref = (v.get(k) or {}).get("nodePublishSecretRef") or (v.get(k) or {}).get("secretRef")
            if isinstance(ref, dict):
                refs["secrets"].add(ref.get("name", ""))
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []) + \
            (spec.get("ephemeralContainers") or []):
        for e in c.get("envFrom") or []:
            if isinstance(e.get("secretRef"), dict):
                refs["secrets"].add(e["secretRef"].get("name", ""))
            if isinstance(e.get("configMapRef"), dict):
                refs["configmaps"].add(e["configMapRef"].get("name", ""))
        for e in c.get("env") or []:
            vf = e.get("valueFrom") or {}
            if isinstance(vf.get("secretKeyRef"), dict):
                refs["secrets"].add(vf["secretKeyRef"].get("name", ""))
            if isinstance(vf.get("configMapKeyRef"), dict):
                refs["configmaps"].add(vf["configMapKeyRef"].get("name", ""))
    return refs


def forbidden_message(a: Attributes) -> str:
    """responsewriters.forbiddenMessage."""
    if not a.is_resource:
        return f'User "{a.user.name}" cannot {a.verb} path "{a.path}"'
    res = a.resource + (f"/{a.subresource}" if a.subresource else "")
    if a.namespace:
        return (f'User "{a.user.name}" cannot {a.verb} resource "{res}" in API group '
                f'"{a.group}" in the namespace "{a.namespace}"')
    return (f'User "{a.user.name}" cannot {a.verb} resource "{res}" in API group '
            f'"{a.group}" at the cluster scope')


# -- NodeRestriction admission ----------------------------------------------
_KUBELET_LABELS = {
    "kubernetes.io/hostname", "topology.kubernetes.io/zone", "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/region",
    "beta.kubernetes.io/instance-type", "node.kubernetes.io/instance-type",
    "kubernetes.io/os", "kubernetes.io/arch", "beta.kubernetes.io/os", "beta.kubernetes.io/arch"}
_KUBELET_LABEL_NS = ("kubelet.kubernetes.io", "node.kubernetes.io")


def _label_ns(key: str) -> str:
    return key.split("/", 1)[0] if "/" in key else ""


def _forbidden_labels(modified: set[str]) -> list[str]:
    out = []
    for label in modified:
        ns = _label_ns(label)
        if ns == "node-restriction.kubernetes.io" or ns.endswith(".node-restriction.kubernetes.io"):
            out.append(label)
            continue
        is_kube = ns in ("kubernetes.io", "k8s.io") or ns.endswith(".kubernetes.io") or ns.endswith(".k8s.io")
        is_kubelet = label in _KUBELET_LABELS or any(
            ns == n or ns.endswith("." + n) for n in _KUBELET_LABEL_NS)
        if is_kube and not is_kubelet:
            out.append(label)
    return sorted(out)


def _modified(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def admit_node(user: User, store: "Store", res: Resource, op: str, subresource: str,
               namespace: str, name: str, old: dict[str, Any] | None,
               new: dict[str, Any] | None) -> None:
    """NodeRestriction: raise 403 if a node may not make this write."""
    node = node_name(user)
    if node is None:
        return

    def deny(msg: str) -> ApiError:
        return forbidden(res, name, msg)

    if res.key == "pods":
        if subresource == "":
            if op == "create":
                pod = new or {}
                md, spec = pod.get("metadata") or {}, pod.get("spec") or {}
                if "kubernetes.io/config.mirror" not in (md.get("annotations") or {}):
                    raise deny(f'pod does not have "kubernetes.io/config.mirror" annotation, '
                               f'node "{node}" can only create mirror pods')
                if spec.get("nodeName") != node:
                    raise deny(f'node "{node}" can only create pods with spec.nodeName set to itself')
                owners = md.get("ownerReferences") or []
                if len(owners) > 1:
                    raise deny(f'node "{node}" can only create pods with a single owner reference set to itself')
                if not owners:
                    raise deny(f'node "{node}" can only create pods with an owner reference set to itself')
                o = owners[0]
                if o.get("apiVersion") != "v1" or o.get("kind") != "Node" or o.get("name") != node:
                    raise deny(f'node "{node}" can only create pods with an owner reference set to itself')
                if not o.get("controller"):
                    raise deny(f'node "{node}" can only create pods with a controller owner reference set to itself')
                if o.get("blockOwnerDeletion"):
                    raise deny(f'node "{node}" must not set blockOwnerDeletion on an owner reference')
                n = store.get("nodes", "", node)
                if o.get("uid") != n["metadata"]["uid"]:
                    raise deny(f'node {node} UID mismatch: expected {o.get("uid")} got {n["metadata"]["uid"]}')
                if spec.get("serviceAccountName"):
                    raise deny(f'node "{node}" can not create pods that reference a service account')
                refs = pod_references(pod)
                for kind, word in (("secrets", "secrets"), ("configmaps", "configmaps"),
                                   ("persistentvolumeclaims", "persistentvolumeclaims")):
                    if refs[kind] - {""}:
                        raise deny(f'node "{node}" can not create pods that reference {word}')
            elif op == "delete":
                if (old or {}).get("spec", {}).get("nodeName") != node:
                    raise deny(f'node "{node}" can only delete pods with spec.nodeName set to itself')
            else:
                raise deny(f'unexpected operation "{op.capitalize()}", node "{node}" can only '
                           f'create and delete mirror pods')
        elif subresource == "status":
            if (old or {}).get("spec", {}).get("nodeName") != node:
                raise deny(f'node "{node}" can only update pod status for pods with spec.nodeName set to itself')
            if ((old or {}).get("metadata", {}).get("labels") or {}) != \
                    ((new or {}).get("metadata", {}).get("labels") or {}):
                raise deny(f'node "{node}" cannot update labels through pod status')
        elif subresource == "eviction":
            if (old or {}).get("spec", {}).get("nodeName") != node:
                raise deny(f"node {node} can only evict pods with spec.nodeName set to itself")
    elif res.key == "nodes":
        if name != node:
            raise deny(f'node "{node}" is not allowed to modify node "{name}"')
        if op == "create":
            bad = _forbidden_labels(set(((new or {}).get("metadata") or {}).get("labels") or {}))
            if bad:
                raise deny(f'node "{node}" is not allowed to set the following labels: {", ".join(bad)}')
        elif op == "update" and old is not None and new is not None:
            if (old.get("spec") or {}).get("taints") != (new.get("spec") or {}).get("taints"):
                raise deny(f'node "{node}" is not allowed to modify taints')
            bad = _forbidden_labels(_modified(old["metadata"].get("labels") or {},
                                              new["metadata"].get("labels") or {}))
            if bad:
                raise deny(f"is not allowed to modify labels: {', '.join(bad)}")
    elif res.key == "leases.coordination.k8s.io":
        if namespace != NODE_LEASE_NS:
            raise deny(f'can only access leases in the "{NODE_LEASE_NS}" system namespace')
        if op == "create" and ((new or {}).get("metadata") or {}).get("name") != node:
            raise deny("can only access node lease with the same name as the requesting node")
        if op != "create" and name != node:
            raise deny("can only access node lease with the same name as the requesting node")
    elif res.key == "serviceaccounts" and subresource == "token":
        ref = ((new or {}).get("spec") or {}).get("boundObjectRef") or {}
        if ref.get("apiVersion") != "v1" or ref.get("kind") != "Pod" or not ref.get("name"):
            raise deny("node requested token not bound to a pod")
        if not ref.get("uid"):
            raise deny("node requested token with a pod binding without a uid")
        pod = store.get("pods", namespace, ref["name"])
        if ref["uid"] != pod["metadata"]["uid"]:
            raise deny(f"the UID in the bound object reference ({ref['uid']}) does not match the "
                       f"UID in record. The object might have been deleted and then recreated")
        if (pod.get("spec") or {}).get("nodeName") != node:
            raise deny("node requested token bound to a pod scheduled on a different node")
