"""The three patch formats kube-apiserver accepts for built-in types.

* application/merge-patch+json: RFC 7386.
* application/strategic-merge-patch+json: RFC 7386 plus per-list merge keys
  taken from the Go struct tags of k8s.io/api (MERGE_KEYS below).  Lists
  without a patch strategy are replaced atomically, exactly as the real server
  does -- notably pod status.containerStatuses and node spec.taints.
  Directives: `$patch: replace|delete` on maps and list items,
  `$deleteFromPrimitiveList/<f>` and `$retainKeys` are honoured;
  `$setElementOrder/<f>` is accepted and ignored (order follows the live list,
  new items appended).
* application/json-patch+json: RFC 6902 with the `test` operation.
"""
from __future__ import annotations

import copy
from typing import Any

from .errors import ApiError, bad_request

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY = "application/apply-patch+yaml"

# Path (dict keys only, list positions elided) -> merge key; None = merge a
# list of scalars as a set (patchStrategy:"merge" on []string).
_POD_SPEC = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "volumes": "name", "imagePullSecrets": "name", "hostAliases": "ip",
    "resourceClaims": "name",
    "containers.ports": "containerPort", "initContainers.ports": "containerPort",
    "containers.env": "name", "initContainers.env": "name",
    "containers.volumeMounts": "mountPath", "initContainers.volumeMounts": "mountPath",
    "containers.volumeDevices": "devicePath", "initContainers.volumeDevices": "devicePath",
    "ephemeralContainers.env": "name", "ephemeralContainers.volumeMounts": "mountPath",
}
MERGE_KEYS: dict[str, dict[str, str | None]] = {
    "Pod": {**{"spec." + k: v for k, v in _POD_SPEC.items()},
            "status.conditions": "type", "status.podIPs": "ip", "status.hostIPs": "ip",
            "status.resourceClaimStatuses": "name"},
    "Node": {"spec.podCIDRs": None, "status.conditions": "type", "status.addresses": "type"},
    "Service": {"spec.ports": "port"},
    "Namespace": {},
}
_META = {"metadata.finalizers": None, "metadata.ownerReferences": "uid"}


def _is_null(v: Any) -> bool:
    return v is None


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if _is_null(v):
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def strategic_merge_patch(target: dict[str, Any], patch: Any, kind: str) -> dict[str, Any]:
    if not isinstance(patch, dict):
        raise bad_request("strategic merge patch must be a JSON object")
    keys = {**_META, **MERGE_KEYS.get(kind, {})}
    return _smp_map(target, patch, "", keys)


def _smp_map(target: Any, patch: dict[str, Any], path: str,
             keys: dict[str, str | None]) -> dict[str, Any]:
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return {}
    out = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for k, v in patch.items():
        if k in ("$patch", "$retainKeys") or k.startswith("$setElementOrder/"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            f = k.split("/", 1)[1]
            if isinstance(out.get(f), list):
                out[f] = [x for x in out[f] if x not in v]
            continue
        sub = f"{path}.{k}" if path else k
        if _is_null(v):
            out.pop(k, None)
        elif isinstance(v, dict):
            out[k] = _smp_map(out.get(k), v, sub, keys)
        elif isinstance(v, list) and sub in keys and isinstance(out.get(k), list):
            out[k] = _smp_list(out[k], v, sub, keys)
        else:
            out[k] = _strip(copy.deepcopy(v))
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _strip(v: Any) -> Any:
    """Remove directives from values that are inserted wholesale."""
    if isinstance(v, dict):
        return {k: _strip(x) for k, x in v.items() if not k.startswith("$")}
    if isinstance(v, list):
        return [_strip(x) for x in v if not (isinstance(x, dict) and x.get("$patch") == "delete")]
    return v


def _smp_list(live: list[Any], patch: list[Any], path: str,
              keys: dict[str, str | None]) -> list[Any]:
    mkey = keys[path]
    if mkey is None:                      # set of scalars
        out = list(live)
        for x in patch:
            if x not in out:
                out.append(x)
        return out
    if any(isinstance(p, dict) and p.get("$patch") == "replace" for p in patch):
        return [_strip(p) for p in patch if not (isinstance(p, dict) and p.get("$patch"))]
    out = [copy.deepcopy(x) for x in live]
    for p in patch:
        if not isinstance(p, dict) or mkey not in p:
            raise bad_request(f"map: {p} does not contain declared merge key: {mkey}")
        idx = next((i for i, x in enumerate(out)
                    if isinstance(x, dict) and x.get(mkey) == p[mkey]), None)
        if p.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
            continue
        if idx is None:
            out.append(_strip(p))
        else:
            out[idx] = _smp_map(out[idx], p, path, keys)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f'JSON pointer "{path}" must start with "/"')
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _fail(msg: str) -> ApiError:
    # kube-apiserver answers failed JSON patch operations with 422 (Invalid).
    return ApiError(422, "Invalid", msg)


def _walk(doc: Any, parts: list[str]) -> Any:
    cur = doc
    for p in parts:
        if isinstance(cur, dict):
            if p not in cur:
                raise _fail(f"doc is missing path: /{'/'.join(parts)}: missing value")
            cur = cur[p]
        elif isinstance(cur, list):
            if not p.isdigit() or int(p) >= len(cur):
                raise _fail(f"doc is missing path: /{'/'.join(parts)}: missing value")
            cur = cur[int(p)]
        else:
            raise _fail(f"doc is missing path: /{'/'.join(parts)}")
    return cur


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            parent.insert(int(last), value)
        else:
            raise _fail(f"add operation does not apply: doc is missing path: /{'/'.join(parts)}")
    else:
        raise _fail(f"add operation does not apply: doc is missing path: /{'/'.join(parts)}")
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise _fail(f"remove operation does not apply: doc is missing path: \"/{'/'.join(parts)}\"")


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902."""
    if not isinstance(ops, list):
        raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request(f"invalid JSON patch operation: {op}")
        kind, parts = op["op"], _pointer(op["path"])
        if kind in ("add", "replace", "test") and "value" not in op:
            raise _fail(f"missing value for {kind} operation")
        if kind == "add":
            doc = _add(doc, parts, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(doc, parts)
        elif kind == "replace":
            if parts:
                _walk(doc, parts)           # must exist
                _remove(doc, parts)
            doc = _add(doc, parts, copy.deepcopy(op["value"]))
        elif kind in ("move", "copy"):
            src = _pointer(op.get("from", ""))
            value = copy.deepcopy(_walk(doc, src))
            if kind == "move":
                _remove(doc, src)
            doc = _add(doc, parts, value)
        elif kind == "test":
            if _walk(doc, parts) != op["value"]:
                raise _fail(f"testing value {op['path']} failed: test failed")
        else:
            raise bad_request(f"Unexpected kind: {kind}")
    return doc


def apply(content_type: str, live: dict[str, Any], body: Any) -> dict[str, Any]:
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == MERGE:
        return merge_patch(live, body)
    if ctype == STRATEGIC:
        return strategic_merge_patch(live, body, live.get("kind", ""))
    if ctype == JSON_PATCH:
        return json_patch(live, body)
    raise ApiError(415, "UnsupportedMediaType",
                   f"the body of the request was in an unknown format - accepted media types "
                   f"include: {JSON_PATCH}, {MERGE}, {STRATEGIC}")
