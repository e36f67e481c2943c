"""exec, attach and port-forward through the whole daemon: pufflet -d with
a static pod, the node API served by the sandboxed, unprivileged agent
(Landlock here), the processes and connections made by the parent.  The
proof that the streaming routes are wired in and work from the sandbox
(fds passed in, TIOCSWINSZ on a pty master)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import threading
import time
import urllib.parse

import pytest

import imagetools
import streamenv
import spdyclient as sc
from daemon import Daemon, write_config
from spdyclient import SpdyClient

from pufflet.priv.imagestore import Store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

UID_LO, UID_HI = 3_293_000, 3_293_199     # apart from the other tests' ranges
POD = """\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  containers:
  - name: c
    image: local/tools:1
    imagePullPolicy: Never
    command: ["sh", "-c", "while read l; do stty size; done"]
    env: [{name: GREETING, value: hello from the spec}]
    stdin: true
    tty: true
"""


def q(**kw):
    pairs = []
    for k, v in kw.items():
        pairs += [(k, x) for x in v] if isinstance(v, list) else [(k, v)]
    return urllib.parse.urlencode(pairs)


def children(ppid: int) -> set[int]:
    """Processes whose parent is ppid (zombies too)."""
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == ppid:
                    out.add(int(pid))
        except (FileNotFoundError, ValueError, IndexError):
            pass
    return out


def streams(c, kinds):
    out = {k: c.open({"streamtype": k}) for k in kinds}
    for st in out.values():
        c.wait_reply(st)
    return out


def test_exec_attach_port_forward_through_the_daemon(public_tmp):
    store = Store(str(public_tmp / "state" / "images"))
    imagetools.add_image(store, "local/tools:1", [streamenv.tool_layer()])
    manifests = public_tmp / "manifests"
    manifests.mkdir()
    (manifests / "web.yaml").write_text(POD)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_config(public_tmp, f"listen on 127.0.0.1 port {port}\n"
                                   "node api authentication none\n"
                                   f'static pods "{manifests}"\n'
                                   f"pod uid range {UID_LO} {UID_HI}\n")
    echo = socket.create_server(("127.0.0.1", 0))
    d = Daemon(cfg)
    try:
        d.wait_for(r"node API listening on 127.0.0.1:\d+", timeout=20)
        d.wait_for(r"container c started", timeout=20)
        ctx = ssl.create_default_context(cafile=str(public_tmp / "state" / "pki" /
                                                    "serving.pem"))
        ctx.check_hostname = False
        base = "/exec/default/web-test-node/c?"

        # exec: the container's env, an exit code.
        c = SpdyClient.connect(("127.0.0.1", port), ["v4.channel.k8s.io"], tls=ctx,
                               path=base + q(command=["sh", "-c", 'echo "$GREETING"; exit 7'],
                                             stdout="1"))
        assert c.status == 101, c.body
        s = streams(c, ["error", "stdout"])
        assert c.read_all(s["stdout"], timeout=10) == b"hello from the spec\n"
        assert sc.parse_exit_code(c.read_all(s["error"], timeout=10)) == 7
        c.close()

        # attach to the container's tty: input, resize, output from its log.
        c = SpdyClient.connect(("127.0.0.1", port), ["v4.channel.k8s.io"], tls=ctx,
                               path="/attach/default/web-test-node/c?" +
                               q(stdin="1", stdout="1", tty="1"))
        assert c.status == 101, c.body
        s = streams(c, ["error", "stdin", "stdout", "resize"])
        c.send(s["resize"], json.dumps({"Width": 120, "Height": 40}).encode())
        deadline = time.monotonic() + 10
        while b"40 120" not in s["stdout"].data:
            assert time.monotonic() < deadline, bytes(s["stdout"].data)
            c.send(s["stdin"], b"x\n")
            time.sleep(0.2)
        c.close()

        # port-forward: the pod shares the node's network (no pod CIDR).
        got = []

        def answer():
            conn, _ = echo.accept()
            got.append(conn.recv(100))
            conn.sendall(b"echo:" + got[0])
            conn.close()
        t = threading.Thread(target=answer)
        t.start()
        c = SpdyClient.connect(("127.0.0.1", port), ["portforward.k8s.io"], tls=ctx,
                               path="/portForward/default/web-test-node")
        assert c.status == 101, c.body
        h = {"port": str(echo.getsockname()[1]), "requestid": "0"}
        c.open({**h, "streamtype": "error"})
        dd = c.open({**h, "streamtype": "data"})
        c.send(dd, b"ping")
        assert c.wait(lambda: bytes(dd.data) == b"echo:ping", 10), bytes(dd.data)
        t.join(5)
        c.close()

        # A connect that hangs (a listener with a full backlog drops our
        # SYNs) holds up nothing in the parent: an exec is served while its
        # dialer, a new child of the parent, is pending; at the parent's
        # deadline the dialer is killed and the forward fails.
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler = socket.create_connection(full.getsockname(), timeout=2)
        try:
            before = children(d._pid)
            hang = SpdyClient.connect(("127.0.0.1", port), ["portforward.k8s.io"], tls=ctx,
                                      path="/portForward/default/web-test-node")
            h = {"port": str(full.getsockname()[1]), "requestid": "0"}
            he = hang.open({**h, "streamtype": "error"})
            hang.open({**h, "streamtype": "data"})
            streamenv.wait_for(lambda: children(d._pid) - before)
            c = SpdyClient.connect(("127.0.0.1", port), ["v4.channel.k8s.io"], tls=ctx,
                                   path=base + q(command=["sh", "-c", "exit 3"], stdout="1"))
            assert sc.parse_exit_code(c.read_all(streams(c, ["error", "stdout"])["error"],
                                                 timeout=10)) == 3
            c.close()
            assert bytes(he.data) == b"", "the exec waited for the hanging connect"
            assert hang.read_all(he, timeout=10).decode().endswith(
                f"dial tcp4 127.0.0.1:{full.getsockname()[1]}: i/o timeout")
            hang.close()
            streamenv.wait_for(lambda: not children(d._pid) - before)     # reaped
        finally:
            filler.close()
            full.close()
        assert not [line for line in d.lines if "Traceback" in line]
    finally:
        echo.close()
        d.stop()
        # The pod outlives the daemon, by design: end it.
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and UID_LO <= os.stat(f"/proc/{pid}").st_uid <= UID_HI:
                    os.kill(int(pid), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
