"""RPC between the agent (Client) and the priv (Server) over a socketpair.

Frames (see frames.py) carry msgpack maps:

    request   {"id": int > 0, "method": str, "body": map}
    response  {"id", "code": gRPC status name, "message": str, "body": map}
              plus "more": True on every frame of a stream but the last

A stream's last frame carries only the status: its body is empty and it has
no fds.  So does every error response.  Both sides validate every frame they
send and receive against the spec.

The priv must survive anything the agent sends: the Server answers every
complete frame it can (id 0 when no id can be read), and only gives up the
channel when the framing itself is broken (FrameError) or the peer is gone.
"""

from __future__ import annotations

import itertools
import logging
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from pufflet.privsep.frames import (Codec, FrameError, Reader, close_fds,
                                    send)
from pufflet.privsep.spec import CODES, Invalid, Method, Spec

__all__ = ["Status", "FrameError", "Reply", "Client", "Server"]

_CODES = frozenset(CODES)
_MAX_ID = 2 ** 63 - 1
_MAX_MESSAGE = 1024
_REQUEST_KEYS = frozenset(("id", "method", "body"))
_RESPONSE_KEYS = frozenset(("id", "code", "message", "body", "more"))
_PLAIN_KEYS = frozenset(("id", "code", "message", "body"))

_log = logging.getLogger(__name__)


class Status(Exception):
    """An RPC error: handlers raise it, clients receive it."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


@dataclass(slots=True)
class Reply:
    body: dict
    fds: list[int]          # the caller owns these and must close them


def _check_response(m: Method, obj: dict, nfds: int) -> None:
    """Validate a whole response frame (the id was checked by the caller)."""
    if (obj.keys() == _PLAIN_KEYS and obj["code"] == "OK" and not m.stream
            and obj["message"] == "" and nfds == len(m.response_fds)):
        m.check_response_body(obj["body"])      # the common case, quickly
        return
    if not obj.keys() <= _RESPONSE_KEYS:
        raise Invalid("unknown key in response frame", root="frame")
    code = obj.get("code")
    if type(code) is not str or code not in _CODES:
        raise Invalid("not a status code", root="frame.code")
    msg = obj.get("message")
    if type(msg) is not str or len(msg) > _MAX_MESSAGE:
        raise Invalid("expected a short str", root="frame.message")
    more = obj.get("more", False)
    if more is not False and not (more is True and m.stream and code == "OK"):
        raise Invalid("only OK frames of a stream have more",
                      root="frame.more")
    if code == "OK" and (more or not m.stream):
        m.check_response(obj.get("body"), nfds)
    elif type(obj.get("body")) is not dict or obj["body"] or nfds:
        raise Invalid("a status-only frame has an empty body and no fds",
                      root="frame.body")


class _Slot:
    """Where the reading thread leaves the frames of one call."""
    __slots__ = ("method", "frames", "wake")

    def __init__(self, method: Method) -> None:
        self.method = method
        self.frames: deque[tuple[dict, list[int]]] = deque()
        self.wake: Any = None       # a held lock while its caller sleeps


def _reply(obj: dict, fds: list[int]) -> Reply:
    if obj["code"] != "OK":
        close_fds(fds)
        raise Status(obj["code"], obj["message"])
    return Reply(obj["body"], fds)


class Client:
    """The agent's end.  Thread-safe: many threads may call at once.

    There is no reader thread.  A caller that needs a response becomes the
    leader if nobody is, and reads frames itself, leaving other calls'
    responses in their slots and waking their callers; when its own response
    is in, it hands leadership to one sleeping caller.  An uncontended call
    is thus send, recv, return, on the caller's thread.
    """

    def __init__(self, sock: socket.socket, spec: Spec) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._spec = spec
        self._methods = spec.methods
        self._codec = Codec(spec)
        self._reader = Reader(spec)
        self._ids = itertools.count(1)      # next() is atomic under the GIL
        self._lock = threading.Lock()       # slots, waiters, leadership
        self._send_lock = threading.Lock()  # one frame at a time on the wire
        self._slots: dict[int, _Slot] = {}
        self._waiters: dict[int, _Slot] = {}
        self._leading = False
        self._down: BaseException | None = None

    def call(self, method: str, body: dict, fds: Sequence[int] = (),
             timeout: float | None = None) -> Reply:
        """One request, one response.  Raises Invalid for a request that
        does not match the spec (nothing is sent), Status for an error
        answer or DEADLINE_EXCEEDED, FrameError or ConnectionError when
        the channel is down."""
        m = self._methods.get(method) if type(method) is str else None
        if m is None or fds:
            m = self._spec.check_request(method, body, len(fds))
        else:
            m.check_request_body(body)
            if m.request_fds:
                m.check_request(body, 0)        # raises: fds are missing
        if m.stream:
            raise ValueError(f"{method} is a stream method: use stream()")
        slot = _Slot(m)
        rid, lead = self._start(slot, body, fds)
        deadline = None if timeout is None else time.monotonic() + timeout
        if lead:
            # Straight from send to recv: the fewer steps between them, the
            # likelier the kernel keeps the peer on this CPU.
            got = self._lead(rid, deadline)
            if got is not None:
                return _reply(*got)
        return _reply(*self._wait(rid, slot, deadline, lead))

    def stream(self, method: str, body: dict,
               fds: Sequence[int] = ()) -> Iterator[Reply]:
        """Send now; the iterator yields each data frame and ends after the
        final one (raising Status if that is an error).  Frames still
        coming for an abandoned iterator are dropped, their fds closed."""
        m = self._spec.check_request(method, body, len(fds))
        if not m.stream:
            raise ValueError(f"{method} is not a stream method: use call()")
        slot = _Slot(m)
        rid, lead = self._start(slot, body, fds, may_lead=False)
        return self._frames(rid, slot)

    def close(self) -> None:
        self._fail(ConnectionError("privsep channel closed"))
        self._sock.close()

    def _frames(self, rid: int, slot: _Slot) -> Iterator[Reply]:
        done = False
        try:
            while True:
                obj, fds = self._wait(rid, slot, None, False)
                if obj.get("more"):
                    yield Reply(obj["body"], fds)
                    continue
                done = True
                _reply(obj, fds)
                return
        finally:
            if not done:
                with self._lock:
                    self._slots.pop(rid, None)
                    self._waiters.pop(rid, None)
                for _, fds in slot.frames:
                    close_fds(fds)

    def _start(self, slot: _Slot, body: dict, fds: Sequence[int],
               may_lead: bool = True) -> tuple[int, bool]:
        """Register a slot and send the request; returns its id and whether
        this thread took leadership (then it must call _lead)."""
        # Explicit acquire/release on this path: half the cost of "with".
        rid = next(self._ids)
        self._lock.acquire()
        try:
            if self._down is not None:
                raise self._down_error()
            self._slots[rid] = slot     # before sending: the answer may race
            lead = may_lead and not self._leading
            if lead:
                self._leading = True
        finally:
            self._lock.release()
        try:
            self._send_lock.acquire()   # also guards the codec's packer
            try:
                frame = self._codec.encode(
                    {"id": rid, "method": slot.method.name, "body": body},
                    len(fds))
                send(self._sock, frame, fds)
            finally:
                self._send_lock.release()
        except (ValueError, TypeError, OverflowError) as e:
            self._unstart(rid, lead)
            raise Invalid(str(e), root="frame") from None
        except OSError as e:
            # A partial frame may be on the wire: the channel is done for.
            self._unstart(rid, lead)
            self._fail(e)
            raise self._down_error() from e
        return rid, lead

    def _unstart(self, rid: int, lead: bool) -> None:
        with self._lock:
            self._slots.pop(rid, None)
            if lead:
                self._leading = False
                self._promote()

    def _wait(self, rid: int, slot: _Slot, deadline: float | None,
              tried: bool) -> tuple[dict, list[int]]:
        """Wait for the next frame for rid: lead while nobody else does,
        sleep otherwise.  tried: a _lead already ran out of time."""
        while True:
            if tried and deadline is not None and time.monotonic() >= deadline:
                with self._lock:
                    if slot.frames:
                        return self._take(rid, slot)
                    self._slots.pop(rid, None)
                    self._waiters.pop(rid, None)
                    slot.wake = None
                    self._promote()
                raise Status("DEADLINE_EXCEEDED", "no answer in time")
            with self._lock:
                if slot.frames:
                    return self._take(rid, slot)
                if self._down is not None:
                    self._slots.pop(rid, None)
                    raise self._down_error()
                lead = not self._leading
                if lead:
                    self._leading = True
                else:
                    wake = slot.wake = threading.Lock()
                    wake.acquire()
                    self._waiters[rid] = slot
            if lead:
                got = self._lead(rid, deadline)
                if got is not None:
                    return got
            else:
                left = -1 if deadline is None else max(
                    0.0, deadline - time.monotonic())
                if not wake.acquire(timeout=left):
                    with self._lock:
                        if self._waiters.pop(rid, None) is not None:
                            slot.wake = None    # else woken as we timed out
            tried = True

    def _take(self, rid: int, slot: _Slot) -> tuple[dict, list[int]]:
        # Called with self._lock held.
        obj, fds = slot.frames.popleft()
        if not obj.get("more"):
            self._slots.pop(rid, None)
        return obj, fds

    def _lead(self, rid: int,
              deadline: float | None) -> tuple[dict, list[int]] | None:
        """Read frames until one for rid comes (returned) or the deadline
        passes (None).  Only the leader touches the reader."""
        got = None
        try:
            while got is None:
                if deadline is not None and not self._readable(deadline):
                    break
                frames = self._reader.read(self._sock)
                if frames is None:
                    raise ConnectionError("privsep channel closed by peer")
                it = iter(frames)
                try:
                    for fr in it:
                        routed = self._route(fr)
                        if routed is None:
                            continue
                        if got is None and routed[0] == rid:
                            got = routed[1], routed[2]
                        else:
                            self._deliver(*routed)
                finally:
                    for _, fds in it:       # left over after an error
                        close_fds(fds)
        except (FrameError, OSError) as e:
            self._fail(e)
            raise
        finally:
            self._lock.acquire()
            try:
                self._leading = False
                if got is not None and not got[0].get("more"):
                    self._slots.pop(rid, None)
                self._promote()
            finally:
                self._lock.release()
        return got

    def _readable(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        p = select.poll()
        p.register(self._sock.fileno(), select.POLLIN)
        return bool(p.poll(left * 1000))

    def _route(self, fr: tuple[bytes, list[int]]
               ) -> tuple[int, dict, list[int]] | None:
        """Decode and validate one response; None if nobody wants it."""
        payload, fds = fr
        try:
            obj = self._codec.decode(payload)
        except Exception as e:
            close_fds(fds)
            raise FrameError(f"undecodable response: {e}") from None
        rid = obj.get("id") if type(obj) is dict else None
        if type(rid) is not int:
            close_fds(fds)
            raise FrameError("response without an id")
        slot = self._slots.get(rid)
        if slot is None:
            # A call that timed out or a stream that was abandoned.
            close_fds(fds)
            return None
        try:
            _check_response(slot.method, obj, len(fds))
        except Invalid as e:
            close_fds(fds)
            _log.error("privsep: invalid %s response: %s", slot.method.name, e)
            msg = f"invalid response: {e}"[:_MAX_MESSAGE]
            return rid, {"id": rid, "code": "INTERNAL", "body": {},
                         "message": msg}, []
        return rid, obj, fds

    def _deliver(self, rid: int, obj: dict, fds: list[int]) -> None:
        with self._lock:
            slot = self._slots.get(rid)
            if slot is None:
                close_fds(fds)
                return
            slot.frames.append((obj, fds))
            if slot.wake is not None:
                self._waiters.pop(rid, None)
                slot.wake.release()
                slot.wake = None

    def _promote(self) -> None:
        # Called with self._lock held: wake one sleeper to lead.
        if not self._leading and self._waiters:
            _, slot = self._waiters.popitem()
            slot.wake.release()
            slot.wake = None

    def _fail(self, why: BaseException) -> None:
        with self._lock:
            if self._down is None:
                self._down = why
            for slot in self._waiters.values():
                slot.wake.release()
                slot.wake = None
            self._waiters.clear()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)   # wakes a blocked leader
        except OSError:
            pass
        self._reader.close()

    def _down_error(self) -> Exception:
        if isinstance(self._down, FrameError):
            return FrameError(str(self._down))
        return ConnectionError(f"privsep channel down: {self._down}")


Handler = Callable[[dict, list], Any]


class Server:
    """The priv's end.  Single-threaded, driven by the caller's event loop.

    Call on_readable() when the socket is readable; while busy() is true,
    also call on_idle() when it is not, so streams make progress.  Each
    stream yields one frame per turn, round-robin, so one long stream
    cannot hold up everything else; a stream generator must not block.

    Writes block (poll for POLLOUT) for up to send_timeout seconds: the
    agent always reads, so a peer that does not is broken and the channel
    is closed rather than letting it stall the priv.

    fds received with a request belong to the server: they are valid while
    the handler runs (for a stream, until it ends) and are closed after; a
    handler that keeps one must os.dup() it.  fds a handler returns are sent
    and then closed.
    """

    def __init__(self, sock: socket.socket, spec: Spec,
                 handlers: Mapping[str, Handler], log: logging.Logger,
                 send_timeout: float = 30.0) -> None:
        for name, h in handlers.items():
            if name not in spec.methods:
                raise ValueError(f"handler for {name!r}, not in the spec")
            if not callable(h):
                raise ValueError(f"handler for {name!r} is not callable")
        # The fixed dispatch table: method name -> (Method, handler|None).
        self._table: dict[str, tuple[Method, Handler | None]] = {
            name: (m, handlers.get(name)) for name, m in spec.methods.items()}
        sock.setblocking(False)
        self._sock = sock
        self._log = log
        self._codec = Codec(spec)
        self._reader = Reader(spec)
        self._max_outstanding = spec.limits.max_outstanding
        self._send_timeout = send_timeout
        # Streams in flight: id -> (method, iterator, request fds).
        self._streams: dict[int, tuple[Method, Iterator, list[int]]] = {}
        # Streams whose iterator last yielded None: nothing to send until
        # wake() says the source has news, so the loop may sleep.
        self._parked: set[int] = set()
        self._rejected = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def busy(self) -> bool:
        """True while a stream has frames to send (so the loop must not
        sleep); parked streams wait for wake()."""
        return len(self._streams) > len(self._parked)

    def wake(self) -> None:
        """Something a parked stream waits for happened: poll them all
        again on the next turn."""
        self._parked.clear()

    def on_readable(self) -> bool:
        """Read once, answer every complete frame, advance streams.
        False when the peer is gone or the framing broke."""
        try:
            try:
                frames = self._reader.read(self._sock)
            except (BlockingIOError, InterruptedError):
                frames = []
            if frames is None:
                self._log.info("privsep: peer closed the channel")
                return False
            it = iter(frames)
            try:
                for payload, fds in it:
                    kept = False
                    try:
                        kept = self._dispatch(payload, fds)
                    finally:
                        if not kept:        # else a stream owns them now
                            close_fds(fds)
            finally:
                for _, fds in it:           # left over after an error
                    close_fds(fds)
            if self._streams:
                self._advance()
        except FrameError as e:
            self._log.warning("privsep: %s; closing the channel", e)
            return False
        except OSError as e:
            self._log.warning("privsep: %s; closing the channel", e)
            return False
        return True

    def on_idle(self) -> bool:
        """Advance streams by one frame each; False if the channel broke."""
        try:
            self._advance()
        except OSError as e:
            self._log.warning("privsep: %s; closing the channel", e)
            return False
        return True

    def serve_forever(self) -> None:
        """A loop for tests and benchmarks; the daemon uses its own."""
        p = select.poll()
        p.register(self._sock.fileno(), select.POLLIN)
        while True:
            ready = p.poll(0 if self.busy() else None)
            if not (self.on_readable() if ready else self.on_idle()):
                break
        self.close()

    def close(self) -> None:
        for rid in list(self._streams):
            self._end(rid)
        self._reader.close()
        self._sock.close()

    def _dispatch(self, payload: bytes, fds: list[int]) -> bool:
        """Answer one request frame; True if a stream took over the fds."""
        try:
            obj = self._codec.decode(payload)
        except Exception as e:
            return self._reject(0, "INVALID_ARGUMENT",
                                f"undecodable frame ({type(e).__name__})")
        if type(obj) is not dict:
            return self._reject(0, "INVALID_ARGUMENT", "frame is not a map")
        rid = obj.get("id")
        if type(rid) is not int or not 0 < rid <= _MAX_ID:
            return self._reject(0, "INVALID_ARGUMENT",
                                "id must be a positive int")
        if obj.keys() != _REQUEST_KEYS:
            return self._reject(rid, "INVALID_ARGUMENT",
                                "frame keys must be id, method, body")
        name = obj["method"]
        entry = self._table.get(name) if type(name) is str else None
        if entry is None:
            return self._reject(rid, "UNIMPLEMENTED",
                                f"no method {name!r}"[:200])
        m, handler = entry
        if rid in self._streams:
            return self._reject(rid, "INVALID_ARGUMENT",
                                "id of a request in flight")
        if len(self._streams) >= self._max_outstanding:
            return self._reject(rid, "RESOURCE_EXHAUSTED",
                                "too many requests in flight")
        body = obj["body"]
        try:
            m.check_request_body(body)
            if len(fds) != len(m.request_fds):
                m.check_request(body, len(fds))     # raises, naming the fds
        except Invalid as e:
            return self._reject(rid, "INVALID_ARGUMENT", str(e))
        if handler is None:
            self._final(rid, "UNIMPLEMENTED", f"{name} is not served here")
            return False
        try:
            result = handler(body, list(fds))
            if m.stream:
                result = iter(result)
        except Status as e:
            self._final(rid, *self._status(e))
            return False
        except Exception as e:
            self._log.exception("privsep: %s handler failed", name)
            self._final(rid, "INTERNAL", f"{name} failed: {type(e).__name__}")
            return False
        if m.stream:
            self._streams[rid] = (m, result, fds)
            return True
        self._respond(rid, m, result, False)
        return False

    def _advance(self) -> None:
        for rid, (m, it, _) in list(self._streams.items()):
            if rid in self._parked:
                continue
            try:
                item = next(it)
            except StopIteration:
                self._end(rid)
                self._final(rid, "OK", "")
            except Status as e:
                self._end(rid)
                self._final(rid, *self._status(e))
            except Exception as e:
                self._log.exception("privsep: %s stream failed", m.name)
                self._end(rid)
                self._final(rid, "INTERNAL", f"{m.name} failed: "
                                             f"{type(e).__name__}")
            else:
                if item is None:
                    # A stream with nothing to say yet (an event feed)
                    # yields None rather than block the single-threaded
                    # priv; it is parked until wake().
                    self._parked.add(rid)
                elif not self._respond(rid, m, item, True):
                    self._end(rid)      # the INTERNAL answer was final

    def _end(self, rid: int) -> None:
        self._parked.discard(rid)
        _, it, fds = self._streams.pop(rid)
        close_fds(fds)
        close = getattr(it, "close", None)     # a generator's finally blocks
        if close is not None:
            try:
                close()
            except Exception:
                self._log.exception("privsep: closing a stream")

    def _respond(self, rid: int, m: Method, result: Any, more: bool) -> bool:
        """Send an OK frame; on an invalid result send INTERNAL instead and
        return False.  Returned fds are closed either way."""
        if type(result) is tuple and len(result) == 2:
            body, rfds = result
            if not (type(rfds) in (list, tuple)
                    and all(type(fd) is int for fd in rfds)):
                self._log.error("privsep: %s returned bad fds: %r", m.name,
                                rfds)
                self._final(rid, "INTERNAL", f"{m.name}: invalid response")
                return False
        else:
            body, rfds = result, ()
        try:
            try:
                m.check_response_body(body)
                if len(rfds) != len(m.response_fds):
                    m.check_response(body, len(rfds))
                frame = {"id": rid, "code": "OK", "message": "", "body": body}
                if more:
                    frame["more"] = True
                data = self._codec.encode(frame, len(rfds))
            except (Invalid, ValueError, TypeError, OverflowError) as e:
                self._log.error("privsep: %s returned an invalid response: %s",
                                m.name, e)
                self._final(rid, "INTERNAL", f"{m.name}: invalid response")
                return False
            send(self._sock, data, rfds, self._send_timeout)
            return True
        finally:
            if rfds:
                close_fds(rfds)

    def _status(self, e: Status) -> tuple[str, str]:
        if e.code not in _CODES or e.code == "OK":
            self._log.error("privsep: handler raised bad status %r", e.code)
            return "INTERNAL", "bad status from handler"
        return e.code, str(e.message)

    def _reject(self, rid: int, code: str, message: str) -> bool:
        """Refuse a request the peer should not have sent; logs a few."""
        self._rejected += 1
        if self._rejected <= 10 or self._rejected % 1000 == 0:
            self._log.warning("privsep: refused request %d: %s: %s "
                              "(%d refused so far)", rid, code, message,
                              self._rejected)
        self._final(rid, code, message)
        return False

    def _final(self, rid: int, code: str, message: str) -> None:
        """A status-only frame: an error, or the end of a stream."""
        frame = {"id": rid, "code": code, "message": message[:_MAX_MESSAGE],
                 "body": {}}
        try:
            data = self._codec.encode(frame, 0)
        except (ValueError, TypeError):     # e.g. a lone surrogate
            frame["message"] = "(unencodable message)"
            data = self._codec.encode(frame, 0)
        send(self._sock, data, (), self._send_timeout)
