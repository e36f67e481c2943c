"""WebSocket (RFC 6455), server side, and the Kubernetes channel protocols
on top of it: what kubectl-less clients (the kubernetes Python client,
client-go's WebSocket executor, API servers from 1.36) use for exec,
attach and port-forward.

- upgrade_response(): the opening handshake and subprotocol choice, as
  the kubelet's wsstream does it (client's order of preference; a client
  offering nothing gets "", the v1 channel protocol).
- WebSocket: messages over a connected socket, blocking.  recv() from one
  thread, send*() from any; pings are answered and the close handshake is
  done inside recv().  Frames from the client must be masked; bounds on
  frame and message size close the connection with 1009.
- ChannelConn: the channel.k8s.io family: every message starts with a
  channel byte (an ASCII digit and base64 payload for base64.*); v5 adds
  [255, n]: "no more data on channel n".  A reader thread demultiplexes
  into per-channel buffers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import socket
import struct
import threading
import time
from typing import Iterable, Sequence

from . import streamproto

log = logging.getLogger("pufflet.nodeapi.wsstream")

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_NO_STATUS = 1005      # never sent: "the close frame had no code"
CLOSE_ABNORMAL = 1006       # never sent: "no close frame at all"
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def is_websocket_request(headers: streamproto.HeaderInput) -> bool:
    """As wsstream.IsWebSocketRequest: Upgrade: websocket and an "upgrade"
    token in Connection.  Lets one handler serve SPDY and WebSocket."""
    upgrade = streamproto.header_values(headers, "Upgrade")
    conn = ",".join(streamproto.header_values(headers, "Connection")).lower()
    return bool(upgrade) and upgrade[0].strip().lower() == "websocket" and \
        "upgrade" in [t.strip() for t in conn.split(",")]


def upgrade_response(headers: streamproto.HeaderInput,
                     supported: Sequence[str]) -> streamproto.UpgradeResponse:
    """The answer to a WebSocket opening handshake (RFC 6455 4.2).

    supported lists the subprotocols we accept, "" included if a client
    offering none is welcome.  No match: 403, as x/net/websocket answers a
    failed Handshake hook."""
    if not is_websocket_request(headers):
        return streamproto.http_error(400, "Bad Request", "not a websocket upgrade request", [])
    version = streamproto.header_values(headers, "Sec-WebSocket-Version")
    if [v.strip() for v in version] != ["13"]:
        return streamproto.http_error(426, "Upgrade Required", "unsupported websocket version",
                                      [("Sec-WebSocket-Version", "13")])
    keys = streamproto.header_values(headers, "Sec-WebSocket-Key")
    try:
        ok = len(keys) == 1 and len(base64.b64decode(keys[0].strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        return streamproto.http_error(400, "Bad Request", "bad Sec-WebSocket-Key", [])
    offered = [p.strip() for v in streamproto.header_values(headers, "Sec-WebSocket-Protocol")
               for p in v.split(",") if p.strip()]
    if offered:
        proto = streamproto.negotiate(offered, supported)
    else:
        proto = "" if "" in supported else None
    if proto is None:
        return streamproto.http_error(
            403, "Forbidden",
            f"requested protocol(s) are not supported: {offered}; supports {list(supported)}", [])
    out = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
           ("Sec-WebSocket-Accept", accept_key(keys[0].strip()))]
    if proto:
        out.append(("Sec-WebSocket-Protocol", proto))
    return streamproto.UpgradeResponse(101, "Switching Protocols", out, protocol=proto)


class WebSocketError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class WebSocket:
    """A server-side WebSocket over a connected socket.

    `initial` is whatever followed the HTTP request head in the read
    buffer (a client may send frames right behind its handshake)."""

    def __init__(self, sock: socket.socket, *, max_message: int = 16 * 1024 * 1024,
                 max_frame_out: int | None = None, initial: bytes = b"") -> None:
        self._sock = sock
        self.max_message = max_message
        self.max_frame_out = max_frame_out
        self._buf = bytearray(initial)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._close_sent = False
        self.close_code: int | None = None       # what the peer sent
        self.close_reason = ""
        self.peer_closed = threading.Event()     # close frame received, or EOF
        self._sock_closed = False

    # -- sending --------------------------------------------------------

    def _frame(self, opcode: int, payload: bytes, fin: bool = True) -> bytes:
        n = len(payload)
        b0 = (0x80 if fin else 0) | opcode
        if n < 126:
            head = struct.pack(">BB", b0, n)
        elif n < 65536:
            head = struct.pack(">BBH", b0, 126, n)
        else:
            head = struct.pack(">BBQ", b0, 127, n)
        return head + payload   # servers never mask

    def _send_raw(self, data: bytes) -> None:
        with self._send_lock:
            self._sock.sendall(data)

    def send(self, data: bytes | str, opcode: int | None = None) -> None:
        """Send one message: str as text, bytes as binary unless told."""
        if isinstance(data, str):
            data, opcode = data.encode(), opcode or OP_TEXT
        opcode = opcode or OP_BINARY
        if self._close_sent:
            raise WebSocketError(CLOSE_ABNORMAL, "send after close")
        step = self.max_frame_out or len(data) or 1
        chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
        out = b"".join(
            self._frame(opcode if i == 0 else OP_CONT, c, i == len(chunks) - 1)
            for i, c in enumerate(chunks))
        self._send_raw(out)

    def send_binary(self, data: bytes) -> None:
        self.send(data, OP_BINARY)

    def ping(self, payload: bytes = b"") -> None:
        if len(payload) > 125:
            raise ValueError("ping payload over 125 bytes")
        self._send_raw(self._frame(OP_PING, payload))

    def _send_close(self, code: int, reason: str = "") -> None:
        with self._send_lock:
            if self._close_sent:
                return
            self._close_sent = True
            body = b"" if code == CLOSE_NO_STATUS else struct.pack(">H", code) + reason.encode()[:123]
            try:
                self._sock.sendall(self._frame(OP_CLOSE, body))
            except OSError:
                pass

    # -- receiving ------------------------------------------------------

    def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            data = self._sock.recv(max(65536, n - len(self._buf)))
            if not data:
                return False
            self._buf += data
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _read_frame(self) -> tuple[bool, int, bytes] | None:
        if not self._fill(2):
            return None
        b0, b1 = self._buf[0], self._buf[1]
        fin, rsv, opcode = bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F
        masked, n = bool(b1 & 0x80), b1 & 0x7F
        if rsv:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
        if opcode not in (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG):
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if not masked:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "client frame not masked")
        control = opcode >= 0x8
        if control and (n > 125 or not fin):
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "bad control frame")
        hlen = 2
        if n == 126:
            if not self._fill(4):
                return None
            (n,) = struct.unpack_from(">H", self._buf, 2)
            hlen = 4
        elif n == 127:
            if not self._fill(10):
                return None
            (n,) = struct.unpack_from(">Q", self._buf, 2)
            if n >> 63:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "bad length")
            hlen = 10
        if n > self.max_message:
            raise WebSocketError(CLOSE_TOO_BIG, f"frame of {n} bytes")
        if not self._fill(hlen + 4 + n):
            return None
        del self._buf[:hlen]
        mask = self._take(4)
        payload = self._take(n)
        # XOR with the 4-byte key, a big integer at a time.
        if n:
            key = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")) \
                .to_bytes(n, "little")
        return fin, opcode, payload

    def recv(self) -> tuple[int, bytes] | None:
        """The next message as (OP_TEXT or OP_BINARY, payload), or None once
        the connection is closed (close_code then says how)."""
        with self._recv_lock:
            try:
                return self._recv()
            except WebSocketError as e:
                log.debug("websocket: %s", e)
                self._fail(e.code, str(e))
                return None
            except OSError:
                self.close_code = self.close_code or CLOSE_ABNORMAL
                self.peer_closed.set()
                return None

    def _fail(self, code: int, reason: str) -> None:
        self.close_code = code
        self._send_close(code, reason)
        self.peer_closed.set()
        self.shutdown()

    def _recv(self) -> tuple[int, bytes] | None:
        parts: list[bytes] = []
        size, msg_op = 0, None
        while True:
            if self.peer_closed.is_set():
                return None
            fr = self._read_frame()
            if fr is None:
                self.close_code = self.close_code or CLOSE_ABNORMAL
                self.peer_closed.set()
                return None
            fin, op, payload = fr
            if op == OP_PING:
                if not self._close_sent:
                    self._send_raw(self._frame(OP_PONG, payload))
                continue
            if op == OP_PONG:
                continue
            if op == OP_CLOSE:
                self._on_close(payload)
                return None
            if op == OP_CONT:
                if msg_op is None:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "continuation without a message")
            else:
                if msg_op is not None:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                msg_op = op
            size += len(payload)
            if size > self.max_message:
                raise WebSocketError(CLOSE_TOO_BIG, "message too big")
            parts.append(payload)
            if not fin:
                continue
            data = b"".join(parts)
            if self._close_sent:
                # Closing: data that crosses our close frame is dropped.
                parts, size, msg_op = [], 0, None
                continue
            if msg_op == OP_TEXT:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    raise WebSocketError(CLOSE_INVALID_DATA, "text message not UTF-8") from None
            return msg_op, data

    def _on_close(self, payload: bytes) -> None:
        if len(payload) == 1:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close frame of 1 byte")
        code = CLOSE_NO_STATUS
        if payload:
            (code,) = struct.unpack_from(">H", payload)
            valid = code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) \
                or 3000 <= code <= 4999
            if not valid:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
            try:
                self.close_reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise WebSocketError(CLOSE_INVALID_DATA, "close reason not UTF-8") from None
        self.close_code = code
        # Echo the code, then the server closes TCP first (RFC 6455 7.1.1).
        self._send_close(code if code != CLOSE_NO_STATUS else CLOSE_NORMAL)
        self.peer_closed.set()
        self.shutdown()

    # -- closing --------------------------------------------------------

    def close(self, code: int = CLOSE_NORMAL, reason: str = "", wait: float = 2.0) -> None:
        """Close handshake: send our close frame, wait up to `wait` seconds
        for the peer's, then close the socket.  If another thread is in
        recv() it sees the reply; otherwise we read (and drop) until it."""
        self._send_close(code, reason)
        if self._recv_lock.acquire(timeout=0):
            try:
                deadline = time.monotonic() + wait
                while not self.peer_closed.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._sock.settimeout(left)
                    try:
                        if self._recv() is None:
                            break
                    except (WebSocketError, OSError):
                        break
            finally:
                self._recv_lock.release()
        else:
            self.peer_closed.wait(wait)
        self.shutdown()

    def shutdown(self) -> None:
        """Close the socket (idempotent): FIN first, then release it."""
        if self._sock_closed:
            return
        self._sock_closed = True
        try:
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        try:
            self._sock.close()
        except OSError:
            pass


class ChannelConn:
    """The Kubernetes channel protocol over a WebSocket.

    protocol is the negotiated subprotocol; channels the number of channels
    (5 for remotecommand, 2 per port for port-forward); readable the
    channels whose inbound data we keep (the kubelet drops what arrives on
    a channel it only writes).  A reader thread fills per-channel buffers
    and stops reading the socket while one holds more than max_buffered,
    so a slow consumer pushes back through TCP."""

    def __init__(self, ws: WebSocket, protocol: str, channels: int,
                 readable: Iterable[int] | None = None,
                 max_buffered: int = 1024 * 1024) -> None:
        self.ws = ws
        self.protocol = protocol
        self.base64 = protocol.startswith("base64.") or ".base64." in protocol
        self.stream_close = protocol == streamproto.V5
        self.channels = channels
        self.readable = set(range(channels) if readable is None else readable)
        self._max = max_buffered
        self._cond = threading.Condition()
        self._bufs = {c: bytearray() for c in self.readable}
        self._eof: set[int] = set()
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._read_loop, name="ws-channels", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        try:
            while True:
                msg = self.ws.recv()
                if msg is None:
                    break
                _op, data = msg
                if not data:
                    continue
                if self.stream_close and data[0] == streamproto.CHANNEL_CLOSE:
                    if len(data) != 2:
                        # As the kubelet: a malformed close ends the session.
                        self.ws.close(CLOSE_PROTOCOL_ERROR, "bad stream close signal")
                        break
                    with self._cond:
                        self._eof.add(data[1])
                        self._cond.notify_all()
                    continue
                ch = data[0] - (0x30 if self.base64 else 0)
                payload = data[1:]
                if ch not in self.readable:
                    continue
                if self.base64:
                    try:
                        payload = base64.b64decode(payload)
                    except (binascii.Error, ValueError):
                        continue
                with self._cond:
                    if ch in self._eof:
                        continue
                    self._bufs[ch] += payload
                    self._cond.notify_all()
                    while len(self._bufs[ch]) > self._max and not self.closed.is_set():
                        self._cond.wait(1.0)
        finally:
            with self._cond:
                self.closed.set()
                self._cond.notify_all()

    def read(self, channel: int, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        """Data that arrived on a channel; b"" at its end (v5 close signal
        or the connection closed).  TimeoutError after timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            buf = self._bufs[channel]
            while not buf:
                if channel in self._eof or self.closed.is_set():
                    return b""
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("channel read timed out")
                self._cond.wait(left)
            data = bytes(buf[:max_bytes])
            del buf[:len(data)]
            self._cond.notify_all()
            return data

    def write(self, channel: int, data: bytes) -> None:
        """One message on a channel (an empty one is legal: the kubelet
        sends one first, to tell the client the streams are up)."""
        if self.base64:
            self.ws.send(chr(0x30 + channel) + base64.b64encode(data).decode(), OP_TEXT)
        else:
            self.ws.send(bytes([channel]) + data, OP_BINARY)

    def close_channel(self, channel: int) -> None:
        """v5: tell the peer we write no more on this channel."""
        if not self.stream_close:
            raise ValueError(f"{self.protocol or 'this protocol'} has no stream close signal")
        self.ws.send(bytes([streamproto.CHANNEL_CLOSE, channel]), OP_BINARY)

    def close(self, code: int = CLOSE_NORMAL, wait: float = 2.0) -> None:
        self.ws.close(code, wait=wait)
        with self._cond:
            self.closed.set()
            self._cond.notify_all()
        self._thread.join(wait)


def remotecommand_readable(stdin: bool) -> set[int]:
    """Channels a remotecommand server reads: stdin if asked, and resize
    (the kubelet always opens it)."""
    return ({streamproto.CHANNEL_STDIN} if stdin else set()) | {streamproto.CHANNEL_RESIZE}


def first_write_channel(stdout: bool, stderr: bool) -> int:
    """The kubelet writes an empty message on the lowest channel it will
    write, to tell the client the connection is set up."""
    if stdout:
        return streamproto.CHANNEL_STDOUT
    if stderr:
        return streamproto.CHANNEL_STDERR
    return streamproto.CHANNEL_ERROR
