"""GET /containerLogs/{namespace}/{pod}/{container}: kubectl logs.

The API server proxies `kubectl logs` here with the PodLogOptions as query
parameters; we answer as the kubelet's getContainerLogs does: 400 for a
parameter that does not parse, 422 for one that parses but is invalid,
404 for an unknown pod or container, 400 for a container with nothing to
show (not started yet, no previous run), otherwise 200 text/plain,
chunked, flushed as it is read.

The files are the container logger's (priv/logger.py), under
<log_dir>/pods/<ns>_<pod>_<uid>/<container>/<restart>.log, given to the
agent's group read-only; logs/reader.py does the reading.  A follow ends
when the run being followed stops (its output is read to the end first),
when the client goes away, or when the server stops.
"""

from __future__ import annotations

import datetime
import re
import time
from typing import Callable, Iterator

from pufflet.logs import container_log_dir
from pufflet.logs.reader import container_log_files, read_logs
from pufflet.nodeapi.pods import PodInfo, PodLookup
from pufflet.nodeapi.server import HTTPError, Request, Server

ROUTE = r"/containerLogs/([^/]+)/([^/]+)/([^/]+)"
POLL = 0.1              # how often a follower looks for more output
RECHECK = 1.0           # how often it asks whether the run and the client still live
INVALID = '{"message": "Invalid request."}'
UNDECODABLE = '{"message": "Unable to decode query."}'

_INT = re.compile(r"[+-]?[0-9]{1,19}\Z")
_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(\.\d{1,9})?"
                      r"([Zz]|[+-]\d\d:\d\d)\Z")


class LogOptions:
    """The kubelet's v1 PodLogOptions, as far as a node reads them."""

    def __init__(self) -> None:
        self.follow = False
        self.previous = False
        self.timestamps = False
        self.tail_lines: int | None = None
        self.since_seconds: int | None = None
        self.since_time: datetime.datetime | None = None
        self.limit_bytes: int | None = None

    def since(self, now: float | None = None) -> datetime.datetime | None:
        if self.since_seconds is not None:
            t = (time.time() if now is None else now) - self.since_seconds
            return datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
        return self.since_time


def parse_options(query: dict[str, list[str]]) -> LogOptions:
    q = dict(query)
    # The kubelet still takes "tail", with "all" meaning no limit.
    if q.get("tail"):
        tail = q.pop("tail")[0]
        if tail == "all":
            q.pop("tailLines", None)
        else:
            q["tailLines"] = [tail]
    o = LogOptions()
    o.follow = _bool(q, "follow")
    o.previous = _bool(q, "previous")
    o.timestamps = _bool(q, "timestamps")
    o.tail_lines = _int(q, "tailLines")
    o.since_seconds = _int(q, "sinceSeconds")
    o.limit_bytes = _int(q, "limitBytes")
    if q.get("sinceTime") and q["sinceTime"][0] != "":
        o.since_time = _time(q["sinceTime"][0])
    # Then what ValidatePodLogOptions refuses, with its status.
    if (o.tail_lines is not None and o.tail_lines < 0
            or o.limit_bytes is not None and o.limit_bytes < 1
            or o.since_seconds is not None and o.since_seconds < 1
            or o.since_seconds is not None and o.since_time is not None):
        raise HTTPError(422, INVALID)
    return o


def _bool(q: dict[str, list[str]], name: str) -> bool:
    # apimachinery's rule: absent is false, so are "false" and "0"; any
    # other value, the empty one included ("?follow"), is true.
    v = q.get(name)
    if not v:
        return False
    return v[0].lower() not in ("false", "0")


def _int(q: dict[str, list[str]], name: str) -> int | None:
    v = q.get(name)
    if not v:
        return None
    if not _INT.match(v[0]):
        raise HTTPError(400, UNDECODABLE)
    n = int(v[0])
    if not -2**63 <= n < 2**63:
        raise HTTPError(400, UNDECODABLE)
    return n


def _time(s: str) -> datetime.datetime:
    m = _RFC3339.match(s)
    if m is None:
        raise HTTPError(400, UNDECODABLE)
    frac = (m.group(7) or ".0")[1:]
    tz = m.group(8)
    off = datetime.timedelta(0) if tz in ("Z", "z") else \
        (1 if tz[0] == "+" else -1) * datetime.timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
    try:
        t = datetime.datetime(*map(int, m.groups()[:6]), int(frac[:6].ljust(6, "0")),
                              tzinfo=datetime.timezone(off))
    except ValueError:
        raise HTTPError(400, UNDECODABLE) from None
    return t.astimezone(datetime.timezone.utc)


class LogsHandler:
    def __init__(self, log_root: str, pod_lookup: PodLookup,
                 stop: Callable[[], bool] = lambda: False, poll: float = POLL) -> None:
        self.root = log_root            # <log_dir>/pods
        self.lookup = pod_lookup
        self.stop = stop
        self.poll = poll

    def __call__(self, req: Request, m: "re.Match[str]") -> None:
        ns, name, cname = m.group(1), m.group(2), m.group(3)
        opts = parse_options(req.query)
        pod = self.lookup(ns, name)
        if pod is None:
            raise HTTPError(404, f'pod "{name}" does not exist')
        c = pod.containers.get(cname)
        if c is None:
            raise HTTPError(404, f'container "{cname}" not found in pod "{name}"')
        if opts.previous:
            if c.restart_count is None or c.restart_count < 1:
                raise HTTPError(400, f'previous terminated container "{cname}" in pod '
                                     f'"{name}" not found')
            restart = c.restart_count - 1
        else:
            if c.restart_count is None:
                raise HTTPError(400, f'container "{cname}" in pod "{name}" is waiting to '
                                     f'start: {c.waiting_reason or "ContainerCreating"}')
            restart = c.restart_count
        directory = container_log_dir(self.root, ns, name, pod.uid, cname)
        try:
            files = container_log_files(directory, restart)
        except FileNotFoundError:
            files = [f"{directory}/{restart}.log"]      # a follower waits for it
        except OSError as e:
            raise HTTPError(500, f"cannot read the logs: {e.strerror}") from None
        follow = opts.follow and c.running and restart == c.restart_count
        chunks = read_logs(files, tail_lines=opts.tail_lines, since=opts.since(),
                           timestamps=opts.timestamps, limit_bytes=opts.limit_bytes,
                           follow=follow, stop=self._ended(req, pod, cname, restart),
                           poll_interval=self.poll)
        self._send(req, chunks)

    def _ended(self, req: Request, pod: PodInfo, cname: str, restart: int) -> Callable[[], bool]:
        """The follower's stop: the server stops, the client leaves, or the
        run we follow is over (looked up at most every RECHECK seconds)."""
        state = {"at": time.monotonic()}

        def ended() -> bool:
            if self.stop():
                return True
            now = time.monotonic()
            if now - state["at"] < RECHECK:
                return False
            state["at"] = now
            if req.client_gone():
                return True
            p = self.lookup(pod.namespace, pod.name)
            c = p.containers.get(cname) if p is not None and p.uid == pod.uid else None
            return c is None or not c.running or c.restart_count != restart
        return ended

    @staticmethod
    def _send(req: Request, chunks: Iterator[bytes]) -> None:
        try:
            req.start(200, {"Content-Type": "text/plain; charset=utf-8"})
            for data in chunks:
                req.write(data)
            req.end()
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()


def add_routes(server: Server, log_root: str, pod_lookup: PodLookup,
               poll: float = POLL) -> None:
    server.add_route("GET", ROUTE, "proxy",
                     LogsHandler(log_root, pod_lookup, server.stop.is_set, poll))
