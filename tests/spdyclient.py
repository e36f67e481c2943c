"""A minimal SPDY/3.1 client for tests, written apart from
pufflet/nodeapi/spdy.py and sharing no code with it, so that each checks
the other.  It plays the part of client-go: HTTP Upgrade, then streams
with headers, data, FIN, PING, GOAWAY, and flow control it can be told to
obey or to ignore (spdystream ignores it).  It can also put raw bytes on
the wire, for the malformed-frame tests.

Blocking style: one reader thread files every frame it receives (frames
are also kept in order in .frames); tests wait on conditions.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
import time
import zlib

# The SPDY/3 header dictionary, from draft 3 section 2.6.10.1: the words
# below, each with a 4-byte big-endian length in front, then raw text.
_WORDS = ("options|head|post|put|delete|trace|accept|accept-charset|"
          "accept-encoding|accept-language|accept-ranges|age|allow|authorization|"
          "cache-control|connection|content-base|content-encoding|content-language|"
          "content-length|content-location|content-md5|content-range|content-type|"
          "date|etag|expect|expires|from|host|if-match|if-modified-since|"
          "if-none-match|if-range|if-unmodified-since|last-modified|location|"
          "max-forwards|pragma|proxy-authenticate|proxy-authorization|range|"
          "referer|retry-after|server|te|trailer|transfer-encoding|upgrade|"
          "user-agent|vary|via|warning|www-authenticate|method|get|status|200 OK|"
          "version|HTTP/1.1|url|public|set-cookie|keep-alive|origin")
_STATUS = "100 101 201 202 205 206 300 302 303 304 305 306 307 402 405 406 407 " \
          "408 409 410 411 412 413 414 415 416 417 502 504 505".split()
_TEXT = ("203 Non-Authoritative Information204 No Content301 Moved Permanently"
         "400 Bad Request401 Unauthorized403 Forbidden404 Not Found"
         "500 Internal Server Error501 Not Implemented503 Service Unavailable"
         "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
         "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
         "chunked,text/html,image/png,image/jpg,image/gif,application/xml,"
         "application/xhtml+xml,text/plain,text/javascript,public"
         "privatemax-age=gzip,deflate,sdch"
         "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.")


def _dictionary() -> bytes:
    out = bytearray()
    for w in _WORDS.split("|"):
        out += len(w).to_bytes(4, "big")
        out += w.encode("ascii")
    out += "".join(_STATUS).encode("ascii")
    out += _TEXT.encode("ascii")
    return bytes(out)


SPDY3_DICT = _dictionary()

T_SYN_STREAM, T_SYN_REPLY, T_RST, T_SETTINGS, T_PING, T_GOAWAY, T_HEADERS, T_WINDOW = \
    1, 2, 3, 4, 6, 7, 8, 9


class Deflater:
    def __init__(self):
        self.z = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, SPDY3_DICT)

    def block(self, headers: dict) -> bytes:
        raw = len(headers).to_bytes(4, "big")
        for k, v in headers.items():
            kb, vb = k.lower().encode(), (v if isinstance(v, str) else "\x00".join(v)).encode()
            raw += len(kb).to_bytes(4, "big") + kb + len(vb).to_bytes(4, "big") + vb
        return self.z.compress(raw) + self.z.flush(zlib.Z_SYNC_FLUSH)


class Inflater:
    def __init__(self):
        self.z = zlib.decompressobj(15, SPDY3_DICT)

    def block(self, data: bytes) -> dict:
        raw = self.z.decompress(data)
        n = int.from_bytes(raw[:4], "big")
        i, out = 4, {}
        for _ in range(n):
            ln = int.from_bytes(raw[i:i + 4], "big")
            k = raw[i + 4:i + 4 + ln].decode()
            i += 4 + ln
            ln = int.from_bytes(raw[i:i + 4], "big")
            out[k] = raw[i + 4:i + 4 + ln].decode()
            i += 4 + ln
        assert i == len(raw), "trailing bytes in header block"
        return out


def ctrl(ftype: int, flags: int, body: bytes, version: int = 3) -> bytes:
    return bytes([0x80 | (version >> 8), version & 0xFF]) + ftype.to_bytes(2, "big") + \
        bytes([flags]) + len(body).to_bytes(3, "big") + body


def data_frame(sid: int, data: bytes, fin: bool = False) -> bytes:
    return sid.to_bytes(4, "big") + bytes([1 if fin else 0]) + len(data).to_bytes(3, "big") + data


def parse_one(buf: bytes, inflater: Inflater):
    """(frame dict, bytes used) or (None, 0) if buf holds no whole frame."""
    if len(buf) < 8:
        return None, 0
    length = int.from_bytes(buf[5:8], "big")
    if len(buf) < 8 + length:
        return None, 0
    flags, body = buf[4], bytes(buf[8:8 + length])
    if buf[0] & 0x80:
        version = int.from_bytes(buf[0:2], "big") & 0x7FFF
        t = int.from_bytes(buf[2:4], "big")
        f = {"type": t, "flags": flags, "version": version}
        u32 = lambda o: int.from_bytes(body[o:o + 4], "big") & 0x7FFFFFFF  # noqa: E731
        if t == T_SYN_STREAM:
            f.update(sid=u32(0), assoc=u32(4), pri=body[8] >> 5, slot=body[9],
                     headers=inflater.block(body[10:]))
        elif t in (T_SYN_REPLY, T_HEADERS):
            f.update(sid=u32(0), headers=inflater.block(body[4:]))
        elif t == T_RST:
            f.update(sid=u32(0), status=int.from_bytes(body[4:8], "big"))
        elif t == T_SETTINGS:
            n = int.from_bytes(body[:4], "big")
            f["settings"] = {int.from_bytes(body[4 + 8 * i + 1:4 + 8 * i + 4], "big"):
                             int.from_bytes(body[8 + 8 * i:12 + 8 * i], "big") for i in range(n)}
        elif t == T_PING:
            f["id"] = int.from_bytes(body, "big")
        elif t == T_GOAWAY:
            f.update(last=u32(0), status=int.from_bytes(body[4:8], "big"))
        elif t == T_WINDOW:
            f.update(sid=u32(0), delta=u32(4))
        else:
            f["body"] = body
    else:
        f = {"type": "data", "sid": int.from_bytes(buf[0:4], "big"), "flags": flags, "data": body}
    return f, 8 + length


WINDOW_BATCH = 32768


class CStream:
    def __init__(self, sid: int, headers: dict):
        self.sid = sid
        self.headers = headers
        self.reply_headers: dict | None = None
        self.data = bytearray()
        self.fin = False
        self.rst: int | None = None
        self.send_window = 65536


class SpdyClient:
    def __init__(self, sock, *, flow_control: bool = True, window_updates: bool = True):
        self.sock = sock
        self.flow_control = flow_control          # obey the server's windows
        self.window_updates = window_updates      # give window back as data comes
        self.deflate = Deflater()
        self.inflate = Inflater()
        self.wlock = threading.Lock()
        self.cond = threading.Condition()
        self.frames: list[dict] = []
        self.streams: dict[int, CStream] = {}
        self.next_sid = 1
        self.session_window = 65536
        self.initial_window = 65536
        self.unacked: dict[int, int] = {}         # consumed, not yet given back
        self.eof = False
        self.protocol = None
        self.status = None
        self.response_headers: dict[str, list[str]] = {}
        self.body = b""
        self._leftover = b""

    # -- connection --------------------------------------------------------

    @classmethod
    def connect(cls, addr, protocols, *, path="/exec/ns/pod/c?command=sh", tls: ssl.SSLContext | None = None,
                extra_headers=(), reader: bool = True, **kw) -> "SpdyClient":
        raw = socket.create_connection(addr, timeout=10)
        sock = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
        sock.settimeout(None)
        c = cls(sock, **kw)
        req = [f"POST {path} HTTP/1.1", f"Host: {addr[0]}:{addr[1]}",
               "Connection: Upgrade", "Upgrade: SPDY/3.1"]
        req += [f"X-Stream-Protocol-Version: {p}" for p in protocols]
        req += [f"{k}: {v}" for k, v in extra_headers]
        sock.sendall(("\r\n".join(req) + "\r\n\r\n").encode())
        c._read_response()
        # reader=False: a client that never reads what the server sends
        # (a stalled kubectl, a dead peer whose TCP window is closed).
        if c.status == 101 and reader:
            threading.Thread(target=c._reader, daemon=True).start()
        return c

    def _read_response(self) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = self.sock.recv(4096)
            if not d:
                raise ConnectionError("closed during handshake")
            buf += d
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for ln in lines[1:]:
            k, v = ln.split(":", 1)
            self.response_headers.setdefault(k.strip().lower(), []).append(v.strip())
        self.protocol = (self.response_headers.get("x-stream-protocol-version") or [None])[0]
        if self.status == 101:
            self._leftover = rest
        else:
            n = int((self.response_headers.get("content-length") or ["0"])[0])
            while len(rest) < n:
                rest += self.sock.recv(4096)
            self.body = rest

    def _reader(self) -> None:
        buf = bytearray(self._leftover)
        try:
            while True:
                while True:
                    f, used = parse_one(buf, self.inflate)
                    if f is None:
                        break
                    del buf[:used]
                    self._file(f)
                d = self.sock.recv(65536)
                if not d:
                    break
                buf += d
        except (OSError, ValueError):
            pass
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def _file(self, f: dict) -> None:
        wu = []
        with self.cond:
            self.frames.append(f)
            t = f["type"]
            st = self.streams.get(f.get("sid", -1))
            if t == "data" and st is not None:
                st.data += f["data"]
                if f["flags"] & 1:
                    st.fin = True
                if self.window_updates and f["data"]:
                    # Given back in batches of half a window, as Go's
                    # http2 and our server do: one frame per data frame
                    # would cost a TLS record each way per keystroke.
                    for sid in (st.sid, 0):
                        self.unacked[sid] = self.unacked.get(sid, 0) + len(f["data"])
                        if self.unacked[sid] >= WINDOW_BATCH:
                            wu.append((sid, self.unacked.pop(sid)))
            elif t == T_SYN_REPLY and st is not None:
                st.reply_headers = f["headers"]
                st.fin = st.fin or bool(f["flags"] & 1)
            elif t == T_RST and st is not None:
                st.rst = f["status"]
            elif t == T_WINDOW:
                if f["sid"] == 0:
                    self.session_window += f["delta"]
                elif st is not None:
                    st.send_window += f["delta"]
            elif t == T_SETTINGS and 7 in f["settings"]:
                delta = f["settings"][7] - self.initial_window
                self.initial_window = f["settings"][7]
                for s in self.streams.values():
                    s.send_window += delta
            self.cond.notify_all()
        if t == T_PING and f["id"] % 2 == 0:
            self.send_raw(ctrl(T_PING, 0, f["id"].to_bytes(4, "big")))   # echo server pings
        if wu:
            self.send_raw(b"".join(ctrl(T_WINDOW, 0, sid.to_bytes(4, "big") + n.to_bytes(4, "big"))
                                   for sid, n in wu))

    # -- sending -------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        with self.wlock:
            self.sock.sendall(data)

    def open(self, headers: dict, fin: bool = False) -> CStream:
        with self.wlock:
            sid = self.next_sid
            self.next_sid += 2
            st = CStream(sid, headers)
            st.send_window = self.initial_window
            with self.cond:
                self.streams[sid] = st
            body = sid.to_bytes(4, "big") + b"\0\0\0\0" + bytes([0, 0]) + self.deflate.block(headers)
            self.sock.sendall(ctrl(T_SYN_STREAM, 1 if fin else 0, body))
        return st

    def send(self, st: CStream, data: bytes, fin: bool = False, timeout: float = 20) -> None:
        pos = 0
        while pos < len(data) or fin:
            with self.cond:
                n = min(len(data) - pos, 16384)
                if self.flow_control and n:
                    end = time.monotonic() + timeout
                    while min(st.send_window, self.session_window) <= 0:
                        if not self.cond.wait(end - time.monotonic()) and time.monotonic() > end:
                            raise TimeoutError("no window")
                    n = min(n, st.send_window, self.session_window)
                st.send_window -= n
                self.session_window -= n
            last = pos + n >= len(data)
            self.send_raw(data_frame(st.sid, data[pos:pos + n], fin and last))
            pos += n
            if last:
                break

    def window_update(self, sid: int, delta: int) -> None:
        self.send_raw(ctrl(T_WINDOW, 0, sid.to_bytes(4, "big") + delta.to_bytes(4, "big")))

    def ping(self, pid: int = 1, timeout: float = 5) -> bool:
        self.send_raw(ctrl(T_PING, 0, pid.to_bytes(4, "big")))
        return self.wait(lambda: any(f["type"] == T_PING and f["id"] == pid for f in self.frames),
                         timeout)

    def rst(self, st: CStream, status: int = 5) -> None:
        self.send_raw(ctrl(T_RST, 0, st.sid.to_bytes(4, "big") + status.to_bytes(4, "big")))

    def goaway(self, last: int = 0, status: int = 0) -> None:
        self.send_raw(ctrl(T_GOAWAY, 0, last.to_bytes(4, "big") + status.to_bytes(4, "big")))

    def close(self) -> None:
        """As spdystream: GOAWAY, then close the connection."""
        try:
            self.goaway()
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # Let the reader see EOF before the fd goes: a reader about to
        # enter SSL_read on a closed fd number would read from whatever
        # connection gets that number next.
        self.wait(lambda: self.eof, 5)
        self.sock.close()

    # -- waiting -------------------------------------------------------------

    def wait(self, pred, timeout: float = 10) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def wait_reply(self, st: CStream, timeout: float = 10) -> dict:
        assert self.wait(lambda: st.reply_headers is not None or st.rst is not None, timeout), \
            f"no reply on stream {st.sid}"
        assert st.rst is None, f"stream {st.sid} reset: {st.rst}"
        return st.reply_headers

    def read_all(self, st: CStream, timeout: float = 20) -> bytes:
        assert self.wait(lambda: st.fin or st.rst is not None or self.eof, timeout), \
            f"stream {st.sid} did not finish"
        return bytes(st.data)

    def frames_of(self, ftype) -> list[dict]:
        with self.cond:
            return [f for f in self.frames if f["type"] == ftype]


def parse_exit_code(status_json: bytes) -> int:
    """The exit code in a v4 error-stream Status, read the way client-go
    reads it (independently of pufflet's streamproto)."""
    s = json.loads(status_json)
    if s["status"] == "Success":
        return 0
    assert s["reason"] == "NonZeroExitCode", s
    for cause in s["details"]["causes"]:
        if cause["reason"] == "ExitCode":
            return int(cause["message"])
    raise AssertionError(f"no ExitCode cause: {s}")


def pack_u32(*vals: int) -> bytes:
    return struct.pack(">" + "I" * len(vals), *vals)
