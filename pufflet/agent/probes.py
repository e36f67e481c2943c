"""Startup, readiness and liveness probes, and the handlers they share
with lifecycle hooks (exec, httpGet, tcpSocket).

The semantics are the kubelet's (pkg/kubelet/prober/worker.go), written
anew:
  * defaults: periodSeconds 10, timeoutSeconds 1, successThreshold 1,
    failureThreshold 3, initialDelaySeconds 0;
  * a result flips only after successThreshold successes or
    failureThreshold failures in a row;
  * before its first result a readiness probe says "not ready", a
    liveness probe "alive", a startup probe nothing;
  * during initialDelaySeconds after the container started nothing runs;
  * while a startup probe has not succeeded, the others do not run; once
    it has, it stops;
  * after a liveness or startup failure is reported the probe holds
    until the container is restarted (a new container id), so one
    failure restarts a container once.

Every probe is scheduled on one thread and run on a small pool, never a
thread per probe.  Hosts: httpGet and tcpSocket go to the pod's IP, as the
kubelet's do (the agent reaches pod networks from the node's: the node
side of each pod's link has the gateway address), unless the handler
names a host; the pod's IP is the node's for pods on the node's network.
"""

from __future__ import annotations

import heapq
import http.client
import logging
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from pufflet.privsep.channel import Status

log = logging.getLogger("pufflet.agent.probes")

STARTUP, READINESS, LIVENESS = "startup", "readiness", "liveness"
KINDS = {STARTUP: "startupProbe", READINESS: "readinessProbe", LIVENESS: "livenessProbe"}

# What a probe's output may add to a message (the kubelet keeps 10 KiB).
MAX_OUTPUT = 10 * 1024
POD_HOST = "127.0.0.1"

# Built before the sandbox: an httpGet probe over HTTPS does not verify
# the certificate, as the kubelet's does not.
_INSECURE_TLS = ssl.create_default_context()
_INSECURE_TLS.check_hostname = False
_INSECURE_TLS.verify_mode = ssl.CERT_NONE


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str = ""


# ---------------------------------------------------------------------------
# handlers

def resolve_port(port: int | str, container: dict) -> int:
    """A number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for p in container.get("ports") or ():
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"port {port!r} is not a port of the container")


def http_get(action: dict, container: dict, timeout: float,
             pod_host: str = POD_HOST) -> Outcome:
    """200 to 399 is success; redirects are not followed (a redirect is a
    success, as the kubelet counts one to another host)."""
    try:
        port = resolve_port(action.get("port"), container)
    except ValueError as e:
        return Outcome(False, str(e))
    host = action.get("host") or pod_host
    path = action.get("path") or "/"
    if not path.startswith("/"):
        path = "/" + path
    https = (action.get("scheme") or "HTTP").upper() == "HTTPS"
    conn: http.client.HTTPConnection
    if https:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=_INSECURE_TLS)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"User-Agent": "kube-probe/1.34", "Accept": "*/*"}
    for h in action.get("httpHeaders") or ():
        if h.get("name"):
            headers[h["name"]] = h.get("value", "")
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read(MAX_OUTPUT)
    except (OSError, http.client.HTTPException) as e:
        return Outcome(False, f'Get "{"https" if https else "http"}://{host}:{port}{path}": {e}')
    finally:
        conn.close()
    if 200 <= resp.status < 400:
        return Outcome(True)
    text = body.decode("utf-8", "replace")
    return Outcome(False, f"HTTP probe failed with statuscode: {resp.status}"
                   + (f": {text}" if text else ""))


def tcp_socket(action: dict, container: dict, timeout: float,
               pod_host: str = POD_HOST) -> Outcome:
    try:
        port = resolve_port(action.get("port"), container)
    except ValueError as e:
        return Outcome(False, str(e))
    host = action.get("host") or pod_host
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return Outcome(True)
    except OSError as e:
        return Outcome(False, f"dial tcp {host}:{port}: {e.strerror or e}")


# Runs a command in a container: (pod uid, container, argv, timeout) ->
# (exit code or None on timeout, output).  The manager provides it: it
# needs the privsep channel and the exits stream.
ExecFn = Callable[[str, str, list[str], float], tuple[int | None, str]]


def run_handler(handler: dict, container: dict, timeout: float, pod_uid: str,
                exec_fn: ExecFn, pod_host: str = POD_HOST) -> Outcome:
    """One probe or hook handler: exec, httpGet or tcpSocket (to pod_host,
    the pod's IP, unless the handler names a host)."""
    if handler.get("exec") is not None:
        argv = list(handler["exec"].get("command") or ())
        if not argv:
            return Outcome(False, "exec handler without a command")
        try:
            code, out = exec_fn(pod_uid, container["name"], argv, timeout)
        except (Status, OSError) as e:
            # The container ended meanwhile, or the parent said no: a
            # failed attempt (the kubelet's "probe errored"), not a crash.
            return Outcome(False, f"exec {argv[0]!r}: "
                           f"{e.message if isinstance(e, Status) else e}")
        if code is None:
            return Outcome(False, f"command timed out after {timeout:g}s" +
                           (f": {out}" if out else ""))
        if code == 0:
            return Outcome(True, out)
        return Outcome(False, f"command {argv!r} exited with {code}: {out}")
    if handler.get("httpGet") is not None:
        return http_get(handler["httpGet"], container, timeout, pod_host)
    if handler.get("tcpSocket") is not None:
        return tcp_socket(handler["tcpSocket"], container, timeout, pod_host)
    if handler.get("sleep") is not None:
        time.sleep(min(float(handler["sleep"].get("seconds", 0)), timeout))
        return Outcome(True)
    return Outcome(False, "handler has no exec, httpGet or tcpSocket")


# ---------------------------------------------------------------------------
# the probe workers

@dataclass
class Settings:
    period: float = 10.0
    timeout: float = 1.0
    success: int = 1
    failure: int = 3
    initial_delay: float = 0.0

    @classmethod
    def of(cls, probe: dict) -> "Settings":
        def num(k: str, d: float, least: float) -> float:
            v = probe.get(k)
            return max(float(v), least) if isinstance(v, (int, float)) and v else d
        return cls(period=num("periodSeconds", 10, 1), timeout=num("timeoutSeconds", 1, 1),
                   success=int(num("successThreshold", 1, 1)),
                   failure=int(num("failureThreshold", 3, 1)),
                   initial_delay=float(probe.get("initialDelaySeconds") or 0))


@dataclass
class _Worker:
    pod_uid: str
    container: dict
    kind: str
    probe: dict
    settings: Settings
    container_id: str
    started_at: float           # wall clock, the container's start
    result: bool | None         # None: no result yet
    host: str = POD_HOST        # the pod's IP
    streak: int = 0
    last: bool | None = None
    on_hold: bool = False
    running: bool = False
    removed: bool = False
    message: str = ""
    seq: int = field(default=0)


# on_result(pod uid, container name, kind, result, message): called when a
# probe's result changes, from a pool thread.
ResultFn = Callable[[str, str, str, bool, str], None]
# on_failure(pod uid, container name, kind, message): every failed attempt,
# below the threshold too (the kubelet's Unhealthy event is per attempt).
FailureFn = Callable[[str, str, str, str], None]


class Prober:
    def __init__(self, exec_fn: ExecFn, on_result: ResultFn, workers: int = 4,
                 clock: Callable[[], float] = time.monotonic,
                 on_failure: FailureFn | None = None, scale: float = 1.0) -> None:
        """scale multiplies periods and initial delays (not timeouts), so
        that tests can run the kubelet's semantics at a faster pace."""
        self.exec_fn = exec_fn
        self.on_result = on_result
        self.on_failure = on_failure
        self.clock = clock
        self.scale = scale
        self._lock = threading.Condition()
        self._workers: dict[tuple[str, str, str], _Worker] = {}
        self._heap: list[tuple[float, int, tuple[str, str, str]]] = []
        self._seq = 0
        self._closed = False
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="probe")
        self._thread = threading.Thread(target=self._schedule, name="prober", daemon=True)

    def start(self) -> "Prober":
        self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- what the manager tells us -------------------------------------------

    def update(self, pod_uid: str, container: dict, container_id: str,
               started_at: float, running: bool, host: str = POD_HOST) -> None:
        """Make the probes of one container match its spec and state: add
        them for a running container, reset them for a new container id,
        drop them when it is not running.  host: the pod's IP."""
        name = container["name"]
        for kind, field_name in KINDS.items():
            key = (pod_uid, name, kind)
            probe = container.get(field_name)
            with self._lock:
                w = self._workers.get(key)
                if probe is None or not running:
                    if w is not None:
                        w.removed = True
                        del self._workers[key]
                    continue
                if w is not None and w.container_id == container_id and w.probe == probe:
                    w.container = container
                    w.host = host
                    continue
                if w is not None:
                    w.removed = True
                w = _Worker(pod_uid, container, kind, probe, Settings.of(probe),
                            container_id, started_at, _initial(kind), host)
                self._workers[key] = w
                self._push(key, self.clock())

    def remove_pod(self, pod_uid: str) -> None:
        with self._lock:
            for key in [k for k in self._workers if k[0] == pod_uid]:
                self._workers.pop(key).removed = True

    def result(self, pod_uid: str, container: str, kind: str) -> bool | None:
        """The current result; for a container without that probe: True
        for readiness and liveness, and for startup (nothing gates it)."""
        with self._lock:
            w = self._workers.get((pod_uid, container, kind))
            return True if w is None else w.result

    def has(self, pod_uid: str, container: str, kind: str) -> bool:
        with self._lock:
            return (pod_uid, container, kind) in self._workers

    # -- scheduling ----------------------------------------------------------

    def _push(self, key: tuple[str, str, str], when: float) -> None:
        # Called with the lock held.
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, key))
        self._lock.notify()

    def _schedule(self) -> None:
        with self._lock:
            while not self._closed:
                now = self.clock()
                while self._heap and self._heap[0][0] <= now:
                    _, _, key = heapq.heappop(self._heap)
                    w = self._workers.get(key)
                    if w is None or w.running:
                        continue
                    w.running = True
                    self._pool.submit(self._probe, w)
                self._lock.wait(self._heap[0][0] - now if self._heap else None)

    def _gated(self, w: _Worker) -> bool:
        # Called with the lock held.  Not now: initial delay, hold, startup.
        if w.on_hold:
            return True
        if time.time() - w.started_at < w.settings.initial_delay * self.scale:
            return True
        if w.kind != STARTUP:
            s = self._workers.get((w.pod_uid, w.container["name"], STARTUP))
            if s is not None and s.result is not True:
                return True
        if w.kind == STARTUP and w.result is True:
            return True     # done: a startup probe stops after success
        return False

    def _probe(self, w: _Worker) -> None:
        t0 = self.clock()
        changed: tuple | None = None
        failed: str | None = None
        try:
            with self._lock:
                gated = self._gated(w)
            if not gated:
                out = run_handler(w.probe, w.container, w.settings.timeout, w.pod_uid,
                                  self.exec_fn, w.host)
                with self._lock:
                    if not w.removed and not out.ok:
                        failed = out.message
                    changed = self._record(w, out)
        except Exception:       # noqa: BLE001 - a probe bug must not stop probing
            log.exception("probe %s of %s failed to run", w.kind, w.container.get("name"))
        finally:
            with self._lock:
                w.running = False
                key = (w.pod_uid, w.container["name"], w.kind)
                if not w.removed and self._workers.get(key) is w:
                    self._push(key, t0 + w.settings.period * self.scale)
        if failed is not None and self.on_failure is not None:
            self.on_failure(w.pod_uid, w.container["name"], w.kind, failed)
        if changed is not None:
            self.on_result(*changed)

    def _record(self, w: _Worker, out: Outcome) -> tuple | None:
        # Called with the lock held: count the streak, flip at threshold.
        if w.removed:
            return None
        w.streak = w.streak + 1 if w.last == out.ok else 1
        w.last = out.ok
        if not out.ok:
            w.message = out.message
        need = w.settings.success if out.ok else w.settings.failure
        if w.kind != READINESS and out.ok:
            need = 1        # liveness and startup: one success is enough
        if w.streak < need or w.result == out.ok:
            # A failing liveness probe is reported (and held) once per container.
            return None
        w.result = out.ok
        if not out.ok and w.kind in (LIVENESS, STARTUP):
            w.on_hold = True
        return (w.pod_uid, w.container["name"], w.kind, out.ok, out.message)


def _initial(kind: str) -> bool | None:
    return {READINESS: False, LIVENESS: True, STARTUP: None}[kind]
