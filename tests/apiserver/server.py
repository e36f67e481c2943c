"""The HTTPS front end: request parsing, authn/authz, verbs, watch streaming.

Runs a ThreadingHTTPServer in a background thread; TLS handshakes happen in
the per-connection thread so a slow client cannot stall the accept loop.
Watches are streamed with chunked transfer encoding, one JSON event per line,
as kube-apiserver does for application/json.
"""
from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from . import csr as csrmod
from . import nodeproxy
from . import patch as patchmod
from . import resources as rt
from .auth import Attributes, User, admit_node, authenticated, forbidden_message
from .errors import (ApiError, bad_request, forbidden, injected, method_not_allowed,
                     path_not_found, unauthorized)
from .selectors import labels_match, fields_match, parse_fields, parse_labels
from .store import Event

if TYPE_CHECKING:
    from . import ApiServer

VERSION = {"major": "1", "minor": "34", "gitVersion": "v1.34.0-pufflet-emulator",
           "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
           "buildDate": "2025-08-27T00:00:00Z", "goVersion": "go1.24.6", "compiler": "gc",
           "platform": "linux/amd64", "emulationMajor": "1", "emulationMinor": "34",
           "minCompatibilityMajor": "1", "minCompatibilityMinor": "33"}


class Request(NamedTuple):
    """One line of ApiServer.request_log."""
    verb: str          # Kubernetes verb: get list watch create update patch delete ...
    path: str
    query: dict[str, str]
    user: str          # "" when unauthenticated
    status: int


class _Info(NamedTuple):
    res: rt.Resource
    namespace: str
    name: str
    subresource: str


def parse_resource_path(path: str) -> tuple[str, str, list[str]] | None:
    """("", "v1", rest) for /api/v1/..., (group, version, rest) for /apis/..."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        return "", parts[1], parts[2:]
    if len(parts) >= 3 and parts[0] == "apis":
        return parts[1], parts[2], parts[3:]
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], api: "ApiServer", ctx: ssl.SSLContext) -> None:
        self.api = api
        self.ctx = ctx
        self.stopping = threading.Event()
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self.conns_lock:
            self.conns.add(request)
        try:
            # As kube-apiserver: Go sets TCP_NODELAY on every TCP
            # connection.  Without it each answer (headers, then body, as
            # separate TLS records) waits ~40 ms for the client's delayed
            # ACK, and every API call costs that much more than it should.
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request.settimeout(30)
            try:
                tls = self.ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
            tls.settimeout(None)
            with self.conns_lock:
                self.conns.add(tls)
            try:
                _Handler(tls, client_address, self)
            finally:
                with self.conns_lock:
                    self.conns.discard(tls)
        finally:
            with self.conns_lock:
                self.conns.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass       # clients vanish mid-watch all the time; nothing to report

    def kill_connections(self) -> None:
        with self.conns_lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = lambda self: self._handle()  # noqa: E731

    # -- plumbing ------------------------------------------------------
    def _send(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, separators=(",", ":")).encode() if not isinstance(body, bytes) else body
        self._record(code)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Audit-Id", str(uuid.uuid4()))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _record(self, status: int) -> None:
        # Logged before the response goes out, so a test that has its answer
        # always finds the request in ApiServer.request_log.
        if not self.logged:
            self.logged = True
            u = self.user
            self.server.api._log(Request(self.verb, self.url_path, self.q,
                                         u.name if u else "", status))

    def _read_raw(self) -> bytes:
        # Always drain the body first: an early error answer must not leave
        # its bytes on a keep-alive connection to be parsed as a request.
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _body(self) -> Any:
        raw = self.raw_body
        if not raw:
            return None
        ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        if "protobuf" in ctype or "cbor" in ctype:
            # client-go falls back to JSON when a server answers 415.
            raise ApiError(415, "UnsupportedMediaType",
                           f'the body of the request was in an unknown format - accepted '
                           f'media types include: application/json, application/yaml')
        if ctype.endswith("yaml"):
            if ctype == patchmod.APPLY:
                raise ApiError(415, "UnsupportedMediaType",
                               "server-side apply is not supported by the pufflet API emulator")
            import yaml
            return yaml.safe_load(raw)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise bad_request(f"error decoding body: {e}") from None

    def _read_chunked(self) -> bytes:
        out = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return out
            out += self.rfile.read(size)
            self.rfile.readline()

    # -- entry point -----------------------------------------------------
    def _handle(self) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        self.multi_q = parse_qs(url.query, keep_blank_values=True)
        q = {k: v[-1] for k, v in self.multi_q.items()}
        self.q = q
        self.verb = self.command.lower()
        self.url_path = url.path
        self.user: User | None = None
        self.logged = False
        try:
            self.raw_body = self._read_raw()
            self.user = user = self._authenticate()
            if user is None:
                raise unauthorized()
            failure = api._take_failure(self.command, url.path)
            if failure:
                raise injected(*failure)
            self._route(url.path, q, user)
        except ApiError as e:
            self._send(e.code, e.status(), e.headers)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self._record(499)          # the client went away (nginx's code for it)
            self.close_connection = True
        except Exception as e:       # a bug in the emulator: answer like kube would
            err = ApiError(500, "InternalError", f"Internal error occurred: {e!r}")
            try:
                self._send(500, err.status())
            except OSError:
                pass
            api._record_bug(e)

    def _authenticate(self) -> User | None:
        api = self.server.api
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            got = api.authn.from_token(auth[7:].strip())
            return authenticated(got[0]) if got else None
        try:
            cert = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        except (AttributeError, ValueError, OSError):
            # stop()/pause() cut the connection while this request was read
            raise ConnectionResetError("connection closed by stop()") from None
        u = api.authn.from_cert(cert)
        return authenticated(u) if u else None

    def _authorize(self, a: Attributes, res: rt.Resource | None = None) -> None:
        ok, why = self.server.api.authz.authorize(a)
        if not ok:
            msg = forbidden_message(a) + (f": {why}" if why else "")
            if res is None:
                raise ApiError(403, "Forbidden", f"forbidden: {msg}", {})
            raise forbidden(res, a.name, msg)

    def _route(self, path: str, q: dict[str, str], user: User) -> int:
        path = path.rstrip("/") or "/"
        parsed = parse_resource_path(path)
        if parsed is None or not parsed[2]:
            # Non-resource requests: discovery, health.
            self._authorize(Attributes(user, self.verb, path=path))
            body = self._discovery(path)
            if body is None:
                raise path_not_found()
            if isinstance(body, bytes):
                self._record(200)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return 200
            self._send(200, body)
            return 200
        group, version, rest = parsed
        namespace = ""
        if rest[0] == "namespaces" and len(rest) > 2 and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        res = rt.lookup(group, version, rest[0])
        if res is None or len(rest) > 3:
            raise path_not_found()
        if res.plural == "namespaces" and len(rest) >= 2:
            namespace = rest[1]
        if namespace and not res.namespaced and res.plural != "namespaces":
            raise path_not_found()
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if sub and sub not in res.subresources:
            raise path_not_found()
        verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update",
                "PATCH": "patch", "DELETE": "delete" if name else "deletecollection"}[self.command]
        if verb == "create" and res.namespaced and not namespace and not sub:
            raise method_not_allowed("")
        if verb == "list" and q.get("watch") in ("true", "1"):
            verb = "watch"
        self.verb = verb
        fields: list[tuple[str, str, str]] = []
        attr_name = name
        if verb in ("list", "watch"):
            for r in parse_fields(q.get("fieldSelector"), res):
                fields.append((r.field, r.op, r.value))
                # RequestInfo takes the name from a metadata.name field selector.
                if r.field == "metadata.name" and r.op == "=" and not name:
                    attr_name = r.value
        a = Attributes(user, verb, res.plural, sub, res.group,
                       namespace if res.namespaced or res.plural == "namespaces" else "",
                       attr_name, path, fields)
        if res.plural == "namespaces":
            a.namespace = name
        self._authorize(a, res)
        if sub and sub not in rt.IMPLEMENTED_SUBRESOURCES:
            raise path_not_found()
        allowed = rt.STATUS_VERBS if sub == "status" else (
            rt.SUBRESOURCE_VERBS.get((res.plural, sub), ()) if sub else res.verbs)
        if verb not in allowed and not (verb == "watch" and "watch" in allowed):
            raise method_not_allowed("")
        info = _Info(res, namespace, name, sub)
        if res.plural == "pods" and sub in nodeproxy.SUBRESOURCES:
            return nodeproxy.proxy(self, info)
        return getattr(self, f"_v_{verb}")(info, user)

    def _discovery(self, path: str) -> Any:
        api = self.server.api
        if path == "/version":
            return VERSION
        if path in ("/healthz", "/livez", "/readyz"):
            return b"ok"
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{api.port}"}]}
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                self._group(g, vs) for g, vs in rt.groups().items()]}
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) == 2:
            return rt.resource_list("", parts[1])
        if parts[:1] == ["apis"] and len(parts) == 2:
            vs = rt.groups().get(parts[1])
            return dict(self._group(parts[1], vs), kind="APIGroup", apiVersion="v1") if vs else None
        if parts[:1] == ["apis"] and len(parts) == 3:
            return rt.resource_list(parts[1], parts[2])
        return None

    @staticmethod
    def _group(g: str, vs: list[str]) -> dict[str, Any]:
        versions = [{"groupVersion": f"{g}/{v}", "version": v} for v in vs]
        return {"name": g, "versions": versions, "preferredVersion": versions[0]}

    # -- verbs -----------------------------------------------------------
    def _v_get(self, info: _Info, user: User) -> int:
        api = self.server.api
        obj = api.store.get(info.res, info.namespace, info.name)
        self._send(200, obj)
        return 200

    def _filter(self, res: rt.Resource) -> Any:
        lreqs = parse_labels(self.q.get("labelSelector"))
        freqs = parse_fields(self.q.get("fieldSelector"), res)
        return lambda o: labels_match(lreqs, o) and fields_match(freqs, o)

    def _v_list(self, info: _Info, user: User) -> int:
        api = self.server.api
        match = self._filter(info.res)
        items, rv = api.store.list(info.res, info.namespace or None, match)
        for o in items:
            o.pop("kind", None)
            o.pop("apiVersion", None)
        meta: dict[str, Any] = {"resourceVersion": rv}
        limit = int(self.q.get("limit") or 0)
        cont = self.q.get("continue")
        if cont:
            try:
                tok = json.loads(base64.urlsafe_b64decode(cont.encode()))
                start, rv = tok["start"], tok["rv"]
                meta["resourceVersion"] = rv
            except Exception:
                raise bad_request("continue key is not valid: illegal base64 data") from None
            items = [o for o in items if self._key(o) > start]
        if limit > 0 and len(items) > limit:
            rest = len(items) - limit
            items = items[:limit]
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(
                {"start": self._key(items[-1]), "rv": meta["resourceVersion"]}).encode()).decode()
            meta["remainingItemCount"] = rest
        self._send(200, {"kind": info.res.kind + "List", "apiVersion": info.res.api_version,
                         "metadata": meta, "items": items})
        return 200

    @staticmethod
    def _key(o: dict[str, Any]) -> str:
        return f'{o["metadata"].get("namespace", "")}/{o["metadata"]["name"]}'

    def _v_watch(self, info: _Info, user: User) -> int:
        api = self.server.api
        store = api.store
        res = info.res
        lreqs = parse_labels(self.q.get("labelSelector"))
        freqs = parse_fields(self.q.get("fieldSelector"), res)
        ns = info.namespace

        def match(o: dict[str, Any] | None) -> bool:
            return (o is not None and (not ns or o["metadata"].get("namespace") == ns)
                    and labels_match(lreqs, o) and fields_match(freqs, o))

        timeout = float(self.q.get("timeoutSeconds") or api.watch_timeout)
        bookmarks = self.q.get("allowWatchBookmarks") in ("true", "1")
        rv_param = self.q.get("resourceVersion", "")
        initial = self.q.get("sendInitialEvents") in ("true", "1")
        self._record(200)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def emit(etype: str, obj: dict[str, Any]) -> None:
            line = json.dumps({"type": etype, "object": obj}, separators=(",", ":")).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()

        def bookmark(rv: int, extra: dict[str, str] | None = None) -> None:
            md: dict[str, Any] = {"resourceVersion": str(rv)}
            if extra:
                md["annotations"] = extra
            emit("BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version, "metadata": md})

        try:
            if rv_param in ("", "0") or initial:
                items, rv = store.list(res, ns or None, match)
                cursor = int(rv)
                for o in items:
                    emit("ADDED", o)
                if initial and bookmarks:
                    bookmark(cursor, {"k8s.io/initial-events-end": "true"})
            else:
                try:
                    cursor = int(rv_param)
                except ValueError:
                    raise bad_request(f'invalid resource version: "{rv_param}"') from None
                store.check_window(cursor)
            deadline = time.monotonic() + timeout
            next_bm = time.monotonic() + api.bookmark_interval
            while not self.server.stopping.is_set():
                now = time.monotonic()
                if now >= deadline:
                    break
                wait = min(deadline - now, 0.2, max(next_bm - now, 0.0) if bookmarks else 0.2)
                events, head = store.wait_events(res.key, cursor, wait)
                for ev in events:
                    out = self._translate(ev, match)
                    if out:
                        emit(*out)
                # wait_events returned every event of this kind up to `head`.
                cursor = max(cursor, head)
                if bookmarks and time.monotonic() >= next_bm:
                    bookmark(cursor)
                    next_bm = time.monotonic() + api.bookmark_interval
        except ApiError as e:
            emit("ERROR", e.status())
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        return 200

    @staticmethod
    def _translate(ev: Event, match: Any) -> tuple[str, dict[str, Any]] | None:
        """Turn a store event into what a filtered watch sees: objects entering
        the selection are ADDED, leaving it DELETED (the watch cache's rule)."""
        now, before = match(ev.obj), match(ev.prev)
        if ev.type == "ADDED":
            return ("ADDED", ev.obj) if now else None
        if ev.type == "DELETED":
            return ("DELETED", ev.obj) if before or now else None
        if now and before:
            return ("MODIFIED", ev.obj)
        if now:
            return ("ADDED", ev.obj)
        if before:
            return ("DELETED", ev.obj)
        return None

    def _dry(self) -> bool:
        return self.q.get("dryRun") == "All"

    def _admit(self, user: User, info: _Info, op: str, name: str) -> Any:
        api = self.server.api

        def admit(old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
            admit_node(user, api.store, info.res, op, info.subresource, info.namespace,
                       name, old, new)
        return admit

    def _v_create(self, info: _Info, user: User) -> int:
        api = self.server.api
        body = self._body()
        if not isinstance(body, dict):
            raise bad_request("the body of the request was empty or not an object")
        res = info.res
        if res.virtual:
            out = api._review(res, body, user)
            self._send(201, out)
            return 201
        if info.subresource:
            return self._create_sub(info, body, user)
        if info.name:
            raise method_not_allowed("")
        md = body.setdefault("metadata", {})
        if res.namespaced and md.get("namespace") and md["namespace"] != info.namespace:
            raise bad_request("the namespace of the provided object does not match the "
                              "namespace sent on the request")
        if res.kind == "CertificateSigningRequest":
            body.setdefault("metadata", {}).setdefault("name", md.get("name") or "")
            if md.get("name") or md.get("generateName"):
                csrmod.validate_create(body)
        admit = self._admit(user, info, "create", md.get("name", ""))
        out = api.store.create(res, body, info.namespace or None, dry_run=self._dry(),
                               user={"username": user.name, "groups": list(user.groups),
                                     "uid": user.uid}, admit=admit)
        if res.kind == "CertificateSigningRequest" and api.auto_approve_csr and not self._dry() \
                and (body.get("spec") or {}).get("signerName") == csrmod.AUTO_APPROVED_SIGNER:
            api.approve_csr(out["metadata"]["name"])
        self._send(201, out)
        return 201

    def _create_sub(self, info: _Info, body: dict[str, Any], user: User) -> int:
        api = self.server.api
        store = api.store
        if (info.res.plural, info.subresource) == ("pods", "binding"):
            target = (body.get("target") or {}).get("name")
            if not target:
                raise bad_request("binding target name is required")
            with store.cond:
                pod = store.get("pods", info.namespace, info.name)
                if pod["spec"].get("nodeName"):
                    raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on pods/binding '
                                   f'"{info.name}": pod {info.name} is already assigned to node '
                                   f'"{pod["spec"]["nodeName"]}"', {"name": info.name, "kind": "pods/binding"})
                pod["spec"]["nodeName"] = target
                pod["status"].setdefault("conditions", [])
                store.update("pods", pod)
            self._send(201, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                             "status": "Success", "code": 201})
            return 201
        if (info.res.plural, info.subresource) == ("pods", "eviction"):
            pod = store.get("pods", info.namespace, info.name)
            self._admit(user, info, "create", info.name)(pod, body)
            store.delete("pods", info.namespace, info.name,
                         grace_period=(body.get("deleteOptions") or {}).get("gracePeriodSeconds"))
            self._send(201, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                             "status": "Success", "code": 201})
            return 201
        if (info.res.plural, info.subresource) == ("serviceaccounts", "token"):
            sa = store.get("serviceaccounts", info.namespace, info.name)
            self._admit(user, info, "create", info.name)(None, body)
            spec = body.get("spec") or {}
            seconds = int(spec.get("expirationSeconds") or 3600)
            if seconds < 600:
                raise ApiError(422, "Invalid", f'TokenRequest.authentication.k8s.io "{info.name}" is '
                               f'invalid: spec.expirationSeconds: Invalid value: {seconds}: may not '
                               f'specify a duration less than 10 minutes')
            pod = None
            ref = spec.get("boundObjectRef")
            if ref:
                if ref.get("kind") != "Pod":
                    raise bad_request(f"cannot bind token to object of type {ref.get('kind')}")
                pod = store.get("pods", info.namespace, ref.get("name", ""))
                if ref.get("uid") and ref["uid"] != pod["metadata"]["uid"]:
                    raise ApiError(409, "Conflict", "the UID in the bound object reference does "
                                   "not match the object")
            auds = spec.get("audiences") or [api.audience]
            headers = None
            if api.token_duration and seconds > api.token_duration:
                # kube-apiserver's maxExpirationSeconds: shortened, with a warning
                headers = {"Warning": f'299 - "requested expiration of {seconds} seconds '
                                      f'shortened to {api.token_duration} seconds"'}
                seconds = api.token_duration
            token, exp = api.authn.issue_sa_token(info.namespace, sa, seconds, auds, pod)
            out = {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                   "metadata": {"name": info.name, "namespace": info.namespace,
                                "creationTimestamp": None},
                   "spec": {"audiences": auds, "expirationSeconds": seconds,
                            "boundObjectRef": ref},
                   "status": {"token": token, "expirationTimestamp": exp}}
            self._send(201, out, headers)
            return 201
        raise method_not_allowed("")

    def _v_update(self, info: _Info, user: User) -> int:
        api = self.server.api
        body = self._body()
        if not isinstance(body, dict):
            raise bad_request("the body of the request was empty or not an object")
        md = body.setdefault("metadata", {})
        if md.get("name") and md["name"] != info.name:
            raise bad_request(f"the name of the object ({md['name']}) does not match the name "
                              f"on the URL ({info.name})")
        if info.res.namespaced and md.get("namespace") and md["namespace"] != info.namespace:
            raise bad_request("the namespace of the provided object does not match the "
                              "namespace sent on the request")
        md["name"] = info.name
        out = self._write(info, user, body, "update")
        self._send(200, out)
        return 200

    def _write(self, info: _Info, user: User, obj: dict[str, Any], op: str) -> dict[str, Any]:
        api = self.server.api
        sub = info.subresource
        if info.res.kind == "Namespace" and sub == "finalize":
            sub = ""
        out = api.store.update(info.res, obj, subresource=sub, namespace=info.namespace or None,
                               dry_run=self._dry(), admit=self._admit(user, info, "update", info.name))
        if info.res.kind == "CertificateSigningRequest" and sub == "approval" and not self._dry():
            signed = csrmod.sign_if_approved(api.store, api.ca, info.name, api.csr_duration)
            if signed is not None and api.return_signed_csr:
                out = signed
        return out

    def _v_patch(self, info: _Info, user: User) -> int:
        api = self.server.api
        body = self._body()
        ctype = self.headers.get("Content-Type", "")
        with api.store.cond:        # read-patch-write atomically, like GuaranteedUpdate
            live = api.store.get(info.res, info.namespace, info.name)
            patched = patchmod.apply(ctype, live, body)
            if not isinstance(patched, dict):
                raise bad_request("patch did not produce an object")
            patched.setdefault("metadata", {})["name"] = info.name
            out = self._write(info, user, patched, "update")
        self._send(200, out)
        return 200

    def _delete_options(self) -> tuple[int | None, dict[str, Any]]:
        body = self._body() or {}
        grace = body.get("gracePeriodSeconds")
        if "gracePeriodSeconds" in self.q:
            grace = int(self.q["gracePeriodSeconds"])
        if body.get("dryRun") == ["All"]:
            self.q["dryRun"] = "All"
        return grace, body.get("preconditions") or {}

    def _v_delete(self, info: _Info, user: User) -> int:
        api = self.server.api
        grace, pre = self._delete_options()
        res = info.res
        with api.store.cond:
            old = api.store.get(res, info.namespace, info.name)
            self._admit(user, info, "delete", info.name)(old, None)
            obj, removed = api.store.delete(res, info.namespace, info.name, grace_period=grace,
                                            preconditions=pre, dry_run=self._dry())
        if removed and res.kind not in ("Pod", "Namespace"):
            self._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                             "status": "Success", "details": {
                                 "name": info.name, **({"group": res.group} if res.group else {}),
                                 "kind": res.plural, "uid": obj["metadata"]["uid"]}})
        else:
            self._send(200, obj)
        return 200

    def _v_deletecollection(self, info: _Info, user: User) -> int:
        api = self.server.api
        grace, pre = self._delete_options()
        items, rv = api.store.list(info.res, info.namespace or None, self._filter(info.res))
        out = []
        for o in items:
            md = o["metadata"]
            try:
                obj, _ = api.store.delete(info.res, md.get("namespace", ""), md["name"],
                                          grace_period=grace, dry_run=self._dry())
                obj.pop("kind", None)
                obj.pop("apiVersion", None)
                out.append(obj)
            except ApiError:
                pass
        self._send(200, {"kind": info.res.kind + "List", "apiVersion": info.res.api_version,
                         "metadata": {"resourceVersion": rv}, "items": out})
        return 200
