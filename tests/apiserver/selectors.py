"""Label and field selectors with the syntax and semantics of apimachinery.

Label selectors: `a`, `!a`, `a=b`, `a==b`, `a!=b`, `a in (b,c)`, `a notin (b)`,
`a>1`, `a<1`; comma means AND.  `!=` and `notin` also match objects without the
label, as in Kubernetes.
Field selectors: `f=v`, `f==v`, `f!=v` joined by commas (backslash escapes),
restricted to the fields each kind supports (resources.Resource.fields).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from .errors import bad_request
from .resources import Resource

_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                  r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str                      # =, !=, in, notin, exists, !, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        has = self.key in labels
        val = labels.get(self.key)
        if self.op == "=":
            return has and val == self.values[0]
        if self.op == "!=":
            return not has or val != self.values[0]
        if self.op == "in":
            return has and val in self.values
        if self.op == "notin":
            return not has or val not in self.values
        if self.op == "exists":
            return has
        if self.op == "!":
            return not has
        try:
            num = int(val) if has else None
        except ValueError:
            return False
        if num is None:
            return False
        return num > int(self.values[0]) if self.op == "gt" else num < int(self.values[0])


_TOKEN = re.compile(r"\s*(\(|\)|,|!=|==|=|>|<|!|[^\s(),!=<>]+)")


def parse_labels(text: str | None) -> list[Requirement]:
    """Parse a labelSelector query value; raises a 400 ApiError on bad syntax."""
    if not text or not text.strip():
        return []
    toks: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            if text[pos:].strip() == "":
                break
            raise bad_request(f"unable to parse requirement: found '{text[pos:]}'")
        toks.append(m.group(1))
        pos = m.end()
    reqs: list[Requirement] = []
    i = 0

    def err(msg: str) -> Exception:
        return bad_request(f"unable to parse requirement: {msg}")

    def check_key(k: str) -> str:
        if not _KEY.match(k) or len(k.split("/")[-1]) > 63:
            raise err(f'invalid label key "{k}": name part must consist of alphanumeric '
                      f"characters, '-', '_' or '.', and must start and end with an "
                      f"alphanumeric character")
        return k

    def check_value(v: str) -> str:
        if len(v) > 63 or not _VALUE.match(v):
            raise err(f'values[0][{v}]: Invalid value: "{v}": a valid label must be an '
                      f"empty string or consist of alphanumeric characters, '-', '_' or '.'")
        return v

    while i < len(toks):
        if toks[i] == "!":
            if i + 1 >= len(toks):
                raise err("found '', expected: identifier")
            reqs.append(Requirement(check_key(toks[i + 1]), "!"))
            i += 2
        else:
            key = check_key(toks[i])
            i += 1
            op = toks[i] if i < len(toks) else ","
            if op == ",":
                reqs.append(Requirement(key, "exists"))
            elif op in ("=", "==", "!="):
                i += 1
                val = toks[i] if i < len(toks) and toks[i] not in (",", "(", ")") else ""
                if val:
                    i += 1
                reqs.append(Requirement(key, "!=" if op == "!=" else "=", (check_value(val),)))
            elif op in (">", "<"):
                i += 1
                val = toks[i] if i < len(toks) else ""
                if not val.isdigit():
                    raise err(f"for 'Gt', 'Lt' operators, the value must be an integer")
                i += 1
                reqs.append(Requirement(key, "gt" if op == ">" else "lt", (val,)))
            elif op in ("in", "notin"):
                i += 1
                if i >= len(toks) or toks[i] != "(":
                    raise err(f"found '{toks[i] if i < len(toks) else ''}', expected: '('")
                i += 1
                vals: list[str] = []
                while i < len(toks) and toks[i] != ")":
                    if toks[i] != ",":
                        vals.append(check_value(toks[i]))
                    i += 1
                if i >= len(toks):
                    raise err("found '', expected: ')'")
                i += 1
                reqs.append(Requirement(key, op, tuple(vals) or ("",)))
            else:
                raise err(f"found '{op}', expected: in, notin, =, ==, !=, gt, lt")
        if i < len(toks):
            if toks[i] != ",":
                raise err(f"found '{toks[i]}', expected: ',' or 'end of string'")
            i += 1
    return reqs


def labels_match(reqs: list[Requirement], obj: dict[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(r.matches(labels) for r in reqs)


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    op: str          # "=" or "!="
    value: str


def _split_unescaped(text: str, sep: str) -> list[str]:
    out, cur, esc = [], [], False
    for ch in text:
        if esc:
            cur.append("\\" + ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", r"\1", v)


def parse_fields(text: str | None, res: Resource) -> list[FieldRequirement]:
    """Parse a fieldSelector; unknown fields are a 400 as in kube-apiserver."""
    if not text:
        return []
    reqs = []
    for part in _split_unescaped(text, ","):
        if not part:
            continue
        m = re.match(r"^((?:[^=!\\]|\\.)+?)\s*(==|!=|=)\s*(.*)$", part)
        if not m:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        field, op, val = _unescape(m.group(1)).strip(), m.group(2), _unescape(m.group(3))
        if field not in ("metadata.name", "metadata.namespace") + res.fields:
            raise bad_request(f'field label not supported: {field}')
        reqs.append(FieldRequirement(field, "!=" if op == "!=" else "=", val))
    return reqs


def field_value(obj: dict[str, Any], field: str) -> str:
    """The string form kube-apiserver's *ToSelectableFields gives a field."""
    if field == "source":
        return str((obj.get("source") or {}).get("component") or "")
    if field == "status.podIPs":
        ips = (obj.get("status") or {}).get("podIPs") or []
        return ips[0].get("ip", "") if ips else ""
    cur: Any = obj
    for part in field.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if field in ("spec.hostNetwork", "spec.unschedulable"):
        return "true" if cur else "false"
    if field == "type" and cur is None and obj.get("kind") == "Secret":
        return "Opaque"
    return "" if cur is None else str(cur)


def fields_match(reqs: list[FieldRequirement], obj: dict[str, Any]) -> bool:
    for r in reqs:
        v = field_value(obj, r.field)
        if (v == r.value) != (r.op == "="):
            return False
    return True


def make_filter(res: Resource, label_selector: str | None,
                field_selector: str | None) -> Callable[[dict[str, Any]], bool]:
    lreqs = parse_labels(label_selector)
    freqs = parse_fields(field_selector, res)
    return lambda obj: labels_match(lreqs, obj) and fields_match(freqs, obj)
