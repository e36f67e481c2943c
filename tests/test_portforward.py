"""/portForward end to end: the real node API server over TLS, connections
made by the real parent (privsep PortForward), SPDY from tests/spdyclient.py
and WebSocket from the kubernetes Python client's PortForward.

The echo servers are started by the test on the host's 127.0.0.1: pods
share the host network until the pod network lands, and the parent dials
127.0.0.1 for them.  One test puts a server in a network namespace of its
own and has the parent dial from inside it, as it will for pods with one."""

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from kubernetes.client import Configuration
from kubernetes.stream import ws_client

import streamenv
from spdyclient import SpdyClient
from test_pods_priv import POD_A, env, reaper  # noqa: F401 - fixtures

from pufflet.priv.portforward import PortForwarder
from pufflet.privsep.channel import Status


@pytest.fixture(scope="module")
def layers():
    return streamenv.tool_layer()


@pytest.fixture
def node(env, tmp_path):  # noqa: F811
    n = streamenv.Node(env, tmp_path)
    n.container(["sleep", "60"])
    yield n
    n.close()


class Echo:
    """A TCP server on 127.0.0.1 that answers each connection with tag +
    everything it received, once the client half-closes."""

    def __init__(self, tag: bytes):
        self.tag = tag
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.port = self.ls.getsockname()[1]
        self.conns = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.ls.accept()
            except OSError:
                return
            self.conns += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        data = b""
        while d := conn.recv(65536):
            data += d
        conn.sendall(self.tag + data)
        conn.close()

    def close(self):
        self.ls.close()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_spdy_several_ports_concurrent_connections(node):
    echoes = [Echo(b"A:"), Echo(b"B:")]
    try:
        c = SpdyClient.connect(node.addr, ["portforward.k8s.io"], path="/portForward/default/web",
                               tls=node.client_tls)
        assert c.status == 101 and c.protocol == "portforward.k8s.io"
        conns = []
        for i in range(8):
            h = {"port": str(echoes[i % 2].port), "requestid": str(i)}
            e = c.open({**h, "streamtype": "error"})
            d = c.open({**h, "streamtype": "data"})
            conns.append((i, e, d))
        payloads = {i: os.urandom(300_000) for i in range(8)}
        senders = [threading.Thread(target=c.send, args=(d, payloads[i], True))
                   for i, e, d in conns]
        for t in senders:
            t.start()
        for i, e, d in conns:
            assert c.read_all(d, timeout=30) == echoes[i % 2].tag + payloads[i]
            assert c.read_all(e) == b""
        for t in senders:
            t.join()
        assert [e.conns for e in echoes] == [4, 4]
        c.close()
    finally:
        for e in echoes:
            e.close()


def test_spdy_port_nobody_listens(node):
    port = free_port()
    c = SpdyClient.connect(node.addr, ["portforward.k8s.io"], path="/portForward/default/web",
                           tls=node.client_tls)
    h = {"port": str(port), "requestid": "0"}
    e = c.open({**h, "streamtype": "error"})
    d = c.open({**h, "streamtype": "data"})
    msg = c.read_all(e).decode()
    assert msg == (f"error forwarding port {port} to pod {POD_A}, uid : failed to connect to "
                   f"localhost:{port} inside the pod's network: dial tcp4 127.0.0.1:{port}: "
                   "connect: connection refused")
    assert c.read_all(d) == b""
    c.close()
    # An unknown pod: refused before the upgrade.
    c = SpdyClient.connect(node.addr, ["portforward.k8s.io"], path="/portForward/default/nope",
                           tls=node.client_tls)
    assert c.status == 404
    c.sock.close()


def test_websocket_kubernetes_client_two_ports(node):
    backends = []
    for tag in (b"A:", b"B:"):
        ls = socket.create_server(("127.0.0.1", 0))

        def serve(ls=ls, tag=tag):
            try:
                conn, _ = ls.accept()
            except OSError:
                return
            while d := conn.recv(65536):
                conn.sendall(tag + d.upper())
            conn.close()
        threading.Thread(target=serve, daemon=True).start()
        backends.append(ls)
    ports = [ls.getsockname()[1] for ls in backends]
    dead = free_port()
    try:
        cfg = Configuration()
        cfg.host = f"https://127.0.0.1:{node.addr[1]}"
        cfg.ssl_ca_cert = node.ca
        url = f"wss://127.0.0.1:{node.addr[1]}/portForward/default/web?ports={ports[0]},{ports[1]},{dead}"
        ws = ws_client.create_websocket(cfg, url, {"sec-websocket-protocol": "v4.channel.k8s.io"})
        pf = ws_client.PortForward(ws, ports + [dead])
        for port, tag in zip(ports, (b"A:", b"B:")):
            s = pf.socket(port)
            s.settimeout(10)
            s.sendall(b"hello")
            want = tag + b"HELLO"
            got = b""
            while len(got) < len(want):
                got += s.recv(100)
            assert got == want
            assert pf.error(port) is None
        deadline = time.monotonic() + 10
        while pf.error(dead) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert pf.error(dead).startswith(f"error forwarding port {dead} to pod {POD_A}")
        assert "connection refused" in pf.error(dead)
        pf.close()
    finally:
        for ls in backends:
            ls.close()


def test_priv_refuses_unknown_pods(node):
    with pytest.raises(Status) as e:
        list(node.priv.client.stream("PortForward", {
            "pod_uid": "0c0c0c0c-0000-4000-8000-00000000000c", "port": 80}))
    assert e.value.code == "NOT_FOUND"


class FakeRuntime:
    """What PortForwarder reads of PodRuntime: its pods and how a process
    enters a pod's network."""

    def __init__(self, entry):
        self.pods = {POD_A: {"host_network": False}}
        self.entry = entry

    def network_entry(self, pod_uid):
        return self.entry


def dial(fw, port, timeout=10.0):
    """Run one PortForward stream as the parent's loop does: while it is
    parked, reap its dialer (handing the exit to the forwarder) and let
    deadlines expire; returns the connection, or raises its Status."""
    it = fw.port_forward({"pod_uid": POD_A, "port": port}, [])
    deadline = time.monotonic() + timeout
    try:
        while (item := next(it)) is None:
            assert time.monotonic() < deadline, "PortForward never answered"
            time.sleep(0.01)
            for pid in list(fw.helpers):
                try:
                    got, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    got, status = pid, None
                if got:
                    fw.child_exited(pid, status)
            fw.expire()
    finally:
        it.close()
    return socket.socket(fileno=item[1][0])


@pytest.mark.skipif(not shutil.which("ip") or os.geteuid() != 0, reason="needs ip(8) and root")
def test_priv_dials_from_inside_a_network_namespace():
    """A server listening on 127.0.0.1 of a network namespace is reached
    through it, and not through the host's loopback."""
    from pufflet.platform import linux_net
    ns = f"pufflet-pftest-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    srv = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        port = free_port()
        srv = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c",
             "import socket,sys\n"
             f"s=socket.create_server(('127.0.0.1',{port}));print('up',flush=True)\n"
             "c,_=s.accept();c.sendall(b'inside:'+c.recv(100));c.close()"],
            stdout=subprocess.PIPE)
        assert srv.stdout.readline() == b"up\n"
        inside = functools.partial(linux_net.enter_netns, ns)
        s = dial(PortForwarder(FakeRuntime(inside)), port)
        s.sendall(b"hi")
        assert s.recv(100) == b"inside:hi"
        s.close()
        with pytest.raises(Status) as e:       # nobody on the host's port
            dial(PortForwarder(FakeRuntime(None)), port)
        assert e.value.code == "UNAVAILABLE" and "connection refused" in e.value.message
        gone = functools.partial(linux_net.enter_netns, ns + "-gone")
        with pytest.raises(Status) as e:       # a network that cannot be entered
            dial(PortForwarder(FakeRuntime(gone)), port)
        assert e.value.code == "INTERNAL" and "cannot enter the pod's network" in e.value.message
    finally:
        if srv is not None:
            srv.kill()
            srv.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


class RecordingLibc:
    """setrtable(2) as OpenBSD's libc has it, recording each call's C
    argument types and values in a file: the call is made in the forked
    dialer, whose memory the test cannot see."""

    def __init__(self, path, fail_errno=0):
        self.path, self.fail_errno = path, fail_errno

    def setrtable(self, *args):
        with open(self.path, "a") as f:
            f.write(repr((type(args[0]).__name__, args[0].value, len(args))) + "\n")
        return -1 if self.fail_errno else 0

    def get_errno(self):
        return self.fail_errno


def test_priv_dials_from_the_pods_rdomain_golden(tmp_path):
    """OpenBSD: the dialer calls setrtable(2) with the pod's rdomain (one C
    int, rdomain(4), setrtable(2)) before connect(2).  The entry is the
    one the OpenBSD backend gives a pod; here the connect then lands on
    the host's loopback, as no rdomain exists on Linux."""
    from pufflet.priv import podnet
    from pufflet.priv.netalloc import PodAddr
    calls = tmp_path / "calls"
    backend = podnet.OpenBSDBackend(libc=RecordingLibc(calls))
    entry = backend.entry(PodAddr(POD_A, "10.250.0.9", 24, "10.250.0.1", 9))
    echo = Echo(b"host:")
    try:
        s = dial(PortForwarder(FakeRuntime(entry)), echo.port)
        s.sendall(b"x")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"host:x"
        s.close()
    finally:
        echo.close()
    assert calls.read_text() == "('c_int', 9, 1)\n"
    # A table that does not exist: EINVAL, and no connection is made.
    import errno
    backend = podnet.OpenBSDBackend(libc=RecordingLibc(calls, errno.EINVAL))
    entry = backend.entry(PodAddr(POD_A, "10.250.0.9", 24, "10.250.0.1", 9))
    with pytest.raises(Status) as e:
        dial(PortForwarder(FakeRuntime(entry)), 80)
    assert e.value.code == "INTERNAL" and "Invalid argument" in e.value.message


def test_a_client_that_stops_reading_blocks_nobody(node):
    """A port-forward client that opened a huge window and stopped reading
    while the pod's server floods it stalls only its own connection."""
    flood = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def pour():
        conn, _ = flood.accept()
        try:
            while not stop.is_set():
                conn.sendall(b"z" * 65536)
        except OSError:
            pass
        conn.close()
    threading.Thread(target=pour, daemon=True).start()
    echo = Echo(b"E:")
    try:
        stuck = SpdyClient.connect(node.addr, ["portforward.k8s.io"], tls=node.client_tls,
                                   path="/portForward/default/web", reader=False)
        h = {"port": str(flood.getsockname()[1]), "requestid": "0"}
        stuck.open({**h, "streamtype": "error"})
        d = stuck.open({**h, "streamtype": "data"})
        stuck.window_update(d.sid, 1 << 30)
        stuck.window_update(0, 1 << 30)
        time.sleep(1.0)                 # our writes to it are blocked by now
        for i in range(3):
            c = SpdyClient.connect(node.addr, ["portforward.k8s.io"], tls=node.client_tls,
                                   path="/portForward/default/web")
            h = {"port": str(echo.port), "requestid": "0"}
            e = c.open({**h, "streamtype": "error"})
            dd = c.open({**h, "streamtype": "data"})
            c.send(dd, b"hi %d" % i, fin=True)
            assert c.read_all(dd, timeout=10) == b"E:hi %d" % i
            assert c.read_all(e, timeout=10) == b""
            c.close()
        stuck.sock.close()
    finally:
        stop.set()
        flood.close()
        echo.close()


class FullBacklog:
    """A listener on the host's 127.0.0.1 that never accepts, with its
    backlog (listen(0): one connection) filled: Linux drops further SYNs,
    so a connect to it hangs until its caller gives up."""

    def __init__(self):
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(0)
        self.port = self.ls.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        probe = socket.socket()
        probe.settimeout(0.2)
        with pytest.raises(TimeoutError):       # it does hang
            probe.connect(("127.0.0.1", self.port))
        probe.close()

    def close(self):
        self.filler.close()
        self.ls.close()


class Pending:
    """A PortForward stream read on a thread; .error is its Status."""

    def __init__(self, priv, port):
        self.error = None
        self.done = threading.Event()
        it = priv.client.stream("PortForward", {"pod_uid": POD_A, "port": port})
        threading.Thread(target=self._run, args=(it,), daemon=True).start()

    def _run(self, it):
        try:
            for r in it:
                for fd in r.fds:
                    os.close(fd)
        except Status as e:
            self.error = e
        finally:
            self.done.set()


def reaped(fw, pids):
    """The dialers are gone from the forwarder and no longer our children
    (waitpid would return a zombie, or 0 for a live one)."""
    streamenv.wait_for(lambda: not fw.helpers)
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_a_hanging_connect_stalls_nobody(node):
    """The parent answers other calls while a dialer hangs; the hanging
    PortForward ends UNAVAILABLE at its deadline, its dialer killed and
    reaped."""
    fw = node.priv.runtime.forwarder
    fw.timeout = 1.0
    full = FullBacklog()
    try:
        pf = Pending(node.priv, full.port)
        streamenv.wait_for(lambda: fw.helpers)
        pids = list(fw.helpers)
        assert node.priv.call("Ping", {"seq": 7, "payload": b"x"}).body["seq"] == 7
        assert [p["pod_uid"] for p in node.priv.call("ListPods", {}).body["pods"]] == [POD_A]
        assert not pf.done.is_set(), "a cheap call waited for the port-forward"
        assert pf.done.wait(10)
        assert pf.error.code == "UNAVAILABLE"
        assert pf.error.message == f"dial tcp4 127.0.0.1:{full.port}: i/o timeout"
        reaped(fw, pids)
    finally:
        full.close()


def test_dialers_are_limited(node):
    fw = node.priv.runtime.forwarder
    fw.timeout, fw.limit = 1.5, 2
    full = FullBacklog()
    echo = Echo(b"E:")
    try:
        stuck = [Pending(node.priv, full.port) for _ in range(2)]
        streamenv.wait_for(lambda: len(fw.helpers) == 2)
        pids = list(fw.helpers)
        with pytest.raises(Status) as e:
            list(node.priv.client.stream("PortForward", {"pod_uid": POD_A, "port": echo.port}))
        assert e.value.code == "RESOURCE_EXHAUSTED" and "at most 2" in e.value.message
        for p in stuck:
            assert p.done.wait(10) and p.error.code == "UNAVAILABLE"
        reaped(fw, pids)
        # Room again once they are reaped.
        (r,) = list(node.priv.client.stream("PortForward", {"pod_uid": POD_A,
                                                            "port": echo.port}))
        s = socket.socket(fileno=r.fds[0])
        s.sendall(b"again")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"E:again"
        s.close()
    finally:
        echo.close()
        full.close()


def test_a_dialer_stuck_before_connect_is_killed_at_its_deadline():
    """Whatever the dialer is stuck in (here: entering the network), the
    parent SIGKILLs it at the deadline; a stream given up early (the agent
    went away) kills its dialer at once."""
    fw = PortForwarder(FakeRuntime(functools.partial(time.sleep, 60)), timeout=0.3)
    t0 = time.monotonic()
    it = fw.port_forward({"pod_uid": POD_A, "port": 80}, [])
    assert next(it) is None
    (pid,) = fw.helpers
    assert fw.next_deadline() == pytest.approx(t0 + 0.3, abs=0.1)
    fw.expire()                             # too early: nothing happens
    assert os.waitpid(pid, os.WNOHANG) == (0, 0)
    time.sleep(0.3)
    fw.expire()
    assert fw.next_deadline() is None
    with pytest.raises(Status) as e:
        next(it)
    assert e.value.code == "UNAVAILABLE" and e.value.message.endswith("i/o timeout")
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert fw.child_exited(pid, status) and not fw.helpers
    assert not fw.child_exited(pid, status)     # not ours any more

    it = fw.port_forward({"pod_uid": POD_A, "port": 80}, [])
    assert next(it) is None
    (pid,) = fw.helpers
    it.close()
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
