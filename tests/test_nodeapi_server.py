"""The node API server: real TLS, TokenReview and SubjectAccessReview against
the emulator (tests/apiserver), kubectl-logs semantics on files written by
the real LogWriter.  Only the pod metadata is a stub (pod_lookup)."""

from __future__ import annotations

import datetime
import http.client
import json
import os
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from apiserver import ApiServer
from apiserver.pki import CA
from pufflet import config
from pufflet.agent import kube
from pufflet.logs import LogWriter, container_log_dir
from pufflet.nodeapi import app, auth, logs, tls
from pufflet.nodeapi.pods import ContainerInfo, PodInfo
from pufflet.nodeapi.server import Headers, HTTPError, Request

NODE = "n1"
UID = "0f0e0d0c-0b0a-0908-0706-050403020100"
T0 = 1_700_000_000.0        # the logs' clock


# -- fixtures ------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(tmp_path_factory):
    a = ApiServer(tmp_path_factory.mktemp("api"))
    a.start()
    yield a
    a.stop()


@pytest.fixture(scope="module")
def certs(api, tmp_path_factory):
    """Client credentials: the cluster CA's, another CA's, an expired one."""
    other = CA(tmp_path_factory.mktemp("other"), cn="other")
    return {
        "admin": api.ca.issue("nodeapi-admin", "kube-apiserver-kubelet-client",
                              ["system:masters"]),
        "alice": api.ca.issue("nodeapi-alice", "alice", ["devs"]),
        "stats": api.ca.issue("nodeapi-stats", "scraper", []),
        "wrong": other.issue("wrong", "kube-apiserver-kubelet-client", ["system:masters"]),
        "expired": api.ca.issue("nodeapi-expired", "kube-apiserver-kubelet-client",
                                ["system:masters"], seconds=-100),
        "server": api.ca.issue("nodeapi-server", NODE, server=True),
    }


class Pods:
    """The pod manager's side, as a stub: one pod, container 'app'."""

    def __init__(self) -> None:
        self.info = PodInfo("default", "web", UID,
                            {"app": ContainerInfo("app", 1, True),
                             "init": ContainerInfo("init", None, False, "PodInitializing")})

    def lookup(self, ns: str, name: str) -> PodInfo | None:
        return self.info if (ns, name) == ("default", "web") else None

    def listing(self) -> list[dict]:
        return [{"metadata": {"name": "web", "namespace": "default", "uid": UID},
                 "status": {"phase": "Running"}}]


@pytest.fixture(scope="module")
def node(api, certs, tmp_path_factory):
    """The server as agent/main.py builds it, speaking to the emulator as
    system:node:n1."""
    d = tmp_path_factory.mktemp("node")
    cfg = config.parse(f'node name {NODE}\nlog directory "{d}/log"\n'
                       f'tls client ca "{api.ca.cert}"\n')
    os.makedirs(app.pods_log_root(cfg))
    access = kube.load_kubeconfig(str(api.kubeconfig(f"system:node:{NODE}")))
    gate = app.gate(cfg, kube.api_client(access))
    key, crt = certs["server"]
    ctx = tls.context(str(crt), str(key), api.ca.pem)
    pods = Pods()
    s = app.build(cfg, ctx, gate, pods.lookup, pods.listing)
    # Extra routes with no handler of their own here, to see the gate's
    # subresource mapping (their real handlers come from other modules).
    for method, path in (("GET", "/stats/summary"), ("GET", "/metrics/resource"),
                         ("GET", "/metrics"), ("GET", "/logs/messages"), ("GET", "/spec/"),
                         ("POST", "/exec/default/web/app"), ("GET", "/exec/default/web/app"),
                         ("POST", "/portForward/default/web"), ("POST", "/run/default/web/app")):
        s.add_route(method, path, auth.subresource_for(path),
                    lambda req, m: req.send(200, "routed"))
    s.listen("127.0.0.1", 0)
    s.start()
    s.cfg, s.pods, s.gate_ = cfg, pods, gate
    yield s
    s.close()


def connect(node, api, cert=None, token=None, timeout=10.0):
    ctx = ssl.create_default_context(cafile=str(api.ca.cert))
    if cert is not None:
        key, crt = cert
        ctx.load_cert_chain(str(crt), str(key))
    port = node._listener.getsockname()[1]
    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
    c.token = token
    return c


def get(node, api, path, cert=None, token=None, method="GET"):
    c = connect(node, api, cert, token)
    try:
        c.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
        r = c.getresponse()
        return r.status, r.read(), r
    finally:
        c.close()


def sar_count(api) -> int:
    return sum(1 for r in api.request_log if r.path.endswith("/subjectaccessreviews"))


def token_reviews(api) -> int:
    return sum(1 for r in api.request_log if r.path.endswith("/tokenreviews"))


# -- authentication --------------------------------------------------------------

def test_no_credentials_is_401(node, api):
    status, body, r = get(node, api, "/healthz")
    assert (status, body) == (401, b"Unauthorized\n")
    # Unknown paths too: nothing is said before the caller is known.
    assert get(node, api, "/nope")[0] == 401


def test_healthz_with_a_client_certificate(node, api, certs):
    assert get(node, api, "/healthz", certs["admin"])[:2] == (200, b"ok")


@pytest.mark.parametrize("which,alert", [("wrong", "TLSV1_ALERT_UNKNOWN_CA"),
                                         ("expired", "SSLV3_ALERT_CERTIFICATE_EXPIRED")])
def test_bad_client_certificates_are_refused(node, api, certs, which, alert):
    """A certificate that is offered and does not verify fails the
    handshake with the alert that says why; it never falls back to an
    anonymous request."""
    n = sar_count(api)
    key, crt = certs[which]
    port = node._listener.getsockname()[1]
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ssl.create_default_context(cafile=str(api.ca.cert))
        ctx.load_cert_chain(str(crt), str(key))
        ctx.minimum_version = ctx.maximum_version = version
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            if version == ssl.TLSVersion.TLSv1_2:
                # The server's verdict comes before the handshake ends.
                with pytest.raises(ssl.SSLError) as e:
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1")
                assert e.value.reason == alert
                continue
            # TLS 1.3: the client is done first and learns it at its next
            # read or write (the alert, or EOF if the write comes later).
            with pytest.raises((ssl.SSLError, ConnectionError)):
                t = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
                t.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                got = t.recv(4096)
                assert not got, f"answered: {got[:40]!r}"
                raise ConnectionError("closed without an answer")
    assert sar_count(api) == n
    # The same client with a good certificate gets in.
    assert get(node, api, "/healthz", certs["admin"])[0] == 200


def test_forbidden_by_subject_access_review(node, api, certs):
    status, body, _ = get(node, api, "/healthz", certs["alice"])
    assert status == 403
    assert body == b"Forbidden (user=alice, verb=get, resource=nodes, subresource=proxy)\n"


def test_tokens(node, api):
    assert get(node, api, "/healthz", token="no-such-token")[0] == 401
    api.add_token("tok-bob", "bob", ["devs"])
    assert get(node, api, "/healthz", token="tok-bob")[0] == 403
    api.allow("bob", "get", "nodes/proxy")
    node.gate_.decisions = auth.TTLCache()     # the 403 above is cached for 30 s
    assert get(node, api, "/healthz", token="tok-bob")[:2] == (200, b"ok")


def test_token_over_websocket_protocol():
    import base64
    enc = base64.urlsafe_b64encode(b"s3cret").decode().rstrip("=")
    req = Request.__new__(Request)
    req.headers = Headers([("Sec-WebSocket-Protocol",
                            f"v5.channel.k8s.io, {auth.WS_TOKEN_PREFIX}{enc}")])
    assert auth.bearer_token(req) == "s3cret"
    # Taken out: negotiation must never echo the token back.
    assert req.headers.get_all("Sec-WebSocket-Protocol") == ["v5.channel.k8s.io"]


def test_decisions_and_tokens_are_cached(node, api, certs):
    api.add_token("tok-carol", "carol", [])
    api.allow("carol", "get", "nodes/stats")
    n, t = sar_count(api), token_reviews(api)
    for _ in range(3):
        assert get(node, api, "/stats/summary", token="tok-carol")[0] == 200
        assert get(node, api, "/metrics/resource", token="tok-carol")[0] == 403
    assert sar_count(api) - n == 2          # one allow, one deny, each cached
    assert token_reviews(api) - t == 1
    for _ in range(3):
        assert get(node, api, "/healthz", token="tok-nobody")[0] == 401
    assert token_reviews(api) - t == 2      # the refusal is cached too


class _Peer:
    def __init__(self, cert: dict | None) -> None:
        self.cert = cert

    def getpeercert(self) -> dict | None:
        return self.cert


def _request(method: str = "GET", token: str | None = None, cert: dict | None = None) -> Request:
    req = Request.__new__(Request)
    req.method = method
    req.headers = Headers([("Authorization", f"Bearer {token}")] if token else [])
    req._conn = type("C", (), {"sock": _Peer(cert)})()
    return req


def test_gate_cache_lifetimes_and_errors():
    """Decisions allowed are kept 5 minutes, denials 30 s, tokens 2 min
    (refused ones 10 s), as the kubelet's webhook caches; errors of the
    API server are never kept, and refuse (500 for authorization, 401 for
    a token that cannot be checked)."""
    now = [0.0]
    clock = lambda: now[0]      # noqa: E731
    calls = {"sar": 0, "tr": 0}
    answer = {"allowed": True, "error": False}

    def access_review(who, attrs):
        calls["sar"] += 1
        assert attrs == {"verb": "get", "resource": "nodes", "subresource": "stats",
                         "name": NODE, "version": "v1", "group": ""}
        if answer["error"]:
            raise auth.ReviewError("API server down")
        return auth.Decision(answer["allowed"])

    def token_review(token):
        calls["tr"] += 1
        if answer["error"]:
            raise auth.ReviewError("API server down")
        return auth.Identity("bob", ("devs",)) if token == "good" else None
    g = auth.Gate(NODE, token_review, access_review, tokens=auth.TTLCache(clock=clock),
                  decisions=auth.TTLCache(clock=clock))

    def status(token="good"):
        try:
            g.check(_request(token=token), "stats")
        except HTTPError as e:
            return e.status
        return 200
    assert status() == 200 and calls == {"sar": 1, "tr": 1}
    now[0] = 119.0
    assert status() == 200 and calls == {"sar": 1, "tr": 1}     # both cached
    now[0] = 121.0
    assert status() == 200 and calls == {"sar": 1, "tr": 2}     # token asked again
    now[0] = 299.0
    assert status() == 200 and calls["sar"] == 1
    answer["allowed"] = False
    now[0] = 301.0
    assert status() == 403 and calls["sar"] == 2                # allow expired at 300 s
    now[0] = 330.0
    assert status() == 403 and calls["sar"] == 2                # deny kept 30 s
    answer["allowed"] = True
    now[0] = 332.0
    assert status() == 200 and calls["sar"] == 3
    # a refused token: kept 10 s
    assert status("bad") == 401 and calls["tr"] == 4
    now[0] = 341.0
    assert status("bad") == 401 and calls["tr"] == 4
    now[0] = 343.0
    assert status("bad") == 401 and calls["tr"] == 5
    # the API server fails: refused, and nothing cached
    answer["error"] = True
    g.decisions = auth.TTLCache(clock=clock)
    assert status() == 500 and status() == 500 and calls["sar"] == 5
    assert status("other") == 401 and status("other") == 401 and calls["tr"] == 7
    # a verified client certificate needs no token review
    answer["error"] = False
    cert = {"subject": ((("organizationName", "system:masters"),),
                        (("commonName", "admin"),))}
    req = _request(cert=cert)
    g.check(req, "stats")
    assert (req.user, req.groups, calls["tr"]) == ("admin", ("system:masters",), 7)
    # no credentials at all: 401 before any review
    with pytest.raises(HTTPError) as e:
        g.check(_request(), "stats")
    assert e.value.status == 401 and calls["sar"] == 6


def test_access_review_names_this_node(node, api, certs):
    """The SubjectAccessReview is about this node: a grant on another
    node's stats does not open ours."""
    api.allow("scraper", "get", "nodes/stats", name="other-node")
    assert get(node, api, "/stats/summary", certs["stats"])[0] == 403
    api.allow("scraper", "get", "nodes/stats", name=NODE)
    node.gate_.decisions = auth.TTLCache()      # the 403 is cached for 30 s
    assert get(node, api, "/stats/summary", certs["stats"])[0] == 200
    # and about that subresource only
    assert get(node, api, "/metrics/resource", certs["stats"])[0] == 403


def test_cache_expiry():
    now = [0.0]
    c = auth.TTLCache(size=2, clock=lambda: now[0])
    c.put("a", 1, auth.DENY_TTL)
    c.put("b", 2, auth.ALLOW_TTL)
    now[0] = auth.DENY_TTL + 1
    assert (c.get("a"), c.get("b")) == (None, 2)
    c.put("c", 3, 10)
    c.put("d", 4, 10)       # over size: the least recently used goes
    assert c.get("b") is None and c.get("d") == 4


@pytest.mark.parametrize("method,path,sub,verb", [
    ("GET", "/stats/summary", "stats", "get"),
    ("GET", "/metrics/resource", "metrics", "get"),
    ("GET", "/metrics", "metrics", "get"),
    ("GET", "/logs/messages", "log", "get"),
    ("GET", "/spec/", "spec", "get"),
    ("GET", "/pods", "proxy", "get"),
    ("GET", "/healthz", "proxy", "get"),
    ("GET", "/containerLogs/default/web/app", "proxy", "get"),
    ("POST", "/exec/default/web/app", "proxy", "create"),
    ("GET", "/exec/default/web/app", "proxy", "get"),
    ("POST", "/portForward/default/web", "proxy", "create"),
    ("POST", "/attach/default/web/app", "proxy", "create"),
    ("POST", "/run/default/web/app", "proxy", "create"),
])
def test_subresource_mapping(node, api, certs, method, path, sub, verb):
    assert auth.subresource_for(path.rstrip("/") or "/") == sub
    status, body, _ = get(node, api, path, certs["alice"], method=method)
    assert status == 403
    assert body.decode() == (f"Forbidden (user=alice, verb={verb}, resource=nodes, "
                             f"subresource={sub})\n")


def test_open_gate_lets_anyone_in(caplog):
    cfg = config.parse(f"node name {NODE}\nnode api authentication none\n")
    with caplog.at_level("WARNING"):
        g = app.gate(cfg, None)
    assert "AUTHENTICATION IS OFF" in caplog.text
    req = Request.__new__(Request)
    g.check(req, "proxy")
    assert req.user == "system:anonymous"


def test_no_api_server_authorizes_nothing():
    g = auth.Gate(NODE)
    assert not g.authorize(auth.Identity("x"), {}).allowed


# -- /pods, errors ---------------------------------------------------------------

def test_pods(node, api, certs):
    status, body, r = get(node, api, "/pods", certs["admin"])
    assert status == 200 and r.getheader("Content-Type") == "application/json"
    doc = json.loads(body)
    assert doc["kind"] == "PodList" and doc["apiVersion"] == "v1"
    assert [p["metadata"]["name"] for p in doc["items"]] == ["web"]


def test_unknown_path_and_method(node, api, certs):
    assert get(node, api, "/nope", certs["admin"])[0] == 404
    assert get(node, api, "/healthz", certs["admin"], method="DELETE")[0] == 405


def test_oversized_headers_are_refused(node, api):
    port = node._listener.getsockname()[1]
    ctx = ssl.create_default_context(cafile=str(api.ca.cert))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            try:
                s.sendall(b"GET /healthz HTTP/1.1\r\n" + b"X-A: " + b"a" * 100_000 + b"\r\n")
            except OSError:
                pass        # answered and closed before we were done: fine
            assert s.recv(100).startswith(b"HTTP/1.1 431 ")


def test_keep_alive(node, api, certs):
    c = connect(node, api, certs["admin"])
    for _ in range(3):
        c.request("GET", "/healthz")
        r = c.getresponse()
        assert (r.status, r.read()) == (200, b"ok")
    # Nagle off on the server's end, as Go servers have it: with it on,
    # each answer (head, then body) waited ~40 ms for a delayed ACK.
    with node._lock:
        socks = list(node._conns.values())
    assert socks and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)
    c.close()


# -- logs --------------------------------------------------------------------------

def log_dir(node, container="app") -> str:
    return container_log_dir(app.pods_log_root(node.cfg), "default", "web", UID, container)


@pytest.fixture
def written(node):
    """Restart 0 (the previous run) and restart 1 (the current one), ten
    lines each, one second apart, the second run's in two files."""
    d = log_dir(node)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    w0 = LogWriter(d, 0)
    for i in range(3):
        w0.feed("stdout", b"old %d\n" % i, now=T0 - 100 + i)
    w0.close()
    w1 = LogWriter(d, 1)
    for i in range(10):
        if i == 5:
            w1.rotate(now=T0 + i)
        w1.feed("stderr" if i % 2 else "stdout", b"line %d\n" % i, now=T0 + i)
    w1.close()
    node.pods.info = PodInfo("default", "web", UID,
                             {"app": ContainerInfo("app", 1, False),
                              "init": ContainerInfo("init", None, False, "PodInitializing")})
    return d


def logs_of(node, api, certs, query=""):
    status, body, r = get(node, api, "/containerLogs/default/web/app" + query, certs["admin"])
    return status, body, r


def lines(a, b):
    return b"".join(b"line %d\n" % i for i in range(a, b))


def stamp(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%f000Z")


def test_logs_plain(node, api, certs, written):
    status, body, r = logs_of(node, api, certs)
    assert status == 200
    assert r.getheader("Transfer-Encoding") == "chunked"
    assert r.getheader("Content-Type").startswith("text/plain")
    assert body == lines(0, 10)     # across the rotated file


def test_logs_options(node, api, certs, written):
    assert logs_of(node, api, certs, "?tailLines=3")[1] == lines(7, 10)
    assert logs_of(node, api, certs, "?tail=all")[1] == lines(0, 10)
    assert logs_of(node, api, certs, "?tailLines=0")[1] == b""
    since = stamp(T0 + 7).replace("000Z", "Z")
    assert logs_of(node, api, certs, f"?sinceTime={since}")[1] == lines(7, 10)
    assert logs_of(node, api, certs, "?sinceTime=2023-11-14T22:13:27%2B00:00")[1] == lines(7, 10)
    body = logs_of(node, api, certs, "?timestamps=true&tailLines=1")[1]
    assert body == stamp(T0 + 9).encode() + b" line 9\n"
    for n in (1, 7, 8, 13, 1000):
        assert logs_of(node, api, certs, f"?limitBytes={n}")[1] == lines(0, 10)[:n]
    assert logs_of(node, api, certs, "?previous=true")[1] == b"old 0\nold 1\nold 2\n"
    assert logs_of(node, api, certs, "?previous=true&tailLines=1&timestamps=1")[1] == \
        stamp(T0 - 98).encode() + b" old 2\n"
    # sinceSeconds: everything written is long past.
    assert logs_of(node, api, certs, "?sinceSeconds=10")[1] == b""


@pytest.mark.parametrize("query,status", [
    ("?tailLines=abc", 400), ("?limitBytes=1e3", 400), ("?sinceTime=yesterday", 400),
    ("?tailLines=-1", 422), ("?limitBytes=0", 422), ("?sinceSeconds=0", 422),
    ("?sinceSeconds=5&sinceTime=2024-01-01T00:00:00Z", 422),
])
def test_logs_bad_parameters(node, api, certs, written, query, status):
    assert logs_of(node, api, certs, query)[0] == status


def test_logs_unknown_and_unstarted(node, api, certs, written):
    s, body, _ = get(node, api, "/containerLogs/default/nope/app", certs["admin"])
    assert (s, body) == (404, b'pod "nope" does not exist\n')
    s, body, _ = get(node, api, "/containerLogs/default/web/nope", certs["admin"])
    assert (s, body) == (404, b'container "nope" not found in pod "web"\n')
    s, body, _ = get(node, api, "/containerLogs/default/web/init", certs["admin"])
    assert s == 400 and b"waiting to start: PodInitializing" in body
    s, body, _ = get(node, api, "/containerLogs/default/web/init?previous=true",
                     certs["admin"])
    assert s == 400 and b"previous terminated container" in body


@pytest.fixture
def fast_recheck(monkeypatch):
    monkeypatch.setattr(logs, "RECHECK", 0.05)


def test_logs_follow_across_rotation(node, api, certs, written, fast_recheck):
    d = log_dir(node, "app")
    for f in os.listdir(d):
        if f.startswith("1.log"):
            os.unlink(os.path.join(d, f))
    w = LogWriter(d, 1)
    w.feed("stdout", b"first\n")
    node.pods.info = PodInfo("default", "web", UID, {"app": ContainerInfo("app", 1, True)})
    c = connect(node, api, certs["admin"])
    c.request("GET", "/containerLogs/default/web/app?follow=true&timestamps=false")
    r = c.getresponse()
    assert r.status == 200
    assert r.readline() == b"first\n"
    w.feed("stdout", b"second\n")
    assert r.readline() == b"second\n"
    w.rotate()
    w.feed("stdout", b"third\n")
    assert r.readline() == b"third\n"
    w.feed("stdout", b"last, no newline")
    w.close()
    # The run ends: what is left is read, and the response ends.
    node.pods.info = PodInfo("default", "web", UID, {"app": ContainerInfo("app", 1, False)})
    assert r.read() == b"last, no newline"
    c.close()


def test_slow_follower_does_not_block_others(node, api, certs, written, fast_recheck):
    node.pods.info = PodInfo("default", "web", UID, {"app": ContainerInfo("app", 1, True)})
    w = LogWriter(log_dir(node), 1)
    followers = []
    try:
        for _ in range(3):
            c = connect(node, api, certs["admin"])
            c.request("GET", "/containerLogs/default/web/app?follow=1")
            followers.append(c)
        # A burst the followers never read: their threads block on the
        # socket, nobody else's does.
        for i in range(2000):
            w.feed("stdout", b"x" * 1000 + b"\n")
        t = time.monotonic()
        assert get(node, api, "/healthz", certs["admin"])[:2] == (200, b"ok")
        assert logs_of(node, api, certs, "?tailLines=1")[1] == b"x" * 1000 + b"\n"
        assert time.monotonic() - t < 2
    finally:
        w.close()
        node.pods.info = PodInfo("default", "web", UID,
                                 {"app": ContainerInfo("app", 1, False)})
        for c in followers:
            c.close()


def test_follow_ends_when_the_client_goes(node, api, certs, written, fast_recheck):
    node.pods.info = PodInfo("default", "web", UID, {"app": ContainerInfo("app", 1, True)})
    before = threading.active_count()
    c = connect(node, api, certs["admin"])
    c.request("GET", "/containerLogs/default/web/app?follow=true")
    r = c.getresponse()
    assert r.status == 200
    time.sleep(0.3)
    c.close()
    deadline = time.monotonic() + 5
    while threading.active_count() >= before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() < before + 1
    node.pods.info = PodInfo("default", "web", UID, {"app": ContainerInfo("app", 1, False)})


def test_connection_limit(api, certs, tmp_path):
    key, crt = certs["server"]
    s = app.build(config.parse(f"node name {NODE}\n"),
                  tls.context(str(crt), str(key), api.ca.pem),
                  auth.Gate(NODE, open=True), lambda ns, n: None, lambda: [],
                  max_connections=2)
    s.listen("127.0.0.1", 0)
    s.start()
    port = s._listener.getsockname()[1]
    try:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port))
        extra.settimeout(5)
        assert extra.recv(1) == b""         # closed at once
        for h in held:
            h.close()
        extra.close()
        time.sleep(0.2)
        ctx = ssl.create_default_context(cafile=str(api.ca.cert))
        c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
        c.request("GET", "/healthz")
        assert c.getresponse().status == 200
        c.close()
    finally:
        s.close()


def test_hijack_and_idle_timeout(api, certs):
    """A handler takes the connection over with what the client sent past
    the request (an upgrade); a client that says nothing is dropped."""
    key, crt = certs["server"]
    s = app.build(config.parse(f"node name {NODE}\n"),
                  tls.context(str(crt), str(key), api.ca.pem),
                  auth.Gate(NODE, open=True), lambda ns, n: None, lambda: [],
                  idle_timeout=0.3)

    def upgrade(req, m):
        sock, early = req.hijack()
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n\r\n" + early)
        sock.sendall(sock.recv(100))
        sock.close()
    s.add_route("POST", r"/exec/([^/]+)/([^/]+)/([^/]+)", "proxy", upgrade)
    s.listen("127.0.0.1", 0)
    s.start()
    port = s._listener.getsockname()[1]
    ctx = ssl.create_default_context(cafile=str(api.ca.cert))
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                             server_hostname="localhost") as c:
            c.sendall(b"POST /exec/default/web/app HTTP/1.1\r\nHost: x\r\n"
                      b"Connection: Upgrade\r\nUpgrade: echo\r\n\r\nearly")
            got = b""
            while not got.endswith(b"early"):
                got += c.recv(100)
            assert got.startswith(b"HTTP/1.1 101 ")
            c.sendall(b"later")
            assert c.recv(100) == b"later"
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                             server_hostname="localhost") as c:
            c.settimeout(5)
            t = time.monotonic()
            assert c.recv(1) == b""
            assert time.monotonic() - t < 2
    finally:
        s.close()


# -- the parent's part: log permissions, the self-signed certificate, config -------

def test_logger_gives_logs_to_the_agent_group(tmp_path):
    from pufflet.priv.logger import Logger
    (tmp_path / "state").mkdir()
    lg = Logger(str(tmp_path / "state"), str(tmp_path / "log"), gid=4242)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    out = lg._handle({"op": "add", "key": "k", "namespace": "default", "pod": "web",
                      "pod_uid": UID, "container": "app", "restart": 0}, [r1, r2])
    path = Path(out["path"])
    for p in (path.parent, path.parent.parent, tmp_path / "log" / "pods"):
        st = p.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 4242, 0o750), p
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 4242, 0o640)
    for fd in (w1, w2):
        os.close(fd)
    for fd in list(lg.pipes):
        lg._drain(fd)


def test_self_signed_serving_certificate(tmp_path):
    from pufflet.priv import pki
    from pufflet.privsep.drop import Identity
    cfg = config.parse(f'node name {NODE}\nstate directory "{tmp_path}"\n')
    os.makedirs(tmp_path / "pki")
    me = Identity("root", os.getuid(), os.getgid())
    info = pki.serving_cert(cfg, me, ["127.0.0.1", "192.0.2.10"])
    path = tls.serving_path(cfg)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert info.not_after - time.time() > 300 * 86400
    text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=open(path, "rb").read(),
                          capture_output=True, check=True).stdout.decode()
    assert f"DNS:{NODE}" in text and "IP Address:192.0.2.10" in text
    before = open(path, "rb").read()
    pki.serving_cert(cfg, me, ["127.0.0.1"])
    assert open(path, "rb").read() == before       # good as it is: kept
    # A client that trusts exactly that certificate can talk to it.
    s = app.build(cfg, tls.context(path, path, None), auth.Gate(NODE, open=True),
                  lambda ns, n: None, lambda: [])
    s.listen("127.0.0.1", 0)
    s.start()
    try:
        ctx = ssl.create_default_context(cafile=path)
        ctx.check_hostname = False
        c = http.client.HTTPSConnection("127.0.0.1", s._listener.getsockname()[1],
                                        context=ctx, timeout=5)
        c.request("GET", "/healthz")
        assert c.getresponse().read() == b"ok"
        c.close()
    finally:
        s.close()


def test_config_statements():
    c = config.parse('tls client ca "/etc/pufflet/ca.pem"\n')
    assert (c.tls_client_ca, c.node_api_open) == ("/etc/pufflet/ca.pem", False)
    assert config.parse("node api authentication none\n").node_api_open
    for bad in ("node api authentication yes\n", "node api authentication\n",
                'tls client ca "relative.pem"\n'):
        with pytest.raises(config.ConfigError):
            config.parse(bad)


def test_sandbox_paths_cover_logs_and_serving_cert(tmp_path):
    from pufflet.agent.main import sandbox_paths
    cfg = config.parse(f'node name {NODE}\nkubeconfig "/etc/kc"\nstate directory "/s"\n'
                       'log directory "/l"\n')
    paths = sandbox_paths(cfg)
    assert ("/l/pods", "r") in paths and ("/s/pki", "r") in paths
    cfg = config.parse(f'node name {NODE}\nkubeconfig "/etc/kc"\nstate directory "/s"\n'
                       'tls certificate "/c"\ntls key "/k"\n')
    assert ("/s/pki", "r") not in sandbox_paths(cfg)


# -- the whole daemon ----------------------------------------------------------------

def test_daemon_serves_the_node_api_from_its_sandbox(public_tmp):
    """pufflet -d with a kubeconfig: the agent (nobody, sandboxed) asks the
    parent for its self-signed certificate, listens, checks a client
    certificate and a token with the API server, and reads container logs
    under <log_dir>/pods."""
    from daemon import Daemon, write_config
    api = ApiServer(public_tmp / "api").start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kc = api.kubeconfig("system:node:test-node")
    cfg = write_config(public_tmp, f'kubeconfig "{kc}"\nlisten on 127.0.0.1 port {port}\n'
                                   f'tls client ca "{api.ca.cert}"\n')
    admin = api.ca.issue("nodeapi-admin", "kube-apiserver-kubelet-client", ["system:masters"])
    api.add_token("tok-e2e", "e2e", [])
    api.allow("e2e", "get", "nodes/proxy")
    d = Daemon(cfg)
    try:
        d.wait_for(r"node API listening on 127.0.0.1:\d+", timeout=15)
        serving = public_tmp / "state" / "pki" / "serving.pem"
        assert stat.S_IMODE(serving.stat().st_mode) == 0o600
        logs_root = public_tmp / "log" / "pods"
        assert stat.S_IMODE(logs_root.stat().st_mode) == 0o750
        ctx = ssl.create_default_context(cafile=str(serving))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(admin[1]), str(admin[0]))

        def ask(path, headers=None):
            c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
            c.request("GET", path, headers=headers or {})
            r = c.getresponse()
            out = r.status, r.read()
            c.close()
            return out
        assert ask("/healthz") == (200, b"ok")
        assert ask("/pods")[0] == 200
        assert ask("/containerLogs/default/nope/app")[0] == 404
        ctx2 = ssl.create_default_context(cafile=str(serving))
        ctx2.check_hostname = False
        c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx2, timeout=10)
        c.request("GET", "/healthz", headers={"Authorization": "Bearer tok-e2e"})
        assert c.getresponse().status == 200
        c.close()
        assert not [line for line in d.lines if "Traceback" in line or "no sandbox" in line]
    finally:
        d.stop()
        api.stop()
    assert not api.bugs
