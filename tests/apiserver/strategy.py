"""Per-kind behaviour: defaulting, validation, and what each write may change.

Mirrors the parts of pkg/registry/*/strategy.go and the default admission
chain (ServiceAccount, DefaultTolerationSeconds, Priority) that a node agent
can observe.  Everything not listed here is stored as sent (no schema pruning).
"""
from __future__ import annotations

import datetime as dt
import re
from typing import TYPE_CHECKING, Any

from .errors import bad_request, forbidden, invalid
from .resources import Resource, by_key

if TYPE_CHECKING:
    from .store import Store

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
MIRROR = "kubernetes.io/config.mirror"

# metav1.Time fields serialize at second precision, metav1.MicroTime at
# microseconds, both in UTC with a "Z" -- whatever precision the client sent.
_TIME_FIELDS = {"creationTimestamp", "deletionTimestamp", "lastTransitionTime",
                "lastProbeTime", "lastHeartbeatTime", "startTime", "startedAt",
                "finishedAt", "firstTimestamp", "lastTimestamp", "lastUpdateTime",
                "expirationTimestamp"}
_MICRO_FIELDS = {"acquireTime", "renewTime", "eventTime", "lastObservedTime"}
_OPAQUE = {"labels", "annotations", "data", "binaryData", "stringData"}


def _normalize_times(res: Resource, node: Any, path: str = "") -> None:
    if isinstance(node, list):
        for x in node:
            _normalize_times(res, x, path)
        return
    if not isinstance(node, dict):
        return
    for k, v in list(node.items()):
        if k in _OPAQUE:
            continue
        if isinstance(v, str) and (k in _TIME_FIELDS or k in _MICRO_FIELDS):
            try:
                t = dt.datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
                if t.tzinfo is None:
                    raise ValueError(v)
            except ValueError:
                raise bad_request(f'{res.kind} in version "{res.version}" cannot be handled as a '
                                  f'{res.kind}: parsing time "{v}" as "2006-01-02T15:04:05Z07:00": '
                                  f'cannot parse "{v}" as "2006"') from None
            t = t.astimezone(dt.timezone.utc)
            node[k] = (t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if k in _MICRO_FIELDS
                       else t.strftime("%Y-%m-%dT%H:%M:%SZ"))
        elif isinstance(v, (dict, list)):
            _normalize_times(res, v, f"{path}.{k}")


def spec_of(obj: dict[str, Any]) -> dict[str, Any]:
    """Everything a main-resource write owns: all but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


def _all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


# -- create --------------------------------------------------------------
def _default_container(c: dict[str, Any]) -> None:
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    image = c.get("image", "")
    if "imagePullPolicy" not in c:
        tag = image.rsplit("/", 1)[-1]
        latest = "@" not in image and (":" not in tag or tag.endswith(":latest"))
        c["imagePullPolicy"] = "Always" if latest else "IfNotPresent"
    r = c.setdefault("resources", {})
    if r.get("limits"):
        req = r.setdefault("requests", {})
        for k, v in r["limits"].items():
            req.setdefault(k, v)
    for p in c.get("ports") or []:
        p.setdefault("protocol", "TCP")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        pr = c.get(probe)
        if isinstance(pr, dict):
            pr.setdefault("timeoutSeconds", 1)
            pr.setdefault("periodSeconds", 10)
            pr.setdefault("successThreshold", 1)
            pr.setdefault("failureThreshold", 3)
            if isinstance(pr.get("httpGet"), dict):
                pr["httpGet"].setdefault("path", "/")
                pr["httpGet"].setdefault("scheme", "HTTP")
    for e in c.get("env") or []:
        fr = (e.get("valueFrom") or {}).get("fieldRef")
        if isinstance(fr, dict):
            fr.setdefault("apiVersion", "v1")


def _qos(spec: dict[str, Any]) -> str:
    containers = _all_containers(spec)
    reqs = [((c.get("resources") or {}).get("requests") or {}) for c in containers]
    lims = [((c.get("resources") or {}).get("limits") or {}) for c in containers]
    if not any(reqs) and not any(lims):
        return "BestEffort"
    for r, l in zip(reqs, lims):
        if not all(k in l for k in ("cpu", "memory")) or any(r.get(k) != l.get(k) for k in l if k in ("cpu", "memory")):
            return "Burstable"
    return "Guaranteed"


def _default_pod(obj: dict[str, Any], store: "Store") -> None:
    spec = obj.setdefault("spec", {})
    md = obj["metadata"]
    for k, v in (("restartPolicy", "Always"), ("dnsPolicy", "ClusterFirst"),
                 ("terminationGracePeriodSeconds", 30), ("securityContext", {}),
                 ("schedulerName", "default-scheduler"), ("enableServiceLinks", True),
                 ("priority", 0), ("preemptionPolicy", "PreemptLowerPriority")):
        spec.setdefault(k, v)
    for c in _all_containers(spec) + list(spec.get("ephemeralContainers") or []):
        _default_container(c)
    for v in spec.get("volumes") or []:
        for src in ("secret", "configMap"):
            if isinstance(v.get(src), dict):
                v[src].setdefault("defaultMode", 420)
        if isinstance(v.get("projected"), dict):
            v["projected"].setdefault("defaultMode", 420)
    # DefaultTolerationSeconds admission.
    tols = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(t.get("key") == key and t.get("effect") in ("NoExecute", None, "") for t in tols) \
                and not any(t.get("operator") == "Exists" and not t.get("key") for t in tols):
            tols.append({"key": key, "operator": "Exists", "effect": "NoExecute",
                         "tolerationSeconds": 300})
    # ServiceAccount admission (mirror pods are exempt and may not use one).
    mirror = MIRROR in (md.get("annotations") or {})
    if not mirror:
        sa_name = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        spec["serviceAccountName"] = spec["serviceAccount"] = sa_name
        sa = store.try_get("serviceaccounts", md["namespace"], sa_name)
        if sa is None:
            raise forbidden(by_key("pods"), md.get("name", ""),
                            f'error looking up service account {md["namespace"]}/{sa_name}: '
                            f'serviceaccount "{sa_name}" not found')
        automount = spec.get("automountServiceAccountToken")
        if automount is None:
            automount = sa.get("automountServiceAccountToken", True)
        if automount and store.inject_service_account_volume and not any(
                m.get("mountPath") == SA_MOUNT for c in _all_containers(spec)
                for m in c.get("volumeMounts") or []):
            from .store import random_suffix
            vname = "kube-api-access-" + random_suffix()
            spec.setdefault("volumes", []).append({"name": vname, "projected": {
                "defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt",
                                   "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {
                        "apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}})
            for c in _all_containers(spec):
                c.setdefault("volumeMounts", []).append(
                    {"name": vname, "readOnly": True, "mountPath": SA_MOUNT})
    obj["status"] = {"phase": "Pending", "qosClass": _qos(spec)}


def _fold_string_data(secret: dict[str, Any]) -> None:
    """stringData is write-only: the conversion to the internal Secret
    merges it into data on every write (create, update, patch alike),
    its keys winning over data's."""
    if "stringData" in secret:
        import base64
        data = secret.get("data") or {}
        secret["data"] = data
        for k, v in (secret.pop("stringData") or {}).items():
            data[k] = base64.b64encode(v.encode()).decode()


def prepare_for_create(res: Resource, obj: dict[str, Any], store: "Store",
                       user: dict[str, Any] | None) -> None:
    kind = res.kind
    md = obj["metadata"]
    # Go structs without omitempty: these always serialize, if only as {}.
    if kind in ("Node", "Pod", "Namespace", "Service", "PersistentVolumeClaim",
                "CertificateSigningRequest", "Lease"):
        obj.setdefault("spec", {})
    if kind in ("Node", "Pod", "Namespace", "Service", "PersistentVolumeClaim",
                "CertificateSigningRequest"):
        obj.setdefault("status", {})
    if kind == "Pod":
        _default_pod(obj, store)
    elif kind == "Namespace":
        md.setdefault("labels", {})["kubernetes.io/metadata.name"] = md.get("name", "")
        obj.setdefault("spec", {})["finalizers"] = ["kubernetes"]
        obj["status"] = {"phase": "Active"}
    elif kind == "Secret":
        obj.setdefault("type", "Opaque")
        _fold_string_data(obj)
    elif kind == "CertificateSigningRequest":
        obj["status"] = {}
        spec = obj.setdefault("spec", {})
        u = user or {}
        spec["username"] = u.get("username", "")
        spec["groups"] = list(u.get("groups", []))
        if u.get("uid"):
            spec["uid"] = u["uid"]
        spec.setdefault("usages", ["digital signature", "key encipherment"])
    elif kind in ("Service", "PersistentVolumeClaim"):
        obj["status"] = {"phase": "Pending"} if kind == "PersistentVolumeClaim" else {"loadBalancer": {}}
    _normalize_times(res, obj)


def after_create(res: Resource, obj: dict[str, Any], store: "Store") -> None:
    """Controllers that react to creation at once (SA and root-CA publishers)."""
    if res.kind == "Namespace":
        ns = obj["metadata"]["name"]
        if store.try_get("serviceaccounts", ns, "default") is None:
            store.create("serviceaccounts", {"metadata": {"name": "default"}}, ns)
        if store.ca_pem and store.try_get("configmaps", ns, "kube-root-ca.crt") is None:
            store.create("configmaps", {"metadata": {
                "name": "kube-root-ca.crt",
                "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be "
                                "used to verify the kube-apiserver when using internal endpoints "
                                "such as the internal service IP or kubernetes.default.svc. No "
                                "other usage is guaranteed across distributions of Kubernetes "
                                "clusters."}},
                "data": {"ca.crt": store.ca_pem}}, ns)


def after_delete(res: Resource, obj: dict[str, Any], store: "Store") -> None:
    if res.kind == "Namespace":
        store.delete_namespace_contents(obj["metadata"]["name"])


# -- update --------------------------------------------------------------
def prepare_for_update(res: Resource, old: dict[str, Any], new: dict[str, Any],
                       subresource: str | None) -> dict[str, Any]:
    """Return the object to store for a write to `subresource` of `res`."""
    if res.kind == "Secret" and not subresource:
        _fold_string_data(new)
    if subresource is None:
        out = new
    elif subresource == "status":
        # Status strategies keep the old spec; metadata comes from the request.
        out = {**spec_of(old), "metadata": new.get("metadata", {}),
               "status": new.get("status", {})}
        if res.kind == "Pod":
            out["metadata"]["ownerReferences"] = old["metadata"].get("ownerReferences")
            if out["metadata"]["ownerReferences"] is None:
                out["metadata"].pop("ownerReferences")
        if res.kind == "CertificateSigningRequest":
            # Approval conditions belong to /approval; keep them from old.
            keep = [c for c in (old.get("status") or {}).get("conditions") or []
                    if c.get("type") in ("Approved", "Denied")]
            rest = [c for c in out["status"].get("conditions") or []
                    if c.get("type") not in ("Approved", "Denied")]
            if keep or rest:
                out["status"]["conditions"] = keep + rest
    elif subresource == "approval":
        out = old
        out["metadata"] = new.get("metadata", old["metadata"])
        conds = (new.get("status") or {}).get("conditions") or []
        out.setdefault("status", {})["conditions"] = conds
    else:
        out = new
        if res.has_status:
            if "status" in old:
                out["status"] = old["status"]
            else:
                out.pop("status", None)
        if res.kind == "Namespace":
            out["spec"] = old.get("spec", {})
    _normalize_times(res, out)
    return out


# -- validation ----------------------------------------------------------
_SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                  "characters, '-' or '.', and must start and end with an alphanumeric character "
                  "(e.g. 'example.com', regex used for validation is "
                  "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
_LABEL_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
              "or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  "
              "or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")

_POD_MUTABLE = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds",
                "schedulingGates")


def _check_type(res: Resource, obj: dict[str, Any], path: str, want: type, gotype: str) -> None:
    cur: Any = obj
    for p in path.split("."):
        if not isinstance(cur, dict) or p not in cur:
            return
        cur = cur[p]
    if cur is None:
        return
    ok = isinstance(cur, want) and not (want is int and isinstance(cur, bool))
    if not ok:
        jtype = {str: "string", int: "number", bool: "bool", dict: "object", list: "array"}.get(type(cur), "value")
        raise bad_request(f'{res.kind} in version "{res.version}" cannot be handled as a {res.kind}: '
                          f"json: cannot unmarshal {jtype} into Go struct field "
                          f"{res.kind}{path.split('.')[0].capitalize()}.{path} of type {gotype}")


def validate(res: Resource, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
    md = obj.get("metadata") or {}
    name = md.get("name") or ""
    if not isinstance(md, dict):
        raise bad_request("metadata must be an object")
    if not name:
        raise invalid(res, "", [("metadata.name", "Required value: name or generateName is required")])
    dns_label = res.kind == "Namespace"
    pattern = _DNS1123_LABEL if dns_label else _DNS1123_SUBDOMAIN
    limit = 63 if dns_label else 253
    if res.kind not in ("Event",) and (len(name) > limit or not pattern.match(name)):
        raise invalid(res, name, [("metadata.name",
                                   f'Invalid value: "{name}": {_LABEL_MSG if dns_label else _SUBDOMAIN_MSG}')])
    for k in ("labels", "annotations"):
        v = md.get(k)
        if v is not None and (not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values())):
            raise bad_request(f'{res.kind} in version "{res.version}" cannot be handled as a '
                              f'{res.kind}: json: cannot unmarshal into Go struct field '
                              f'ObjectMeta.metadata.{k} of type string')
    if res.kind == "Lease":
        _check_type(res, obj, "spec.holderIdentity", str, "string")
        _check_type(res, obj, "spec.leaseDurationSeconds", int, "int32")
        _check_type(res, obj, "spec.leaseTransitions", int, "int32")
        _check_type(res, obj, "spec.acquireTime", str, "v1.MicroTime")
        _check_type(res, obj, "spec.renewTime", str, "v1.MicroTime")
        spec = obj.get("spec") or {}
        if spec.get("leaseDurationSeconds") is not None and spec["leaseDurationSeconds"] <= 0:
            raise invalid(res, name, [("spec.leaseDurationSeconds",
                                       f"Invalid value: {spec['leaseDurationSeconds']}: must be greater than 0")])
        if spec.get("leaseTransitions") is not None and spec["leaseTransitions"] < 0:
            raise invalid(res, name, [("spec.leaseTransitions",
                                       f"Invalid value: {spec['leaseTransitions']}: must be greater than or equal to 0")])
    if res.kind == "Pod":
        spec = obj.get("spec") or {}
        if not spec.get("containers"):
            raise invalid(res, name, [("spec.containers", "Required value")])
        for c in _all_containers(spec):
            if not c.get("name"):
                raise invalid(res, name, [("spec.containers[0].name", "Required value")])
            if not c.get("image") and old is None:
                raise invalid(res, name, [(f"spec.containers[0].image", "Required value")])
        if old is not None:
            _validate_pod_update(res, obj, old)
    if res.kind == "Node" and old is not None:
        ospec, nspec = old.get("spec") or {}, obj.get("spec") or {}
        if ospec.get("podCIDR") and nspec.get("podCIDR") != ospec.get("podCIDR"):
            raise invalid(res, name, [("spec.podCIDR", "Forbidden: node updates may not change podCIDR except from \"\" to valid")])


def _validate_pod_update(res: Resource, new: dict[str, Any], old: dict[str, Any]) -> None:
    name = new["metadata"]["name"]
    ospec, nspec = old.get("spec") or {}, new.get("spec") or {}
    if ospec.get("nodeName") and nspec.get("nodeName") != ospec.get("nodeName"):
        pass   # reported by the general rule below, as the real server does
    a = {k: v for k, v in ospec.items() if k not in _POD_MUTABLE}
    b = {k: v for k, v in nspec.items() if k not in _POD_MUTABLE}
    for spec in (a, b):
        for key in ("containers", "initContainers"):
            spec[key] = [{**c, "image": None} for c in spec.get(key) or []]
    if a != b:
        raise invalid(res, name, [("spec", "Forbidden: pod updates may not change fields other "
                                   "than `spec.containers[*].image`,`spec.initContainers[*].image`,"
                                   "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions "
                                   "to existing tolerations),`spec.terminationGracePeriodSeconds` "
                                   "(allow it to be set to 1 if it was previously negative)")])


def pod_grace_period(pod: dict[str, Any], requested: int | None) -> int:
    """CheckGracefulDelete of the pod strategy."""
    spec = pod.get("spec") or {}
    period = requested if requested is not None else spec.get("terminationGracePeriodSeconds", 30)
    if period is None:
        period = 30
    if not spec.get("nodeName"):
        period = 0                        # never scheduled: nothing to stop
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        period = 0                        # already terminated
    return max(int(period), 0)
