"""SPDY/3.1, server side: what the API server speaks to a kubelet's
/exec, /attach and /portForward up to Kubernetes 1.35.

Three layers, usable separately:

- frames: dataclasses, FrameEncoder and FrameDecoder.  Header blocks are
  zlib with the SPDY/3 dictionary, and one deflate (or inflate) context per
  direction lasts the whole session: every header block depends on all the
  ones before it, so they must be encoded in wire order and every one
  received must be inflated, even for a stream we refuse.
- upgrade_response(): the HTTP/1.1 Upgrade handshake, with the kubelet's
  protocol negotiation and its error answers.
- Session: streams over a connected socket (plain or TLS).  It runs two
  threads, a reader and a writer, and the application uses blocking calls
  from its own threads (accept, Stream.read/write/close/reset).  The reader
  never writes to the socket: what it must send (PING echo, WINDOW_UPDATE,
  RST_STREAM, GOAWAY) is queued for the writer, so a peer that stops
  reading cannot wedge frame processing.

Flow control (SPDY/3.1): per stream and per session, 64 KiB initially.
We send WINDOW_UPDATE as the application consumes data, and respect the
peer's windows before sending DATA.  But the peers we meet in practice,
moby/spdystream inside client-go and the API server, implement no flow
control at all: they ignore WINDOW_UPDATE and never send one.  Waiting for
their window updates would stall every stream after 64 KiB.  So by default
(peer_flow_control=None) a Session enforces windows, and if it is blocked
on a window of a peer that has never sent a WINDOW_UPDATE or an
INITIAL_WINDOW_SIZE setting for flow_control_grace seconds, it concludes
the peer does no flow control and stops enforcing for the session.  True
or False forces either behaviour.  Towards such peers the socket's own
TCP flow control is what bounds us; the writer queue is bounded too.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

from . import streamproto

log = logging.getLogger("pufflet.nodeapi.spdy")

VERSION = 3

# Control frame types.  NOOP (5) was SPDY/2; CREDENTIAL (10) is unused by
# anyone we talk to and, like any unknown type, is skipped.
SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_SETTINGS_CLEAR = 0x01

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
UNSUPPORTED_VERSION = 4
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7
STREAM_IN_USE = 8
STREAM_ALREADY_CLOSED = 9
INVALID_CREDENTIALS = 10
FRAME_TOO_LARGE = 11

# GOAWAY status codes.
GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

# SETTINGS ids (flags in the top byte of the id word).
SETTINGS_MAX_CONCURRENT_STREAMS = 4
SETTINGS_INITIAL_WINDOW_SIZE = 7

DEFAULT_WINDOW = 65536
MAX_WINDOW = 0x7FFFFFFF
MAX_LENGTH = 0xFFFFFF  # 24-bit length field

# The zlib dictionary of SPDY/3 (draft 3, section 2.6.10.1): 62 header
# names and values, each preceded by its 32-bit length, then a run of
# bare text.  Built rather than spelled out in hex so that it can be read;
# its Adler-32 is 0xe3c6a7c2, the dictionary id in every SPDY/3 header
# block (0x38 0xea 0xe3 0xc6 0xa7 0xc2 ...), and tests check it against a
# Chromium test vector.
_DICT_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept",
    "accept-charset", "accept-encoding", "accept-language", "accept-ranges",
    "age", "allow", "authorization", "cache-control", "connection",
    "content-base", "content-encoding", "content-language", "content-length",
    "content-location", "content-md5", "content-range", "content-type",
    "date", "etag", "expect", "expires", "from", "host", "if-match",
    "if-modified-since", "if-none-match", "if-range", "if-unmodified-since",
    "last-modified", "location", "max-forwards", "pragma",
    "proxy-authenticate", "proxy-authorization", "range", "referer",
    "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade",
    "user-agent", "vary", "via", "warning", "www-authenticate", "method",
    "get", "status", "200 OK", "version", "HTTP/1.1", "url", "public",
    "set-cookie", "keep-alive", "origin",
)
_DICT_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413"
    "414415416417502504505203 Non-Authoritative Information204 No Content"
    "301 Moved Permanently400 Bad Request401 Unauthorized403 Forbidden404 "
    "Not Found500 Internal Server Error501 Not Implemented503 Service "
    "UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,"
    "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8"
    "charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _DICT_WORDS) \
    + _DICT_TAIL.encode()
DICTIONARY_ID = 0xE3C6A7C2


class SpdyError(Exception):
    pass


class SessionError(SpdyError):
    """The session cannot go on: answer with GOAWAY and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StreamError(SpdyError):
    """One stream is broken: answer with RST_STREAM, the session lives."""

    def __init__(self, stream_id: int, status: int, message: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.status = status


class StreamReset(SpdyError):
    """The stream was reset (by either side) or the session is gone."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or f"stream reset, status {status}")
        self.status = status


class SessionClosed(StreamReset, ConnectionError):
    def __init__(self, message: str = "session closed") -> None:
        StreamReset.__init__(self, CANCEL, message)


# --- frames ---------------------------------------------------------------

HeaderValue = Union[str, Sequence[str]]
HeaderMap = Mapping[str, HeaderValue]


@dataclass
class DataFrame:
    stream_id: int
    data: bytes
    flags: int = 0


@dataclass
class SynStream:
    stream_id: int
    headers: dict
    associated_id: int = 0
    priority: int = 0
    slot: int = 0
    flags: int = 0


@dataclass
class SynReply:
    stream_id: int
    headers: dict
    flags: int = 0


@dataclass
class RstStream:
    stream_id: int
    status: int
    flags: int = 0


@dataclass
class Settings:
    # (id, value, flags) triples
    entries: list = field(default_factory=list)
    flags: int = 0


@dataclass
class Ping:
    ping_id: int
    flags: int = 0


@dataclass
class GoAway:
    last_good_stream_id: int
    status: int = GOAWAY_OK
    flags: int = 0


@dataclass
class Headers:
    stream_id: int
    headers: dict
    flags: int = 0


@dataclass
class WindowUpdate:
    stream_id: int
    delta: int
    flags: int = 0


@dataclass
class UnknownFrame:
    """A control frame of a type we do not know; the spec says ignore it."""
    frame_type: int
    flags: int
    payload: bytes


Frame = Union[DataFrame, SynStream, SynReply, RstStream, Settings, Ping,
              GoAway, Headers, WindowUpdate, UnknownFrame]


def encode_header_block(headers: HeaderMap) -> bytes:
    """The uncompressed SPDY/3 name/value block.  Several values of one
    name travel NUL-separated in one value (there is one entry per name)."""
    out = [struct.pack(">I", len(headers))]
    for name, value in headers.items():
        if not name or name != name.lower():
            raise ValueError(f"SPDY header names are lowercase and not empty: {name!r}")
        if not isinstance(value, str):
            value = "\0".join(value)
        n, v = name.encode(), value.encode()
        out.append(struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v)
    return b"".join(out)


def decode_header_block(block: bytes, stream_id: int) -> dict:
    """Parse a name/value block; the rules broken here are stream errors."""
    def bad(why: str) -> StreamError:
        return StreamError(stream_id, PROTOCOL_ERROR, f"header block: {why}")

    if len(block) < 4:
        raise bad("truncated")
    (count,) = struct.unpack_from(">I", block)
    # Each pair needs at least 8 bytes of lengths: no preallocating from
    # a lying count.
    if count > (len(block) - 4) // 8:
        raise bad("pair count exceeds block")
    pos, headers = 4, {}
    for _ in range(count):
        fields = []
        for _part in (0, 1):
            if pos + 4 > len(block):
                raise bad("truncated")
            (n,) = struct.unpack_from(">I", block, pos)
            pos += 4
            if pos + n > len(block):
                raise bad("truncated")
            fields.append(block[pos:pos + n])
            pos += n
        raw_name, raw_value = fields
        if not raw_name:
            raise bad("empty name")
        try:
            name, value = raw_name.decode(), raw_value.decode()
        except UnicodeDecodeError:
            raise bad("not UTF-8") from None
        if name != name.lower():
            raise bad(f"uppercase name {name!r}")
        if name in headers:
            raise bad(f"duplicate name {name!r}")
        headers[name] = value
    if pos != len(block):
        raise bad("trailing bytes")
    return headers


def _control(ftype: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_LENGTH:
        raise ValueError("control frame too long")
    return struct.pack(">HHI", 0x8000 | VERSION, ftype, (flags << 24) | len(payload)) + payload


class FrameEncoder:
    """Serialises frames; owns this direction's deflate context, so frames
    must go on the wire in the order they were encoded."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15,
                                         zdict=DICTIONARY)

    def _compress(self, headers: HeaderMap) -> bytes:
        # A sync flush ends each block on a byte boundary with everything
        # emitted, so the peer can inflate it alone, yet keeps the context.
        return self._deflate.compress(encode_header_block(headers)) + \
            self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def encode(self, f: Frame) -> bytes:
        if isinstance(f, DataFrame):
            if not 0 < f.stream_id <= MAX_WINDOW or len(f.data) > MAX_LENGTH:
                raise ValueError("bad data frame")
            return struct.pack(">II", f.stream_id, (f.flags << 24) | len(f.data)) + f.data
        if isinstance(f, SynStream):
            head = struct.pack(">IIBB", f.stream_id, f.associated_id,
                               (f.priority & 7) << 5, f.slot)
            return _control(SYN_STREAM, f.flags, head + self._compress(f.headers))
        if isinstance(f, SynReply):
            return _control(SYN_REPLY, f.flags,
                            struct.pack(">I", f.stream_id) + self._compress(f.headers))
        if isinstance(f, Headers):
            return _control(HEADERS, f.flags,
                            struct.pack(">I", f.stream_id) + self._compress(f.headers))
        if isinstance(f, RstStream):
            return _control(RST_STREAM, f.flags, struct.pack(">II", f.stream_id, f.status))
        if isinstance(f, Settings):
            body = struct.pack(">I", len(f.entries)) + b"".join(
                struct.pack(">II", (fl << 24) | sid, value) for sid, value, fl in f.entries)
            return _control(SETTINGS, f.flags, body)
        if isinstance(f, Ping):
            return _control(PING, f.flags, struct.pack(">I", f.ping_id))
        if isinstance(f, GoAway):
            return _control(GOAWAY, f.flags, struct.pack(">II", f.last_good_stream_id, f.status))
        if isinstance(f, WindowUpdate):
            return _control(WINDOW_UPDATE, f.flags, struct.pack(">II", f.stream_id, f.delta))
        if isinstance(f, UnknownFrame):
            return _control(f.frame_type, f.flags, f.payload)
        raise TypeError(f"not a frame: {f!r}")


# Exact lengths of the fixed-size control frames.
_FIXED_LENGTH = {RST_STREAM: 8, PING: 4, GOAWAY: 8, WINDOW_UPDATE: 8}


class FrameDecoder:
    """Incremental parser: feed() bytes, then next() until it returns None.

    next() raises SessionError or StreamError for a bad frame, after having
    consumed it, so the caller answers and goes on (or stops).  A data
    frame over max_data is skipped as it arrives rather than buffered."""

    def __init__(self, max_control: int = 64 * 1024, max_data: int = MAX_LENGTH,
                 max_header_bytes: int = 256 * 1024) -> None:
        self.max_control = max_control
        self.max_data = max_data
        self.max_header_bytes = max_header_bytes
        self._buf = bytearray()
        self._skip = 0
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)

    def feed(self, data: bytes) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._buf += data

    def _inflate_block(self, block: bytes, stream_id: int) -> dict:
        try:
            raw = self._inflate.decompress(block, self.max_header_bytes + 1)
        except zlib.error as e:
            # The shared context is now unusable: no later block can be read.
            raise SessionError(GOAWAY_PROTOCOL_ERROR, f"header block does not inflate: {e}") from None
        if len(raw) > self.max_header_bytes or self._inflate.unconsumed_tail:
            raise SessionError(GOAWAY_PROTOCOL_ERROR, "header block too large")
        return decode_header_block(raw, stream_id)

    def next(self) -> Frame | None:
        buf = self._buf
        if self._skip or len(buf) < 8:
            return None
        first, second = struct.unpack_from(">II", buf)
        flags, length = second >> 24, second & 0xFFFFFF
        control = bool(first & 0x80000000)
        if not control:
            stream_id = first & 0x7FFFFFFF
            if length > self.max_data:
                # Skip it as it streams in: never hold an oversized frame.
                take = min(len(buf) - 8, length)
                del buf[:8 + take]
                self._skip = length - take
                raise StreamError(stream_id, FRAME_TOO_LARGE, f"data frame of {length} bytes")
            if len(buf) < 8 + length:
                return None
            data = bytes(buf[8:8 + length])
            del buf[:8 + length]
            if stream_id == 0:
                raise SessionError(GOAWAY_PROTOCOL_ERROR, "data frame on stream 0")
            return DataFrame(stream_id, data, flags)

        version, ftype = (first >> 16) & 0x7FFF, first & 0xFFFF
        if length > self.max_control:
            # Cannot skip: a header block in it would desynchronise inflate.
            raise SessionError(GOAWAY_PROTOCOL_ERROR, f"control frame of {length} bytes")
        if len(buf) < 8 + length:
            return None
        payload = bytes(buf[8:8 + length])
        del buf[:8 + length]

        if version != VERSION:
            if ftype == SYN_STREAM and length >= 4:
                sid = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
                raise StreamError(sid, UNSUPPORTED_VERSION, f"SPDY version {version}")
            raise SessionError(GOAWAY_PROTOCOL_ERROR, f"SPDY version {version}")
        want = _FIXED_LENGTH.get(ftype)
        if want is not None and length != want:
            raise SessionError(GOAWAY_PROTOCOL_ERROR, f"frame type {ftype} of length {length}")

        if ftype == SYN_STREAM:
            if length < 10:
                raise SessionError(GOAWAY_PROTOCOL_ERROR, "short SYN_STREAM")
            sid, assoc, pri, slot = struct.unpack_from(">IIBB", payload)
            sid &= 0x7FFFFFFF
            headers = self._inflate_block(payload[10:], sid)
            return SynStream(sid, headers, assoc & 0x7FFFFFFF, pri >> 5, slot, flags)
        if ftype in (SYN_REPLY, HEADERS):
            if length < 4:
                raise SessionError(GOAWAY_PROTOCOL_ERROR, "short header frame")
            sid = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
            headers = self._inflate_block(payload[4:], sid)
            cls = SynReply if ftype == SYN_REPLY else Headers
            return cls(sid, headers, flags)
        if ftype == RST_STREAM:
            sid, status = struct.unpack(">II", payload)
            return RstStream(sid & 0x7FFFFFFF, status, flags)
        if ftype == SETTINGS:
            if length < 4:
                raise SessionError(GOAWAY_PROTOCOL_ERROR, "short SETTINGS")
            (n,) = struct.unpack_from(">I", payload)
            if length != 4 + 8 * n:
                raise SessionError(GOAWAY_PROTOCOL_ERROR, "SETTINGS length mismatch")
            entries = []
            for i in range(n):
                word, value = struct.unpack_from(">II", payload, 4 + 8 * i)
                entries.append((word & 0xFFFFFF, value, word >> 24))
            return Settings(entries, flags)
        if ftype == PING:
            return Ping(struct.unpack(">I", payload)[0], flags)
        if ftype == GOAWAY:
            last, status = struct.unpack(">II", payload)
            return GoAway(last & 0x7FFFFFFF, status, flags)
        if ftype == WINDOW_UPDATE:
            sid, delta = struct.unpack(">II", payload)
            return WindowUpdate(sid & 0x7FFFFFFF, delta & 0x7FFFFFFF, flags)
        return UnknownFrame(ftype, flags, payload)


# --- the HTTP Upgrade -----------------------------------------------------

def upgrade_response(headers: streamproto.HeaderInput,
                     supported: Sequence[str]) -> streamproto.UpgradeResponse:
    """Answer an Upgrade: SPDY/3.1 request as the kubelet does.

    Protocol negotiation comes first (httpstream.Handshake): the client's
    X-Stream-Protocol-Version values, in its order of preference, against
    `supported`.  No header: 400.  No common protocol: 403, listing ours in
    X-Accepted-Stream-Protocol-Versions.  Then the upgrade headers
    (spdy.responseUpgrader): Connection must contain "upgrade" and Upgrade
    "spdy/3.1", case-insensitively, else 400.  On success: 101, after which
    the socket speaks SPDY frames."""
    offered = [p.strip() for v in streamproto.header_values(headers, "X-Stream-Protocol-Version")
               for p in v.split(",") if p.strip()]
    if not offered:
        return streamproto.http_error(
            400, "Bad Request", "unable to upgrade: X-Stream-Protocol-Version is required", [])
    proto = streamproto.negotiate(offered, supported)
    if proto is None:
        return streamproto.http_error(
            403, "Forbidden",
            "unable to upgrade: unable to negotiate protocol: client supports "
            f"[{' '.join(offered)}], server accepts [{' '.join(supported)}]",
            [("X-Accepted-Stream-Protocol-Versions", p) for p in supported])
    connection = " ".join(streamproto.header_values(headers, "Connection")).lower()
    upgrade = " ".join(streamproto.header_values(headers, "Upgrade")).lower()
    if "upgrade" not in connection or "spdy/3.1" not in upgrade:
        return streamproto.http_error(
            400, "Bad Request", "unable to upgrade: missing upgrade headers in request", [])
    return streamproto.UpgradeResponse(
        101, "Switching Protocols",
        [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", proto)],
        protocol=proto)


# --- the session ----------------------------------------------------------

class Stream:
    """One SPDY stream.  read/write/close/reset may be called from any
    thread; one reader and one writer per stream is the expected use."""

    def __init__(self, session: "Session", stream_id: int, headers: dict,
                 send_window: int, recv_window: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.headers = headers
        self.send_window = send_window
        self.recv_window = recv_window
        self._unacked = 0
        self._buf = bytearray()
        self.replied = False
        self.remote_closed = False   # FIN received
        self.local_closed = False    # FIN sent
        self.reset_status: int | None = None

    def __repr__(self) -> str:
        return f"<spdy.Stream {self.stream_id} {self.headers}>"

    def reply(self, headers: HeaderMap | None = None, fin: bool = False) -> None:
        """Send SYN_REPLY.  client-go waits for it before using the stream
        (and spdystream drops DATA that comes before it), so reply promptly."""
        self.session._reply(self, dict(headers or {}), fin)

    def read(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        """Up to max_bytes of data; b"" once the peer has half-closed.
        Raises StreamReset if the stream was reset or the session died,
        TimeoutError after timeout seconds without data."""
        return self.session._read(self, max_bytes, timeout)

    def write(self, data: bytes, timeout: float | None = None) -> None:
        """Send all of data, waiting for flow-control window as needed."""
        self.session._write(self, data, timeout)

    def close(self) -> None:
        """Half-close: a FIN after everything written so far."""
        self.session._close_stream(self)

    def reset(self, status: int = CANCEL) -> None:
        """Abort both directions with RST_STREAM."""
        self.session._reset_stream(self, status, send=True)


class Session:
    """A SPDY/3.1 session over a connected socket (see the module doc).

    Streams the peer opens are queued for accept(), or handed to on_stream
    (called in the reader thread: it must not block; replying is fine).
    """

    def __init__(self, sock: socket.socket, *, server: bool = True,
                 on_stream: Callable[[Stream], None] | None = None,
                 recv_window: int = DEFAULT_WINDOW,
                 max_streams: int = 1000,
                 peer_flow_control: bool | None = None,
                 flow_control_grace: float = 0.5,
                 max_frame_payload: int = 32 * 1024,
                 max_queued: int = 1024 * 1024,
                 max_buffered: int = 1024 * 1024,
                 decoder: FrameDecoder | None = None,
                 name: str = "spdy") -> None:
        if not 0 < recv_window <= MAX_WINDOW:
            raise ValueError("recv_window out of range")
        self._sock = sock
        self.server = server
        self._on_stream = on_stream
        self._recv_initial = recv_window
        self._max_streams = max_streams
        self._peer_fc = peer_flow_control
        self._grace = flow_control_grace
        self._max_payload = max_frame_payload
        self._max_queued = max_queued
        self._max_buffered = max(max_buffered, 2 * recv_window)
        self._decoder = decoder or FrameDecoder()
        self._encoder = FrameEncoder()
        self._name = name

        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        # The writer waits on a condition of its own (same lock): woken
        # only when there is something to send or it must stop, not by
        # every byte a stream reader takes, and readers are not woken by
        # every frame queued.  Each needless wakeup costs a GIL handoff,
        # which is most of an interactive round trip.
        self._wcond = threading.Condition(lock)
        self._streams: dict[int, Stream] = {}
        self._accept_q: deque[Stream] = deque()
        self._ctrl_q: deque = deque()   # session control frames: go first
        self._data_q: deque = deque()   # stream frames, in order
        self._queued_bytes = 0
        self._peer_initial = DEFAULT_WINDOW       # peer's stream window setting
        self._send_session = DEFAULT_WINDOW
        self._recv_session_unacked = 0
        self._recv_session_window = DEFAULT_WINDOW
        self._last_peer_id = 0
        self._next_ping = 2 if server else 1
        self._pings: dict[int, threading.Event] = {}
        self._pongs: set[int] = set()
        self._goaway_sent = False
        self._writer_stop = False
        self._dead = False            # the connection is gone
        self.peer_gone = threading.Event()   # GOAWAY received or EOF
        self.closed = threading.Event()      # socket closed, threads done
        self.error: BaseException | None = None

        if recv_window != DEFAULT_WINDOW:
            self._ctrl_q.append(Settings([(SETTINGS_INITIAL_WINDOW_SIZE, recv_window, 0)]))
            if recv_window > DEFAULT_WINDOW:
                self._ctrl_q.append(WindowUpdate(0, recv_window - DEFAULT_WINDOW))
                self._recv_session_window = recv_window

        self._writer = threading.Thread(target=self._write_loop, name=f"{name}-writer", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name=f"{name}-reader", daemon=True)
        self._writer.start()
        self._reader.start()

    # -- public ---------------------------------------------------------

    def accept(self, timeout: float | None = None) -> Stream | None:
        """The next stream the peer opened; None on timeout or when the
        session can bring no more (GOAWAY, EOF)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._accept_q:
                if self._dead or self.peer_gone.is_set():
                    return None
                if not self._wait(deadline):
                    return None
            return self._accept_q.popleft()

    def ping(self, timeout: float = 10.0) -> float:
        """Round-trip time of a PING, in seconds."""
        with self._cond:
            if self._dead:
                raise SessionClosed()
            pid = self._next_ping
            self._next_ping += 2
            ev = self._pings[pid] = threading.Event()
            self._queue_ctrl(Ping(pid))
        t0 = time.monotonic()
        ev.wait(timeout)
        with self._cond:
            self._pings.pop(pid, None)
            answered = pid in self._pongs
            self._pongs.discard(pid)
        if answered:
            return time.monotonic() - t0
        if self._dead:
            raise SessionClosed()
        raise TimeoutError("no PING reply")

    def goaway(self, status: int = GOAWAY_OK) -> None:
        """Tell the peer we take no new streams (existing ones go on)."""
        with self._cond:
            if not self._goaway_sent and not self._dead:
                self._goaway_sent = True
                self._queue_ctrl(GoAway(self._last_peer_id, status))

    def close(self, status: int = GOAWAY_OK, linger: float = 2.0) -> None:
        """GOAWAY, flush what is queued, end our side of the connection,
        give the peer `linger` seconds to close its side, then close.

        A server that has just written the last output should rather wait
        for the client to go first (peer_gone.wait()): closing a socket with
        unread input makes the kernel reset the connection, and a reset can
        discard output still in flight."""
        self.goaway(status)
        with self._cond:
            self._writer_stop = True
            self._cond.notify_all()
            self._wcond.notify()
        if threading.current_thread() is not self._writer:
            self._writer.join(linger + 5)
        if threading.current_thread() is not self._reader:
            self._reader.join(linger)
        self._teardown()

    def wait_closed(self, timeout: float | None = None) -> bool:
        return self.closed.wait(timeout)

    @property
    def flow_control(self) -> bool | None:
        """Whether the peer's windows are enforced (None: not known yet)."""
        return self._peer_fc

    # -- helpers under the lock -------------------------------------------

    def _wait(self, deadline: float | None) -> bool:
        if deadline is None:
            self._cond.wait()
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self._cond.wait(left)
        return True

    def _queue_ctrl(self, frame: Frame) -> None:
        self._ctrl_q.append(frame)
        self._wcond.notify()

    def _queue_data(self, frame: Frame, nbytes: int = 0) -> None:
        self._data_q.append((frame, nbytes))
        self._queued_bytes += nbytes
        self._wcond.notify()

    def _forget(self, st: Stream) -> None:
        if self._streams.get(st.stream_id) is st:
            del self._streams[st.stream_id]

    def _maybe_forget(self, st: Stream) -> None:
        if st.local_closed and st.remote_closed:
            self._forget(st)

    def _purge(self, stream_id: int) -> None:
        """Drop what is queued for a stream the peer reset: it would only
        be discarded there."""
        keep = deque()
        for f, nb in self._data_q:
            if getattr(f, "stream_id", None) == stream_id and not isinstance(f, RstStream):
                self._queued_bytes -= nb
            else:
                keep.append((f, nb))
        self._data_q = keep

    def _check_usable(self, st: Stream) -> None:
        if st.reset_status is not None:
            raise StreamReset(st.reset_status)
        if self._dead:
            raise SessionClosed()

    # -- stream operations --------------------------------------------------

    def _reply(self, st: Stream, headers: dict, fin: bool) -> None:
        with self._cond:
            self._check_usable(st)
            if st.replied:
                raise SpdyError("stream already replied")
            st.replied = True
            self._queue_data(SynReply(st.stream_id, headers, FLAG_FIN if fin else 0))
            if fin:
                st.local_closed = True
                self._maybe_forget(st)

    def _read(self, st: Stream, max_bytes: int, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not st._buf:
                if st.remote_closed:
                    return b""
                self._check_usable(st)
                if not self._wait(deadline):
                    raise TimeoutError("stream read timed out")
            data = bytes(st._buf[:max_bytes])
            del st._buf[:len(data)]
            self._consumed(st, len(data))
            self._cond.notify_all()   # a reader thread may wait for room
            return data

    def _consumed(self, st: Stream | None, n: int) -> None:
        """Give the peer back window for n bytes the application took,
        in batches of half a window."""
        if st is not None and not st.remote_closed and st.reset_status is None:
            st._unacked += n
            if st._unacked >= self._recv_initial // 2:
                st.recv_window += st._unacked
                self._queue_ctrl(WindowUpdate(st.stream_id, st._unacked))
                st._unacked = 0
        self._recv_session_unacked += n
        if self._recv_session_unacked >= self._recv_session_window // 2:
            self._queue_ctrl(WindowUpdate(0, self._recv_session_unacked))
            self._recv_session_unacked = 0

    def _write(self, st: Stream, data: bytes, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        view = memoryview(bytes(data))
        with self._cond:
            if not st.replied and st.stream_id % 2 != (0 if self.server else 1):
                # Peer's stream: DATA before SYN_REPLY would be dropped.
                self._check_usable(st)
                st.replied = True
                self._queue_data(SynReply(st.stream_id, {}))
            blocked_since = None
            while view:
                self._check_usable(st)
                if st.local_closed:
                    raise SpdyError("write on a half-closed stream")
                n = min(len(view), self._max_payload)
                enforce = self._peer_fc is not False
                if enforce:
                    n = min(n, st.send_window, self._send_session)
                room = self._queued_bytes == 0 or self._queued_bytes + n <= self._max_queued
                if n > 0 and room:
                    if enforce:
                        st.send_window -= n
                        self._send_session -= n
                    self._queue_data(DataFrame(st.stream_id, bytes(view[:n])), n)
                    view = view[n:]
                    blocked_since = None
                    continue
                if n <= 0 and self._peer_fc is None:
                    # Blocked on a window of a peer that never spoke of
                    # windows: spdystream?  Wait a little, then decide.
                    now = time.monotonic()
                    blocked_since = blocked_since or now
                    if now - blocked_since >= self._grace:
                        log.info("%s: peer sends no WINDOW_UPDATE; flow control off", self._name)
                        self._peer_fc = False
                        continue
                    d = blocked_since + self._grace
                    if deadline is not None and deadline < d:
                        d = deadline
                    self._wait(d)
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError("stream write timed out")
                    continue
                if not self._wait(deadline):
                    raise TimeoutError("stream write timed out")

    def _close_stream(self, st: Stream) -> None:
        with self._cond:
            if st.local_closed or st.reset_status is not None or self._dead:
                return
            if not st.replied and st.stream_id % 2 != (0 if self.server else 1):
                st.replied = True
                self._queue_data(SynReply(st.stream_id, {}, FLAG_FIN))
            else:
                self._queue_data(DataFrame(st.stream_id, b"", FLAG_FIN))
            st.local_closed = True
            self._maybe_forget(st)

    def _reset_stream(self, st: Stream, status: int, send: bool) -> None:
        with self._cond:
            if st.reset_status is not None:
                return
            st.reset_status = status
            # Unread data will never be consumed: give its window back.
            if st._buf:
                self._consumed(None, len(st._buf))
                st._buf.clear()
            self._forget(st)
            if send and not self._dead:
                self._queue_data(RstStream(st.stream_id, status))
            self._cond.notify_all()

    # -- the writer -------------------------------------------------------

    def _write_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._ctrl_q or self._data_q or self._writer_stop or self._dead):
                        self._wcond.wait()
                    if self._dead:
                        return
                    if not (self._ctrl_q or self._data_q):
                        break   # stopping, and everything is out
                    frames, freed = list(self._ctrl_q), 0
                    self._ctrl_q.clear()
                    # Take a batch, so one sendall carries many frames.
                    size = 0
                    while self._data_q and size < 256 * 1024:
                        f, nb = self._data_q.popleft()
                        frames.append(f)
                        size += nb + 8
                        freed += nb
                    self._queued_bytes -= freed
                    self._cond.notify_all()
                out = b"".join(self._encoder.encode(f) for f in frames)
                self._sock.sendall(out)
            # Graceful end: FIN (SHUT_WR) after the last byte.  The base
            # class method, because SSLSocket.shutdown drops the TLS state
            # under the reader's feet.
            try:
                socket.socket.shutdown(self._sock, socket.SHUT_WR)
            except OSError:
                pass
        except Exception as e:  # socket gone, mostly
            if not self._dead:
                log.debug("%s: write failed: %s", self._name, e)
            self._die(e)

    # -- the reader -------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while True:
                data = self._sock.recv(256 * 1024)
                if not data:
                    break
                self._decoder.feed(data)
                while True:
                    try:
                        frame = self._decoder.next()
                    except StreamError as e:
                        log.debug("%s: stream %d: %s", self._name, e.stream_id, e)
                        self._stream_error(e.stream_id, e.status)
                        continue
                    if frame is None:
                        break
                    self._dispatch(frame)
        except SessionError as e:
            log.info("%s: protocol error: %s", self._name, e)
            self.error = e
            with self._cond:
                if not self._goaway_sent:
                    self._goaway_sent = True
                    self._queue_ctrl(GoAway(self._last_peer_id, e.status))
        except Exception as e:
            if not self._dead:
                log.debug("%s: read failed: %s", self._name, e)
                self.error = e
        finally:
            self.peer_gone.set()
            with self._cond:
                self._writer_stop = True
                # Nothing more will come: wake readers and writers.
                for st in list(self._streams.values()):
                    if not st.remote_closed and st.reset_status is None:
                        st.reset_status = CANCEL
                self._cond.notify_all()
                self._wcond.notify()
            self._writer.join()
            self._teardown()

    def _die(self, err: BaseException | None) -> None:
        with self._cond:
            if err is not None and self.error is None:
                self.error = err
            self._dead = True
            for st in self._streams.values():
                if st.reset_status is None and not (st.remote_closed and st.local_closed):
                    st.reset_status = CANCEL
            for ev in self._pings.values():
                ev.set()
            self._cond.notify_all()
            self._wcond.notify()
        self.peer_gone.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass

    def _teardown(self) -> None:
        with self._cond:
            if self.closed.is_set():
                return
        self._die(None)
        try:
            self._sock.close()
        except OSError:
            pass
        self.closed.set()

    def _stream_error(self, stream_id: int, status: int) -> None:
        with self._cond:
            st = self._streams.get(stream_id)
            if st is not None:
                st.reset_status = status
                self._forget(st)
                self._cond.notify_all()
            if stream_id:
                self._queue_data(RstStream(stream_id, status))

    def _is_peer_id(self, sid: int) -> bool:
        return sid % 2 == (1 if self.server else 0)

    def _dispatch(self, f: Frame) -> None:
        if isinstance(f, DataFrame):
            self._on_data(f)
        elif isinstance(f, SynStream):
            self._on_syn_stream(f)
        elif isinstance(f, (SynReply, Headers)):
            with self._cond:
                st = self._streams.get(f.stream_id)
                if st is None:
                    return
                if isinstance(f, SynReply) and self._is_peer_id(f.stream_id):
                    # A reply to a stream the peer itself opened.
                    self._queue_data(RstStream(f.stream_id, STREAM_IN_USE))
                    return
                st.headers.update(f.headers)
                if f.flags & FLAG_FIN:
                    st.remote_closed = True
                    self._maybe_forget(st)
                self._cond.notify_all()
        elif isinstance(f, RstStream):
            with self._cond:
                st = self._streams.get(f.stream_id)
                if st is not None:
                    st.reset_status = f.status or PROTOCOL_ERROR
                    st._buf.clear()
                    self._forget(st)
                    self._purge(st.stream_id)
                    self._cond.notify_all()
        elif isinstance(f, Settings):
            self._on_settings(f)
        elif isinstance(f, Ping):
            with self._cond:
                if f.ping_id % 2 == (0 if self.server else 1):
                    ev = self._pings.get(f.ping_id)
                    if ev is not None:
                        self._pongs.add(f.ping_id)
                        ev.set()
                elif f.ping_id:
                    self._queue_ctrl(Ping(f.ping_id))
        elif isinstance(f, GoAway):
            log.debug("%s: GOAWAY last=%d status=%d", self._name, f.last_good_stream_id, f.status)
            self.peer_gone.set()
            with self._cond:
                self._cond.notify_all()
        elif isinstance(f, WindowUpdate):
            self._on_window_update(f)
        # UnknownFrame: ignored, as the spec wants.

    def _on_syn_stream(self, f: SynStream) -> None:
        refuse = None
        with self._cond:
            sid = f.stream_id
            if sid == 0 or not self._is_peer_id(sid) or sid <= self._last_peer_id:
                refuse = PROTOCOL_ERROR
            else:
                self._last_peer_id = sid
                if self._goaway_sent:
                    refuse = REFUSED_STREAM
                elif len(self._streams) >= self._max_streams:
                    refuse = REFUSED_STREAM
            if refuse is not None:
                self._queue_data(RstStream(sid, refuse))
                return
            st = Stream(self, sid, f.headers, self._peer_initial, self._recv_initial)
            st.remote_closed = bool(f.flags & FLAG_FIN)
            st.local_closed = bool(f.flags & FLAG_UNIDIRECTIONAL)
            if not (st.remote_closed and st.local_closed):
                self._streams[sid] = st
            if self._on_stream is None:
                self._accept_q.append(st)
                self._cond.notify_all()
        if self._on_stream is not None:
            self._on_stream(st)

    def _on_data(self, f: DataFrame) -> None:
        n = len(f.data)
        with self._cond:
            st = self._streams.get(f.stream_id)
            if st is None or st.remote_closed:
                # Give the session window back: nobody will read this.
                self._consumed(None, n)
                if st is not None:
                    self._queue_data(RstStream(f.stream_id, STREAM_ALREADY_CLOSED))
                elif self._is_peer_id(f.stream_id) and f.stream_id > self._last_peer_id:
                    self._queue_data(RstStream(f.stream_id, INVALID_STREAM))
                # else: a stream that is over; frames in flight are normal.
                return
            st.recv_window -= n
            if st.recv_window < 0 and self._peer_fc is True:
                self._consumed(None, n)
                st.reset_status = FLOW_CONTROL_ERROR
                self._forget(st)
                self._queue_data(RstStream(st.stream_id, FLOW_CONTROL_ERROR))
                self._cond.notify_all()
                return
            st._buf += f.data
            if f.flags & FLAG_FIN:
                st.remote_closed = True
                self._maybe_forget(st)
            self._cond.notify_all()
            # Backpressure for peers that ignore our window: stop reading
            # the socket (TCP pushes back) until the application catches up.
            while (len(st._buf) > self._max_buffered and st.reset_status is None
                   and not self._dead):
                self._cond.wait(1.0)

    def _on_settings(self, f: Settings) -> None:
        with self._cond:
            for sid, value, _flags in f.entries:
                if sid == SETTINGS_INITIAL_WINDOW_SIZE:
                    if value > MAX_WINDOW:
                        raise SessionError(GOAWAY_PROTOCOL_ERROR, "window setting too large")
                    delta = value - self._peer_initial
                    self._peer_initial = value
                    for st in self._streams.values():
                        st.send_window += delta
                    if self._peer_fc is None:
                        self._peer_fc = True
            self._cond.notify_all()

    def _on_window_update(self, f: WindowUpdate) -> None:
        with self._cond:
            if f.delta == 0:
                return
            if self._peer_fc is None:
                self._peer_fc = True
            if f.stream_id == 0:
                self._send_session += f.delta
                if self._send_session > MAX_WINDOW:
                    raise SessionError(GOAWAY_PROTOCOL_ERROR, "session window overflow")
            else:
                st = self._streams.get(f.stream_id)
                if st is None:
                    return
                st.send_window += f.delta
                if st.send_window > MAX_WINDOW:
                    st.reset_status = FLOW_CONTROL_ERROR
                    self._forget(st)
                    self._queue_data(RstStream(st.stream_id, FLOW_CONTROL_ERROR))
            self._cond.notify_all()
