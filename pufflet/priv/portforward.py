"""PortForward: a TCP connection to 127.0.0.1:port inside a pod's network,
handed to the agent as an fd (kubectl port-forward; nodeapi/portforward.py).

Only for pods this parent holds, and only to the loopback address: the
agent names a pod and a port, never an address or a namespace.

Where the connection starts from is the pod runtime's network_entry, the
same call that puts container and exec processes in the pod's network:
- a pod with its own network: a forked helper enters it (setns(2) into
  the netns on Linux, setrtable(2) into the rdomain on OpenBSD: see
  platform/linux_net.py and openbsd_net.py), connects, and passes the
  socket back over a socketpair.  The parent itself never changes
  network; on OpenBSD setsockopt(SO_RTABLE) would also do, but a helper
  keeps one path for both systems, and the socket keeps the rdomain it
  was made in.
- hostNetwork pods (and every pod when no pod CIDR is known): the host's
  loopback, which is then the pod's.

The parent is single-threaded: connects are bounded by CONNECT_TIMEOUT
(to the loopback they succeed or are refused at once, unless the
listener's backlog is full).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Callable

from pufflet.privsep.channel import Status

CONNECT_TIMEOUT = 2.0


def _dial(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT)
    # The timeout made the fd non-blocking, a flag that travels with it:
    # the agent expects a plain blocking socket.
    s.setblocking(True)
    return s


def _dial_inside(enter: Callable[[], None], port: int) -> socket.socket:
    """Connect from a forked child that first calls enter() (as root,
    single-threaded: setns(2) changes only the calling thread)."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            a.close()
            try:
                enter()
            except OSError as e:
                b.sendall(b"N%d" % (e.errno or errno.EIO))
                raise
            try:
                s = _dial(port)
                socket.send_fds(b, [b"ok"], [s.fileno()])
            except OSError as e:
                b.sendall(b"E%d" % (e.errno or errno.ECONNREFUSED))
            code = 0
        finally:
            os._exit(code)
    b.close()
    try:
        a.settimeout(CONNECT_TIMEOUT + 2)
        msg, fds, _, _ = socket.recv_fds(a, 64, 1)
    finally:
        a.close()
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:       # the daemon's waitpid(-1) was first
            pass
    if fds:
        return socket.socket(fileno=fds[0])
    if msg[:1] in (b"E", b"N") and msg[1:].isdigit():
        err = int(msg[1:])
        if msg[:1] == b"N":
            raise _NoNetwork(f"cannot enter the pod's network: {os.strerror(err)}")
        raise OSError(err, os.strerror(err))
    raise _NoNetwork("cannot enter the pod's network")


class _NoNetwork(Exception):
    pass


class PortForwarder:
    def __init__(self, runtime) -> None:
        # runtime: priv/pods.py's PodRuntime (pods, network_entry).
        self.runtime = runtime

    def table(self) -> dict:
        return {"PortForward": self.port_forward}

    def port_forward(self, body: dict, fds: list[int]) -> tuple[dict, list[int]]:
        pod_uid, port = body["pod_uid"], body["port"]
        if pod_uid not in self.runtime.pods:
            raise Status("NOT_FOUND", f"no pod {pod_uid}")
        enter = self.runtime.network_entry(pod_uid)
        try:
            sock = _dial_inside(enter, port) if enter is not None else _dial(port)
        except _NoNetwork as e:
            raise Status("INTERNAL", str(e)) from None
        except socket.timeout:
            raise Status("UNAVAILABLE", f"dial tcp4 127.0.0.1:{port}: i/o timeout") from None
        except OSError as e:
            # Go's words, which is what kubectl users know from the kubelet.
            why = os.strerror(e.errno).lower() if e.errno else str(e)
            raise Status("UNAVAILABLE", f"failed to connect to localhost:{port} inside "
                         f"the pod's network: dial tcp4 127.0.0.1:{port}: connect: {why}"
                         ) from None
        return {}, [sock.detach()]
