"""Read CRI log files the way `kubectl logs` wants them.

Pure file reading, no privileges: the unprivileged agent's node API gives
it the paths (or fds the parent passed) of one container restart, oldest
first, and streams what comes out.

Output follows the kubelet's ReadLogs (pkg/kubelet/kuberuntime/logs):
content as the container wrote it, P records joined back into their line,
prefixed with the kubelet's fixed-width RFC 3339 timestamp and a space when
timestamps are asked for, cut at exactly limit_bytes.  Where we differ, on
purpose:

- rotated files are read too, so tail_lines and a follow that crosses a
  rotation see everything still on disk (the kubelet reads only the current
  file);
- tail_lines and since count and filter whole lines, a line's time being
  that of its first record (the kubelet counts and filters records);
- P records are joined per stream, so a long stdout line interleaved with
  stderr output comes out whole (the kubelet writes records as they come).

follow polls (poll_interval); kqueue EVFILT_VNODE on OpenBSD or inotify on
Linux can replace the sleep later without changing LogReader, which never
blocks: an event-driven server calls poll() itself.
"""

from __future__ import annotations

import calendar
import datetime
import logging
import os
import threading
import time
from typing import Callable, Iterable, Iterator, Union

from .format import (
    CONTENT_F_RE, RECORD_RE, TS_CONTENT_F_RE, LogFormatError, fixed_timestamp, parse_line, parse_timestamp,
    rotation_key,
)

__all__ = ["LogReader", "read_logs", "container_log_files"]

log = logging.getLogger(__name__)

FileRef = Union[str, "os.PathLike[str]", int]
Stop = Union[threading.Event, Callable[[], bool], None]

# A line joined from P records is let out in pieces past this size: a
# container that never writes a newline must not grow the reader forever.
MAX_JOIN = 1 << 20


def container_log_files(directory: str, restart: int) -> list[str]:
    """The files of one container restart, oldest first: rotated ones by
    rotation time, then <restart>.log (listed even when it is missing for a
    moment, mid-rotation, so a follower waits for it)."""
    current = os.path.join(directory, f"{int(restart)}.log")
    return _rotated_files(current) + [current]


def _rotated_files(current: str) -> list[str]:
    """Rotated files of the log file at current, oldest first."""
    directory, base = os.path.split(current)
    prefix = base + "."
    rotated = []
    for name in os.listdir(directory or "."):
        if name.startswith(prefix):
            k = rotation_key(name[len(prefix):])
            if k is not None:
                rotated.append((k, name))
    rotated.sort()
    return [os.path.join(directory, n) for _, n in rotated]


def _since_ns(since: datetime.datetime) -> int:
    if since.tzinfo is None:
        since = since.replace(tzinfo=datetime.timezone.utc)
    return calendar.timegm(since.utctimetuple()) * 1_000_000_000 + since.microsecond * 1000


class _Source:
    """One file being read: its fd (None until a missing file appears),
    the offset of the next unread record and its identity."""

    __slots__ = ("path", "fd", "offset", "id")

    def __init__(self, path: str | None, fd: int | None) -> None:
        self.path = path
        self.fd = fd
        self.offset = 0
        self.id: tuple[int, int] | None = None
        if fd is not None:
            st = os.fstat(fd)
            self.id = (st.st_dev, st.st_ino)

    @classmethod
    def open(cls, ref: FileRef) -> "_Source | None":
        if isinstance(ref, int):
            # The caller keeps its fd; we read and close a duplicate.
            return cls(None, os.dup(ref))
        path = os.fspath(ref)
        try:
            return cls(path, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            return None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Line:
    """A line being joined from P records of one stream."""

    __slots__ = ("head", "chunks", "size", "keep", "seq")

    def __init__(self, head: bytes, keep: bool, seq: int) -> None:
        self.head = head
        self.chunks: list[bytes] = []
        self.size = 0
        self.keep = keep
        self.seq = seq

    def take(self) -> bytes:
        data = self.head + b"".join(self.chunks)
        self.head = b""
        self.chunks = []
        self.size = 0
        return data


class LogReader:
    """kubectl-logs output of a list of CRI log files, oldest first.

    poll() returns the output now available (b"" if none) and never blocks;
    done says the output is complete, idle that the files hold nothing more
    for now (follow).  poll(final=True) tells a follower the writer has
    finished: read what is left, end unfinished lines, be done.
    """

    def __init__(self, files: Iterable[FileRef], *, tail_lines: int | None = None,
                 since: datetime.datetime | None = None, timestamps: bool = False,
                 limit_bytes: int | None = None, follow: bool = False, stream: str = "all",
                 block_size: int = 256 * 1024) -> None:
        if stream == "all":
            self._want = frozenset((b"stdout", b"stderr"))
        elif stream in ("stdout", "stderr"):
            self._want = frozenset((stream.encode(),))
        else:
            raise ValueError(f"stream must be stdout, stderr or all, not {stream!r}")
        self._all = stream == "all"
        self._since = None if since is None else _since_ns(since)
        self._timestamps = timestamps
        self._limit = limit_bytes
        self._follow = follow
        self._block = block_size
        self._pending: dict[bytes, _Line] = {}
        self._seq = 0
        self._skip = 0
        self._emitted = 0
        self._ts_cache: tuple[bytes, bytes] = (b"", b"")
        self._ns_cache: tuple[bytes, int | None] = (b"", None)
        self.done = False
        self.idle = False
        self.malformed = 0
        # Files still to read, the one being read first.
        self._sources: list[_Source] = []
        refs = list(files)
        # Only a path can be followed across a rotation; an fd is followed
        # as it grows.
        self._follow_path = (os.fspath(refs[-1]) if follow and refs
                             and not isinstance(refs[-1], int) else None)
        try:
            for i, ref in enumerate(refs):
                src = _Source.open(ref)
                if src is None:
                    if i == len(refs) - 1 and self._follow_path is not None:
                        src = _Source(self._follow_path, None)  # appears later
                    else:
                        continue  # rotated away and removed meanwhile
                self._sources.append(src)
            if limit_bytes is not None and limit_bytes <= 0:
                self.done = True
            elif tail_lines is not None and tail_lines >= 0:
                if tail_lines == 0 and not follow:
                    self.done = True
                else:
                    self._seek_tail(tail_lines)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for s in self._sources:
            s.close()
        self._sources = []

    def __enter__(self) -> "LogReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- tail ----------------------------------------------------------------

    def _backward(self) -> Iterator[tuple[int, int, bytes]]:
        """(source index, end offset, record) from the newest record back,
        ignoring an unfinished record at the very end."""
        for idx in range(len(self._sources) - 1, -1, -1):
            fd = self._sources[idx].fd
            if fd is None:
                continue
            pos = os.fstat(fd).st_size
            carry = b""
            trimmed = False
            while pos > 0:
                n = min(self._block, pos)
                pos -= n
                buf = os.pread(fd, n, pos) + carry
                if not trimmed:
                    k = buf.rfind(b"\n")
                    if k < 0:
                        carry = buf
                        continue
                    buf = buf[:k + 1]
                    trimmed = True
                if pos > 0:
                    i = buf.find(b"\n")
                    if i < 0:
                        carry = buf  # a record longer than a block
                        continue
                    carry, body, base = buf[:i + 1], buf[i + 1:], pos + i + 1
                else:
                    carry, body, base = b"", buf, 0
                recs = body.split(b"\n")
                recs.pop()
                end = base + len(body)
                for r in reversed(recs):
                    yield idx, end, r
                    end -= len(r) + 1

    def _seek_tail(self, n: int) -> None:
        """Start reading where the last n lines of the wanted streams begin.

        Walking back, a line ends at an F record, or at a stream's last
        record when that is P (the container died mid-line).  Once n lines
        are counted we keep walking until each of them has found where it
        starts (the previous line end of its stream): a long line's P
        records may lie before another stream's lines.  The F records met
        on that extra stretch end lines that are not wanted; the forward
        read skips that many.
        """
        if n == 0:
            # Follow from the end: past the newest whole record.
            for idx, end, _ in self._backward():
                self._start_at(idx, end)
                return
            if self._sources:
                self._start_at(len(self._sources) - 1, 0)
            return
        counted = 0
        open_: set[bytes] = set()
        seen: set[bytes] = set()
        skip = 0
        start = None
        for idx, end, rec in self._backward():
            m = RECORD_RE.match(rec)
            if m is None:
                continue
            stream, tag = m.group(2), m.group(3)
            if stream not in self._want:
                continue
            partial = tag == b"P" or tag[:2] == b"P:"
            terminal = not partial or stream not in seen
            seen.add(stream)
            if not terminal:
                continue
            if counted < n:
                counted += 1
                open_.add(stream)
                continue
            if stream in open_:
                open_.discard(stream)
                if not open_:
                    start = (idx, end)
                    break
            skip += 1
        # Ran out of records: start at the very beginning (skip is still
        # right if n lines were counted but some began before everything).
        self._skip = skip
        if start is not None:
            self._start_at(*start)

    def _start_at(self, idx: int, off: int) -> None:
        for s in self._sources[:idx]:
            s.close()
        self._sources = self._sources[idx:]
        self._sources[0].offset = off

    # --- forward -------------------------------------------------------------

    def _read(self, src: _Source, allow_torn: bool) -> tuple[bytes, bool] | None:
        """The next whole records of src, and whether the last one is torn
        (no newline: a crashed writer, or one caught mid-write)."""
        if src.fd is None:
            try:
                src.fd = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            st = os.fstat(src.fd)
            src.id = (st.st_dev, st.st_ino)
        chunks = []
        off = src.offset
        eof = False
        while True:
            d = os.pread(src.fd, self._block, off)
            if not d:
                eof = True
                break
            chunks.append(d)
            off += len(d)
            if b"\n" in d:
                break
            if len(d) < self._block:
                eof = True
                break
        buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if not buf:
            return None
        cut = buf.rfind(b"\n") + 1
        if cut < len(buf):
            if allow_torn and eof:
                src.offset += len(buf)
                return buf + b"\n", True
            buf = buf[:cut]
        if not buf:
            return None
        src.offset += cut
        return buf, False

    def _ts_prefix(self, ts: bytes) -> bytes:
        if self._ts_cache[0] != ts:
            self._ts_cache = (ts, fixed_timestamp(ts) + b" ")
        return self._ts_cache[1]

    def _ts_ns(self, ts: bytes) -> int | None:
        if self._ns_cache[0] != ts:
            try:
                v: int | None = parse_timestamp(ts)
            except LogFormatError:
                v = None
            self._ns_cache = (ts, v)
        return self._ns_cache[1]

    def _careful(self, data: bytes) -> list[tuple[bytes, bytes, bytes, bytes]]:
        """Records of a block that holds malformed lines: those are skipped
        (as the kubelet does) and counted, the first one logged."""
        recs = []
        for line in data.split(b"\n")[:-1]:
            m = RECORD_RE.match(line)
            if m is not None:
                recs.append(m.groups())
                continue
            self.malformed += 1
            if self.malformed == 1:
                try:
                    parse_line(line)
                    why = "unexpected format"
                except LogFormatError as e:
                    why = str(e)
                log.warning("skipping malformed log line %.80r: %s", line, why)
        return recs

    def _process(self, data: bytes, torn: bool, out: list[bytes]) -> None:
        if (self._all and self._since is None and not self._skip and not self._pending
                and not torn):
            # Nothing to filter or join: if the block is all F records, the
            # regex engine does (nearly) all the work.
            if not self._timestamps:
                contents = CONTENT_F_RE.findall(data)
                if len(contents) == data.count(b"\n"):
                    contents.append(b"")
                    out.append(b"\n".join(contents))
                    return
            else:
                pairs = TS_CONTENT_F_RE.findall(data)
                if len(pairs) == data.count(b"\n"):
                    prefix = self._ts_prefix
                    out.append(b"".join([prefix(ts) + c + b"\n" for ts, c in pairs]))
                    return
        recs = RECORD_RE.findall(data)
        if len(recs) != data.count(b"\n"):
            recs = self._careful(data)
        if torn and recs:
            ts, stream, _, content = recs[-1]
            recs[-1] = (ts, stream, b"P", content)  # the kubelet adds no newline either
        want = self._want
        pend = self._pending
        since = self._since
        stamps = self._timestamps
        for ts, stream, tag, content in recs:
            if stream not in want:
                continue
            line = pend.get(stream)
            if tag == b"F" or not (tag == b"P" or tag[:2] == b"P:"):
                if self._skip:
                    self._skip -= 1
                    pend.pop(stream, None)
                    continue
                if line is None:
                    if since is not None:
                        t = self._ts_ns(ts)
                        if t is None or t < since:
                            continue
                    if stamps:
                        out.append(self._ts_prefix(ts) + content + b"\n")
                    else:
                        out.append(content + b"\n")
                else:
                    del pend[stream]
                    if line.keep:
                        out.append(line.take() + content + b"\n")
                continue
            if line is None:
                keep = True
                if since is not None:
                    t = self._ts_ns(ts)
                    keep = t is not None and t >= since
                line = _Line(self._ts_prefix(ts) if stamps and keep else b"", keep, self._seq)
                self._seq += 1
                pend[stream] = line
            if line.keep:
                line.chunks.append(content)
                line.size += len(content)
                if line.size > MAX_JOIN:
                    out.append(line.take())

    def _finish(self, out: list[bytes]) -> None:
        """End of output: lines whose F never came are let out as they are,
        without a newline, oldest first."""
        for line in sorted(self._pending.values(), key=lambda ln: ln.seq):
            if line.keep:
                out.append(line.take())
        self._pending.clear()
        self.done = True

    def _emit(self, out: list[bytes]) -> bytes:
        data = b"".join(out)
        if self._limit is not None:
            remain = self._limit - self._emitted
            if len(data) >= remain:
                data = data[:remain]
                self.done = True
        self._emitted += len(data)
        if self.done:
            self.close()
        return data

    def _rotated(self, src: _Source) -> bool:
        """Has the followed path become a new file?  If so, queue any files
        rotated since the one we hold, then the new current file."""
        if src.fd is None or self._follow_path is None:
            return False
        try:
            st = os.stat(self._follow_path)
        except FileNotFoundError:
            return False  # between the writer's rename and its create
        if (st.st_dev, st.st_ino) == src.id:
            return False
        new = _Source.open(self._follow_path)
        if new is None:
            return False
        # A fast writer may have rotated more than once since we looked:
        # the rotated files after ours were current in between.  Ours is
        # found by inode, which cannot have been reused since we hold it
        # open; if it is not listed it was removed as the oldest, and every
        # rotated file left is newer.
        queue = []
        for p in _rotated_files(self._follow_path):
            r = _Source.open(p)
            if r is None:
                continue
            if r.id == src.id:
                for q in queue:
                    q.close()
                queue = []
                r.close()
            elif r.id == new.id:
                r.close()  # rotated again already; found again next time
                break
            else:
                queue.append(r)
        self._sources.extend(queue)
        self._sources.append(new)
        return True

    def poll(self, final: bool = False) -> bytes:
        """Output available now, at most a few blocks' worth per call."""
        if self.done:
            return b""
        final = final or not self._follow
        out: list[bytes] = []
        budget = 4 * self._block
        self.idle = False
        while budget > 0:
            if not self._sources:
                if final:
                    self._finish(out)
                else:
                    self.idle = True
                break
            src = self._sources[0]
            last = len(self._sources) == 1
            got = self._read(src, allow_torn=final or not last)
            if got is not None:
                self._process(got[0], got[1], out)
                budget -= len(got[0])
                if self._limit is not None and sum(map(len, out)) >= self._limit - self._emitted:
                    break
                continue
            if not last:
                # A rotated file is read to its end before the next one,
                # which is why rotation is checked only at the end of the
                # newest: nothing written before a rename is skipped.
                src.close()
                del self._sources[0]
                continue
            if self._follow and self._rotated(src):
                continue
            if final:
                self._finish(out)
            else:
                self.idle = True
            break
        return self._emit(out)


def _stopped(stop: Stop) -> bool:
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())


def read_logs(files: Iterable[FileRef], *, tail_lines: int | None = None,
              since: datetime.datetime | None = None, timestamps: bool = False,
              limit_bytes: int | None = None, follow: bool = False, stream: str = "all",
              stop: Stop = None, poll_interval: float = 0.1) -> Iterator[bytes]:
    """kubectl logs over files (paths or fds) oldest first, as byte chunks.

    With follow, keeps reading as the newest file grows and across its
    rotations until stop (an Event or a callable) says the writer is done;
    what is left is then read and unfinished lines are ended.  Closing the
    generator (a client gone) ends it at once.
    """
    reader = LogReader(files, tail_lines=tail_lines, since=since, timestamps=timestamps,
                       limit_bytes=limit_bytes, follow=follow, stream=stream)
    try:
        while not reader.done:
            data = reader.poll(final=follow and _stopped(stop))
            if data:
                yield data
            elif reader.idle:
                if isinstance(stop, threading.Event):
                    stop.wait(poll_interval)
                else:
                    time.sleep(poll_interval)
    finally:
        reader.close()
