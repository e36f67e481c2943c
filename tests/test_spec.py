"""The wire spec: the shipped file, every field type, every spec error."""

import hashlib
import math
import os
import textwrap

import pytest

from pufflet.privsep import spec
from pufflet.privsep.spec import Invalid, SpecError, Unknown

SHIPPED = os.path.join(os.path.dirname(spec.__file__), "spec.yaml")


def write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


HEAD = """\
version: 1
limits: {max_frame: 1048576, max_fds: 8, max_outstanding: 64, max_depth: 16}
"""

ALL_TYPES = HEAD + """\
messages:
  Inner:
    x: {type: int, min: 0, max: 9}
  All:
    s: {type: str, max_len: 5}
    p: {type: str, max_len: 8, pattern: "[a-z]+"}
    i: {type: int, min: -5, max: 5}
    f: {type: float, min: 0, max: 1}
    b: {type: bool}
    by: {type: bytes, max_len: 3}
    l: {type: list, max_items: 2, items: {type: int, min: 0, max: 9}}
    m: {type: map, max_items: 2, keys: {type: str, max_len: 3},
        values: {type: int, min: 0, max: 9}}
    e: {type: enum, values: [red, green]}
    n: {type: Inner}
    ln: {type: list, max_items: 3, items: {type: Inner}}
    o: {type: str, max_len: 3, optional: true}
methods:
  Do:
    request: All
    response: Inner
    request_fds: [a, b]
"""

GOOD = {"s": "abc", "p": "abc", "i": -5, "f": 0.5, "b": True, "by": b"xyz",
        "l": [1, 2], "m": {"abc": 1}, "e": "red", "n": {"x": 1},
        "ln": [{"x": 0}, {"x": 9}]}


@pytest.fixture(scope="module")
def all_types(tmp_path_factory):
    return spec.load(write(tmp_path_factory.mktemp("s"), ALL_TYPES))


def test_shipped_spec_loads():
    s = spec.load()
    assert s.version == 1
    assert s.limits == spec.Limits(1048576, 8, 64, 16)
    assert {"Handshake", "Ping", "GetNodeFacts", "OpenLog",
            "WatchTicks"} <= set(s.methods)
    assert spec.load(SHIPPED) is s                  # cached per path
    with open(SHIPPED, "rb") as f:
        raw = f.read()
    assert spec.parse(raw).digest == hashlib.sha256(raw).hexdigest()
    assert s.methods["OpenLog"].response_fds == ("file",)
    assert s.methods["WatchTicks"].stream
    assert "OK" in spec.CODES and "UNAUTHENTICATED" in spec.CODES
    assert len(spec.CODES) == 17


def test_shipped_messages():
    s = spec.load()
    s.check_request("Handshake", {"spec_version": 1, "spec_digest": "a" * 64,
                                  "agent_version": "0.1.0"}, 0)
    with pytest.raises(Invalid, match="spec_digest"):
        s.check_request("Handshake", {"spec_version": 1,
                                      "spec_digest": "A" * 64,
                                      "agent_version": "0.1.0"}, 0)
    s.check_request("Ping", {"seq": 2 ** 63 - 1, "payload": b"x" * 65536}, 0)
    with pytest.raises(Invalid):
        s.check_request("Ping", {"seq": 2 ** 63, "payload": b""}, 0)
    with pytest.raises(Invalid):
        s.check_request("Ping", {"seq": 0, "payload": b"x" * 65537}, 0)
    s.check_request("GetNodeFacts", {}, 0)
    with pytest.raises(Invalid, match="unknown field"):
        s.check_request("GetNodeFacts", {"x": 1}, 0)
    s.check_request("OpenLog", {"name": "pod-1"}, 0)
    for bad in ("1pod", "Pod", "a/b", "a" * 65, ""):
        with pytest.raises(Invalid):
            s.check_request("OpenLog", {"name": bad}, 0)
    s.check_response("OpenLog", {}, 1)
    with pytest.raises(Invalid, match="fds"):
        s.check_response("OpenLog", {}, 0)
    s.check_response("WatchTicks", {"n": 1000}, 0)


def test_unknown_method():
    s = spec.load()
    for name in ("Nope", None, 3, b"Ping"):
        with pytest.raises(Unknown) as e:
            s.check_request(name, {}, 0)
        assert isinstance(e.value, Invalid)
        assert str(e.value).startswith("method: ")


def test_all_types_accept_good(all_types):
    m = all_types.check_request("Do", GOOD, 2)
    assert m.name == "Do" and m.request_fds == ("a", "b")
    all_types.check_request("Do", dict(GOOD, o="ab"), 2)
    all_types.check_request("Do", dict(GOOD, o=None), 2)   # optional: None ok
    all_types.check_request("Do", dict(GOOD, f=1), 2)      # int for float
    all_types.check_request("Do", dict(GOOD, l=[], m={}, ln=[]), 2)
    all_types.check_request("Do", dict(GOOD, l=(1, 2)), 2)  # local tuple


BAD = [
    # (field, value, expected "path: reason" fragment)
    ("s", 5, "body.s: expected str"),
    ("s", b"abc", "body.s: expected str"),
    ("s", "abcdef", "body.s: longer than 5"),
    ("p", "ABC", "body.p: does not match"),
    ("p", "abc1", "body.p: does not match"),
    ("p", "abcdefghi", "body.p: longer than 8"),
    ("i", True, "body.i: expected int, got bool"),
    ("i", 1.0, "body.i: expected int"),
    ("i", "1", "body.i: expected int"),
    ("i", 6, "body.i: out of range"),
    ("i", -6, "body.i: out of range"),
    ("i", 2 ** 70, "body.i: out of range"),
    ("f", 1.5, "body.f: out of range"),
    ("f", math.nan, "body.f: out of range"),
    ("f", True, "body.f: expected float"),
    ("f", "0.5", "body.f: expected float"),
    ("b", 1, "body.b: expected bool"),
    ("b", None, "body.b: required field is None"),
    ("by", "xyz", "body.by: expected bytes"),
    ("by", bytearray(b"x"), "body.by: expected bytes"),
    ("by", b"wxyz", "body.by: longer than 3"),
    ("l", [1, 2, 3], "body.l: more than 2 items"),
    ("l", [1, "x"], "body.l[1]: expected int"),
    ("l", [True], "body.l[0]: expected int, got bool"),
    ("l", {"a": 1}, "body.l: expected list"),
    ("m", {"a": 1, "b": 2, "c": 3}, "body.m: more than 2 items"),
    ("m", {"abcd": 1}, "body.m['abcd']: key longer than 3"),
    ("m", {"a": "x"}, "body.m['a']: expected int"),
    ("m", [1], "body.m: expected map"),
    ("e", "blue", "body.e: expected one of"),
    ("e", 1, "body.e: expected one of"),
    ("n", {"x": 10}, "body.n.x: out of range"),
    ("n", {"x": 1, "y": 2}, "body.n: unknown field 'y'"),
    ("n", {}, "body.n.x: required field missing"),
    ("n", [], "body.n: expected a map (Inner)"),
    ("ln", [{"x": 1}, {"x": "a"}], "body.ln[1].x: expected int"),
    ("o", "abcd", "body.o: longer than 3"),
    ("o", 3, "body.o: expected str"),
]


@pytest.mark.parametrize("field,value,why", BAD)
def test_all_types_reject_bad(all_types, field, value, why):
    with pytest.raises(Invalid) as e:
        all_types.check_request("Do", dict(GOOD, **{field: value}), 2)
    assert why in str(e.value)


def test_message_level_errors(all_types):
    def err(body, nfds=2):
        with pytest.raises(Invalid) as e:
            all_types.check_request("Do", body, nfds)
        return str(e.value)
    assert err(dict(GOOD, zz=1)) == "body: unknown field 'zz'"
    missing = dict(GOOD)
    del missing["e"]
    assert err(missing) == "body.e: required field missing"
    assert err([]) == "body: expected a map (All), got list"
    assert err(None).startswith("body: expected a map")
    assert "fds" in err(GOOD, 1)
    assert err({**GOOD, 1: 2}).startswith("body: unknown field")


SPEC_ERRORS = [
    ("not: [valid", "not YAML"),
    ("- a list\n", "top level: expected a map"),
    (HEAD + "messages: {}\n", "missing 'methods'"),
    (HEAD + "messages: {}\nmethods: {}\nextra: 1\n", "unknown key 'extra'"),
    ("version: 0\nlimits: {max_frame: 1, max_fds: 1, max_outstanding: 1, "
     "max_depth: 1}\nmessages: {}\nmethods: {}\n", "version"),
    ("version: 1\nlimits: {max_frame: 1, max_fds: 300, max_outstanding: 1, "
     "max_depth: 1}\nmessages: {}\nmethods: {}\n", "limits.max_fds"),
    ("version: 1\nlimits: {max_frame: 1, max_fds: 1, max_outstanding: 1}\n"
     "messages: {}\nmethods: {}\n", "limits: missing 'max_depth'"),
    (HEAD + "messages:\n  A: {x: {type: widget}}\nmethods: {}\n",
     "messages.A.x: unknown type 'widget'"),
    (HEAD + "messages:\n  A: {x: {type: str}}\nmethods: {}\n",
     "messages.A.x: missing 'max_len'"),
    (HEAD + "messages:\n  A: {x: {type: int, min: 0}}\nmethods: {}\n",
     "messages.A.x: missing 'max'"),
    (HEAD + "messages:\n  A: {x: {type: int, min: 5, max: 1}}\nmethods: {}\n",
     "messages.A.x: min and max"),
    (HEAD + "messages:\n  A: {x: {type: int, min: 0, max: 99999999999999999999}}"
     "\nmethods: {}\n", "messages.A.x: min and max"),
    (HEAD + "messages:\n  A: {x: {type: int, min: false, max: 1}}\n"
     "methods: {}\n", "messages.A.x: min and max"),
    (HEAD + "messages:\n  A: {x: {type: float, min: 0}}\nmethods: {}\n",
     "messages.A.x: missing 'max'"),
    (HEAD + "messages:\n  A: {x: {type: bytes}}\nmethods: {}\n",
     "messages.A.x: missing 'max_len'"),
    (HEAD + "messages:\n  A: {x: {type: bytes, max_len: -1}}\nmethods: {}\n",
     "messages.A.x.max_len"),
    (HEAD + "messages:\n  A: {x: {type: list, items: {type: bool}}}\n"
     "methods: {}\n", "messages.A.x: missing 'max_items'"),
    (HEAD + "messages:\n  A: {x: {type: list, max_items: 1}}\nmethods: {}\n",
     "messages.A.x: missing 'items'"),
    (HEAD + "messages:\n  A: {x: {type: list, max_items: 1, items: "
     "{type: str}}}\nmethods: {}\n", "messages.A.x.items: missing 'max_len'"),
    (HEAD + "messages:\n  A: {x: {type: map, max_items: 1, keys: {type: int, "
     "min: 0, max: 1}, values: {type: bool}}}\nmethods: {}\n",
     "messages.A.x.keys: map keys must be of type str"),
    (HEAD + "messages:\n  A: {x: {type: map, max_items: 1, values: "
     "{type: bool}}}\nmethods: {}\n", "messages.A.x: missing 'keys'"),
    (HEAD + "messages:\n  A: {x: {type: enum, values: []}}\nmethods: {}\n",
     "messages.A.x.values"),
    (HEAD + "messages:\n  A: {x: {type: enum, values: [a, a]}}\nmethods: {}\n",
     "messages.A.x.values: duplicate value"),
    (HEAD + "messages:\n  A: {x: {type: str, max_len: 3, pattern: '[a-'}}\n"
     "methods: {}\n", "messages.A.x.pattern: bad regex"),
    (HEAD + "messages:\n  A: {x: {type: bool, max_len: 3}}\nmethods: {}\n",
     "messages.A.x: unknown key 'max_len'"),
    (HEAD + "messages:\n  A: {x: {type: bool, optional: 1}}\nmethods: {}\n",
     "messages.A.x.optional"),
    (HEAD + "messages:\n  A: {x: {type: list, max_items: 1, items: {type: bool,"
     " optional: true}}}\nmethods: {}\n",
     "messages.A.x.items: unknown key 'optional'"),
    (HEAD + "messages:\n  A: {Bad: {type: bool}}\nmethods: {}\n",
     "messages.A.Bad: field names"),
    (HEAD + "messages:\n  a: {}\nmethods: {}\n", "messages.a: message names"),
    (HEAD + "messages:\n  A: {x: {type: A}}\nmethods: {}\n",
     "messages.A: nests itself (A -> A)"),
    (HEAD + "messages:\n  A: {x: {type: B}}\n  B: {y: {type: list, max_items: 1,"
     " items: {type: A}}}\nmethods: {}\n", "nests itself (A -> B -> A)"),
    (HEAD + "messages:\n  A: {x: {type: bool}}\n  A: {y: {type: bool}}\n"
     "methods: {}\n", "line 5: duplicate key 'A'"),
    (HEAD + "messages:\n  A: {x: {type: bool}, x: {type: bool}}\nmethods: {}\n",
     "duplicate key 'x'"),
    (HEAD + "messages: {A: {}}\nmethods:\n  M: {request: A, response: A}\n"
     "  M: {request: A, response: A}\n", "duplicate key 'M'"),
    (HEAD + "messages: {A: {}}\nmethods:\n  M: {request: A, response: B}\n",
     "methods.M.response: unknown message 'B'"),
    (HEAD + "messages: {A: {}}\nmethods:\n  M: {request: A}\n",
     "methods.M: missing 'response'"),
    (HEAD + "messages: {A: {}}\nmethods:\n  M: {request: A, response: A, "
     "request_fds: [a, a]}\n", "methods.M.request_fds: duplicate fd name"),
    (HEAD + "messages: {A: {}}\nmethods:\n  M: {request: A, response: A, "
     "response_fds: 2}\n", "methods.M.response_fds"),
    (HEAD + "messages: {A: {}}\nmethods:\n  M: {request: A, response: A, "
     "stream: yes please}\n", "methods.M.stream"),
    (HEAD + "messages: {A: {}}\nmethods:\n  M: {request: A, response: A, "
     "timeout: 3}\n", "methods.M: unknown key 'timeout'"),
    (HEAD + "messages: {A: {}}\nmethods:\n  m: {request: A, response: A}\n",
     "methods.m: method names"),
]


@pytest.mark.parametrize("text,why", SPEC_ERRORS)
def test_spec_errors(tmp_path, text, why):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        spec.load(path)
    assert why in str(e.value)
    assert path in str(e.value)


def test_depth_limit(tmp_path):
    # A chain of nested messages: depth 3 fits max_depth 3, 4 does not.
    def chain(n, max_depth):
        msgs = "".join(f"  M{i}: {{x: {{type: M{i + 1}}}}}\n" for i in range(n - 1))
        msgs += f"  M{n - 1}: {{}}\n"
        return (f"version: 1\nlimits: {{max_frame: 100, max_fds: 1, "
                f"max_outstanding: 1, max_depth: {max_depth}}}\n"
                f"messages:\n{msgs}methods: {{}}\n")
    spec.load(write(tmp_path, chain(3, 3), "ok.yaml"))
    with pytest.raises(SpecError, match="nests 4 deep, max_depth is 3"):
        spec.load(write(tmp_path, chain(4, 3), "bad.yaml"))
    # lists and maps count as levels too
    text = HEAD.replace("max_depth: 16", "max_depth: 2") + (
        "messages:\n  A: {x: {type: list, max_items: 1, items: "
        "{type: list, max_items: 1, items: {type: bool}}}}\nmethods: {}\n")
    with pytest.raises(SpecError, match="nests 3 deep"):
        spec.load(write(tmp_path, text, "lists.yaml"))


def test_adding_a_method_is_a_yaml_edit(tmp_path):
    with open(SHIPPED) as f:
        text = f.read()
    text = text.replace("methods:\n", "methods:\n  Echo2:\n    request: Ping\n"
                        "    response: Ping\n    request_fds: [a]\n", 1)
    s = spec.load(write(tmp_path, text))
    assert s.check_request("Echo2", {"seq": 1, "payload": b""}, 1).name == "Echo2"
    assert s.digest != spec.load().digest


def test_generated_bodies_pass_every_methods_checks():
    """The fuzz tests' bodies for methods without a hand-written sample
    (tests/specgen.py) are valid requests, so their mutations probe one
    fault at a time."""
    import random

    import specgen
    s = spec.load()
    d = specgen.doc()
    r = random.Random(7)
    for name in d["methods"]:
        for _ in range(20):
            s.methods[name].check_request_body(specgen.request(d, name, r))
