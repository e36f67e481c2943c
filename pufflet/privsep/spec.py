"""Load the privsep wire spec (spec.yaml) and compile it into validators.

The spec is checked in full when it is loaded, so a mistake in it stops the
daemon at start rather than turning into a hole later.  Each message type is
compiled once into a closure that checks a decoded msgpack value; a frame is
validated four times per round trip (send and receive on both sides), so the
closures do the least work that still checks everything: exact type tests
(bool is not an int), bounds, and no recursion into anything undeclared.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

CODES: tuple[str, ...] = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)

# msgpack carries ints in [-2**63, 2**64-1]; a bound outside can never be met.
_INT_MIN, _INT_MAX = -(2 ** 63), 2 ** 64 - 1
_MESSAGE_NAME = re.compile(r"[A-Z][A-Za-z0-9]*")
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SCALARS = ("str", "int", "float", "bool", "bytes", "enum")


class SpecError(Exception):
    """The spec file itself is wrong; the message names the spot."""


class Invalid(Exception):
    """A value does not match the spec.  str() is "field.path: reason".

    The path is collected while the validators unwind (innermost segment
    first), so that the success path never builds one.
    """

    def __init__(self, reason: str, root: str = "body") -> None:
        super().__init__(reason)
        self.reason = reason
        self.root = root
        self.segments: list[str] = []

    @property
    def path(self) -> str:
        return self.root + "".join(reversed(self.segments))

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class Unknown(Invalid):
    """The method is not in the spec."""


Check = Callable[[Any], None]


@dataclass(frozen=True)
class Limits:
    max_frame: int
    max_fds: int
    max_outstanding: int
    max_depth: int


@dataclass(frozen=True)
class Method:
    name: str
    request: str                    # message names, for humans and logs
    response: str
    request_fds: tuple[str, ...]
    response_fds: tuple[str, ...]
    stream: bool
    check_request_body: Check = field(repr=False, compare=False)
    check_response_body: Check = field(repr=False, compare=False)

    def check_request(self, body: Any, nfds: int) -> None:
        self.check_request_body(body)
        if nfds != len(self.request_fds):
            raise Invalid(f"{self.name} takes {len(self.request_fds)} fds, "
                          f"got {nfds}", root="fds")

    def check_response(self, body: Any, nfds: int) -> None:
        self.check_response_body(body)
        if nfds != len(self.response_fds):
            raise Invalid(f"{self.name} returns {len(self.response_fds)} fds, "
                          f"got {nfds}", root="fds")


class Spec:
    """A loaded, checked spec.  Immutable after load()."""

    def __init__(self, version: int, digest: str, limits: Limits,
                 methods: dict[str, Method],
                 messages: dict[str, Check]) -> None:
        self.version = version
        self.digest = digest
        self.limits = limits
        self.methods = methods
        self.messages = messages

    def method(self, name: Any) -> Method:
        m = self.methods.get(name) if type(name) is str else None
        if m is None:
            raise Unknown(f"unknown method {name!r}"[:200], root="method")
        return m

    def check_request(self, method: str, body: Any, nfds: int) -> Method:
        m = self.method(method)
        m.check_request(body, nfds)
        return m

    def check_response(self, method: str, body: Any, nfds: int) -> None:
        self.method(method).check_response(body, nfds)


_cache: dict[str, Spec] = {}


def load(path: str | None = None) -> Spec:
    """Load and check a spec; the default is spec.yaml beside this file."""
    if path is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "spec.yaml")
    key = os.path.realpath(path)
    spec = _cache.get(key)
    if spec is None:
        with open(path, "rb") as f:
            raw = f.read()
        spec = parse(raw, where=path)
        _cache[key] = spec
    return spec


def parse(raw: bytes, where: str = "<spec>") -> Spec:
    """Check and compile spec text; raises SpecError."""
    try:
        doc = yaml.load(raw, Loader=_Loader)
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{where}: not YAML: {e}") from None
    return _Compiler(where).spec(doc, hashlib.sha256(raw).hexdigest())


# -- YAML loading: pyyaml keeps the last of duplicate keys; refuse them. ----

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    pass


def _mapping(loader: Any, node: Any) -> dict:
    seen = set()
    for knode, _ in node.value:
        key = loader.construct_object(knode, deep=True)
        if key in seen:
            raise SpecError(f"line {knode.start_mark.line + 1}: "
                            f"duplicate key {key!r}")
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                        _mapping)


# -- Checking the spec and compiling validators. ----------------------------

def _typename(v: Any) -> str:
    return type(v).__name__


def _is_int(v: Any) -> bool:
    return type(v) is int


class _Compiler:
    def __init__(self, where: str) -> None:
        self.where = where
        self.raw: dict = {}
        self.compiled: dict[str, tuple[Check, int]] = {}
        self.active: list[str] = []        # messages being compiled
        self.max_depth = 0

    def fail(self, spot: str, why: str) -> SpecError:
        return SpecError(f"{self.where}: {spot}: {why}")

    def need_map(self, v: Any, spot: str) -> dict:
        if not isinstance(v, dict):
            raise self.fail(spot, f"expected a map, got {_typename(v)}")
        return v

    def only_keys(self, d: dict, spot: str, allowed: set,
                  required: set) -> None:
        for k in d:
            if k not in allowed:
                raise self.fail(spot, f"unknown key {k!r}")
        for k in sorted(required):
            if k not in d:
                raise self.fail(spot, f"missing {k!r}")

    def spec(self, doc: Any, digest: str) -> Spec:
        doc = self.need_map(doc, "top level")
        self.only_keys(doc, "top level", {"version", "limits", "messages",
                                          "methods"},
                       {"version", "limits", "messages", "methods"})
        version = doc["version"]
        if not _is_int(version) or version < 1:
            raise self.fail("version", "expected an int >= 1")
        limits = self.limits(doc["limits"])
        self.max_depth = limits.max_depth
        self.raw = self.need_map(doc["messages"], "messages")
        for name in self.raw:
            if not isinstance(name, str) or not _MESSAGE_NAME.fullmatch(name):
                raise self.fail(f"messages.{name}",
                                "message names are CamelCase")
            if name in _SCALARS or name in ("list", "map"):
                raise self.fail(f"messages.{name}", "name of a builtin type")
        messages = {name: self.message(name)[0] for name in self.raw}
        methods = {}
        for name, m in self.need_map(doc["methods"], "methods").items():
            methods[name] = self.method(name, m)
        return Spec(version, digest, limits, methods, messages)

    def limits(self, d: Any) -> Limits:
        keys = ("max_frame", "max_fds", "max_outstanding", "max_depth")
        d = self.need_map(d, "limits")
        self.only_keys(d, "limits", set(keys), set(keys))
        # The header is ">IB"; Linux passes at most 253 fds per message.
        tops = {"max_frame": 2 ** 32 - 1, "max_fds": 253,
                "max_outstanding": 2 ** 20, "max_depth": 100}
        for k in keys:
            if not _is_int(d[k]) or not 1 <= d[k] <= tops[k]:
                raise self.fail(f"limits.{k}",
                                f"expected an int in 1..{tops[k]}")
        return Limits(**{k: d[k] for k in keys})

    def method(self, name: Any, d: Any) -> Method:
        spot = f"methods.{name}"
        if not isinstance(name, str) or not _MESSAGE_NAME.fullmatch(name):
            raise self.fail(spot, "method names are CamelCase")
        d = self.need_map(d, spot)
        self.only_keys(d, spot, {"doc", "request", "response", "request_fds",
                                 "response_fds", "stream"},
                       {"request", "response"})
        checks = []
        for k in ("request", "response"):
            ref = d[k]
            if ref not in self.raw:
                raise self.fail(f"{spot}.{k}", f"unknown message {ref!r}")
            checks.append(self.compiled[ref][0])
        fds = []
        for k in ("request_fds", "response_fds"):
            names = d.get(k, [])
            if not isinstance(names, list) or not all(
                    isinstance(n, str) and _FIELD_NAME.fullmatch(n)
                    for n in names):
                raise self.fail(f"{spot}.{k}", "expected a list of fd names")
            if len(set(names)) != len(names):
                raise self.fail(f"{spot}.{k}", "duplicate fd name")
            fds.append(tuple(names))
        stream = d.get("stream", False)
        if type(stream) is not bool:
            raise self.fail(f"{spot}.stream", "expected true or false")
        return Method(name, d["request"], d["response"], fds[0], fds[1],
                      stream, checks[0], checks[1])

    def message(self, name: str) -> tuple[Check, int]:
        """Compile a message; returns (check, depth).  Depth counts maps and
        lists, the message itself included."""
        if name in self.compiled:
            return self.compiled[name]
        if name in self.active:
            loop = " -> ".join(self.active[self.active.index(name):] + [name])
            raise self.fail(f"messages.{name}",
                            f"nests itself ({loop}): depth unbounded, "
                            f"max_depth is {self.max_depth}")
        self.active.append(name)
        fields = self.raw[name]
        if fields is None:
            fields = {}
        fields = self.need_map(fields, f"messages.{name}")
        compiled = []
        depth = 0
        for fname, fspec in fields.items():
            spot = f"messages.{name}.{fname}"
            if not isinstance(fname, str) or not _FIELD_NAME.fullmatch(fname):
                raise self.fail(spot, "field names are lower_case")
            fspec = self.need_map(fspec, spot)
            optional = fspec.get("optional", False)
            if type(optional) is not bool:
                raise self.fail(f"{spot}.optional", "expected true or false")
            check, d = self.field(fspec, spot, {"optional"})
            depth = max(depth, d)
            compiled.append((fname, check, optional))
        depth += 1
        if depth > self.max_depth:
            raise self.fail(f"messages.{name}",
                            f"nests {depth} deep, "
                            f"max_depth is {self.max_depth}")
        self.active.pop()
        self.compiled[name] = (_message(name, compiled), depth)
        return self.compiled[name]

    def field(self, d: Any, spot: str,
              extra: set = frozenset()) -> tuple[Check, int]:
        """Compile one field spec; returns (check, depth)."""
        d = self.need_map(d, spot)
        t = d.get("type")
        if not isinstance(t, str):
            raise self.fail(spot, "missing 'type'")
        common = {"type", "doc"} | set(extra)
        keys = {
            "str": ({"max_len", "pattern"}, {"max_len"}),
            "int": ({"min", "max"}, {"min", "max"}),
            "float": ({"min", "max"}, {"min", "max"}),
            "bool": (set(), set()),
            "bytes": ({"max_len"}, {"max_len"}),
            "list": ({"items", "max_items"}, {"items", "max_items"}),
            "map": ({"keys", "values", "max_items"},
                    {"keys", "values", "max_items"}),
            "enum": ({"values"}, {"values"}),
        }
        if t not in keys:
            if t not in self.raw:
                raise self.fail(spot, f"unknown type {t!r}")
            self.only_keys(d, spot, common, set())
            return self.message(t)
        allowed, required = keys[t]
        self.only_keys(d, spot, common | allowed, required)
        if t == "str":
            return _str(self.size(d, "max_len", spot),
                        self.pattern(d.get("pattern"), spot)), 0
        if t == "bytes":
            return _bytes(self.size(d, "max_len", spot)), 0
        if t == "bool":
            return _bool, 0
        if t == "int":
            lo, hi = d["min"], d["max"]
            if not (_is_int(lo) and _is_int(hi)
                    and _INT_MIN <= lo <= hi <= _INT_MAX):
                raise self.fail(spot, "min and max must be ints, min <= max, "
                                      "within msgpack's range")
            return _int(lo, hi), 0
        if t == "float":
            lo, hi = d["min"], d["max"]
            if not (type(lo) in (int, float) and type(hi) in (int, float)
                    and lo <= hi):
                raise self.fail(spot, "min and max must be numbers, "
                                      "min <= max")
            return _float(float(lo), float(hi)), 0
        if t == "enum":
            vals = d["values"]
            if (not isinstance(vals, list) or not vals
                    or not all(isinstance(v, str) for v in vals)):
                raise self.fail(f"{spot}.values", "expected a list of strings")
            if len(set(vals)) != len(vals):
                raise self.fail(f"{spot}.values", "duplicate value")
            return _enum(frozenset(vals)), 0
        n = self.size(d, "max_items", spot)
        if t == "list":
            item, depth = self.field(d["items"], f"{spot}.items")
            return _list(n, item), depth + 1
        kd = self.need_map(d["keys"], f"{spot}.keys")
        if kd.get("type") != "str":
            raise self.fail(f"{spot}.keys", "map keys must be of type str")
        key, _ = self.field(kd, f"{spot}.keys")
        value, depth = self.field(d["values"], f"{spot}.values")
        return _map(n, key, value), depth + 1

    def size(self, d: dict, k: str, spot: str) -> int:
        v = d[k]
        if not _is_int(v) or v < 0:
            raise self.fail(f"{spot}.{k}", "expected an int >= 0")
        return v

    def pattern(self, p: Any, spot: str) -> re.Pattern | None:
        if p is None:
            return None
        if not isinstance(p, str):
            raise self.fail(f"{spot}.pattern", "expected a string")
        try:
            return re.compile(p)
        except re.error as e:
            raise self.fail(f"{spot}.pattern", f"bad regex: {e}") from None


# -- Validator closures.  Each raises Invalid; the caller adds its segment. --

def _message(name: str, fields: list[tuple[str, Check, bool]]) -> Check:
    allowed = frozenset(f for f, _, _ in fields)
    required = frozenset(f for f, _, opt in fields if not opt)
    exact = allowed == required
    # Required ints, strs without a pattern and bytes are tested inline,
    # saving a call per field; the rest (and the detailed error when an
    # inline test fails) go through the field's full check.
    values = tuple((f, c.fast[2], c.fast[3]) for f, c, opt in fields
                   if not opt and _fast(c)[0] == _VALUE)
    lengths = tuple((f, c.fast[1], c.fast[3]) for f, c, opt in fields
                    if not opt and _fast(c)[0] == _LENGTH)
    others = tuple((f, check, opt) for f, check, opt in fields
                   if opt or _fast(check)[0] == _CALL)
    everything = tuple(fields)

    def full(v: Any) -> None:
        """The slow path: find the first fault and raise it."""
        if type(v) is not dict:
            raise Invalid(f"expected a map ({name}), got {_typename(v)}")
        for k in v:
            if k not in allowed:
                raise Invalid(f"unknown field {k!r}"[:200])
        for fname, fcheck, optional in everything:
            x = v.get(fname)
            if x is None:
                if optional:
                    continue
                e = Invalid("required field missing" if fname not in v
                            else "required field is None")
                e.segments.append("." + fname)
                raise e
            try:
                fcheck(x)
            except Invalid as e:
                e.segments.append("." + fname)
                raise

    def check(v: Any) -> None:
        if type(v) is not dict or not (v.keys() == required if exact else
                                       required <= v.keys() <= allowed):
            full(v)
        for fname, lo, hi in values:
            x = v[fname]
            if type(x) is not int or x < lo or x > hi:
                full(v)
        for fname, ftype, hi in lengths:
            x = v[fname]
            if type(x) is not ftype or len(x) > hi:
                full(v)
        for fname, fcheck, optional in others:
            x = v.get(fname)
            if x is None:
                if optional:
                    continue
                full(v)
            try:
                fcheck(x)
            except Invalid as e:
                e.segments.append("." + fname)
                raise
    return check


_VALUE, _LENGTH, _CALL = 0, 1, 2


def _fast(check: Check) -> tuple[int, type | None, Any, Any]:
    """How a message can test a field inline: (kind, type, lo, hi)."""
    return getattr(check, "fast", (_CALL, None, None, None))


def _str(max_len: int, pattern: re.Pattern | None) -> Check:
    if pattern is None:
        def check(v: Any) -> None:
            if type(v) is not str:
                raise Invalid(f"expected str, got {_typename(v)}")
            if len(v) > max_len:
                raise Invalid(f"longer than {max_len}")
        check.fast = (_LENGTH, str, 0, max_len)  # type: ignore[attr-defined]
        return check
    match = pattern.fullmatch

    def check_pattern(v: Any) -> None:
        if type(v) is not str:
            raise Invalid(f"expected str, got {_typename(v)}")
        if len(v) > max_len:
            raise Invalid(f"longer than {max_len}")
        if match(v) is None:
            raise Invalid(f"does not match {pattern.pattern!r}")
    return check_pattern


def _bytes(max_len: int) -> Check:
    def check(v: Any) -> None:
        if type(v) is not bytes:
            raise Invalid(f"expected bytes, got {_typename(v)}")
        if len(v) > max_len:
            raise Invalid(f"longer than {max_len}")
    check.fast = (_LENGTH, bytes, 0, max_len)  # type: ignore[attr-defined]
    return check


def _int(lo: int, hi: int) -> Check:
    def check(v: Any) -> None:
        if type(v) is not int:          # rejects bool, a subclass of int
            raise Invalid(f"expected int, got {_typename(v)}")
        if v < lo or v > hi:
            raise Invalid(f"out of range {lo}..{hi}")
    check.fast = (_VALUE, int, lo, hi)  # type: ignore[attr-defined]
    return check


def _float(lo: float, hi: float) -> Check:
    def check(v: Any) -> None:
        if type(v) is not float and type(v) is not int:
            raise Invalid(f"expected float, got {_typename(v)}")
        if not lo <= v <= hi:           # also refuses NaN
            raise Invalid(f"out of range {lo}..{hi}")
    return check


def _bool(v: Any) -> None:
    if type(v) is not bool:
        raise Invalid(f"expected bool, got {_typename(v)}")


def _enum(values: frozenset) -> Check:
    shown = sorted(values)

    def check(v: Any) -> None:
        if type(v) is not str or v not in values:
            raise Invalid(f"expected one of {shown}")
    return check


def _list(max_items: int, item: Check) -> Check:
    def check(v: Any) -> None:
        # A tuple can only come from local code; the wire gives lists.
        if type(v) is not list and type(v) is not tuple:
            raise Invalid(f"expected list, got {_typename(v)}")
        if len(v) > max_items:
            raise Invalid(f"more than {max_items} items")
        for i, x in enumerate(v):
            try:
                item(x)
            except Invalid as e:
                e.segments.append(f"[{i}]")
                raise
    return check


def _map(max_items: int, key: Check, value: Check) -> Check:
    def check(v: Any) -> None:
        if type(v) is not dict:
            raise Invalid(f"expected map, got {_typename(v)}")
        if len(v) > max_items:
            raise Invalid(f"more than {max_items} items")
        for k, x in v.items():
            try:
                key(k)
            except Invalid as e:
                e.reason = "key " + e.reason
                e.segments.append(f"[{k!r}]"[:80])
                raise
            try:
                value(x)
            except Invalid as e:
                e.segments.append(f"[{k!r}]")
                raise
    return check
