"""Who may use the node API: authentication and authorization.

Closed by default, like a kubelet run with --anonymous-auth=false and
--authorization-mode=Webhook: a caller is a verified client certificate
(the cluster CA's, given as 'tls client ca') or a bearer token the API
server vouches for (TokenReview); whatever it asks is then put to the API
server as a SubjectAccessReview on nodes/<subresource> of this node.
Nobody else gets in, and no answer means no: an API server we cannot
reach authorizes nothing.

Answers are cached as the kubelet's webhook clients cache them (tokens:
2 min when valid, 10 s when not; decisions: 5 min allowed, 30 s denied),
so that `logs -f` reconnects and metrics scrapes do not each cost a round
trip; errors are never cached.

'node api authentication none' switches all this off for a lab; the
agent says so loudly at every start.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, TypeVar

from pufflet.nodeapi.server import HTTPError, Request

log = logging.getLogger("pufflet.nodeapi.auth")

TOKEN_TTL_OK = 120.0
TOKEN_TTL_BAD = 10.0
ALLOW_TTL = 300.0
DENY_TTL = 30.0
CACHE_SIZE = 4096

ANONYMOUS = "system:anonymous"
UNAUTHENTICATED = "system:unauthenticated"
# A WebSocket client cannot set headers in a browser, so Kubernetes lets
# it carry its token as a subprotocol.
WS_TOKEN_PREFIX = "base64url.bearer.authorization.k8s.io."

# The kubelet's verbs, by HTTP method (pkg/kubelet/server/auth.go).
_VERBS = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update",
          "PATCH": "patch", "DELETE": "delete"}


def verb_for(method: str) -> str:
    return _VERBS.get(method, "")


def subresource_for(path: str) -> str:
    """The kubelet's mapping from path to nodes subresource: what is not
    stats, metrics, logs or spec is proxy (exec, attach, portForward,
    containerLogs, run, pods, healthz)."""
    def under(prefix: str) -> bool:
        return path == prefix or path.startswith(prefix + "/")
    if under("/stats"):
        return "stats"
    if under("/metrics"):
        return "metrics"
    if under("/logs"):
        return "log"
    if under("/spec"):
        return "spec"
    return "proxy"


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


class ReviewError(Exception):
    """The API server could not be asked (down, refused, malformed answer)."""


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """A bounded map whose entries expire; the least recently used goes
    first when full.  Thread-safe: every connection thread asks it."""

    def __init__(self, size: int = CACHE_SIZE, clock: Callable[[], float] = time.monotonic):
        self.size = size
        self.clock = clock
        self._d: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            hit = self._d.get(key)
            if hit is None:
                return None
            if hit[0] <= self.clock():
                del self._d[key]
                return None
            self._d.move_to_end(key)
            return hit[1]

    def put(self, key: K, value: V, ttl: float) -> None:
        with self._lock:
            self._d[key] = (self.clock() + ttl, value)
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


TokenReview = Callable[[str], "Identity | None"]          # None: not authenticated
AccessReview = Callable[[Identity, dict], Decision]


@dataclass
class Gate:
    """The filter every request passes (server.Gate).

    token_review and access_review are None without an API server: then
    only client certificates authenticate, and nothing is authorized."""
    node_name: str
    token_review: TokenReview | None = None
    access_review: AccessReview | None = None
    open: bool = False              # 'node api authentication none'
    tokens: TTLCache = field(default_factory=TTLCache)
    decisions: TTLCache = field(default_factory=TTLCache)

    def check(self, req: Request, subresource: str) -> None:
        if self.open:
            req.user, req.groups = ANONYMOUS, (UNAUTHENTICATED,)
            return
        who = self.authenticate(req)
        if who is None:
            raise HTTPError(401, "Unauthorized")
        req.user, req.groups, req.uid = who.user, who.groups, who.uid
        req.extra = {k: list(v) for k, v in who.extra}
        verb = verb_for(req.method)
        attrs = {"verb": verb, "resource": "nodes", "subresource": subresource,
                 "name": self.node_name, "version": "v1", "group": ""}
        what = f"user={who.user}, verb={verb}, resource=nodes, subresource={subresource}"
        try:
            d = self.authorize(who, attrs)
        except ReviewError as e:
            log.warning("node API: cannot authorize %s: %s", what, e)
            raise HTTPError(500, f"Authorization error ({what})") from None
        if not d.allowed:
            log.info("node API: forbidden (%s)%s", what, f": {d.reason}" if d.reason else "")
            raise HTTPError(403, f"Forbidden ({what})")

    # -- authentication ---------------------------------------------------

    def authenticate(self, req: Request) -> Identity | None:
        # A verified certificate wins over a token, as in the kubelet's
        # union of authenticators (x509 first).
        who = cert_identity(req.connection.getpeercert())
        if who is not None:
            return who
        token = bearer_token(req)
        if token is None or self.token_review is None:
            return None
        key = hashlib.sha256(token.encode()).digest()   # not the token itself
        hit = self.tokens.get(key)
        if hit is not None:
            return hit or None
        try:
            who = self.token_review(token)
        except ReviewError as e:
            log.warning("node API: cannot review a token: %s", e)
            return None
        # False, not None, marks a cached refusal.
        self.tokens.put(key, who or False, TOKEN_TTL_OK if who else TOKEN_TTL_BAD)
        return who

    # -- authorization ----------------------------------------------------

    def authorize(self, who: Identity, attrs: dict) -> Decision:
        if self.access_review is None:
            return Decision(False, "no API server to authorize against")
        key = (who, tuple(sorted(attrs.items())))
        hit = self.decisions.get(key)
        if hit is not None:
            return hit
        d = self.access_review(who, attrs)
        self.decisions.put(key, d, ALLOW_TTL if d.allowed else DENY_TTL)
        return d


def cert_identity(peercert: dict | None) -> Identity | None:
    """CN is the user, each O a group.  getpeercert() returns a subject only
    for a certificate the handshake verified against the client CA."""
    if not peercert:
        return None
    cn, groups = None, []
    for rdn in peercert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName" and cn is None:
                cn = v
            elif k == "organizationName":
                groups.append(v)
    if not cn:
        return None
    return Identity(cn, tuple(groups))


def bearer_token(req: Request) -> str | None:
    h = req.headers.get("Authorization")
    if h is not None:
        scheme, _, token = h.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
        return None
    # The WebSocket form: the token rides in Sec-WebSocket-Protocol; it is
    # taken out so that protocol negotiation never echoes it.
    protos = req.headers.get_all("Sec-WebSocket-Protocol")
    if not protos:
        return None
    offered = [p.strip() for v in protos for p in v.split(",") if p.strip()]
    found = [p for p in offered if p.startswith(WS_TOKEN_PREFIX)]
    if len(found) != 1:
        return None
    enc = found[0][len(WS_TOKEN_PREFIX):]
    try:
        token = base64.urlsafe_b64decode(enc + "=" * (-len(enc) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    req.headers.remove("Sec-WebSocket-Protocol")
    rest = [p for p in offered if p != found[0]]
    if rest:
        req.headers.items.append(("Sec-WebSocket-Protocol", ", ".join(rest)))
    return token or None


# -- the API server's side --------------------------------------------------

def preload() -> None:
    """Load the client's review APIs while files may still be read: the
    kubernetes client imports its API classes on first use, and after the
    drop and the sandbox that import would fail."""
    from kubernetes import client as k8s
    for name in ("AuthenticationV1Api", "AuthorizationV1Api", "V1TokenReview",
                 "V1SubjectAccessReview"):
        getattr(k8s, name)


def kube_reviewers(api: Any) -> tuple[TokenReview, AccessReview]:
    """TokenReview and SubjectAccessReview through the agent's API client.

    Dict bodies and raw JSON answers (_preload_content=False): the review
    bodies are small and fixed, and the typed models would only be
    converted back."""
    from kubernetes import client as k8s   # loaded by preload()
    authn = k8s.AuthenticationV1Api(api)
    authz = k8s.AuthorizationV1Api(api)

    def post(call: Callable, what: str, body: dict) -> dict:
        try:
            resp = call(body, _preload_content=False, _request_timeout=(5, 10))
            data = json.loads(resp.data)
        except Exception as e:      # noqa: BLE001 - any failure is "cannot ask"
            raise ReviewError(f"{what}: {_describe(e)}") from None
        if not isinstance(data, dict) or not isinstance(data.get("status"), dict):
            raise ReviewError(f"{what}: answer without a status")
        return data

    def token_review(token: str) -> Identity | None:
        st = post(authn.create_token_review, "TokenReview",
                  {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                   "spec": {"token": token}})["status"]
        if not st.get("authenticated"):
            return None
        u = st.get("user") or {}
        if not u.get("username"):
            return None
        extra = tuple(sorted((str(k), tuple(map(str, v or ())))
                             for k, v in (u.get("extra") or {}).items()))
        return Identity(str(u["username"]), tuple(map(str, u.get("groups") or ())),
                        str(u.get("uid") or ""), extra)

    def access_review(who: Identity, attrs: dict) -> Decision:
        spec: dict = {"user": who.user, "groups": list(who.groups),
                      "resourceAttributes": attrs}
        if who.uid:
            spec["uid"] = who.uid
        if who.extra:
            spec["extra"] = {k: list(v) for k, v in who.extra}
        st = post(authz.create_subject_access_review, "SubjectAccessReview",
                  {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                   "spec": spec})["status"]
        if st.get("evaluationError") and not st.get("allowed"):
            log.info("node API: authorization evaluation error: %s", st["evaluationError"])
        return Decision(bool(st.get("allowed")) and not st.get("denied"),
                        str(st.get("reason") or ""))

    return token_review, access_review


def _describe(e: Exception) -> str:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None)
    if status:
        return f"{status} {reason or ''}".strip()
    return str(e) or type(e).__name__
