"""/etc/pufflet.conf: grammar and checks, see pufflet.conf(5).

The result is a frozen Config: the parent re-parses on SIGHUP and swaps
the whole object, so nothing may change one in place.

Statements live in a table keyed by their keywords; each has one small
handler.  To add a statement, write a handler and decorate it with
@_statement("its keywords").  Every error is collected with its file
and line, and parsing goes on with the next statement, so an admin
sees all mistakes of a file at once, as with pfctl -n.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable

from pufflet.conflex import Statement, Token, lex

MAX_INCLUDE_DEPTH = 16


class ConfigError(Exception):
    """All errors found in a configuration, as (file, line, message)."""

    def __init__(self, errors: list[tuple[str, int, str]]) -> None:
        self.errors = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(f"{f}:{n}: {m}" for f, n, m in self.errors)


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str


@dataclass(frozen=True)
class HostPath:
    prefix: str
    writable: bool


@dataclass(frozen=True)
class PodNetwork:
    cidr: str | None        # None: use the node's spec.podCIDR
    egress: str | None
    # 'pod network from node' said: pods wait for the Node's podCIDR
    # rather than share the node's network while it has none.
    from_node: bool = False


@dataclass(frozen=True)
class Threshold:
    """A pressure threshold: an amount (bytes, inodes or processes) or a
    percentage of the total, never both."""
    amount: int | None
    percent: float | None

    def of(self, total: int) -> int:
        """The threshold as an amount, given the total it is a share of."""
        if self.percent is not None:
            return int(total * self.percent / 100)
        return self.amount or 0


@dataclass(frozen=True)
class Config:
    path: str
    node_name: str
    kubeconfig: str | None
    bootstrap_kubeconfig: str | None
    user: str
    state_dir: str
    log_dir: str
    pod_uid_min: int
    pod_uid_max: int
    max_pods: int
    pod_network: PodNetwork
    listen_address: str
    listen_port: int
    tls_cert: str | None
    tls_key: str | None
    static_pod_dir: str | None
    labels: tuple[tuple[str, str], ...]
    taints: tuple[Taint, ...]
    hostpaths: tuple[HostPath, ...]
    node_address: str | None = None      # None: detected
    reserved_cpu_millis: int = 0
    reserved_memory: int = 0
    reserved_storage: int = 0
    pressure_memory: Threshold = Threshold(100 << 20, None)
    pressure_disk: Threshold = Threshold(None, 10.0)
    pressure_inodes: Threshold = Threshold(None, 5.0)
    pressure_pids: Threshold = Threshold(None, 5.0)
    status_interval: float = 10.0
    status_report: float = 300.0
    lease_duration: int = 40
    registry_credentials: str | None = None   # docker config.json, read as root
    insecure_registries: tuple[str, ...] = ()  # host[:port] spoken to over plain HTTP
    image_gc_high: int = 85     # % of the state filesystem: start removing images
    image_gc_low: int = 80      # ... until usage is below this
    tls_client_ca: str | None = None    # CA bundle for node API client certificates
    node_api_open: bool = False         # 'node api authentication none': a lab only
    tls_csr: bool = False               # 'tls certificate csr': serving cert from the cluster
    cluster_dns: tuple[str, ...] = ()   # dnsPolicy ClusterFirst's nameservers
    cluster_domain: str = "cluster.local"
    # 'pod routes': the cluster's pod networks; routes to other nodes'
    # podCIDRs inside them are kept (agent/podroutes.py, priv/podroutes.py).
    pod_routes: tuple[str, ...] = ()


DEFAULT_TAINT = Taint("pufflet.io/openbsd", "true", "NoSchedule")

# Defaults of the singleton settings, by Config field.  node_name is
# missing on purpose: asking the OS for it is a side effect, done only
# when no 'node name' is given.
_DEFAULTS: dict[str, Any] = {
    "kubeconfig": None,
    "bootstrap_kubeconfig": None,
    "user": "_pufflet",
    "state_dir": "/var/db/pufflet",
    "log_dir": "/var/log/pufflet",
    "pod_uid_min": 100000,
    "pod_uid_max": 165535,
    "max_pods": 110,
    "pod_network": PodNetwork(None, None),
    "listen_address": "0.0.0.0",
    "listen_port": 10250,
    "tls_cert": None,
    "tls_key": None,
    "static_pod_dir": None,
}


def load(path: str) -> Config:
    """Read and check the configuration file at path."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([(path, 0, f"cannot read: {_why(e)}")]) from None
    p = _Parser(path)
    p.file(text, path, os.path.dirname(path), [os.path.realpath(path)])
    return p.finish()


def parse(text: str, name: str = "<string>") -> Config:
    """Check a configuration given as text; includes are relative to the
    current directory."""
    p = _Parser(name)
    p.file(text, name, "", [])
    return p.finish()


def default() -> Config:
    """The configuration of an empty file."""
    return dataclasses.replace(parse(""), path="")


# ---------------------------------------------------------------------------
# parser

class _Error(Exception):
    """A statement is wrong; the message says how."""


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DECIMAL = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?\Z")
_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_REF = re.compile(r"\$([A-Za-z0-9_]*)")


@dataclass(frozen=True)
class _Stmt:
    words: tuple[str, ...]
    handler: Callable[[_Parser, _Args], None]
    repeatable: bool
    options: tuple[str, ...]     # keywords used among the arguments

    @property
    def name(self) -> str:
        return " ".join(self.words)


_TABLE: dict[tuple[str, ...], _Stmt] = {}


def _statement(words: str, repeatable: bool = False,
               options: tuple[str, ...] = ()) -> Callable:
    def register(fn: Callable[[_Parser, _Args], None]) -> Callable:
        key = tuple(words.split())
        _TABLE[key] = _Stmt(key, fn, repeatable, options)
        return fn
    return register


def _keywords() -> frozenset[str]:
    words: set[str] = set()
    for s in _TABLE.values():
        words.update(s.words)
        words.update(s.options)
    return frozenset(words)


class _Args:
    """The arguments of one statement, consumed left to right."""

    def __init__(self, stmt: str, tokens: list[Token]) -> None:
        self.stmt = stmt
        self.tokens = tokens
        self.i = 0

    def peek(self) -> Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def string(self, what: str) -> str:
        t = self.peek()
        if t is None:
            raise _Error(f"'{self.stmt}' needs {what}")
        self.i += 1
        return t.text

    def path(self, what: str = "an absolute path") -> str:
        p = self.string(what)
        if not p.startswith("/"):
            raise _Error(f"'{self.stmt}': path '{p}' is not absolute")
        return p

    def number(self, what: str, lo: int, hi: int) -> int:
        s = self.string(what)
        if not s.isascii() or not s.isdigit():
            raise _Error(f"'{self.stmt}': '{s}' is not a number")
        # cap the digits: int() of a huge string is slow, or refused
        v = int(s) if len(s) <= 19 else hi + 1
        if not lo <= v <= hi:
            raise _Error(f"'{self.stmt}': {s} is out of range {lo}-{hi}")
        return v

    def seconds(self, lo: float, hi: float) -> float:
        """Decimal seconds, fractions allowed so tests can go fast."""
        s = self.string("a number of seconds")
        if not _DECIMAL.match(s):
            raise _Error(f"'{self.stmt}': '{s}' is not a number of seconds")
        v = float(s)
        if not lo <= v <= hi:
            raise _Error(f"'{self.stmt}': {s} is out of range {lo:g}-{hi:g}")
        return v

    def size(self, what: str, percent: bool = False,
             suffixes: bool = True) -> tuple[int | None, float | None]:
        """A size with an optional binary suffix K, M, G or T (a count
        without one when suffixes is false), or, if percent, a share
        such as 10%. Returns (amount, None) or (None, percent)."""
        s = self.string(what)
        if percent and s.endswith("%"):
            if not _DECIMAL.match(s[:-1]):
                raise _Error(f"'{self.stmt}': '{s}' is not a percentage")
            p = float(s[:-1])
            if not 0 <= p < 100:
                raise _Error(f"'{self.stmt}': {s} is out of range 0%-99%")
            return None, p
        digits, mult = s, 1
        if suffixes and s[-1:] in _SUFFIXES:
            digits, mult = s[:-1], _SUFFIXES[s[-1]]
        if not digits.isascii() or not digits.isdigit() or len(digits) > 15:
            raise _Error(f"'{self.stmt}': '{s}' is not {what}")
        return int(digits) * mult, None

    def keyword(self, *words: str) -> str | None:
        """Take the next token if it is one of the bare words."""
        t = self.peek()
        if t is not None and not t.quoted and t.text in words:
            self.i += 1
            return t.text
        return None

    def end(self) -> None:
        t = self.peek()
        if t is not None:
            raise _Error(f"unexpected '{t.text}' at end of '{self.stmt}'")


class _Parser:
    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[tuple[str, int, str]] = []
        self.macros: dict[str, str] = {}
        self.seen: dict[str, tuple[str, int]] = {}         # statement -> where
        self.v: dict[str, Any] = {}                        # Config fields set
        self.labels: dict[str, tuple[str, tuple[str, int]]] = {}
        self.taints: dict[tuple[str, str], tuple[Taint, tuple[str, int]]] = {}
        self.taint_none: tuple[str, int] | None = None
        self.hostpaths: dict[str, tuple[HostPath, tuple[str, int]]] = {}
        self.where = (path, 0)        # statement being parsed
        self.dir = ""                 # its file's directory, for includes
        self.stack: list[str] = []    # real paths of the files being read
        self.depth = 0                # of includes

    def error(self, where: tuple[str, int], msg: str) -> None:
        self.errors.append((where[0], where[1], msg))

    def file(self, text: str, name: str, dirname: str,
             stack: list[str]) -> None:
        saved = self.where, self.dir, self.stack
        self.dir, self.stack = dirname, stack
        for st in lex(text):
            self.where = (name, st.line)
            try:
                self.statement(st)
            except _Error as e:
                self.error(self.where, str(e))
        self.where, self.dir, self.stack = saved

    def statement(self, st: Statement) -> None:
        if st.error is not None:
            raise _Error(st.error)
        toks = list(st.tokens)
        if self.macro_definition(toks):
            return
        toks = [self.expand(t) for t in toks]
        stmt, n = self.lookup(toks)
        if not stmt.repeatable:
            first = self.seen.get(stmt.name)
            if first is not None:
                raise _Error(f"duplicate '{stmt.name}' statement "
                             f"(first at {first[0]}:{first[1]})")
            self.seen[stmt.name] = self.where
        args = _Args(stmt.name, toks[n:])
        stmt.handler(self, args)
        args.end()

    def macro_definition(self, toks: list[Token]) -> bool:
        """Define a macro if toks say name = value; pf's name="value"
        without blanks is taken too."""
        first = toks[0]
        if first.quoted:
            return False
        if "=" not in first.text and (len(toks) < 2 or toks[1].quoted or
                                      not toks[1].text.startswith("=")):
            return False
        # rejoin the bare words around '=', then split at the first one
        head, rest = first.text, toks[1:]
        while "=" not in head:
            head += rest[0].text
            rest = rest[1:]
        name, _, tail = head.partition("=")
        if tail:
            rest = [Token(tail, False, first.line)] + rest
        if not _NAME.match(name):
            raise _Error(f"invalid macro name '{name}'")
        if name in _keywords():
            raise _Error(f"macro name '{name}' is a keyword")
        if len(rest) != 1:
            raise _Error(f"macro '{name}' needs one value" +
                         (", quote it if it has blanks" if rest else ""))
        value = self.expand(rest[0]).text
        if name in self.macros:
            raise _Error(f"macro {name} redefined")
        self.macros[name] = value
        return True

    def expand(self, t: Token) -> Token:
        """Expand a bare word starting with $name.  As in pf, the rest of
        the word is kept, so $dir/file works; a '$' inside a word is just
        a character."""
        if t.quoted or not t.text.startswith("$"):
            return t
        m = _REF.match(t.text)
        if not m or not _NAME.match(m.group(1)):
            raise _Error(f"invalid macro reference '{t.text}'")
        name = m.group(1)
        if name not in self.macros:
            raise _Error(f"macro '{name}' not defined")
        # one word, even if the value has blanks: unlike pf, never split
        return Token(self.macros[name] + t.text[m.end():], False, t.line)

    def lookup(self, toks: list[Token]) -> tuple[_Stmt, int]:
        """Find the statement named by the leading bare words of toks,
        and how many words name it; the longest name wins."""
        prefixes = {k[:i] for k in _TABLE for i in range(1, len(k) + 1)}
        words: tuple[str, ...] = ()
        for t in toks:
            if t.quoted or words + (t.text,) not in prefixes:
                break
            words += (t.text,)
        if words in _TABLE:
            return _TABLE[words], len(words)
        if not words:
            raise _Error(f"unknown keyword '{toks[0].text}'")
        nexts = sorted({k[len(words)] for k in _TABLE
                        if k[:len(words)] == words})
        msg = f"expected {_either(nexts)} after '{' '.join(words)}'"
        if len(toks) > len(words):
            msg += f", got '{toks[len(words)].text}'"
        raise _Error(msg)

    def finish(self) -> Config:
        v = dict(_DEFAULTS)
        v.update(self.v)
        self.check_uid_range(v)
        self.check_status_intervals(v)
        if v.get("tls_csr"):
            self.check_tls_csr(v)
        elif ("tls certificate" in self.seen) != ("tls key" in self.seen):
            have, lack = (("tls certificate", "tls key")
                          if "tls certificate" in self.seen
                          else ("tls key", "tls certificate"))
            self.error(self.seen[have], f"'{have}' given without '{lack}'")
        if "node_name" not in v:
            v["node_name"] = self.hostname()
        if self.errors:
            raise ConfigError(self.errors)
        if self.taint_none is not None:
            taints: tuple[Taint, ...] = ()
        elif self.taints:
            taints = tuple(t for t, _ in self.taints.values())
        else:
            taints = (DEFAULT_TAINT,)
        return Config(
            path=self.path,
            labels=tuple((k, val) for k, (val, _) in self.labels.items()),
            taints=taints,
            hostpaths=tuple(h for h, _ in self.hostpaths.values()),
            **v)

    def check_tls_csr(self, v: dict[str, Any]) -> None:
        where = self.seen["tls certificate"]
        if "tls key" in self.seen:
            # The key of a requested certificate is made by pufflet.
            self.error(self.seen["tls key"], "'tls key' given with 'tls certificate csr'")
        if not v.get("kubeconfig"):
            self.error(where, "'tls certificate csr' needs a 'kubeconfig': only the "
                              "API server can sign the request")

    def check_uid_range(self, v: dict[str, Any]) -> None:
        lo, hi, maxpods = v["pod_uid_min"], v["pod_uid_max"], v["max_pods"]
        if hi - lo + 1 >= maxpods:
            return
        # the defaults fit, so one of the two statements was given
        where = self.seen.get("pod uid range") or self.seen["max pods"]
        self.error(where, f"pod uid range {lo}-{hi} holds {hi - lo + 1} "
                          f"uids, fewer than max pods {maxpods}")

    def check_status_intervals(self, v: dict[str, Any]) -> None:
        every = v.get("status_interval", 10.0)
        report = v.get("status_report", 300.0)
        if report < every:
            where = (self.seen.get("node status report")
                     or self.seen["node status interval"])
            self.error(where, f"node status report {report:g} is shorter "
                              f"than node status interval {every:g}")

    def hostname(self) -> str:
        # Kubernetes lowercases host names for node names too; DNS names
        # are case-insensitive, so this names the same host.
        name = socket.gethostname().lower()
        if not _is_dns_subdomain(name):
            self.error((self.path, 0), f"host name '{name}' is not a valid "
                       "node name; set one with 'node name'")
        return name


def _either(words: list[str]) -> str:
    q = [f"'{w}'" for w in words]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " or " + q[-1]


def _why(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


# ---------------------------------------------------------------------------
# syntax of names, after Kubernetes' apimachinery validation

_DNS_LABELS = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?\Z")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# pufflet sets these labels itself, from what the system says
_RESERVED_LABELS = ("kubernetes.io/os", "kubernetes.io/arch",
                    "kubernetes.io/hostname")


def _is_dns_subdomain(s: str) -> bool:
    return len(s) <= 253 and _DNS_LABELS.match(s) is not None


def _is_qualified_name(s: str) -> bool:
    prefix, slash, name = s.rpartition("/")
    if slash and not _is_dns_subdomain(prefix):
        return False
    return len(name) <= 63 and _LABEL_NAME.match(name) is not None


def _is_label_value(s: str) -> bool:
    return s == "" or len(s) <= 63 and _LABEL_NAME.match(s) is not None


# ---------------------------------------------------------------------------
# statements

@_statement("include", repeatable=True)
def _include(p: _Parser, a: _Args) -> None:
    name = a.string("a file name")
    a.end()
    path = os.path.join(p.dir, name)
    real = os.path.realpath(path)
    if real in p.stack:
        raise _Error(f"include loop: '{path}' is already being read")
    if p.depth >= MAX_INCLUDE_DEPTH:
        raise _Error(f"includes nested too deep (at most "
                     f"{MAX_INCLUDE_DEPTH})")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise _Error(f"cannot read '{path}': {_why(e)}") from None
    p.depth += 1
    try:
        p.file(text, path, os.path.dirname(path), p.stack + [real])
    finally:
        p.depth -= 1


@_statement("node name")
def _node_name(p: _Parser, a: _Args) -> None:
    name = a.string("a name")
    if not _is_dns_subdomain(name):
        raise _Error(f"invalid node name '{name}': must be lowercase "
                     "letters, digits, '-' and '.', at most 253 characters")
    p.v["node_name"] = name


@_statement("node label", repeatable=True)
def _node_label(p: _Parser, a: _Args) -> None:
    s = a.string("key=value")
    key, eq, value = s.partition("=")
    if not eq:
        raise _Error(f"label '{s}' is not key=value")
    if not _is_qualified_name(key):
        raise _Error(f"invalid label key '{key}'")
    if not _is_label_value(value):
        raise _Error(f"invalid label value '{value}'")
    if key in _RESERVED_LABELS:
        raise _Error(f"label '{key}' is set by pufflet itself")
    if key in p.labels:
        first = p.labels[key][1]
        raise _Error(f"duplicate label '{key}' (first at "
                     f"{first[0]}:{first[1]})")
    p.labels[key] = (value, p.where)


@_statement("node taint", repeatable=True, options=("none",))
def _node_taint(p: _Parser, a: _Args) -> None:
    if a.keyword("none"):
        if p.taint_none is not None:
            raise _Error(f"duplicate 'node taint none' (first at "
                         f"{p.taint_none[0]}:{p.taint_none[1]})")
        if p.taints:
            raise _Error("'node taint none' cannot be combined with "
                         "other taints")
        p.taint_none = p.where
        return
    s = a.string("key[=value]:effect or 'none'")
    kv, colon, effect = s.rpartition(":")
    if not colon:
        raise _Error(f"taint '{s}' is not key[=value]:effect")
    key, _, value = kv.partition("=")
    if not _is_qualified_name(key):
        raise _Error(f"invalid taint key '{key}'")
    if not _is_label_value(value):
        raise _Error(f"invalid taint value '{value}'")
    if effect not in _EFFECTS:
        raise _Error(f"invalid taint effect '{effect}': expected "
                     f"{_either(list(_EFFECTS))}")
    if p.taint_none is not None:
        raise _Error("taint cannot be combined with 'node taint none' "
                     f"(at {p.taint_none[0]}:{p.taint_none[1]})")
    if (key, effect) in p.taints:
        first = p.taints[key, effect][1]
        raise _Error(f"duplicate taint '{key}' with effect {effect} "
                     f"(first at {first[0]}:{first[1]})")
    p.taints[key, effect] = (Taint(key, value, effect), p.where)


@_statement("kubeconfig")
def _kubeconfig(p: _Parser, a: _Args) -> None:
    p.v["kubeconfig"] = a.path()


@_statement("bootstrap kubeconfig")
def _bootstrap_kubeconfig(p: _Parser, a: _Args) -> None:
    p.v["bootstrap_kubeconfig"] = a.path()


@_statement("user")
def _user(p: _Parser, a: _Args) -> None:
    user = a.string("a user name")
    if user == "root":
        # the agent faces the network; it must never hold root
        raise _Error("user must not be root")
    if len(user) > 32 or not _USER.match(user):
        raise _Error(f"invalid user name '{user}'")
    p.v["user"] = user


@_statement("state directory")
def _state_directory(p: _Parser, a: _Args) -> None:
    p.v["state_dir"] = a.path()


@_statement("log directory")
def _log_directory(p: _Parser, a: _Args) -> None:
    p.v["log_dir"] = a.path()


@_statement("pod uid range")
def _pod_uid_range(p: _Parser, a: _Args) -> None:
    # below 1000 live the system's own users
    lo = a.number("two numbers", 1000, 2**31 - 1)
    hi = a.number("two numbers", 1000, 2**31 - 1)
    if lo > hi:
        raise _Error(f"'pod uid range': {lo} is above {hi}")
    p.v["pod_uid_min"], p.v["pod_uid_max"] = lo, hi


@_statement("max pods")
def _max_pods(p: _Parser, a: _Args) -> None:
    p.v["max_pods"] = a.number("a number", 1, 10000)


@_statement("pod network", options=("from", "egress"))
def _pod_network(p: _Parser, a: _Args) -> None:
    cidr: str | None = None
    if a.keyword("from"):
        if not a.keyword("node"):
            raise _Error("expected 'node' after 'pod network from'")
    else:
        s = a.string("a network or 'from node'")
        try:
            net = ipaddress.ip_network(s, strict=True)
        except ValueError as e:
            raise _Error(f"invalid pod network: {e}") from None
        # room for a gateway and at least one pod
        most = 30 if net.version == 4 else 126
        if net.prefixlen > most:
            raise _Error(f"pod network {s} is too small: the prefix "
                         f"must be /{most} or shorter")
        cidr = str(net)
    egress = None
    if a.keyword("egress"):
        egress = a.string("an interface name")
        if len(egress) > 15 or not _IFNAME.match(egress):
            raise _Error(f"invalid interface name '{egress}'")
    p.v["pod_network"] = PodNetwork(cidr, egress, from_node=cidr is None)


# One cluster network per address family, as dual-stack clusters have
# (the controller manager's --cluster-cidr takes at most two).
@_statement("pod routes", repeatable=True)
def _pod_routes(p: _Parser, a: _Args) -> None:
    s = a.string("the cluster's pod network")
    try:
        net = ipaddress.ip_network(s, strict=True)
    except ValueError as e:
        raise _Error(f"invalid pod routes network: {e}") from None
    if net.prefixlen == 0:
        raise _Error(f"pod routes {s}: a cluster network, not every address")
    have = p.v.get("pod_routes", ())
    for other in have:
        if ipaddress.ip_network(other).version == net.version:
            raise _Error(f"pod routes {s}: an IPv{net.version} network is given "
                         f"already ({other}); one per address family")
    p.v["pod_routes"] = have + (str(net),)


# resolv.conf(5) reads at most 3 nameservers (MAXNS), as the kubelet warns.
MAX_CLUSTER_DNS = 3


@_statement("cluster dns", repeatable=True)
def _cluster_dns(p: _Parser, a: _Args) -> None:
    s = a.string("an IP address")
    try:
        addr = str(ipaddress.ip_address(s))
    except ValueError:
        raise _Error(f"invalid cluster dns address '{s}'") from None
    have = p.v.get("cluster_dns", ())
    if addr in have:
        raise _Error(f"duplicate cluster dns address '{s}'")
    if len(have) == MAX_CLUSTER_DNS:
        raise _Error(f"at most {MAX_CLUSTER_DNS} cluster dns addresses: "
                     "resolv.conf(5) reads no more")
    p.v["cluster_dns"] = have + (addr,)


@_statement("cluster domain")
def _cluster_domain(p: _Parser, a: _Args) -> None:
    s = a.string("a domain name")
    name = s.lower().rstrip(".")
    # Search domains of every pod's resolv.conf: a DNS name of labels.
    if not name or len(name) > 253 or not all(
            _DNS_LABEL.match(label) for label in name.split(".")):
        raise _Error(f"invalid cluster domain '{s}'")
    p.v["cluster_domain"] = name


@_statement("listen on", options=("port",))
def _listen_on(p: _Parser, a: _Args) -> None:
    s = a.string("an address or '*'")
    if s == "*":
        addr = "0.0.0.0"
    else:
        try:
            addr = str(ipaddress.ip_address(s))
        except ValueError:
            raise _Error(f"invalid listen address '{s}'") from None
    if a.keyword("port"):
        p.v["listen_port"] = a.number("a port number", 1, 65535)
    p.v["listen_address"] = addr


@_statement("tls certificate", options=("csr",))
def _tls_certificate(p: _Parser, a: _Args) -> None:
    # 'csr': ask the cluster (signer kubernetes.io/kubelet-serving), as the
    # kubelet's serverTLSBootstrap does; see agent/servingcert.py.
    if a.keyword("csr"):
        p.v["tls_csr"] = True
        return
    p.v["tls_cert"] = a.path("an absolute path or 'csr'")


@_statement("tls key")
def _tls_key(p: _Parser, a: _Args) -> None:
    p.v["tls_key"] = a.path()


@_statement("tls client ca")
def _tls_client_ca(p: _Parser, a: _Args) -> None:
    # Read by the agent before it drops root, like the certificate.
    p.v["tls_client_ca"] = a.path()


@_statement("node api authentication", options=("none",))
def _node_api_authentication(p: _Parser, a: _Args) -> None:
    # Only 'none' exists: authentication on is the default and has no
    # spelling, so that turning it off is always a visible, explicit line.
    if not a.keyword("none"):
        raise _Error("expected 'none' after 'node api authentication'")
    p.v["node_api_open"] = True


@_statement("static pods")
def _static_pods(p: _Parser, a: _Args) -> None:
    p.v["static_pod_dir"] = a.path()


@_statement("hostpath", repeatable=True, options=("read-only", "read-write"))
def _hostpath(p: _Parser, a: _Args) -> None:
    prefix = a.path()
    parts = prefix.split("/")[1:]
    if prefix == "/":
        raise _Error("hostpath / would expose the whole host")
    # a prefix is compared as a string later: it must have one spelling
    if "" in parts or "." in parts or ".." in parts:
        raise _Error(f"hostpath '{prefix}' is not normalised "
                     "(no '//', '.', '..' or trailing '/')")
    mode = a.keyword("read-only", "read-write")
    if mode is None and a.peek() is not None:
        raise _Error("expected 'read-only' or 'read-write' after "
                     f"'hostpath {prefix}', got '{a.peek().text}'")
    if prefix in p.hostpaths:
        first = p.hostpaths[prefix][1]
        raise _Error(f"duplicate hostpath '{prefix}' (first at "
                     f"{first[0]}:{first[1]})")
    p.hostpaths[prefix] = (HostPath(prefix, mode == "read-write"), p.where)


@_statement("node address")
def _node_address(p: _Parser, a: _Args) -> None:
    s = a.string("an IP address")
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        raise _Error(f"invalid node address '{s}'") from None
    if addr.is_unspecified or addr.is_multicast:
        raise _Error(f"node address {s} cannot reach this node")
    p.v["node_address"] = str(addr)


@_statement("reserve cpu")
def _reserve_cpu(p: _Parser, a: _Args) -> None:
    s = a.string("cores or millicores")
    digits, milli = (s[:-1], 1) if s.endswith("m") else (s, 1000)
    if not digits.isascii() or not digits.isdigit() or len(digits) > 9:
        raise _Error(f"'reserve cpu': '{s}' is not cores (2) or "
                     "millicores (500m)")
    p.v["reserved_cpu_millis"] = int(digits) * milli


@_statement("reserve memory")
def _reserve_memory(p: _Parser, a: _Args) -> None:
    p.v["reserved_memory"] = a.size("a size")[0]


@_statement("reserve storage")
def _reserve_storage(p: _Parser, a: _Args) -> None:
    p.v["reserved_storage"] = a.size("a size")[0]


@_statement("pressure memory")
def _pressure_memory(p: _Parser, a: _Args) -> None:
    p.v["pressure_memory"] = Threshold(*a.size("a size or a percentage",
                                               percent=True))


@_statement("pressure disk")
def _pressure_disk(p: _Parser, a: _Args) -> None:
    p.v["pressure_disk"] = Threshold(*a.size("a size or a percentage",
                                             percent=True))


@_statement("pressure inodes")
def _pressure_inodes(p: _Parser, a: _Args) -> None:
    p.v["pressure_inodes"] = Threshold(*a.size("a count or a percentage",
                                               percent=True, suffixes=False))


@_statement("pressure pids")
def _pressure_pids(p: _Parser, a: _Args) -> None:
    p.v["pressure_pids"] = Threshold(*a.size("a count or a percentage",
                                             percent=True, suffixes=False))


@_statement("node status interval")
def _node_status_interval(p: _Parser, a: _Args) -> None:
    p.v["status_interval"] = a.seconds(0.1, 3600)


@_statement("node status report")
def _node_status_report(p: _Parser, a: _Args) -> None:
    p.v["status_report"] = a.seconds(0.1, 86400)


@_statement("node lease duration")
def _node_lease_duration(p: _Parser, a: _Args) -> None:
    # leaseDurationSeconds is an int32 of whole seconds in the Lease API
    p.v["lease_duration"] = a.number("a number of seconds", 1, 3600)


_REGISTRY_HOST = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
    r"|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?\Z")


@_statement("registry credentials")
def _registry_credentials(p: _Parser, a: _Args) -> None:
    # Read by the agent before it drops privileges, so the file can stay
    # root-only; its contents are checked then, not here.
    p.v["registry_credentials"] = a.path()


@_statement("insecure registry", repeatable=True)
def _insecure_registry(p: _Parser, a: _Args) -> None:
    s = a.string("a registry host[:port]")
    host = s.lower()
    m = _REGISTRY_HOST.match(host)
    if m is None or len(host) > 255:
        raise _Error(f"invalid registry '{s}': expected host or host:port "
                     "(no scheme, no path)")
    if m.group(1) is not None and not 1 <= int(m.group(1)) <= 65535:
        raise _Error(f"invalid registry '{s}': port out of range 1-65535")
    have = p.v.get("insecure_registries", ())
    if host in have:
        raise _Error(f"duplicate insecure registry '{s}'")
    p.v["insecure_registries"] = have + (host,)


@_statement("image gc", options=("high", "low"))
def _image_gc(p: _Parser, a: _Args) -> None:
    # The kubelet's --image-gc-high-threshold/--image-gc-low-threshold.
    if not a.keyword("high"):
        raise _Error("expected 'high' after 'image gc'")
    high = a.number("a percentage", 0, 100)
    if not a.keyword("low"):
        raise _Error(f"expected 'low' after 'image gc high {high}'")
    low = a.number("a percentage", 0, 100)
    if low > high:
        raise _Error(f"'image gc': low {low} is above high {high}")
    p.v["image_gc_high"], p.v["image_gc_low"] = high, low
