"""/exec and /attach end to end: the real node API server over TLS, the
real parent starting real processes chrooted in a real pod, and clients
that share no code with the server: tests/spdyclient.py for SPDY (as
client-go), the kubernetes Python client's WSClient for WebSocket."""

import json
import os
import signal
import time
import urllib.parse

import pytest
from kubernetes.client import Configuration
from kubernetes.stream import ws_client

import spdyclient as sc
from pufflet.privsep.channel import Status
import streamenv
from spdyclient import SpdyClient
from test_pods_priv import POD_A, Events, env, reaper  # noqa: F401 - fixtures



@pytest.fixture(scope="module")
def layers():
    return streamenv.tool_layer()


@pytest.fixture
def node(env, tmp_path):  # noqa: F811
    n = streamenv.Node(env, tmp_path)
    yield n
    n.close()


def q(**kw):
    pairs = []
    for k, v in kw.items():
        pairs += [(k, x) for x in v] if isinstance(v, list) else [(k, v)]
    return urllib.parse.urlencode(pairs)


def spdy_exec(node, path, protocols=("v4.channel.k8s.io",)):
    return SpdyClient.connect(node.addr, list(protocols), path=path, tls=node.client_tls)


def open_streams(c, kinds):
    streams = {k: c.open({"streamtype": k}) for k in kinds}
    for st in streams.values():
        c.wait_reply(st)
    return streams


def test_spdy_exec_pipes_and_exit_code(node):
    node.container(["sleep", "60"])
    # The API server's parameter names (input/output/error), as it proxies.
    path = "/exec/default/web/c?" + q(command=["sh", "-c", 'cat; echo "err $GREETING" >&2; '
                                               "pwd >&2; exit 3"], input="1", output="1",
                                      error="1")
    c = spdy_exec(node, path, ["v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io"])
    assert c.status == 101 and c.protocol == "v4.channel.k8s.io"
    s = open_streams(c, ["error", "stdin", "stdout", "stderr"])
    payload = b"hello from stdin\n" * 5000          # past every window
    c.send(s["stdin"], payload, fin=True)            # FIN: cat sees EOF
    assert c.read_all(s["stdout"]) == payload
    assert c.read_all(s["stderr"]) == b"err hello from the container env\n/tmp\n"
    status = c.read_all(s["error"])
    assert sc.parse_exit_code(status) == 3
    assert json.loads(status)["reason"] == "NonZeroExitCode"
    c.close()


@pytest.mark.parametrize("proto", ["v3.channel.k8s.io", "v2.channel.k8s.io",
                                   "channel.k8s.io"])
def test_spdy_exec_older_protocols(node, proto):
    """v1..v3 (client-go still offers them): the best one both sides speak
    is chosen, and the error stream carries a failure's message as bare
    text, nothing on success (no Status before v4)."""
    node.container(["sleep", "60"])
    older = ["v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]
    offered = older[older.index(proto):]
    for cmd, err in (("echo out; exit 3", b"command terminated with non-zero exit code: "
                      b"exit status 3"), ("echo out", b"")):
        c = spdy_exec(node, "/exec/default/web/c?" + q(command=["sh", "-c", cmd], stdout="1"),
                      offered)
        assert c.status == 101 and c.protocol == proto
        s = open_streams(c, ["error", "stdout"])
        assert c.read_all(s["stdout"]) == b"out\n"
        assert c.read_all(s["error"]) == err
        c.close()


def test_spdy_exec_tty_and_resize(node):
    node.container(["sleep", "60"])
    path = "/exec/default/web/c?" + q(command=["sh", "-c", "while read x; do stty size; done"],
                                      stdin="1", stdout="1", tty="1")
    c = spdy_exec(node, path)
    s = open_streams(c, ["error", "stdin", "stdout", "resize"])
    c.send(s["resize"], b'{"Width":100,"Height":37}\n')
    deadline = time.monotonic() + 10
    while b"37 100" not in s["stdout"].data:
        assert time.monotonic() < deadline, bytes(s["stdout"].data)
        c.send(s["stdin"], b"go\n")
        time.sleep(0.1)
    c.send(s["resize"], b'{"Width":81,"Height":25}')
    deadline = time.monotonic() + 10
    while b"25 81" not in s["stdout"].data:
        assert time.monotonic() < deadline, bytes(s["stdout"].data)
        c.send(s["stdin"], b"go\n")
        time.sleep(0.1)
    c.send(s["stdin"], b"\x04")                      # ^D: read fails, the loop ends
    out = c.read_all(s["stdout"])
    assert b"go\r\n" in out                          # the terminal echoes
    assert sc.parse_exit_code(c.read_all(s["error"])) == 0
    c.close()


def test_spdy_exec_missing_binary_and_refusals(node):
    node.container(["sleep", "60"])
    c = spdy_exec(node, "/exec/default/web/c?" + q(command="nope", stdout="1"))
    s = open_streams(c, ["error", "stdout"])
    status = json.loads(c.read_all(s["error"]))
    assert status["status"] == "Failure" and status["reason"] == "InternalError"
    assert "nope" in status["message"] and "searched PATH=/bin" in status["message"]
    assert status["message"].startswith(
        "Internal error occurred: error executing command in container: ")
    assert status["code"] == 500 and status["details"]["causes"][0]["message"] in \
        status["message"]
    c.close()
    # Refused before the upgrade, as the kubelet: plain text.
    for path, code, words in [
            ("/exec/default/nosuch/c?" + q(command="sh", stdout="1"), 404, b"pod does not exist"),
            ("/exec/default/web/x?" + q(command="sh", stdout="1"), 404, b"container not found"),
            ("/exec/default/web/c?" + q(stdout="1"), 400, b"at least one command"),
            ("/exec/default/web/c?" + q(command="sh"), 400, b"at least 1 of stdin")]:
        c = spdy_exec(node, path)
        assert (c.status, words in c.body) == (code, True), (path, c.status, c.body)
        c.sock.close()
    c = spdy_exec(node, "/exec/default/web/c?" + q(command="sh", stdout="1"), ["v9.x"])
    assert c.status == 403
    c.sock.close()


def k8s_config(node):
    cfg = Configuration()
    cfg.host = f"https://127.0.0.1:{node.addr[1]}"
    cfg.ssl_ca_cert = node.ca
    return cfg


def wss(node, path):
    return f"wss://127.0.0.1:{node.addr[1]}{path}"


def test_websocket_exec_v4_kubernetes_client(node):
    node.container(["sleep", "60"])
    url = wss(node, "/exec/default/web/c?" + q(
        command=["sh", "-c", 'read line; echo "got $line"; echo err >&2; exit 3'],
        stdin="true", stdout="true", stderr="true"))
    c = ws_client.WSClient(k8s_config(node), url, {"sec-websocket-protocol": "v4.channel.k8s.io"},
                           capture_all=True)
    assert c.subprotocol == "v4.channel.k8s.io"
    c.write_stdin("hello\n")
    c.run_forever(timeout=20)
    assert not c.is_open()
    assert c.read_stdout() == "got hello\n"
    assert c.read_stderr() == "err\n"
    assert c.returncode == 3


def test_websocket_exec_tty_and_resize_kubernetes_client(node):
    node.container(["sleep", "60"])
    url = wss(node, "/exec/default/web/c?" + q(
        command=["sh", "-c", "while read x; do stty size; done"], stdin="true",
        stdout="true", tty="true"))
    c = ws_client.WSClient(k8s_config(node), url, None, capture_all=True)
    c.write_channel(ws_client.RESIZE_CHANNEL, json.dumps({"Width": 90, "Height": 30}))
    out = ""
    deadline = time.monotonic() + 10
    while "30 90" not in out:           # the channels are read apart: ask again
        assert time.monotonic() < deadline, out
        c.write_stdin("go\n")
        c.update(timeout=0.2)
        out += c.read_stdout(timeout=0) if c.peek_stdout() else ""
    assert out.startswith("go\r\n"), out        # a terminal: echo, CRLF
    c.write_stdin("\x04")                       # ^D: read fails, the loop ends
    c.run_forever(timeout=20)
    assert c.returncode == 0


def test_websocket_exec_v5_closes_stdin(node):
    node.container(["sleep", "60"])
    url = wss(node, "/exec/default/web/c?" + q(command=["sh", "-c", "cat; echo err >&2; exit 4"],
                                               stdin="1", stdout="1", stderr="1"))
    c = ws_client.WSClient(k8s_config(node), url, None, capture_all=True)
    assert c.subprotocol == "v5.channel.k8s.io"
    c.write_stdin("line one\nline two\n")
    c.close_channel(0)                  # cat sees EOF
    c.run_forever(timeout=20)
    assert c.read_stdout() == "line one\nline two\n"
    assert c.read_stderr() == "err\n"
    assert c.returncode == 4
    # The close signal is the client's: client-go's executor (kubectl)
    # logs an error for every channel-255 message a server sends it.
    assert c._closed_channels == {0}, c._closed_channels    # ours (stdin) only


def test_attach_follows_the_container_output(node):
    st = node.container(["sh", "-c", "i=0; while [ $i -lt 25 ]; do echo out $i; echo err $i >&2; "
                         "i=$((i+1)); sleep 0.1; done"])
    ev = Events(node.priv)
    time.sleep(0.5)
    c = spdy_exec(node, "/attach/default/web/c?" + q(stdout="1", stderr="1"))
    assert c.status == 101
    s = open_streams(c, ["error", "stdout", "stderr"])
    out = c.read_all(s["stdout"], timeout=20).decode()
    err = c.read_all(s["stderr"], timeout=20).decode()
    assert sc.parse_exit_code(c.read_all(s["error"])) == 0
    ev.wait(container_id=st["container_id"])
    lines = out.splitlines()
    # From the attach on (not the start: attach shows nothing of the past),
    # to the very end, in order, stdout and stderr apart.
    assert lines and lines[-1] == "out 24" and lines[0] != "out 0", lines
    assert lines == [f"out {i}" for i in range(int(lines[0].split()[1]), 25)]
    assert err.splitlines()[-1] == "err 24" and "out" not in err
    c.close()


def test_client_leaving_ends_the_exec(node):
    node.container(["sleep", "60"])
    ev = Events(node.priv)
    c = spdy_exec(node, "/exec/default/web/c?" + q(command="cat", stdin="1", stdout="1"))
    s = open_streams(c, ["error", "stdin", "stdout"])
    c.send(s["stdin"], b"x\n")
    assert c.wait(lambda: bytes(s["stdout"].data) == b"x\n", 10)
    c.close()            # gone without a word: cat's stdin must end
    deadline = time.monotonic() + 10
    while True:
        got = ev.q.get(timeout=max(0.01, deadline - time.monotonic()))
        if got.get("exec_id"):
            break
    assert got["exit_code"] == 0


def start_interactive(node, argv, stdin=True, tty=False, name="c", stdin_once=False):
    """A container with stdin: true and/or tty: true in its spec."""
    st = node.priv.call("StartContainer", {
        "pod_uid": POD_A, "name": name, "restart_count": 0, "image": node.env.img,
        "argv": list(argv), "env": ["PATH=/bin"], "working_dir": "/", "mounts": [],
        "limits": {}, "stdin": stdin, "tty": tty, "stdin_once": stdin_once}).body
    node.mgr.add(POD_A, "default", "web", name, st)
    return st


def running(node, name="c"):
    pods = node.priv.call("ListPods", {}).body["pods"]
    return next(c["running"] for p in pods for c in p["containers"] if c["name"] == name)


def test_spdy_attach_stdin(node):
    """Input reaches the container's stdin pipe; ending an attach's stdin
    leaves the container's open for the next attach."""
    start_interactive(node, ["sh", "-c", 'while read l; do echo "got $l"; echo "e $l" >&2; '
                             "done; echo eof"])
    for word in (b"one", b"two"):
        c = spdy_exec(node, "/attach/default/web/c?" + q(stdin="1", stdout="1", stderr="1"))
        assert c.status == 101
        s = open_streams(c, ["error", "stdin", "stdout", "stderr"])
        c.send(s["stdin"], word + b"\n", fin=True)
        assert c.wait(lambda: b"got " + word + b"\n" in bytes(s["stdout"].data), 10)
        assert c.wait(lambda: b"e " + word + b"\n" in bytes(s["stderr"].data), 10)
        c.close()
        time.sleep(0.3)
        assert running(node)            # no EOF: the parent holds its stdin
    # Attaching to a container without stdin: input is read and dropped.
    start_interactive(node, ["sleep", "60"], stdin=False, name="quiet")
    c = spdy_exec(node, "/attach/default/web/quiet?" + q(stdin="1", stdout="1"))
    assert c.status == 101
    s = open_streams(c, ["error", "stdin", "stdout"])
    c.send(s["stdin"], b"x" * 200_000, fin=True)    # past the window: it is read
    c.close()


def test_spdy_attach_stdin_once(node):
    """stdinOnce (kubectl run -i): the end of the first attach's stdin is
    the container's EOF; a second attach gets no stdin."""
    start_interactive(node, ["sh", "-c", 'cat; echo "eof seen"'], stdin_once=True)
    start_interactive(node, ["sleep", "60"], name="once", stdin_once=True)
    r = node.priv.call("AttachContainer", {"pod_uid": POD_A, "name": "once"})
    assert r.body["stdin_once"] and len(r.fds) == 1
    os.close(r.fds[0])
    with pytest.raises(Status) as e:
        node.priv.call("AttachContainer", {"pod_uid": POD_A, "name": "once"})
    assert e.value.code == "FAILED_PRECONDITION"
    c = spdy_exec(node, "/attach/default/web/c?" + q(stdin="1", stdout="1"))
    s = open_streams(c, ["error", "stdin", "stdout"])
    c.send(s["stdin"], b"abc\n", fin=True)
    assert c.read_all(s["stdout"], timeout=10) == b"abc\neof seen\n"
    assert sc.parse_exit_code(c.read_all(s["error"], timeout=10)) == 0
    c.close()
    assert not running(node)


def test_spdy_attach_tty_and_resize(node):
    start_interactive(node, ["sh", "-c", "while read x; do stty size; done"], tty=True)
    c = spdy_exec(node, "/attach/default/web/c?" + q(stdin="1", stdout="1", tty="1"))
    assert c.status == 101
    s = open_streams(c, ["error", "stdin", "stdout", "resize"])
    for w, h in ((100, 37), (81, 25)):
        c.send(s["resize"], sc_resize(w, h))
        deadline = time.monotonic() + 10
        while f"{h} {w}".encode() not in s["stdout"].data:
            assert time.monotonic() < deadline, bytes(s["stdout"].data)
            c.send(s["stdin"], b"go\n")
            time.sleep(0.1)
    # The terminal echoes the input (its CRLF logged as a newline, as CRI does).
    assert s["stdout"].data.startswith(b"go\n")
    c.send(s["stdin"], b"\x04")                  # ^D on the terminal: read fails
    assert c.wait(lambda: not running(node), 10)
    assert sc.parse_exit_code(c.read_all(s["error"], timeout=10)) == 0
    c.close()
    # The parent let go of the pty master with the container.
    assert node.priv.runtime.attach_fds == {}
    with pytest.raises(Status) as e:
        node.priv.call("AttachContainer", {"pod_uid": POD_A, "name": "c"})
    assert e.value.code == "NOT_FOUND"


def test_priv_attach_refusals(node):
    node.container(["sleep", "60"])            # stdin: false, tty: false
    with pytest.raises(Status) as e:
        node.priv.call("AttachContainer", {"pod_uid": POD_A, "name": "c"})
    assert e.value.code == "FAILED_PRECONDITION" and "no stdin" in e.value.message


def sc_resize(w, h):
    return json.dumps({"Width": w, "Height": h}).encode() + b"\n"


def test_websocket_attach_kubernetes_client(node):
    start_interactive(node, ["sh", "-c", 'while read l; do echo "got $l"; done'])
    url = wss(node, "/attach/default/web/c?" + q(stdin="true", stdout="true"))
    c = ws_client.WSClient(k8s_config(node), url, None, capture_all=True)
    assert c.subprotocol == "v5.channel.k8s.io"
    c.write_stdin("hello\n")
    out = ""
    deadline = time.monotonic() + 10
    while "got hello\n" not in out:
        assert time.monotonic() < deadline, out
        c.update(timeout=0.2)
        out += c.read_stdout(timeout=0) if c.peek_stdout() else ""
    c.close()


def test_a_client_that_stops_reading_blocks_nobody(node):
    """An exec whose client opened a huge window and then stopped reading
    fills its TCP connection and stalls only itself: other execs on the
    node run, and once that client is gone its process is hung up."""
    node.container(["sleep", "60"])
    ev = Events(node.priv)
    stuck = spdy_exec_raw(node, "/exec/default/web/c?" + q(
        command=["sh", "-c", "while :; do echo aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; "
                 "done"], stdout="1"))
    for k in ("error", "stdout"):
        st = stuck.open({"streamtype": k})
        stuck.window_update(st.sid, 1 << 30)
    stuck.window_update(0, 1 << 30)
    time.sleep(1.0)                     # the server's writes to it are blocked by now
    for i in range(3):
        c = spdy_exec(node, "/exec/default/web/c?" + q(command=["sh", "-c", f"echo {i}"],
                                                       stdout="1"))
        s = open_streams(c, ["error", "stdout"])
        # Bounded: were the node blocked by the stuck client, this would hang.
        assert c.read_all(s["stdout"], timeout=10) == f"{i}\n".encode()
        assert sc.parse_exit_code(c.read_all(s["error"], timeout=10)) == 0
        c.close()
    stuck.sock.close()                  # and now it is gone
    deadline = time.monotonic() + 15
    while True:
        got = ev.q.get(timeout=max(0.01, deadline - time.monotonic()))
        if got.get("exec_id") and got.get("exit_code") != 0:
            break                       # not one of the echoes: the stuck loop
    assert got.get("signal") == signal.SIGPIPE, got     # its stdout was closed


def spdy_exec_raw(node, path):
    return SpdyClient.connect(node.addr, ["v4.channel.k8s.io"], path=path,
                              tls=node.client_tls, reader=False)
