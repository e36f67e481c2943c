"""The container logger: one process per node that drains every container's
stdout and stderr into CRI log files.

Why a process of its own: a container's output must keep flowing while
pufflet restarts (rcctl restart, an upgrade, a crash of the parent), and
the reading end of a pipe lives only as long as some process holds it.  So
the parent never reads container output itself: it makes the pipes, gives
the write ends to the container and hands the read ends to this logger,
which holds them for as long as the container runs.  It is one
single-threaded selector loop for all containers, never a process per
container, and it runs pufflet's Python, not the parent's memory: it is
started with exec, so it inherits no fd, lock or thread of the parent.

    parent (root)                         logger ("pufflet: logger", root)
      pipe() x2 ── write ends ─> container
             └──── read ends, over <state_dir>/logger.sock (SCM_RIGHTS) ─┘

The socket is a SOCK_SEQPACKET unix socket (0600, in the 0700 state
directory: root only): each message is one bounded JSON object, a request
carries its fds, and the logger answers each with {"ok": ...} or
{"error": "..."}.  The logger computes every path itself from the log
directory and names it checks; a message never names a file.

Lifetime: the parent starts the logger when it cannot connect to one (a
lock file keeps it to one per state directory); the logger has its own
session, so neither the parent's SIGTERM nor its exit reaches it, and a
restarted parent reconnects to the same logger.  It exits once it holds no
pipe and no parent has been connected for LINGER seconds: then there is
nothing to lose, and the next parent starts a new one.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import re
import select
import selectors
import signal
import socket
import stat
import sys
import time

from pufflet.logs import LogWriter, container_log_dir

__all__ = ["LoggerClient", "LoggerError", "socket_path", "main"]

log = logging.getLogger("pufflet.priv.logger")

SOCKET = "logger.sock"
LOCK = "logger.lock"
MAX_MESSAGE = 4096          # a request or answer; names are short
LINGER = 10.0               # idle seconds (no pipe, no parent) before exiting
START_TIMEOUT = 10.0
CALL_TIMEOUT = 5.0
READ_SIZE = 65536

# The names a request carries become path components: the spec's patterns
# again, here, since the logger trusts nobody's validation but its own.
_DNS = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?\Z")
_POD_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z"
                      r"|[0-9a-f]{32}\Z")
_KEY = re.compile(r"[A-Za-z0-9:/._-]{1,128}\Z")


class LoggerError(Exception):
    """The logger cannot be reached or refused a request."""


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET)


def pods_log_root(log_dir: str) -> str:
    """Where container logs go: <log_dir>/pods/<ns>_<pod>_<uid>/<container>/."""
    return os.path.join(log_dir, "pods")


# -- the parent's side ----------------------------------------------------------

class LoggerClient:
    """The parent's connection to the logger, started on first need."""

    def __init__(self, state_dir: str, log_dir: str, gid: int | None = None) -> None:
        self.state_dir = state_dir
        self.log_dir = log_dir
        self.gid = gid          # the agent's group: it reads the logs for the node API
        self._sock: socket.socket | None = None
        self.pid = 0            # the logger's, as it said when we connected

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def connect(self) -> None:
        """Connect to the running logger, or start one and connect."""
        if self._sock is not None:
            return
        try:
            self._open()
            return
        except OSError:
            pass
        self._start()
        self._open()

    def _open(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(CALL_TIMEOUT)
            s.connect(socket_path(self.state_dir))
            self._sock = s
            self.pid = self._call({"op": "hello"})["pid"]
        except BaseException:
            s.close()
            self._sock = None
            raise

    def _start(self) -> None:
        """exec a fresh interpreter as the logger and wait until it listens
        (or finds another logger listening)."""
        import pufflet
        top = os.path.dirname(os.path.dirname(os.path.abspath(pufflet.__file__)))
        argv = [sys.executable, "-s", "-m", "pufflet.priv.logger",
                self.state_dir, self.log_dir, "-" if self.gid is None else str(self.gid)]
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": top}
        rfd, wfd = os.pipe()
        try:
            argv.append(str(wfd))
            pid = os.fork()
            if pid == 0:
                # Twice, with setsid between: the logger is in a session of
                # its own (no SIGTERM or hangup of ours reaches it) and is
                # not our child, so our waitpid(-1) never meets it and a
                # restarted parent finds it as it left it.  Only async-safe
                # calls until execve: this may be a threaded process.
                try:
                    os.setsid()
                    if os.fork() == 0:
                        os.set_inheritable(wfd, True)
                        os.execve(sys.executable, argv, env)
                finally:
                    os._exit(0)
            os.close(wfd)
            wfd = -1
            while True:
                try:
                    os.waitpid(pid, 0)
                    break
                except InterruptedError:
                    continue
                except ChildProcessError:
                    break       # reaped by a SIGCHLD handler: all the same
            r, _, _ = select.select([rfd], [], [], START_TIMEOUT)
            if not r:
                raise LoggerError("the container logger did not start in "
                                  f"{START_TIMEOUT:.0f}s")
            # A byte when it listens, EOF when it failed or found another.
            os.read(rfd, 1)
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)

    def _call(self, req: dict, fds: tuple[int, ...] = ()) -> dict:
        assert self._sock is not None
        data = json.dumps(req).encode()
        if len(data) > MAX_MESSAGE:
            raise LoggerError("logger request too large")
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self._sock.sendmsg([data], anc)
        reply = self._sock.recv(MAX_MESSAGE)
        if not reply:
            raise ConnectionError("the container logger closed the connection")
        obj = json.loads(reply)
        if "error" in obj:
            raise LoggerError(obj["error"])
        return obj

    def add(self, key: str, namespace: str, pod: str, pod_uid: str, container: str,
            restart: int, stdout_fd: int, stderr_fd: int) -> str:
        """Hand over the read ends of a container's stdout and stderr (the
        caller still closes its copies).  Returns the log file's path.
        A logger that went away is started again, once."""
        req = {"op": "add", "key": key, "namespace": namespace, "pod": pod,
               "pod_uid": pod_uid, "container": container, "restart": restart}
        for attempt in (1, 2):
            try:
                self.connect()
                return self._call(req, (stdout_fd, stderr_fd))["path"]
            except LoggerError:
                raise
            except (OSError, ValueError, KeyError) as e:
                self.close()
                if attempt == 2:
                    raise LoggerError(f"the container logger is unreachable: {e}") from None
        raise AssertionError("not reached")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- the logger process ---------------------------------------------------------

class _Container:
    """One container restart's output: two pipes into one LogWriter."""

    def __init__(self, writer: LogWriter) -> None:
        self.writer = writer
        self.open = 2


class Logger:
    def __init__(self, state_dir: str, log_dir: str, gid: int | None = None) -> None:
        self.state_dir = state_dir
        self.root = pods_log_root(log_dir)
        self.gid = gid
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.conns: set[socket.socket] = set()
        self.pipes: dict[int, tuple[_Container, str]] = {}
        self.idle_since = time.monotonic()

    def listen(self) -> None:
        path = socket_path(self.state_dir)
        try:
            os.unlink(path)     # stale: we hold the lock, no logger owns it
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        s.listen(8)
        s.setblocking(False)
        self.listener = s
        self.sel.register(s, selectors.EVENT_READ, "listen")

    def run(self) -> None:
        while True:
            if self.conns or self.pipes:
                self.idle_since = time.monotonic()
                timeout = None
            else:
                timeout = self.idle_since + LINGER - time.monotonic()
                if timeout <= 0:
                    return
            for key, _ in self.sel.select(timeout):
                if key.data == "listen":
                    self._accept()
                elif key.data == "conn":
                    self._request(key.fileobj)
                else:
                    self._drain(key.fd)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.conns.add(conn)
        self.sel.register(conn, selectors.EVENT_READ, "conn")

    def _request(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            data, anc, flags, _ = conn.recvmsg(MAX_MESSAGE + 1,
                                               socket.CMSG_SPACE(2 * array.array("i").itemsize))
        except BlockingIOError:
            return
        except OSError:
            data, anc, flags = b"", [], 0
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                fds.extend(a)
        if not data:
            self.sel.unregister(conn)
            self.conns.discard(conn)
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE:
                raise ValueError("message too large")
            reply = self._handle(json.loads(data), fds)
        except (ValueError, KeyError, TypeError, OSError) as e:
            for fd in fds:
                os.close(fd)
            reply = {"error": str(e)[:512]}
        try:
            conn.send(json.dumps(reply).encode())
        except OSError:
            pass        # the parent went away; its hangup comes next

    def _handle(self, req: dict, fds: list[int]) -> dict:
        op = req.get("op")
        if op == "hello":
            if fds:
                raise ValueError("hello carries no fds")
            return {"ok": True, "pid": os.getpid()}
        if op != "add":
            raise ValueError(f"unknown op {op!r}")
        if len(fds) != 2:
            raise ValueError("add carries exactly two fds: stdout, stderr")
        ns, pod, uid, name = (req["namespace"], req["pod"], req["pod_uid"], req["container"])
        restart, key = req["restart"], req["key"]
        for what, v, pat in (("namespace", ns, _DNS), ("pod", pod, _DNS),
                             ("pod uid", uid, _POD_UID), ("container", name, _DNS),
                             ("key", key, _KEY)):
            if not isinstance(v, str) or len(v) > 253 or not pat.match(v):
                raise ValueError(f"bad {what} {v!r}")
        if not isinstance(restart, int) or isinstance(restart, bool) \
                or not 0 <= restart < 2**31:
            raise ValueError(f"bad restart count {restart!r}")
        directory = container_log_dir(self.root, ns, pod, uid, name)
        self._make_dirs(directory)
        writer = LogWriter(directory, restart, gid=self.gid, mode=0o640)
        c = _Container(writer)
        for fd, stream in zip(fds, ("stdout", "stderr")):
            os.set_blocking(fd, False)
            self.pipes[fd] = (c, stream)
            self.sel.register(fd, selectors.EVENT_READ, "pipe")
        return {"ok": True, "path": writer.path}

    def _make_dirs(self, directory: str) -> None:
        """The root, the pod's and the container's directories, 0750
        root:<agent group>: the agent's node API reads the logs (files 0640,
        same group); nobody else may, and only root writes."""
        if self.gid is None:
            return      # LogWriter makes them, as before there was an agent to read them
        os.makedirs(os.path.dirname(self.root), 0o755, exist_ok=True)
        cur = self.root
        for part in [""] + os.path.relpath(directory, self.root).split(os.sep):
            cur = os.path.join(cur, part) if part else cur
            try:
                os.mkdir(cur, 0o750)
            except FileExistsError:
                pass
            st = os.lstat(cur)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
                raise ValueError(f"{cur}: not a directory owned by root")
            if st.st_gid != self.gid or st.st_mode & 0o7777 != 0o750:
                os.chown(cur, 0, self.gid)
                os.chmod(cur, 0o750)

    def _drain(self, fd: int) -> None:
        c, stream = self.pipes[fd]
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            # EIO is a tty container's pty master once its last slave is
            # closed: its end of output, like a pipe's EOF.
            if e.errno != errno.EIO:
                log.warning("%s: reading %s: %s", c.writer.path, stream, e.strerror)
            data = b""
        if data:
            c.writer.feed(stream, data)
            return
        # EOF: every holder of the write end (the container, its children)
        # has closed it.
        self.sel.unregister(fd)
        del self.pipes[fd]
        os.close(fd)
        c.writer.flush(stream)
        c.open -= 1
        if c.open == 0:
            c.writer.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    state_dir, log_dir, group, ready = args[0], args[1], args[2], int(args[3])
    gid = None if group == "-" else int(group)
    logging.basicConfig(level=logging.INFO, format="pufflet logger: %(message)s")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from pufflet import platform
        platform.current().set_title("pufflet: logger")
    except Exception:
        pass        # a title is a nicety
    lockfd = os.open(os.path.join(state_dir, LOCK),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        os.close(ready)     # another logger runs: the parent connects to it
        return 0
    lg = Logger(state_dir, log_dir, gid)
    lg.listen()
    os.write(ready, b"r")
    os.close(ready)
    lg.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
