"""Write a container's stdout and stderr as CRI log records, with rotation.

One LogWriter per container restart, driven by the parent's selector loop:
feed() whatever a non-blocking read of the pipe returned, flush() a stream
at its EOF, close() when the container is gone.  Nothing here blocks on the
container or spawns anything, so one process serves every pod.

Behaviour matched to containerd's CRI logger (internal/cri/io/logger.go):

- a line is split into records of at most max_line bytes of content, all
  tagged P except the last, tagged F; a line of exactly max_line bytes is
  one F record, and an empty line is an F record with empty content;
- "\\r\\n" ends a line like "\\n" (the "\\r" is dropped), a lone "\\r" is
  content;
- bytes not yet ended by a newline are held back until the newline comes,
  more than max_line of them arrive (a P record), or the stream ends: then
  they are written as a P record, which is how a reader knows the
  container's last line had no newline;
- every record of one read carries the time of that read.

A write error (disk full) drops the batch and is counted, as containerd
does: the pipe must keep draining or the container blocks.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time

from .format import DEFAULT_MAX_LINE, STREAMS, format_timestamp, rotated_suffix, rotation_key

__all__ = ["LogWriter", "container_log_dir", "DEFAULT_MAX_SIZE", "DEFAULT_MAX_FILES"]

log = logging.getLogger(__name__)

# The kubelet's containerLogMaxSize and containerLogMaxFiles defaults.
DEFAULT_MAX_SIZE = 10 * 1024 * 1024
DEFAULT_MAX_FILES = 5


def container_log_dir(root: str, namespace: str, pod: str, uid: str, container: str) -> str:
    """The kubelet's layout: <root>/<ns>_<pod>_<uid>/<container>."""
    return os.path.join(root, f"{namespace}_{pod}_{uid}", container)


def _ns(now: float | None) -> int:
    if now is None:
        return time.time_ns()
    # A float of epoch seconds holds only ~0.2 µs: rounding to the
    # microsecond keeps float noise out of the written nanoseconds.
    return round(now * 1_000_000) * 1000


class LogWriter:
    """Appends CRI records to <directory>/<restart>.log and rotates it."""

    def __init__(self, directory: str, restart: int, *,
                 max_size: int = DEFAULT_MAX_SIZE, max_files: int = DEFAULT_MAX_FILES,
                 max_line: int = DEFAULT_MAX_LINE, gid: int | None = None,
                 mode: int = 0o640) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        if max_files < 2:
            # As the kubelet: one current file plus at least one rotated.
            raise ValueError("max_files must be at least 2")
        self.directory = directory
        self.name = f"{int(restart)}.log"
        self.path = os.path.join(directory, self.name)
        self.max_size = max_size          # <= 0: never rotate
        self.max_files = max_files
        self.max_line = max_line
        self._gid = gid
        self._mode = mode
        self._pending = {s: b"" for s in STREAMS}
        # Record heads without the timestamp: " stdout F " and so on.
        self._head = {(s, t): b" %s %s " % (s.encode(), t) for s in STREAMS for t in (b"F", b"P")}
        # Counters for status and the node API's stats.
        self.bytes_written = 0
        self.bytes_dropped = 0
        self.write_errors = 0
        self.rotations = 0
        os.makedirs(directory, 0o755, exist_ok=True)
        # Everything below happens relative to this fd: a directory renamed
        # or replaced under us cannot redirect our writes elsewhere.
        self._dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._fd = -1
        try:
            self._open()
        except BaseException:
            os.close(self._dfd)
            raise

    # --- files ---------------------------------------------------------------

    def _open(self) -> None:
        # O_APPEND: an existing file (pufflet restarted, the container did
        # not) is continued, never overwritten.  O_NOFOLLOW: a symlink
        # planted at the name is refused.  O_NONBLOCK: a FIFO planted there
        # cannot hang the parent; it is refused just below.
        fd = os.open(self.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_NONBLOCK | os.O_CLOEXEC, self._mode, dir_fd=self._dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", self.path)
            # The umask must not decide who reads container logs.
            os.fchmod(fd, self._mode)
            if self._gid is not None and st.st_gid != self._gid:
                os.fchown(fd, -1, self._gid)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = st.st_size

    def _rotated(self) -> list[tuple[tuple[str, int], str]]:
        prefix = self.name + "."
        out = []
        for n in os.listdir(self._dfd):
            if n.startswith(prefix):
                k = rotation_key(n[len(prefix):])
                if k is not None:
                    out.append((k, n))
        out.sort()
        return out

    def rotate(self, now: float | None = None) -> None:
        """Rename the current file to <restart>.log.<time> and start a new one.

        Called by size; public so the caller can rotate on a signal.  Old
        rotated files beyond max_files-1 are removed, oldest first.
        """
        ns = _ns(now)
        # Several rotations in one second get increasing sequence numbers.
        # Past the highest one of that second, never the first free one:
        # once the oldest files are removed, a free low number would make
        # the newest file sort as the oldest (removed next, and read again
        # by a follower).
        stamp = rotation_key(rotated_suffix(ns))
        taken = [k[1] for k, _ in self._rotated() if k[0] == stamp[0]]
        seq = max(taken) + 1 if taken else 0
        rotated = f"{self.name}.{rotated_suffix(ns, seq)}"
        os.rename(self.name, rotated, src_dir_fd=self._dfd, dst_dir_fd=self._dfd)
        os.close(self._fd)
        self._fd = -1
        self._open()
        self.rotations += 1
        for _, n in self._rotated()[: -(self.max_files - 1)]:
            try:
                os.unlink(n, dir_fd=self._dfd)
            except FileNotFoundError:
                pass

    # --- records -------------------------------------------------------------

    def _split(self, out: list[bytes], ts: bytes, stream: str, line: bytes, final: bool) -> None:
        """Records for one line too long for a single one."""
        m = self.max_line
        p = ts + self._head[stream, b"P"]
        while len(line) > m:
            out.append(p + line[:m] + b"\n")
            line = line[m:]
        out.append(ts + self._head[stream, b"F" if final else b"P"] + line + b"\n")

    def _records(self, out: list[bytes], stream: str, data: bytes, ts: bytes) -> None:
        buf = self._pending[stream] + data if self._pending[stream] else data
        nl = buf.rfind(b"\n")
        if nl >= 0:
            lines = buf[:nl]
            rest = buf[nl + 1:]
            if b"\r" in lines:
                # containerd strips one "\r" before each "\n".
                lines = lines.replace(b"\r\n", b"\n")
                if lines.endswith(b"\r"):
                    lines = lines[:-1]
            parts = lines.split(b"\n")
            if len(lines) <= self.max_line or max(map(len, parts)) <= self.max_line:
                # The common case, done in C: every line fits one record.
                f = ts + self._head[stream, b"F"]
                out.append(f + (b"\n" + f).join(parts) + b"\n")
            else:
                for line in parts:
                    self._split(out, ts, stream, line, True)
        else:
            rest = buf
        # Hold back an unfinished line, but never more than max_line bytes
        # of it; a trailing "\r" is not counted yet, it may be half of "\r\n".
        m = self.max_line
        if len(rest) - rest.endswith(b"\r") > m:
            p = ts + self._head[stream, b"P"]
            while len(rest) - rest.endswith(b"\r") > m:
                out.append(p + rest[:m] + b"\n")
                rest = rest[m:]
        self._pending[stream] = rest

    def feed(self, stream: str, data: bytes, now: float | None = None) -> None:
        """Take bytes just read from the container's stream; write every
        record they complete in one write(2)."""
        if stream not in self._pending:
            raise ValueError(f"unknown stream {stream!r}")
        if not data:
            return
        out: list[bytes] = []
        ns = _ns(now)
        self._records(out, stream, data, format_timestamp(ns))
        if out:
            self._write(out[0] if len(out) == 1 else b"".join(out), ns)

    def flush(self, stream: str, now: float | None = None) -> None:
        """The stream has ended: write its unfinished line as a P record."""
        rest = self._pending[stream]
        if not rest:
            return
        self._pending[stream] = b""
        ns = _ns(now)
        out: list[bytes] = []
        self._split(out, format_timestamp(ns), stream, rest, False)
        self._write(b"".join(out), ns)

    def close(self, now: float | None = None) -> None:
        """Flush both streams and close the file; the container is gone."""
        if self._fd < 0:
            return
        try:
            for s in STREAMS:
                self.flush(s, now)
        finally:
            os.close(self._fd)
            os.close(self._dfd)
            self._fd = -1

    def __enter__(self) -> "LogWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- output --------------------------------------------------------------

    def _write(self, blob: bytes, ns: int) -> None:
        if self.max_size <= 0:
            self._write_all(blob)
            return
        while blob:
            room = self.max_size - self._size
            if len(blob) <= room:
                self._write_all(blob)
                return
            # Fill the file with whole records, then rotate: a record is
            # never split across files, so a reader never sees half of one.
            cut = blob.rfind(b"\n", 0, room) + 1 if room > 0 else 0
            if cut == 0 and self._size == 0:
                cut = blob.find(b"\n") + 1  # one record larger than a file
            if cut:
                self._write_all(blob[:cut])
                blob = blob[cut:]
            try:
                self.rotate(ns / 1e9)
            except OSError as e:
                # Keep appending to the big file rather than lose lines.
                log.warning("%s: cannot rotate: %s", self.path, e.strerror)
                self._write_all(blob)
                return

    def _write_all(self, blob: bytes) -> None:
        view = memoryview(blob)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self._size += n
                self.bytes_written += n
        except OSError as e:
            self.write_errors += 1
            self.bytes_dropped += len(view)
            if self.write_errors == 1:
                log.warning("%s: dropping container output: %s", self.path, e.strerror)
