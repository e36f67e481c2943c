"""A container's environment, as the kubelet and containerd build it.

The kubelet (makeEnvironmentVariables) makes the pod's variables:

  1. envFrom, in order: every key of the configMap's data / the secret's
     data, with the prefix; a later source overwrites an earlier one.
  2. env, in order: value with $(VAR) expanded against what 1 and the
     earlier env entries defined plus the service variables, or valueFrom
     (fieldRef, resourceFieldRef, configMapKeyRef, secretKeyRef).
  3. the service link variables, for names 1 and 2 did not set.

containerd then builds the process environment (WithDefaultPathEnv,
HOSTNAME, WithEnv): a default PATH, HOSTNAME=<pod hostname>, the image's
Env, the kubelet's variables; a later value of a name replaces an earlier
one in place.  So an image's PATH beats the default, and the pod's env
beats the image's (HOSTNAME too).

The kubelet builds 1 and 2 in a Go map, so its order is random; here it
is stable: envFrom keys (each source's keys sorted), env in declared
order, then service variables sorted.  A name keeps the position of its
first definition.

Choices:
- lookup(kind, namespace, name) returns the object exactly as the API
  gives it (kind "configmaps" or "secrets"), or None when it does not
  exist; secrets' base64 data is decoded here.  Pass lookup=None when
  there is no API server (standalone): references then fail as the
  kubelet's do without a client.
- envFrom keys are not filtered by name, as in kubelet 1.34+
  (RelaxedEnvironmentVariableValidation): configMap and secret keys are
  already valid names.  Only a name that no environment can carry (with
  '=' or a NUL, which only a hand-made object could hold) is skipped,
  with the kubelet's InvalidEnvironmentVariableNames event.
- A value that is not UTF-8, or holds a NUL, cannot cross to the parent
  (nor to containerd over gRPC): an EnvError.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pufflet.agent import downward
from pufflet.agent.expand import expand

__all__ = ["EnvError", "ContainerEnv", "container_env", "service_env",
           "pod_hostname", "is_static", "decode_secret_data", "DEFAULT_PATH"]

Lookup = Callable[[str, str, str], "Mapping[str, Any] | None"]

# containerd's oci.WithDefaultPathEnv.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Services whose variables every pod gets, from namespace default.
MASTER_SERVICES = ("kubernetes",)
CONFIG_SOURCE = "kubernetes.io/config.source"


class EnvError(Exception):
    """The environment cannot be made; the container waits with
    CreateContainerConfigError and this message, and is retried."""


@dataclass(frozen=True)
class ContainerEnv:
    env: list[str]                  # "K=V" for StartContainerRequest.env
    variables: dict[str, str]       # what $(VAR) in command/args expands
    events: list[tuple[str, str]] = field(default_factory=list)   # (reason, message), Warning


def is_static(pod: Mapping[str, Any]) -> bool:
    """kubetypes.IsStaticPod: the config.source annotation says not api."""
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    src = ann.get(CONFIG_SOURCE)
    return src is not None and src != "api"


def pod_hostname(pod: Mapping[str, Any]) -> str:
    """The pod's hostname: spec.hostname, else its name, cut to 63
    characters without a trailing '-' or '.' (GeneratePodHostNameAndDomain)."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    name = spec.get("hostname") or meta.get("name") or ""
    if len(name) > 63:
        name = name[:63].rstrip("-.")
    return name


def decode_secret_data(secret: Mapping[str, Any], what: str) -> dict[str, bytes]:
    """A secret's data, base64-decoded."""
    out = {}
    for k, v in (secret.get("data") or {}).items():
        try:
            out[k] = base64.b64decode(v or "", validate=True)
        except (binascii.Error, ValueError):
            raise EnvError(f"{what}: key {k} is not base64") from None
    return out


def _text(data: bytes, what: str) -> str:
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError:
        raise EnvError(f"{what} is not valid UTF-8") from None
    return s


# ---- service links ----------------------------------------------------------

def _env_name(s: str) -> str:
    return s.upper().replace("-", "_")


def _ip_set(svc: Mapping[str, Any]) -> str | None:
    ip = (svc.get("spec") or {}).get("clusterIP") or ""
    return ip if ip and ip != "None" else None


def _join_host_port(host: str, port: int) -> str:
    try:
        v6 = isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        v6 = ":" in host
    return f"[{host}]:{port}" if v6 else f"{host}:{port}"


def _service_vars(svc: Mapping[str, Any]) -> dict[str, str]:
    """envvars.FromServices for one service: NAME_SERVICE_HOST,
    NAME_SERVICE_PORT, NAME_SERVICE_PORT_<PORTNAME> and the docker link
    variables NAME_PORT, NAME_PORT_<port>_<PROTO>{,_PROTO,_PORT,_ADDR}."""
    ip = _ip_set(svc)
    ports = (svc.get("spec") or {}).get("ports") or []
    if ip is None or not ports:
        return {}
    prefix = _env_name((svc.get("metadata") or {}).get("name") or "")
    out = {f"{prefix}_SERVICE_HOST": ip,
           f"{prefix}_SERVICE_PORT": str(int(ports[0].get("port", 0)))}
    for p in ports:
        if p.get("name"):
            out[f"{prefix}_SERVICE_PORT_{_env_name(p['name'])}"] = str(int(p.get("port", 0)))
    for i, p in enumerate(ports):
        port = int(p.get("port", 0))
        proto = p.get("protocol") or "TCP"
        url = f"{proto.lower()}://{_join_host_port(ip, port)}"
        if i == 0:
            out[f"{prefix}_PORT"] = url
        pp = f"{prefix}_PORT_{port}_{proto.upper()}"
        out[pp] = url
        out[f"{pp}_PROTO"] = proto.lower()
        out[f"{pp}_PORT"] = str(port)
        out[f"{pp}_ADDR"] = ip
    return out


def service_env(namespace: str, services: Iterable[Mapping[str, Any]],
                enable_service_links: bool = True) -> dict[str, str]:
    """getServiceEnvVarMap: the variables of every service with a cluster
    IP in namespace (when enable_service_links), and always those of
    default/kubernetes; a service of the pod's own namespace with the
    same name wins over the default one."""
    chosen: dict[str, Mapping[str, Any]] = {}
    for svc in services:
        if _ip_set(svc) is None:
            continue
        meta = svc.get("metadata") or {}
        name, ns = meta.get("name") or "", meta.get("namespace") or ""
        if ns == "default" and name in MASTER_SERVICES:
            if name not in chosen:
                chosen[name] = svc
        elif ns == namespace and enable_service_links:
            chosen[name] = svc
    out: dict[str, str] = {}
    for name in sorted(chosen):
        out.update(_service_vars(chosen[name]))
    return out


# ---- the container's variables ---------------------------------------------

class _Sources:
    """configMaps and secrets fetched once per container, as the kubelet's
    per-call caches."""

    def __init__(self, lookup: Lookup | None, namespace: str) -> None:
        self.lookup = lookup
        self.namespace = namespace
        self.cache: dict[tuple[str, str], Mapping[str, Any] | None] = {}

    def get(self, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        """The object's data as text, None when it is missing and
        optional; EnvError when missing and not optional."""
        singular = "configMap" if kind == "configmaps" else "secret"
        if self.lookup is None:
            raise EnvError(f"couldn't get {singular} {self.namespace}/{name}, "
                           "no kubeClient defined")
        key = (kind, name)
        if key not in self.cache:
            self.cache[key] = self.lookup(kind, self.namespace, name)
        obj = self.cache[key]
        if obj is None:
            if optional:
                return None
            raise EnvError(f'{kind} "{name}" not found')
        if kind == "configmaps":
            return {k: str(v) for k, v in (obj.get("data") or {}).items()}
        what = f"secret {self.namespace}/{name}"
        return {k: _text(v, f"{what} key {k}")
                for k, v in decode_secret_data(obj, what).items()}


def _valid_name(k: str) -> bool:
    return bool(k) and "=" not in k and "\x00" not in k


def container_env(pod: Mapping[str, Any], container: Mapping[str, Any], *,
                  lookup: Lookup | None,
                  services: Iterable[Mapping[str, Any]] | None,
                  host_ip: str | Sequence[str] = (),
                  pod_ips: Sequence[str] = (),
                  image_env: Sequence[str] = (),
                  hostname: str | None = None,
                  allocatable: Mapping[str, Any] | None = None) -> ContainerEnv:
    """The environment of one container (app or init).

    services: every Service the agent knows (any namespace; filtering is
    done here), or None when the service list has not been read yet: the
    kubelet then refuses to build env for API pods (KUBERNETES_SERVICE_HOST
    would be missing) but not for static pods.  host_ip: the node's
    address, or its addresses in family order (status.hostIPs); pod_ips
    likewise (for hostNetwork pods, the node's).
    hostname is what HOSTNAME is set to (default pod_hostname(pod); for
    hostNetwork pods pass the node's hostname, as containerd does).
    allocatable is node.status.allocatable, for resourceFieldRef limits
    that are not set."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    namespace = meta.get("namespace") or "default"
    host_ips = [host_ip] if isinstance(host_ip, str) else list(host_ip)
    if services is None:
        if not is_static(pod):
            raise EnvError("services have not yet been read at least once, "
                           "cannot construct envvars")
        services = ()
    links = spec.get("enableServiceLinks")
    svc_env = service_env(namespace, services, True if links is None else bool(links))

    src = _Sources(lookup, namespace)
    events: list[tuple[str, str]] = []
    tmp: dict[str, str] = {}
    for ef in container.get("envFrom") or ():
        prefix = ef.get("prefix") or ""
        if ef.get("configMapRef"):
            ref, kind, what = ef["configMapRef"], "configmaps", "configMap"
        elif ef.get("secretRef"):
            ref, kind, what = ef["secretRef"], "secrets", "secret"
        else:
            continue
        data = src.get(kind, ref.get("name") or "", bool(ref.get("optional")))
        if data is None:
            continue
        invalid = []
        for k in sorted(data):
            if not _valid_name(prefix + k):
                invalid.append(prefix + k)
                continue
            tmp[prefix + k] = data[k]
        if invalid:
            events.append(("InvalidEnvironmentVariableNames",
                           f"Keys [{', '.join(sorted(invalid))}] from the EnvFrom {what} "
                           f"{namespace}/{ref.get('name')} were skipped since they are "
                           "considered invalid environment variable names."))

    # Live view: each env entry sees the ones before it.
    variables = ChainMap(tmp, svc_env)
    for ev in container.get("env") or ():
        name = ev.get("name") or ""
        value = ev.get("value") or ""
        vf = ev.get("valueFrom")
        if value:
            value = expand(value, variables)
        elif vf:
            got = _value_from(pod, container, vf, src, namespace,
                              host_ips=host_ips, pod_ips=pod_ips, allocatable=allocatable)
            if got is None:                  # optional and missing: not set
                continue
            value = got
        tmp[name] = value

    kube = dict(tmp)
    for k, v in svc_env.items():
        kube.setdefault(k, v)

    merged: dict[str, str] = {"PATH": DEFAULT_PATH,
                              "HOSTNAME": pod_hostname(pod) if hostname is None else hostname}
    for kv in image_env:
        k, sep, v = kv.partition("=")
        if not sep:
            merged.pop(k, None)              # containerd: "K" alone unsets
        else:
            merged[k] = v
    merged.update(kube)
    env = []
    for k, v in merged.items():
        if not _valid_name(k) or "\x00" in v:
            raise EnvError(f"environment variable {k!r} cannot be passed to a process")
        env.append(f"{k}={v}")
    return ContainerEnv(env, kube, events)


def _value_from(pod: Mapping[str, Any], container: Mapping[str, Any],
                vf: Mapping[str, Any], src: _Sources, namespace: str, *,
                host_ips: Sequence[str], pod_ips: Sequence[str],
                allocatable: Mapping[str, Any] | None) -> str | None:
    try:
        if vf.get("fieldRef"):
            fr = vf["fieldRef"]
            return downward.field_value(pod, fr.get("fieldPath") or "",
                                        api_version=fr.get("apiVersion") or "v1",
                                        host_ips=host_ips, pod_ips=pod_ips)
        if vf.get("resourceFieldRef"):
            return downward.resource_value(pod, container, vf["resourceFieldRef"],
                                           allocatable=allocatable)
    except downward.DownwardError as e:
        raise EnvError(str(e)) from None
    for refkey, kind, what in (("configMapKeyRef", "configmaps", "ConfigMap"),
                               ("secretKeyRef", "secrets", "Secret")):
        ref = vf.get(refkey)
        if not ref:
            continue
        name, key = ref.get("name") or "", ref.get("key") or ""
        optional = bool(ref.get("optional"))
        data = src.get(kind, name, optional)
        if data is None:
            return None
        if key not in data:
            if optional:
                return None
            raise EnvError(f"couldn't find key {key} in {what} {namespace}/{name}")
        return data[key]
    # e.g. fileKeyRef (alpha): nothing here can resolve it
    raise EnvError(f"unsupported valueFrom {sorted(vf)}")
