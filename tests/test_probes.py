"""Probes: the handlers against real sockets, and the Prober's semantics
(thresholds, holds, startup gating, Unhealthy per attempt) at a faster
pace: scale 0.05 makes periodSeconds 1 last 50 ms."""

import http.server
import socket
import threading
import time

import pytest

from daemon import wait_until
from pufflet.agent import probes
from pufflet.privsep.channel import Status

SCALE = 0.05


# ---------------------------------------------------------------------------
# handlers

@pytest.fixture
def server():
    codes = {}
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("X-A")))
            code, body = codes.get(self.path, (404, b"missing"))
            self.send_response(code)
            if code in (301, 302):
                self.send_header("Location", "http://192.0.2.1/elsewhere")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], codes, seen
    srv.shutdown()
    srv.server_close()


def test_http_get_codes_headers_and_named_ports(server):
    port, codes, seen = server
    codes.update({"/ok": (200, b""), "/moved": (302, b""), "/bad": (503, b"down for now")})
    c = {"name": "c", "ports": [{"name": "http", "containerPort": port}]}
    assert probes.http_get({"path": "/ok", "port": "http",
                            "httpHeaders": [{"name": "X-A", "value": "1"}]}, c, 1).ok
    assert seen[-1] == ("/ok", "1")
    # a redirect is a success and is not followed
    assert probes.http_get({"path": "moved", "port": port}, c, 1).ok
    assert seen[-1][0] == "/moved"
    out = probes.http_get({"path": "/bad", "port": str(port)}, c, 1)
    assert not out.ok
    assert out.message == "HTTP probe failed with statuscode: 503: down for now"
    out = probes.http_get({"path": "/", "port": "nope"}, c, 1)
    assert not out.ok and "port 'nope' is not a port of the container" in out.message


def test_tcp_socket_open_and_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        out = probes.tcp_socket({"port": port}, {"name": "c"}, 1)
        assert not out.ok and out.message.startswith(f"dial tcp 127.0.0.1:{port}: ")
        s.listen()
        assert probes.tcp_socket({"port": port}, {"name": "c"}, 1).ok


def test_handlers_go_to_the_pods_address_unless_told():
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))     # listening on the "pod's" address only
        s.listen()
        port = s.getsockname()[1]
        c = {"name": "c"}
        assert not probes.run_handler({"tcpSocket": {"port": port}}, c, 1, "u", None).ok
        assert probes.run_handler({"tcpSocket": {"port": port}}, c, 1, "u", None,
                                  "127.0.0.2").ok
        assert probes.run_handler({"tcpSocket": {"port": port, "host": "127.0.0.2"}}, c, 1,
                                  "u", None, "127.0.0.1").ok


def test_exec_handler_outcomes():
    calls = []

    def exec_fn(pod_uid, name, argv, timeout):
        calls.append((pod_uid, name, argv, timeout))
        return {"ok": (0, "fine"), "bad": (2, "broken"), "slow": (None, "so far")}[argv[0]]
    c = {"name": "c"}
    assert probes.run_handler({"exec": {"command": ["ok"]}}, c, 3, "u", exec_fn).ok
    assert calls[-1] == ("u", "c", ["ok"], 3)
    out = probes.run_handler({"exec": {"command": ["bad"]}}, c, 3, "u", exec_fn)
    assert out == probes.Outcome(False, "command ['bad'] exited with 2: broken")
    out = probes.run_handler({"exec": {"command": ["slow"]}}, c, 3, "u", exec_fn)
    assert out == probes.Outcome(False, "command timed out after 3s: so far")
    assert not probes.run_handler({"exec": {"command": []}}, c, 3, "u", exec_fn).ok

    def gone(*a):
        raise Status("NOT_FOUND", "container c of pod u is not running")
    out = probes.run_handler({"exec": {"command": ["ok"]}}, c, 3, "u", gone)
    assert out == probes.Outcome(False, "exec 'ok': container c of pod u is not running")


# ---------------------------------------------------------------------------
# the Prober

class Script:
    """exec_fn answering from a per-container list of outcomes (True,
    False); the last one repeats.  Records every run."""

    def __init__(self, **answers):
        self.answers = {k: list(v) for k, v in answers.items()}
        self.runs = []

    def __call__(self, pod_uid, name, argv, timeout):
        key = argv[0]
        self.runs.append(key)
        seq = self.answers[key]
        ok = seq.pop(0) if len(seq) > 1 else seq[0]
        return (0, "") if ok else (1, "no")


def prober(script):
    results, failures = [], []
    p = probes.Prober(script, lambda *a: results.append(a),
                      on_failure=lambda *a: failures.append(a), scale=SCALE)
    return p.start(), results, failures


def probe(cmd, **settings):
    return {"exec": {"command": [cmd]}, "periodSeconds": 1, **settings}


def test_readiness_thresholds_and_unhealthy_per_attempt():
    F, T = False, True
    # with successThreshold 2 and failureThreshold 3: ready at run 7 (the
    # first two successes in a row), not ready at run 13 (three failures)
    script = Script(r=[F, T, F, F, F, T, T, F, F, T, F, F, F])
    p, results, failures = prober(script)
    try:
        c = {"name": "c", "readinessProbe": probe("r", successThreshold=2, failureThreshold=3)}
        p.update("u", c, "id1", time.time(), True)
        assert p.result("u", "c", probes.READINESS) is False      # before any result
        assert wait_until(lambda: results, 5)
        assert results[0] == ("u", "c", probes.READINESS, True, "") and len(script.runs) >= 7
        assert wait_until(lambda: len(results) == 2, 5)
        assert results[1] == ("u", "c", probes.READINESS, False,
                              "command ['r'] exited with 1: no")
        assert len(script.runs) >= 13
        time.sleep(0.3)
        assert len(results) == 2                # failing on: no new flip...
        # ...but an Unhealthy for each failed attempt (one may be in flight)
        runs = len(script.runs)
        assert runs - 4 <= len(failures) <= runs - 3
        assert set(failures) == {("u", "c", probes.READINESS,
                                  "command ['r'] exited with 1: no")}
    finally:
        p.close()


def test_liveness_failure_is_held_until_a_new_container():
    script = Script(l=[False])
    p, results, failures = prober(script)
    try:
        c = {"name": "c", "livenessProbe": probe("l", failureThreshold=2)}
        p.update("u", c, "id1", time.time(), True)
        assert p.result("u", "c", probes.LIVENESS) is True       # alive until told
        assert wait_until(lambda: results, 5)
        assert results == [("u", "c", probes.LIVENESS, False, "command ['l'] exited with 1: no")]
        runs = len(script.runs)
        time.sleep(0.3)                         # six periods: held, not run
        assert len(script.runs) == runs and len(results) == 1
        script.answers["l"] = [True]
        p.update("u", c, "id2", time.time(), True)      # restarted: probed again
        assert wait_until(lambda: len(script.runs) > runs, 5)
        assert p.result("u", "c", probes.LIVENESS) is True
        p.update("u", c, "id2", time.time(), False)     # stopped: dropped
        assert not p.has("u", "c", probes.LIVENESS)
    finally:
        p.close()


def test_startup_gates_the_others_then_stops():
    script = Script(s=[False, False, True], r=[True], l=[True])
    p, results, failures = prober(script)
    try:
        c = {"name": "c", "startupProbe": probe("s", failureThreshold=10),
             "readinessProbe": probe("r"), "livenessProbe": probe("l")}
        p.update("u", c, "id1", time.time(), True)
        assert wait_until(lambda: ("u", "c", probes.STARTUP, True, "") in results, 5)
        # nothing else ran before the startup probe succeeded
        assert script.runs[:3] == ["s", "s", "s"]
        assert wait_until(lambda: p.result("u", "c", probes.READINESS) is True, 5)
        time.sleep(0.3)
        assert script.runs.count("s") == 3      # a startup probe stops once it succeeds
        assert script.runs.count("l") >= 2
    finally:
        p.close()


def test_prober_probes_the_pods_address():
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        s.listen()
        port = s.getsockname()[1]
        p, results, failures = prober(Script())
        try:
            c = {"name": "c", "readinessProbe": {"tcpSocket": {"port": port},
                                                 "periodSeconds": 1}}
            p.update("u", c, "id1", time.time(), True)          # 127.0.0.1: refused
            assert wait_until(lambda: failures, 5)
            p.update("u", c, "id1", time.time(), True, "127.0.0.2")    # its address now
            assert wait_until(lambda: p.result("u", "c", probes.READINESS) is True, 5)
        finally:
            p.close()


def test_initial_delay_counts_from_the_containers_start():
    script = Script(r=[True])
    p, results, failures = prober(script)
    try:
        c = {"name": "c", "readinessProbe": probe("r", initialDelaySeconds=10)}
        t0 = time.time()
        p.update("u", c, "id1", t0, True)
        assert wait_until(lambda: results, 5)
        assert time.time() - t0 >= 10 * SCALE
        # a container that started long enough ago is probed at once
        results.clear()
        p.update("u", c, "id2", t0 - 60, True)
        t1 = time.monotonic()
        assert wait_until(lambda: results, 5) and time.monotonic() - t1 < 10 * SCALE
    finally:
        p.close()
