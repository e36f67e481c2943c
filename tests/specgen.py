"""Request bodies for any method of the privsep spec, drawn from its own
message definitions: every method, the ones added later included, is
reachable by the fuzz tests without a hand-written sample.

Strings come from a pool of typical values, the first that fits the
field's pattern and length; a pattern none fits is an error here, so a
new kind of field makes the tests ask for a sample rather than skip it."""

from __future__ import annotations

import random
import re
from typing import Any

import yaml

from pufflet.privsep import spec as specmod

POOL = (
    "a", "pod-1", "c", "x9-", "0123456789abcdef0123456789abcdef",
    "0a0a0a0a-0000-4000-8000-00000000000a", "sha256:" + "ab" * 32, "ab" * 32,
    "10.0.0.1", "fd00::1", "10.244.1.0/24", "fd00:1::/64", "/", "/tmp",
    "PATH=/bin", "docker.io/library/x:1", "local/base:latest", "0.1.0",
    "-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n",
    "nameserver 10.96.0.10\n", "file.txt", "host-1.example",
)


def doc() -> dict:
    with open(specmod.__file__.replace("spec.py", "spec.yaml")) as f:
        return yaml.safe_load(f)


def _string(field: dict, r: random.Random) -> str:
    pattern = field.get("pattern")
    fits = [s for s in POOL if len(s) <= field.get("max_len", 1 << 30)
            and (pattern is None or re.fullmatch(pattern, s))]
    if not fits:
        raise AssertionError(f"no sample string for pattern {pattern!r}: add one to POOL")
    return r.choice(fits)


def value(messages: dict, field: dict, r: random.Random) -> Any:
    t = field["type"]
    if t == "int":
        lo, hi = field.get("min", 0), field.get("max", 2 ** 31)
        return r.choice([lo, hi, r.randint(lo, hi)])
    if t == "bool":
        return r.random() < 0.5
    if t == "float":
        return r.random()
    if t == "bytes":
        return r.randbytes(r.randrange(min(field.get("max_len", 16), 16) + 1))
    if t == "str":
        return _string(field, r)
    if t == "enum":
        return r.choice(field["values"])
    if t == "list":
        return [value(messages, field["items"], r)
                for _ in range(r.randrange(min(field.get("max_items", 2), 2) + 1))]
    return body(messages, t, r)


def body(messages: dict, name: str, r: random.Random) -> dict:
    out = {}
    for k, field in (messages[name] or {}).items():
        if field.get("optional") and r.random() < 0.3:
            continue
        out[k] = value(messages, field, r)
    return out


def request(d: dict, method: str, r: random.Random) -> dict:
    """A body for method that its request message accepts."""
    return body(d["messages"], d["methods"][method]["request"], r)
