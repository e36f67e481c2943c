"""The content of file volumes (configMap, secret, downwardAPI, projected)
as the VolumeFile list of a SetVolumeRequest, and when to refresh a
projected service account token.

Semantics of the kubelet's volume plugins: configmap/secret MakePayload,
downwardapi.CollectData, projected collectData, and the path checks of
volume/util/atomic_writer.go (validatePath, then filepath.Clean).

- Modes: an item's mode, else the volume's defaultMode, else 0644 (the
  API server's default, which pods from static manifests never got).  A
  projected serviceAccountToken gets 0600 instead when the pod has an
  fsGroup or one runAsUser for all containers, as the kubelet does (it
  then hands the file to that user or group).
- Without items every key is a file (configMap data, then binaryData);
  with items only those keys, in order, and a missing key is an error
  unless the source is optional.  A missing configMap or secret is an
  empty volume when optional, an error otherwise.
- Later files replace earlier ones with the same (cleaned) path, as the
  kubelet's payload map does; in projected volumes later sources win.
- lookup(kind, namespace, name) returns the API object as JSON gives it
  (secrets' and binaryData's base64 decoded here), or None if missing.
- A serviceAccountToken source needs the token, which the pod manager
  gets with a TokenRequest (token_requests() gives the bodies) and passes
  in tokens, keyed by the source's path.
"""

from __future__ import annotations

import base64
import binascii
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pufflet.agent import downward

__all__ = ["VolumeError", "VolumeFile", "volume_files", "token_requests",
           "refresh_at", "refresh_due", "clean_path", "DEFAULT_MODE", "DEFAULT_TOKEN_SECONDS",
           "FILE_VOLUMES"]

Lookup = Callable[[str, str, str], "Mapping[str, Any] | None"]

DEFAULT_MODE = 0o644
DEFAULT_TOKEN_SECONDS = 3600       # the API server's default expirationSeconds
TOKEN_MAX_TTL = 24 * 3600          # the token manager refreshes after a day at the latest
MAX_PATH = 4096
MAX_NAME = 255
# The wire's bounds (spec.yaml VolumeFile, SetVolumeRequest).
MAX_FILES = 1024
MAX_FILE_BYTES = 1 << 20
FILE_VOLUMES = ("configMap", "secret", "downwardAPI", "projected")


class VolumeError(Exception):
    """The volume cannot be set up: the kubelet's FailedMount ("MountVolume.
    SetUp failed for volume ..."); the pod waits and it is retried."""


@dataclass(frozen=True)
class VolumeFile:
    path: str           # relative, cleaned
    data: bytes
    mode: int           # 0..0o777

    def wire(self) -> dict[str, Any]:
        return {"path": self.path, "data": self.data, "mode": self.mode}


def clean_path(p: str) -> str:
    """atomic_writer's validatePath, then filepath.Clean; VolumeError if
    the path may not be written."""
    if not p:
        raise VolumeError(f"invalid path: must not be empty: {p!r}")
    if p.startswith("/"):
        raise VolumeError(f"invalid path: must be relative path: {p}")
    if len(p) > MAX_PATH:
        raise VolumeError(f"invalid path: must be less than or equal to {MAX_PATH} characters")
    items = p.split("/")
    for item in items:
        if item == "..":
            raise VolumeError(f"invalid path: must not contain '..': {p}")
        if len(item) > MAX_NAME:
            raise VolumeError(f"invalid path: filenames must be less than or equal "
                              f"to {MAX_NAME} characters")
    if items[0].startswith("..") and len(items[0]) > 2:
        raise VolumeError(f"invalid path: must not start with '..': {p}")
    if "\x00" in p:
        raise VolumeError(f"invalid path: {p!r} holds a NUL")
    clean = posixpath.normpath(p)
    if clean == ".":
        raise VolumeError(f"invalid path: {p!r} names the volume itself")
    return clean


def _mode(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0o777:
        raise VolumeError(f"{what}: mode {v!r} is not between 0 and 0777")
    return v


def _b64(v: Any, what: str) -> bytes:
    try:
        return base64.b64decode(v or "", validate=True)
    except (binascii.Error, ValueError):
        raise VolumeError(f"{what} is not base64") from None


def _object_data(kind: str, obj: Mapping[str, Any], what: str) -> dict[str, bytes]:
    """configMap data then binaryData; secret data; all as bytes."""
    out: dict[str, bytes] = {}
    if kind == "configmaps":
        for k, v in (obj.get("data") or {}).items():
            out[k] = str(v).encode()
        for k, v in (obj.get("binaryData") or {}).items():
            out[k] = _b64(v, f"{what} binaryData {k}")
    else:
        for k, v in (obj.get("data") or {}).items():
            out[k] = _b64(v, f"{what} key {k}")
    return out


def _key_files(kind: str, source: Mapping[str, Any], namespace: str, lookup: Lookup | None,
               default_mode: int) -> list[tuple[str, bytes, int]]:
    """configMap / secret MakePayload."""
    singular = "configmap" if kind == "configmaps" else "secret"
    name = source.get("name") or source.get("secretName") or ""
    optional = bool(source.get("optional"))
    obj = lookup(kind, namespace, name) if lookup is not None else None
    if obj is None:
        if not optional:
            raise VolumeError(f'{kind} "{name}" not found')
        obj = {}
    data = _object_data(kind, obj, f"{singular} {namespace}/{name}")
    items = source.get("items") or ()
    if not items:
        return [(k, v, default_mode) for k, v in data.items()]
    out = []
    for it in items:
        key = it.get("key") or ""
        if key not in data:
            if optional:
                continue
            raise VolumeError("configmap references non-existent config key: " + key
                              if kind == "configmaps" else
                              "references non-existent secret key: " + key)
        mode = it.get("mode")
        out.append((it.get("path") or "", data[key],
                    default_mode if mode is None else _mode(mode, f"{singular} item {key}")))
    return out


def _downward_files(pod: Mapping[str, Any], items: Sequence[Mapping[str, Any]],
                    default_mode: int, *, host_ips: Sequence[str], pod_ips: Sequence[str],
                    allocatable: Mapping[str, Any] | None) -> list[tuple[str, bytes, int]]:
    """downwardapi.CollectData: every item is tried; the errors come
    together (the kubelet aggregates them)."""
    out, errors = [], []
    for it in items:
        mode = it.get("mode")
        mode = default_mode if mode is None else _mode(mode, f"downwardAPI item {it.get('path')}")
        try:
            if it.get("fieldRef"):
                fr = it["fieldRef"]
                value = downward.field_value(pod, fr.get("fieldPath") or "",
                                             api_version=fr.get("apiVersion") or "v1",
                                             host_ips=host_ips, pod_ips=pod_ips)
            elif it.get("resourceFieldRef"):
                rf = it["resourceFieldRef"]
                value = downward.resource_value(pod, None, rf, allocatable=allocatable)
            else:
                value = ""
        except downward.DownwardError as e:
            errors.append(str(e))
            continue
        out.append((it.get("path") or "", value.encode(), mode))
    if errors:
        raise VolumeError(_aggregate(errors))
    return out


def _aggregate(errors: Sequence[str]) -> str:
    """utilerrors.NewAggregate's message."""
    return errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"


def _fs_user(pod: Mapping[str, Any]) -> int | None:
    """volumeutil.FsUserFrom: the runAsUser all containers share, if any."""
    spec = pod.get("spec") or {}
    pod_user = (spec.get("securityContext") or {}).get("runAsUser")
    users = set()
    for c in list(spec.get("initContainers") or ()) + list(spec.get("containers") or ()):
        u = (c.get("securityContext") or {}).get("runAsUser", pod_user)
        if u is None:
            return None
        users.add(u)
    return users.pop() if len(users) == 1 else None


def volume_files(pod: Mapping[str, Any], volume: Mapping[str, Any], *,
                 lookup: Lookup | None,
                 tokens: Mapping[str, str] | None = None,
                 host_ips: Sequence[str] = (), pod_ips: Sequence[str] = (),
                 allocatable: Mapping[str, Any] | None = None) -> list[VolumeFile]:
    """The files of one configMap, secret, downwardAPI or projected volume
    (a pod.spec.volumes entry).  tokens: {serviceAccountToken path: token}."""
    meta = pod.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    name = volume.get("name") or "?"
    raw: list[tuple[str, bytes, int]] = []

    def mode_of(src: Mapping[str, Any]) -> int:
        m = src.get("defaultMode")
        return DEFAULT_MODE if m is None else _mode(m, f"volume {name} defaultMode")

    if volume.get("configMap") is not None:
        src = volume["configMap"]
        raw = _key_files("configmaps", src, namespace, lookup, mode_of(src))
    elif volume.get("secret") is not None:
        src = volume["secret"]
        raw = _key_files("secrets", src, namespace, lookup, mode_of(src))
    elif volume.get("downwardAPI") is not None:
        src = volume["downwardAPI"]
        raw = _downward_files(pod, src.get("items") or (), mode_of(src),
                              host_ips=host_ips, pod_ips=pod_ips, allocatable=allocatable)
    elif volume.get("projected") is not None:
        src = volume["projected"]
        raw = _projected(pod, src, mode_of(src), namespace, lookup, tokens or {},
                         host_ips=host_ips, pod_ips=pod_ips, allocatable=allocatable)
    else:
        raise VolumeError(f"volume {name}: not a file volume")

    files: dict[str, VolumeFile] = {}
    for path, data, mode in raw:
        clean = clean_path(path)
        if len(data) > MAX_FILE_BYTES:
            raise VolumeError(f"volume {name}: {clean} is larger than {MAX_FILE_BYTES} bytes")
        files.pop(clean, None)               # a replaced file moves to the end
        files[clean] = VolumeFile(clean, data, mode)
    if len(files) > MAX_FILES:
        raise VolumeError(f"volume {name}: more than {MAX_FILES} files")
    _check_tree(name, files)
    return list(files.values())


def _check_tree(name: str, files: Mapping[str, VolumeFile]) -> None:
    """A path cannot be both a file and a directory (the kubelet's writer
    would fail half-way; here it fails before anything is written)."""
    for p in files:
        parts = p.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d in files:
                raise VolumeError(f"volume {name}: {d} is both a file and a directory")


def _projected(pod: Mapping[str, Any], src: Mapping[str, Any], default_mode: int,
               namespace: str, lookup: Lookup | None, tokens: Mapping[str, str], *,
               host_ips: Sequence[str], pod_ips: Sequence[str],
               allocatable: Mapping[str, Any] | None) -> list[tuple[str, bytes, int]]:
    spec = pod.get("spec") or {}
    out: list[tuple[str, bytes, int]] = []
    errors: list[str] = []
    for s in src.get("sources") or ():
        try:
            if s.get("secret") is not None:
                out += _key_files("secrets", s["secret"], namespace, lookup, default_mode)
            elif s.get("configMap") is not None:
                out += _key_files("configmaps", s["configMap"], namespace, lookup, default_mode)
            elif s.get("downwardAPI") is not None:
                out += _downward_files(pod, s["downwardAPI"].get("items") or (), default_mode,
                                       host_ips=host_ips, pod_ips=pod_ips,
                                       allocatable=allocatable)
            elif s.get("serviceAccountToken") is not None:
                path = s["serviceAccountToken"].get("path") or ""
                if path not in tokens:
                    raise VolumeError(f"no token for {path}: TokenRequest not done")
                private = ((spec.get("securityContext") or {}).get("fsGroup") is not None
                           or _fs_user(pod) is not None)
                out.append((path, tokens[path].encode(), 0o600 if private else default_mode))
            else:
                raise VolumeError(f"unsupported projected source {sorted(s)}")
        except VolumeError as e:
            # The kubelet goes on with the other sources, then fails with
            # every error.
            errors.append(str(e))
    if errors:
        raise VolumeError(_aggregate(errors))
    return out


def token_requests(pod: Mapping[str, Any], volume: Mapping[str, Any]) -> list[tuple[str, str, dict]]:
    """For each serviceAccountToken source of a projected volume:
    (path, service account name, TokenRequest body to POST to
    /api/v1/namespaces/<ns>/serviceaccounts/<name>/token), bound to the
    pod as the kubelet binds it."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    out = []
    for s in (volume.get("projected") or {}).get("sources") or ():
        tp = s.get("serviceAccountToken")
        if tp is None:
            continue
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [tp["audience"]] if tp.get("audience") else None,
                     "expirationSeconds": int(tp.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS),
                     "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                        "name": meta.get("name"), "uid": meta.get("uid")}}}
        if body["spec"]["audiences"] is None:
            del body["spec"]["audiences"]    # the API server's own audiences
        out.append((tp.get("path") or "", sa, body))
    return out


def refresh_at(expiration: float, issued: float, *, jitter: float = 0.0) -> float:
    """When a projected token must be fetched again (the kubelet's token
    manager requiresRefresh): once 80 % of its life has passed (20 % of it
    in whole seconds before expiration, as the kubelet counts), or 24 h
    after issue, whichever is first.  issued is expiration minus the
    TokenRequest answer's spec.expirationSeconds (what the kubelet uses,
    not the token's iat; the API server may have shortened what was asked
    for); jitter (the kubelet draws 0-10 s) makes it earlier."""
    ttl = int(expiration - issued)
    return min(issued + TOKEN_MAX_TTL, expiration - (ttl * 20) // 100) - jitter


def refresh_due(expiration: float, issued: float, now: float, *, jitter: float = 0.0) -> bool:
    """Whether a projected token must be fetched again: past refresh_at."""
    return now > refresh_at(expiration, issued, jitter=jitter)
