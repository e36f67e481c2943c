"""A work queue of pod keys: the pod workers' scheduling, in one place.

The one rule that matters (the kubelet's pod_workers.go keeps it with a
goroutine per pod): two syncs of the same pod never run at once.  Here
it is a queue of keys with a set of keys in flight: a key added while it
is queued is not queued twice, and a key added while a worker holds it
is marked dirty and queued again when that worker is done, so the sync
that follows sees everything that happened meanwhile.  A small pool of
threads serves every pod: no thread per pod.

Delayed adds (back-offs, resyncs, grace deadlines) sit in a heap that
the pool's own wait serves; the earliest add of a key wins.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from typing import Callable, Hashable

log = logging.getLogger("pufflet.agent.workqueue")


class WorkQueue:
    def __init__(self, handler: Callable[[Hashable], None], workers: int = 8,
                 name: str = "pod-worker",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.handler = handler
        self.clock = clock
        self._cond = threading.Condition()
        self._queue: deque[Hashable] = deque()
        self._queued: set[Hashable] = set()
        self._inflight: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._timers: list[tuple[float, int, Hashable]] = []
        self._due: dict[Hashable, float] = {}       # earliest timer per key
        self._seq = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]

    def start(self) -> "WorkQueue":
        for t in self._threads:
            t.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- adding ------------------------------------------------------------

    def add(self, key: Hashable) -> None:
        with self._cond:
            self._add(key)

    def add_after(self, key: Hashable, delay: float) -> None:
        """Queue key in delay seconds (at once when delay <= 0).  A key
        already due earlier keeps its earlier time."""
        if delay <= 0:
            self.add(key)
            return
        when = self.clock() + delay
        with self._cond:
            if self._due.get(key, float("inf")) <= when:
                return
            self._due[key] = when
            self._seq += 1
            heapq.heappush(self._timers, (when, self._seq, key))
            self._cond.notify()

    def _add(self, key: Hashable) -> None:
        # Called with the lock held.
        if key in self._inflight:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.append(key)
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._inflight)

    # -- serving -----------------------------------------------------------

    def _next(self) -> Hashable | None:
        with self._cond:
            while not self._closed:
                now = self.clock()
                while self._timers and self._timers[0][0] <= now:
                    when, _, key = heapq.heappop(self._timers)
                    if self._due.get(key) == when:
                        del self._due[key]
                        self._add(key)
                if self._queue:
                    key = self._queue.popleft()
                    self._queued.discard(key)
                    self._inflight.add(key)
                    return key
                wait = self._timers[0][0] - now if self._timers else None
                self._cond.wait(wait)
            return None

    def _done(self, key: Hashable) -> None:
        with self._cond:
            self._inflight.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add(key)

    def _run(self) -> None:
        while True:
            key = self._next()
            if key is None:
                return
            try:
                self.handler(key)
            except Exception:       # noqa: BLE001 - one pod must not stop the others
                log.exception("sync of %s failed", key)
            finally:
                self._done(key)
