"""/exec/{namespace}/{pod}/{container} and /attach/...: kubectl exec and
attach, over SPDY/3.1 (what API servers up to 1.35 speak to nodes) or
WebSocket (v4/v5.channel.k8s.io, direct clients and newer API servers).

exec: the parent starts the process inside the pod (StartExec) and hands
us its stdin/stdout/stderr, or a pty master three times with a tty; we
copy between those fds and the client's streams, apply resize messages
to the pty, and report the exit (which arrives on the parent's
WatchContainers stream) as the kubelet does: a Status on the error
stream.

attach: the container's output goes to the logger (priv/logger.py), so
attach follows its log from now on, stdout and stderr apart, until the
container ends.  Its input: a container started with stdin: true has a
pipe, one with tty: true a pty, whose write end (master) the parent keeps
for the container's life and lends us a duplicate of (AttachContainer).
What the client types goes there; resize messages set the pty's window.
As containerd does, input for a container without stdin is read and
dropped.  Ending our stdin closes only our duplicate: the container's
stdin stays open for the next attach.  With stdinOnce the first attach
gets the parent's own fd, so its end is the container's EOF (with a tty
the terminal stays open: the logger holds the master too).
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import termios
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from pufflet.logs.reader import LogReader

from . import spdy, streamproto as sp, wsstream
from .server import Request
from .streaming import (STREAM_CREATION_TIMEOUT, AttachedStdin, Backend, ExecError, Target,
                        Upgraded, close_quietly, upgrade, bad_request)

log = logging.getLogger("pufflet.nodeapi.remotecommand")

# After the process exits, output still in the pipes is sent; a child it
# left behind holding them open must not keep the session forever: once
# no output came for this long, we stop.
OUTPUT_LINGER = 1.0
# attach: how long the log must stay quiet after the container's exit
# before we call its output complete (the logger drains the pipe after).
LOGGER_LINGER = 0.5
# As the kubelet: after the last status, the client closes first.
CLIENT_LINGER = 10.0
POLL = 0.2
READ_SIZE = 64 * 1024

EXEC_ROUTE = r"/exec/(?P<namespace>[^/]+)/(?P<pod>[^/]+)(?:/(?P<uid>[^/]+))?/(?P<container>[^/]+)"
ATTACH_ROUTE = r"/attach/(?P<namespace>[^/]+)/(?P<pod>[^/]+)(?:/(?P<uid>[^/]+))?/(?P<container>[^/]+)"

_TRUE = ("1", "true")


@dataclass(frozen=True)
class Options:
    command: tuple[str, ...]
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


def _flag(query: Mapping[str, Sequence[str]], *names: str) -> bool:
    return any(v.lower() in _TRUE for n in names for v in query.get(n, ()))


def parse_options(query: Mapping[str, Sequence[str]], exec_: bool = True) -> Options:
    """The kubelet reads input/output/error/tty (the API server's names,
    api.ExecStdinParam ...); direct clients often write stdin/stdout/
    stderr: both are taken, "1" or "true"."""
    stdin = _flag(query, "stdin", "input")
    stdout = _flag(query, "stdout", "output")
    stderr = _flag(query, "stderr", "error")
    tty = _flag(query, "tty")
    if tty and stderr:
        stderr = False          # as the kubelet: a terminal has one output
    if not (stdin or stdout or stderr):
        raise bad_request("you must specify at least 1 of stdin, stdout, stderr")
    command = tuple(query.get("command", ()))
    if exec_ and not command:
        raise bad_request("you must specify at least one command for the container")
    return Options(command, stdin, stdout, stderr, tty)


# -- the client's streams, SPDY or WebSocket alike ---------------------------------

class Channels:
    """The client's side of one session.  read() gives b"" at the end of a
    stream (FIN, v5 close, reset, or the client gone); write() says False
    once the client is gone."""

    protocol: str

    def has(self, kind: str) -> bool: ...
    def read(self, kind: str) -> bytes: ...
    def write(self, kind: str, data: bytes) -> bool: ...
    def end(self, kind: str) -> None: ...
    def finish(self, status: dict) -> None: ...
    def gone(self) -> bool: ...
    def abort(self) -> None: ...


class SpdyChannels(Channels):
    def __init__(self, session: spdy.Session, protocol: str, streams: dict) -> None:
        self.session, self.protocol, self.streams = session, protocol, streams

    @classmethod
    def accept(cls, session: spdy.Session, protocol: str, want: set[str],
               timeout: float = STREAM_CREATION_TIMEOUT) -> "SpdyChannels | None":
        """Wait for the streams the client must open (client-go opens them
        all before anything flows), replying to each."""
        streams: dict[str, spdy.Stream] = {}
        deadline = time.monotonic() + timeout
        while not want <= set(streams):
            st = session.accept(timeout=max(0.0, deadline - time.monotonic()))
            if st is None:
                log.info("exec: the client did not open its streams (%s missing)",
                         ", ".join(sorted(want - set(streams))))
                return None
            kind = st.headers.get(sp.HEADER_STREAM_TYPE, "")
            if kind not in (sp.STDIN, sp.STDOUT, sp.STDERR, sp.ERROR, sp.RESIZE) \
                    or kind in streams:
                st.reset(spdy.PROTOCOL_ERROR)
                continue
            st.reply()
            streams[kind] = st
        return cls(session, protocol, streams)

    def has(self, kind: str) -> bool:
        return kind in self.streams

    def read(self, kind: str) -> bytes:
        try:
            return self.streams[kind].read()
        except spdy.StreamReset:
            return b""

    def write(self, kind: str, data: bytes) -> bool:
        try:
            self.streams[kind].write(data)
            return True
        except spdy.SpdyError:
            return False

    def end(self, kind: str) -> None:
        if kind in self.streams:
            try:
                self.streams[kind].close()
            except spdy.SpdyError:
                pass

    def finish(self, status: dict) -> None:
        data = sp.encode_status(self.protocol, status)
        if data:
            self.write(sp.ERROR, data)
        for kind in (sp.STDOUT, sp.STDERR, sp.ERROR):
            self.end(kind)
        # Closing with the client's frames unread could reset the
        # connection and lose output in flight: let it go first.
        self.session.peer_gone.wait(CLIENT_LINGER)
        self.session.close()

    def gone(self) -> bool:
        return self.session.peer_gone.is_set() or self.session.closed.is_set()

    def abort(self) -> None:
        self.session.close(linger=0.5)


_WS_CHANNEL = {sp.STDIN: sp.CHANNEL_STDIN, sp.STDOUT: sp.CHANNEL_STDOUT,
               sp.STDERR: sp.CHANNEL_STDERR, sp.ERROR: sp.CHANNEL_ERROR,
               sp.RESIZE: sp.CHANNEL_RESIZE}


class WsChannels(Channels):
    def __init__(self, ws: wsstream.WebSocket, protocol: str, opts: Options) -> None:
        self.protocol = protocol
        self.conn = wsstream.ChannelConn(ws, protocol, 5,
                                         readable=wsstream.remotecommand_readable(opts.stdin))
        self.kinds = {sp.ERROR, sp.RESIZE}
        for kind, on in ((sp.STDIN, opts.stdin), (sp.STDOUT, opts.stdout),
                         (sp.STDERR, opts.stderr)):
            if on:
                self.kinds.add(kind)
        # The kubelet's "the streams are up" message.
        self.write_ch(wsstream.first_write_channel(opts.stdout, opts.stderr), b"")

    def write_ch(self, ch: int, data: bytes) -> bool:
        try:
            self.conn.write(ch, data)
            return True
        except (OSError, wsstream.WebSocketError):
            return False

    def has(self, kind: str) -> bool:
        return kind in self.kinds

    def read(self, kind: str) -> bytes:
        return self.conn.read(_WS_CHANNEL[kind])

    def write(self, kind: str, data: bytes) -> bool:
        return self.write_ch(_WS_CHANNEL[kind], data)

    def end(self, kind: str) -> None:
        # Nothing to send: v5's close signal goes from client to server
        # only.  client-go's executor (kubectl) knows no channel 255 and
        # logs "Unknown stream id 255" for each one it gets; the end of
        # the output is the error channel's Status and the close frame.
        pass

    def finish(self, status: dict) -> None:
        self.write(sp.ERROR, sp.encode_status(self.protocol, status))
        self.conn.close()

    def gone(self) -> bool:
        return self.conn.closed.is_set()

    def abort(self) -> None:
        self.conn.close(wait=0.5)


def open_channels(up: Upgraded, opts: Options) -> Channels | None:
    if up.ws is not None:
        return WsChannels(up.ws, up.protocol, opts)
    want = sp.expected_streams(up.protocol, opts.stdin, opts.stdout, opts.stderr, opts.tty)
    ch = SpdyChannels.accept(up.session, up.protocol, want)
    if ch is None:
        up.session.close(linger=0.5)
    return ch


# -- the process's fds ------------------------------------------------------------

class ProcessFds:
    """The exec's fds, closed once, never while an ioctl or a write is on
    them (a closed fd number is soon someone else's)."""

    def __init__(self, stdin: int, stdout: int | None, stderr: int | None,
                 tty: bool) -> None:
        self.tty = tty
        # Non-blocking, so a process that stops reading cannot wedge us in
        # write(2).  With a tty this is the master's one file description.
        os.set_blocking(stdin, False)
        self.stdin: int | None = stdin
        self.outs: dict[str, int] = {}
        if stdout is not None:
            self.outs[sp.STDOUT] = stdout
        if stderr is not None:
            if tty:
                os.close(stderr)    # the same pty master: read it once
            else:
                self.outs[sp.STDERR] = stderr
        self.lock = threading.Lock()
        self.closed = False

    def close_stdin(self) -> None:
        with self.lock:
            if self.stdin is not None:
                os.close(self.stdin)
                self.stdin = None

    def write_stdin(self, data: bytes, stop: threading.Event) -> bool:
        """All of data to the process; False once it cannot take more (it
        closed its stdin, or we stop)."""
        view = memoryview(data)
        while view:
            with self.lock:
                fd = self.stdin
                if fd is None:
                    return False
                _, w, _ = select.select([], [fd], [], 0)
                if w:
                    try:
                        n = os.write(fd, view[:65536])
                        view = view[n:]
                        continue
                    except BlockingIOError:
                        pass
                    except OSError:     # EPIPE, EIO: the reader is gone
                        return False
            if stop.is_set():
                return False
            try:
                select.select([], [fd], [], POLL)
            except (OSError, ValueError):
                return False
        return True

    def resize(self, size: sp.TerminalSize) -> None:
        with self.lock:
            # The master: exec's output fd, or attach's only one.
            fd = self.outs.get(sp.STDOUT, self.stdin)
            if self.tty and fd is not None:
                fcntl.ioctl(fd, termios.TIOCSWINSZ, sp.winsize(size))

    def close_out(self, kind: str) -> None:
        with self.lock:
            fd = self.outs.pop(kind, None)
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        self.close_stdin()
        for kind in list(self.outs):
            self.close_out(kind)


class OutputPump(threading.Thread):
    """stdout and stderr of the process to the client, in one thread that
    polls both (so it can be told to stop: a thread blocked in read(2)
    cannot).  Output the client did not ask for is read and dropped, so
    the process never blocks on a full pipe."""

    def __init__(self, fds: ProcessFds, ch: Channels, stop: threading.Event) -> None:
        super().__init__(name="exec-output", daemon=True)
        self.fds, self.ch, self.stop = fds, ch, stop
        self.last_data = time.monotonic()
        self.client_gone = False

    def run(self) -> None:
        while self.fds.outs and not self.stop.is_set():
            by_fd = {fd: kind for kind, fd in self.fds.outs.items()}
            try:
                ready, _, _ = select.select(list(by_fd), [], [], POLL)
            except (OSError, ValueError):
                return
            for fd in ready:
                kind = by_fd[fd]
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:         # EIO: the pty's last slave is closed
                    data = b""
                if not data:
                    self.fds.close_out(kind)
                    continue
                self.last_data = time.monotonic()
                if self.ch.has(kind) and not self.client_gone:
                    if not self.ch.write(kind, data):
                        self.client_gone = True
                        return

    def drain(self, linger: float = OUTPUT_LINGER) -> None:
        """After the exit: wait while output still comes."""
        while self.is_alive():
            self.join(0.05)
            if time.monotonic() - self.last_data > linger:
                self.stop.set()
                self.join()


def _pump_stdin(fds: ProcessFds | None, ch: Channels, stop: threading.Event) -> None:
    while not stop.is_set():
        data = ch.read(sp.STDIN)
        if not data:
            break
        if fds is None:
            continue            # nowhere to go: read and dropped
        if not fds.write_stdin(data, stop):
            break
    if fds is None:
        return
    # End of stdin (SPDY FIN, v5 close, the client gone): EOF for the
    # process.  With a tty this closes only our dup of the master.
    fds.close_stdin()


def _pump_resize(fds: ProcessFds, ch: Channels) -> None:
    dec = sp.ResizeDecoder()
    while data := ch.read(sp.RESIZE):
        try:
            sizes = dec.feed(data)
        except ValueError as e:
            log.info("exec: bad resize message: %s", e)
            return
        for size in sizes:
            try:
                fds.resize(size)
            except OSError as e:
                log.debug("exec: TIOCSWINSZ: %s", e)


def exit_status(ex) -> dict:
    """The Status for an exec's exit event: a signal counts as 128+n, as
    a shell reports it and as the kubelet's runtimes do."""
    code = getattr(ex, "exit_code", None)
    sig = getattr(ex, "signal", None)
    if code is None and sig is not None:
        code = 128 + sig
    if code is None:
        return sp.exit_status(None, error=f"exit status unknown: {getattr(ex, 'reason', '')}")
    return sp.exit_status(code)


def run_exec(ch: Channels, backend: Backend, target: Target, opts: Options) -> None:
    try:
        started = backend.start_exec(target, list(opts.command), opts.tty)
    except ExecError as e:
        # As the kubelet words a runtime that could not run the command.
        ch.finish(sp.exit_status(None, error=f"error executing command in container: {e}"))
        return
    fds = ProcessFds(*started.fds, tty=opts.tty)
    stop = threading.Event()
    out = OutputPump(fds, ch, stop)
    out.start()
    if opts.stdin and ch.has(sp.STDIN):
        threading.Thread(target=_pump_stdin, args=(fds, ch, stop), name="exec-stdin",
                         daemon=True).start()
    else:
        fds.close_stdin()
    if opts.tty and ch.has(sp.RESIZE):
        threading.Thread(target=_pump_resize, args=(fds, ch), name="exec-resize",
                         daemon=True).start()
    try:
        while True:
            try:
                ex = started.exit.result(timeout=POLL)
                break
            except TimeoutError:
                if ch.gone() or out.client_gone:
                    # Nobody to tell: closing the fds hangs the process up
                    # (SIGHUP with a tty, EOF and EPIPE with pipes).
                    log.info("exec %s: the client left before the process ended",
                             started.exec_id)
                    stop.set()
                    out.join()
                    ch.abort()
                    return
        out.drain()
        for kind in (sp.STDOUT, sp.STDERR):
            ch.end(kind)
        ch.finish(exit_status(ex))
    finally:
        stop.set()
        out.join()
        fds.close()


# -- attach: the container's output, from its log ------------------------------------

def _follow(reader: LogReader, backend: Backend, target: Target, ch: Channels, kind: str,
            stop: threading.Event) -> None:
    ended_at: float | None = None
    try:
        while not reader.done and not stop.is_set():
            # The logger is another process, behind the container by what
            # sits in the pipe: after the exit, read on until the log has
            # been quiet for LOGGER_LINGER, then end unfinished lines.
            if ended_at is None and not backend.running(target):
                ended_at = time.monotonic()
            final = ended_at is not None and time.monotonic() - ended_at > LOGGER_LINGER
            data = reader.poll(final=final)
            if data:
                if ended_at is not None:
                    ended_at = time.monotonic()
                if not ch.write(kind, data):
                    return
            elif reader.idle:
                stop.wait(POLL / 2)
    finally:
        reader.close()


def run_attach(ch: Channels, backend: Backend, target: Target, opts: Options,
               att: AttachedStdin | None) -> None:
    stop = threading.Event()
    fds = ProcessFds(att.fd, None, None, att.tty) if att is not None else None
    # The output from now on: found before any input is passed, so that
    # the answer to it cannot come before the place we follow from.
    readers = {kind: LogReader(backend.log_files(target), tail_lines=0, follow=True,
                               stream=kind)
               for kind in (sp.STDOUT, sp.STDERR) if ch.has(kind)}
    try:
        if opts.stdin and ch.has(sp.STDIN):
            writer = fds if att is not None and att.stdin else None
            threading.Thread(target=_pump_stdin, args=(writer, ch, stop),
                             name="attach-stdin", daemon=True).start()
        if fds is not None and att.tty and ch.has(sp.RESIZE):
            threading.Thread(target=_pump_resize, args=(fds, ch), name="attach-resize",
                             daemon=True).start()
        threads = [threading.Thread(target=_follow,
                                    args=(reader, backend, target, ch, kind, stop),
                                    name=f"attach-{kind}", daemon=True)
                   for kind, reader in readers.items()]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            if ch.gone():
                stop.set()
                for t in threads:
                    t.join()
                ch.abort()
                return
            for t in threads:
                t.join(POLL / len(threads))
        if not threads:
            # Input only: until the container ends or the client leaves.
            while backend.running(target) and not ch.gone():
                stop.wait(POLL)
        for kind in (sp.STDOUT, sp.STDERR):
            ch.end(kind)
        ch.finish(sp.status_success())
    finally:
        stop.set()
        if fds is not None:
            fds.close()
        for r in readers.values():
            r.close()       # those a follower never started with


# -- the handlers -------------------------------------------------------------------

def serve(req: Request, match, backend: Backend, exec_: bool) -> None:
    """One /exec or /attach request, to its end.  Refusals before the
    upgrade are server.HTTPError, answered by the server."""
    params = match.groupdict()
    opts = parse_options(req.query, exec_)
    target = backend.resolve(params["namespace"], params["pod"], params["container"],
                             params.get("uid"))
    what = "exec" if exec_ else "attach"
    up = upgrade(req, sp.SPDY_REMOTECOMMAND_PROTOCOLS, sp.WS_REMOTECOMMAND_PROTOCOLS, what)
    if up is None:
        return
    att = None
    try:
        ch = open_channels(up, opts)
        if ch is None:
            pass
        elif exec_:
            run_exec(ch, backend, target, opts)
        else:
            # Only now that the client is there: with stdinOnce, taking
            # the container's stdin is what ends it at the close.
            if opts.stdin or opts.tty:
                try:
                    att = backend.attach(target)
                except ExecError as e:
                    log.warning("attach %s/%s/%s: no stdin: %s", target.namespace,
                                target.pod, target.container, e)
            run_attach(ch, backend, target, opts, att)
            att = None          # run_attach closed it
    except Exception:       # noqa: BLE001 - the connection is ours: log, close
        log.exception("%s %s/%s/%s: failed", what, target.namespace, target.pod,
                      target.container)
    finally:
        close_quietly(up.sock)
        if att is not None:
            os.close(att.fd)


def register(server, backend: Backend) -> None:
    """The routes on the node API server: GET for WebSocket clients, POST
    as the API server sends them over SPDY; authorized as nodes/proxy."""
    for method in ("GET", "POST"):
        server.add_route(method, EXEC_ROUTE, "proxy",
                         lambda req, m: serve(req, m, backend, True))
        server.add_route(method, ATTACH_ROUTE, "proxy",
                         lambda req, m: serve(req, m, backend, False))


__all__ = ["Options", "parse_options", "serve", "register", "run_exec", "run_attach",
           "EXEC_ROUTE", "ATTACH_ROUTE"]
