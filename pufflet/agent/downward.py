"""The downward API: pod fields and container resources as strings, shared
by env (valueFrom.fieldRef / resourceFieldRef) and downwardAPI volumes.

Semantics of the kubelet's podFieldSelectorRuntimeValue,
fieldpath.ExtractFieldPathAsString and resource.ExtractContainerResourceValue.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from pufflet.priv.rlimits import QuantityError, parse_quantity

__all__ = ["DownwardError", "field_value", "resource_value", "go_quote",
           "format_map", "DEFAULT_GRACE"]

# The API server's default for spec.terminationGracePeriodSeconds.
DEFAULT_GRACE = 30

# Fields the kubelet resolves itself (ConvertDownwardAPIFieldLabel accepts
# more, e.g. spec.restartPolicy, but nothing then resolves them).
_SUBSCRIPT = re.compile(r"(metadata\.(?:annotations|labels))\['(.*)'\]\Z", re.S)
# validation.IsQualifiedName: [prefix/]name, name ≤ 63 chars.
_QNAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)\Z")
_DNS1123_SUB = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")


class DownwardError(ValueError):
    """A field or resource the downward API cannot give."""


def _qualified_name(s: str) -> bool:
    prefix, slash, name = s.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS1123_SUB.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_QNAME.match(name))


def go_quote(s: str) -> str:
    """Go's strconv.Quote (the %q verb): what the kubelet writes for
    label and annotation values."""
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in _GO_ESC:
            out.append(_GO_ESC[ch])
        elif o < 0x80:
            out.append(ch if 0x20 <= o < 0x7f else f"\\x{o:02x}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append("\\ufffd")           # Go sees U+FFFD there
        elif _go_printable(ch):
            out.append(ch)
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


_GO_ESC = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
           "\t": "\\t", "\v": "\\v"}


def _go_printable(ch: str) -> bool:
    # unicode.IsPrint: letters, marks, numbers, punctuation, symbols and
    # the ASCII space; other spaces, controls, format and unassigned not.
    return unicodedata.category(ch)[0] in "LMNPS"


def format_map(m: Mapping[str, str] | None) -> str:
    """fieldpath.FormatMap: k="v" lines sorted by key, no final newline."""
    return "\n".join(f"{k}={go_quote(str(v))}" for k, v in sorted((m or {}).items()))


def field_value(pod: Mapping[str, Any], field_path: str, *, api_version: str = "v1",
                host_ips: Sequence[str] = (), pod_ips: Sequence[str] = ()) -> str:
    """The value of a fieldRef.  host_ips and pod_ips are in the node's
    family order (the first is status.hostIP / status.podIP)."""
    if api_version not in ("v1", "", None):
        raise DownwardError(f"unsupported pod version: {api_version}")
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    m = _SUBSCRIPT.match(field_path)
    if m:
        path, key = m.group(1), m.group(2)
        which = "annotations" if path.endswith("annotations") else "labels"
        # As the kubelet: annotation keys are checked lower-cased.
        check = key.lower() if which == "annotations" else key
        if not _qualified_name(check):
            raise DownwardError(f"invalid key subscript in {field_path}")
        return str((meta.get(which) or {}).get(key, ""))
    if "[" in field_path:
        raise DownwardError(f"field label does not support subscript: {field_path}")
    if field_path == "spec.host":           # old clients' name for it
        field_path = "spec.nodeName"
    if field_path == "spec.nodeName":
        return spec.get("nodeName") or ""
    if field_path == "spec.serviceAccountName":
        return spec.get("serviceAccountName") or ""
    if field_path == "spec.terminationGracePeriodSeconds":
        grace = spec.get("terminationGracePeriodSeconds")
        return str(DEFAULT_GRACE if grace is None else int(grace))
    if field_path in ("status.hostIP", "status.hostIPs"):
        if not host_ips:
            raise DownwardError("the node has no address yet")
        return host_ips[0] if field_path == "status.hostIP" else ",".join(host_ips)
    if field_path == "status.podIP":
        return pod_ips[0] if pod_ips else ""
    if field_path == "status.podIPs":
        return ",".join(pod_ips)
    if field_path == "metadata.annotations":
        return format_map(meta.get("annotations"))
    if field_path == "metadata.labels":
        return format_map(meta.get("labels"))
    if field_path in ("metadata.name", "metadata.namespace", "metadata.uid"):
        return str(meta.get(field_path.split(".")[1]) or "")
    raise DownwardError(f"unsupported fieldPath: {field_path}")


_RESOURCES = {"cpu", "memory", "ephemeral-storage"}


def _quantity(v: Any, what: str) -> Fraction:
    try:
        return parse_quantity(str(v))
    except QuantityError as e:
        raise DownwardError(f"{what}: {e}") from None


def _container(pod: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    spec = pod.get("spec") or {}
    for c in list(spec.get("containers") or ()) + list(spec.get("initContainers") or ()):
        if c.get("name") == name:
            return c
    raise DownwardError(f"container {name} not found")


def resource_value(pod: Mapping[str, Any], container: Mapping[str, Any] | None,
                   selector: Mapping[str, Any], *,
                   allocatable: Mapping[str, Any] | None = None) -> str:
    """The value of a resourceFieldRef {containerName?, resource, divisor?}.

    containerName, when set, names the container (app or init) to read;
    otherwise container is used.  As the kubelet: a limit that is unset or
    zero reads as the node's allocatable (allocatable, quantity strings as
    in node.status.allocatable); the value is divided by divisor (default
    1, and "0" counts as 1) and rounded up; cpu in millicores before
    dividing, so requests.cpu 250m with no divisor is "1"."""
    name = selector.get("containerName")
    if name:
        container = _container(pod, name)
    if container is None:
        raise DownwardError("resourceFieldRef needs a container")
    res = str(selector.get("resource") or "")
    kind, _, rname = res.partition(".")
    if kind not in ("limits", "requests") or not (
            rname in _RESOURCES or rname.startswith("hugepages-")):
        raise DownwardError(f"unsupported container resource : {res}")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(rname)
    value = _quantity(raw, res) if raw is not None else Fraction(0)
    if kind == "limits" and value == 0 and rname in _RESOURCES and allocatable \
            and rname in allocatable:
        value = _quantity(allocatable[rname], f"allocatable {rname}")
    div_raw = selector.get("divisor")
    divisor = _quantity(div_raw, "divisor") if div_raw not in (None, "") else Fraction(0)
    if divisor == 0:
        divisor = Fraction(1)
    if rname == "cpu":
        # MilliValue() of each, rounded up, then a ceiling of the ratio.
        num, den = math.ceil(value * 1000), math.ceil(divisor * 1000)
    else:
        num, den = math.ceil(value), math.ceil(divisor)
    if den == 0:
        raise DownwardError(f"divisor {div_raw} is too small for {res}")
    return str(-((-num) // den))
