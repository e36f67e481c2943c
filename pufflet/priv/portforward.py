"""PortForward: a TCP connection to 127.0.0.1:port inside a pod's network,
handed to the agent as an fd (kubectl port-forward; nodeapi/portforward.py).

Only for pods this parent holds, and only to the loopback address: the
agent names a pod and a port, never an address or a namespace.

Where the connection starts from:
- Linux, the pod has its network namespace (linux_net: /run/netns/
  pufflet-<tag>): a forked helper setns()s into it, connects, and passes
  the socket back over a socketpair; the parent itself never changes
  namespace.
- otherwise (host-network pods, and every pod until the pod network is
  set up by the runtime): the host's loopback, which is then the pod's.
  On OpenBSD the pod's rdomain will need no helper at all: SO_RTABLE on
  the socket before connect(2).

The parent is single-threaded: connects are bounded by CONNECT_TIMEOUT
(to the loopback they succeed or are refused at once, unless the
listener's backlog is full).
"""

from __future__ import annotations

import errno
import os
import socket
import sys

from pufflet.privsep.channel import Status

CONNECT_TIMEOUT = 2.0


def _dial(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT)
    # The timeout made the fd non-blocking, a flag that travels with it:
    # the agent expects a plain blocking socket.
    s.setblocking(True)
    return s


def _dial_in_netns(netns: str, port: int) -> socket.socket:
    from pufflet.platform import linux_net
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            a.close()
            linux_net.enter_netns(netns)
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
    if msg.startswith(b"E"):
        err = int(msg[1:])
        raise OSError(err, os.strerror(err))
    raise OSError(errno.EIO, f"cannot enter the pod's network namespace {netns}")


class PortForwarder:
    def __init__(self, runtime, netns_of=None) -> None:
        self.runtime = runtime
        # pod_uid, pod -> the netns name to dial from, or None for the
        # host's network.  Tests name their own.
        self.netns_of = netns_of or _default_netns

    def table(self) -> dict:
        return {"PortForward": self.port_forward}

    def port_forward(self, body: dict, fds: list[int]) -> tuple[dict, list[int]]:
        pod_uid, port = body["pod_uid"], body["port"]
        pod = self.runtime.pods.get(pod_uid)
        if pod is None:
            raise Status("NOT_FOUND", f"no pod {pod_uid}")
        netns = self.netns_of(pod_uid, pod)
        try:
            sock = _dial_in_netns(netns, port) if netns else _dial(port)
        except socket.timeout:
            raise Status("UNAVAILABLE", f"dial tcp4 127.0.0.1:{port}: i/o timeout") from None
        except OSError as e:
            # Go's words, which is what kubectl users know from the kubelet.
            why = os.strerror(e.errno).lower() if e.errno else str(e)
            raise Status("UNAVAILABLE", f"failed to connect to localhost:{port} inside "
                         f"the pod's network: dial tcp4 127.0.0.1:{port}: connect: {why}"
                         ) from None
        return {}, [sock.detach()]


def _default_netns(pod_uid: str, pod: dict) -> str | None:
    if pod.get("host_network") or not sys.platform.startswith("linux"):
        return None
    from pufflet.platform import linux_net
    name = linux_net.Names().netns(pod_uid)
    return name if os.path.exists(linux_net.netns_path(name)) else None
