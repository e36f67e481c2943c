"""Registry credentials and the WWW-Authenticate dance, agent side.

Credentials come in Docker's config.json shape, from two places: the
imagePullSecrets of a pod (kubernetes.io/dockerconfigjson, given per pull)
and a root-only file named by 'registry credentials' in pufflet.conf, which
the agent reads while it is still root, before it drops privileges.

Matching a registry to an entry follows the kubelet (pkg/credentialprovider):
the key of an "auths" entry may be a bare host, a host with a path prefix,
or a URL; "*" globs one DNS label; docker.io's historical spellings all
name docker.io.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

from pufflet.images.reference import DEFAULT_REGISTRY, LEGACY_REGISTRIES

# Some servers omit expires_in; the token spec says to assume 60 s.
DEFAULT_TOKEN_LIFE = 60
# Renew a little early so a token does not expire between check and use.
TOKEN_SLACK = 5
MAX_CREDENTIALS_FILE = 1 << 20

_DOCKER_HOSTS = frozenset((DEFAULT_REGISTRY,) + LEGACY_REGISTRIES)


class CredentialsError(ValueError):
    pass


@dataclass(frozen=True)
class Basic:
    username: str
    password: str

    def header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class _Entry:
    host: str           # lowercased, may hold '*' labels, may carry a port
    path: str           # repository prefix, "" for the whole registry
    creds: Basic


def _split_key(key: str) -> tuple[str, str]:
    """'https://host:5000/v1/' -> ('host:5000', 'v1'); docker.io's index
    URL names the whole of docker.io, whatever path it carries."""
    k = key.strip()
    k = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", k)
    host, _, path = k.partition("/")
    host = host.lower()
    if host in _DOCKER_HOSTS:
        return DEFAULT_REGISTRY, ""
    path = path.strip("/")
    if path in ("v1", "v2"):        # API version in the key, not a repository
        path = ""
    return host, path


def _decode_entry(key: str, value: object) -> Basic | None:
    if not isinstance(value, dict):
        raise CredentialsError(f"auths entry {key!r} is not an object")
    user, pw = value.get("username"), value.get("password")
    if isinstance(user, str) and isinstance(pw, str) and user:
        return Basic(user, pw)
    auth = value.get("auth")
    if auth is None:
        return None                     # e.g. only identitytoken: unsupported
    if not isinstance(auth, str):
        raise CredentialsError(f"auths entry {key!r}: auth is not a string")
    try:
        raw = base64.b64decode(auth, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise CredentialsError(f"auths entry {key!r}: auth is not base64 of "
                               "user:password") from None
    user, colon, pw = raw.partition(":")
    if not colon or not user:
        raise CredentialsError(f"auths entry {key!r}: auth is not user:password")
    return Basic(user, pw)


class Keyring:
    """Credentials by registry, from one or more docker config.json docs."""

    def __init__(self, entries: Iterable[_Entry] = ()) -> None:
        self._entries = list(entries)

    @classmethod
    def from_dockerconfig(cls, doc: bytes | str | Mapping) -> "Keyring":
        """Accepts {"auths": {...}} (config.json, dockerconfigjson) or the
        bare map of the older .dockercfg."""
        if isinstance(doc, (bytes, str)):
            try:
                doc = json.loads(doc)
            except (ValueError, UnicodeDecodeError) as e:
                raise CredentialsError(f"not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise CredentialsError("not a JSON object")
        auths = doc.get("auths", doc if "auths" not in doc else None)
        if not isinstance(auths, dict):
            raise CredentialsError("'auths' is not an object")
        entries = []
        for key, value in auths.items():
            creds = _decode_entry(key, value)
            if creds is not None:
                host, path = _split_key(key)
                entries.append(_Entry(host, path, creds))
        return cls(entries)

    @classmethod
    def from_file(cls, path: str) -> "Keyring":
        with open(path, "rb") as f:
            data = f.read(MAX_CREDENTIALS_FILE + 1)
        if len(data) > MAX_CREDENTIALS_FILE:
            raise CredentialsError(f"{path}: larger than {MAX_CREDENTIALS_FILE} bytes")
        try:
            return cls.from_dockerconfig(data)
        except CredentialsError as e:
            raise CredentialsError(f"{path}: {e}") from None

    @classmethod
    def from_secrets(cls, secrets: Iterable[Mapping | bytes | str]) -> "Keyring":
        """Each secret is the decoded .dockerconfigjson of one pull secret."""
        entries: list[_Entry] = []
        for s in secrets:
            entries.extend(cls.from_dockerconfig(s)._entries)
        return cls(entries)

    def __add__(self, other: "Keyring") -> "Keyring":
        # Order matters: the first match wins, as the kubelet tries pull
        # secrets before the node's own credentials.
        return Keyring(self._entries + other._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def lookup(self, registry: str, repository: str) -> list[Basic]:
        """Every credential that may apply, most specific first."""
        registry = registry.lower()
        found = []
        for e in self._entries:
            if not _host_matches(e.host, registry):
                continue
            if e.path and not (repository == e.path
                               or repository.startswith(e.path + "/")):
                continue
            found.append((len(e.path), e))
        found.sort(key=lambda t: -t[0])     # stable: file order among equals
        return [e.creds for _, e in found]


def _host_matches(pattern: str, host: str) -> bool:
    """Per-label glob, as the kubelet does: '*.example.com' matches
    'a.example.com' but not 'a.b.example.com'; ports must agree."""
    p_host, _, p_port = pattern.partition(":") if not pattern.startswith("[") else (pattern, "", "")
    h_host, _, h_port = host.partition(":") if not host.startswith("[") else (host, "", "")
    if p_port != h_port:
        return False
    p_labels, h_labels = p_host.split("."), h_host.split(".")
    if len(p_labels) != len(h_labels):
        return False
    return all(fnmatch.fnmatchcase(h, p) for p, h in zip(p_labels, h_labels))


# ---------------------------------------------------------------------------
# challenges (RFC 7235) and tokens

_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str                 # lowercased: "bearer" or "basic"
    params: Mapping[str, str]


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value.  Registries send one challenge; a
    value holding several is split where a new scheme word starts."""
    out: list[Challenge] = []
    s = header.strip()
    while s:
        m = re.match(r"([A-Za-z][A-Za-z0-9_-]*)\s*", s)
        if not m:
            break
        scheme, s = m.group(1).lower(), s[m.end():]
        params: dict[str, str] = {}
        while True:
            pm = _PARAM.match(s)
            if not pm:
                break
            v = pm.group(2)
            if v.startswith('"'):
                v = re.sub(r"\\(.)", r"\1", v[1:-1])
            params[pm.group(1).lower()] = v
            s = s[pm.end():]
        out.append(Challenge(scheme, params))
        s = s.lstrip(", ")
    return out


class TokenCache:
    """Bearer tokens by (realm, service, scope, user), until they expire.
    Shared by every pull so concurrent pulls of one repository ask once."""

    def __init__(self, clock=time.monotonic) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple, tuple[str, float]] = {}
        self._clock = clock

    def get(self, key: tuple) -> str | None:
        with self._lock:
            hit = self._tokens.get(key)
            if hit is None:
                return None
            if hit[1] <= self._clock():
                del self._tokens[key]
                return None
            return hit[0]

    def put(self, key: tuple, token: str, expires_in: float) -> None:
        life = max(0.0, expires_in - TOKEN_SLACK)
        with self._lock:
            self._tokens[key] = (token, self._clock() + life)


def parse_token_reply(body: bytes) -> tuple[str, float]:
    """(token, seconds it lives) from a token server's JSON answer; OAuth2
    servers name it access_token, Docker's spec names it token."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("token server reply is not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("token server reply is not a JSON object")
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token or len(token) > 65536:
        raise ValueError("token server reply holds no token")
    # A token goes into a header: refuse anything that could split it.
    if any(c in token for c in "\r\n\0"):
        raise ValueError("token holds control characters")
    life = doc.get("expires_in")
    if not isinstance(life, (int, float)) or isinstance(life, bool) or life <= 0:
        life = DEFAULT_TOKEN_LIFE
    return token, float(life)
