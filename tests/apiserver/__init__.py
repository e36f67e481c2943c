"""A kube-apiserver emulator for pufflet's tests: real HTTPS, real client certs,
the real `kubernetes` Python client on the other end.

    api = ApiServer(tmpdir); api.start()
    client = kubernetes.config.new_client_from_config(config_file=str(api.kubeconfig("admin")))
    ...
    api.stop()

What it reproduces (faithfully, for what it implements) and what it does not
is listed in README.md next to this file; the short version:

Reproduced: discovery; CRUD with uid/creationTimestamp/global resourceVersion/
generation; 404/409 AlreadyExists/409 Conflict/422 Invalid/403/401 as Status
objects worded like the real server; no-op updates are not written; status
subresource isolation (pods, nodes, CSRs, services, PVCs, namespaces); pod
defaulting incl. ServiceAccount admission (projected kube-api-access volume)
and DefaultTolerationSeconds; pod spec immutability; Time/MicroTime
normalisation; list (limit/continue), label and field selectors; watch from a
resourceVersion, 410 Expired outside the retained window, bookmarks,
timeoutSeconds, ADDED/DELETED when objects enter/leave a selector; merge,
strategic-merge (Go struct-tag merge keys) and JSON patch; graceful pod
deletion and finalizers; client-cert and bearer-token authn; the Node
authorizer (AuthorizeNodeWithSelectors) and NodeRestriction; TokenRequest,
TokenReview, SubjectAccessReview; CSR approval and signing with openssl.

Not reproduced: server-side apply and managedFields, protobuf/CBOR,
schema pruning of unknown fields, field validation warnings, garbage
collection and propagationPolicy, namespace termination phases (contents are
deleted at once), controllers (no scheduler, no node lifecycle), RBAC objects
(tests use allow()/deny()), aggregated discovery, OpenAPI documents,
the proxy subresources, WebSocket-to-SPDY translation of exec/attach/
port-forward (pods/log, exec, attach and portforward are relayed to the
node as they come: nodeproxy.py), watch-list consistency of continue
tokens, priority-and-fairness.
"""
from __future__ import annotations

import re
import threading
import traceback
from pathlib import Path
from typing import Any

import yaml

from . import csr as csrmod
from .auth import API_AUDIENCE, Authenticator, Authorizer, Attributes, Rule, User
from .errors import ApiError
from .pki import CA
from .resources import Resource, by_key
from .server import Request, _Server
from .store import Store

__all__ = ["ApiServer", "ApiError", "Request", "Store"]

BOOTSTRAP_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


class ApiServer:
    """The emulator. Use as a context manager or start()/stop()."""

    def __init__(self, directory: str | Path, *, port: int = 0, watch_window: int = 1000,
                 bookmark_interval: float = 1.0, watch_timeout: float = 1800.0,
                 auto_approve_csr: bool = False, csr_duration: int | None = None,
                 token_duration: int | None = None, ca_dir: str | Path | None = None) -> None:
        """directory: where the PKI and kubeconfigs go (the CA is reused if
        present; pass ca_dir to share one CA between several emulators).
        csr_duration: cap in seconds on signed certificates (the real minimum of
        600 s on spec.expirationSeconds still applies to what clients ask for).
        auto_approve_csr: approve node client CSRs as kube-controller-manager
        does (signer kube-apiserver-client-kubelet only; kubelet-serving CSRs
        wait for approve_csr, as for an admin's kubectl certificate approve).
        token_duration: cap in seconds on TokenRequest-issued tokens, as
        kube-apiserver's --service-account-max-token-expiration (which must
        be at least an hour there; any value here, so that tests can watch
        tokens expire): the answer's spec.expirationSeconds and expiry are
        shortened to it, with a Warning header; the real minimum of 600 s on
        what clients ask for still applies."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = CA(Path(ca_dir) if ca_dir else self.dir / "pki")
        self.server_key, self.server_cert = self.ca.issue("apiserver", "kube-apiserver", server=True)
        self.store = Store(watch_window)
        self.store.ca_pem = self.ca.pem
        self.authn = Authenticator(self.store)
        self.authz = Authorizer(self.store)
        self.audience = API_AUDIENCE
        self.bookmark_interval = bookmark_interval
        self.watch_timeout = watch_timeout
        self.auto_approve_csr = auto_approve_csr
        self.csr_duration = csr_duration
        self.token_duration = token_duration
        self.return_signed_csr = False
        # pods/log, exec, attach, portforward go to the node (nodeproxy.py)
        # as kube-apiserver-kubelet-client, like kubeadm's apiserver.
        self.kubelet_client_cert = self.ca.issue("apiserver-kubelet-client",
                                                 "kube-apiserver-kubelet-client",
                                                 ["kubeadm:cluster-admins"])
        self.kubelet_ca: Path | None = None          # --kubelet-certificate-authority
        # --kubelet-preferred-address-types, as clusters usually set it.
        self.kubelet_address_types = ("InternalIP", "ExternalIP", "Hostname")
        self.request_log: list[Request] = []
        self.bugs: list[str] = []              # emulator exceptions (tests should assert empty)
        self.port = port
        self._failures: list[list[Any]] = []   # [count, code, method, path regex]
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        for ns in BOOTSTRAP_NAMESPACES:
            self.store.create("namespaces", {"metadata": {"name": ns}})

    # -- lifecycle -------------------------------------------------------
    def start(self) -> "ApiServer":
        """Listen on 127.0.0.1 (the same port again after stop() or pause())."""
        import ssl
        if self._httpd is not None:
            return self
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        ctx.load_verify_locations(cafile=str(self.ca.cert))
        ctx.verify_mode = ssl.CERT_OPTIONAL
        self._httpd = _Server(("127.0.0.1", self.port), self, ctx)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"apiserver-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (watches included)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.stopping.set()
        self.store.wake_all()
        httpd.shutdown()
        httpd.server_close()
        httpd.kill_connections()
        if self._thread:
            self._thread.join(timeout=5)

    pause = stop          # an outage: connection refused until resume()
    resume = start

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # -- credentials -----------------------------------------------------
    def kubeconfig(self, user: str | None = "admin", groups: list[str] | tuple[str, ...] | None = None,
                   *, token: str | None = None, path: str | Path | None = None) -> Path:
        """Write a kubeconfig and return its path.

        "admin": client cert CN=admin, O=system:masters.
        "system:node:<n>": client cert CN=system:node:<n>, O=system:nodes.
        any other name: client cert CN=<user>, O=<groups>; or with token=...
        a bearer token registered for that user.  user=None: no credentials.
        """
        if user == "admin" and groups is None:
            groups = ["system:masters"]
        if user and user.startswith("system:node:") and groups is None:
            groups = ["system:nodes"]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", user or "anonymous")
        entry: dict[str, Any] = {}
        if token is not None:
            if self.authn.from_token(token) is None:     # keep TokenRequest-issued tokens
                self.add_token(token, user or "", groups or ())
            entry["token"] = token
        elif user:
            tag = safe + ("-" + "-".join(re.sub(r"[^A-Za-z0-9_.-]", "_", g) for g in groups)
                          if groups else "")
            key, crt = self.ca.issue(f"user-{tag}", user, list(groups or ()))
            entry = {"client-certificate": str(crt), "client-key": str(key)}
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "emulator",
               "clusters": [{"name": "emulator", "cluster": {
                   "server": self.url, "certificate-authority": str(self.ca.cert)}}],
               "users": [{"name": safe, "user": entry}],
               "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": safe}}]}
        out = Path(path) if path else self.dir / f"kubeconfig-{safe}{'-token' if token else ''}"
        out.write_text(yaml.safe_dump(cfg))
        return out

    def add_token(self, token: str, user: str, groups: list[str] | tuple[str, ...] = ()) -> None:
        """Accept `Authorization: Bearer <token>` as this user."""
        self.authn.add_token(token, user, tuple(groups))

    # -- authorization hooks -----------------------------------------------
    def allow(self, subject: str, verb: str = "*", resource: str = "*", *, group: str = "*",
              namespace: str = "*", name: str = "*") -> None:
        """Grant (like an RBAC binding). subject: a user or "group:<name>";
        resource may carry a subresource: "nodes/proxy"."""
        self.authz.rules.append(Rule(subject, verb, resource, group, namespace, name, True))

    def deny(self, subject: str, verb: str = "*", resource: str = "*", *, group: str = "*",
             namespace: str = "*", name: str = "*") -> None:
        """Refuse, overriding allow() rules and the Node authorizer."""
        self.authz.rules.append(Rule(subject, verb, resource, group, namespace, name, False))

    # -- fault injection ---------------------------------------------------
    def fail_next(self, n: int = 1, code: int = 500, *, method: str | None = None,
                  path: str | None = None, retry_after: int | None = -1) -> None:
        """Answer the next n matching requests with `code`, as a Status.

        method: HTTP method; path: regex searched in the URL path.
        retry_after: seconds for a Retry-After header, None for none; the
        default gives 429 "Retry-After: 1" like priority-and-fairness, and
        other codes none.  Beware: urllib3 (under the python client) silently
        retries GETs answered 429/503 *with* Retry-After, up to 3 times.
        """
        if retry_after == -1:
            retry_after = 1 if code == 429 else None
        with self._lock:
            self._failures.append([n, code, method, re.compile(path) if path else None,
                                   retry_after])

    def _take_failure(self, method: str, path: str) -> tuple[int, int | None] | None:
        with self._lock:
            for f in self._failures:
                if f[0] > 0 and (f[2] is None or f[2] == method) and (f[3] is None or f[3].search(path)):
                    f[0] -= 1
                    return f[1], f[4]
        return None

    def _log(self, r: Request) -> None:
        with self._lock:
            self.request_log.append(r)

    def _record_bug(self, e: BaseException) -> None:
        self.bugs.append("".join(traceback.format_exception(e)))

    # -- cluster-side helpers ---------------------------------------------
    def compact(self) -> None:
        """Drop watch history: watches from older resourceVersions get 410."""
        self.store.compact()

    def approve_csr(self, name: str) -> dict[str, Any]:
        """Approve (as an admin would) and sign (as the controller would)."""
        csrmod.set_approval(self.store, name, True)
        return csrmod.sign_if_approved(self.store, self.ca, name, self.csr_duration) or {}

    def deny_csr(self, name: str) -> dict[str, Any]:
        return csrmod.set_approval(self.store, name, False)

    def can(self, user: str, groups: list[str] | tuple[str, ...], verb: str, resource: str,
            *, subresource: str = "", group: str = "", namespace: str = "", name: str = "") -> bool:
        """The authorizer's answer, without admission (what a SAR returns)."""
        ok, _ = self.authz.authorize(Attributes(User(user, tuple(groups)), verb, resource,
                                                subresource, group, namespace, name))
        return ok

    def _review(self, res: Resource, body: dict[str, Any], user: User) -> dict[str, Any]:
        """Answer TokenReview / SubjectAccessReview / SelfSubjectAccessReview."""
        spec = body.get("spec") or {}
        out = {"kind": res.kind, "apiVersion": res.api_version,
               "metadata": {"creationTimestamp": None, **(body.get("metadata") or {})},
               "spec": spec}
        if res.kind == "TokenReview":
            got = self.authn.from_token(spec.get("token", ""), spec.get("audiences") or None)
            if got is None:
                out["status"] = {"authenticated": False, "user": {},
                                 "error": "[invalid bearer token, token lookup failed]"}
            else:
                u, auds = got
                u = User(u.name, u.groups + ("system:authenticated",), u.uid, u.extra)
                out["status"] = {"authenticated": True, "user": u.info(), "audiences": auds}
            return out
        if res.kind == "SelfSubjectAccessReview":
            subject = user
        else:
            if not spec.get("user") and not spec.get("groups"):
                raise ApiError(422, "Invalid", f'{res.kind}.authorization.k8s.io "" is invalid: '
                               f'spec.user: Invalid value: "": at least one of user or group must be specified')
            subject = User(spec.get("user", ""), tuple(spec.get("groups") or ()), spec.get("uid", ""))
        ra, nra = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
        if ra:
            a = Attributes(subject, ra.get("verb", ""), ra.get("resource", ""),
                           ra.get("subresource", ""), ra.get("group", ""),
                           ra.get("namespace", ""), ra.get("name", ""))
            fs = (ra.get("fieldSelector") or {}).get("rawSelector")
            if fs and a.resource:
                try:
                    from .selectors import parse_fields
                    a.fields = [(r.field, r.op, r.value) for r in parse_fields(fs, by_key(a.resource))]
                except (ApiError, KeyError):
                    pass
        elif nra:
            a = Attributes(subject, nra.get("verb", ""), path=nra.get("path", ""))
        else:
            raise ApiError(422, "Invalid", f'{res.kind}.authorization.k8s.io "" is invalid: '
                           "spec.resourceAttributes: Invalid value: \"null\": exactly one of "
                           "nonResourceAttributes or resourceAttributes must be specified")
        ok, why = self.authz.authorize(a)
        out["status"] = {"allowed": ok, **({"reason": why} if why else {})}
        return out
