"""WebSocket framing and the Kubernetes channel protocols, against real
clients: websocket-client for frames, and the kubernetes Python client's
WSClient and PortForward for exec and port-forward."""

import base64
import os
import socket
import struct
import subprocess
import threading
from urllib.parse import parse_qs, urlsplit

import pytest
import websocket
from websocket import ABNF

from kubernetes.client import Configuration
from kubernetes.stream import ws_client

from pufflet.nodeapi import streamproto as sp, wsstream


@pytest.fixture(autouse=True)
def no_thread_crashes(monkeypatch):
    crashes = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashes.append(args))
    yield
    assert not crashes, [f"{a.thread.name}: {a.exc_type.__name__}: {a.exc_value}" for a in crashes]


class WSServer:
    """Answers the opening handshake with wsstream.upgrade_response, then
    runs handler(ws, protocol, path) per connection."""

    def __init__(self, handler, supported=sp.WS_REMOTECOMMAND_PROTOCOLS, **ws_kw):
        self.handler, self.supported, self.kw = handler, supported, ws_kw
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.errors, self.threads = [], []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path):
        return f"ws://127.0.0.1:{self.port}{path}"

    def _accept(self):
        while True:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn):
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                d = conn.recv(4096)
                if not d:
                    return
                buf += d
            head, rest = buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split()[1]
            headers = [tuple(x.strip() for x in ln.split(":", 1)) for ln in lines[1:]]
            resp = wsstream.upgrade_response(headers, self.supported)
            conn.sendall(resp.to_bytes())
            if not resp.ok:
                conn.close()
                return
            self.handler(wsstream.WebSocket(conn, initial=rest, **self.kw), resp.protocol, path)
        except Exception as e:
            self.errors.append(e)
            raise

    def close(self):
        self.lsock.close()
        for t in self.threads:
            t.join(10)
        assert not self.errors, self.errors


def echo_handler(ws, protocol, path):
    while (msg := ws.recv()) is not None:
        ws.send(msg[1], msg[0])


# --- handshake -----------------------------------------------------------------

def hs(protocols=None, key="dGhlIHNhbXBsZSBub25jZQ==", version="13", supported=sp.WS_REMOTECOMMAND_PROTOCOLS):
    h = [("Upgrade", "websocket"), ("Connection", "keep-alive, Upgrade"),
         ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", version)]
    if protocols:
        h.append(("Sec-WebSocket-Protocol", protocols))
    return wsstream.upgrade_response(h, supported)


def test_handshake():
    # RFC 6455's own example.
    assert wsstream.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    r = hs("v5.channel.k8s.io,v4.channel.k8s.io")
    assert r.ok and r.protocol == sp.V5
    assert ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") in r.headers
    assert ("Sec-WebSocket-Protocol", sp.V5) in r.headers
    assert hs("v4.channel.k8s.io, v5.channel.k8s.io").protocol == sp.V4   # client's order
    r = hs(None)
    assert r.ok and r.protocol == "" and not any(k == "Sec-WebSocket-Protocol" for k, _ in r.headers)
    assert hs(None, supported=(sp.V4,)).status == 403
    assert hs("v5.channel.k8s.io", supported=sp.WS_PORTFORWARD_PROTOCOLS).status == 403
    assert hs(sp.V4, key="short").status == 400
    r = hs(sp.V4, version="8")
    assert r.status == 426 and ("Sec-WebSocket-Version", "13") in r.headers
    assert not wsstream.is_websocket_request([("Upgrade", "SPDY/3.1"), ("Connection", "Upgrade")])


def test_handshake_refused_over_the_wire():
    srv = WSServer(echo_handler, supported=(sp.V4,))
    try:
        with pytest.raises(websocket.WebSocketBadStatusException) as e:
            websocket.create_connection(srv.url("/"), subprotocols=["v9.channel.k8s.io"])
        assert e.value.status_code == 403
    finally:
        srv.close()


# --- frames ------------------------------------------------------------------

def test_messages_fragments_ping_close():
    srv = WSServer(echo_handler)
    try:
        ws = websocket.create_connection(srv.url("/"))
        ws.send("héllo")
        assert ws.recv() == "héllo"
        ws.send_binary(b"\x00\xff" * 40000)              # 64-bit length
        assert ws.recv() == b"\x00\xff" * 40000
        # A fragmented message with a ping between its fragments.
        ws.send_frame(ABNF.create_frame(b"ab", ABNF.OPCODE_BINARY, fin=0))
        ws.send_frame(ABNF.create_frame(b"p1", ABNF.OPCODE_PING))
        ws.send_frame(ABNF.create_frame(b"cd", ABNF.OPCODE_CONT, fin=0))
        ws.send_frame(ABNF.create_frame(b"ef", ABNF.OPCODE_CONT, fin=1))
        op, frame = ws.recv_data_frame(True)
        assert (op, frame.data) == (ABNF.OPCODE_PONG, b"p1")
        op, frame = ws.recv_data_frame(True)
        assert (op, frame.data) == (ABNF.OPCODE_BINARY, b"abcdef")
        # Close with a code: the server echoes it.
        ws.send_close(3001, b"bye")
        op, frame = ws.recv_data_frame(True)
        assert op == ABNF.OPCODE_CLOSE and struct.unpack(">H", frame.data[:2])[0] == 3001
        ws.shutdown()
    finally:
        srv.close()


def close_code_after(raw: bytes, **ws_kw) -> int:
    srv = WSServer(echo_handler, **ws_kw)
    try:
        ws = websocket.create_connection(srv.url("/"))
        ws.sock.sendall(raw)
        op, frame = ws.recv_data_frame(True)
        assert op == ABNF.OPCODE_CLOSE
        ws.shutdown()
        return struct.unpack(">H", frame.data[:2])[0]
    finally:
        srv.close()


def test_protocol_errors_close_with_the_right_code():
    assert close_code_after(b"\x82\x03abc") == 1002                      # not masked
    masked = lambda op, data, fin=True: ABNF.create_frame(data, op, fin=int(fin)).format()  # noqa
    assert close_code_after(masked(ABNF.OPCODE_CONT, b"x")) == 1002      # continuation of nothing
    assert close_code_after(masked(ABNF.OPCODE_PING, b"x" * 126)) == 1002  # control too long
    assert close_code_after(masked(ABNF.OPCODE_TEXT, b"\xff\xfe")) == 1007  # not UTF-8
    assert close_code_after(masked(ABNF.OPCODE_BINARY, b"x" * 2000), max_message=1000) == 1009
    frame = masked(ABNF.OPCODE_BINARY, b"x")
    assert close_code_after(b"\x83" + frame[1:]) == 1002                # reserved opcode
    assert close_code_after(b"\xc2" + frame[1:]) == 1002                # RSV1, no extension
    bad_close = masked(ABNF.OPCODE_CLOSE, struct.pack(">H", 1005))
    assert close_code_after(bad_close) == 1002


# --- exec over the channel protocol ----------------------------------------------

def exec_handler(argv):
    """A miniature kubelet exec over WebSocket, v4 or v5."""
    def handle(ws, protocol, path):
        q = parse_qs(urlsplit(path).query)
        assert q["command"] == ["sh"]
        conn = wsstream.ChannelConn(ws, protocol, 5, readable=wsstream.remotecommand_readable(stdin=True))
        conn.write(wsstream.first_write_channel(stdout=True, stderr=True), b"")
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def pump_in():
            while d := conn.read(sp.CHANNEL_STDIN):
                try:
                    proc.stdin.write(d)
                    proc.stdin.flush()
                except BrokenPipeError:
                    break
            proc.stdin.close()

        def pump_out(f, ch):
            while d := os.read(f.fileno(), 65536):
                conn.write(ch, d)
        threading.Thread(target=pump_in, daemon=True).start()
        outs = [threading.Thread(target=pump_out, args=(proc.stdout, sp.CHANNEL_STDOUT)),
                threading.Thread(target=pump_out, args=(proc.stderr, sp.CHANNEL_STDERR))]
        for t in outs:
            t.start()
        rc = proc.wait()
        for t in outs:
            t.join(10)
        if conn.stream_close:
            conn.close_channel(sp.CHANNEL_STDOUT)
        conn.write(sp.CHANNEL_ERROR, sp.encode_status(protocol, sp.exit_status(rc)))
        conn.close()
    return handle


def k8s_config(port):
    cfg = Configuration()
    cfg.host = f"http://127.0.0.1:{port}"
    return cfg


def test_kubernetes_client_exec_v4():
    srv = WSServer(exec_handler(["sh", "-c", 'read line; echo "got $line"; echo err >&2; exit 3']))
    try:
        url = srv.url("/exec/ns/pod/c?command=sh&stdin=1&stdout=1&stderr=1")
        c = ws_client.WSClient(k8s_config(srv.port), url,
                               {"sec-websocket-protocol": sp.V4}, capture_all=True)
        assert c.subprotocol == sp.V4
        c.write_stdin("hello\n")
        c.run_forever(timeout=10)
        assert not c.is_open()
        assert c.read_stdout() == "got hello\n"
        assert c.read_stderr() == "err\n"
        assert c.returncode == 3
    finally:
        srv.close()


def test_kubernetes_client_exec_v5_closes_stdin():
    srv = WSServer(exec_handler(["sh", "-c", "cat; echo err >&2; exit 4"]))
    try:
        url = srv.url("/exec/ns/pod/c?command=sh&stdin=1&stdout=1&stderr=1")
        c = ws_client.WSClient(k8s_config(srv.port), url, None, capture_all=True)
        assert c.subprotocol == sp.V5                 # it offers v5 first
        c.write_stdin("line one\nline two\n")
        c.close_channel(sp.CHANNEL_STDIN)             # cat sees EOF
        c.run_forever(timeout=10)
        assert c.read_stdout() == "line one\nline two\n"
        assert c.read_stderr() == "err\n"
        assert sp.CHANNEL_STDOUT in c._closed_channels   # our close signal arrived
        assert c.returncode == 4
    finally:
        srv.close()


def test_base64_channel_protocol():
    got = []

    def handle(ws, protocol, path):
        conn = wsstream.ChannelConn(ws, protocol, 5)
        got.append(conn.read(0, timeout=5))
        conn.write(1, b"hi there")
        conn.close()
    srv = WSServer(handle)
    try:
        ws = websocket.create_connection(srv.url("/"), subprotocols=[sp.BASE64_V4])
        ws.send("0" + base64.b64encode(b"abc").decode())
        assert ws.recv() == "1" + base64.b64encode(b"hi there").decode()
        ws.close()
    finally:
        srv.close()
    assert got == [b"abc"]


# --- port-forward ----------------------------------------------------------------

def portforward_handler(ws, protocol, path):
    ports = sp.parse_ports(parse_qs(urlsplit(path).query))
    data_channels = [sp.portforward_channels(i)[0] for i in range(len(ports))]
    conn = wsstream.ChannelConn(ws, protocol, 2 * len(ports), readable=data_channels)
    for i, port in enumerate(ports):
        d, e = sp.portforward_channels(i)
        conn.write(d, sp.port_prefix(port))
        conn.write(e, sp.port_prefix(port))

    def forward(i, port):
        d, _ = sp.portforward_channels(i)
        backend = socket.create_connection(("127.0.0.1", port))

        def up():
            while chunk := conn.read(d):
                backend.sendall(chunk)
            backend.close()
        threading.Thread(target=up, daemon=True).start()
        try:
            while chunk := backend.recv(65536):
                conn.write(d, chunk)
        except OSError:
            pass
    for i, port in enumerate(ports):
        threading.Thread(target=forward, args=(i, port), daemon=True).start()
    conn.closed.wait(20)
    conn.close()


def test_kubernetes_client_portforward_two_ports():
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
    srv = WSServer(portforward_handler, supported=sp.WS_PORTFORWARD_PROTOCOLS)
    try:
        url = srv.url(f"/portForward/ns/pod?ports={ports[0]},{ports[1]}")
        ws = ws_client.create_websocket(k8s_config(srv.port), url,
                                        {"sec-websocket-protocol": sp.V4})
        pf = ws_client.PortForward(ws, ports)
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
        pf.close()
    finally:
        srv.close()
        for ls in backends:
            ls.close()
