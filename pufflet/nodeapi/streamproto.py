"""What SPDY and WebSocket streaming share: the Kubernetes remotecommand and
portforward conventions, as the kubelet speaks them.

Transport-independent: names of protocols and stream types, protocol
negotiation, the error-stream Status that carries an exit code, terminal
resize messages, and port-forward stream pairing.  Values follow the
kubelet's remotecommand and portforward servers and client-go's decoders;
where the kubelet has a quirk it is kept, and said so.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

# remotecommand subprotocols, newest first.  v4 moved the error stream to a
# JSON metav1.Status (so the exit code survives); v5 adds a WebSocket
# "close this channel" signal, and the kubelet offers it on WebSocket only.
V1 = "channel.k8s.io"
V2 = "v2.channel.k8s.io"
V3 = "v3.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"
BASE64_V1 = "base64.channel.k8s.io"
BASE64_V4 = "v4.base64.channel.k8s.io"

PORTFORWARD_V1 = "portforward.k8s.io"

# What the kubelet accepts over SPDY (remotecommand.SupportedStreamingProtocols):
# no v5 there; a client offering v5 first is answered with v4.
SPDY_REMOTECOMMAND_PROTOCOLS: tuple[str, ...] = (V4, V3, V2, V1)
SPDY_PORTFORWARD_PROTOCOLS: tuple[str, ...] = (PORTFORWARD_V1,)

# What the kubelet accepts over WebSocket for exec/attach.  "" is a client
# that offered no subprotocol: it gets the v1 channel protocol.
WS_REMOTECOMMAND_PROTOCOLS: tuple[str, ...] = (V5, V4, BASE64_V4, V1, BASE64_V1, "")
# ... and for port-forward (no v5: port-forward has no stdin to close).
WS_PORTFORWARD_PROTOCOLS: tuple[str, ...] = (V4, BASE64_V4, "")

# SPDY stream headers.  Go canonicalises "streamType" and "requestID" but
# SPDY/3 header names go on the wire lowercased.
HEADER_STREAM_TYPE = "streamtype"
HEADER_PORT = "port"
HEADER_REQUEST_ID = "requestid"

STDIN = "stdin"
STDOUT = "stdout"
STDERR = "stderr"
ERROR = "error"
RESIZE = "resize"
DATA = "data"

# WebSocket channel numbers for remotecommand (the POSIX fds, then two more).
CHANNEL_STDIN = 0
CHANNEL_STDOUT = 1
CHANNEL_STDERR = 2
CHANNEL_ERROR = 3
CHANNEL_RESIZE = 4
# v5: a message [255, n] says the sender will write no more on channel n.
CHANNEL_CLOSE = 255

REASON_NONZERO_EXIT = "NonZeroExitCode"
CAUSE_EXIT_CODE = "ExitCode"


def negotiate(offered: Iterable[str], supported: Sequence[str]) -> str | None:
    """The first offered protocol the server supports: the client's order
    wins, as in k8s httpstream.negotiateProtocol.  Offers may be
    comma-separated lists, as client-go sends them."""
    for value in offered:
        for proto in value.split(","):
            proto = proto.strip()
            if proto and proto in supported:
                return proto
    return None


def uses_json_status(protocol: str) -> bool:
    """v4 and v5 report through a JSON Status; older ones send bare text,
    and nothing at all on success."""
    return protocol in (V4, V5, BASE64_V4)


def supports_resize(protocol: str) -> bool:
    """v1 and v2 over SPDY have no resize stream; WebSocket always has the
    channel (the kubelet opens it whatever the subprotocol)."""
    return protocol not in (V1, V2)


def expected_streams(protocol: str, stdin: bool, stdout: bool, stderr: bool,
                     tty: bool) -> set[str]:
    """The SPDY streams a remotecommand client opens: the error stream
    always, the others as asked; the kubelet drops stderr under a tty."""
    want = {ERROR}
    if stdin:
        want.add(STDIN)
    if stdout:
        want.add(STDOUT)
    if stderr and not tty:
        want.add(STDERR)
    if tty and supports_resize(protocol):
        want.add(RESIZE)
    return want


def status_success() -> dict:
    return {"metadata": {}, "status": "Success"}


def status_exit(code: int, message: str | None = None) -> dict:
    """metav1.Status for a command that exited non-zero.  client-go reads
    details.causes[type=ExitCode].message as the code; StatusCause.Type is
    serialised as "reason"."""
    if message is None:
        message = f"command terminated with non-zero exit code: exit status {code}"
    return {
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": REASON_NONZERO_EXIT,
        "details": {"causes": [{"reason": CAUSE_EXIT_CODE, "message": str(code)}]},
    }


def status_error(message: str) -> dict:
    """What the kubelet sends when the command could not run at all
    (apierrors.NewInternalError)."""
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


def exit_status(code: int | None, error: str | None = None) -> dict:
    """The Status for a finished command: success, exit code, or failure."""
    if error is not None:
        return status_error(error)
    if code == 0:
        return status_success()
    return status_exit(code if code is not None else 1)


def encode_status(protocol: str, status: dict) -> bytes:
    """The bytes to write on the error stream.  Pre-v4 protocols carry only
    the message of a failure, and nothing on success (v1WriteStatusFunc)."""
    if uses_json_status(protocol):
        return json.dumps(status, separators=(",", ":")).encode()
    if status.get("status") == "Success":
        return b""
    return status.get("message", "").encode()


def decode_exit_code(data: bytes) -> int:
    """Client side of the error stream, as client-go's v4 decoder: 0 on
    Success, the ExitCode cause on NonZeroExitCode, else raise."""
    if not data:
        return 0
    status = json.loads(data)
    if status.get("status") == "Success":
        return 0
    if status.get("reason") == REASON_NONZERO_EXIT:
        for cause in (status.get("details") or {}).get("causes") or []:
            if cause.get("reason") == CAUSE_EXIT_CODE:
                rc = int(cause["message"])
                if not 0 <= rc <= 255:
                    raise ValueError(f"exit code out of range: {rc}")
                return rc
        raise ValueError("error stream protocol error: no ExitCode cause given")
    raise RuntimeError(status.get("message") or "error stream protocol error: unknown error")


@dataclass(frozen=True)
class TerminalSize:
    width: int
    height: int


def encode_resize(width: int, height: int) -> bytes:
    """A resize message as client-go's json.Encoder writes it: Go field
    names (no json tags on TerminalSize), newline-terminated."""
    return json.dumps({"Width": width, "Height": height}, separators=(",", ":")).encode() + b"\n"


class ResizeDecoder:
    """Splits the resize stream into TerminalSize values.  Messages are
    concatenated JSON objects (a json.Decoder on the other side), with no
    framing: feed bytes as they come and take whole messages out."""

    MAX_PENDING = 4096  # a resize message is ~30 bytes: more is garbage

    def __init__(self) -> None:
        self._buf = ""
        self._dec = json.JSONDecoder()

    def feed(self, data: bytes) -> list[TerminalSize]:
        self._buf += data.decode("utf-8", "replace")
        out: list[TerminalSize] = []
        while True:
            s = self._buf.lstrip()
            if not s:
                self._buf = ""
                break
            try:
                obj, end = self._dec.raw_decode(s)
            except json.JSONDecodeError:
                if len(s) > self.MAX_PENDING:
                    raise ValueError("resize stream: unparseable data")
                self._buf = s
                break
            self._buf = s[end:]
            if not isinstance(obj, dict):
                raise ValueError("resize stream: not an object")
            # Go decodes missing fields as zero and clamps nothing; uint16.
            w, h = int(obj.get("Width", 0)), int(obj.get("Height", 0))
            if not (0 <= w <= 0xFFFF and 0 <= h <= 0xFFFF):
                raise ValueError("resize stream: size out of range")
            out.append(TerminalSize(w, h))
        return out


def winsize(size: TerminalSize) -> bytes:
    """struct winsize for TIOCSWINSZ: rows, columns, xpixel, ypixel."""
    return struct.pack("HHHH", size.height, size.width, 0, 0)


# --- HTTP upgrade answers (SPDY and WebSocket) -----------------------------

HeaderInput = Union[Mapping[str, str], Iterable[tuple]]


def header_values(headers: HeaderInput, name: str) -> list[str]:
    """All values of a request header, case-insensitively, from a mapping,
    an email.message.Message (http.server's headers) or (name, value) pairs."""
    name = name.lower()
    if hasattr(headers, "get_all"):
        return list(headers.get_all(name) or [])
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [v for k, v in items if k.lower() == name]


@dataclass
class UpgradeResponse:
    status: int
    reason: str
    headers: list  # (name, value) pairs
    body: bytes = b""
    protocol: str | None = None  # the negotiated one, when status is 101

    @property
    def ok(self) -> bool:
        return self.status == 101

    def to_bytes(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {self.reason}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def http_error(status: int, reason: str, message: str, extra: list) -> UpgradeResponse:
    # As Go's http.Error: plain text, nosniff, newline-terminated.
    body = (message + "\n").encode()
    headers = extra + [("Content-Type", "text/plain; charset=utf-8"),
                       ("X-Content-Type-Options", "nosniff"),
                       ("Content-Length", str(len(body)))]
    return UpgradeResponse(status, reason, headers, body)


# --- port-forward ---------------------------------------------------------

def port_prefix(port: int) -> bytes:
    """WebSocket port-forward: the first message the server writes on each
    channel of a port is the port, 2 bytes little-endian."""
    return struct.pack("<H", port)


def portforward_channels(index: int) -> tuple[int, int]:
    """WebSocket port-forward channels of the index-th requested port:
    (data, error)."""
    return 2 * index, 2 * index + 1


def parse_ports(query: Mapping[str, Sequence[str]]) -> list[int]:
    """Ports of a WebSocket port-forward request: repeated "port" (the
    kubelet's name) or "ports" parameters, each possibly comma-separated."""
    values = list(query.get("port", [])) + list(query.get("ports", []))
    if not values:
        raise ValueError('query parameter "port" is required')
    ports = []
    for v in values:
        if not v:
            raise ValueError('query parameter "port" cannot be empty')
        for p in v.split(","):
            if not p.isdigit() or not 0 < int(p) < 65536:
                raise ValueError(f"unable to parse {p!r} as a port")
            ports.append(int(p))
    return ports


def request_id(headers: Mapping[str, str], stream_id: int) -> str:
    """The pairing key of a SPDY port-forward stream.  Old clients sent no
    requestID; the kubelet then pairs by stream id, the error stream first
    and the data stream two ids later, and so do we."""
    rid = headers.get(HEADER_REQUEST_ID, "")
    if rid:
        return rid
    kind = headers.get(HEADER_STREAM_TYPE, "")
    return str(stream_id if kind == ERROR else stream_id - 2)


class PortForwardPairs:
    """Matches the data and error streams of SPDY port-forward requests.

    add() takes each new stream; once both halves of a request are in it
    returns (port, data_stream, error_stream).  Streams are anything with
    .headers and .stream_id; the caller replies to and resets them."""

    def __init__(self, max_pending: int = 1000) -> None:
        self._pending: dict[str, dict[str, object]] = {}
        self._max = max_pending

    def add(self, stream) -> tuple[int, object, object] | None:
        h = stream.headers
        kind = h.get(HEADER_STREAM_TYPE, "")
        if kind not in (DATA, ERROR):
            raise ValueError(f"invalid stream type {kind!r}")
        port_s = h.get(HEADER_PORT, "")
        if not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise ValueError(f"invalid port header {port_s!r}")
        rid = request_id(h, stream.stream_id)
        pair = self._pending.setdefault(rid, {})
        if kind in pair:
            raise ValueError(f"duplicate {kind} stream for request {rid}")
        if len(self._pending) > self._max:
            del self._pending[rid]
            raise ValueError("too many incomplete port-forward requests")
        pair[kind] = stream
        if DATA in pair and ERROR in pair:
            del self._pending[rid]
            return int(port_s), pair[DATA], pair[ERROR]
        return None

    def pending(self) -> list[object]:
        """Streams still waiting for their other half (to reset on close)."""
        return [s for pair in self._pending.values() for s in pair.values()]
