"""The parent's pod runtime as the agent sees it: the privsep pod methods
(spec.yaml, "pods"), the stream of exits, execs with their output, and
image configs read from the store.

Everything here is a thin, typed layer over Client calls; the decisions
are pods.py's.  The exits stream is read by one thread that hands
container exits to on_exit and exec exits to whoever waits for them.
"""

from __future__ import annotations

import json
import logging
import os
import select
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from pufflet.images import oci
from pufflet.privsep.channel import Client, Status

log = logging.getLogger("pufflet.agent.runtime")

# How long an exec's exit is kept when nobody waits for it yet: the exit
# may be read before StartExec's answer reaches its caller.
EARLY_EXIT_KEEP = 60.0
MAX_EXEC_OUTPUT = 10 * 1024
# Calls that build pod roots may take a while on a big image.
SLOW_CALL = 120.0
CALL = 30.0


@dataclass
class Exit:
    pod_uid: str
    name: str
    container_id: str
    exec_id: str | None
    exit_code: int | None
    signal: int | None
    finished_at: float
    reason: str

    @classmethod
    def of(cls, body: dict) -> "Exit":
        return cls(body["pod_uid"], body["name"], body["container_id"], body.get("exec_id"),
                   body.get("exit_code"), body.get("signal"), body["finished_at"],
                   body.get("reason", ""))


class Runtime:
    def __init__(self, client: Client, on_exit: Callable[[Exit], None],
                 stop: threading.Event) -> None:
        self.client = client
        self.on_exit = on_exit
        self.stop = stop
        self._lock = threading.Lock()
        self._waiters: dict[str, Future] = {}
        self._early: dict[str, tuple[float, Exit]] = {}
        self._configs: dict[str, oci.ImageConfig] = {}

    # -- the exits stream ----------------------------------------------------

    def start(self) -> None:
        """Subscribe now, before the caller asks ListPods: the parent
        handles requests in order, so every exit after that answer is on
        the stream.  The stream is read by a thread of its own."""
        try:
            first = self.client.stream("WatchContainers", {})
        except (Status, ConnectionError, OSError) as e:
            log.warning("watching container exits: %s", e)
            first = None
        threading.Thread(target=self._watch, args=(first,), name="container-exits",
                         daemon=True).start()

    def _watch(self, first=None) -> None:
        delay = 0.5
        while not self.stop.is_set():
            try:
                stream, first = first or self.client.stream("WatchContainers", {}), None
                for reply in stream:
                    delay = 0.5
                    self._deliver(Exit.of(reply.body))
                    if self.stop.is_set():
                        return
            except (Status, ConnectionError, OSError) as e:
                if self.stop.is_set() or isinstance(e, ConnectionError):
                    return          # the channel is gone: the agent is going too
                log.warning("watching container exits: %s; again in %.1fs", e, delay)
            self.stop.wait(delay)
            delay = min(delay * 2, 10.0)

    def _deliver(self, ex: Exit) -> None:
        if ex.exec_id:
            with self._lock:
                fut = self._waiters.pop(ex.exec_id, None)
                if fut is None:
                    now = time.monotonic()
                    self._early = {k: v for k, v in self._early.items()
                                   if now - v[0] < EARLY_EXIT_KEEP}
                    self._early[ex.exec_id] = (now, ex)
            if fut is not None:
                fut.set_result(ex)
            return
        try:
            self.on_exit(ex)
        except Exception:       # noqa: BLE001 - the stream must go on
            log.exception("handling the exit of %s/%s", ex.pod_uid, ex.name)

    # -- pods ----------------------------------------------------------------

    def create_pod(self, req: dict) -> dict:
        return self.client.call("CreatePod", req, timeout=SLOW_CALL).body

    def set_volume(self, req: dict) -> None:
        self.client.call("SetVolume", req, timeout=SLOW_CALL)

    def start_container(self, req: dict) -> dict:
        return self.client.call("StartContainer", req, timeout=CALL).body

    def signal(self, pod_uid: str, name: str, sig: str) -> bool:
        """False when the container was not running."""
        try:
            self.client.call("SignalContainer", {"pod_uid": pod_uid, "name": name,
                                                 "signal": sig}, timeout=CALL)
            return True
        except Status as e:
            if e.code == "NOT_FOUND":
                return False
            raise

    def remove_pod(self, pod_uid: str) -> None:
        try:
            self.client.call("RemovePod", {"pod_uid": pod_uid}, timeout=SLOW_CALL)
        except Status as e:
            if e.code != "NOT_FOUND":
                raise

    def list_pods(self) -> list[dict]:
        return self.client.call("ListPods", {}, timeout=CALL).body["pods"]

    def stats(self) -> dict:
        """GetStats: what each pod uses, its volumes included."""
        return self.client.call("GetStats", {}, timeout=CALL).body

    # -- exec ------------------------------------------------------------------

    def start_exec(self, pod_uid: str, name: str, argv: list[str], env: list[str],
                   working_dir: str, tty: bool) -> tuple[str, list[int], Future]:
        """For the node API's exec (nodeapi/remotecommand.py): the exec_id,
        its [stdin, stdout, stderr] fds (the caller's to close), and a
        Future of its Exit, fed by the exits stream."""
        r = self.client.call("StartExec", {
            "pod_uid": pod_uid, "name": name, "argv": argv, "env": env,
            "working_dir": working_dir, "tty": tty}, timeout=CALL)
        exec_id = r.body["exec_id"]
        fut: Future = Future()
        with self._lock:
            early = self._early.pop(exec_id, None)
            if early is None:
                self._waiters[exec_id] = fut
        if early is not None:
            fut.set_result(early[1])
        return exec_id, r.fds, fut

    def exec(self, pod_uid: str, name: str, argv: list[str], timeout: float,
             env: list[str] | None = None, working_dir: str = "/") -> tuple[int | None, str]:
        """Run argv in the container's pod; (exit code, output) or (None,
        output so far) when it did not end within timeout.  The output
        (stdout then stderr) is bounded: probes and hooks need a hint,
        not a log."""
        deadline = time.monotonic() + timeout
        exec_id, fds, fut = self.start_exec(pod_uid, name, argv, env or [], working_dir,
                                            tty=False)
        stdin, stdout, stderr = fds
        try:
            os.close(stdin)
            out = _read_until(deadline, stdout, stderr)
        finally:
            for fd in (stdout, stderr):
                try:
                    os.close(fd)
                except OSError:
                    pass
        try:
            ex = fut.result(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            with self._lock:
                self._waiters.pop(exec_id, None)
            # Past its timeout the command is killed, with what it started
            # (the kubelet's ExecSync does the same): a probe that hangs
            # every period must not pile up processes in the pod.
            self.signal_exec(pod_uid, exec_id, "SIGKILL")
            return None, out
        if ex.exit_code is None:
            return 128 + (ex.signal or 0), out
        return ex.exit_code, out

    def signal_exec(self, pod_uid: str, exec_id: str, sig: str) -> bool:
        """False when the exec had ended already."""
        try:
            self.client.call("SignalExec", {"pod_uid": pod_uid, "exec_id": exec_id,
                                            "signal": sig}, timeout=CALL)
            return True
        except Status as e:
            if e.code == "NOT_FOUND":
                return False
            raise

    # -- images ----------------------------------------------------------------

    def image_config(self, summary: dict) -> oci.ImageConfig:
        """The image's config (Entrypoint, Cmd, Env, WorkingDir,
        StopSignal), read from the store through the manifest: the parent
        hands over fds, the agent parses.  Cached by manifest digest."""
        digest = summary["digest"]
        with self._lock:
            got = self._configs.get(digest)
        if got is not None:
            return got
        man = self._read_blob(digest, oci.MAX_MANIFEST)
        mt = json.loads(man).get("mediaType") or oci.OCI_MANIFEST
        m = oci.parse_manifest(man, mt)
        cfg = oci.parse_config(self._read_blob(m.config.digest, oci.MAX_CONFIG)).config
        with self._lock:
            self._configs[digest] = cfg
        return cfg

    def _read_blob(self, digest: str, cap: int) -> bytes:
        r = self.client.call("ReadBlob", {"digest": digest}, timeout=CALL)
        fd = r.fds[0]
        try:
            if r.body["size"] > cap:
                raise oci.ImageError(f"blob {digest[:19]} is larger than {cap} bytes")
            chunks = []
            while True:
                b = os.read(fd, 1 << 16)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks)
        finally:
            os.close(fd)


def _read_until(deadline: float, *fds: int) -> str:
    """Read fds to EOF or the deadline; keep at most MAX_EXEC_OUTPUT."""
    bufs = {fd: bytearray() for fd in fds}
    open_fds = set(fds)
    poller = select.poll()      # not select(): fds may be above FD_SETSIZE
    for fd in fds:
        poller.register(fd, select.POLLIN)
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd, _ in poller.poll(left * 1000):
            try:
                b = os.read(fd, 4096)
            except OSError:
                b = b""
            if not b:
                open_fds.discard(fd)
                poller.unregister(fd)
            elif len(bufs[fd]) < MAX_EXEC_OUTPUT:
                bufs[fd] += b[:MAX_EXEC_OUTPUT - len(bufs[fd])]
    text = b"".join(bytes(bufs[fd]) for fd in fds)[:MAX_EXEC_OUTPUT]
    return text.decode("utf-8", "replace").strip()
