"""The node API's HTTPS server: connections, requests, routes.

One thread per connection, as the kubelet's Go server has one goroutine
per connection: a `logs -f` or an exec stream may last hours, and must not
hold up anybody else.  The number of connections is bounded, and every
read has a deadline, so a client that connects and says nothing (or says
too much) costs one thread for a bounded time, never the server.

The TLS handshake is done in the connection's thread, not the accept loop:
a slow handshake must not stop the next client from being accepted.

Every request is authenticated and authorized (nodeapi/auth.py) before a
route sees it, unknown paths included, so an unauthenticated caller learns
nothing, not even which paths exist.  A handler writes its own response
with the Request's helpers, or takes the connection over (hijack) for the
SPDY and WebSocket upgrades of exec, attach and portForward.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Callable, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("pufflet.nodeapi")

MAX_CONNECTIONS = 512
MAX_REQUEST_LINE = 8192
MAX_HEADERS = 64 * 1024     # all header lines together
MAX_HEADER_COUNT = 100
MAX_BODY = 1 << 20          # our endpoints take no body worth more
HANDSHAKE_TIMEOUT = 10.0
HEADER_TIMEOUT = 10.0       # from the first byte of a request to its blank line
IDLE_TIMEOUT = 90.0         # a kept-alive connection with no request
WRITE_TIMEOUT = 60.0        # a client that reads nothing for this long is gone
LINGER = 1.0                # draining a refused request before closing
MAX_LINGER_BYTES = 256 * 1024

REASONS = {200: "OK", 101: "Switching Protocols", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
           413: "Payload Too Large", 414: "URI Too Long", 422: "Unprocessable Entity",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable"}


class HTTPError(Exception):
    """Answer the request with this status and message, text/plain."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or REASONS.get(status, ""))
        self.status = status


class _Closed(Exception):
    """The client went away or broke the protocol: drop the connection."""


class Headers:
    """Request headers, names case-insensitive, repeated names kept."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for k, v in self.items:
            if k.lower() == name:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.items if k.lower() == name]

    def remove(self, name: str) -> None:
        name = name.lower()
        self.items = [(k, v) for k, v in self.items if k.lower() != name]

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None


class _Conn:
    """A TLS connection and what has been read from it but not consumed."""

    def __init__(self, sock: ssl.SSLSocket, peer: tuple) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = b""

    def fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, OSError) as e:
            raise _Closed(str(e)) from None
        if not data:
            raise _Closed("EOF")
        self.buf += data

    def read_head(self) -> bytes:
        """Bytes up to and including the blank line ending the headers."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head, self.buf = self.buf[:end + 4], self.buf[end + 4:]
                return head
            if len(self.buf) > MAX_REQUEST_LINE + MAX_HEADERS:
                raise HTTPError(431)
            self.fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (socket.timeout, OSError) as e:
            raise _Closed(str(e)) from None


class Request:
    """One HTTP request; the handler answers it through this object."""

    def __init__(self, conn: _Conn, method: str, target: str, version: str,
                 headers: Headers, body: bytes = b"") -> None:
        self._conn = conn
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body
        parts = urlsplit(target)
        self.path = unquote(parts.path)
        # Blank values count ("?follow" is follow=true for the kubelet).
        self.query: dict[str, list[str]] = parse_qs(parts.query, keep_blank_values=True)
        self.peer = conn.peer
        self.user = ""
        self.groups: tuple[str, ...] = ()
        self.uid = ""
        self.extra: dict[str, list[str]] = {}
        self.started = False        # a status line went out
        self.finished = False       # the whole response went out
        self.hijacked = False
        self.close_after = False    # no keep-alive after this response
        self._chunked = False

    # -- reading ----------------------------------------------------------

    def arg(self, name: str) -> str | None:
        """The first value of a query parameter, None if absent."""
        v = self.query.get(name)
        return v[0] if v else None

    @property
    def connection(self) -> ssl.SSLSocket:
        """The raw TLS socket (for protocol upgrades, see hijack)."""
        return self._conn.sock

    @property
    def buffered(self) -> bytes:
        """Bytes the client sent after this request, already read."""
        return self._conn.buf

    def hijack(self) -> tuple[ssl.SSLSocket, bytes]:
        """Take the connection over: the server will not write, read or
        close it again.  Returns the socket and what was read past the
        request; the caller sets its own timeouts."""
        self.hijacked = True
        self.finished = True
        data, self._conn.buf = self._conn.buf, b""
        return self._conn.sock, data

    # -- writing ----------------------------------------------------------

    def start(self, status: int, headers: dict[str, str] | None = None,
              length: int | None = None) -> None:
        """Send the status line and headers; without a length the body is
        chunked (write(), then end())."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
        hdrs = dict(headers or {})
        if status != 101:
            if length is None:
                hdrs["Transfer-Encoding"] = "chunked"
                self._chunked = True
            else:
                hdrs["Content-Length"] = str(length)
            if self.close_after:
                hdrs["Connection"] = "close"
        hdrs.setdefault("Date", _http_date())
        lines += [f"{k}: {v}" for k, v in hdrs.items()]
        self._conn.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked:
            self._conn.send(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._conn.send(data)

    def end(self) -> None:
        if self._chunked:
            self._conn.send(b"0\r\n\r\n")
        self.finished = True

    def send(self, status: int, body: bytes | str = b"",
             content_type: str = "text/plain; charset=utf-8",
             headers: dict[str, str] | None = None) -> None:
        """A whole response at once."""
        if isinstance(body, str):
            body = body.encode()
        hdrs = {"Content-Type": content_type}
        hdrs.update(headers or {})
        self.start(status, hdrs, length=len(body))
        self._conn.send(body)
        self.finished = True

    def client_gone(self) -> bool:
        """Has the client closed its side?  For long responses that may go
        quiet (logs -f): a request may send nothing more, so anything
        readable is EOF, an error, or bytes we may drop."""
        sock = self._conn.sock
        try:
            sock.setblocking(False)
            try:
                data = sock.recv(4096)
            finally:
                sock.settimeout(WRITE_TIMEOUT)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True
        return not data


Handler = Callable[[Request, "re.Match[str]"], None]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: "re.Pattern[str]"
    subresource: str
    handler: Handler


class Gate(Protocol):
    """Authentication and authorization (nodeapi/auth.py): fills in
    req.user and req.groups, or raises HTTPError(401/403/500)."""

    def check(self, req: Request, subresource: str) -> None: ...


class Server:
    """The node API on one listening socket."""

    def __init__(self, ctx: ssl.SSLContext, gate: Gate, *,
                 max_connections: int = MAX_CONNECTIONS,
                 idle_timeout: float = IDLE_TIMEOUT,
                 header_timeout: float = HEADER_TIMEOUT) -> None:
        self.ctx = ctx
        self.gate = gate
        self.routes: list[Route] = []
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.stop = threading.Event()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._conns: dict[object, socket.socket] = {}   # for close() to cut
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def set_context(self, ctx: ssl.SSLContext) -> None:
        """Serve new connections with ctx (a new serving certificate),
        without a restart.  Each handshake reads self.ctx once, and an
        attribute assignment is atomic, so no lock: a connection gets the
        old context or the new one, and open connections keep theirs."""
        self.ctx = ctx

    def add_route(self, method: str, regex: str, subresource: str, handler: Handler) -> None:
        """handler(req, match) for method on paths fully matching regex,
        authorized as nodes/<subresource>."""
        self.routes.append(Route(method, re.compile(regex), subresource, handler))

    # -- lifecycle --------------------------------------------------------

    def listen(self, address: str, port: int) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        s.listen(128)
        self._listener = s
        return s.getsockname()[:2]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="nodeapi-accept",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        if self._listener is not None:
            # shutdown wakes the thread blocked in accept(2) on Linux.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self.stop.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError:
                if self.stop.is_set():
                    return
                continue
            if not self._slots.acquire(blocking=False):
                # Refused at once rather than queued: a client told "no"
                # retries elsewhere or later; one left hanging holds its
                # own resources and ours.
                log.warning("node API: %d connections, refusing %s", self.max_connections,
                            peer[0])
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock, peer), name="nodeapi-conn",
                             daemon=True).start()

    # -- one connection ---------------------------------------------------

    def _serve(self, raw: socket.socket, peer: tuple) -> None:
        key = object()
        with self._lock:
            self._conns[key] = raw
        sock: socket.socket = raw
        hijacked = False
        try:
            # As Go (so the kubelet) does on every connection: a response
            # goes out as head then body, and with Nagle the body would
            # wait for the client's delayed ACK, ~40 ms a request.
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(HANDSHAKE_TIMEOUT)
            try:
                sock = self.ctx.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError) as e:
                # A wrong CA, an expired certificate or a port scanner: the
                # client learns it from the alert, the log at debug only.
                log.debug("node API: TLS handshake with %s failed: %s", peer[0], e)
                return
            with self._lock:
                self._conns[key] = sock     # raw gave its fd to sock
            conn = _Conn(sock, peer)
            while not self.stop.is_set():
                req = self._next_request(conn)
                if req is None:
                    break
                self._dispatch(req)
                if req.hijacked:
                    # The handler owns the socket now.  Streams are served
                    # before the handler returns, so the connection slot
                    # was held for as long as the stream lasted.
                    hijacked = True
                    return
                if not req.finished or req.close_after:
                    break
        finally:
            with self._lock:
                self._conns.pop(key, None)
            self._slots.release()
            if not hijacked:
                try:
                    sock.close()
                except OSError:
                    pass

    def _next_request(self, conn: _Conn) -> Request | None:
        conn.sock.settimeout(self.idle_timeout)
        try:
            if not conn.buf:
                conn.fill()
            conn.sock.settimeout(self.header_timeout)
            head = conn.read_head()
            req = _parse_head(conn, head)
            _read_body(conn, req)
        except _Closed:
            return None
        except HTTPError as e:
            _reject(conn, e)
            return None
        conn.sock.settimeout(WRITE_TIMEOUT)
        return req

    def _dispatch(self, req: Request) -> None:
        route, match, allowed = self._route(req.path, req.method)
        try:
            # Everything is checked, a 404 too: see the module's comment.
            self.gate.check(req, route.subresource if route else "proxy")
            if route is None:
                raise HTTPError(405 if allowed else 404,
                                "405: Method Not Allowed" if allowed else "404 page not found")
            route.handler(req, match)
            if not req.finished and not req.hijacked:
                if req.started:
                    req.end()
                else:
                    req.send(200)
        except HTTPError as e:
            if req.started:
                req.close_after = True      # mid-body: nothing else can be said
            else:
                hdrs = {"WWW-Authenticate": 'Bearer realm="kubelet"'} if e.status == 401 else None
                req.send(e.status, str(e) + "\n", headers=hdrs)
        except _Closed:
            req.close_after = True
        except Exception:       # noqa: BLE001 - one bad request must not kill the thread
            log.exception("node API: %s %s", req.method, req.path)
            req.close_after = True
            if not req.started and not req.hijacked:
                try:
                    req.send(500, "Internal Server Error\n")
                except _Closed:
                    pass
        finally:
            log.debug("node API: %s %s %s user=%s", req.peer[0], req.method, req.path,
                      req.user or "-")

    def _route(self, path: str, method: str):
        allowed = False
        for r in self.routes:
            m = r.pattern.fullmatch(path)
            if m is None:
                continue
            if r.method == method:
                return r, m, True
            allowed = True
        return None, None, allowed


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


def _parse_head(conn: _Conn, head: bytes) -> Request:
    lines = head[:-4].split(b"\r\n")
    if len(lines[0]) > MAX_REQUEST_LINE:
        raise HTTPError(414, "request line too long")
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "malformed request line") from None
    if not _TOKEN.match(method) or version not in ("HTTP/1.1", "HTTP/1.0") \
            or not target.startswith("/"):
        raise HTTPError(400, "malformed request line")
    if len(lines) - 1 > MAX_HEADER_COUNT:
        raise HTTPError(431)
    items = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name.decode("latin-1")):
            raise HTTPError(400, "malformed header")
        items.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    req = Request(conn, method, target, version, Headers(items))
    connection = (req.headers.get("Connection") or "").lower()
    if version == "HTTP/1.0" or "close" in connection:
        req.close_after = True
    return req


def _read_body(conn: _Conn, req: Request) -> None:
    if req.headers.get("Transfer-Encoding"):
        # Nothing the node API serves takes a streamed body.
        raise HTTPError(411)
    length = req.headers.get("Content-Length")
    if length is None:
        return
    if not length.isdigit():
        raise HTTPError(400, "bad Content-Length")
    n = int(length) if len(length) < 12 else MAX_BODY + 1
    if n > MAX_BODY:
        raise HTTPError(413)
    req.body = conn.read_exact(n)


def _reject(conn: _Conn, e: HTTPError) -> None:
    body = (str(e) + "\n").encode()
    try:
        conn.send(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                  % (e.status, REASONS.get(e.status, "Error").encode(), len(body), body))
    except _Closed:
        return
    _linger(conn.sock)


def _linger(sock: ssl.SSLSocket) -> None:
    """Close gently after refusing a request still being sent: closing with
    unread input makes TCP send a reset, and a reset makes the client drop
    our answer unread.  So stop writing, and drain a bounded amount for a
    bounded time first."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(LINGER)
        deadline = time.monotonic() + LINGER
        drained = 0
        while drained < MAX_LINGER_BYTES and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except (OSError, ValueError):
        pass


def _http_date() -> str:
    return formatdate(usegmt=True)
