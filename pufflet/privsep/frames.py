"""Frames on the privsep socket: a ">IB" header, then a msgpack payload.

The header gives the payload length and the number of fds that travel with
the frame (SCM_RIGHTS, on the sendmsg that carries the frame's first bytes).
Both are checked against the spec's limits as soon as the five header bytes
are in, before the payload is buffered or parsed; a header out of bounds
means the byte stream can no longer be trusted, so it is a FrameError and
the channel is closed.

This module knows nothing of methods or ids: it moves bytes and fds.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import time
from collections import deque
from typing import Any, Sequence

import msgpack

from pufflet.privsep.spec import Spec

if msgpack.version < (1, 0, 0):      # Codec.decode relies on 1.x defaults
    raise ImportError("pufflet needs msgpack >= 1.0")
_unpackb = msgpack.unpackb

HEADER = struct.Struct(">IB")
_HLEN = HEADER.size
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack
_INT = array.array("i").itemsize
# Atomic close-on-exec for received fds where the kernel offers it
# (Linux, OpenBSD); otherwise it is set right after recvmsg.
# Plain ints: the socket module's flag enums cost microseconds per "|".
_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_CTRUNC = int(socket.MSG_CTRUNC)
_RIGHTS = (int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS))
_RECV_SIZE = 256 * 1024


class FrameError(Exception):
    """Framing is broken; the channel must be closed."""


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Codec:
    """msgpack encoding and bounded decoding for one spec."""

    def __init__(self, spec: Spec) -> None:
        self.max_frame = spec.limits.max_frame
        # One Packer reused: cheaper than packb, but not thread-safe, so a
        # codec belongs to one thread at a time (the caller serialises).
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def encode(self, obj: dict, nfds: int) -> bytes:
        """Header + payload.  Raises ValueError if the frame is too big."""
        payload = self._pack(obj)
        if len(payload) > self.max_frame:
            raise ValueError(f"frame of {len(payload)} bytes exceeds "
                             f"max_frame {self.max_frame}")
        return _pack_header(len(payload), nfds) + payload

    @staticmethod
    def decode(payload: bytes | bytearray) -> Any:
        """Unpack one payload; raises ValueError (or another msgpack error)
        on anything that is not exactly one msgpack object.

        msgpack >= 1.0 unpackb defaults are what we want, and passing them
        as keywords costs a third of the call: raw=False, strict_map_key=
        True, and max_str/bin/array/map/ext_len all set from len(payload),
        which the Reader has already bounded by max_frame.  So no length
        claimed inside a frame can make it allocate more than the frame's
        size in elements.
        """
        return _unpackb(payload)


def send(sock: socket.socket, frame: bytes, fds: Sequence[int] = (),
         timeout: float | None = None) -> None:
    """Send a whole frame, its fds on the first sendmsg.

    The socket may be blocking (timeout is then ignored) or non-blocking;
    on a non-blocking one we wait for POLLOUT up to timeout seconds in all,
    so that a peer that stops reading cannot stall us forever.  A partial
    send leaves the stream broken: the caller must close the channel on any
    exception.
    """
    if not fds:
        try:
            n = sock.send(frame)        # one syscall in the usual case
        except (BlockingIOError, InterruptedError):
            n = 0
        if n == len(frame):
            return
    view = memoryview(frame)
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        n = _retry(sock, lambda: sock.sendmsg([view], anc), timeout, None)
    elif timeout is None:
        sock.sendall(view[n:])
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    while n < len(view):
        rest = view[n:]
        n += _retry(sock, lambda: sock.send(rest), timeout, deadline)


def _retry(sock: socket.socket, op: Any, timeout: float | None,
           deadline: float | None) -> int:
    while True:
        try:
            return op()
        except (BlockingIOError, InterruptedError):
            pass
        if deadline is None:
            deadline = time.monotonic() + (timeout or 0.0)
        left = deadline - time.monotonic()
        p = select.poll()
        p.register(sock.fileno(), select.POLLOUT)
        if left <= 0 or not p.poll(left * 1000):
            raise TimeoutError("peer is not reading")


class Reader:
    """Reads bytes and fds from one socket and cuts them into frames.

    fds are queued in arrival order; each frame takes its declared count
    from the queue.  On a stream socket fds arrive no later than the bytes
    of their frame, so a frame whose fds are not yet queued is a lie.
    Queued fds that no frame claimed once no partial frame is pending were
    never declared: they are closed.
    """

    def __init__(self, spec: Spec) -> None:
        self.max_frame = spec.limits.max_frame
        self.max_fds = spec.limits.max_fds
        self._pending = bytearray()     # the start of an incomplete frame
        self._fds: deque[int] = deque()
        # Room for more than max_fds so an over-long list is seen as such
        # (MSG_CTRUNC) rather than silently truncated by the kernel.
        self._anc = socket.CMSG_SPACE(4 * self.max_fds * _INT)
        # recvmsg() would allocate (and, this large, mmap) a fresh buffer
        # per call; receive into one kept for the reader's life instead.
        self._in = bytearray(_RECV_SIZE)
        self._inview = memoryview(self._in)
        self._iov = (self._in,)

    def read(self, sock: socket.socket
             ) -> list[tuple[bytearray, list[int]]] | None:
        """One recvmsg; returns the frames it completed as (payload, fds),
        or None at end of stream.  May raise BlockingIOError on a
        non-blocking socket, OSError, or FrameError."""
        n, anc, mflags, _ = sock.recvmsg_into(self._iov, self._anc, _CLOEXEC)
        if anc or mflags & _CTRUNC:    # (Linux echoes MSG_CMSG_CLOEXEC)
            self._take_fds(anc, mflags)
        if not n:
            return None
        if self._pending:
            self._pending += self._inview[:n]
            buf = self._pending
        else:
            buf = self._in              # the usual case: no copy to join
        size = len(buf) if self._pending else n
        frames = []
        pos = 0
        while size - pos >= _HLEN:
            plen, nfds = _unpack_header(buf, pos)
            if plen > self.max_frame:
                raise FrameError(f"frame of {plen} bytes exceeds max_frame")
            if nfds > self.max_fds:
                raise FrameError(f"frame with {nfds} fds exceeds max_fds")
            end = pos + _HLEN + plen
            if end > size:
                break
            if nfds:
                if nfds > len(self._fds):
                    raise FrameError("frame declares fds that did not arrive")
                fds = [self._fds.popleft() for _ in range(nfds)]
            else:
                fds = []
            frames.append((buf[pos + _HLEN:end], fds))
            pos = end
        if pos == size:
            if self._pending:
                self._pending = bytearray()
            if self._fds:   # came with bytes already consumed: undeclared
                self.close()
        elif pos or buf is self._in:
            # Keep the incomplete frame.  Copied only when frames were cut
            # from in front of it, so a frame trickling in byte by byte
            # costs linear time, not quadratic.
            self._pending = bytearray(memoryview(buf)[pos:size])
        return frames

    def _take_fds(self, anc: list, mflags: int) -> None:
        for level, kind, cdata in anc:
            if (level, kind) == _RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[:len(cdata) - len(cdata) % _INT])
                for fd in fds:
                    if not _CLOEXEC:
                        os.set_inheritable(fd, False)
                    self._fds.append(fd)
        if mflags & _CTRUNC:
            raise FrameError("fds truncated: peer sent too many")
        if len(self._fds) > 4 * self.max_fds:
            raise FrameError("too many fds queued")

    def close(self) -> None:
        fds = list(self._fds)
        self._fds.clear()
        close_fds(fds)
