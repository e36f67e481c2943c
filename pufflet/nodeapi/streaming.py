"""What /exec, /attach and /portForward share: the pods they act on (the
Backend), the refusals given before an upgrade, and the upgrade itself
(SPDY/3.1 or WebSocket) on a connection taken over from the server.

The server (server.py) authenticates and authorizes before a handler
runs.  A handler refuses by raising server.HTTPError (the server answers),
or takes the connection over (Request.hijack), answers the upgrade, speaks
the stream protocol and closes the connection when done.
"""

from __future__ import annotations

import logging
import socket
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from . import spdy, wsstream
from .server import HTTPError, Request

log = logging.getLogger("pufflet.nodeapi.streaming")

# The kubelet's default: how long a client has to open its streams.
STREAM_CREATION_TIMEOUT = 30.0


def bad_request(message: str) -> HTTPError:
    return HTTPError(400, message)


def not_found(message: str) -> HTTPError:
    return HTTPError(404, message)


# -- the pods: what the agent's pod manager provides -------------------------

@dataclass(frozen=True)
class Target:
    """A container the node API acts on, as the pod manager knows it."""
    pod_uid: str
    namespace: str
    pod: str
    container: str
    env: tuple[str, ...] = ()       # an exec runs with the container's env
    working_dir: str = "/"
    restart_count: int = 0          # attach follows this run's log


@dataclass
class ExecExit:
    exit_code: int | None
    signal: int | None = None
    reason: str = ""


@dataclass
class StartedExec:
    exec_id: str
    fds: list[int]          # stdin, stdout, stderr: ours to close
    exit: Future            # resolves to an ExecExit (or anything with its fields)


@dataclass
class AttachedStdin:
    """A container's stdin for attach: fd is ours to close."""
    fd: int
    tty: bool       # fd is its pty master (the window size is set there)
    stdin: bool     # it was started with stdin: true (else input is dropped)


class ExecError(Exception):
    """The process could not be started; the message is the runtime's."""


class Backend(Protocol):
    def resolve(self, namespace: str, pod: str, container: str | None,
                pod_uid: str | None = None) -> Target:
        """The container (for port-forward, container is None: the pod);
        raises server.HTTPError (404) when there is none."""

    def start_exec(self, target: Target, argv: list[str], tty: bool) -> StartedExec:
        """Raises ExecError."""

    def attach(self, target: Target) -> AttachedStdin | None:
        """The running container's stdin, or None when it has none (its
        spec asks for neither stdin nor tty) or does not run."""

    def log_files(self, target: Target) -> list[Any]:
        """The container run's CRI log files (paths or fds), oldest first;
        a fresh list (fresh fds) at each call."""

    def running(self, target: Target) -> bool:
        """Whether that run of the container is still running."""

    def port_forward(self, target: Target, port: int) -> socket.socket:
        """A connection to port inside the pod's network; raises OSError
        or ExecError with the reason."""


def close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


# -- the upgrade ---------------------------------------------------------------

@dataclass
class Upgraded:
    """The connection after a 101: exactly one of session and ws is set."""
    sock: socket.socket
    protocol: str
    session: spdy.Session | None = None
    ws: wsstream.WebSocket | None = None


def upgrade(req: Request, spdy_protocols: Sequence[str],
            ws_protocols: Sequence[str], name: str) -> Upgraded | None:
    """Take the connection over and answer the upgrade, SPDY or WebSocket
    as the client asks.  None when refused: the refusal went out and the
    connection is closed."""
    is_ws = wsstream.is_websocket_request(req.headers)
    if is_ws:
        resp = wsstream.upgrade_response(req.headers, ws_protocols)
    else:
        resp = spdy.upgrade_response(req.headers, spdy_protocols)
    sock, buffered = req.hijack()
    # A stream may sit idle for hours (a shell nobody types in): no
    # deadline on reads; the protocols' own ends close it.
    sock.settimeout(None)
    try:
        sock.sendall(resp.to_bytes())
    except OSError:
        resp.status = 0
    if not resp.ok:
        close_quietly(sock)
        return None
    proto = resp.protocol or ""
    if is_ws:
        return Upgraded(sock, proto, ws=wsstream.WebSocket(sock, initial=bytes(buffered)))
    dec = spdy.FrameDecoder()
    dec.feed(bytes(buffered))
    return Upgraded(sock, proto, session=spdy.Session(sock, decoder=dec, name=name))
