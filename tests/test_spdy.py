"""SPDY/3.1 framing and sessions, checked against an independent client
(tests/spdyclient.py), real sockets, TLS and real subprocesses."""

import fcntl
import hashlib
import json
import os
import pty
import socket
import ssl
import struct
import subprocess
import termios
import threading
import time
import zlib

import pytest

import spdyclient as sc
from spdyclient import SpdyClient, ctrl, data_frame
from pufflet.nodeapi import spdy, streamproto as sp

# Chromium's spdy_framer_test CreateSynReplyCompressed, SPDY/3: a SYN_REPLY
# for stream 1 with bar: foo, foo: bar, compressed by another implementation.
CHROMIUM_SYN_REPLY = bytes([
    0x80, 0x03, 0x00, 0x02, 0x00, 0x00, 0x00, 0x31, 0x00, 0x00, 0x00, 0x01,
    0x38, 0xea, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0xe5, 0x0e, 0x50, 0xc2, 0x4b,
    0x4a, 0x04, 0xe5, 0x0b, 0x66, 0x80, 0x00, 0x4a, 0xcb, 0xcf, 0x07, 0x08,
    0x20, 0x10, 0x95, 0x96, 0x9f, 0x0f, 0xa2, 0x00, 0x02, 0x28, 0x29, 0xb1,
    0x08, 0x20, 0x80, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff])


@pytest.fixture(autouse=True)
def no_thread_crashes(monkeypatch):
    """Fail a test whose background threads died of an exception."""
    crashes = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashes.append(args))
    yield
    assert not crashes, [f"{a.thread.name}: {a.exc_type.__name__}: {a.exc_value}" for a in crashes]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


def pair_with(client_kw=None, **kw):
    a, b = socket.socketpair()
    session = spdy.Session(a, **kw)
    client = SpdyClient(b, **(client_kw or {}))
    threading.Thread(target=client._reader, daemon=True).start()
    return session, client


class UpgradeServer:
    """Listens; for each connection answers the Upgrade with
    spdy.upgrade_response and runs handler(session, protocol) in a thread."""

    def __init__(self, handler, supported=sp.SPDY_REMOTECOMMAND_PROTOCOLS, tls=None, **session_kw):
        self.handler, self.supported, self.tls, self.kw = handler, supported, tls, session_kw
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.addr = self.lsock.getsockname()
        self.errors = []
        self.threads = []
        threading.Thread(target=self._accept, daemon=True).start()

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
            if self.tls:
                conn = self.tls.wrap_socket(conn, server_side=True)
            buf = b""
            while b"\r\n\r\n" not in buf:
                d = conn.recv(4096)
                if not d:
                    return
                buf += d
            head, rest = buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            headers = [tuple(x.strip() for x in ln.split(":", 1)) for ln in lines[1:]]
            resp = spdy.upgrade_response(headers, self.supported)
            conn.sendall(resp.to_bytes())
            if not resp.ok:
                conn.close()
                return
            dec = spdy.FrameDecoder()
            dec.feed(rest)
            session = spdy.Session(conn, decoder=dec, **self.kw)
            self.handler(session, resp.protocol)
        except Exception as e:  # surfaced by close()
            self.errors.append(e)
            raise

    def close(self):
        self.lsock.close()
        for t in self.threads:
            t.join(10)
        assert not self.errors, self.errors


# --- frames and the dictionary -------------------------------------------

def test_dictionary_is_the_spdy3_one():
    assert len(spdy.DICTIONARY) == 1423
    assert zlib.adler32(spdy.DICTIONARY) == spdy.DICTIONARY_ID == 0xE3C6A7C2
    assert spdy.DICTIONARY == sc.SPDY3_DICT
    # A block compressed by Chromium inflates with it (zlib checks the
    # dictionary's Adler-32 and then uses its bytes), in both decoders.
    dec = spdy.FrameDecoder()
    dec.feed(CHROMIUM_SYN_REPLY)
    assert dec.next() == spdy.SynReply(1, {"bar": "foo", "foo": "bar"})
    f, used = sc.parse_one(CHROMIUM_SYN_REPLY, sc.Inflater())
    assert used == len(CHROMIUM_SYN_REPLY) and f["headers"] == {"bar": "foo", "foo": "bar"}


def test_every_frame_type_server_to_client():
    enc, inf = spdy.FrameEncoder(), sc.Inflater()
    h = {"streamtype": "stdout", "multi": ["a", "b"]}
    frames = [
        spdy.SynStream(3, h, associated_id=1, priority=5, slot=2, flags=spdy.FLAG_FIN),
        spdy.SynReply(3, {"x": "y"}, flags=spdy.FLAG_FIN),
        spdy.RstStream(3, spdy.CANCEL),
        spdy.Settings([(spdy.SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20, 0), (4, 100, 1)]),
        spdy.Ping(2),
        spdy.GoAway(7, spdy.GOAWAY_PROTOCOL_ERROR),
        spdy.Headers(3, {"trailer": "v"}),
        spdy.WindowUpdate(0, 12345),
        spdy.DataFrame(3, b"payload", spdy.FLAG_FIN),
    ]
    wire = b"".join(enc.encode(f) for f in frames)
    got = []
    while wire:
        f, n = sc.parse_one(wire, inf)
        got.append(f)
        wire = wire[n:]
    assert [g["type"] for g in got] == [1, 2, 3, 4, 6, 7, 8, 9, "data"]
    assert all(g.get("version", 3) == 3 for g in got)
    assert got[0] == {"type": 1, "flags": 1, "version": 3, "sid": 3, "assoc": 1, "pri": 5,
                      "slot": 2, "headers": {"streamtype": "stdout", "multi": "a\0b"}}
    assert got[1]["headers"] == {"x": "y"} and got[1]["flags"] == 1
    assert (got[2]["sid"], got[2]["status"]) == (3, 5)
    assert got[3]["settings"] == {7: 1 << 20, 4: 100}
    assert got[4]["id"] == 2
    assert (got[5]["last"], got[5]["status"]) == (7, 1)
    assert got[6]["headers"] == {"trailer": "v"}
    assert (got[7]["sid"], got[7]["delta"]) == (0, 12345)
    assert (got[8]["sid"], got[8]["flags"], got[8]["data"]) == (3, 1, b"payload")


def test_every_frame_type_client_to_server():
    dfl, dec = sc.Deflater(), spdy.FrameDecoder()
    wire = b"".join([
        ctrl(1, 2, sc.pack_u32(5, 0) + bytes([0x60, 0]) + dfl.block({"streamtype": "error"})),
        ctrl(2, 0, sc.pack_u32(5) + dfl.block({"a": "b"})),
        ctrl(3, 0, sc.pack_u32(5, 3)),
        ctrl(4, 0, sc.pack_u32(1, 7, 4096)),
        ctrl(6, 0, sc.pack_u32(9)),
        ctrl(7, 0, sc.pack_u32(5, 0)),
        ctrl(8, 1, sc.pack_u32(5) + dfl.block({"k": "v"})),
        ctrl(9, 0, sc.pack_u32(5, 99)),
        data_frame(5, b"abc", fin=True),
    ])
    # Feed a byte at a time: the decoder is incremental.
    got = []
    for i in range(len(wire)):
        dec.feed(wire[i:i + 1])
        while (f := dec.next()) is not None:
            got.append(f)
    assert got == [
        spdy.SynStream(5, {"streamtype": "error"}, 0, 3, 0, spdy.FLAG_UNIDIRECTIONAL),
        spdy.SynReply(5, {"a": "b"}),
        spdy.RstStream(5, 3),
        spdy.Settings([(7, 4096, 0)]),
        spdy.Ping(9),
        spdy.GoAway(5, 0),
        spdy.Headers(5, {"k": "v"}, spdy.FLAG_FIN),
        spdy.WindowUpdate(5, 99),
        spdy.DataFrame(5, b"abc", spdy.FLAG_FIN),
    ]


def test_header_compression_context_spans_the_session():
    h = {"streamtype": "stdout", "port": "8080", "requestid": "17"}
    enc = spdy.FrameEncoder()
    frames = [enc.encode(spdy.SynReply(i, dict(h))) for i in (1, 3, 5)]
    # The second block refers back into the first: it is smaller ...
    assert len(frames[1]) < len(frames[0])
    # ... inflates in sequence ...
    inf = sc.Inflater()
    for i, fr in zip((1, 3, 5), frames):
        f, _ = sc.parse_one(fr, inf)
        assert f["sid"] == i and f["headers"] == h
    # ... and not without the first one's context.
    with pytest.raises((zlib.error, AssertionError, UnicodeDecodeError, ValueError)):
        f, _ = sc.parse_one(frames[1], sc.Inflater())
        assert f["headers"] == h
    # The other way round: the client's second block needs the first.
    dfl = sc.Deflater()
    wire = [ctrl(1, 0, sc.pack_u32(s, 0) + b"\0\0" + dfl.block(h)) for s in (1, 3)]
    dec = spdy.FrameDecoder()
    dec.feed(wire[0] + wire[1])
    assert dec.next().headers == h and dec.next().headers == h
    fresh = spdy.FrameDecoder()
    fresh.feed(wire[1])
    with pytest.raises(spdy.SessionError):
        fresh.next()


def test_header_block_rules():
    def block(pairs):
        raw = struct.pack(">I", len(pairs))
        for k, v in pairs:
            raw += struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v
        return raw
    assert spdy.decode_header_block(block([(b"a", b"1")]), 1) == {"a": "1"}
    for bad in ([(b"A", b"1")], [(b"a", b"1"), (b"a", b"2")], [(b"", b"x")]):
        with pytest.raises(spdy.StreamError):
            spdy.decode_header_block(block(bad), 1)
    with pytest.raises(spdy.StreamError):
        spdy.decode_header_block(struct.pack(">I", 1000000), 1)
    with pytest.raises(ValueError):
        spdy.encode_header_block({"Upper": "x"})


# --- the upgrade ----------------------------------------------------------

def up(pairs, supported=sp.SPDY_REMOTECOMMAND_PROTOCOLS):
    base = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
    return spdy.upgrade_response(base + [("X-Stream-Protocol-Version", p) for p in pairs], supported)


def test_upgrade_negotiation():
    r = up([sp.V5, sp.V4, sp.V3])
    assert r.ok and r.protocol == sp.V4  # the kubelet has no v5 over SPDY
    assert ("X-Stream-Protocol-Version", sp.V4) in r.headers
    assert ("Upgrade", "SPDY/3.1") in r.headers and ("Connection", "Upgrade") in r.headers
    assert r.to_bytes().startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert r.to_bytes().endswith(b"\r\n\r\n")
    assert up([f"{sp.V2}, {sp.V4}"]).protocol == sp.V2   # client's order, comma lists
    assert up([sp.PORTFORWARD_V1], sp.SPDY_PORTFORWARD_PROTOCOLS).protocol == sp.PORTFORWARD_V1
    r = up(["v9.channel.k8s.io"])
    assert r.status == 403
    assert [v for k, v in r.headers if k == "X-Accepted-Stream-Protocol-Versions"] == \
        list(sp.SPDY_REMOTECOMMAND_PROTOCOLS)
    assert b"unable to negotiate protocol" in r.body
    assert up([]).status == 400
    r = spdy.upgrade_response([("X-Stream-Protocol-Version", sp.V4)], sp.SPDY_REMOTECOMMAND_PROTOCOLS)
    assert r.status == 400 and b"missing upgrade headers" in r.body
    # Header names are case-insensitive; http.server's Message works too.
    import email.message
    m = email.message.Message()
    m["connection"], m["upgrade"] = "keep-alive, Upgrade", "spdy/3.1"
    m["x-stream-protocol-version"] = sp.V4
    assert spdy.upgrade_response(m, sp.SPDY_REMOTECOMMAND_PROTOCOLS).protocol == sp.V4


def test_upgrade_refused_over_the_wire():
    srv = UpgradeServer(lambda s, p: None)
    try:
        c = SpdyClient.connect(srv.addr, ["nope.k8s.io"])
        assert c.status == 403 and b"nope.k8s.io" in c.body
        assert c.response_headers["x-accepted-stream-protocol-versions"] == \
            list(sp.SPDY_REMOTECOMMAND_PROTOCOLS)
        c.sock.close()
    finally:
        srv.close()


# --- session basics ---------------------------------------------------------

def test_ping_both_ways_and_goaway():
    s, c = pair_with()
    assert c.ping(1) and c.ping(3)
    assert 0 <= s.ping(timeout=5) < 5          # the client echoes even ids
    # A ping with our own parity that we never sent: ignored, not echoed.
    c.send_raw(ctrl(6, 0, sc.pack_u32(4)))
    assert c.ping(5)
    assert not [f for f in c.frames_of(6) if f["id"] == 4]
    st = c.open({"streamtype": "stdin"})
    assert s.accept(timeout=5).stream_id == st.sid
    c.goaway(last=0)
    assert s.peer_gone.wait(5)
    assert s.accept(timeout=1) is None
    s.close(linger=0.5)
    assert c.wait(lambda: c.eof, 5)
    goaways = c.frames_of(7)
    assert goaways and goaways[-1]["last"] == st.sid and goaways[-1]["status"] == 0
    assert s.wait_closed(5)


def test_stream_reply_fin_reset():
    s, c = pair_with()
    a = c.open({"streamtype": "stdout"})
    b = c.open({"streamtype": "stderr"})
    sa, sb = s.accept(5), s.accept(5)
    assert sa.headers == {"streamtype": "stdout"}
    sa.reply({"x": "1"})
    assert c.wait_reply(a) == {"x": "1"}
    sa.write(b"hello")
    sa.close()
    assert c.read_all(a) == b"hello"
    sb.write(b"auto-replied")          # a write replies first by itself
    assert c.wait_reply(b) == {}
    c.rst(b, spdy.CANCEL)
    with pytest.raises(spdy.StreamReset):
        deadline = time.time() + 5
        while time.time() < deadline:
            sb.write(b"x")
            time.sleep(0.01)
    # Client half-close: the server reads EOF.
    d = c.open({"streamtype": "stdin"})
    sd = s.accept(5)
    c.send(d, b"bytes", fin=True)
    assert sd.read(timeout=5) == b"bytes" and sd.read(timeout=5) == b""
    sd.reset()
    assert c.wait(lambda: d.rst == spdy.CANCEL, 5)
    c.close()
    s.close()


# --- flow control ------------------------------------------------------------

def test_sender_blocks_at_window_zero_until_window_update():
    s, c = pair_with(client_kw={"window_updates": False})
    c.window_update(0, 1 << 24)        # a peer that does flow control
    st = c.open({"streamtype": "stdout"})
    ss = s.accept(5)
    payload = os.urandom(200 * 1024)
    w = threading.Thread(target=ss.write, args=(payload,))
    w.start()
    assert c.wait(lambda: len(st.data) == 65536, 5)
    time.sleep(0.3)
    assert len(st.data) == 65536 and w.is_alive()   # blocked at window 0
    assert s.flow_control is True
    c.window_update(st.sid, 10000)
    assert c.wait(lambda: len(st.data) == 75536, 5)
    time.sleep(0.2)
    assert len(st.data) == 75536
    c.window_update(st.sid, 1 << 20)
    w.join(5)
    assert c.wait(lambda: len(st.data) == len(payload), 5) and bytes(st.data) == payload
    c.close()
    s.close()


def test_session_window_also_blocks():
    s, c = pair_with(client_kw={"window_updates": False})
    c.send_raw(ctrl(4, 0, sc.pack_u32(1, 7, 1 << 20)))   # big stream windows, session stays 64K
    a, b = c.open({"n": "a"}), c.open({"n": "b"})
    sa, sb = s.accept(5), s.accept(5)
    threading.Thread(target=sa.write, args=(b"a" * 50000,), daemon=True).start()
    threading.Thread(target=sb.write, args=(b"b" * 50000,), daemon=True).start()
    assert c.wait(lambda: len(a.data) + len(b.data) == 65536, 5)
    time.sleep(0.3)
    assert len(a.data) + len(b.data) == 65536
    c.window_update(0, 1 << 20)
    assert c.wait(lambda: len(a.data) == len(b.data) == 50000, 5)
    c.close()
    s.close()


def echo(stream):
    while True:
        d = stream.read(timeout=20)
        if not d:
            break
        stream.write(d)
    stream.close()


def test_five_mib_through_many_window_updates():
    s, c = pair_with()
    st = c.open({"streamtype": "data"})
    ss = s.accept(5)
    ss.reply()
    t = threading.Thread(target=echo, args=(ss,), daemon=True)
    t.start()
    payload = os.urandom(5 * 1024 * 1024)
    sender = threading.Thread(target=c.send, args=(st, payload, True))
    sender.start()
    back = c.read_all(st, timeout=30)
    sender.join()
    assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    # Both sides gave window back, many times over.
    assert len([f for f in c.frames_of(9) if f["sid"] == st.sid]) >= 50
    assert len([f for f in c.frames_of(9) if f["sid"] == 0]) >= 50
    assert s.flow_control is True
    c.close()
    s.close()


def test_twenty_concurrent_streams_interleave():
    s, c = pair_with()

    def serve():
        while (ss := s.accept(10)) is not None:
            ss.reply()
            threading.Thread(target=echo, args=(ss,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    streams = [c.open({"streamtype": "data", "n": str(i)}) for i in range(20)]
    payloads = [bytes([i]) * 1024 + os.urandom(199 * 1024) for i in range(20)]
    senders = [threading.Thread(target=c.send, args=(st, p, True)) for st, p in zip(streams, payloads)]
    for t in senders:
        t.start()
    for st, p in zip(streams, payloads):
        assert c.read_all(st, timeout=30) == p
    for t in senders:
        t.join()
    order = [f["sid"] for f in c.frames_of("data") if f["data"]]
    first_done = max(i for i, sid in enumerate(order) if sid == order[0])
    assert len(set(order[:first_done])) > 5, "streams did not interleave"
    c.close()
    s.close()


def test_peer_without_flow_control_like_spdystream():
    """spdystream never sends WINDOW_UPDATE and ignores ours: after the
    grace period we stop waiting for it, and we tolerate its overruns."""
    s, c = pair_with(client_kw={"flow_control": False, "window_updates": False},
                     flow_control_grace=0.2)
    st = c.open({"streamtype": "stdout"})
    ss = s.accept(5)
    payload = os.urandom(1024 * 1024)
    t0 = time.monotonic()
    ss.write(payload, timeout=10)
    ss.close()
    assert c.read_all(st) == payload
    assert time.monotonic() - t0 < 5
    assert s.flow_control is False
    up_ = c.open({"streamtype": "stdin"})
    su = s.accept(5)
    c.send(up_, payload, fin=True)        # way past our 64 KiB window
    got = bytearray()
    while d := su.read(timeout=10):
        got += d
    assert bytes(got) == payload
    c.close()
    s.close()


# --- malformed input ----------------------------------------------------------

def expect_goaway(c, status=spdy.GOAWAY_PROTOCOL_ERROR):
    assert c.wait(lambda: c.eof and c.frames_of(7), 5), c.frames
    assert c.frames_of(7)[-1]["status"] == status


@pytest.mark.parametrize("case", ["version", "length", "inflate", "ping-length", "settings-length",
                                  "data-stream-0"])
def test_malformed_frames_end_the_session_with_goaway(case):
    s, c = pair_with()
    if case == "version":
        c.send_raw(ctrl(6, 0, sc.pack_u32(1), version=2))
    elif case == "length":
        c.send_raw(b"\x80\x03\x00\x01\x00\xff\xff\xff" + b"\0" * 64)
    elif case == "inflate":
        c.send_raw(ctrl(1, 0, sc.pack_u32(1, 0) + b"\0\0" + b"\x78\x9c garbage that is not deflate"))
    elif case == "ping-length":
        c.send_raw(ctrl(6, 0, sc.pack_u32(1, 2)))
    elif case == "settings-length":
        c.send_raw(ctrl(4, 0, sc.pack_u32(5, 7, 1)))
    elif case == "data-stream-0":
        c.send_raw(data_frame(0, b"x"))
    expect_goaway(c)
    assert s.wait_closed(5)
    assert isinstance(s.error, spdy.SessionError)


def test_malformed_frames_that_only_cost_a_stream():
    dec = spdy.FrameDecoder(max_data=1000)
    a, b = socket.socketpair()
    s = spdy.Session(a, decoder=dec, max_streams=2)
    c = SpdyClient(b)
    threading.Thread(target=c._reader, daemon=True).start()
    # A SYN_STREAM of another SPDY version: RST UNSUPPORTED_VERSION.
    c.send_raw(ctrl(1, 0, sc.pack_u32(1, 0) + b"\0\0", version=2))
    assert c.wait(lambda: any(f["sid"] == 1 and f["status"] == 4 for f in c.frames_of(3)), 5)
    # An unknown control frame type: ignored.
    c.send_raw(ctrl(0x55, 0, b"whatever"))
    c.next_sid = 3
    st = c.open({"streamtype": "stdin"})
    assert s.accept(5).stream_id == 3
    # A data frame over the limit: skipped, RST FRAME_TOO_LARGE.
    c.send_raw(data_frame(3, b"x" * 5000))
    assert c.wait(lambda: st.rst == spdy.FRAME_TOO_LARGE, 5)
    # DATA for a stream that was never opened: RST INVALID_STREAM.
    c.send_raw(data_frame(99, b"x"))
    assert c.wait(lambda: any(f["sid"] == 99 and f["status"] == 2 for f in c.frames_of(3)), 5)
    # Stream ids must be odd and growing.
    c.send_raw(ctrl(1, 0, sc.pack_u32(2, 0) + b"\0\0" + c.deflate.block({})))
    assert c.wait(lambda: any(f["sid"] == 2 and f["status"] == 1 for f in c.frames_of(3)), 5)
    # Too many streams: REFUSED_STREAM.
    c.next_sid = 101
    x, y, z = c.open({"n": "1"}), c.open({"n": "2"}), c.open({"n": "3"})
    assert c.wait(lambda: z.rst == spdy.REFUSED_STREAM, 5)
    assert x.rst is None and y.rst is None
    # A header block that inflates but breaks the rules (a duplicate
    # name): RST for that stream only.
    raw = struct.pack(">I", 2) + (struct.pack(">I", 1) + b"a" + struct.pack(">I", 1) + b"1") * 2
    z_ = c.deflate.z
    blk = z_.compress(raw) + z_.flush(zlib.Z_SYNC_FLUSH)
    c.send_raw(ctrl(1, 0, sc.pack_u32(109, 0) + b"\0\0" + blk))
    assert c.wait(lambda: any(f["sid"] == 109 and f["status"] == 1 for f in c.frames_of(3)), 5)
    # The session is still fine.
    assert c.ping(7)
    assert s.error is None
    c.close()
    s.close()


# --- exec end to end ------------------------------------------------------------

def read_or_eof(stream):
    try:
        return stream.read()
    except spdy.StreamReset:
        return b""


def exec_handler(argv, tty=False, winsizes=None):
    """A miniature kubelet exec: the streams the client asked for, a real
    process on pipes or a pty, the v4 Status on the error stream."""
    def handle(session, protocol):
        want = sp.expected_streams(protocol, stdin=True, stdout=True, stderr=True, tty=tty)
        streams = {}
        while set(streams) != want:
            st = session.accept(timeout=5)
            assert st is not None, f"streams missing: {want - set(streams)}"
            streams[st.headers[sp.HEADER_STREAM_TYPE]] = st
            st.reply()
        pumps = []
        if tty:
            master, slave = pty.openpty()
            proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
            os.close(slave)
            fin, fouts = master, [(master, streams[sp.STDOUT])]
        else:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
            fin = proc.stdin.fileno()
            fouts = [(proc.stdout.fileno(), streams[sp.STDOUT]), (proc.stderr.fileno(), streams[sp.STDERR])]

        def pump_in():
            try:
                while d := streams[sp.STDIN].read():
                    os.write(fin, d)
            except spdy.StreamReset:
                pass      # the session ended with stdin still open
            if not tty:
                proc.stdin.close()

        def pump_out(fd, st):
            while True:
                try:
                    d = os.read(fd, 65536)
                except OSError:   # EIO: the pty's other side is gone
                    d = b""
                if not d:
                    break
                st.write(d)

        def resize():
            dec = sp.ResizeDecoder()
            while d := read_or_eof(streams[sp.RESIZE]):
                for size in dec.feed(d):
                    fcntl.ioctl(master, termios.TIOCSWINSZ, sp.winsize(size))
                    rows, cols, _, _ = struct.unpack(
                        "HHHH", fcntl.ioctl(master, termios.TIOCGWINSZ, b"\0" * 8))
                    winsizes.append((cols, rows))

        threading.Thread(target=pump_in, daemon=True).start()
        if tty:
            threading.Thread(target=resize, daemon=True).start()
        for fd, st in fouts:
            t = threading.Thread(target=pump_out, args=(fd, st))
            t.start()
            pumps.append(t)
        rc = proc.wait()
        for t in pumps:
            t.join(10)
        streams[sp.ERROR].write(sp.encode_status(protocol, sp.exit_status(rc)))
        for kind in (sp.STDOUT, sp.STDERR, sp.ERROR):
            if kind in streams:
                streams[kind].close()
        # As the kubelet: wait for the client to go first, then close.
        session.peer_gone.wait(10)
        session.close()
        if tty:
            os.close(master)
    return handle


def test_exec_over_tls_with_exit_code(tls):
    server_ctx, client_ctx = tls
    srv = UpgradeServer(exec_handler(["sh", "-c", "cat; echo err >&2; exit 3"]), tls=server_ctx)
    try:
        c = SpdyClient.connect(srv.addr, [sp.V5, sp.V4, sp.V3], tls=client_ctx)
        assert c.status == 101 and c.protocol == sp.V4
        err = c.open({"streamtype": "error"})
        sin = c.open({"streamtype": "stdin"})
        sout = c.open({"streamtype": "stdout"})
        serr = c.open({"streamtype": "stderr"})
        for st in (err, sin, sout, serr):
            c.wait_reply(st)
        c.send(sin, b"hello from stdin\n" * 1000, fin=True)
        assert c.read_all(sout) == b"hello from stdin\n" * 1000
        assert c.read_all(serr) == b"err\n"
        status = c.read_all(err)
        assert sc.parse_exit_code(status) == 3
        assert sp.decode_exit_code(status) == 3
        assert json.loads(status)["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
        c.close()
    finally:
        srv.close()


def test_exec_with_pty_and_resize():
    sizes = []
    srv = UpgradeServer(exec_handler(["sh", "-c", "read x; stty size; exit 0"], tty=True, winsizes=sizes))
    try:
        c = SpdyClient.connect(srv.addr, [sp.V4])
        err = c.open({"streamtype": "error"})
        sin = c.open({"streamtype": "stdin"})
        sout = c.open({"streamtype": "stdout"})
        rsz = c.open({"streamtype": "resize"})
        for st in (err, sin, sout, rsz):
            c.wait_reply(st)
        c.send(rsz, sp.encode_resize(80, 24) + b'{"Width":100,"Height":37}\n')
        deadline = time.time() + 5
        while (100, 37) not in sizes and time.time() < deadline:
            time.sleep(0.02)
        assert sizes == [(80, 24), (100, 37)]
        c.send(sin, b"go\n")
        out = c.read_all(sout)
        assert b"37 100" in out
        assert sc.parse_exit_code(c.read_all(err)) == 0
        c.close()
    finally:
        srv.close()


# --- port-forward ---------------------------------------------------------------

def portforward_handler(session, protocol):
    assert protocol == sp.PORTFORWARD_V1
    pairs = sp.PortForwardPairs()
    while (st := session.accept(timeout=10)) is not None:
        st.reply()
        got = pairs.add(st)
        if got is None:
            continue
        port, data, error = got

        def forward(port=port, data=data, error=error):
            conn = socket.create_connection(("127.0.0.1", port))

            def up_():
                while d := data.read():
                    conn.sendall(d)
                conn.shutdown(socket.SHUT_WR)
            t = threading.Thread(target=up_, daemon=True)
            t.start()
            while d := conn.recv(65536):
                data.write(d)
            data.close()
            error.close()
            conn.close()
        threading.Thread(target=forward, daemon=True).start()
    session.close()


def test_portforward_several_ports_concurrent_connections():
    backends = []
    for tag in (b"A", b"B"):
        ls = socket.create_server(("127.0.0.1", 0))

        def serve(ls=ls, tag=tag):
            while True:
                try:
                    conn, _ = ls.accept()
                except OSError:
                    return

                def one(conn=conn):
                    data = b""
                    while d := conn.recv(65536):
                        data += d
                    conn.sendall(tag + data)
                    conn.close()
                threading.Thread(target=one, daemon=True).start()
        threading.Thread(target=serve, daemon=True).start()
        backends.append(ls)
    srv = UpgradeServer(portforward_handler, supported=sp.SPDY_PORTFORWARD_PROTOCOLS)
    try:
        c = SpdyClient.connect(srv.addr, [sp.PORTFORWARD_V1], path="/portForward/ns/pod")
        assert c.protocol == sp.PORTFORWARD_V1
        conns = []
        for i in range(6):
            port = backends[i % 2].getsockname()[1]
            h = {"port": str(port), "requestid": str(i)}
            e = c.open({**h, "streamtype": "error"})
            d = c.open({**h, "streamtype": "data"})
            conns.append((i, e, d))
        payloads = {i: os.urandom(100_000) for i in range(6)}
        senders = [threading.Thread(target=c.send, args=(d, payloads[i], True)) for i, e, d in conns]
        for t in senders:
            t.start()
        for i, e, d in conns:
            assert c.read_all(d) == (b"A", b"B")[i % 2] + payloads[i]
            assert c.read_all(e) == b""
        c.close()
    finally:
        srv.close()
        for ls in backends:
            ls.close()


# --- streamproto ---------------------------------------------------------------

def test_status_json_and_exit_codes():
    st = sp.exit_status(3)
    assert st["reason"] == "NonZeroExitCode"
    assert st["details"] == {"causes": [{"reason": "ExitCode", "message": "3"}]}
    assert sp.decode_exit_code(sp.encode_status(sp.V4, st)) == 3
    assert json.loads(sp.encode_status(sp.V5, sp.exit_status(0))) == {"metadata": {}, "status": "Success"}
    assert sp.decode_exit_code(sp.encode_status(sp.V4, sp.exit_status(0))) == 0
    with pytest.raises(RuntimeError):
        sp.decode_exit_code(sp.encode_status(sp.V4, sp.exit_status(None, error="no such container")))
    # Before v4: bare text, nothing at all on success.
    assert sp.encode_status(sp.V3, sp.exit_status(0)) == b""
    assert sp.encode_status(sp.V3, sp.exit_status(2)).startswith(b"command terminated")


def test_resize_decoder_and_negotiation():
    d = sp.ResizeDecoder()
    msgs = sp.encode_resize(80, 24) + b'{"Width":100,"Height":37}{"Width":1,'
    assert d.feed(msgs[:5]) == []
    assert d.feed(msgs[5:]) == [sp.TerminalSize(80, 24), sp.TerminalSize(100, 37)]
    assert d.feed(b'"Height":2}\n') == [sp.TerminalSize(1, 2)]
    with pytest.raises(ValueError):
        d.feed(b'{"Width":70000,"Height":1}')
    assert sp.negotiate(["v9, v4.channel.k8s.io"], sp.SPDY_REMOTECOMMAND_PROTOCOLS) == sp.V4
    assert sp.expected_streams(sp.V4, True, True, True, tty=True) == {"error", "stdin", "stdout", "resize"}
    assert sp.expected_streams(sp.V2, False, True, True, tty=True) == {"error", "stdout"}
    assert sp.parse_ports({"port": ["80,443"], "ports": ["8080"]}) == [80, 443, 8080]
    with pytest.raises(ValueError):
        sp.parse_ports({"port": ["0"]})


def test_portforward_pairs_legacy_ids():
    class S:
        def __init__(self, sid, **h):
            self.stream_id, self.headers = sid, h
    p = sp.PortForwardPairs()
    assert p.add(S(1, streamtype="error", port="80")) is None
    port, data, err = p.add(S(3, streamtype="data", port="80"))   # pairs by id - 2
    assert (port, data.stream_id, err.stream_id) == (80, 3, 1)
    assert p.add(S(5, streamtype="data", port="81", requestid="x")) is None
    with pytest.raises(ValueError):
        p.add(S(7, streamtype="data", port="81", requestid="x"))
    with pytest.raises(ValueError):
        p.add(S(9, streamtype="bogus", port="81"))
    assert [s.stream_id for s in p.pending()] == [5]
