"""PortForward: a TCP connection to 127.0.0.1:port inside a pod's network,
handed to the agent as an fd (kubectl port-forward; nodeapi/portforward.py).

Only for pods this parent holds, and only to the loopback address: the
agent names a pod and a port, never an address or a namespace.

The parent never connects itself: a connect can hang (a listener whose
backlog is full drops our SYNs), and the parent is single-threaded, so a
hanging connect would stall every pod start, exit and probe behind it.
Each request forks a helper that joins the pod's network when it has one
(the pod runtime's network_entry, the same call that puts container and
exec processes there: setns(2) into the netns on Linux, setrtable(2) into
the rdomain on OpenBSD; see platform/linux_net.py and openbsd_net.py),
connects (blocking, for as long as it takes), passes the socket back over
a socketpair and exits.  hostNetwork pods (and every pod when no pod CIDR
is known) skip the first step: the host's loopback is theirs.

PortForward is a stream (privsep/spec.yaml): its generator parks (yields
None) until the helper is reaped, then reads the helper's answer.  The
daemon's waitpid(-1) loop hands the helper's exit here (child_exited,
through PodRuntime), which wakes the parked streams.  The loop also calls
expire() every turn and sleeps no longer than next_deadline(): a helper
still running at its deadline is SIGKILLed and its stream ends
UNAVAILABLE "i/o timeout".  At most `limit` helpers exist at once, so a
client cannot make the parent fork without bound.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from pufflet.privsep.channel import Status

CONNECT_TIMEOUT = 2.0
MAX_HELPERS = 32
# The helper's own alarm, past the parent's deadline: it only matters if
# the parent is gone and cannot kill it any more.
_ALARM_SLACK = 5


@dataclass(eq=False)
class _Helper:
    pid: int
    sock: socket.socket         # the parent's end of the helper's socketpair
    port: int
    deadline: float             # time.monotonic()
    exited: bool = False        # reaped: its answer, if any, is all in sock
    killed: bool = False        # SIGKILLed at its deadline (or abandoned)


def _helper(b: socket.socket, enter: Callable[[], None] | None, port: int,
            alarm: int) -> None:
    """In the forked child (as root, single-threaded: setns(2) changes only
    the calling thread): join the network, connect, report on b."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(alarm)
    if enter is not None:
        try:
            enter()
        except OSError as e:
            b.sendall(b"N%d" % (e.errno or errno.EIO))
            return
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Blocking and without a timeout: the parent's deadline bounds it.
        s.connect(("127.0.0.1", port))
    except OSError as e:
        b.sendall(b"E%d" % (e.errno or errno.ECONNREFUSED))
        return
    socket.send_fds(b, [b"ok"], [s.fileno()])


def _unavailable(port: int, why: str) -> Status:
    # Go's words, which is what kubectl users know from the kubelet.
    return Status("UNAVAILABLE", f"failed to connect to localhost:{port} inside the "
                  f"pod's network: dial tcp4 127.0.0.1:{port}: connect: {why}")


class PortForwarder:
    def __init__(self, runtime, timeout: float = CONNECT_TIMEOUT,
                 limit: int = MAX_HELPERS) -> None:
        # runtime: priv/pods.py's PodRuntime (pods, network_entry, waker).
        self.runtime = runtime
        self.timeout = timeout
        self.limit = limit
        # Helpers not reaped yet, by pid: whether a pid is in here is what
        # makes a kill() safe (a reaped pid may already name another process).
        self.helpers: dict[int, _Helper] = {}

    def table(self) -> dict:
        return {"PortForward": self.port_forward}

    def port_forward(self, body: dict, fds: list[int]) -> Iterator[tuple[dict, list[int]] | None]:
        """Start the helper now (refusals raise here); the returned stream
        yields the connection once the helper is done."""
        pod_uid, port = body["pod_uid"], body["port"]
        if pod_uid not in self.runtime.pods:
            raise Status("NOT_FOUND", f"no pod {pod_uid}")
        if len(self.helpers) >= self.limit:
            raise Status("RESOURCE_EXHAUSTED", f"too many port-forward connections being "
                         f"made at once (at most {self.limit}); try again")
        enter = self.runtime.network_entry(pod_uid)
        a, b = socket.socketpair()
        try:
            pid = os.fork()
        except OSError as e:
            a.close()
            b.close()
            raise Status("UNAVAILABLE", f"cannot start a port-forward dialer: "
                         f"{e.strerror}") from None
        if pid == 0:
            code = 1
            try:
                a.close()
                _helper(b, enter, port, int(self.timeout) + _ALARM_SLACK)
                code = 0
            finally:
                os._exit(code)
        b.close()
        a.setblocking(False)
        h = _Helper(pid, a, port, time.monotonic() + self.timeout)
        self.helpers[pid] = h
        return self._answer(h)

    def _answer(self, h: _Helper) -> Iterator[tuple[dict, list[int]] | None]:
        try:
            while not h.exited and not h.killed:
                yield None          # parked until child_exited or expire wakes us
            if h.killed:
                raise Status("UNAVAILABLE", f"dial tcp4 127.0.0.1:{h.port}: i/o timeout")
            yield {}, [self._read(h)]
        finally:
            h.sock.close()
            # The stream may end early (the agent went away): its helper
            # must not keep connecting.  Not exited means not reaped yet,
            # so the pid is still the helper's.
            if not h.exited and not h.killed:
                h.killed = True
                os.kill(h.pid, signal.SIGKILL)

    @staticmethod
    def _read(h: _Helper) -> int:
        """The helper's answer: a connected socket's fd, or a Status."""
        try:
            msg, fds, _, _ = socket.recv_fds(h.sock, 64, 1)
        except BlockingIOError:
            msg, fds = b"", []
        if fds:
            return fds[0]
        if msg[:1] in (b"E", b"N") and msg[1:].isdigit():
            err = int(msg[1:])
            if msg[:1] == b"N":
                raise Status("INTERNAL", f"cannot enter the pod's network: {os.strerror(err)}")
            raise _unavailable(h.port, os.strerror(err).lower())
        raise Status("INTERNAL", "cannot enter the pod's network: the port-forward "
                     "helper ended without an answer")

    # -- driven by the daemon's loop ------------------------------------------

    def child_exited(self, pid: int, status: int | None = None) -> bool:
        """A child reaped by the daemon's waitpid(-1); True if it was a
        helper of ours (its stream is woken to read the answer)."""
        h = self.helpers.pop(pid, None)
        if h is None:
            return False
        h.exited = True
        self._wake()
        return True

    def next_deadline(self) -> float | None:
        """When expire() next has work (time.monotonic()), if ever."""
        live = [h.deadline for h in self.helpers.values() if not h.killed]
        return min(live) if live else None

    def expire(self, now: float | None = None) -> None:
        """SIGKILL helpers past their deadline; their streams end now."""
        now = time.monotonic() if now is None else now
        late = [h for h in self.helpers.values() if not h.killed and h.deadline <= now]
        for h in late:
            h.killed = True
            os.kill(h.pid, signal.SIGKILL)     # not reaped yet: still our child
        if late:
            self._wake()

    def _wake(self) -> None:
        waker = getattr(self.runtime, "waker", None)
        if waker is not None:
            waker()
